"""Datasets: load local files or Hub ids, detect the format, map to `messages`, render with the chat template,
tokenize with loss masks, split, and cache the prepared result."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
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
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}
PREPARE_VERSION = "2"  # bump when the prepared layout changes, so old caches are not reused
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
        help="Empty = the model's own template. 'chatml' (or a Jinja template) for models without one.",
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
        dataset = load_hub_dataset(source, config.split)
    if config.max_rows:
        dataset = dataset.select(range(min(config.max_rows, len(dataset))))
    return dataset


def _looks_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or Path(source).expanduser().exists()
        or source.lower().endswith(LOCAL_SUFFIXES)
    )


def load_local_file(path: Path):
    """Read CSV, JSON, JSONL, Parquet or TXT with checks that name the problem (line numbers for JSONL)."""
    import datasets

    if path.is_dir():
        raise UserError(f"'{path}' is a folder; choose a data file inside it ({', '.join(LOCAL_SUFFIXES)}).")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"Unsupported file type '{suffix}' for '{path.name}'. Use one of: {', '.join(LOCAL_SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise UserError(f"'{path.name}' is empty.")
    if suffix == ".parquet":
        try:
            dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"'{path.name}' is not a readable Parquet file: {exc}") from None
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
        dataset = datasets.Dataset.from_list(rows)
    if len(dataset) == 0:
        raise UserError(f"'{path.name}' holds no rows.")
    return dataset


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
        if not isinstance(row, dict):
            raise UserError(f"{label} line {number} is not a JSON object.")
        rows.append(row)
    return rows


def _parse_json(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{name}' is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers are common
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"'{name}' must hold a JSON list of objects, one object per example.")
    return data


def _parse_csv(text: str, name: str) -> list[dict]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise UserError(f"'{name}' has no header row.")
    rows = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise UserError(f"'{name}' line {number} has more values than the header has columns.")
        rows.append(row)
    return rows


def load_hub_dataset(dataset_id: str, split: str):
    """Load a Hub dataset; works offline from the local Hugging Face cache."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # datasets raises many types for unreachable / unknown ids
        offline = (
            os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        )
        hint = (
            " The Hub cannot be reached and it is not in the local cache; download it on a connected machine or use a local file."
            if offline
            else ""
        )
        raise UserError(
            f"Could not load Hub dataset '{dataset_id}' (split '{split}').{hint} ({type(exc).__name__})"
        ) from None


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
        value = row.get(fields.get(name, ""), None)
        return "" if value is None else str(value)

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
        messages = [_sharegpt_turn(turn) for turn in _as_list(row[fields["conversations"]], "conversations")]
        system = get("system")
    elif fmt == "messages":
        messages = [_message_turn(turn) for turn in _as_list(row[fields["messages"]], "messages")]
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


def _sharegpt_turn(turn: Any) -> dict:
    # Arrow gives every turn every key of the column, so a missing one arrives as None.
    if not isinstance(turn, dict) or turn.get("from") is None or turn.get("value") is None:
        raise UserError("A ShareGPT turn must be an object with 'from' and 'value'.")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise UserError(f"Unknown ShareGPT speaker '{turn['from']}'; use human, gpt or system.")
    return {"role": role, "content": str(turn["value"])}


def _message_turn(turn: Any) -> dict:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise UserError("A message must be an object with 'role' and 'content'.")
    role = str(turn["role"])
    if role not in ("system", "user", "assistant"):
        raise UserError(f"Unknown message role '{role}'; use system, user or assistant.")
    return {"role": role, "content": "" if turn["content"] is None else str(turn["content"])}


def check_conversation(messages: list[dict]) -> None:
    """Raise UserError unless turns go [system] user, assistant, user, assistant … and an assistant answers."""
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


def render_row(
    row: dict,
    fmt: str,
    fields: dict[str, str],
    tokenizer,
    train_on_responses_only: bool,
    system_prompt: str = "",
    turns: ChatTurns | None = None,
) -> tuple[str, list[tuple[int, int]] | None]:
    """One source row as text, with the character spans to train on (None: every token)."""
    if fmt == "text":
        text = str(row.get(fields["text"]) or "")
        if not text.strip():
            raise UserError("A text row is empty.")
        return text + (tokenizer.eos_token or ""), None
    messages = row_to_messages(row, fmt, fields, system_prompt)
    if not train_on_responses_only:
        return render_chat(messages, tokenizer), None
    fast = spans_from_turns(messages, turns) if turns is not None else None
    return fast if fast is not None else assistant_spans(messages, tokenizer)


def encode_rows(
    texts: list[str], spans: list[list[tuple[int, int]] | None], tokenizer, max_seq_length: int
) -> list[dict]:
    """Tokenize many rendered rows in one call (the fast tokenizer's batch path) and mask them."""
    if not texts:
        return []
    need_offsets = any(row_spans is not None for row_spans in spans)
    encoded = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=need_offsets, truncation=True, max_length=max_seq_length
    )
    offsets = encoded["offset_mapping"] if need_offsets else [None] * len(texts)
    return [
        {"input_ids": ids, "labels": _labels(ids, row_offsets, row_spans)}
        for ids, row_offsets, row_spans in zip(encoded["input_ids"], offsets, spans, strict=True)
    ]


def _encode_batch(
    batch: dict[str, list],
    fmt: str,
    fields: dict[str, str],
    tokenizer,
    max_seq_length: int,
    train_on_responses_only: bool,
    system_prompt: str,
    turns: ChatTurns | None,
) -> dict[str, list]:
    size = len(next(iter(batch.values())))
    texts, spans, errors = [""] * size, [None] * size, [""] * size
    for index in range(size):
        row = {key: values[index] for key, values in batch.items()}
        try:
            texts[index], spans[index] = render_row(
                row, fmt, fields, tokenizer, train_on_responses_only, system_prompt, turns
            )
        except UserError as exc:
            errors[index] = str(exc)
    good = [index for index in range(size) if not errors[index]]
    encoded = dict(
        zip(
            good,
            encode_rows([texts[i] for i in good], [spans[i] for i in good], tokenizer, max_seq_length),
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
    fmt = config.format if config.format != "auto" else detect_format(raw.column_names, config.column_map)
    fields = resolve_columns(raw.column_names, fmt, config.column_map)
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
