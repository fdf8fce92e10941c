"""Chat templates and tokens: the built-in templates, rendering a conversation, the spans of the assistant replies
that are trained, and tokenizing rendered rows with their loss masks."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import template_sandbox
from dataset_formats import as_text, row_to_messages
from workspace import UserError

log = logging.getLogger(__name__)

# Longer than any row: rows are tokenized whole, to see what a cut at max_seq_length loses.
UNCUT = 1 << 30

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


# Templates typed by a user in this process: rendered by template_sandbox (a child process under limits), never here.
_USER_TEMPLATES: set[str] = set()


def ensure_chat_template(tokenizer, chat_template: str = "") -> None:
    """Give the tokenizer the chosen template; refuse a model with none unless one is chosen."""
    if chat_template:
        if chat_template not in BUILTIN_TEMPLATES:
            _USER_TEMPLATES.add(chat_template)
        tokenizer.chat_template = BUILTIN_TEMPLATES.get(chat_template, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("This model has no chat template. Choose one (e.g. chatml) in the Dataset tab (chat_template).")
    try:
        render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer)
    except template_sandbox.TemplateLimitError:
        raise
    except Exception as exc:  # jinja2 raises several types; a broken template must not fail every row later
        raise UserError(
            f"The chat template cannot be rendered ({type(exc).__name__}: {exc}). Fix it or choose "
            "another (e.g. chatml)."
        ) from None


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it; a user's template renders in the sandbox."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template in _USER_TEMPLATES:
        return template_sandbox.render(template, tokenizer.special_tokens_map, messages, add_generation_prompt)
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
