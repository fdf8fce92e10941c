"""Inference: streaming chat from a base model, a run's adapter, its merged model or its exported GGUF (llama.cpp);
base-vs-tuned comparison with one model in memory (the LoRA adapter merged into the weights in place for the tuned
side and taken out again for the base side, through lora_weights). Held-out evaluation is in evaluation.py."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lora_weights
import runfolder
import stages
from lora_weights import BASE_ADAPTER, TUNED_ADAPTER
from settings import check, option
from workspace import UserError

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How a reply is generated."""

    system_prompt: str = option(
        "", help="Added as a system turn when the conversation has none.", label="System prompt"
    )
    # Greedy by default: base and tuned then differ by their weights, not by the dice; sampling is on request.
    temperature: float = option(
        0.0,
        help="0 = greedy (always the most likely token, the same reply each time); higher samples more varied replies.",
        minimum=0,
        maximum=2,
        label="Temperature",
    )
    top_p: float = option(
        0.9,
        help="Sample only from the most likely tokens whose probabilities add up to this.",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        label="Top-p",
    )
    max_new_tokens: int = option(256, help="The longest reply, in tokens.", minimum=1, label="Max new tokens")

    def validate(self) -> None:
        check(self)


@dataclass
class ChatModel:
    """One model in memory: base weights, plus the run's LoRA adapter (switched off for "base") or its merged model."""

    model: Any  # a PeftModel when kind == "adapter"; a llama_cpp.Llama when kind == "gguf"
    tokenizer: Any  # None for a GGUF (llama.cpp tokenizes with the file's own vocabulary and chat template)
    name: str  # what the UI shows, e.g. "demo + trained"
    base_model: str  # the base model's name or path
    run: str | None  # the run folder whose adapter/, merged/ or gguf/ file is loaded
    kind: str  # "base", "adapter" (LoRA, can be toggled), "merged" (full fine-tune) or "gguf" (an exported file)
    backend: str  # "unsloth", "transformers" or "llama.cpp"
    max_length: int  # the model's context length in tokens
    static_cache: bool = False  # decode with a static KV cache (transformers compiles the step then, on CUDA)
    # Switching the adapter off changes the shared model, so generations take turns.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Merge the LoRA into the weights for the tuned side: on CUDA a token's cost is mostly kernel launches, and
    # the adapter's own matmuls add three per layer; on the CPU they cost little and a merge takes seconds.
    merge_lora: bool = False
    merged: bool = False  # whether the LoRA is merged into the base weights now (the tuned side)
    # The LoRA-wrapped layers' own weights, kept on the host from the first merge on, to take the merge out again.
    base_weights: dict[str, Any] | None = field(default=None, repr=False)
    # The adapter's LoRA layers once PEFT's wrappers are out of the model (load_for_chat on CUDA): the forward is the
    # plain transformers model, which compiles whole, and a side is switched by merging or restoring weights only.
    lora_layers: list[tuple[str, Any]] | None = field(default=None, repr=False)
    cache_tokens: int = 0  # the static KV cache's length: one size for every reply, so the compiled step is reused
    # Every generate runs on this one thread: the compiled step's CUDA graphs are recorded per thread, so a new
    # thread per reply would record them again.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="generate"), repr=False
    )

    @property
    def has_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def wrapped(self) -> bool:
        """Whether the adapter is a PEFT wrapper in the forward (switched off with disable_adapter for the base)."""
        return self.has_adapter and self.lora_layers is None


# ---------------------------------------------------------------- runs


def trained_run(run: str | Path, workspace: str | Path | None = None):
    """(the run's TrainedModel, the TrainConfig it was trained with); UserError for a run without a trained model."""
    from train_config import train_config_from_dict

    trained = stages.causal_lm(runfolder.run_path(run, workspace))
    return trained, train_config_from_dict(trained.train_config)


# ---------------------------------------------------------------- loading


def load_chat_model(
    model: str | None = None,
    run: str | None = None,
    workspace: str | Path | None = None,
    gguf: str | None = None,
    static_cache: bool | None = None,
    backend: str | None = None,
) -> ChatModel:
    """Load a model for chat: `model` ("demo", a Hub id or a local folder) plus the adapter or merged model of `run`,
    or (gguf: a file name in the run's gguf/ folder, or a path) the GGUF file the run exported, through llama.cpp.

    model: None or "" means the run's base model (from its train config), or the demo model when no run is given.
    static_cache: None picks it where it pays (CUDA, transformers backend); True / False force it (the bench).
    backend: None picks Unsloth where it is installed on CUDA (select_backend); "transformers" keeps Unsloth out
    (on CUDA a model whose bf16 weights do not fit the card's free memory loads in 4-bit through bitsandbytes).
    """
    import model_utils

    if gguf:
        return _load_gguf(gguf, run, workspace)
    backend = backend or model_utils.select_backend()  # first: Unsloth must be imported before transformers/peft
    run_dir = output_dir = None
    trust_remote_code = load_in_4bit = False
    if run:
        trained, train_config = trained_run(run, workspace)
        run_dir, output_dir = trained.run_dir, trained.path
        model = model or train_config.model.name_or_path
        trust_remote_code, load_in_4bit = train_config.model.trust_remote_code, train_config.load_in_4bit
        # Resolve names like "demo" in the workspace the run was trained in, as training did.
        workspace = runfolder.run_workspace(run_dir)
    model = model or model_utils.DEMO_MODEL
    kind = "base" if output_dir is None else output_dir.name
    model_path = model_utils.resolve_model_path(model, workspace)
    weights_path = str(output_dir) if kind == "merged" else model_path
    log.info("loading %s for chat (%s backend)", weights_path, backend)
    if backend == "unsloth":
        loaded = _load_unsloth(weights_path, output_dir if kind == "adapter" else None, load_in_4bit, trust_remote_code)
    else:
        too_large = _bf16_too_large(weights_path)
        if too_large:
            log.info("chat: %s", too_large)
            loaded = _load_4bit(weights_path, trust_remote_code)
        else:
            loaded = model_utils.load_model(weights_path, trust_remote_code)
        if kind == "adapter":
            loaded = _attach_adapter(loaded, output_dir, model, train_config.model.name_or_path, run_dir.name)
    tokenizer = model_utils.load_tokenizer(str(output_dir or model_path), trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        from dataset_utils import CHATML_TEMPLATE

        log.warning("%s has no chat template; using ChatML", model)
        tokenizer.chat_template = CHATML_TEMPLATE
    name = model if run_dir is None else f"{model} + {run_dir.name}"
    max_length = int(getattr(loaded.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    if static_cache is None:
        static_cache = backend == "transformers" and _static_cache_supported(loaded)
    chat_model = ChatModel(
        loaded, tokenizer, name, model, str(run_dir) if run_dir else None, kind, backend, max_length, static_cache
    )
    chat_model.merge_lora = kind == "adapter" and loaded.device.type == "cuda"
    return chat_model


def _load_4bit(weights_path: str, trust_remote_code: bool):
    """The base in NF4 through bitsandbytes (as QLoRA trains it), for a model whose bf16 weights do not fit the card."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        weights_path, quantization_config=quantization, trust_remote_code=trust_remote_code, device_map="cuda"
    )
    return model.eval()


def _static_cache_supported(model) -> bool:
    """A static KV cache (and the compiled decoding step transformers builds over it) needs CUDA and a model class
    that supports it; Unsloth's own fast decoding path keeps its dynamic cache."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        torch.cuda.is_available()
        and model.device.type == "cuda"
        and bool(getattr(inner, "_can_compile_fullgraph", False) or getattr(inner, "_supports_static_cache", False))
    )


# The static KV cache's length for chat: one size for every reply (a longer conversation grows it once, and the
# decoding step is compiled again). 4,096 tokens of an 8B model's cache take 0.5 GiB.
CHAT_CACHE_TOKENS = 4096
# Of the card's free memory, what the bf16 weights may take: the rest holds the KV cache and the activations.
BF16_SHARE = 0.85


def load_for_chat(
    model: str | None = None,
    run: str | None = None,
    workspace: str | Path | None = None,
    gguf: str | None = None,
    status: Callable[[str], None] | None = None,
    compile_step: bool = True,
) -> ChatModel:
    """The model for chatting (the Test tab's worker, `main.py chat`), loaded for the fastest decoding here.

    On CUDA: transformers in bf16 with the run's LoRA taken out of PEFT's wrappers (the tuned side merges it into the
    weights, the base side restores them bit for bit), a static KV cache and the decoding step that transformers
    compiles over it, warmed up here so that compiling never happens inside a reply. Unsloth's own decoding path and
    PEFT's wrappers measured a fifth of that speed (bench/chat_bench.py). Elsewhere load_chat_model as it is.
    status: called with a line the tab shows while loading and warming up.
    compile_step: False skips the static cache and its compilation (tens of seconds), for a single short reply."""
    import model_utils

    status = status or (lambda message: None)
    if gguf or not model_utils.detect_device().cuda:
        status("Loading the model…")
        return load_chat_model(model, run, workspace, gguf=gguf, backend="transformers" if not gguf else None)
    status("Loading the model onto the GPU…")
    chat_model = load_chat_model(model, run, workspace, backend="transformers")
    if chat_model.kind == "adapter" and _can_unwrap(chat_model):
        _unwrap_adapter(chat_model)
    chat_model.static_cache = chat_model.static_cache and compile_step
    if chat_model.static_cache:
        status(f"Warming up: compiling the decoding step for {model_utils.detect_device().name} (once per load)…")
        _warm_up(chat_model)
    return chat_model


def _bf16_too_large(weights_path: str) -> str:
    """Why the weights must load in 4-bit on CUDA (their bf16 size does not fit the card's free memory), or ""."""
    import torch

    import model_utils

    if not model_utils.detect_device().cuda:
        return ""
    try:
        parameters, _ = model_utils.count_parameters(weights_path)
    except (UserError, OSError, ValueError):
        return ""  # the load itself reports what is wrong
    free, _ = torch.cuda.mem_get_info()
    needed = 2 * parameters
    if needed <= BF16_SHARE * free:
        return ""
    return f"bf16 weights {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on the GPU: loading in 4-bit"


def _can_unwrap(chat_model: ChatModel) -> bool:
    layers = list(lora_weights.lora_layers(chat_model.model))
    return bool(layers) and lora_weights.mergeable(layers)


def _unwrap_adapter(chat_model: ChatModel) -> None:
    """Take PEFT's wrappers out of the model, keeping its LoRA layers aside for merging."""
    chat_model.lora_layers = list(lora_weights.lora_layers(chat_model.model))
    chat_model.model = chat_model.model.unload()  # the base layers back in place, nothing merged
    chat_model.merge_lora = True


def _warm_up(chat_model: ChatModel) -> None:
    """Compile the decoding step and record its CUDA graphs (the first two calls) before any reply; a model the
    installed stack cannot compile decodes with its dynamic cache instead."""
    chat_model.cache_tokens = min(CHAT_CACHE_TOKENS, chat_model.max_length)
    config = GenerationConfig(temperature=0, max_new_tokens=8)
    prompt = _prompt_ids(chat_model, [{"role": "user", "content": "Hello"}], config)
    started = time.monotonic()
    try:
        for _ in range(2):
            for _ in _stream_rows(chat_model, prompt, config, ["tuned" if chat_model.has_adapter else "base"]):
                pass
    except Exception:  # noqa: BLE001 (torch.compile raises many types; decoding still works without it)
        log.exception("compiling the decoding step failed: decoding with a dynamic cache")
        chat_model.static_cache = False
        return
    log.info("decoding step compiled and warmed up in %.1f s", time.monotonic() - started)


def gguf_files(run: str | None, workspace: str | Path | None = None) -> list[str]:
    """The GGUF files a run exported (names in its gguf/ folder), smallest first; [] for none or no run."""
    if not run:
        return []
    try:
        folder = runfolder.run_path(run, workspace) / "gguf"
    except UserError:
        return []
    files = [path for path in folder.glob("*.gguf") if not path.name.startswith(".")] if folder.is_dir() else []
    return [path.name for path in sorted(files, key=lambda path: (path.stat().st_size, path.name))]


def _load_gguf(gguf: str, run: str | None, workspace: str | Path | None) -> ChatModel:
    """The exported file itself through llama.cpp, with the chat template the file carries (what Ollama and
    llama.cpp will use once it is shipped)."""
    import os

    from llama_cpp import Llama

    path = Path(gguf).expanduser()
    run_dir = runfolder.run_path(run, workspace) if run else None
    if not path.is_absolute() and run_dir is not None:
        path = run_dir / "gguf" / gguf
    if not path.is_file():
        where = (
            f"run '{run_dir.name}' has " + (", ".join(gguf_files(str(run_dir))) or "no GGUF files") if run_dir else ""
        )
        raise UserError(f"GGUF file '{gguf}' not found{'; ' + where if where else ''}. Export the run first.")
    log.info("loading %s for chat (llama.cpp)", path)
    try:
        llm = Llama(model_path=str(path), n_ctx=0, n_threads=max(1, len(os.sched_getaffinity(0))), verbose=False)
    except ValueError as exc:
        raise UserError(f"llama.cpp could not load '{path.name}': {exc}. Export the run again.") from None
    # n_ctx=0 means the file's training context; a large one would reserve a large KV cache for a short chat.
    if llm.n_ctx() > 8192:
        llm = Llama(model_path=str(path), n_ctx=8192, n_threads=llm.n_threads, verbose=False)
    name = path.name if run_dir is None else f"{run_dir.name} / {path.name}"
    return ChatModel(llm, None, name, path.name, str(run_dir) if run_dir else None, "gguf", "llama.cpp", llm.n_ctx())


def _attach_adapter(base, adapter_dir: Path, model: str, trained_on: str, run_name: str):
    from peft import PeftModel

    try:
        tuned = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=TUNED_ADAPTER, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = next((line for line in lines if "size mismatch" in line), lines[0])[:300]
        raise UserError(
            f"The adapter of run '{run_name}' was trained on '{trained_on}' and does not fit model '{model}'; "
            f"choose '{trained_on}' (or leave the model empty). ({detail})"
        ) from None
    tuned.eval()
    return tuned


def _load_unsloth(weights_path: str, adapter_dir: Path | None, load_in_4bit: bool, trust_remote_code: bool):
    """Unsloth's fast inference path (CUDA): base in bf16 (or 4-bit for a QLoRA run), the adapter on top."""
    from peft import PeftModel
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=weights_path, dtype=None, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=TUNED_ADAPTER, is_trainable=False)
    FastLanguageModel.for_inference(model)
    return model


# ---------------------------------------------------------------- streaming generation


def stream_chat(
    chat_model: ChatModel, messages: list[dict], config: GenerationConfig, use_adapter: bool = True
) -> Iterator[str]:
    """Yield the reply so far (the whole text each time), token by token.

    use_adapter=False answers with the base model (the run's adapter switched off).
    """
    text = ""
    for piece in chat_deltas(chat_model, messages, config, use_adapter):
        text += piece
        yield text


def chat_deltas(
    chat_model: ChatModel, messages: list[dict], config: GenerationConfig, use_adapter: bool = True
) -> Iterator[str]:
    """Yield the reply's new text as it is generated (each piece once; joined they are the whole reply)."""
    config.validate()
    if not use_adapter and chat_model.kind in ("merged", "gguf"):
        what = "a full fine-tune" if chat_model.kind == "merged" else "an exported GGUF file (merged weights)"
        raise UserError(
            f"This is {what}: its base weights are not in memory. Load the base model on its own to chat with it."
        )
    if chat_model.kind == "gguf":
        yield from _gguf_deltas(chat_model, messages, config)
        return
    prompt_ids = _prompt_ids(chat_model, messages, config)
    side = "tuned" if use_adapter and chat_model.has_adapter else "base"
    for pieces in _stream_rows(chat_model, prompt_ids, config, sides=[side]):
        yield pieces[0]


def compare_deltas(chat_model: ChatModel, prompt: str, config: GenerationConfig) -> Iterator[tuple[str, str]]:
    """The same prompt through the base model (adapter off) and the tuned one: the new text as (base piece, tuned
    piece) pairs, one side or both non-empty."""
    config.validate()
    check_can_compare(chat_model)
    messages = [{"role": "user", "content": prompt}]
    if (
        chat_model.backend == "unsloth"
        or chat_model.static_cache
        or lora_weights.uses_dora(_adapter_layers(chat_model))
    ):
        # Unsloth's fused LoRA kernels bypass PEFT's per-row adapter choice, PEFT refuses a per-row choice for DoRA,
        # and a static cache is built for one row: the two sides run one after the other, each at the base model's
        # speed (adapter merged or out).
        for piece in chat_deltas(chat_model, messages, config, use_adapter=False):
            yield piece, ""
        for piece in chat_deltas(chat_model, messages, config, use_adapter=True):
            yield "", piece
        return
    prompt_ids = _prompt_ids(chat_model, messages, config)
    # One batch of two rows: PEFT applies the adapter to the second row only, so both sides decode in one pass.
    pairs = _stream_rows(chat_model, prompt_ids, config, sides=["lora-base", "lora-tuned"])
    yield from (tuple(pair) for pair in pairs)


def check_can_compare(chat_model: ChatModel) -> None:
    """UserError unless the model has a LoRA adapter that can be switched off for the base side."""
    if chat_model.kind == "base":
        raise UserError("Comparing base and tuned needs a training run: choose a run whose adapter to load.")
    if chat_model.kind == "merged":
        raise UserError(
            "This run is a full fine-tune (merged weights), so base and tuned cannot share one model in "
            "memory; chat with the base model and the run separately."
        )
    if chat_model.kind == "gguf":
        raise UserError(
            "A GGUF file holds the merged weights only, so it has no base side to compare with; choose the run's "
            "PyTorch weights (adapter) to compare base and tuned."
        )


def _prompt_ids(chat_model: ChatModel, messages: list[dict], config: GenerationConfig) -> list[int]:
    """The conversation rendered with the chat template, ending where the assistant's reply starts."""
    from dataset_utils import render_chat

    messages = _checked_messages(messages, config)
    text = render_chat(messages, chat_model.tokenizer, add_generation_prompt=True)
    ids = chat_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    _check_length(chat_model, len(ids))
    return ids


def _checked_messages(messages: list[dict], config: GenerationConfig) -> list[dict]:
    """The conversation as plain role/content turns, with the system prompt added when it has none."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise UserError("The conversation must end with a user message; type a message.")
    if not str(messages[-1].get("content") or "").strip():
        raise UserError("The prompt is empty; type a message first.")
    messages = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
    if config.system_prompt.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": config.system_prompt.strip()})
    return messages


def _check_length(chat_model: ChatModel, tokens: int) -> None:
    if tokens >= chat_model.max_length:
        raise UserError(
            f"The conversation is {tokens} tokens long, at or above this model's limit of "
            f"{chat_model.max_length}; start a new chat or shorten the messages."
        )


class Detokenizer:
    """Turns one row's tokens into new text as they arrive, decoding only the last few tokens each time (the
    window since the last complete character), so a token costs the same at the end of a long reply as at its
    start. A character split over several tokens decodes as U+FFFD until its last byte arrives: it waits for it,
    so the pieces joined are the reply's full decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: decoding from a token boundary keeps leading spaces right
        self.read = 0  # the tokens before this are already shown

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        decode = self.tokenizer.decode
        shown = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(shown) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown) :]


def _set_side(chat_model: ChatModel, side: str) -> None:
    """Put the shared model's weights in the state a side needs (called under chat_model.lock).

    "tuned": the LoRA merged into the base weights in place (no adapter matmuls per token); "base": the base
    weights as loaded; "lora-…": the base weights with the adapter unmerged, for PEFT's per-row choice. Without
    merge_lora (the CPU, a 4-bit base) the tuned side keeps the adapter's own matmuls."""
    if not chat_model.has_adapter:
        return
    want_merged = side == "tuned" and _merges(chat_model)
    layers = _adapter_layers(chat_model)
    if want_merged and not chat_model.merged:
        if chat_model.base_weights is None:
            chat_model.base_weights = lora_weights.host_copy(layers)
        lora_weights.merge_in_place(layers)
        chat_model.merged = True
    elif not want_merged and chat_model.merged:
        lora_weights.restore(layers, chat_model.base_weights)
        chat_model.merged = False


def _adapter_layers(chat_model: ChatModel) -> list[tuple[str, Any]]:
    """The adapter's LoRA layers: kept aside once unwrapped, else found in the model."""
    return (
        chat_model.lora_layers
        if chat_model.lora_layers is not None
        else list(lora_weights.lora_layers(chat_model.model))
    )


def _merges(chat_model: ChatModel) -> bool:
    """Whether the tuned side merges the adapter in place: asked for, and the layers can take it."""
    return chat_model.merge_lora and lora_weights.mergeable(_adapter_layers(chat_model))


def _stream_rows(
    chat_model: ChatModel, prompt_ids: list[int], config: GenerationConfig, sides: list[str]
) -> Iterator[list[str]]:
    """Run `generate` on the model's generate thread over one copy of the prompt per side; yield each row's new
    text per token.

    sides: "base" / "tuned" (one row; the LoRA out of or merged into the weights, the adapter's own matmuls off),
    or "lora-base" + "lora-tuned" (two rows; PEFT applies the adapter to the second row only).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class TokenQueue(BaseStreamer):
        """Hands every decoding step's tokens (one per row) from the generate thread to this generator."""

        def __init__(self) -> None:
            self.steps: queue.Queue[list[int] | None] = queue.Queue()
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate passes the prompt first
                self.prompt_seen = True
                return
            self.steps.put(value.reshape(-1).tolist())

        def end(self) -> None:
            self.steps.put(None)

    model, tokenizer = chat_model.model, chat_model.tokenizer
    rows = len(sides)
    stop = threading.Event()
    streamer = TokenQueue()
    failure: list[BaseException] = []
    input_ids = torch.tensor([prompt_ids] * rows, device=model.device)
    # The answers, made once: a new tensor each step would cost a kernel launch per token.
    go_on, halt = (torch.full((rows,), flag, dtype=torch.bool, device=model.device) for flag in (False, True))

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return halt if stop.is_set() else go_on

    stop_ids = _stop_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
        max_new_tokens=min(config.max_new_tokens, chat_model.max_length - len(prompt_ids)),
        pad_token_id=tokenizer.pad_token_id,
        # Generation ends at any token that ends the reply, the tokenizer's end of turn included: a model whose
        # generation config names another EOS would otherwise decode on, unseen, to max_new_tokens.
        eos_token_id=sorted(stop_ids),
        **_sampling(config),
    )
    if chat_model.static_cache and rows == 1:
        kwargs["cache_implementation"] = "static"  # transformers compiles the decoding step over it on CUDA
        if chat_model.cache_tokens:
            kwargs["max_cache_len"] = chat_model.cache_tokens  # the size it was compiled for (load_for_chat)
    if sides[0].startswith("lora-"):
        kwargs["adapter_names"] = [BASE_ADAPTER if side == "lora-base" else TUNED_ADAPTER for side in sides]
    # Merged or base weights answer with the adapter's own matmuls switched off; "tuned" on a 4-bit base keeps them.
    # Unwrapped (load_for_chat on CUDA), the model has no adapter matmuls to switch off.
    disable = chat_model.wrapped and (sides == ["base"] or (sides == ["tuned"] and _merges(chat_model)))

    def generate() -> None:
        try:
            with chat_model.lock, torch.inference_mode():
                _set_side(chat_model, sides[0] if rows == 1 else "lora")
                with model.disable_adapter() if disable else contextlib.nullcontext():
                    model.generate(**kwargs)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            failure.append(exc)
        finally:
            streamer.end()

    decoders = [Detokenizer(tokenizer) for _ in range(rows)]
    finished = [False] * rows
    done = chat_model.executor.submit(generate)
    try:
        while (step := streamer.steps.get()) is not None:
            pieces = [""] * rows
            for row, token in enumerate(step):
                if finished[row] or token in stop_ids:
                    finished[row] = True
                    continue
                pieces[row] = decoders[row].add(token)
            if any(pieces):
                yield pieces
        if failure:
            raise failure[0]
        pieces = [decoder.flush() for decoder in decoders]
        if any(pieces):
            yield pieces
    finally:
        stop.set()
        done.result()


def _gguf_deltas(chat_model: ChatModel, messages: list[dict], config: GenerationConfig) -> Iterator[str]:
    """llama.cpp's streamed chat completion over the file's own chat template."""
    messages = _checked_messages(messages, config)
    sampling = {"temperature": 0.0} if config.temperature == 0 else {"temperature": config.temperature}
    try:
        chunks = chat_model.model.create_chat_completion(
            messages=messages, stream=True, max_tokens=config.max_new_tokens, top_p=config.top_p, **sampling
        )
        with chat_model.lock:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content") or ""
                if piece:
                    yield piece
    except ValueError as exc:
        if "exceed context window" in str(exc):
            raise UserError(
                f"The conversation is longer than this GGUF's context of {chat_model.max_length} tokens; start a "
                "new chat or shorten the messages."
            ) from None
        raise


def _sampling(config: GenerationConfig) -> dict[str, Any]:
    if config.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": float(config.temperature), "top_p": float(config.top_p)}


def _stop_token_ids(model, tokenizer) -> set[int]:
    """Tokens that end a reply: the model's generation eos ids and the tokenizer's eos."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
