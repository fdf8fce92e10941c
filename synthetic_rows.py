"""What a synthetic row is and how one is asked for: the settings that shape rows (SyntheticConfig), the prompt of
each request (rotating angles, seed examples, document chunks), the reply's JSON schema, and a reply's validation
into a row. The generation job that sends the prompts and keeps the rows is synthetic_utils."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llm_clients
from settings import check, option
from workspace import UserError, resolve_user_path

TASKS = ("instructions", "documents", "conversations")
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf")
TASK_KEYS = {
    "instructions": ("instruction", "response"),
    "documents": ("question", "answer"),
    "conversations": ("messages",),
}
# Seed examples are shown three at a time in prompts: more text than this is not examples but a YAML alias bomb
# (a few lines of anchors standing for gigabytes) or a pasted dataset.
MAX_SEED_CHARS = 1_000_000
MAX_SEED_DEPTH = 50

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
        choices=llm_clients.PROVIDERS,
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
    # How replies are held to the row's JSON shape (the prompt always asks for it too): see llm_clients.ClientConfig.
    response_format: str = option(
        "json_schema",
        help="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
        choices=llm_clients.RESPONSE_FORMATS,
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

    def client(self) -> llm_clients.ClientConfig:
        """The server to ask, as the client's own settings (the API key is never among them)."""
        return llm_clients.ClientConfig(
            provider=self.provider,
            model=self.model,
            base_url=self.base_url,
            response_format=self.response_format,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
        )

    def validate(self, workspace: str | Path | None = None) -> None:
        """Raise UserError for the first value that cannot work."""
        check(self)
        if not str(self.model).strip():
            raise UserError(
                "No model given. Name the model to generate with, e.g. gpt-4o-mini, claude-sonnet-4-5 or llama3.2."
            )
        llm_clients.check_base_url(self.base_url)
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
