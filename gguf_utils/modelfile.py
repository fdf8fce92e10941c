"""The Ollama Modelfile of an export: FROM, a TEMPLATE that renders like the model's chat template, stop tokens and
PARAMETERs.

The TEMPLATE is Go text/template over Ollama's `.Messages`, built from the chat template's per-role pieces
(`dataset_render.chat_turns`). It is checked without a Go interpreter: `render_turns` joins the same pieces in the
order the TEMPLATE does, and must give what the chat template itself renders for sample chats.
tests/golden/ pins the Go text for ChatML, Llama 3 and Qwen; Gemma's template has no per-role shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dataset_render import ChatTurns, chat_turns
from workspace import read_json

log = logging.getLogger(__name__)

# The chats a TEMPLATE must render exactly like the chat template: with and without a system message, after one
# and after several turns.
SAMPLE_CHATS = (
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ],
)


def hf_chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt as the tokenizer's chat template renders it where Ollama would use the TEMPLATE: with a generation
    prompt after a user turn."""
    return _render_plain(tokenizer, messages, generation=messages[-1]["role"] != "assistant")


def _render_plain(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tokenizer.bos_token
    # A tokenizer that adds BOS itself converts to a GGUF that does too, so the template must not write it again.
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def template_turns(tokenizer) -> ChatTurns | None:
    """The chat template's per-role pieces as the TEMPLATE needs them (without the BOS the GGUF adds itself)."""
    return chat_turns(tokenizer, _render_plain)


def go_template(turns: ChatTurns) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) that renders like the chat template."""
    pieces = [turns.default_system, *turns.system, *turns.user, *turns.assistant, turns.generation]
    if any("{{" in piece or '"""' in piece for piece in pieces):
        raise ValueError("the chat template's text contains '{{' or '\"\"\"', which a TEMPLATE cannot hold")
    default = f'{{{{ if and (eq $i 0) (ne .Role "system") }}}}{turns.default_system}{{{{ end }}}}'
    return (
        "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + (default if turns.default_system else "")
        + f'{{{{ if eq .Role "system" }}}}{turns.system[0]}{{{{ .Content }}}}{turns.system[1]}'
        + f'{{{{ else if eq .Role "user" }}}}{turns.user[0]}{{{{ .Content }}}}{turns.user[1]}'
        + f"{{{{ if $last }}}}{turns.generation}{{{{ end }}}}"
        + f'{{{{ else if eq .Role "assistant" }}}}{turns.assistant[0]}{{{{ .Content }}}}'
        + f"{{{{ if not $last }}}}{turns.assistant[1]}{{{{ end }}}}"
        + "{{ end }}{{ end }}"
    )


def render_turns(turns: ChatTurns, messages: list[dict[str, str]]) -> str:
    """What go_template's TEMPLATE renders for `messages`: the same pieces, joined in the same order."""
    parts = []
    for index, message in enumerate(messages):
        role, content, last = message["role"], message["content"], index == len(messages) - 1
        if index == 0 and role != "system":
            parts.append(turns.default_system)
        if role == "system":
            parts += [turns.system[0], content, turns.system[1]]
        elif role == "user":
            parts += [turns.user[0], content, turns.user[1], turns.generation if last else ""]
        elif role == "assistant":
            parts += [turns.assistant[0], content, "" if last else turns.assistant[1]]
    return "".join(parts)


def chat_format(tokenizer) -> dict[str, Any]:
    """What the Modelfile needs from the tokenizer: an Ollama TEMPLATE that renders exactly like the chat template
    on the sample chats (None, with the reason in "note", when it cannot) and the stop tokens."""
    template, note = None, ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    turns = template_turns(tokenizer) if has_template else None
    if not has_template:
        note = "the tokenizer has no chat template"
    elif turns is None:
        note = "the chat template does not render each role (system included) as fixed text around the message"
    elif any(render_turns(turns, chat) != hf_chat_prompt(tokenizer, chat) for chat in SAMPLE_CHATS):
        note = "the chat template's pieces, joined per message, do not give what the chat template renders"
    else:
        try:
            template = go_template(turns)
        except ValueError as exc:
            note = str(exc)
    if template is None:
        log.warning("No Ollama TEMPLATE: %s; Ollama will use its own guess.", note)
    # Stop at the special tokens that end a reply or start the next turn, and at EOS.
    stops: list[str] = []
    for piece in ([turns.assistant[1], turns.user[0]] if template else []) + [tokenizer.eos_token or ""]:
        found = sorted((piece.find(token), token) for token in tokenizer.all_special_tokens if token and token in piece)
        stops += [token for _, token in found if token not in stops]
    return {"template": template, "stops": stops, "note": note}


def build_modelfile(
    gguf_name: str,
    chat: dict[str, Any],
    model_dir: Path,
    temperature: float,
    top_p: float,
    num_ctx: int,
    adapter: str | None = None,
) -> tuple[str, dict]:
    """An Ollama Modelfile for `gguf_name` (FROM, ADAPTER when given, TEMPLATE, stop tokens, PARAMETERs) and what
    it holds.

    num_ctx is capped at the model's own context length (config.json in `model_dir`)."""
    max_length = int((read_json(Path(model_dir) / "config.json", {}) or {}).get("max_position_embeddings") or num_ctx)
    lines = [
        "# Ollama Modelfile written by LLM Finetuner. Create the model in this folder with: ollama create NAME -f "
        + ("Modelfile.lora" if adapter else "Modelfile"),
        f"FROM ./{gguf_name}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if chat["template"]:
        lines.append(f'TEMPLATE """{chat["template"]}"""')
    else:
        # Reference caches written before the note existed have none.
        reason = chat.get("note") or "the chat template could not be written as one"
        lines.append(
            f"# No TEMPLATE: {reason}. Ollama then uses the template it detects from the GGUF's chat template, "
            "if it knows it, else none; check replies with `ollama run` or add a TEMPLATE here.",
        )
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in chat["stops"]]
    lines += [
        f"PARAMETER temperature {temperature}",
        f"PARAMETER top_p {top_p}",
        f"PARAMETER num_ctx {min(num_ctx, max_length)}",
    ]
    info = {"file": "Modelfile", "from": gguf_name, "template": bool(chat["template"]), "stop": chat["stops"]}
    if adapter:
        info.update(file="Modelfile.lora", adapter=adapter)
    return "\n".join(lines) + "\n", info
