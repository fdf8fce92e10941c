"""Reward functions for GRPO, in TRL's shape: `reward(prompts, completions, **columns) -> list[float]`, one score
per completion, named so TRL logs each one's mean as `rewards/<name>/mean`.

Built in: format, equals, contains, json, length, and judge (an LLM scores each completion by a rubric, through
llm_clients). A user's own functions come from a Python file (`file_rewards`): found by
reading the file's syntax tree when the run is checked, imported (run) only inside the job.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

import llm_clients
from workspace import UserError

log = logging.getLogger(__name__)

BUILTIN_REWARDS = ("format", "equals", "contains", "json", "length", "judge")
FILE_REWARD_PREFIX = "reward_"  # with no function named, a reward file's functions of this prefix are its rewards
JUDGE_SYSTEM = (
    "You are a strict, consistent grader. You score one answer to a user's message by the rubric you are given, "
    "and reply with the score only."
)
JUDGE_REPLY_CHARS = 160  # of an unreadable judge reply, quoted in the log
Reward = Callable[..., list[float]]
# One completion's match against reward_pattern. Python's `re` cannot be interrupted once a match backtracks (it
# holds the interpreter until it ends, which for ^(.+)+#$ on a long completion is never); the `regex` engine stops a
# match at its timeout, between steps of its own loop.
PATTERN_TIMEOUT_S = 0.5
REFERENCE_REWARDS = ("equals", "contains")  # the rewards that compare a completion with the row's reference answer
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][-+]?\d+)?$")


@dataclass
class RewardSettings:
    """What the built-in rewards read (TrainConfig's reward_* fields)."""

    pattern: str = ""
    min_length: int = 0
    max_length: int = 0
    judge: JudgeSettings | None = None


@dataclass
class JudgeSettings:
    """The judge reward: who scores (the LLM client's settings), by what rubric, on what scale, how many at once."""

    client: llm_clients.ClientConfig
    rubric: str
    min_score: float = 0.0
    max_score: float = 10.0
    concurrency: int = 8


def completion_text(completion: Any) -> str:
    """The text of one completion: TRL passes a string, or for conversational data a list of messages."""
    if isinstance(completion, list):
        return "".join(str(turn.get("content", "")) for turn in completion if isinstance(turn, dict))
    return str(completion)


def compile_pattern(pattern: str) -> regex.Pattern:
    """The format reward's regular expression, or UserError saying why it does not compile."""
    if not pattern:
        raise UserError("The format reward needs a regular expression (reward_pattern), e.g. ^<answer>.*</answer>$.")
    try:
        return regex.compile(pattern, regex.DOTALL)
    except regex.error as exc:
        raise UserError(f"reward_pattern {pattern!r} is not a valid regular expression: {exc}.") from None


def search_pattern(pattern: regex.Pattern, text: str) -> regex.Match | None:
    """pattern.search(text) within PATTERN_TIMEOUT_S; a match that runs out of time is no match, and is logged."""
    try:
        return pattern.search(text, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "reward_pattern %r took over %g s on a completion of %d characters and scores it 0: a nested repeat such "
            "as (.+)+ backtracks without bound; simplify the pattern.",
            pattern.pattern,
            PATTERN_TIMEOUT_S,
            len(text),
        )
        return None


def as_number(text: str) -> float | None:
    """A number written as text ("42", " 3.50 ", "1,5", "1e3"), else None."""
    text = text.strip().rstrip(".").replace("_", "")
    if not _NUMBER.match(text):
        return None
    value = float(text.replace(",", "."))
    return value if math.isfinite(value) else None


def check_weights(weights: Sequence[Any]) -> list[float]:
    """Reward weights as finite numbers; UserError naming one that is not (NaN or infinity would train on nothing)."""
    checked = []
    for value in weights:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"Reward weight {value!r} is not a finite number; give weights like 1, 0.5, 2.")
        checked.append(float(value))
    return checked


def parse_weights(text: str | list | None) -> list[float]:
    """Reward weights typed as comma-separated numbers ("1, 0.5"); UserError naming one that is not a number."""
    if isinstance(text, list):
        return check_weights(text)
    weights = []
    for part in str(text or "").replace(";", ",").split(","):
        if part.strip():
            value = as_number(part.replace(",", ""))
            if value is None:
                raise UserError(f"Reward weight '{part.strip()}' is not a number; type weights like 1, 0.5, 2.")
            weights.append(value)
    return weights


def same_answer(answer: str, reference: str) -> bool:
    """Equal as numbers when both are numbers (3.0 == 3), else equal as trimmed, case-folded text."""
    left, right = as_number(answer), as_number(reference)
    if left is not None and right is not None:
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)
    return answer.strip().casefold() == reference.strip().casefold()


def _extract(text: str, pattern: regex.Pattern | None) -> str:
    """The answer inside a completion: the format pattern's first group when it has one and matches."""
    if pattern is not None and pattern.groups:
        found = search_pattern(pattern, text)
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
    references = [str(answer) for answer in answers][:count]
    if not any(reference.strip() for reference in references):
        # Every completion would score 0 and the run would end "done" having learnt nothing.
        raise UserError(
            "The equals / contains rewards compare each completion with the row's reference answer, but these rows "
            "have none: add an answer column to the dataset (or name it in reference_column)."
        )
    return references


def check_references(names: Sequence[str], rows: Sequence[dict[str, Any]], columns: Sequence[str], column: str) -> None:
    """UserError before a run when an equals / contains reward among `names` would read an empty reference answer:
    `rows` are GRPO rows ({prompt, answer}) converted from a file of `columns`, `column` the reference column used."""
    using = [name for name in names if name in REFERENCE_REWARDS]
    if not using:
        return
    for number, row in enumerate(rows, start=1):
        if str(row.get("answer") or "").strip():
            continue
        if not column:
            raise UserError(
                f"The {using[0]} reward compares each completion with a reference answer, but the dataset has no "
                f"reference column (answer, reference or solution; its columns are: {', '.join(columns)}). Add one, "
                "or name it in reference_column."
            )
        raise UserError(
            f"The {using[0]} reward compares each completion with a reference answer, but row {number}'s "
            f"'{column}' is empty; fill it in or drop the row."
        )


def make_reward(name: str, settings: RewardSettings) -> Reward:
    """The built-in reward `name` as a TRL reward function."""
    pattern = compile_pattern(settings.pattern) if name == "format" or settings.pattern else None
    if name == "format":

        def reward(prompts, completions, **kwargs):
            return [1.0 if search_pattern(pattern, completion_text(c)) else 0.0 for c in completions]

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

    elif name == "judge":
        if settings.judge is None:
            raise UserError("The judge reward needs a judge: set judge_model (and judge_provider, judge_base_url).")
        reward = judge_reward(settings.judge)

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


# ---------------------------------------------------------------- the LLM judge


def judge_prompt(prompt: Any, completion: Any, rubric: str, low: float, high: float, reference: str = "") -> str:
    """What the judge reads: the conversation so far, the reference answer when there is one, the answer, the
    rubric and the scale."""
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    conversation = "\n\n".join(f"[{turn.get('role', 'user')}]\n{turn.get('content', '')}" for turn in turns)
    reference = f"[Reference answer]\n{reference}\n\n" if reference.strip() else ""
    return (
        f"[Conversation]\n{conversation}\n\n{reference}[Answer]\n{completion_text(completion) or '(empty)'}\n\n"
        f"[Rubric]\n{rubric}\n\nScore the answer by the rubric, from {low:g} (worst) to {high:g} (best). "
        'Reply with JSON only: {"score": <number>}'
    )


def parse_score(text: str) -> float | None:
    """The score in a judge's reply: {"score": n}, else the first number in it; None when there is none."""
    found = re.search(r'"score"\s*:\s*"?([-+]?\d+(?:\.\d+)?)', text) or re.search(r"[-+]?\d+(?:\.\d+)?", text)
    return float(found.group(1) if found.groups() else found.group(0)) if found else None


def score_to_reward(score: float, low: float, high: float) -> float:
    """A score on the judge's scale as a reward from 0 to 1 (a score outside the scale is clipped to it)."""
    return min(1.0, max(0.0, (score - low) / (high - low)))


def check_judge(settings: JudgeSettings, api_key: str | None = None) -> None:
    """UserError now when the judge cannot answer (nothing listening, a refused key, an unknown model); the key is
    `api_key` (the submit check) or, in the job, its environment's (OPENAI_API_KEY, …)."""
    llm_clients.check_server(settings.client, llm_clients.resolve_api_key(settings.client, api_key))


async def _scores(settings: JudgeSettings, prompts: list[str]) -> list[str]:
    """The judge's replies to `prompts`, asked with the grader's system prompt, in plain text."""
    limit = asyncio.Semaphore(settings.concurrency)
    async with llm_clients.open_client(settings.client, llm_clients.resolve_api_key(settings.client)) as judge:

        async def ask(prompt: str) -> str:
            async with limit:
                return (await judge.complete(prompt, JUDGE_SYSTEM)).text

        return await asyncio.gather(*(ask(prompt) for prompt in prompts))


def judge_reward(settings: JudgeSettings) -> Reward:
    """The judge as a TRL reward: every completion of a batch scored at once, each score mapped to 0–1; a reply
    without a number scores 0 and is logged."""
    low, high = settings.min_score, settings.max_score
    if not high > low:
        raise UserError(f"judge_max_score ({high:g}) must be above judge_min_score ({low:g}).")
    if not settings.rubric.strip():
        raise UserError("The judge reward needs a rubric (judge_rubric): say what a good answer does.")

    def judge(prompts, completions, **kwargs):
        references = [str(answer) for answer in kwargs.get("answer") or [""] * len(completions)]
        asks = [
            judge_prompt(prompt, completion, settings.rubric, low, high, reference)
            for prompt, completion, reference in zip(prompts, completions, references, strict=True)
        ]
        scores = []
        for reply in asyncio.run(_scores(settings, asks)):
            score = parse_score(reply)
            if score is None:
                log.warning("the judge's reply held no score: %r", llm_clients.shorten(reply, JUDGE_REPLY_CHARS))
            scores.append(0.0 if score is None else score_to_reward(score, low, high))
        return scores

    return judge


# ---------------------------------------------------------------- a user's reward file


def file_reward_names(path: Path, names: list[str]) -> list[str]:
    """The reward functions of a Python file, read from its syntax tree (nothing in it runs): `names` checked to be
    there, or every top-level function named reward_*; UserError when the file cannot give any."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the reward file '{path}': {exc}.") from None
    except SyntaxError as exc:
        raise UserError(f"The reward file '{path}' is not valid Python (line {exc.lineno}: {exc.msg}).") from None
    defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if names:
        missing = [name for name in names if name not in defined]
        if missing:
            raise UserError(
                f"The reward file '{path}' has no function '{missing[0]}'; its functions are: "
                f"{', '.join(defined) or 'none'}."
            )
        return list(names)
    found = [name for name in defined if name.startswith(FILE_REWARD_PREFIX)]
    if not found:
        raise UserError(
            f"The reward file '{path}' has no function named {FILE_REWARD_PREFIX}*; name its reward functions so, "
            "or list them in reward_file_functions."
        )
    return found


def file_rewards(path: Path, names: list[str]) -> list[Reward]:
    """The reward functions of a user's Python file, imported: this runs the file's code (the job only)."""
    chosen = file_reward_names(path, names)
    log.warning("running reward functions from %s (%s): Python code from that file runs here", path, ", ".join(chosen))
    spec = importlib.util.spec_from_file_location(f"user_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"The reward file '{path}' failed on import: {type(exc).__name__}: {exc}.") from exc
    functions = []
    for name in chosen:
        function = getattr(module, name, None)
        if not callable(function):
            raise UserError(f"'{name}' in the reward file '{path}' is not a function.")
        functions.append(function)
    return functions
