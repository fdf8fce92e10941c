"""Before a run: suggested settings (each with its one-line reason) from the dataset's token counts and the device,
and an estimate of the whole wall time from Start to done.

Why a calibrated model and not a few timed steps: timing steps means loading the model and training (tens of
seconds on a GPU, minutes on the CPU) every time a widget changes, and the first steps are the slowest (compilation,
allocator warm-up), so a handful of them overstates the time. The wall time is

    process start and imports + model load (a constant + seconds per GB of weights on disk)
    + data preparation and the trainer's set-up (a constant + seconds per row)
    + the first step's warm-up + steps × (a per-step overhead + tokens per step ÷ token rate) + saving the adapter

with the token rate `the device's measured matmul rate × an efficiency ÷ the FLOPs a token costs` and the tokens
per step counted as the trainer batches them (padding-free, padded to the batch's longest row, or packed) from the
dataset report's row lengths. bench/estimate_bench.py --fit fits the constants (TIME_MODEL); a run of the same model
on the same device in this workspace replaces the token rate and the per-step overhead with the rate it measured."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import preference_data
import stages
from dataset_report import DatasetReport, report_for_training, report_of_measured
from model_utils import Device, count_parameters, detect_device, estimate_memory, fit_micro_batch, resolve_model_path
from runfolder import read_config, read_events, read_status
from settings import keys
from train_config import MAX_SEQ_LENGTH_LIMIT, TrainConfig
from workspace import UserError, workspace_root

# The wall-time model's constants per device kind, each fitted by `bench/estimate_bench.py --fit` (its JSON line
# {"fit": {...}} pastes here): start_s (job process start and imports), load_s + load_s_per_gb (model load by the
# weights' size on disk), prep_s + prep_s_per_row (data preparation and the trainer's set-up), warmup_s (the first
# step's extra: compilation, allocator), step_s (per-step overhead), varied_step_s (the extra per step when the
# rows' lengths vary: every new batch shape costs the compiled kernels a new specialisation, so the host sets the
# pace), efficiency (achieved training FLOP/s ÷ the matmul probe), save_s (after the last step: the adapter).
TIME_MODEL = {
    # CPU: the transformers backend, fitted on this project's 2-core machine, idle (2026-12-04, `--cases cpu --fit`:
    # demo-fixed-10, demo-fixed-30, demo-varied-20): 4.6-6.2 s to the model loaded, 1.5-2.2 s of data and set-up,
    # then the arithmetic alone (efficiency 0.73 of the 1024² probe; no per-step overhead left to fit), 0.3 s to save.
    "cpu": {
        "start_s": 3.12,
        "load_s": 0.0,
        "load_s_per_gb": 4.0,
        "prep_s": 2.0,
        "prep_s_per_row": 0.002,
        "warmup_s": 0.0,
        "step_s": 0.0,
        "varied_step_s": 0.0,
        "efficiency": 0.7343,
        "save_s": 0.28,
    },
    # GPU: the Unsloth backend, fitted on one NVIDIA H200 (2026-12-04, `--cases 1b-fixed-20,1b-varied-40,
    # 3b-fixed-20`): Start to the model loaded 31-36 s whatever the size (Unsloth's import and patching dominate;
    # 2.5 and 6.4 GB loaded alike), data 4-9 s, first step 3.5-9 s, then 0.22 s a step on fixed 1B rows, 0.36 s on
    # fixed 3B rows (the difference is the arithmetic: efficiency 1.0 of the 4096² probe) and 0.31 s on varied 1B
    # rows (the extra varied_step_s), save 0.8 s.
    "gpu": {
        "start_s": 32.8,
        "load_s": 0.0,
        "load_s_per_gb": 0.0,
        "prep_s": 7.25,
        "prep_s_per_row": 0.0,
        "warmup_s": 5.5,
        "step_s": 0.127,
        "varied_step_s": 0.15,
        "efficiency": 1.0,
        "save_s": 0.81,
    },
}
NO_DATASET = "choose a dataset to get a time estimate: the time depends on its token count"
PASSES = {"small": 3, "medium": 2, "large": 1}  # epochs by dataset size (rows: < 1000, < 10000, more)
_FIELDS = keys(TrainConfig)  # TrainConfig's option keys, named through its fields
# The TrainConfig fields suggest() can change (the Train tab fills these widgets when a suggestion is accepted).
SUGGESTED_FIELDS = (
    _FIELDS.max_seq_length,
    _FIELDS.eval_split,
    _FIELDS.lora_r,
    _FIELDS.lora_alpha,
    _FIELDS.learning_rate,
    _FIELDS.per_device_train_batch_size,
    _FIELDS.gradient_accumulation_steps,
    _FIELDS.max_steps,
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
        + [config.train_on_responses_only, config.eval_split, config.seed, str(workspace)]
        + [config.stage, config.reference_column],
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
    if preference_data.reads_stage_format(config.stage):
        return report_of_stage_data(config, tokenizer, workspace)
    return report_for_training(config, tokenizer, workspace)


def report_of_stage_data(config: TrainConfig, tokenizer, workspace: str | Path | None) -> DatasetReport:
    """The report of a preference or GRPO run's data, read in its stage's format (pairs, KTO rows, prompts)."""
    return stage_data_report(
        config.dataset,
        config.stage,
        tokenizer,
        workspace,
        config.reference_column,
        max_seq_length=config.max_seq_length,
        eval_split=config.eval_split,
        seed=config.seed,
    )


def stage_data_report(
    dataset, stage: str, tokenizer, workspace=None, reference_column: str = "", **prepare
) -> DatasetReport:
    """The quality report of preference or prompt data as `stage` reads it (prepare: max_seq_length, eval_split,
    seed); `main.py dataset --report` of such data too."""
    fmt, measured = preference_data.measure_rows(dataset, stage, tokenizer, workspace, reference_column)
    return report_of_measured(dataset, fmt, measured, **prepare)


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
    """The wall time from Start to done, in parts (seconds), and what it was computed from."""

    seconds: float
    steps: int
    tokens_per_s: float
    device: str
    basis: str  # where the token rate comes from
    parts: dict[str, float] = dataclasses.field(default_factory=dict)  # start, load, data, steps, save
    inputs: dict[str, float] = dataclasses.field(default_factory=dict)  # what bench/estimate_bench.py fits against

    def summary(self) -> str:
        parts = self.parts
        return (
            f"≈ {_minutes(self.seconds)}: start and model load {_minutes(parts['start'] + parts['load'])}, "
            f"data {_minutes(parts['data'])}, {self.steps} steps {_minutes(parts['steps'] + parts['save'])} "
            f"on {self.device} ({self.tokens_per_s:.0f} tokens/s, {self.basis})"
        )


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


def batch_layout(config: TrainConfig, device: Device) -> str:
    """How the SFT trainer batches rows: "packed" (packing on), "padding_free" (Unsloth's default on a CUDA GPU:
    the batch is the rows' real tokens) or "padded" (TRL's collator: every row padded to the batch's longest)."""
    if config.packing:
        return "packed"
    unsloth = importlib.util.find_spec("unsloth") is not None and os.environ.get("FINETUNER_BACKEND") != "transformers"
    return "padding_free" if device.cuda and unsloth else "padded"


def row_tokens(lengths: dict[str, int], max_seq_length: int, batch: int) -> tuple[float, float]:
    """(mean tokens of a row, mean tokens of a batch's longest row) once cut at max_seq_length, from the report's
    length percentiles (p50, p95, p99, max; p5, p25, p75 or min where present), read as a quantile function
    interpolated geometrically between them (exact for log-uniform lengths, the usual long tail); below p50
    without lower percentiles it mirrors p95 (p50² ÷ p95)."""
    known = {0.5: "p50", 0.95: "p95", 0.99: "p99", 1.0: "max", 0.05: "p5", 0.25: "p25", 0.75: "p75", 0.0: "min"}
    points = {q: float(lengths[key]) for q, key in known.items() if key in lengths}
    if 0.5 not in points:
        return float(max_seq_length), float(max_seq_length)
    points.setdefault(0.0, min(points.values()) ** 2 / max(points.get(0.95, points[0.5]), 1.0))
    points.setdefault(1.0, max(points.values()))
    qs = sorted(points)
    grid = 512
    mean = longest = 0.0
    for index in range(grid):
        u = (index + 0.5) / grid
        after = next(q for q in qs if q >= u)
        before = max(q for q in qs if q <= u) if any(q <= u for q in qs) else after
        span = after - before
        low, high = math.log(max(points[before], 1.0)), math.log(max(points[after], 1.0))
        value = math.exp(low + (high - low) * ((u - before) / span if span else 0.0))
        value = min(value, max_seq_length)
        mean += value / grid
        longest += value * (((index + 1) / grid) ** batch - (index / grid) ** batch)  # E[max of `batch` rows]
    return mean, longest


def weights_gb(model_path: str) -> float:
    """The model's weights on disk (GB): what its load reads."""
    folder = Path(model_path)
    files = [path for pattern in ("*.safetensors", "*.bin") for path in folder.glob(pattern)]
    return sum(path.stat().st_size for path in files) / 1e9


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
    """Seconds from Start to done: process start, model load, data preparation, the steps and the save."""
    if report is None:
        raise UserError(NO_DATASET[0].upper() + NO_DATASET[1:] + ".")
    device = device or detect_device()
    # The job's own choice, made the same way: the micro-batch of a stage the memory estimate describes.
    if device.cuda and config.fit_micro_batch and stages.get(config.stage).memory_estimate:
        config = fit_micro_batch(config, model_path)
    kind = "gpu" if device.cuda else "cpu"
    constants = TIME_MODEL[kind]
    rows = report.usable_rows
    train_rows = rows - round(rows * config.eval_split) if config.eval_split and rows >= 2 else rows
    batch = config.per_device_train_batch_size
    per_step = batch * config.gradient_accumulation_steps
    layout = batch_layout(config, device)
    mean, longest = row_tokens(report.lengths, config.max_seq_length, batch)
    sides = pair_sequences(config, report)
    if sides == 2 and stages.get(config.stage).data_formats[0] == "unpaired":
        train_rows, sides = train_rows * 2, 1  # KTO trains each pair as two rows
    if layout == "packed":
        real = computed = seq = float(config.max_seq_length)
        steps = config.max_steps or max(
            1, math.ceil(config.num_train_epochs * train_rows * mean / (per_step * config.max_seq_length))
        )
    else:
        if not config.max_steps and not train_rows:
            raise UserError("Epoch-based steps need the dataset's usable rows: this dataset has none.")
        steps = planned_steps(config, max(train_rows, 1))
        real, computed, seq = (
            mean,
            (mean if layout == "padding_free" else longest),
            (longest if layout == "padded" else mean),
        )
    real_tokens, compute_tokens = steps * per_step * real * sides, steps * per_step * computed * sides
    # Rows of one length (all cut at max_seq_length, or packed) give every step the same shape.
    varied = layout != "packed" and mean < 0.95 * config.max_seq_length
    gpus = max(1, device.gpu_count if config.num_gpus == 0 else config.num_gpus) if device.cuda else 1
    parameters, shape = count_parameters(model_path)
    per_token = flops_per_token(config, parameters, shape, round(seq))
    probe = matmul_flops(device.cuda)
    size = weights_gb(model_path)
    measured = measured_throughput(config, model_path, device, workspace)
    if measured:  # the measured rate already holds the per-step overhead
        rate, run = measured
        basis = f"measured in run {run}"
        stepping = real_tokens / rate
    else:
        rate = probe * constants["efficiency"] / per_token * gpus
        basis = f"calibrated model, {layout.replace('_', '-')} batches"
        stepping = steps * (constants["step_s"] + constants["varied_step_s"] * varied) + compute_tokens / rate
        rate = real_tokens / stepping
    parts = {
        "start": constants["start_s"],
        "load": constants["load_s"] + constants["load_s_per_gb"] * size,
        "data": constants["prep_s"] + constants["prep_s_per_row"] * report.rows,
        "steps": constants["warmup_s"] + stepping,
        "save": constants["save_s"],
    }
    inputs = {
        "rows": report.rows,
        "weights_gb": round(size, 3),
        "steps": steps,
        "real_tokens": round(real_tokens),
        "compute_tokens": round(compute_tokens),
        "varied_steps": steps if varied else 0,
        # the steps' arithmetic in seconds at efficiency 1: the fit's regressor for 1 / efficiency
        "flop_s": compute_tokens * per_token / (probe * gpus),
    }
    return TimeEstimate(sum(parts.values()), steps, rate, device.name, basis, parts, inputs)


def pair_sequences(config: TrainConfig, report: DatasetReport) -> int:
    """How many sequences a row of the report is trained as: 2 for pairs (DPO and ORPO run the prompt with each
    reply; the report's lengths are the prompt with the longer one), else 1."""
    return 2 if report.format == "pairs" and stages.get(config.stage).data_formats[0] != "prompts" else 1


def measured_throughput(
    config: TrainConfig, model_path: str, device: Device, workspace: str | Path | None
) -> tuple[float, str] | None:
    """(median tokens/s, run name) of the newest run in the workspace that trained the same model in the same stage
    and mode on the same device at a sequence length within 2× of this one, or None."""
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
            # another stage's tokens/s is another measure (GRPO's steps are mostly generation)
            and other.get("stage", "sft") == config.stage
            and bool(other.get("load_in_4bit")) == config.load_in_4bit
            and bool(other.get("full_finetuning")) == config.full_finetuning
            and 0.5 <= int(other.get("max_seq_length") or 1) / config.max_seq_length <= 2
        )
        rates = [e.metrics["tokens_per_s"] for e in read_events(run_dir) if "tokens_per_s" in e.metrics]
        if same and len(rates) >= 3:
            return statistics.median(rates[1:]), run_dir.name  # the first step pays for the warm-up
    return None


def time_estimate_text(config: TrainConfig, workspace: str | Path | None = None) -> str:
    """The estimate as one line (the Train tab, `main.py train`); without a dataset, what it needs instead."""
    if not str(config.dataset.source).strip():
        return NO_DATASET + "."
    path = resolve_model_path(config.model.name_or_path, workspace, download=False)  # a view: never downloads
    summary = estimate_time(config, path, dataset_report_for(config, workspace), workspace).summary()
    return f"{summary}; data: {Path(str(config.dataset.source).strip()).name}"  # which data the figure is for


# ---------------------------------------------------------------- memory per GPU on several GPUs


@dataclass(frozen=True)
class GpuMemory:
    """GiB one GPU needs for a training step when `gpus` GPUs train the run, under DDP and under FSDP."""

    gpus: int
    ddp_gib: float
    fsdp_gib: float

    def summary(self) -> str:
        return f"per GPU on {self.gpus} GPUs: DDP ≈ {self.ddp_gib:.1f} GiB, FSDP ≈ {self.fsdp_gib:.1f} GiB"


def per_gpu_memory(estimate, gpus: int, layers: int) -> GpuMemory:
    """Split a one-GPU memory estimate (model_utils.estimate_memory) over `gpus` GPUs. DDP: every GPU holds the
    whole model, its trainable state and its own micro-batch's activations. FSDP: the weights and the trainable state
    (gradients, optimizer moments) are sharded, each GPU keeps its micro-batch's activations, and two decoder layers
    (`layers` of them in the model) are gathered whole at a time: the one computing and the one prefetched."""
    gpus = max(1, gpus)
    gathered = 2 * estimate.weights_gib / max(1, layers) if gpus > 1 else 0.0
    sharded = (estimate.weights_gib + estimate.trainable_gib) / gpus
    return GpuMemory(gpus, estimate.total_gib, sharded + gathered + estimate.activations_gib)


def gpu_memory_for(config: TrainConfig, model_path: str, gpus: int) -> GpuMemory:
    """per_gpu_memory of the run's model and settings on `gpus` GPUs."""
    _, shape = count_parameters(model_path)
    return per_gpu_memory(estimate_memory(config, model_path), gpus, int(shape.get("num_hidden_layers") or 1))
