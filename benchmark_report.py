"""A benchmark table as the run comparison, the Benchmarks tab and a model card read it: the table the benchmark job
saved in a training run's folder (benchmark.json), and its rows as text. Apart from benchmark.py so that readers do not
import the harness's job code."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from workspace import read_json

RESULT_FILE = "benchmark.json"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or not is_number(entry.get("value")):
        return "–"
    stderr = f" ± {entry['stderr']:.4f}" if is_number(entry.get("stderr")) else ""
    return f"{entry['value']:.4f}{stderr}"


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a benchmark table as text: task, metric, rows, each contestant (value ± stderr), tuned − base."""
    contestants = table["contestants"]
    difference = "base" in contestants and "tuned" in contestants
    headers = ["task", "metric", "rows", *contestants, *(["tuned − base"] if difference else [])]
    rows = []
    for row in table["rows"]:
        arrow = {True: " ↑", False: " ↓"}.get(row.get("higher_is_better"), "")
        cells = [row["task"], row["metric"] + arrow, str(row.get("rows") or "")]
        cells += [_cell(row.get(contestant)) for contestant in contestants]
        if difference:
            cells.append(f"{row['difference']:+.4f}" if is_number(row.get("difference")) else "–")
        rows.append(cells)
    return headers, rows


def benchmark_markdown(table: dict[str, Any]) -> str:
    """The table as markdown, with what was run."""
    headers, rows = table_rows(table)
    lines = [
        f"# Benchmarks of {table['run']}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(headers) - 3)) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        f"{table['harness']}, at most {table['limit']} rows per task; base is {table['base_model']}; value ± the "
        "harness's standard error; ↑ higher is better.",
        "",
    ]
    return "\n".join(lines)


def benchmark_results(run_dir: str | Path) -> dict[str, Any] | None:
    """A training run's latest benchmark table (see benchmark_table), or None when it has none: for a model card."""
    return read_json(Path(run_dir) / RESULT_FILE, None)
