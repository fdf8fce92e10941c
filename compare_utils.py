"""Training runs side by side: their loss and eval-loss curves, final and best metrics, speed, time, memory, each
run's stage (SFT, DPO, ORPO, KTO, GRPO) with the last values of its own metrics (named by the stages' records), and
the settings that differ. Everything is read from the run folders (config.yaml, status.json, events.jsonl); nothing
is loaded or computed on a model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import runfolder
import stages
from workspace import UserError

MAX_RUNS = 12
METRIC_COLUMNS = [
    "run",
    "state",
    "stage",
    "steps",
    "final loss",
    "best loss",
    "final eval loss",
    "best eval loss",
    "tokens/s",
    "time",
    "peak memory GiB",
]


@dataclass(frozen=True)
class RunMetrics:
    """What one run's events say about it."""

    name: str
    state: str
    steps: int | None
    final_loss: float | None
    best_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    tokens_per_s: float | None  # the mean over logged steps
    seconds: float | None  # from start to end (or to now, while it runs)
    peak_memory_gib: float | None  # the GPU's when logged, else the process's
    stage: str = "sft"
    stage_metrics: dict[str, float] = field(default_factory=dict)  # the newest value of each, by metric name


@dataclass(frozen=True)
class Comparison:
    runs: list[RunMetrics]
    curves: list[tuple[str, str, int, float]]  # (run, "train" | "eval", step, loss)
    differences: list[tuple[str, dict[str, Any]]]  # (dotted setting, {run: value}) where the runs disagree
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # run → its benchmark table (benchmark.py)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(status: runfolder.Status) -> float | None:
    try:
        started = datetime.fromisoformat(status.started)
    except ValueError:
        return None
    try:
        ended = datetime.fromisoformat(status.ended) if status.ended else datetime.now(started.tzinfo)
    except ValueError:
        return None
    return max(0.0, (ended - started).total_seconds())


def run_metrics(run_dir: Path) -> tuple[RunMetrics, list[tuple[str, str, int, float]]]:
    """A training run's metrics and its loss curves (a step logged again after a resume: the newest wins)."""
    run_dir = Path(run_dir)
    losses: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    speeds, memory = [], []
    stage_values: dict[str, tuple[int, float]] = {}  # metric → (step, value): the newest step wins
    steps = None
    for event in runfolder.read_events(run_dir):
        if event.kind != runfolder.EventKind.LOG or not isinstance(event.step, int):
            continue
        steps = max(steps or 0, event.step)
        for key, series in (("loss", "train"), ("eval_loss", "eval")):
            if _finite(event.metrics.get(key)):
                losses[series][event.step] = float(event.metrics[key])
        if _finite(event.metrics.get("tokens_per_s")) and event.metrics["tokens_per_s"] > 0:
            speeds.append(float(event.metrics["tokens_per_s"]))
        gpu = event.metrics.get("gpu_memory_gib")
        gpu = max(gpu) if isinstance(gpu, list) and gpu and all(map(_finite, gpu)) else gpu
        for value in (gpu, event.metrics.get("memory_gib")):
            if _finite(value):
                memory.append(float(value))
                break
        for key, value in event.metrics.items():
            if stages.is_metric(key) and _finite(value) and event.step >= stage_values.get(key, (-1, 0.0))[0]:
                stage_values[key] = (event.step, float(value))

    def final(series: str) -> float | None:
        return losses[series][max(losses[series])] if losses[series] else None

    def best(series: str) -> float | None:
        return min(losses[series].values()) if losses[series] else None

    status = runfolder.read_status(run_dir)
    metrics = RunMetrics(
        run_dir.name,
        str(status.state),
        steps,
        final("train"),
        best("train"),
        final("eval"),
        best("eval"),
        round(sum(speeds) / len(speeds), 1) if speeds else None,
        _seconds(status),
        round(max(memory), 2) if memory else None,
        runfolder.run_stage(run_dir),
        {key: value for key, (_, value) in sorted(stage_values.items(), key=lambda item: stages.metric_order(item[0]))},
    )
    curves = [(run_dir.name, series, step, loss) for series in losses for step, loss in sorted(losses[series].items())]
    return metrics, curves


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name_or_path": "demo"}} → {"model.name_or_path": "demo"}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(settings: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The settings whose values differ between runs ({run: settings}), a missing one shown as None."""
    flat = {name: flatten(values) for name, values in settings.items()}
    keys = sorted({key for values in flat.values() for key in values})
    differences = []
    for key in keys:
        values = {name: flat[name].get(key) for name in flat}
        if len({repr(_normalised(value)) for value in values.values()}) > 1:
            differences.append((key, values))
    return differences


def _normalised(value: Any) -> Any:
    """A setting as compared: a run made from the UI writes 0.0 where one from YAML writes 0, and an empty mapping
    or text where another leaves the setting out, which mean the same."""
    if value in (None, "") or (isinstance(value, (dict, list, tuple)) and not value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    return value


def compare_runs(runs: list[str], workspace: str | Path | None = None) -> Comparison:
    """Training runs (names or folders) side by side; UserError for fewer than two, or one that is no training run."""
    names = list(dict.fromkeys(str(run) for run in runs or []))
    if len(names) < 2:
        raise UserError("Choose at least two training runs to compare.")
    if len(names) > MAX_RUNS:
        raise UserError(f"Compare at most {MAX_RUNS} runs at once; {len(names)} were chosen.")
    folders = [runfolder.run_path(name, workspace) for name in names]
    for folder in folders:
        kind = runfolder.read_kind(folder)
        if kind != "train":
            raise UserError(f"Run '{folder.name}' is a {kind} run; only training runs have curves to compare.")
    measured = [run_metrics(folder) for folder in folders]
    return Comparison(
        [metrics for metrics, _ in measured],
        [point for _, curves in measured for point in curves],
        config_differences({folder.name: runfolder.stage_settings(folder) for folder in folders}),
        _benchmarks(folders),
    )


def _benchmarks(folders: list[Path]) -> dict[str, dict[str, Any]]:
    import benchmark_report

    tables = {folder.name: benchmark_report.benchmark_results(folder) for folder in folders}
    return {name: table for name, table in tables.items() if table}


BENCHMARK_COLUMNS = ["run", "task", "metric", "rows", "base", "tuned", "tuned − base"]


def benchmark_rows(comparison: Comparison) -> list[list[str]]:
    """One row per (run, task, metric) of the runs' benchmark tables, under BENCHMARK_COLUMNS."""
    import benchmark_report

    rows = []
    for run, table in comparison.benchmarks.items():
        headers, cells = benchmark_report.table_rows(table)
        for row in cells:
            values = dict(zip(headers, row, strict=True))
            rows.append([run, *(values.get(column, "–") for column in BENCHMARK_COLUMNS[1:])])
    return rows


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def stage_metric_keys(comparison: Comparison) -> list[str]:
    """The stage metrics any of the runs logged, in the table's order."""
    keys = {key for run in comparison.runs for key in run.stage_metrics}
    return sorted(keys, key=stages.metric_order)


def metric_columns(comparison: Comparison) -> list[str]:
    """METRIC_COLUMNS, then one column per stage metric that any of the runs logged."""
    return [*METRIC_COLUMNS, *(stages.metric_label(key) for key in stage_metric_keys(comparison))]


def metric_rows(comparison: Comparison) -> list[list[str]]:
    """One row per run under metric_columns(comparison), formatted for a table ("–" where a run lacks a metric)."""
    keys = stage_metric_keys(comparison)
    return [
        [
            run.name,
            run.state,
            run.stage,
            "–" if run.steps is None else str(run.steps),
            _number(run.final_loss),
            _number(run.best_loss),
            _number(run.final_eval_loss),
            _number(run.best_eval_loss),
            _number(run.tokens_per_s, 1),
            _duration(run.seconds),
            _number(run.peak_memory_gib, 2),
            *(_number(run.stage_metrics.get(key)) for key in keys),
        ]
        for run in comparison.runs
    ]


def difference_rows(comparison: Comparison) -> list[list[str]]:
    """One row per differing setting: the setting, then each run's value."""
    names = [run.name for run in comparison.runs]
    return [[key, *(str(values.get(name)) for name in names)] for key, values in comparison.differences]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def comparison_text(comparison: Comparison) -> str:
    """The comparison as plain-text tables for the terminal."""
    names = [run.name for run in comparison.runs]
    parts = [_table(metric_columns(comparison), metric_rows(comparison)), ""]
    if comparison.differences:
        parts += ["settings that differ:", _table(["setting", *names], difference_rows(comparison))]
    else:
        parts.append("the runs' settings are the same")
    if comparison.benchmarks:
        parts += ["", "benchmarks (value ± standard error):", _table(BENCHMARK_COLUMNS, benchmark_rows(comparison))]
    return "\n".join(parts)
