"""Datasets: load local files or Hub ids, detect the format, map to `messages`, render with the chat template,
tokenize with loss masks, split, and cache the prepared result."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from settings import check, option
from workspace import UserError, resolve_user_path, workspace_root

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
# The columns each format reads, in the names the column map uses; the first of each tuple is required.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output", "input", "system"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion", "system"),
    "text": ("text",),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# More columns than any real dataset of these formats has; see _check_column_count.
MAX_COLUMNS = 1000
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# ChatML: offered when a model has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3 Instruct's turn markers (its tokenizer's special tokens), for a Llama 3 model whose tokenizer has no template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral's instruct markers as Mistral Small 3 writes them (a system turn of its own, so each role has fixed text).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST]' + message['content'] + '[/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Phi-4-mini's turns, without the EOS it appends to a chat that ends on a reply (which breaks the per-role shape an
# Ollama TEMPLATE needs); Phi-3's own template drops system messages.
PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
BUILTIN_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "phi4": PHI4_TEMPLATE,
}
PREPARE_VERSION = "3"  # bump when the prepared layout changes, so old caches are not reused
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


@dataclass
class PreparedDataset:
    """Tokenized rows ready for the trainer, and what was learned about the source on the way."""

    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    format: str
    source_rows: int
    dropped_rows: int
    cache_hit: bool
    cache_dir: Path


# ---------------------------------------------------------------- loading


def load_rows(config: DatasetConfig, workspace: str | Path | None = None):
    """Load the raw rows of a local file or a Hub dataset as a `datasets.Dataset`."""
    config.validate()
    source = str(config.source).strip()
    if _looks_local(source):
        dataset = load_local_file(resolve_user_path(source, workspace))
    else:
        dataset = load_hub_dataset(source, config.split, config.subset)
    if config.max_rows:
        dataset = dataset.select(range(min(config.max_rows, len(dataset))))
    return dataset


def is_hub_dataset(source: str) -> bool:
    """Whether the source names a Hub dataset (owner/name) rather than a local file."""
    source = str(source).strip()
    return bool(source) and not _looks_local(source)


def _looks_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or Path(source).expanduser().exists()
        or source.lower().endswith(LOCAL_SUFFIXES)
    )


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
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            if not all(value is None or isinstance(value, list) for value in values):
                raise UserError(_mixed_column_message(values, name, label, exc)) from None
            # Lists of turns whose contents differ in shape (OpenAI content parts in one message, text in the
            # next) have no single Arrow type; they travel as JSON text, which the turn readers accept.
            columns[name] = pa.array([None if value is None else json.dumps(value) for value in values])
    return pa.table(columns)


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


# Column names many datasets use, and the format field each stands for when the format's own name is absent:
# (field, column, needs) — `needs` is a field that must then be present too, so a pair maps together.
COMMON_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("instruction", "question", "output"),
    ("output", "answer", "instruction"),
    ("instruction", "query", "output"),
    ("output", "response", "instruction"),
    ("instruction", "input", "output"),  # input/output with no instruction: the input is the instruction
    ("prompt", "human", "completion"),
    ("completion", "assistant", "prompt"),
    ("completion", "response", "prompt"),
)


def suggest_column_map(columns: list[str], column_map: dict[str, str] | None = None) -> dict[str, str]:
    """The column map with the common column pairs filled in (question/answer, prompt/response, query/response,
    instruction/response, input/output, human/assistant; `context` as the Alpaca input); the user's own entries
    win, and nothing is suggested for a column the data already names by its field."""
    given = dict(column_map or {})
    present = set(columns)
    if {"messages", "conversations", "text"} & present and not given:
        return given
    suggested: dict[str, str] = {}
    taken = set(given.values())
    changed = True
    while changed:  # a pair maps when both halves are found, so settle over the fixed list
        changed = False
        for field_name, column, needs in COMMON_COLUMNS:
            if field_name in given or field_name in suggested or field_name in present or column not in present:
                continue
            if column in taken or column in suggested.values():
                continue
            partner = needs in present or needs in given or needs in suggested
            partner = partner or any(other == needs and col in present for other, col, _ in COMMON_COLUMNS)
            if partner:
                suggested[field_name] = column
                changed = True
    merged = {**suggested, **given}
    fields = set(merged) | present
    if ("output" in fields and "instruction" in fields) and "input" not in fields and "context" in present:
        merged["input"] = "context"
    # A pair only counts when both halves ended up mapped or present.
    for first, second in (("instruction", "output"), ("prompt", "completion")):
        halves = [name for name in (first, second) if name in suggested]
        if halves and not ({first, second} <= set(merged) | present):
            for name in halves:
                merged.pop(name, None)
    return merged


# ---------------------------------------------------------------- formats and messages


def detect_format(columns: list[str], column_map: dict[str, str] | None = None) -> str:
    """Which format the columns match (after the column map), or a UserError listing the columns."""
    available = set(columns) | set((column_map or {}).keys())
    if "messages" in available:
        return "messages"
    if "conversations" in available:
        return "sharegpt"
    if {"instruction", "output"} <= available:
        return "alpaca"
    if {"prompt", "completion"} <= available:
        return "prompt_completion"
    if "text" in available:
        return "text"
    raise UserError(
        f"Could not tell the dataset format from its columns: {', '.join(columns)}. Map them to one of: "
        "instruction/output (Alpaca), conversations (ShareGPT), messages, prompt/completion or text."
    )


def resolve_columns(columns: list[str], fmt: str, column_map: dict[str, str]) -> dict[str, str]:
    """Field -> column for `fmt`, checking that every mapped and required column exists."""
    for field_name, column in column_map.items():
        if field_name not in FORMAT_FIELDS[fmt]:
            raise UserError(
                f"'{field_name}' is not a field of the {fmt} format; its fields are: {', '.join(FORMAT_FIELDS[fmt])}."
            )
        if column not in columns:
            raise UserError(
                f"Column '{column}' (mapped to '{field_name}') not found; columns are: {', '.join(columns)}."
            )
    resolved = {name: column_map.get(name, name) for name in FORMAT_FIELDS[fmt]}
    missing = [name for name in REQUIRED_FIELDS[fmt] if resolved[name] not in columns]
    if missing:
        raise UserError(
            f"Column '{missing[0]}' not found for the {fmt} format; columns are: {', '.join(columns)}. "
            "Map them in the Dataset tab (or column_map in the config)."
        )
    return {name: column for name, column in resolved.items() if column in columns}


def row_to_messages(row: dict, fmt: str, fields: dict[str, str], system_prompt: str = "") -> list[dict]:
    """One source row as a list of {role, content} messages (checked: alternating, ends with an assistant)."""

    def get(name: str) -> str:
        column = fields.get(name, "")
        return as_text(row.get(column), f"Column '{column}'")

    if fmt == "alpaca":
        prompt = get("instruction").strip()
        if get("input").strip():
            prompt = f"{prompt}\n\n{get('input').strip()}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": get("output")}]
        system = get("system")
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": get("prompt")}, {"role": "assistant", "content": get("completion")}]
        system = get("system")
    elif fmt == "sharegpt":
        turns = _as_list(row[fields["conversations"]], "conversations")
        messages = [_sharegpt_turn(turn, number) for number, turn in enumerate(turns, start=1)]
        system = get("system")
    elif fmt == "messages":
        turns = _as_list(row[fields["messages"]], "messages")
        messages = [_message_turn(turn, number) for number, turn in enumerate(turns, start=1)]
        system = ""
    else:
        raise ValueError(f"row_to_messages does not handle format {fmt}")
    system = system or system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    check_conversation(messages)
    return messages


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells carry lists as JSON text
        except json.JSONDecodeError:
            raise UserError(f"The '{name}' value is text, not a list of turns.") from None
    if not isinstance(value, list):
        raise UserError(f"The '{name}' value must be a list of turns.")
    return value


def as_text(value: Any, where: str) -> str:
    """A cell or a message's content as the text to train on: numbers as written, OpenAI content parts
    ([{"type": "text", "text": ...}]) joined; other lists and objects are refused rather than trained as Python
    reprs."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(part, dict) and "type" in part for part in value):
        return "".join(_text_part(part, where) for part in value)
    kind = "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__
    raise UserError(
        f"{where} holds {kind} ({_clip(value)}), not text. Map a text column, or turn the value into text first."
    )


def _text_part(part: dict, where: str) -> str:
    if part["type"] == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise UserError(
        f"{where} holds a content part of type '{part['type']}' ({_clip(part)}); only text parts can be trained on."
    )


def _clip(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def _sharegpt_turn(turn: Any, number: int) -> dict:
    # Arrow gives every turn every key of the column, so a missing one arrives as None.
    if not isinstance(turn, dict) or turn.get("from") is None or turn.get("value") is None:
        raise UserError("A ShareGPT turn must be an object with 'from' and 'value'.")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise UserError(f"Unknown ShareGPT speaker '{turn['from']}'; use human, gpt or system.")
    return {"role": role, "content": as_text(turn["value"], f"Turn {number} ('value')")}


def _message_turn(turn: Any, number: int) -> dict:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise UserError("A message must be an object with 'role' and 'content'.")
    role = str(turn["role"])
    if role not in ("system", "user", "assistant"):
        raise UserError(f"Unknown message role '{role}'; use system, user or assistant.")
    return {"role": role, "content": as_text(turn["content"], f"Turn {number} ('content')")}


def check_conversation(messages: list[dict]) -> None:
    """Raise UserError unless turns go [system] user, assistant, user, assistant … and an assistant answers last."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(turn["role"] == "assistant" for turn in turns):
        raise UserError("A conversation has no assistant turn, so there is nothing to learn from it.")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise UserError(
                f"Roles do not alternate: turn {index + 1} is '{turn['role']}' where '{expected}' was expected."
            )
        if not turn["content"].strip():
            raise UserError(f"Turn {index + 1} ({turn['role']}) is empty.")
    if turns[-1]["role"] != "assistant":
        # A last user turn has no reply to learn; the template would also render it as a finished turn.
        raise UserError(
            f"The conversation ends with a {turns[-1]['role']} turn (turn {len(turns)}); a training conversation "
            "must end with an assistant reply. Remove the last turn or add its answer."
        )


# ---------------------------------------------------------------- chat template and tokens


def ensure_chat_template(tokenizer, chat_template: str = "") -> None:
    """Give the tokenizer the chosen template; refuse a model with none unless one is chosen."""
    if chat_template:
        tokenizer.chat_template = BUILTIN_TEMPLATES.get(chat_template, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("This model has no chat template. Choose one (e.g. chatml) in the Dataset tab (chat_template).")
    try:
        render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer)
    except Exception as exc:  # jinja2 raises several types; a broken template must not fail every row later
        raise UserError(
            f"The chat template cannot be rendered ({type(exc).__name__}: {exc}). Fix it or choose "
            "another (e.g. chatml)."
        ) from None


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies (the part that is trained):
    from the end of the generation prompt before each reply to the end of the reply's turn."""
    text = render_chat(messages, tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:index], tokenizer, add_generation_prompt=True)
        through = render_chat(messages[: index + 1], tokenizer)
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(
                "The chat template renders earlier turns differently once later turns are added, so the assistant "
                "replies cannot be located. Turn off 'train on responses only' or choose another chat template."
            )
        spans.append((len(before), len(through)))
    return text, spans


@dataclass
class ChatTurns:
    """The text a chat template puts around each message, found by rendering marker messages."""

    default_system: str  # before the first message when the conversation has no system message
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after a final user message: the start of the assistant's reply


_MARKS = {"system": "SYSTEMzqxq", "user1": "USERONEzqxq", "assistant": "ASSISTANTzqxq", "user2": "USERTWOzqxq"}


def _cut(text: str, prefix: str = "", suffix: str = "") -> str:
    if not text.startswith(prefix) or not text.endswith(suffix) or len(prefix) + len(suffix) > len(text):
        raise ValueError("chat template pieces do not line up")
    return text[len(prefix) : len(text) - len(suffix)]


def chat_turns(tokenizer, render: Callable[[Any, list[dict], bool], str] | None = None) -> ChatTurns | None:
    """The chat template as per-role text around messages, or None when it is not of that shape.

    `render(tokenizer, messages, add_generation_prompt)` renders a conversation (default: the template as is)."""
    render = render or (lambda tok, messages, generation: render_chat(messages, tok, generation))
    m = _MARKS
    system = {"role": "system", "content": m["system"]}
    user1, user2 = {"role": "user", "content": m["user1"]}, {"role": "user", "content": m["user2"]}
    assistant = {"role": "assistant", "content": m["assistant"]}
    try:
        full = render(tokenizer, [system, user1, assistant, user2], True)
        user_end = render(tokenizer, [system, user1], False).split(m["user1"], 1)[1]
        user_gen = render(tokenizer, [system, user1], True).split(m["user1"], 1)[1]
        assistant_end = render(tokenizer, [system, user1, assistant], False).split(m["assistant"], 1)[1]
        no_system = render(tokenizer, [user1], True).split(m["user1"], 1)[0]
        system_start, rest = full.split(m["system"], 1)
        between_system_user, rest = rest.split(m["user1"], 1)
        between_user_assistant, rest = rest.split(m["assistant"], 1)
        between_assistant_user, _ = rest.split(m["user2"], 1)
        user_start = _cut(between_assistant_user, prefix=assistant_end)
        return ChatTurns(
            default_system=_cut(no_system, suffix=user_start),
            system=(system_start, _cut(between_system_user, suffix=user_start)),
            user=(user_start, user_end),
            assistant=(_cut(between_user_assistant, prefix=user_end), assistant_end),
            generation=_cut(user_gen, prefix=user_end),
        )
    except Exception as exc:  # templates raise on role orders they refuse; any failure means "not this shape"
        log.info("chat template is not a per-role template (%s)", exc)
        return None


def spans_from_turns(messages: list[dict], turns: ChatTurns) -> tuple[str, list[tuple[int, int]]] | None:
    """What assistant_spans returns, by joining the template's per-role pieces instead of rendering the template
    once per turn; None for a conversation this shortcut cannot vouch for (content with outer whitespace, which
    some templates trim)."""
    parts, spans, length = [], [], 0
    if messages[0]["role"] != "system":
        parts.append(turns.default_system)
        length = len(turns.default_system)
    for message in messages:
        content = message["content"]
        if content != content.strip():
            return None
        prefix, suffix = getattr(turns, message["role"])
        start = length + len(prefix)
        length = start + len(content) + len(suffix)
        if message["role"] == "assistant":
            spans.append((start, length))
        parts += (prefix, content, suffix)
    return "".join(parts), spans


def fast_turns(conversations: list[list[dict]], tokenizer) -> ChatTurns | None:
    """The template's pieces when joining them reproduces assistant_spans exactly on these sample conversations
    (and the generation prompt is the start of an assistant turn, so reply spans begin in the same place)."""
    turns = chat_turns(tokenizer)
    if turns is None or turns.generation != turns.assistant[0]:
        return None
    for messages in conversations:
        fast = spans_from_turns(messages, turns)
        if fast is not None and fast != assistant_spans(messages, tokenizer):
            log.info("chat template pieces do not reproduce the template; rendering every row with it")
            return None
    return turns


def _labels(ids: list[int], offsets: list[tuple[int, int]] | None, spans: list[tuple[int, int]] | None) -> list[int]:
    """Token ids where a token overlaps a trained span, -100 elsewhere (spans=None trains every token)."""
    if spans is None:
        return list(ids)
    import numpy as np

    ids_array = np.asarray(ids, dtype=np.int64)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    for start_span, end_span in spans:
        trained |= (bounds[:, 0] < end_span) & (bounds[:, 1] > start_span)
    return np.where(trained, ids_array, -100).tolist()


def control_pattern(tokenizer) -> re.Pattern | None:
    """A regex for the tokenizer's special (control) tokens as text, longest first, or None when it has none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = sorted({token.content for token in decoder.values() if token.special}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def data_ranges(messages: list[dict], text: str, tokenizer, pattern: re.Pattern | None) -> list[tuple[int, int]]:
    """The character ranges of `text` (the rendered conversation) holding a message's content that contains
    control-token text, found by rendering the conversation with a marker in place of each content."""
    if pattern is None or not any(pattern.search(message["content"]) for message in messages):
        return []
    marked = [{**message, "content": f"DATAzqxq{index}END"} for index, message in enumerate(messages)]
    pieces = re.split(r"DATAzqxq(\d+)END", render_chat(marked, tokenizer))
    ranges, length = [], len(pieces[0])
    for number, template_text in zip(pieces[1::2], pieces[2::2], strict=True):
        content = messages[int(number)]["content"]
        if pattern.search(content):
            ranges.append((length, length + len(content)))
        length += len(content) + len(template_text)
    rebuilt = pieces[0] + "".join(
        messages[int(number)]["content"] + template_text
        for number, template_text in zip(pieces[1::2], pieces[2::2], strict=True)
    )
    if rebuilt != text:  # the template changes contents (e.g. trims them): split the whole conversation
        log.info("chat template does not insert contents verbatim; splitting control tokens in the whole row")
        return [(0, len(text))]
    return ranges


def render_row(
    row: dict,
    fmt: str,
    fields: dict[str, str],
    tokenizer,
    train_on_responses_only: bool,
    system_prompt: str = "",
    turns: ChatTurns | None = None,
    pattern: re.Pattern | None = None,
) -> tuple[str, list[tuple[int, int]] | None, list[tuple[int, int]]]:
    """One source row as text, with the character spans to train on (None: every token) and the ranges of the
    row's own data that hold control-token text (to be tokenized as text, see data_ranges)."""
    if fmt == "text":
        text = as_text(row.get(fields["text"]), f"Column '{fields['text']}'")
        if not text.strip():
            raise UserError("A text row is empty.")
        ranges = [(0, len(text))] if pattern is not None and pattern.search(text) else []
        return text + (tokenizer.eos_token or ""), None, ranges
    messages = row_to_messages(row, fmt, fields, system_prompt)
    if not train_on_responses_only:
        text, spans = render_chat(messages, tokenizer), None
    else:
        fast = spans_from_turns(messages, turns) if turns is not None else None
        text, spans = fast if fast is not None else assistant_spans(messages, tokenizer)
    return text, spans, data_ranges(messages, text, tokenizer, pattern)


def encode_rows(
    texts: list[str],
    spans: list[list[tuple[int, int]] | None],
    tokenizer,
    max_seq_length: int,
    ranges: list[list[tuple[int, int]]] | None = None,
) -> list[dict]:
    """Tokenize many rendered rows in one call (the fast tokenizer's batch path) and mask them; a row with
    `ranges` (its data holds control-token text) is tokenized in pieces, see encode_with_data_ranges."""
    if not texts:
        return []
    ranges = ranges or [[] for _ in texts]
    plain = [index for index, row_ranges in enumerate(ranges) if not row_ranges]
    encoded: dict[int, tuple[list[int], list | None]] = {}
    if plain:
        batch = tokenizer(
            [texts[i] for i in plain],
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=max_seq_length,
        )
        encoded = dict(zip(plain, zip(batch["input_ids"], batch["offset_mapping"], strict=True), strict=True))
    for index, row_ranges in enumerate(ranges):
        if row_ranges:
            encoded[index] = encode_with_data_ranges(texts[index], row_ranges, tokenizer, max_seq_length)
    return [
        {"input_ids": list(encoded[i][0]), "labels": _labels(encoded[i][0], encoded[i][1], spans[i])}
        for i in range(len(texts))
    ]


def encode_with_data_ranges(
    text: str, ranges: list[tuple[int, int]], tokenizer, max_seq_length: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and offsets of `text` where control-token text inside `ranges` (the user's data) is split into
    ordinary tokens, as the tokenizer's split_special_tokens=True does, while the template's own control tokens
    outside them stay special. The tokenizer cuts text at control tokens anyway, so encoding in pieces at those
    cuts changes nothing else."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = [0, *(edge for start, end in ranges for edge in (start, end)), len(text)]
    for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if start == end:
            continue
        piece = tokenizer(
            text[start:end],
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=index % 2 == 1,  # odd pieces are the data ranges
        )
        ids += piece["input_ids"]
        offsets += [(start + begin, start + finish) for begin, finish in piece["offset_mapping"]]
    return ids[:max_seq_length], offsets[:max_seq_length]


def _encode_batch(
    batch: dict[str, list],
    indices: list[int],
    fmt: str,
    fields: dict[str, str],
    tokenizer,
    max_seq_length: int,
    train_on_responses_only: bool,
    system_prompt: str,
    turns: ChatTurns | None,
) -> dict[str, list]:
    size = len(indices)
    texts, spans, ranges, errors = [""] * size, [None] * size, [[] for _ in range(size)], [""] * size
    pattern = control_pattern(tokenizer)
    for index in range(size):
        row = {key: values[index] for key, values in batch.items()}
        try:
            texts[index], spans[index], ranges[index] = render_row(
                row, fmt, fields, tokenizer, train_on_responses_only, system_prompt, turns, pattern
            )
        except UserError as exc:
            errors[index] = f"Row {indices[index] + 1}: {exc}"
    good = [index for index in range(size) if not errors[index]]
    encoded = dict(
        zip(
            good,
            encode_rows(
                [texts[i] for i in good],
                [spans[i] for i in good],
                tokenizer,
                max_seq_length,
                [ranges[i] for i in good],
            ),
            strict=True,
        )
    )
    empty = {"input_ids": [], "labels": []}
    rows = [encoded.get(index, empty) for index in range(size)]
    return {
        "input_ids": [row["input_ids"] for row in rows],
        "labels": [row["labels"] for row in rows],
        "text": texts,
        "error": errors,
        # A row whose trained tokens were all cut off by truncation teaches nothing.
        "usable": [not errors[i] and any(label != -100 for label in rows[i]["labels"]) for i in range(size)],
    }


# ---------------------------------------------------------------- the whole preparation


def prepare_dataset(
    config: DatasetConfig,
    tokenizer,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    train_on_responses_only: bool = True,
    eval_split: float = 0.0,
    seed: int = DEFAULT_SEED,
    workspace: str | Path | None = None,
    num_proc: int | None = None,
) -> PreparedDataset:
    """Load → detect → map → render → tokenize → filter → split; the result is cached under the workspace."""
    import datasets

    if not 0 <= eval_split < 1:
        raise UserError("eval_split must be a fraction between 0 (no evaluation) and 1, e.g. 0.1.")
    config.validate()
    if config.chat_template:
        ensure_chat_template(tokenizer, config.chat_template)
    # A local file is keyed by its bytes, so a cached preparation is found without parsing the file again.
    local = resolve_user_path(str(config.source).strip(), workspace) if _looks_local(str(config.source)) else None
    if local is not None:
        check_data_file(local)  # before hashing it: reading a named pipe would never end
    raw = None if local is not None else load_rows(config, workspace)
    key = _cache_key(config, local, raw, tokenizer, max_seq_length, train_on_responses_only, eval_split, seed)
    cache_dir = workspace_root(workspace) / "cache" / "datasets" / key
    if (cache_dir / "done.json").exists():
        meta = json.loads((cache_dir / "done.json").read_text())
        train = datasets.load_from_disk(str(cache_dir / "train"))
        evaluation = datasets.load_from_disk(str(cache_dir / "eval")) if (cache_dir / "eval").exists() else None
        return PreparedDataset(
            train, evaluation, meta["format"], meta["source_rows"], meta["dropped_rows"], True, cache_dir
        )

    raw = raw if raw is not None else load_rows(config, workspace)
    column_map = suggest_column_map(raw.column_names, config.column_map)
    fmt = config.format if config.format != "auto" else detect_format(raw.column_names, column_map)
    suggested = {key: value for key, value in column_map.items() if key in FORMAT_FIELDS[fmt]}
    fields = resolve_columns(raw.column_names, fmt, {**suggested, **config.column_map})
    # Every step below costs more per column (see _check_column_count); only the format's columns are read.
    raw = raw.select_columns(list(dict.fromkeys(fields.values())))
    turns = None
    if fmt != "text":
        ensure_chat_template(tokenizer)  # a chosen template was applied above, before the cache key
        if train_on_responses_only:
            turns = fast_turns(_sample_conversations(raw, fmt, fields, config.system_prompt), tokenizer)
    # Rendering is Python work: a second process pays off on large datasets only (start-up and pickling cost).
    processes = num_proc if num_proc is not None else (min(4, os.cpu_count() or 1) if len(raw) >= 20000 else None)
    encoded = raw.map(
        _encode_batch,
        batched=True,
        with_indices=True,
        batch_size=1000,
        num_proc=processes,
        remove_columns=raw.column_names,
        fn_kwargs={
            "fmt": fmt,
            "fields": fields,
            "tokenizer": tokenizer,
            "max_seq_length": max_seq_length,
            "train_on_responses_only": train_on_responses_only,
            "system_prompt": config.system_prompt,
            "turns": turns,
        },
        desc="Rendering and tokenizing",
        load_from_cache_file=False,
        keep_in_memory=True,
    )
    errors = [message for message in encoded["error"] if message]
    keep = [index for index, usable in enumerate(encoded["usable"]) if usable]
    usable = encoded.select(keep, keep_in_memory=True).remove_columns(["error", "usable"])
    if len(usable) == 0:
        reason = (
            f" First problem: {errors[0]}"
            if errors
            else " Every row lost its trained tokens to truncation; raise max_seq_length."
        )
        raise UserError(f"No usable rows in the dataset after filtering ({len(raw)} rows read).{reason}")
    if errors:
        log.warning("%d of %d rows skipped; first problem: %s", len(errors), len(raw), errors[0])

    train, evaluation = split_train_eval(usable, eval_split, seed)
    _save_prepared(
        cache_dir, train, evaluation, {"source_rows": len(raw), "dropped_rows": len(raw) - len(usable), "format": fmt}
    )
    return PreparedDataset(train, evaluation, fmt, len(raw), len(raw) - len(usable), False, cache_dir)


def _sample_conversations(raw, fmt: str, fields: dict[str, str], system_prompt: str, count: int = 64) -> list:
    """Up to `count` readable conversations from the start of the rows, to check the template shortcut on."""
    conversations = []
    for row in raw.select(range(min(count, len(raw)))):
        try:
            conversations.append(row_to_messages(row, fmt, fields, system_prompt))
        except UserError:
            continue  # reported with its row when the rows are encoded
    return conversations


def split_train_eval(dataset, eval_split: float, seed: int):
    """(train, eval) with `eval_split` of the rows held out (at least one), or (dataset, None)."""
    if not eval_split:
        return dataset, None
    if len(dataset) < 2:
        raise UserError("eval_split needs at least 2 usable rows; set it to 0 or add rows.")
    eval_rows = max(1, round(len(dataset) * eval_split))
    parts = dataset.train_test_split(test_size=eval_rows, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _cache_key(
    config: DatasetConfig,
    local: Path | None,
    raw,
    tokenizer,
    max_seq_length: int,
    train_on_responses_only: bool,
    eval_split: float,
    seed: int,
) -> str:
    """A key for everything the prepared rows depend on: the data (a local file's bytes, a Hub dataset's
    fingerprint), the options and the tokenizer."""
    parts = {
        "version": PREPARE_VERSION,
        "config": json.dumps(config.__dict__, sort_keys=True),
        "template": tokenizer.chat_template or "",
        "vocab": len(tokenizer),
        "tokenizer": tokenizer.name_or_path,
        "eos": tokenizer.eos_token or "",
        "max_seq_length": max_seq_length,
        "responses_only": train_on_responses_only,
        "eval_split": eval_split,
        "seed": seed,
    }
    if local is not None:
        parts["file"] = _file_digest(local)
    else:
        parts["data"] = raw._fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _file_digest(path: Path) -> str:
    """The file's content hash (BLAKE2: about 1 s per GB here), or '' for a path that is not a readable file (the
    preparation then reports it)."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _save_prepared(cache_dir: Path, train, evaluation, meta: dict) -> None:
    from workspace import atomic_dir

    with atomic_dir(cache_dir) as tmp:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "done.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- preview


def loss_segments(input_ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, trained?) runs, merging neighbouring tokens of the same kind."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    trained_run = None
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != -100
        if trained_run is not None and trained != trained_run:
            segments.append((tokenizer.decode(run), trained_run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        segments.append((tokenizer.decode(run), bool(trained_run)))
    return segments


def format_segments(segments: list[tuple[str, bool]]) -> str:
    """Plain-text form for terminals: trained text between ⟦ and ⟧."""
    return "".join(f"⟦{text}⟧" if trained else text for text, trained in segments)
