"""Dataset files: where a dataset is (a local file, resolved in one place, or a Hub id) and reading its rows, with
checks that name the problem (line numbers, columns, encodings)."""

from __future__ import annotations

import csv
import io
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset_formats import FORMATS, suggest_column_map
from settings import check, option
from workspace import UserError, path_exists, resolve_user_path, shorten_path

# More columns than any real dataset of these formats has; see _check_column_count.
MAX_COLUMNS = 1000
# Levels of lists and objects a column keeps as such (a chat's messages need three); deeper ones are kept as JSON text.
MAX_NESTING = 32
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt")
# The one default of each, for TrainConfig and for a preview (Dataset tab, `main.py dataset`) that has no config.
DEFAULT_MAX_SEQ_LENGTH = 2048
DEFAULT_SEED = 3407


@dataclass
class DatasetConfig:
    """Where the data is and how to read it."""

    source: str = option(
        "",
        help="A file inside the workspace (upload one above), any local path (CSV, JSON, JSONL, Parquet, TXT), "
        "or a Hub dataset id.",
        label="Dataset (path or Hub id)",
    )
    subset: str = option(
        "", help="The subset (config name) of a Hub dataset that has several; empty = its default.", label="Subset"
    )
    split: str = option("train", help="Which split of a Hub dataset to read.", label="Split")
    format: str = option(
        "auto",
        help="auto detects Alpaca, ShareGPT, messages, prompt/completion or text from the columns.",
        choices=("auto", *FORMATS),
        label="Format",
    )
    column_map: dict[str, str] = option(
        default_factory=dict,
        help="Format field -> column, for columns with other names, e.g. {output: answer}.",
        label="Column mapping",
    )
    chat_template: str = option(
        "",
        help="Empty = the model's own template. 'chatml', 'llama3', 'mistral', 'phi4' (or a Jinja template) for "
        "models without one.",
        label="Chat template",
    )
    system_prompt: str = option("", help="Added as a system turn to rows that have none.", label="System prompt")
    max_rows: int = option(0, help="Read at most this many rows (0 = all).", minimum=0, label="Max rows")

    def validate(self) -> None:
        check(self)
        if not str(self.source).strip():
            raise UserError(
                "No dataset given. Choose a local file (CSV, JSON, JSONL, Parquet, TXT) or a Hub dataset id."
            )


def load_rows(config: DatasetConfig, workspace: str | Path | None = None):
    """Load the raw rows of a local file or a Hub dataset as a `datasets.Dataset`."""
    config.validate()
    return read_rows(config, local_file(config, workspace))


def local_file(config: DatasetConfig, workspace: str | Path | None = None) -> Path | None:
    """The user's data file, resolved (inside the workspace when the app is shared), or None for a Hub dataset id:
    the one place a dataset's path is resolved."""
    source = str(config.source).strip()
    return resolve_user_path(source, workspace) if _looks_local(source) else None


def read_rows(config: DatasetConfig, local: Path | None):
    """The rows of the resolved local file (see local_file), or of the Hub dataset when there is none; at most
    max_rows of them."""
    if local is not None:
        dataset = load_local_file(local)
    else:
        dataset = load_hub_dataset(str(config.source).strip(), config.split, config.subset)
    if config.max_rows:
        dataset = dataset.select(range(min(config.max_rows, len(dataset))))
    return dataset


def is_hub_dataset(source: str) -> bool:
    """Whether the source names a Hub dataset (owner/name) rather than a local file."""
    source = str(source).strip()
    return bool(source) and not _looks_local(source)


def check_hub_dataset(config: DatasetConfig) -> None:
    """Before a run exists: a source that is no local file must be a Hub dataset id (owner/name, or a bare name
    the Hub still redirects), and with HF_HUB_OFFLINE=1 one the local cache can load."""
    import download_utils

    source = str(config.source).strip()
    owner, _, name = source.rpartition("/")
    if not download_utils.HUB_ID.fullmatch(f"{owner or 'datasets'}/{name}") or ".." in source:
        shown = shorten_path(source).encode("unicode_escape").decode("ascii")
        raise UserError(
            f"Dataset '{shown}' is neither a file here nor a Hub dataset id (owner/name); give an existing file "
            f"({', '.join(LOCAL_SUFFIXES)}) or a Hub id."
        )
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        import datasets

        try:  # what load_dataset reads first, from the cache alone when offline; no rows are read
            datasets.load_dataset_builder(source, config.subset or None)
        except Exception as exc:  # datasets raises many types for an id it cannot resolve
            raise _hub_dataset_error(exc, source, config.split, config.subset) from None


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or path_exists(source) or source.lower().endswith(LOCAL_SUFFIXES)


def check_data_file(path: Path) -> None:
    """Refuse what cannot be a data file before anything opens it (a named pipe would block the reader forever)."""
    if path.is_dir():
        raise UserError(f"'{path}' is a folder; choose a data file inside it ({', '.join(LOCAL_SUFFIXES)}).")
    if not stat.S_ISREG(path.stat().st_mode):
        raise UserError(f"'{path.name}' is not a regular file (a pipe, socket or device); choose a saved data file.")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"Unsupported file type '{suffix}' for '{path.name}'. Use one of: {', '.join(LOCAL_SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise UserError(f"'{path.name}' is empty.")


def load_local_file(path: Path):
    """Read CSV, JSON, JSONL, Parquet or TXT with checks that name the problem (line numbers for JSONL)."""
    import datasets

    check_data_file(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table = _read_parquet(path)
    else:
        text = _read_utf8(path)
        if suffix == ".jsonl":
            rows = parse_jsonl(text, f"'{path.name}'")
        elif suffix == ".json":
            rows = _parse_json(text, path.name)
        elif suffix == ".csv":
            rows = _parse_csv(text, path.name)
        else:
            rows = [{"text": block.strip()} for block in text.split("\n\n") if block.strip()]
        if not rows:
            raise UserError(f"'{path.name}' holds no rows.")
        table = table_from_rows(rows, f"'{path.name}'")
    if table.num_rows == 0:
        raise UserError(f"'{path.name}' holds no rows.")
    return datasets.Dataset(table)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        columns = len(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"'{path.name}' is not a readable Parquet file: {exc}") from None
    _check_column_count(columns, f"'{path.name}'")
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise UserError(f"'{path.name}' is not a readable Parquet file: {exc}") from None


def _check_column_count(count: int, label: str) -> None:
    # `datasets` rebuilds its per-column bookkeeping once per column, so loading costs grow with the square of the
    # column count (10,000 columns: minutes). No format reads more than four; a table that wide is not chat data.
    if count > MAX_COLUMNS:
        raise UserError(
            f"{label} has {count} columns; at most {MAX_COLUMNS} are read. A training file needs only the columns of "
            "its format (e.g. instruction and output); save those in a new file and load it."
        )


def table_from_rows(rows: list[dict], label: str):
    """The rows as an Arrow table, one column per key seen in any row; a column whose rows hold different kinds
    of value (text in one, an object in another) is refused with the first row that differs."""
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    _check_column_count(len(names), label)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if any(_nested_deeper(value, MAX_NESTING) for value in values):
            # Arrow and `datasets` recurse once per level of a nested type and fail past about a hundred; a column
            # that deep (no format's column is) travels as JSON text instead.
            columns[name] = pa.array([None if value is None else json.dumps(value) for value in values])
            continue
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            if not all(value is None or isinstance(value, list) for value in values):
                raise UserError(_mixed_column_message(values, name, label, exc)) from None
            # Lists of turns whose contents differ in shape (OpenAI content parts in one message, text in the
            # next) have no single Arrow type; they travel as JSON text, which the turn readers accept.
            columns[name] = pa.array([None if value is None else json.dumps(value) for value in values])
    return pa.table(columns)


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels deep in `value` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return {str: "text", dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _mixed_column_message(values: list, name: str, label: str, exc: Exception) -> str:
    present = [(index, value) for index, value in enumerate(values, start=1) if value is not None]
    first_row, first = present[0]
    for row, value in present[1:]:
        if _kind(value) != _kind(first):
            return (
                f"{label} row {row}: column '{name}' holds {_kind(value)}, but row {first_row} holds "
                f"{_kind(first)}. Give every row the same kind of value in a column."
            )
    # The same kind everywhere, but not one Arrow type (e.g. lists of text in one row and of objects in another).
    return f"{label}: column '{name}' holds values of different shapes in different rows ({exc}). Make them alike."


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"'{path.name}' is not UTF-8 text (bad byte at line {line}). Save it as UTF-8 and try again."
        ) from None
    if not text.strip():
        raise UserError(f"'{path.name}' is empty.")
    return text


def parse_jsonl(text: str, label: str) -> list[dict]:
    """JSON objects, one per non-blank line; a bad line is named as "<label> line N"."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{label} line {number} is not valid JSON: {exc.msg}.") from None
        except RecursionError:
            raise UserError(f"{label} line {number} is nested too deeply to read; flatten it.") from None
        if not isinstance(row, dict):
            raise UserError(f"{label} line {number} is not a JSON object.")
        if "\\u" in line:  # only an escape can smuggle in a lone surrogate, which no encoder accepts later
            _check_encodable(row, f"{label} line {number}")
        rows.append(row)
    return rows


def _check_encodable(value: Any, where: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"{where} holds an unpaired UTF-16 surrogate escape (such as \\ud800), which is not text. "
            "Remove it or write the whole character."
        ) from None


def _parse_json(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{name}' is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    except RecursionError:
        raise UserError(f"'{name}' is nested too deeply to read; flatten it.") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers are common
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"'{name}' must hold a JSON list of objects, one object per example.")
    if "\\u" in text:
        for number, row in enumerate(data, start=1):
            _check_encodable(row, f"'{name}' row {number}")
    return data


def _parse_csv(text: str, name: str) -> list[dict]:
    # The reader splits records itself, so a quoted cell keeps its line breaks (code, poems, lists).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        if not reader.fieldnames:
            raise UserError(f"'{name}' has no header row.")
        _check_column_count(len(reader.fieldnames), f"'{name}'")
        for row in reader:
            if None in row:
                raise UserError(f"'{name}' line {reader.line_num} has more values than the header has columns.")
            rows.append(row)
    except csv.Error as exc:
        raise UserError(f"'{name}' line {reader.line_num} is not readable CSV: {exc}.") from None
    return rows


def load_hub_dataset(dataset_id: str, split: str, subset: str = ""):
    """Load (download, with the `datasets` progress bars in the job's log) a Hub dataset; works offline from the
    local Hugging Face cache."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, subset or None, split=split)
    except Exception as exc:  # datasets raises many types for unreachable / unknown ids
        raise _hub_dataset_error(exc, dataset_id, split, subset) from None


def preview_hub_rows(config: DatasetConfig, count: int = 5) -> dict[str, Any]:
    """The first `count` rows of a Hub dataset by streaming (nothing else is downloaded), its columns and the
    column map the common column names suggest."""
    import datasets

    config.validate()
    source = str(config.source).strip()
    try:
        stream = datasets.load_dataset(source, config.subset or None, split=config.split, streaming=True)
        rows = list(stream.take(count))
    except Exception as exc:  # datasets raises many types for unreachable / unknown ids
        raise _hub_dataset_error(exc, source, config.split, config.subset) from None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {"rows": rows, "columns": columns, "column_map": suggest_column_map(columns, config.column_map)}


def _hub_dataset_error(exc: BaseException, dataset_id: str, split: str, subset: str) -> UserError:
    text = str(exc)
    if isinstance(exc, ValueError) and ("split" in text.lower() or "config" in text.lower()):
        # datasets names the splits or subsets that exist: that is the message to show
        return UserError(f"Hub dataset '{dataset_id}': {text.splitlines()[0]}")
    import download_utils

    error = download_utils.hub_error(exc, dataset_id, kind="dataset")
    which = f"split '{split}'" + (f", subset '{subset}'" if subset else "")
    return UserError(f"Could not load Hub dataset '{dataset_id}' ({which}). {error}")
