"""Dataset formats: the columns each format reads, the column map common column names suggest, which format a
dataset's columns match, and one source row as checked chat messages."""

from __future__ import annotations

import json
from typing import Any

from workspace import UserError

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
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


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
