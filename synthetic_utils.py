"""Synthetic datasets: ask an LLM for training rows through the official SDKs (OpenAI and any OpenAI-compatible
server via base_url, Anthropic, Ollama), validate each reply, drop duplicates, and append rows to data.jsonl as they
arrive. Running again on the same folder resumes; API keys are read from arguments or the environment only."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import dataset_report
import runfolder
from settings import check, option
from workspace import UserError, config_from_dict, read_json, resolve_user_path, write_json

log = logging.getLogger(__name__)

PROVIDERS = ("openai", "anthropic", "ollama")
TASKS = ("instructions", "documents", "conversations")
RESPONSE_FORMATS = ("json_schema", "json_object", "none")
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
OFFICIAL_HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}
OLLAMA_DEFAULT_URL = "http://localhost:11434"
# Local OpenAI-compatible servers ignore the key, but the SDK refuses to start without one.
NO_KEY = "no-key"
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf")
DATA_FILE = "data.jsonl"
FINGERPRINT_FILE = "synth_fingerprint.json"
# The settings that shape the rows: a folder's rows are only continued under the same values. Speed, retry, price
# and row-count settings may change between runs (raising num_rows extends a finished dataset).
CONTENT_FIELDS = (
    "provider",
    "model",
    "task",
    "topic",
    "seed_examples",
    "documents",
    "chunk_chars",
    "turns",
    "temperature",
    "max_tokens",
    "response_format",
    "min_chars",
    "max_chars",
    "near_duplicate_threshold",
)
TASK_KEYS = {
    "instructions": ("instruction", "response"),
    "documents": ("question", "answer"),
    "conversations": ("messages",),
}
RETRY_STATUSES = (408, 409, 429)  # and every 5xx: timeouts, lock conflicts, rate limits, server trouble
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause ends the run (resume later) instead of idling
MAX_BACKOFF_S = 60.0
CHECK_TIMEOUT_S = 10.0  # connecting and the model check: a wrong base_url fails in seconds, not timeout_s
STATUS_INTERVAL_S = 0.5
# A reply holds at most max_tokens tokens (a few hundred KB even for long ones) and a model list about 1 MB
# (OpenRouter's); a body past this is a server sending garbage without end, which would otherwise fill memory.
MAX_RESPONSE_BYTES = 16 * 2**20
# A provider's error message goes into status.json, progress.json, log.txt and the page: one screen line or so.
MAX_MESSAGE_CHARS = 300
# Seed examples are shown three at a time in prompts: more text than this is not examples but a YAML alias bomb
# (a few lines of anchors standing for gigabytes) or a pasted dataset.
MAX_SEED_CHARS = 1_000_000
MAX_SEED_DEPTH = 50
REDACTED = "[redacted]"
DEFAULT_PORTS = {"http": 80, "https": 443}
T = TypeVar("T")

SYSTEM_PROMPT = (
    "You write training data for fine-tuning a chat assistant. Answer with one JSON object and nothing "
    "else: no prose before or after it, no code fences."
)
# One angle per request, rotating, so that parallel requests do not all produce the same obvious example.
ANGLES = (
    "a beginner's question",
    "a practical how-to task",
    "a comparison of two options",
    "a common mistake and how to fix it",
    "an unusual edge case",
    "a short factual question",
    "a request for a concrete example",
    "a step-by-step explanation",
    "a troubleshooting problem",
    "a request to summarize or explain simply",
    "a request for a recommendation",
    "a creative task",
)


@dataclass
class SyntheticConfig:
    """What to generate, from which model, and how hard to push the server. The API key is never a field here."""

    provider: str = option(
        "openai",
        help="openai also covers vLLM, llama.cpp server and LM Studio (set the base URL).",
        choices=PROVIDERS,
        label="Provider",
    )
    model: str = option(
        "", help="The model to generate with, e.g. gpt-4o-mini, claude-sonnet-4-5 or llama3.2.", label="Model"
    )
    base_url: str = option("", help="Empty: the provider's own API (Ollama: http://localhost:11434).", label="Base URL")
    task: str = option(
        "instructions",
        help="instructions, documents (Q&A grounded in your documents) or conversations.",
        choices=TASKS,
        label="Task",
    )
    topic: str = option("", help="What the data is about; required for instructions and conversations.", label="Topic")
    seed_examples: list[dict] = option(
        default_factory=list,
        help="Rows in the task's JSON shape, shown to the model as style examples.",
        label="Seed examples",
    )
    documents: list[str] = option(
        default_factory=list, help="TXT, MD or PDF files for the documents task.", label="Documents"
    )
    chunk_chars: int = option(
        2000, help="Document text sent with each request.", minimum=200, label="Document chunk (chars)", advanced=True
    )
    turns: int = option(3, help="User turns per conversation.", minimum=1, maximum=50, label="Turns (conversations)")
    num_rows: int = option(100, help="Rows to generate.", minimum=1, label="Rows")
    concurrency: int = option(8, help="Requests in flight at once.", minimum=1, maximum=256, label="Requests at once")
    max_retries: int = option(
        5,
        help="Retries per request on 429 / 5xx / timeouts / connection errors.",
        minimum=0,
        maximum=100,
        label="Retries",
        advanced=True,
    )
    backoff_s: float = option(
        1.0,
        help="First retry delay; doubles each retry, with jitter; a Retry-After header wins.",
        minimum=0,
        label="First retry delay (s)",
        advanced=True,
    )
    timeout_s: float = option(
        60.0, help="Per request.", minimum=0, exclusive_minimum=True, label="Request timeout (s)", advanced=True
    )
    temperature: float = option(
        0.8,
        help="OpenAI-compatible servers and Ollama; Anthropic's messages API has none.",
        minimum=0,
        maximum=2,
        label="Temperature",
    )
    max_tokens: int = option(1024, help="Per reply.", minimum=1, label="Max tokens per reply", advanced=True)
    # How replies are held to the row's JSON shape (the prompt always asks for it too):
    # json_schema: structured output (OpenAI, vLLM, LM Studio, llama.cpp's llama-server, Anthropic, Ollama);
    # json_object: JSON mode with the schema attached (`python -m llama_cpp.server`; Ollama's format="json";
    # Anthropic: the prompt alone); none: the prompt alone, for servers that support neither.
    response_format: str = option(
        "json_schema",
        help="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
        choices=RESPONSE_FORMATS,
        label="Response format",
        advanced=True,
    )
    min_chars: int = option(
        2,
        help="Every turn of a row must have at least this many characters.",
        minimum=0,
        label="Min chars per turn",
        advanced=True,
    )
    max_chars: int = option(
        4000,
        help="Every turn of a row must have at most this many characters.",
        minimum=1,
        label="Max chars per turn",
        advanced=True,
    )
    near_duplicate_threshold: float = option(
        0.8,
        help="Word-trigram Jaccard similarity that counts as a duplicate; 1 = exact duplicates only.",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        label="Near-duplicate threshold",
        advanced=True,
    )
    max_consecutive_rejects: int = option(
        25,
        help="Stop when this many replies in a row are unusable.",
        minimum=1,
        label="Stop after rejects in a row",
        advanced=True,
    )
    price_per_million_input: float | None = option(
        None,
        help="USD per million input tokens, for the cost estimate.",
        minimum=0,
        label="USD per million input tokens",
        advanced=True,
    )
    price_per_million_output: float | None = option(
        None,
        help="USD per million output tokens, for the cost estimate.",
        minimum=0,
        label="USD per million output tokens",
        advanced=True,
    )

    def validate(self, workspace: str | Path | None = None) -> None:
        """Raise UserError for the first value that cannot work."""
        check(self)
        if not str(self.model).strip():
            raise UserError(
                "No model given. Name the model to generate with, e.g. gpt-4o-mini, claude-sonnet-4-5 or llama3.2."
            )
        if self.base_url and urlparse(self.base_url).scheme not in ("http", "https"):
            raise UserError(
                f"base_url '{self.base_url}' must start with http:// or https://, e.g. http://localhost:8000/v1."
            )
        if self.task != "documents" and not str(self.topic).strip():
            raise UserError(f"The {self.task} task needs a topic: describe what the data should be about.")
        if self.task == "documents":
            if not self.documents:
                raise UserError("The documents task needs documents: give TXT, MD or PDF files to ask questions about.")
            for path in self.documents:
                if Path(str(path)).suffix.lower() not in DOCUMENT_SUFFIXES:
                    raise UserError(f"Document '{path}' is not a TXT, MD or PDF file.")
                if not resolve_user_path(path, workspace).is_file():
                    raise UserError(f"Document '{path}' is not a file.")
        if self.max_chars < self.min_chars:
            raise UserError(
                f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars}); raise max_chars or lower min_chars."
            )
        if (self.price_per_million_input is None) != (self.price_per_million_output is None):
            raise UserError("Give both price_per_million_input and price_per_million_output (USD), or neither.")
        keys = TASK_KEYS[self.task]
        for index, example in enumerate(self.seed_examples, 1):
            if not isinstance(example, dict) or any(key not in example for key in keys):
                raise UserError(
                    f"Seed example {index} must be a mapping with the keys {', '.join(keys)} for the {self.task} task."
                )
        if seed_examples_size(self.seed_examples) > MAX_SEED_CHARS:
            raise UserError(
                f"seed_examples expand to more than {MAX_SEED_CHARS:,} characters (YAML aliases such as *name repeat "
                "their anchor's text at every use); give fewer or shorter examples."
            )


def seed_examples_size(examples: list) -> int:
    """About the characters `examples` take as JSON, with a shared part (a YAML alias) counted at every use.

    Each shared part is measured once, so a few lines of nested aliases standing for gigabytes are measured in
    microseconds instead of being expanded; a part that contains itself is refused.
    """
    sizes: dict[int, int] = {}

    def size(value: Any, index: int, depth: int) -> int:
        if not isinstance(value, (dict, list)):
            return len(str(value)) + 2
        if depth > MAX_SEED_DEPTH:
            raise UserError(f"Seed example {index} is nested more than {MAX_SEED_DEPTH} levels deep; flatten it.")
        known = sizes.get(id(value))
        if known == -1:
            raise UserError(f"Seed example {index} contains itself (a YAML alias inside its own anchor); write it out.")
        if known is not None:
            return known
        sizes[id(value)] = -1
        parts = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 2 + sum(size(part, index, depth + 1) + 1 for part in parts)
        return sizes[id(value)]

    return sum(size(example, index, 0) for index, example in enumerate(examples, 1))


def synthetic_config_from_dict(data: dict[str, Any]) -> SyntheticConfig:
    return config_from_dict(SyntheticConfig, data, "synthetic data config")


@dataclass
class SynthSummary:
    """Counters of a generation run; the run folder's progress.json holds the latest (as its metrics), totals across
    resumes."""

    state: str  # running, done, stopped or failed
    rows_done: int
    num_rows: int
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    estimated_cost: float | None = None  # USD, when prices are given
    rows_this_run: int = 0
    elapsed_s: float = 0.0  # this run only
    error: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        """One human-readable line: rows, rejects by reason, retries, tokens, cost."""
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejected_by_reason.items()))
        text = (
            f"{self.rows_done}/{self.num_rows} rows, {self.rejected} rejected{f' ({reasons})' if reasons else ''}, "
            f"{self.retries} retries, {self.tokens_in:,} tokens in / {self.tokens_out:,} out"
        )
        return text + (f", ~${self.estimated_cost:.4f}" if self.estimated_cost is not None else "")


# ---------------------------------------------------------------- keys


def is_official(config: SyntheticConfig) -> bool:
    return not config.base_url or urlparse(config.base_url).hostname == OFFICIAL_HOSTS.get(config.provider)


def resolve_api_key(config: SyntheticConfig, api_key: str | None = None) -> str | None:
    """The key to send: the argument, else OPENAI_API_KEY / ANTHROPIC_API_KEY; None for Ollama, which has none.

    The provider's own API needs a key; a local server given by base_url gets a placeholder when none is set.
    """
    if config.provider not in KEY_ENV:
        return None
    key = (api_key or os.environ.get(KEY_ENV[config.provider]) or "").strip()
    if key:
        return key
    if is_official(config):
        raise UserError(
            f"No API key for {config.provider}. Set {KEY_ENV[config.provider]} in the environment "
            "(or type the key in the app); it is passed to the job and never saved."
        )
    return NO_KEY


def job_env(config: SyntheticConfig, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the key to the job's process (never written to the run folder)."""
    key = resolve_api_key(config, api_key)
    return {KEY_ENV[config.provider]: key} if key and key != NO_KEY else {}


# ---------------------------------------------------------------- documents


def load_document_chunks(paths: list[str], chunk_chars: int, workspace: str | Path | None = None) -> list[str]:
    """The text of TXT / MD / PDF files cut into chunks of about `chunk_chars`, each labelled with its file name."""
    chunks = []
    for raw in paths:
        path = resolve_user_path(raw, workspace)
        text = _document_text(path)
        if not text.strip():
            hint = " (a scanned PDF needs OCR first)" if path.suffix.lower() == ".pdf" else ""
            raise UserError(f"Document '{raw}' has no text{hint}.")
        chunks += [f"[{path.name}]\n{chunk}" for chunk in chunk_text(text, chunk_chars)]
    return chunks


def _document_text(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        import pypdf

        try:
            reader = pypdf.PdfReader(str(path))
            return "\n\n".join(page.extract_text() or "" for page in reader.pages)
        except (pypdf.errors.PyPdfError, ValueError, OSError) as exc:
            raise UserError(f"Cannot read PDF '{path}': {exc}") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"Document '{path}' is not UTF-8 text; save it as UTF-8.") from None


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Paragraphs packed into chunks of at most `chunk_chars`; longer paragraphs are cut at spaces."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > chunk_chars:
            cut = paragraph.rfind(" ", 0, chunk_chars)
            cut = cut if cut > chunk_chars // 2 else chunk_chars
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            pieces.append(paragraph)
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > chunk_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    return chunks + ([current] if current else [])


# ---------------------------------------------------------------- prompts and replies


def row_schema(config: SyntheticConfig) -> dict[str, Any]:
    """The JSON schema of one reply, for servers that constrain output to a schema."""

    def strings(*names: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: {"type": "string"} for name in names},
            "required": list(names),
            "additionalProperties": False,
        }

    if config.task == "conversations":
        turn = {
            "type": "object",
            "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}},
            "required": ["role", "content"],
            "additionalProperties": False,
        }
        return {
            "type": "object",
            "properties": {"messages": {"type": "array", "items": turn}},
            "required": ["messages"],
            "additionalProperties": False,
        }
    return strings(*TASK_KEYS[config.task])


def build_prompt(config: SyntheticConfig, index: int, chunks: list[str], rng: random.Random) -> str:
    """The user prompt of request number `index` (angles and document chunks rotate with it)."""
    angle = ANGLES[index % len(ANGLES)]
    examples = ""
    if config.seed_examples:
        chosen = rng.sample(config.seed_examples, min(3, len(config.seed_examples)))
        examples = (
            "Examples of the style wanted (write something new, not a copy):\n"
            + "\n".join(json.dumps(example, ensure_ascii=False) for example in chosen)
            + "\n"
        )
    topic = f"Topic: {config.topic}\n" if str(config.topic).strip() else ""
    if config.task == "instructions":
        return (
            f"{topic}Write one new instruction a user could give an assistant about this topic, and the "
            f"assistant's ideal response. Make it {angle}.\n{examples}"
            'Reply with JSON: {"instruction": "...", "response": "..."}'
        )
    if config.task == "documents":
        chunk = chunks[index % len(chunks)]
        return (
            f'{topic}Document excerpt:\n"""\n{chunk}\n"""\nWrite one question a reader could ask that this '
            f"excerpt answers, and the answer, using only facts from the excerpt. Make it {angle}.\n{examples}"
            'Reply with JSON: {"question": "...", "answer": "..."}'
        )
    return (
        f"{topic}Write a realistic conversation between a user and an assistant about this topic, with "
        f"{config.turns} user turns, each followed by the assistant's reply. Open with {angle}.\n{examples}"
        'Reply with JSON: {"messages": [{"role": "user", "content": "..."}, '
        '{"role": "assistant", "content": "..."}, ...]}'
    )


class Rejected(Exception):
    """A reply that cannot become a row; the message is the reason counted in rejected_by_reason."""


def parse_reply(text: str, config: SyntheticConfig) -> list[dict[str, str]]:
    """The row's messages from a model reply, or Rejected("invalid_json" / "wrong_shape" / "too_short" / "too_long")."""
    start, end = text.find("{"), text.rfind("}")
    try:
        data = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise Rejected("invalid_json")
    if config.task == "conversations":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejected("wrong_shape")
        messages = messages[: 2 * config.turns]
        if len(messages) % 2:
            messages = messages[:-1]  # a conversation ends with the assistant's reply
        for position, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") != ("user", "assistant")[position % 2]
                or not isinstance(message.get("content"), str)
            ):
                raise Rejected("wrong_shape")
        messages = [{"role": message["role"], "content": message["content"].strip()} for message in messages]
        if not messages:
            raise Rejected("wrong_shape")
    else:
        user_key, assistant_key = TASK_KEYS[config.task]
        if not isinstance(data.get(user_key), str) or not isinstance(data.get(assistant_key), str):
            raise Rejected("wrong_shape")
        messages = [
            {"role": "user", "content": data[user_key].strip()},
            {"role": "assistant", "content": data[assistant_key].strip()},
        ]
    lengths = [len(message["content"]) for message in messages]
    if min(lengths) < max(config.min_chars, 1):
        raise Rejected("too_short")
    if max(lengths) > config.max_chars:
        raise Rejected("too_long")
    return messages


# ---------------------------------------------------------------- duplicates


normalize_text = dataset_report.normalize_text  # the form two rows are compared in


class DuplicateIndex:
    """Exact and near duplicates of kept rows, through dataset_report's MinHash LSH index (datasketch): the same
    test the dataset quality report applies."""

    def __init__(self, threshold: float) -> None:
        self.index = dataset_report.DuplicateIndex(threshold)
        self.kept = 0

    def check(self, text: str) -> str | None:
        """Why `text` repeats a kept row ("duplicate" or "near_duplicate"), or None when it is new."""
        found = self.index.find(text)
        return found[0] if found else None

    def add(self, text: str) -> None:
        self.index.add(self.kept, text)
        self.kept += 1


def row_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(message["content"] for message in messages)


# ---------------------------------------------------------------- providers


@dataclass
class Reply:
    text: str
    tokens_in: int
    tokens_out: int


def _timeout(timeout_class: type, config: SyntheticConfig) -> Any:
    """The timeout of each read, with connecting cut short so that a wrong address fails in seconds."""
    return timeout_class(config.timeout_s, connect=min(config.timeout_s, CHECK_TIMEOUT_S))


class BadReply(Exception):
    """A reply refused before the SDK parses it (too slow, too big, not JSON, redirected elsewhere).

    The message continues "The <provider> server at <url> ..."; `retry` says whether asking again may help.
    """

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def _bad_reply(exc: BaseException | None) -> BadReply | None:
    """The BadReply behind `exc`, which an SDK may have wrapped in an error of its own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BadReply):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


async def _within(seconds: float, awaitable: Awaitable[T], message: str, retry: bool) -> T:
    """`awaitable`'s result, or BadReply(message) when it takes longer than `seconds` all told.

    The SDKs' timeouts bound each read, so a server trickling a byte a second would hold a request forever.
    """
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise BadReply(message, retry) from None


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with a note of how many were left off."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def redact(text: str, api_key: str | None) -> str:
    """`text` without the job's API key, which some servers quote back in their error messages."""
    return text.replace(api_key, REDACTED) if api_key and api_key != NO_KEY else text


def _origin(url: Any) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


async def _ask_for_plain_bodies(request: Any) -> None:
    # A compressed body would be expanded past MAX_RESPONSE_BYTES after the check (a gzip bomb).
    request.headers["Accept-Encoding"] = "identity"


async def _read_body(response: Any) -> bytes:
    """The raw body, refused once it passes MAX_RESPONSE_BYTES."""
    too_large = BadReply(
        f"sent a reply larger than {MAX_RESPONSE_BYTES / 2**20:g} MiB, which no chat reply is; is base_url the API "
        "endpoint?",
        retry=False,
    )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in response.stream:
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise too_large
        chunks.append(chunk)
    await response.stream.aclose()
    return b"".join(chunks)


def _check_json(response: Any, body: bytes) -> None:
    """Refuse a success whose body is not a JSON object: a web page is fatal, a cut-off body worth another try."""
    try:
        data = json.loads(body)
    except ValueError:
        kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
        if "html" in kind or body.lstrip()[:1] == b"<":
            raise BadReply(
                f"answered {response.status_code} with {kind}, not JSON — is base_url the API endpoint?", retry=False
            ) from None
        began = body[:60].decode("utf-8", errors="replace")
        raise BadReply(f"answered {response.status_code} with invalid JSON (began: {began!r})", retry=True) from None
    if not isinstance(data, dict):
        raise BadReply(
            f"answered {response.status_code} with a JSON {type(data).__name__}, not an object — is base_url the API "
            "endpoint?",
            retry=False,
        )


class _Provider:
    """One SDK's async client; each subclass has check() (server, key and model, once), complete(prompt), close().

    The openai and anthropic SDKs share their error classes' shapes, which the two methods below read; only the SDK
    in use is imported, so a job never pays for loading the other two.
    """

    def __init__(self, config: SyntheticConfig, api_key: str | None, sdk: Any, httpx_module: Any) -> None:
        self.config = config
        self.api_key = api_key
        self.sdk = sdk
        self.httpx = httpx_module  # the HTTP library under the SDK: httpx2 for openai and anthropic, httpx for ollama

    def http_options(self) -> dict[str, Any]:
        """Options for the SDK's HTTP client: every response passes check_response before the SDK reads it."""
        return {"event_hooks": {"request": [_ask_for_plain_bodies], "response": [self.check_response]}}

    async def check_response(self, response: Any) -> None:
        """Refuse a redirect to another origin; read the body within MAX_RESPONSE_BYTES; a success must be JSON.

        httpx calls this for every response, redirects included, before following one or reading the body.
        """
        if response.has_redirect_location:
            target = response.request.url.join(response.headers["location"])
            if _origin(target) != _origin(response.request.url):
                # The key belongs to the address the user gave. (Following it, httpx drops the key on the way and the
                # other server's 401 blames the key instead of base_url.)
                raise BadReply(f"redirected to {target}; set base_url to the final address", retry=False)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise BadReply(f"compressed its reply ({encoding}) although asked not to", retry=False)
        body = await _read_body(response)
        response.stream = self.httpx.ByteStream(body)
        if response.is_success:
            _check_json(response, body)

    def clean(self, text: str) -> str:
        """A server's text as it may be stored and shown: without the key, and short."""
        return shorten(redact(str(text), self.api_key))

    def user_error(self, message: str) -> UserError:
        """UserError for `message`, which continues "The <provider> server at <url> ..."."""
        text = f"The {self.config.provider} server at {self.url} {self.clean(message)}"
        return UserError(text if text.endswith(("?", ".")) else text + ".")

    def http_error(self, exc: BaseException) -> tuple[int, str, Any] | None:
        """(status, the server's message cleaned, headers) when `exc` is an HTTP error reply, else None."""
        if not isinstance(exc, self.sdk.APIStatusError):
            return None
        error = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return exc.status_code, self.clean(message or exc.message), exc.response.headers

    def connection_error(self, exc: BaseException) -> bool:
        """Whether `exc` means no reply arrived: refused, dropped, timed out."""
        return isinstance(exc, (self.sdk.APIConnectionError, asyncio.TimeoutError))

    @property
    def url(self) -> str:
        return (
            self.config.base_url
            or {
                "openai": "https://api.openai.com/v1",
                "anthropic": "https://api.anthropic.com",
                "ollama": OLLAMA_DEFAULT_URL,
            }[self.config.provider]
        )


class _OpenAI(_Provider):
    def __init__(self, config: SyntheticConfig, api_key: str | None) -> None:
        import httpx2
        import openai

        super().__init__(config, api_key, openai, httpx2)
        # max_retries=0: retries are ours, so they are counted and share one backoff policy across providers.
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=config.base_url or None,
            timeout=_timeout(openai.Timeout, config),
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(**self.http_options()),
        )

    async def check(self) -> None:
        try:
            page = await _within(
                CHECK_TIMEOUT_S, self.client.models.list(timeout=CHECK_TIMEOUT_S), CHECK_TOO_SLOW, retry=False
            )
        except self.sdk.NotFoundError:
            return  # a server without a model list: the first request will tell
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)
            return
        served = [model.id for model in page.data]
        if served and self.config.model not in served:
            raise UserError(
                f"Model '{self.config.model}' is not served at {self.url}; it serves: "
                f"{', '.join(served[:20])}{' …' if len(served) > 20 else ''}. Check the model name."
            )

    async def complete(self, prompt: str) -> Reply:
        options: dict[str, Any] = {}
        if self.config.response_format == "json_schema":
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "row", "schema": row_schema(self.config), "strict": True},
            }
        elif self.config.response_format == "json_object":
            options["response_format"] = {"type": "json_object"}
            if not is_official(self.config):
                # llama-cpp-python's server turns an attached schema into a grammar; OpenAI's API takes no such key.
                options["response_format"]["schema"] = row_schema(self.config)
        # OpenAI's own API wants max_completion_tokens (its reasoning models refuse max_tokens); compatible servers
        # (vLLM, llama.cpp, LM Studio) know max_tokens.
        options["max_completion_tokens" if is_official(self.config) else "max_tokens"] = self.config.max_tokens
        response = await self.client.chat.completions.create(
            model=self.config.model,
            temperature=self.config.temperature,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            **options,
        )
        return openai_reply(response)

    async def close(self) -> None:
        await self.client.close()


class _Anthropic(_Provider):
    def __init__(self, config: SyntheticConfig, api_key: str | None) -> None:
        import anthropic
        import httpx2

        super().__init__(config, api_key, anthropic, httpx2)
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=config.base_url or None,
            timeout=_timeout(anthropic.Timeout, config),
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(**self.http_options()),
        )

    async def check(self) -> None:
        try:
            await _within(
                CHECK_TIMEOUT_S,
                self.client.models.retrieve(self.config.model, timeout=CHECK_TIMEOUT_S),
                CHECK_TOO_SLOW,
                retry=False,
            )
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)

    async def complete(self, prompt: str) -> Reply:
        # The messages API takes no temperature any more; structured output goes through output_config.
        options: dict[str, Any] = {}
        if self.config.response_format == "json_schema":
            options["output_config"] = {"format": {"type": "json_schema", "schema": row_schema(self.config)}}
        response = await self.client.messages.create(
            model=self.config.model,
            max_tokens=self.config.max_tokens,
            system=SYSTEM_PROMPT,
            messages=[{"role": "user", "content": prompt}],
            **options,
        )
        return anthropic_reply(response)

    async def close(self) -> None:
        await self.client.close()


class _Ollama(_Provider):
    def __init__(self, config: SyntheticConfig, api_key: str | None) -> None:
        import httpx
        import ollama

        super().__init__(config, api_key, ollama, httpx)
        self.client = ollama.AsyncClient(host=self.url, timeout=_timeout(httpx.Timeout, config), **self.http_options())

    def http_error(self, exc: BaseException) -> tuple[int, str, Any] | None:
        if isinstance(exc, self.sdk.ResponseError):
            return exc.status_code, self.clean(exc.error), {}  # the SDK keeps no headers: no Retry-After from Ollama
        return None

    def connection_error(self, exc: BaseException) -> bool:
        import httpx

        # ollama turns a refused connection into the builtin ConnectionError and lets other httpx errors through.
        return isinstance(exc, (httpx.TransportError, ConnectionError, asyncio.TimeoutError))

    async def check(self) -> None:
        try:
            await _within(CHECK_TIMEOUT_S, self.client.show(self.config.model), CHECK_TOO_SLOW, retry=False)
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)

    async def complete(self, prompt: str) -> Reply:
        import pydantic

        output_format = {"json_schema": row_schema(self.config), "json_object": "json", "none": None}
        try:
            response = await self.client.chat(
                model=self.config.model,
                stream=False,
                format=output_format[self.config.response_format],
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                options={"temperature": self.config.temperature, "num_predict": self.config.max_tokens},
            )
        except pydantic.ValidationError:  # the SDK validates the reply's JSON against its model
            raise not_a_chat_reply("message") from None
        return Reply(response.message.content or "", response.prompt_eval_count or 0, response.eval_count or 0)

    async def close(self) -> None:
        await self.client.close()


PROVIDER_CLASSES = {"openai": _OpenAI, "anthropic": _Anthropic, "ollama": _Ollama}
CHECK_TOO_SLOW = f"sent no complete reply to the model check within {CHECK_TIMEOUT_S:g} s; is base_url right?"


def openai_reply(response: Any) -> Reply:
    """An OpenAI chat completion's text and token counts (the synthetic data, the arena's and GRPO's judges)."""
    # The SDK builds its objects without validating them: JSON of another shape leaves fields None or odd.
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise not_a_chat_reply("choices")
    text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
    usage = getattr(response, "usage", None)
    return Reply(
        text if isinstance(text, str) else "",
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "completion_tokens", 0) or 0,
    )


def anthropic_reply(response: Any) -> Reply:
    """An Anthropic message's text blocks and token counts (built without validation, like OpenAI's)."""
    content = getattr(response, "content", None)
    if not isinstance(content, list):
        raise not_a_chat_reply("content")
    text = "".join(str(getattr(block, "text", "")) for block in content if getattr(block, "type", "") == "text")
    usage = getattr(response, "usage", None)
    return Reply(text, getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0)


def not_a_chat_reply(field: str) -> BadReply:
    # Valid JSON without the reply in it is a server speaking another API: asking again gets the same.
    return BadReply(
        f"answered 200 with JSON that is not a chat reply (no '{field}'); does base_url point to its chat API?",
        retry=False,
    )


# ---------------------------------------------------------------- errors and retries


def _describe(exc: BaseException) -> str:
    """The innermost cause of a connection error, e.g. '[Errno 111] Connection refused' (not yet cleaned)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


def _fatal_status(status: int, message: str, provider: _Provider) -> UserError:
    config = provider.config
    if status in (401, 403):
        key = f" Check {KEY_ENV[config.provider]}." if config.provider in KEY_ENV else ""
        return UserError(
            f"The {config.provider} server at {provider.url} refused the request ({status}: {message}).{key}"
        )
    if status == 404:
        hint = (
            f" Pull it with `ollama pull {config.model}`."
            if config.provider == "ollama"
            else " Check the model name, and base_url (OpenAI-compatible servers usually end in /v1)."
        )
        return UserError(f"Model '{config.model}' was not found at {provider.url} ({message}).{hint}")
    return UserError(f"The {config.provider} server at {provider.url} refused the request ({status}: {message}).")


def _raise_if_fatal_at_check(exc: BaseException, provider: _Provider) -> None:
    """At the start: unreachable server, bad key, unknown model are errors now; a busy server is left to retries."""
    bad = _bad_reply(exc)
    if bad is not None and bad.retry:
        log.warning("model check: the server %s; going on", provider.clean(str(bad)))
        return
    if bad is not None:
        raise provider.user_error(str(bad)) from None
    if provider.connection_error(exc):
        raise UserError(
            f"Cannot reach the {provider.config.provider} server at {provider.url}: {provider.clean(_describe(exc))}. "
            "Is it running, and is base_url right?"
        ) from None
    status = provider.http_error(exc)
    if status is None:
        raise exc
    if status[0] == 429 or status[0] >= 500:
        log.warning("model check got %s (%s); going on", status[0], status[1])
        return
    raise _fatal_status(status[0], status[1], provider) from None


def retry_after_seconds(headers: Any) -> float | None:
    """Retry-After (seconds or an HTTP date) or retry-after-ms, as seconds; None when absent or unreadable."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_delay(attempt: int, backoff_s: float, retry_after: float | None) -> float:
    """Seconds before retry number `attempt` (0-based): exponential with jitter, or the server's Retry-After."""
    if retry_after is not None:
        return retry_after + random.uniform(0, 0.1 + 0.1 * retry_after)  # never earlier than asked
    return min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------- the run


class _Run:
    """The state of one generation: rows written, duplicates index, counters; writes rows and reports progress."""

    def __init__(self, config: SyntheticConfig, out_dir: Path, reporter: runfolder.Reporter, rows: list[list[dict]]):
        self.config = config
        self.out_dir = out_dir
        self.reporter = reporter
        previous = runfolder.read_progress(out_dir).metrics
        self.index = DuplicateIndex(config.near_duplicate_threshold)
        for messages in rows:
            self.index.add(row_text(messages))
        self.summary = SynthSummary(
            state="running",
            rows_done=len(rows),
            num_rows=config.num_rows,
            rejected=int(previous.get("rejected", 0)),
            rejected_by_reason=dict(previous.get("rejected_by_reason", {})),
            retries=int(previous.get("retries", 0)),
            requests=int(previous.get("requests", 0)),
            tokens_in=int(previous.get("tokens_in", 0)),
            tokens_out=int(previous.get("tokens_out", 0)),
        )
        self.started = time.monotonic()
        self.consecutive_rejects: Counter[str] = Counter()
        self.last_reject_text = ""
        self.last_status_write = 0.0
        self.rng = random.Random()
        # Later requests continue the rotation of angles and document chunks where the last run left it.
        self.next_request = self.summary.requests
        self.fd = os.open(out_dir / DATA_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def take_request_number(self) -> int:
        self.next_request += 1
        return self.next_request - 1

    def count_reply(self, reply: Reply) -> None:
        self.summary.requests += 1
        self.summary.tokens_in += reply.tokens_in
        self.summary.tokens_out += reply.tokens_out

    def accept(self, reply: Reply) -> None:
        """Validate, filter and deduplicate one reply; a good row is appended to data.jsonl at once."""
        try:
            messages = parse_reply(reply.text, self.config)
            duplicate = self.index.check(row_text(messages))
            if duplicate:
                raise Rejected(duplicate)
        except Rejected as reason:
            self.summary.rejected += 1
            self.summary.rejected_by_reason[str(reason)] = self.summary.rejected_by_reason.get(str(reason), 0) + 1
            self.consecutive_rejects[str(reason)] += 1
            self.last_reject_text = reply.text
            return
        self.consecutive_rejects.clear()
        self.index.add(row_text(messages))
        # One write call per row: a killed process leaves at most one torn last line, which resume cuts off.
        os.write(self.fd, (json.dumps({"messages": messages}, ensure_ascii=False) + "\n").encode())
        self.summary.rows_done += 1
        self.summary.rows_this_run += 1

    def snapshot(self, state: str | None = None) -> SynthSummary:
        summary = self.summary
        if state:
            summary.state = state
        summary.elapsed_s = round(time.monotonic() - self.started, 3)
        prices = (self.config.price_per_million_input, self.config.price_per_million_output)
        if prices[0] is not None and prices[1] is not None:
            summary.estimated_cost = round((summary.tokens_in * prices[0] + summary.tokens_out * prices[1]) / 1e6, 6)
        return summary

    def report(self, force: bool = False) -> None:
        """Counters to the reporter, at most every STATUS_INTERVAL_S unless `force`."""
        now = time.monotonic()
        if force or now - self.last_status_write >= STATUS_INTERVAL_S:
            self.last_status_write = now
            snapshot = self.snapshot()
            self.reporter.progress(
                snapshot.rows_done,
                snapshot.num_rows,
                snapshot.line(),
                force=True,
                **asdict(snapshot),
                rows_per_s=round(snapshot.rows_per_s, 3),
            )

    def close(self) -> None:
        os.close(self.fd)


async def request(provider: _Provider, prompt: str, run: _Run) -> Reply:
    """One completion with retries on 429 / 5xx / timeouts / connection errors / cut-off bodies; others end the run."""
    config = provider.config
    too_slow = f"sent no complete reply within timeout_s = {config.timeout_s:g} s"
    for attempt in range(config.max_retries + 1):
        try:
            return await _within(config.timeout_s, provider.complete(prompt), too_slow, retry=True)
        except Exception as exc:
            bad = _bad_reply(exc)
            if bad is not None and not bad.retry:
                raise provider.user_error(str(bad)) from None
            status = provider.http_error(exc) if bad is None else None
            if status is not None and status[0] not in RETRY_STATUSES and status[0] < 500:
                raise _fatal_status(status[0], status[1], provider) from None
            if bad is None and status is None and not provider.connection_error(exc):
                raise
            if bad is not None:
                problem = provider.clean(str(bad))
            elif status is not None:
                problem = f"{status[0]}: {status[1]}"  # cleaned already: a second cut would eat the length note
            else:
                problem = provider.clean(_describe(exc))
            retry_after = retry_after_seconds(status[2]) if status else None
            if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
                raise UserError(
                    f"The server asks to wait {retry_after:.0f} s before the next request ({problem}). "
                    "The rows so far are saved: resume later."
                ) from None
            if attempt == config.max_retries:
                raise UserError(
                    f"The {config.provider} server at {provider.url} kept failing after {attempt} "
                    f"retries ({problem}). The rows so far are saved: resume later."
                ) from None
            delay = backoff_delay(attempt, config.backoff_s, retry_after)
            run.summary.retries += 1
            log.info("retry %d/%d in %.2f s after %s", attempt + 1, config.max_retries, delay, problem)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _generate(
    run: _Run,
    provider: _Provider,
    chunks: list[str],
    should_stop: Callable[[], bool],
) -> str:
    config = run.config
    await provider.check()
    pending: set[asyncio.Task] = set()
    try:
        while run.summary.rows_done < config.num_rows:
            if should_stop():
                return "stopped"
            # Only as many requests as rows still missing: the last rows do not start surplus (paid) requests.
            while len(pending) < config.concurrency and run.summary.rows_done + len(pending) < config.num_rows:
                prompt = build_prompt(config, run.take_request_number(), chunks, run.rng)
                pending.add(asyncio.create_task(request(provider, prompt, run)))
            finished, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            errors = [task.exception() for task in finished if task.exception() is not None]
            if errors:
                raise errors[0]
            for task in finished:
                reply = task.result()
                run.count_reply(reply)
                if run.summary.rows_done < config.num_rows:
                    run.accept(reply)
            if sum(run.consecutive_rejects.values()) >= config.max_consecutive_rejects:
                raise UserError(_rejects_message(run))
            if finished:
                run.report()
        return "done"
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await provider.close()


def _rejects_message(run: _Run) -> str:
    reason, _ = run.consecutive_rejects.most_common(1)[0]
    what = {
        "invalid_json": "were not valid JSON",
        "wrong_shape": "did not have the asked JSON shape",
        "too_short": "had a turn shorter than min_chars",
        "too_long": "had a turn longer than max_chars",
        "duplicate": "repeated earlier rows",
        "near_duplicate": "nearly repeated earlier rows",
    }[reason]
    snippet = shorten(run.last_reject_text, 200)
    return (
        f"Stopped: the last {sum(run.consecutive_rejects.values())} replies from '{run.config.model}' were "
        f"unusable (most {what}; the last began: {snippet!r}). So far: {run.snapshot().line()}. A stronger "
        "model, another temperature or a clearer topic usually helps; running again resumes."
    )


def _content_settings(config: SyntheticConfig) -> dict[str, Any]:
    values = asdict(config)
    return {name: values[name] for name in CONTENT_FIELDS}


def fingerprint(config: SyntheticConfig) -> str:
    """A hash of the settings that shape rows; rows in a folder are only continued under the same fingerprint."""
    return hashlib.sha256(json.dumps(_content_settings(config), sort_keys=True).encode()).hexdigest()[:16]


def _claim_folder(config: SyntheticConfig, out_dir: Path) -> None:
    """Refuse a folder holding rows of other settings; otherwise record this config's fingerprint there."""
    data = out_dir / DATA_FILE
    stored = read_json(out_dir / FINGERPRINT_FILE)
    has_rows = data.exists() and data.stat().st_size > 0
    if stored is None:
        if has_rows:
            raise UserError(
                f"{out_dir} already holds a {DATA_FILE} that was not generated here; choose an empty folder."
            )
        write_json(
            out_dir / FINGERPRINT_FILE, {"fingerprint": fingerprint(config), "settings": _content_settings(config)}
        )
        return
    if stored.get("fingerprint") != fingerprint(config) and has_rows:
        old, new = stored.get("settings", {}), _content_settings(config)
        changed = [name for name in CONTENT_FIELDS if old.get(name) != new.get(name)]
        raise UserError(
            f"{out_dir} already holds rows generated with other settings (changed: "
            f"{', '.join(changed) or 'unknown'}). Generate into a new folder, or put those settings back "
            "to continue that dataset."
        )
    if stored.get("fingerprint") != fingerprint(config):
        # Counters of the old settings, which made no rows.
        (out_dir / "progress.json").unlink(missing_ok=True)
        write_json(
            out_dir / FINGERPRINT_FILE, {"fingerprint": fingerprint(config), "settings": _content_settings(config)}
        )


def read_rows(out_dir: Path) -> list[list[dict]]:
    """The rows already in data.jsonl; a torn last line (the process was killed mid-write) is cut off."""
    path = Path(out_dir) / DATA_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("cutting off a torn last line of %s", path)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        raw = raw[:keep]
    rows = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line)["messages"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{path} line {number} is not a generated row; was the file edited? Fix or remove that line to resume."
            ) from None
    return rows


def generate(
    config: SyntheticConfig,
    out_dir: str | Path,
    api_key: str | None = None,
    reporter: runfolder.Reporter | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SynthSummary:
    """Generate rows into out_dir/data.jsonl until it holds config.num_rows; resumes a folder of the same settings.

    The reporter gets the counters after batches of replies (by default one writing out_dir/progress.json and
    events.jsonl); should_stop is polled to end early
    ("stopped"). Raises UserError for problems a user can fix (server unreachable, unknown model, bad key, a model
    whose replies keep being unusable); rows written so far stay.
    """
    config.validate()
    key = resolve_api_key(config, api_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = load_document_chunks(config.documents, config.chunk_chars) if config.task == "documents" else []
    _claim_folder(config, out_dir)
    run = _Run(config, out_dir, reporter or runfolder.Reporter(out_dir), read_rows(out_dir))
    # The SDKs' HTTP library logs every request at INFO: thousands of lines in a job's log.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log.info(
        "generating %d %s rows with %s model %s (%d already done)",
        config.num_rows,
        config.task,
        config.provider,
        config.model,
        run.summary.rows_done,
    )
    state = "failed"
    try:
        if run.summary.rows_done >= config.num_rows:
            state = "done"
        else:
            provider = PROVIDER_CLASSES[config.provider](config, key)
            state = asyncio.run(_generate(run, provider, chunks, should_stop or (lambda: False)))
    except UserError as exc:
        # Every message from the server was cleaned on the way; this catches the key quoted anywhere else (a reply).
        message = redact(str(exc), key)
        run.summary.error = message
        if message != str(exc):
            raise UserError(message) from None
        raise
    finally:
        run.close()
        summary = run.snapshot(state)
        run.report(force=True)
    log.info("%s: %s", state, summary.line())
    return summary


def synth_job(config: SyntheticConfig, ctx: runfolder.JobContext) -> str:
    """The synthetic-data stage's job: the run folder is the output folder; the key comes from the environment."""
    return generate(config, ctx.run_dir, reporter=ctx.reporter, should_stop=ctx.stop).state
