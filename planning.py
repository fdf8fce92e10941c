"""Before a run: suggested settings (each with its one-line reason) from the dataset's token counts and the device,
and a time estimate from a calibrated throughput model.

Why a calibrated model and not a few timed steps: timing steps means loading the model and training (tens of
seconds on a GPU, minutes on the CPU) every time a widget changes, and the first steps are the slowest (compilation,
allocator warm-up), so a handful of them overstates the time. The model is `tokens ÷ (the device's measured matmul
rate × an efficiency calibrated by bench/estimate_bench.py ÷ the FLOPs a token costs)`; a run of the same model on
the same device in this workspace replaces the model with the throughput that run measured."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset_report import DatasetReport, report_for_training
from model_utils import Device, count_parameters, detect_device, estimate_memory, resolve_model_path
from runfolder import read_config, read_events, read_status
from training_utils import MAX_SEQ_LENGTH_LIMIT, TrainConfig
from workspace import UserError, workspace_root

# Achieved training FLOP/s ÷ the probe's matmul FLOP/s, from bench/estimate_bench.py. CPU: 0.54, the mean of 0.50 and
# 0.59 implied by two demo runs on this project's idle 2-core machine with the 1024² probe (12 steps × 2 × 128 and
# 8 × 4 × 256 tokens; the 512² probe it replaced read a third of the rate under load and left the model 52 % high).
# GPU: a starting point for bf16 LoRA; the 1B / 3B device runs (-92 % / -80 % with 0.35) say start-up and per-step
# overheads dominate short GPU runs, which this FLOP model leaves out.
EFFICIENCY = {"cpu": 0.54, "gpu": 0.35}
PASSES = {"small": 3, "medium": 2, "large": 1}  # epochs by dataset size (rows: < 1000, < 10000, more)
# The TrainConfig fields suggest() can change (the Train tab fills these widgets when a suggestion is accepted).
SUGGESTED_FIELDS = (
    "max_seq_length",
    "eval_split",
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
)
MIN_EVAL_ROWS = 200  # below this, an eval split costs training rows and its loss is too noisy to act on


@dataclass
class Suggestion:
    """One suggested value for a TrainConfig field, with why."""

    field: str
    current: Any
    value: Any
    reason: str

    @property
    def changes(self) -> bool:
        return self.current != self.value

    def line(self) -> str:
        change = f"{self.current} → {self.value}" if self.changes else f"{self.value} (keep)"
        return f"{self.field}: {change} — {self.reason}"


_REPORTS: dict[str, DatasetReport] = {}  # the UI asks again on every widget change: keep the last few reports


def dataset_report_for(config: TrainConfig, workspace: str | Path | None = None) -> DatasetReport:
    """The quality report of the run's dataset with the run's tokenizer, template and max_seq_length (cached while
    the options and the file's size and modification time stay the same)."""
    source = Path(str(config.dataset.source).strip()).expanduser()
    stamp = (source.stat().st_size, source.stat().st_mtime_ns) if source.is_file() else None
    key = json.dumps(
        [dataclasses.asdict(config.dataset), config.model.name_or_path, config.max_seq_length, stamp]
        + [config.train_on_responses_only, config.eval_split, config.seed, str(workspace)],
        sort_keys=True,
        default=str,
    )
    if key not in _REPORTS:
        if len(_REPORTS) >= 8:
            _REPORTS.pop(next(iter(_REPORTS)))
        _REPORTS[key] = _build_report(config, workspace)
    return _REPORTS[key]


def _build_report(config: TrainConfig, workspace: str | Path | None) -> DatasetReport:
    import model_utils

    # A view: a Hub id not downloaded yet gives its reason (Download first) instead of downloading here.
    path = resolve_model_path(config.model.name_or_path, workspace, download=False)
    tokenizer = model_utils.load_tokenizer(path, config.model.trust_remote_code)
    return report_for_training(config, tokenizer, workspace)


def suggest(
    config: TrainConfig, report: DatasetReport, model_path: str, device: Device | None = None
) -> list[Suggestion]:
    """Suggestions for max_seq_length, steps, learning rate, LoRA rank, eval split and micro-batch."""
    if report.usable_rows == 0:
        raise UserError(
            f"No usable rows in {report.source} ({report.rows} read): nothing to suggest settings for. "
            "Open the dataset report in the Dataset tab to see why each row is dropped."
        )
    from model_utils import model_max_length

    device = device or detect_device()
    out = []
    p99 = report.lengths.get("p99", config.max_seq_length)
    limit = min(model_max_length(model_path), MAX_SEQ_LENGTH_LIMIT)
    seq = min(limit, max(64, 64 * math.ceil(p99 / 64)))
    out.append(
        Suggestion(
            "max_seq_length",
            config.max_seq_length,
            seq,
            f"p99 of the row lengths is {p99} tokens (max {report.lengths.get('max', p99)}): {seq} keeps 99% of rows whole"
            + (f", capped at the model's limit {limit}" if seq == limit else ""),
        )
    )
    rows = report.usable_rows
    eval_split = 0.05 if rows >= MIN_EVAL_ROWS else 0.0
    out.append(
        Suggestion(
            "eval_split",
            config.eval_split,
            eval_split,
            f"{rows} usable rows: 5% ({round(rows * 0.05)} rows) measure the eval loss and allow early stopping"
            if eval_split
            else f"only {rows} usable rows (< {MIN_EVAL_ROWS}): every row is worth more for training",
        )
    )
    r = 8 if rows < 1000 else 16 if rows < 10000 else 32 if rows < 100000 else 64
    if not config.full_finetuning:
        out.append(Suggestion("lora_r", config.lora_r, r, f"{rows} rows: rank {r} has room enough without overfitting"))
        out.append(
            Suggestion("lora_alpha", config.lora_alpha, r, "alpha equal to the rank keeps the update scale at 1")
        )
    lr = 2e-5 if config.full_finetuning else 2e-4
    out.append(
        Suggestion(
            "learning_rate",
            config.learning_rate,
            lr,
            "full fine-tunes change every weight: 10× below LoRA's 2e-4"
            if config.full_finetuning
            else f"the usual rate for {config.mode.upper()} adapters",
        )
    )
    batch, accumulation = _micro_batch(config, model_path, seq, device)
    out.append(
        Suggestion(
            "per_device_train_batch_size",
            config.per_device_train_batch_size,
            batch,
            f"the largest micro-batch the memory estimate fits on {device.name} at {seq} tokens"
            if device.cuda
            else "on the CPU a larger batch is only slower per step; kept",
        )
    )
    out.append(
        Suggestion(
            "gradient_accumulation_steps",
            config.gradient_accumulation_steps,
            accumulation,
            f"keeps the effective batch at {batch * accumulation} rows",
        )
    )
    train_rows = max(1, rows - round(rows * eval_split)) if eval_split else rows
    size = "small" if rows < 1000 else "medium" if rows < 10000 else "large"
    steps = max(1, math.ceil(PASSES[size] * train_rows / (batch * accumulation)))
    out.append(
        Suggestion(
            "max_steps",
            config.max_steps,
            steps,
            f"{PASSES[size]} pass(es) over {train_rows} train rows at {batch * accumulation} rows per step",
        )
    )
    return out


def _micro_batch(config: TrainConfig, model_path: str, seq: int, device: Device) -> tuple[int, int]:
    effective = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if not device.cuda:
        return config.per_device_train_batch_size, config.gradient_accumulation_steps
    batch = 1
    while batch * 2 <= effective:
        trial = dataclasses.replace(config, per_device_train_batch_size=batch * 2, max_seq_length=seq)
        if not estimate_memory(trial, model_path).fits:
            break
        batch *= 2
    return batch, max(1, effective // batch)


def apply(config: TrainConfig, suggestions: list[Suggestion], accepted: list[str]) -> TrainConfig:
    """`config` with the accepted suggestions' values (by field name); the rest unchanged."""
    chosen = {item.field: item.value for item in suggestions if item.field in accepted}
    unknown = sorted(set(accepted) - {item.field for item in suggestions})
    if unknown:
        raise UserError(
            f"No suggestion for {', '.join(unknown)}; suggestions are for: "
            + ", ".join(item.field for item in suggestions)
        )
    return dataclasses.replace(config, **chosen)


# ---------------------------------------------------------------- the time estimate


@dataclass
class TimeEstimate:
    seconds: float
    steps: int
    tokens_per_s: float
    device: str
    basis: str  # where the throughput comes from

    def summary(self) -> str:
        return f"≈ {_minutes(self.seconds)} for {self.steps} steps on {self.device} ({self.tokens_per_s:.0f} tokens/s, {self.basis})"


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def planned_steps(config: TrainConfig, train_rows: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return max(1, math.ceil(config.num_train_epochs * train_rows / per_step))


def flops_per_token(config: TrainConfig, parameters: int, shape: dict, seq: int) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for the activations (+2N weight gradients in a full
    fine-tune), +2N recomputed under gradient checkpointing, plus attention's 12·layers·seq·hidden."""
    passes = 6 if config.full_finetuning else 4
    if config.gradient_checkpointing:
        passes += 2
    attention = 12 * shape.get("num_hidden_layers", 1) * seq * shape.get("hidden_size", 0)
    return passes * parameters + attention


@functools.lru_cache(maxsize=4)
def matmul_flops(cuda: bool) -> float:
    """The device's measured dense matmul rate (FLOP/s): bf16 4096² on a GPU, fp32 1024² on the CPU (~0.3 s).

    The best of several short bursts: on a busy CPU a 512² product measured a third of its idle rate (thread
    hand-offs dominate), far below what the training job's larger matmuls then reached."""
    import torch

    size = 4096 if cuda else 1024
    kwargs = {"device": "cuda", "dtype": torch.bfloat16} if cuda else {"dtype": torch.float32}
    a, b = torch.randn(size, size, **kwargs), torch.randn(size, size, **kwargs)
    a @ b  # warm-up
    best = 0.0
    for _ in range(6):
        repeats, started = 0, time.perf_counter()
        while repeats < 2 or time.perf_counter() - started < 0.05:
            a @ b
            repeats += 1
            if cuda:
                torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def estimate_time(
    config: TrainConfig,
    model_path: str,
    report: DatasetReport | None = None,
    workspace: str | Path | None = None,
    device: Device | None = None,
) -> TimeEstimate:
    """Seconds the run's training steps take (model loading and data preparation not included)."""
    device = device or detect_device()
    rows = report.usable_rows if report else 0
    train_rows = rows - round(rows * config.eval_split) if config.eval_split and rows >= 2 else rows
    steps = planned_steps(config, max(train_rows, 1))
    if not config.max_steps and not train_rows:
        raise UserError("Epoch-based steps need the dataset's row count: choose a dataset first, or set max_steps.")
    mean = report.lengths.get("p50", config.max_seq_length) if report else config.max_seq_length
    seq = min(mean, config.max_seq_length)
    tokens = steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * seq
    measured = measured_throughput(config, model_path, device, workspace)
    if measured:
        rate, run = measured
        basis = f"measured in run {run}"
    else:
        parameters, shape = count_parameters(model_path)
        kind = "gpu" if device.cuda else "cpu"
        rate = matmul_flops(device.cuda) * EFFICIENCY[kind] / flops_per_token(config, parameters, shape, seq)
        rate *= max(1, device.gpu_count if config.num_gpus == 0 else config.num_gpus) if device.cuda else 1
        basis = "calibrated model"
    return TimeEstimate(tokens / rate, steps, rate, device.name, basis)


def measured_throughput(
    config: TrainConfig, model_path: str, device: Device, workspace: str | Path | None
) -> tuple[float, str] | None:
    """(median tokens/s, run name) of the newest run in the workspace that trained the same model in the same mode
    on the same device at a sequence length within 2× of this one, or None."""
    runs = workspace_root(workspace) / "runs"
    candidates = sorted(runs.glob("*/events.jsonl"), key=lambda path: path.stat().st_mtime, reverse=True)
    for events_path in candidates[:50]:
        run_dir = events_path.parent
        try:
            settings = read_config(run_dir)
            status = read_status(run_dir)
        except (OSError, UserError, ValueError):
            continue
        if settings.get("kind") != "train" or status.device != ("GPU" if device.cuda else "CPU"):
            continue
        other = settings
        same = (
            str(other.get("model", {}).get("name_or_path")) in (config.model.name_or_path, model_path)
            and bool(other.get("load_in_4bit")) == config.load_in_4bit
            and bool(other.get("full_finetuning")) == config.full_finetuning
            and 0.5 <= int(other.get("max_seq_length") or 1) / config.max_seq_length <= 2
        )
        rates = [e.metrics["tokens_per_s"] for e in read_events(run_dir) if "tokens_per_s" in e.metrics]
        if same and len(rates) >= 3:
            return statistics.median(rates[1:]), run_dir.name  # the first step pays for the warm-up
    return None


def time_estimate_text(config: TrainConfig, workspace: str | Path | None = None) -> str:
    """The estimate as one line (the Train tab, `main.py train`): from the dataset's lengths when one is chosen."""
    path = resolve_model_path(config.model.name_or_path, workspace, download=False)  # a view: never downloads
    report = dataset_report_for(config, workspace) if str(config.dataset.source).strip() else None
    text = estimate_time(config, path, report, workspace).summary()
    if report is None:
        text += "; no dataset chosen yet, so every row is counted at max_seq_length"
    return text + "; model loading and data preparation come on top."
