"""Held-out evaluation: loss and perplexity of base vs tuned on a run's eval split (the eval job kind), with the
models loaded for chat by inference_utils."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import runfolder
from inference_utils import ChatModel, load_chat_model, trained_run
from settings import check, option
from workspace import UserError, atomic_write_text, write_json

log = logging.getLogger(__name__)


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
    from dataset_utils import prepare_training_data

    reporter = reporter or runfolder.Reporter(None)
    stop = stop or runfolder.StopFlag()
    started = time.monotonic()
    run_dir, output_dir, train_config = _evaluable(config, workspace)
    run_workspace = runfolder.run_workspace(run_dir)
    reporter.progress(None, None, f"Re-creating the eval split of {run_dir.name}")
    model_path = model_utils.resolve_model_path(train_config.model.name_or_path, run_workspace)
    # The tokenizer training used, so the prepared data comes from the same cache (same rows either way).
    tokenizer = model_utils.load_tokenizer(model_path, train_config.model.trust_remote_code)
    prepared = prepare_training_data(train_config, tokenizer, run_workspace)  # the same split
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
