"""The arena's judge: what it reads about two answers, the verdict's JSON schema, and reading a verdict out of
whatever the judge replied. It is asked through llm_clients (arena_utils runs the asking)."""

from __future__ import annotations

import json
import re
from typing import Any

import llm_clients
from arena_config import Prompt

VERDICTS = ("A", "B", "tie")
UNPARSED = "unparsed"
RAW_KEPT_CHARS = 2000  # of a judge's reply, kept beside the verdict for the per-prompt table
REASON_CHARS = 300

JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. You compare two answers to the same user message and decide "
    "which one is better: more helpful, correct, relevant and clear. A longer answer is not better for being long. "
    'Reply with one JSON object and nothing else: {"winner": "A" or "B" or "tie", "reason": "one short sentence"}.'
)
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": list(VERDICTS)}, "reason": {"type": "string"}},
    "required": ["winner", "reason"],
    "additionalProperties": False,
}


def judge_prompt(prompt: Prompt, first: str, second: str) -> str:
    """What the judge reads: the conversation, the reference when there is one, answers A and B."""
    conversation = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt.messages)
    reference = f"[Reference answer]\n{prompt.reference}\n\n" if prompt.reference.strip() else ""
    return (
        f"[Conversation]\n{conversation}\n\n{reference}[Answer A]\n{first or '(empty)'}\n\n"
        f"[Answer B]\n{second or '(empty)'}\n\n"
        'Which answer is better? Reply with JSON only: {"winner": "A" | "B" | "tie", "reason": "one short sentence"}'
    )


def parse_verdict(text: str) -> tuple[str, str]:
    """("A" | "B" | "tie" | "unparsed", the one-line reason) from a judge's reply; never raises."""
    text = str(text or "")
    for match in re.finditer(r"\{[^{}]*\}", text, re.S):
        try:
            data = json.loads(match.group(0))
        except ValueError:
            continue
        winner = _winner(data.get("winner", data.get("verdict"))) if isinstance(data, dict) else None
        if winner:
            return winner, llm_clients.shorten(str(data.get("reason") or ""), REASON_CHARS)
    found = re.search(
        r"\b(?:winner|verdict|better answer)\b\W{0,4}(?:is\s+)?(?:answer\s+)?\[{0,2}(A|B|tie)\b", text, re.I
    )
    if found:
        reason = re.search(r"\breason\b\W{0,4}(.+)", text, re.I)
        return _winner(found.group(1)) or UNPARSED, llm_clients.shorten(reason.group(1) if reason else "", 300)
    return UNPARSED, ""


def _winner(value: Any) -> str | None:
    value = str(value or "").strip().strip("[]\"' .").lower()
    return {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie", "draw": "tie"}.get(value)
