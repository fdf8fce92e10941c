"""Reward functions for GRPO, in TRL's shape: `reward(prompts, completions, **columns) -> list[float]`, one score
per completion, named so TRL logs each one's mean as `rewards/<name>/mean`."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workspace import UserError

log = logging.getLogger(__name__)

BUILTIN_REWARDS = ("format", "equals", "contains", "json", "length")
Reward = Callable[..., list[float]]
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][-+]?\d+)?$")


@dataclass
class RewardSettings:
    """What the built-in rewards read (TrainConfig's reward_* fields)."""

    pattern: str = ""
    min_length: int = 0
    max_length: int = 0


def completion_text(completion: Any) -> str:
    """The text of one completion: TRL passes a string, or for conversational data a list of messages."""
    if isinstance(completion, list):
        return "".join(str(turn.get("content", "")) for turn in completion if isinstance(turn, dict))
    return str(completion)


def compile_pattern(pattern: str) -> re.Pattern:
    """The format reward's regular expression, or UserError saying why it does not compile."""
    if not pattern:
        raise UserError("The format reward needs a regular expression (reward_pattern), e.g. ^<answer>.*</answer>$.")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"reward_pattern {pattern!r} is not a valid regular expression: {exc}.") from None


def as_number(text: str) -> float | None:
    """A number written as text ("42", " 3.50 ", "1,5", "1e3"), else None."""
    text = text.strip().rstrip(".").replace("_", "")
    if not _NUMBER.match(text):
        return None
    value = float(text.replace(",", "."))
    return value if math.isfinite(value) else None


def same_answer(answer: str, reference: str) -> bool:
    """Equal as numbers when both are numbers (3.0 == 3), else equal as trimmed, case-folded text."""
    left, right = as_number(answer), as_number(reference)
    if left is not None and right is not None:
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)
    return answer.strip().casefold() == reference.strip().casefold()


def _extract(text: str, pattern: re.Pattern | None) -> str:
    """The answer inside a completion: the format pattern's first group when it has one and matches."""
    if pattern is not None and pattern.groups:
        found = pattern.search(text)
        if found and found.group(1) is not None:
            return found.group(1)
    return text


def contains_answer(text: str, reference: str) -> bool:
    """Whether the reference appears in the text; a numeric reference must appear as a number (3 matches 3.0)."""
    number = as_number(reference)
    if number is not None:
        return any(
            same_answer(token, reference) for token in re.findall(r"[-+]?\d+(?:[.,]\d+)?(?:[eE][-+]?\d+)?", text)
        )
    return reference.strip().casefold() in text.casefold()


def _references(kwargs: dict[str, Any], count: int) -> list[str]:
    answers = kwargs.get("answer")
    if answers is None:
        raise UserError("The equals / contains rewards need a reference answer column (answer) in the dataset.")
    return [str(answer) for answer in answers][:count]


def make_reward(name: str, settings: RewardSettings) -> Reward:
    """The built-in reward `name` as a TRL reward function."""
    pattern = compile_pattern(settings.pattern) if name == "format" or settings.pattern else None
    if name == "format":

        def reward(prompts, completions, **kwargs):
            return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]

    elif name == "equals":

        def reward(prompts, completions, **kwargs):
            references = _references(kwargs, len(completions))
            texts = [_extract(completion_text(c), pattern) for c in completions]
            return [1.0 if same_answer(text, ref) else 0.0 for text, ref in zip(texts, references, strict=True)]

    elif name == "contains":

        def reward(prompts, completions, **kwargs):
            references = _references(kwargs, len(completions))
            return [
                1.0 if contains_answer(completion_text(c), ref) else 0.0
                for c, ref in zip(completions, references, strict=True)
            ]

    elif name == "json":

        def reward(prompts, completions, **kwargs):
            return [1.0 if _is_json(_extract(completion_text(c), pattern)) else 0.0 for c in completions]

    elif name == "length":
        low, high = settings.min_length, settings.max_length or math.inf
        if low > high:
            raise UserError(f"reward_min_length {low} is above reward_max_length {settings.max_length}.")

        def reward(prompts, completions, **kwargs):
            return [1.0 if low <= len(completion_text(c)) <= high else 0.0 for c in completions]

    else:
        raise UserError(f"Unknown reward '{name}'; the built-in ones are: {', '.join(BUILTIN_REWARDS)}.")
    reward.__name__ = name
    return reward


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
