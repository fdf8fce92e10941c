"""Inference: streaming chat from a base model, a run's adapter or its merged model; base-vs-tuned comparison with
one model in memory (the LoRA adapter toggled); held-out loss and perplexity of base vs tuned on a run's eval split."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runfolder
from settings import check, option
from workspace import UserError, atomic_write_text, write_json

log = logging.getLogger(__name__)

# PEFT's name for "no adapter" in a mixed batch (adapter_names), and the name PeftModel.from_pretrained gives ours.
BASE_ADAPTER = "__base__"
TUNED_ADAPTER = "default"


@dataclass
class GenerationConfig:
    """How a reply is generated."""

    system_prompt: str = option(
        "", help="Added as a system turn when the conversation has none.", label="System prompt"
    )
    temperature: float = option(
        0.7,
        help="0 = greedy (always the most likely token); higher gives more varied replies.",
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

    model: Any  # a PeftModel when kind == "adapter"
    tokenizer: Any
    name: str  # what the UI shows, e.g. "demo + trained"
    base_model: str  # the base model's name or path
    run: str | None  # the run folder whose adapter/ or merged/ is loaded
    kind: str  # "base", "adapter" (LoRA, can be toggled) or "merged" (full fine-tune)
    backend: str  # "unsloth" or "transformers"
    max_length: int  # the model's context length in tokens
    # Switching the adapter off changes the shared model, so generations take turns.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def has_adapter(self) -> bool:
        return self.kind == "adapter"


# ---------------------------------------------------------------- runs


def trained_run(run: str | Path, workspace: str | Path | None = None):
    """(the run's TrainedModel, the TrainConfig it was trained with); UserError for a run without a trained model."""
    import training_utils

    trained = runfolder.trained_model(runfolder.run_path(run, workspace))
    return trained, training_utils.train_config_from_dict(trained.train_config)


# ---------------------------------------------------------------- loading


def load_chat_model(model: str | None = None, run: str | None = None, workspace: str | Path | None = None) -> ChatModel:
    """Load a model for chat: `model` ("demo", a Hub id or a local folder) plus the adapter or merged model of `run`.

    model: None or "" means the run's base model (from its train config), or the demo model when no run is given.
    """
    import model_utils

    backend = model_utils.select_backend()  # first: Unsloth must be imported before transformers/peft
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
    return ChatModel(loaded, tokenizer, name, model, str(run_dir) if run_dir else None, kind, backend, max_length)


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
    config.validate()
    if not use_adapter and chat_model.kind == "merged":
        raise UserError(
            "This run is a full fine-tune: its base weights are not in memory. Load the base model "
            "on its own to chat with it."
        )
    prompt_ids = _prompt_ids(chat_model, messages, config)
    disable = not use_adapter and chat_model.has_adapter
    for texts in _stream_rows(chat_model, prompt_ids, config, rows=1, disable_adapter=disable):
        yield texts[0]


def stream_compare(chat_model: ChatModel, prompt: str, config: GenerationConfig) -> Iterator[tuple[str, str]]:
    """The same prompt through the base model (adapter off) and the tuned one; yields (base_so_far, tuned_so_far)."""
    config.validate()
    check_can_compare(chat_model)
    messages = [{"role": "user", "content": prompt}]
    if chat_model.backend == "unsloth":
        # Unsloth's fused LoRA kernels bypass PEFT's per-row adapter choice, so run the two sides one after the other.
        base = ""
        for base in stream_chat(chat_model, messages, config, use_adapter=False):
            yield base, ""
        for tuned in stream_chat(chat_model, messages, config, use_adapter=True):
            yield base, tuned
        return
    prompt_ids = _prompt_ids(chat_model, messages, config)
    # One batch of two rows: PEFT applies the adapter to the second row only, so both sides decode in one pass.
    for base, tuned in _stream_rows(
        chat_model, prompt_ids, config, rows=2, disable_adapter=False, adapter_names=[BASE_ADAPTER, TUNED_ADAPTER]
    ):
        yield base, tuned


def check_can_compare(chat_model: ChatModel) -> None:
    """UserError unless the model has a LoRA adapter that can be switched off for the base side."""
    if chat_model.kind == "base":
        raise UserError("Comparing base and tuned needs a training run: choose a run whose adapter to load.")
    if chat_model.kind == "merged":
        raise UserError(
            "This run is a full fine-tune (merged weights), so base and tuned cannot share one model in "
            "memory; chat with the base model and the run separately."
        )


def _prompt_ids(chat_model: ChatModel, messages: list[dict], config: GenerationConfig) -> list[int]:
    """The conversation rendered with the chat template, ending where the assistant's reply starts."""
    from dataset_utils import render_chat

    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise UserError("The conversation must end with a user message; type a message.")
    if not str(messages[-1].get("content") or "").strip():
        raise UserError("The prompt is empty; type a message first.")
    messages = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
    if config.system_prompt.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": config.system_prompt.strip()})
    text = render_chat(messages, chat_model.tokenizer, add_generation_prompt=True)
    ids = chat_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) >= chat_model.max_length:
        raise UserError(
            f"The conversation is {len(ids)} tokens long, at or above this model's limit of "
            f"{chat_model.max_length}; start a new chat or shorten the messages."
        )
    return ids


def _stream_rows(
    chat_model: ChatModel,
    prompt_ids: list[int],
    config: GenerationConfig,
    rows: int,
    disable_adapter: bool,
    adapter_names: list[str] | None = None,
) -> Iterator[list[str]]:
    """Run `generate` in a thread over `rows` copies of the prompt; yield each row's decoded reply after each token."""
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

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    model, tokenizer = chat_model.model, chat_model.tokenizer
    stop = threading.Event()
    streamer = TokenQueue()
    failure: list[BaseException] = []
    input_ids = torch.tensor([prompt_ids] * rows, device=model.device)
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
        max_new_tokens=min(config.max_new_tokens, chat_model.max_length - len(prompt_ids)),
        pad_token_id=tokenizer.pad_token_id,
        **_sampling(config),
    )
    if adapter_names:
        kwargs["adapter_names"] = adapter_names

    def generate() -> None:
        try:
            with chat_model.lock, torch.inference_mode():
                with model.disable_adapter() if disable_adapter else contextlib.nullcontext():
                    model.generate(**kwargs)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            failure.append(exc)
        finally:
            streamer.end()

    stop_ids = _stop_token_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    shown = [""] * rows
    worker = threading.Thread(target=generate, name="generate", daemon=True)
    worker.start()
    try:
        while (step := streamer.steps.get()) is not None:
            for row, token in enumerate(step):
                if finished[row] or token in stop_ids:
                    finished[row] = True
                    continue
                generated[row].append(token)
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
            # A character split over several tokens decodes as U+FFFD until its last byte arrives: wait for it,
            # so each text shown is a prefix of the next.
            if texts != shown and not any(text.endswith("\ufffd") for text in texts):
                shown = texts
                yield list(shown)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
        if texts != shown:
            yield texts
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]


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


# ---------------------------------------------------------------- held-out evaluation


@dataclass
class EvalConfig:
    """Which run to evaluate on its held-out split, and how much of it."""

    run: str = option(
        "", help="The training run (name or folder) whose held-out rows to evaluate on.", label="Training run"
    )
    max_rows: int = option(
        200, help="Evaluate at most this many held-out rows (0 = all).", minimum=0, label="Max rows (0 = all)"
    )
    batch_size: int = option(8, help="Rows per forward pass.", minimum=1, label="Batch size")

    def validate(self) -> None:
        check(self)
        if not str(self.run).strip():
            raise UserError("No run chosen; pick the training run to evaluate.")


def eval_config_from_dict(data: dict[str, Any]) -> EvalConfig:
    from workspace import config_from_dict

    return config_from_dict(EvalConfig, data, "eval config")


def check_evaluable(config: EvalConfig, workspace: str | Path | None = None) -> Path:
    """The run folder to evaluate; UserError when the config, the run or its held-out split is missing."""
    return _evaluable(config, workspace)[0]


def _evaluable(config: EvalConfig, workspace: str | Path | None):
    """(run folder, its adapter/ or merged/ folder, its TrainConfig) of a run that can be evaluated."""
    config.validate()
    trained, train_config = trained_run(config.run, workspace)
    run_dir, output_dir = trained.run_dir, trained.path
    if not train_config.eval_split:
        raise UserError(
            f"Run '{run_dir.name}' was trained with eval_split 0, so it has no held-out rows to evaluate on. "
            "Train a run with an eval split (e.g. eval_split: 0.1)."
        )
    return run_dir, output_dir, train_config


def eval_job(config: EvalConfig, ctx: runfolder.JobContext) -> str:
    """The evaluation stage's job: picks the backend before any ML library is imported, then evaluates."""
    import model_utils

    model_utils.select_backend()  # before transformers/peft are imported: Unsloth patches them
    result = evaluate(config, ctx.reporter, ctx.stop, ctx.workspace)
    return "stopped" if result.get("stopped") else "done"


def evaluate(
    config: EvalConfig,
    reporter: runfolder.Reporter | None = None,
    stop: runfolder.StopFlag | None = None,
    workspace: str | Path | None = None,
) -> dict[str, Any]:
    """Held-out loss and perplexity of base vs tuned on the run's eval split; writes eval.json and eval.md there.

    The loss counts only the trained tokens (label != -100), as in training. Returns {"stopped": True} when the job
    is asked to stop before the end (nothing is written then).
    """
    import model_utils
    import training_utils

    reporter = reporter or runfolder.Reporter(None)
    stop = stop or runfolder.StopFlag()
    started = time.monotonic()
    run_dir, output_dir, train_config = _evaluable(config, workspace)
    run_workspace = runfolder.run_workspace(run_dir)
    reporter.progress(None, None, f"Re-creating the eval split of {run_dir.name}")
    model_path = model_utils.resolve_model_path(train_config.model.name_or_path, run_workspace)
    # The tokenizer training used, so the prepared data comes from the same cache (same rows either way).
    tokenizer = model_utils.load_tokenizer(model_path, train_config.model.trust_remote_code)
    prepared = training_utils.prepare_training_data(train_config, tokenizer, run_workspace)  # the same split
    rows = prepared.eval
    if config.max_rows:
        rows = rows.select(range(min(config.max_rows, len(rows))))
    batches = [rows[start : start + config.batch_size] for start in range(0, len(rows), config.batch_size)]
    total_steps = 2 * len(batches)
    done_steps = 0
    reporter.start(0, total_steps, f"Loading the model to evaluate {len(rows)} held-out rows")

    def measure(chat_model: ChatModel, side: str, disable_adapter: bool) -> tuple[float, int] | None:
        nonlocal done_steps
        loss_sum, tokens = 0.0, 0
        for index, batch in enumerate(batches, start=1):
            if stop.requested:
                return None
            with chat_model.lock, chat_model.model.disable_adapter() if disable_adapter else contextlib.nullcontext():
                batch_loss, batch_tokens = _batch_loss(chat_model.model, batch, tokenizer.pad_token_id)
            loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
            done_steps += 1
            reporter.progress(done_steps, total_steps, f"{side}: batch {index}/{len(batches)}")
        return loss_sum, tokens

    if output_dir.name == "adapter":
        chat_model = load_chat_model(train_config.model.name_or_path, str(run_dir), workspace)
        base = measure(chat_model, "base", disable_adapter=True)
        tuned = measure(chat_model, "tuned", disable_adapter=False) if base else None
    else:
        # A full fine-tune has no adapter to switch off: load the base, then the merged model, one at a time.
        base = measure(load_chat_model(train_config.model.name_or_path, workspace=run_workspace), "base", False)
        tuned = measure(load_chat_model(None, str(run_dir), workspace), "tuned", False) if base else None
    if base is None or tuned is None:
        return {"stopped": True}

    result = {
        "run": run_dir.name,
        "base_model": train_config.model.name_or_path,
        "tuned_model": output_dir.name,
        "rows": len(rows),
        "eval_rows_total": len(prepared.eval),
        "tokens": base[1],
        "eval_split": train_config.eval_split,
        "seed": train_config.seed,
        "base": _loss_and_perplexity(*base),
        "tuned": _loss_and_perplexity(*tuned),
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(run_dir / "eval.json", result)
    atomic_write_text(run_dir / "eval.md", eval_markdown(result))
    reporter.progress(
        total_steps,
        total_steps,
        f"held-out loss: base {result['base']['loss']:.4f} → tuned {result['tuned']['loss']:.4f}",
    )
    log.info(
        "eval of %s: base loss %.4f, tuned loss %.4f over %d tokens",
        run_dir.name,
        result["base"]["loss"],
        result["tuned"]["loss"],
        result["tokens"],
    )
    return result


def _batch_loss(model, batch: dict[str, list], pad_token_id: int) -> tuple[float, int]:
    """(sum of token losses, number of trained tokens) of one batch, padded on the right."""
    import torch

    width = max(len(ids) for ids in batch["input_ids"])
    input_ids = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids in batch["input_ids"]])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch["input_ids"]])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in batch["labels"]])
    device = model.device
    # The model's loss is the mean over the labels it predicts (each label shifted one left), so scale it back up.
    counted = int((labels[:, 1:] != -100).sum())
    if counted == 0:
        return 0.0, 0
    with torch.inference_mode():
        output = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
    return float(output.loss) * counted, counted


def _loss_and_perplexity(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if loss < 700 else math.inf}


def eval_markdown(result: dict[str, Any]) -> str:
    """A small markdown table of an evaluate() result."""
    return (
        f"# Held-out evaluation of {result['run']}\n\n"
        "| model | loss | perplexity |\n|---|---:|---:|\n"
        f"| base ({result['base_model']}) | {result['base']['loss']:.4f} | {result['base']['perplexity']:.2f} |\n"
        f"| tuned ({result['tuned_model']}) | {result['tuned']['loss']:.4f} | {result['tuned']['perplexity']:.2f} |\n\n"
        f"{result['rows']} of {result['eval_rows_total']} held-out rows (eval_split {result['eval_split']}, seed "
        f"{result['seed']}), {result['tokens']} trained tokens; loss counts only the reply tokens that training "
        "learned from.\n"
    )


def eval_run_name(run: str) -> str:
    """The eval job's own run-folder name (jobs adds -2, -3 … when it exists)."""
    return f"eval-{Path(str(run)).name}"[:80]
