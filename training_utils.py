"""Training: TrainConfig → model (Unsloth on CUDA, transformers + PEFT otherwise) → the stage's trainer over its
prepared data (TRL's SFTTrainer for SFT: `sft_trainer`; the others' in preference_utils, named by their records in
`stages`) → a callback that writes the run's events and honours stop requests → save. Reads top to bottom in `train`."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import preference_utils
import stages
from dataset_utils import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED, DatasetConfig
from model_utils import Device, ModelConfig, detect_device
from runfolder import JobContext, last_checkpoint, read_status
from settings import check, option
from workspace import UserError, atomic_dir, config_from_dict

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT's name for every linear layer but the output layer: Phi-3/Phi-4 fuse q/k/v into qkv_proj and gate/up into
# gate_up_proj, so only this default exists in every catalogue family (resolve_target_modules turns it into names).
ALL_LINEAR_LAYERS = "all-linear"
FUSED_LINEAR = ["qkv_proj", "gate_up_proj"]  # Phi-3 / Phi-4's layers in place of q/k/v_proj and gate/up_proj
REPORT_TO = ("none", "tensorboard")


# No model reads a million tokens at once: a larger value is a typo that would only fail inside the job.
MAX_SEQ_LENGTH_LIMIT = 1_048_576


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [name.value for name in OptimizerNames]


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [name.value for name in SchedulerType]


@dataclass
class TrainConfig:
    """Every option of a training run; names follow TRL / PEFT. Defaults suit a first LoRA run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # mode: 16-bit LoRA (default), 4-bit QLoRA (load_in_4bit) or full fine-tune (full_finetuning)
    load_in_4bit: bool = option(
        False,
        help="QLoRA: LoRA on a base model loaded in 4 bits, the least memory; NVIDIA GPU only.",
        label="4-bit QLoRA",
    )
    full_finetuning: bool = option(
        False, help="Change every weight instead of training LoRA adapters: the most memory.", label="Full fine-tune"
    )
    lora_r: int = option(
        16,
        help="Rank of the LoRA matrices: 8-64. Higher learns more and uses more memory.",
        minimum=1,
        label="LoRA rank (r)",
    )
    lora_alpha: int = option(
        16,
        help="LoRA scaling; usually equal to the rank or twice it.",
        minimum=0,
        exclusive_minimum=True,
        label="LoRA alpha",
    )
    lora_dropout: float = option(
        0.0,
        help="Dropout on the LoRA path; 0 is fastest.",
        minimum=0,
        maximum=1,
        exclusive_maximum=True,
        label="LoRA dropout",
    )
    target_modules: list[str] = option(
        default_factory=lambda: [ALL_LINEAR_LAYERS],
        help="Linear layers that get LoRA adapters: all-linear = every linear layer of the model but the output "
        "layer (whatever the family calls them); or names such as q_proj, v_proj (Phi: qkv_proj, gate_up_proj).",
        label="LoRA target modules",
    )
    learning_rate: float = option(
        2e-4,
        help="2e-4 suits LoRA; full fine-tunes want about 10x less.",
        minimum=0,
        exclusive_minimum=True,
        label="Learning rate",
    )
    max_steps: int | None = option(
        60,
        help="Optimizer steps to train for; none (0 in the UI) = train for the number of epochs instead.",
        minimum=1,
        label="Max steps",
    )
    num_train_epochs: float = option(
        1.0,
        help="Passes over the data (used when max steps is 0).",
        minimum=0,
        exclusive_minimum=True,
        label="Epochs",
    )
    per_device_train_batch_size: int = option(
        2, help="Rows per step on each device. Memory grows with it.", minimum=1, label="Batch size"
    )
    gradient_accumulation_steps: int = option(
        4,
        help="Steps whose gradients are summed before an update: a larger effective batch without more memory.",
        minimum=1,
        label="Gradient accumulation",
    )
    # Folding accumulation into the micro-batch keeps the effective batch (per_device × accumulation) and the GPU busier.
    fit_micro_batch: bool = option(
        True,
        help="On a GPU, run the accumulation steps as one larger batch while the memory estimate fits (same "
        "effective batch, faster), and skip gradient checkpointing when the step fits without it.",
        label="Fit micro-batch to GPU memory",
        advanced=True,
    )
    warmup_steps: int = option(
        5, help="Steps over which the learning rate ramps up from 0.", minimum=0, label="Warm-up steps", advanced=True
    )
    lr_scheduler_type: str = option(
        "linear",
        help="How the learning rate changes after warm-up.",
        choices=_scheduler_names,
        label="Scheduler",
        advanced=True,
    )
    weight_decay: float = option(
        0.01, help="L2 penalty on the weights.", minimum=0, label="Weight decay", advanced=True
    )
    optim: str = option(
        "adamw_torch",
        help="Optimizer; 8-bit ones need bitsandbytes and a GPU.",
        choices=_optimizer_names,
        label="Optimizer",
        advanced=True,
    )
    max_seq_length: int = option(
        DEFAULT_MAX_SEQ_LENGTH,
        help="Longer examples are cut to this many tokens.",
        minimum=1,
        maximum=MAX_SEQ_LENGTH_LIMIT,
        label="Max sequence length",
    )
    # Measured (bench/RESULTS.md §2, §12): on an H200 with Unsloth, packed varied-length rows trained 2-3× the tokens/s
    # of 8-row padding-free steps (a micro-batch costs ~0.35 s on the host whatever its tokens); at the same tokens the
    # packed run's fewer, larger updates lowered the held-out loss 40 % less (the demo model, CPU). So it stays opt-in.
    packing: bool = option(
        False,
        help="Pack several short rows into each max_seq_length sequence: 2-3× faster on a GPU when rows are short, "
        "but each step then trains more rows, so the same tokens make fewer updates (raise the steps to match).",
        label="Packing",
        advanced=True,
    )
    train_on_responses_only: bool = option(
        True,
        help="Compute the loss only on the assistant's replies, not on the prompts.",
        label="Train on responses only",
        advanced=True,
    )
    gradient_checkpointing: bool = option(
        True,
        help="Recompute activations in the backward pass: much less memory, ~30% slower.",
        label="Gradient checkpointing",
        advanced=True,
    )
    eval_split: float = option(
        0.0,
        help="Fraction of rows held out to measure eval loss (0 = none).",
        minimum=0,
        maximum=1,
        exclusive_maximum=True,
        label="Eval split",
    )
    eval_steps: int = option(
        0,
        help="Evaluate every this many steps (0 = at each checkpoint).",
        minimum=0,
        label="Eval every (steps)",
        advanced=True,
    )
    # Names from transformers' EarlyStoppingCallback; the run keeps and saves its best checkpoint (load_best_model_at_end).
    early_stopping: bool = option(
        False,
        help="Stop when the eval loss stops improving, and save the best checkpoint's weights (needs an eval split).",
        label="Early stopping",
    )
    early_stopping_patience: int = option(
        3,
        help="Evaluations in a row without improvement before the run stops.",
        minimum=1,
        label="Early-stopping patience",
        advanced=True,
    )
    early_stopping_threshold: float = option(
        0.0,
        help="How much the eval loss must fall to count as an improvement.",
        minimum=0,
        label="Early-stopping threshold",
        advanced=True,
    )
    save_steps: int = option(
        50,
        help="Save a checkpoint (a resume point) every this many steps.",
        minimum=1,
        label="Checkpoint every (steps)",
    )
    save_total_limit: int = option(
        2, help="Keep only this many checkpoints.", minimum=1, label="Checkpoints kept", advanced=True
    )
    logging_steps: int = option(
        1, help="Log loss every this many steps.", minimum=1, label="Log every (steps)", advanced=True
    )
    seed: int = option(
        DEFAULT_SEED,
        help="Random seed for shuffling and LoRA initialisation.",
        minimum=0,
        maximum=2**32 - 1,
        label="Seed",
        advanced=True,
    )
    report_to: str = option(
        "none",
        help="Also log to TensorBoard (run folder/tensorboard).",
        choices=REPORT_TO,
        label="Report to",
        advanced=True,
    )
    num_gpus: int = option(
        0,
        help="0 = every visible GPU; more than one trains with DDP, one process per GPU (torchrun).",
        minimum=0,
        label="GPUs",
        advanced=True,
    )
    # The training stage (stages): every field below is read only by the stages that name it in their settings.
    stage: str = option(
        "sft",
        help=stages.help_text(),
        choices=stages.names,  # read on use: a stage registered later is a choice too
        label="Stage",
    )
    start_from_run: str = option(
        "",
        help="DPO / ORPO / KTO / GRPO: continue the LoRA adapter of this SFT run (its name) instead of a new one.",
        label="Start from run",
    )
    beta: float = option(
        0.1,
        help="DPO / KTO: how far the model may move from the reference (higher = less); ORPO: the weight of the "
        "odds-ratio term beside the SFT loss; GRPO: the weight of the KL penalty (0 = none).",
        minimum=0,
        label="Beta",
    )
    num_generations: int = option(
        4,
        help="GRPO: completions sampled per prompt and compared with each other; batch × accumulation must be a "
        "multiple of it.",
        minimum=2,
        label="Generations per prompt",
    )
    max_completion_length: int = option(
        256, help="GRPO: longest completion generated, in tokens.", minimum=1, label="Max completion length"
    )
    temperature: float = option(
        1.0,
        help="GRPO: sampling temperature of the completions (variety to learn from).",
        minimum=0,
        exclusive_minimum=True,
        label="Temperature",
    )
    reward_funcs: list[str] = option(
        default_factory=lambda: ["format"],
        help="GRPO: format (matches reward_pattern), equals / contains (the answer column; numbers compared as "
        "numbers), json (valid JSON), length (within the range), judge (an LLM scores by judge_rubric).",
        label="Reward functions",
    )
    reward_weights: list[float] = option(
        default_factory=list,
        help="GRPO: one weight per reward function, comma-separated, in order (the chosen ones, then the reward "
        "file's); empty = all 1.",
        label="Reward weights",
    )
    reward_pattern: str = option(
        r"^<answer>.*</answer>$",
        help="GRPO format reward: a regular expression the completion must match (its first group, if any, is the "
        "answer that equals / json read).",
        label="Reward pattern (regex)",
    )
    reward_min_length: int = option(0, help="GRPO length reward: fewest characters.", minimum=0, label="Min length")
    reward_max_length: int = option(
        0, help="GRPO length reward: most characters (0 = no limit).", minimum=0, label="Max length"
    )
    judge_provider: str = option(
        "openai",
        help="GRPO judge reward: openai also covers vLLM, llama.cpp server and LM Studio (set the judge's base URL); "
        "the key is the Judge API key typed in the Train tab, else OPENAI_API_KEY / ANTHROPIC_API_KEY.",
        choices=preference_utils.JUDGE_PROVIDERS,
        label="Judge provider",
    )
    judge_model: str = option("", help="GRPO judge reward: the scoring model, e.g. gpt-4o-mini.", label="Judge model")
    judge_base_url: str = option(
        "",
        help="GRPO judge reward: empty = the provider's own API (Ollama: http://localhost:11434).",
        label="Judge URL",
    )
    judge_rubric: str = option(
        "The answer is correct, complete and concise.",
        help="GRPO judge reward: what a good answer does; the judge scores each completion by it.",
        label="Judge rubric",
    )
    judge_min_score: float = option(0.0, help="GRPO judge reward: the worst score (reward 0).", label="Lowest score")
    judge_max_score: float = option(10.0, help="GRPO judge reward: the best score (reward 1).", label="Highest score")
    reward_file: str = option(
        "",
        help="GRPO: a Python file of reward functions, TRL's shape (prompts, completions, **columns) -> floats; "
        "runs only with allow_reward_file on, never in a shared app.",
        label="Reward file (.py)",
    )
    reward_file_functions: list[str] = option(
        default_factory=list,
        help="GRPO: the reward file's functions to use; empty = every function named reward_*.",
        label="Reward file functions",
    )
    allow_reward_file: bool = option(
        False,
        help="Run the reward file's Python code in the training job. Only for a file you wrote or trust.",
        label="Run reward file code",
    )
    reference_column: str = option(
        "",
        help="GRPO: the column with the reference answer; empty = 'answer' if present, else each row's reply.",
        label="Reference answer column",
    )

    @property
    def mode(self) -> str:
        return "full" if self.full_finetuning else "qlora" if self.load_in_4bit else "lora"

    def validate(self, device: Device | None = None) -> None:
        """Raise UserError for the first value that cannot work; `device` overrides detection (tests)."""
        check(self)
        self.model.validate()
        self.dataset.validate()
        if not self.full_finetuning and not self.target_modules:
            raise UserError(
                "target_modules is empty: use all-linear, or name the linear layers LoRA adapts, e.g. q_proj, v_proj."
            )
        if self.load_in_4bit and self.full_finetuning:
            raise UserError("Choose either 4-bit QLoRA or a full fine-tune, not both.")
        device = device or detect_device()
        if self.load_in_4bit and not device.cuda:
            raise UserError("4-bit QLoRA needs an NVIDIA GPU (CUDA); none is available here. Use 16-bit LoRA instead.")
        check_optimizer_device(self.optim, device)
        check_early_stopping(self)
        if self.num_gpus:
            check_num_gpus(self.num_gpus)
        stages.get(self.stage).check(self)


def check_early_stopping(config: TrainConfig) -> None:
    """Early stopping watches the eval loss, and the best evaluation must land on a checkpoint to be kept."""
    if not config.early_stopping:
        return
    if not stages.get(config.stage).eval_loss:
        raise UserError(f"Early stopping is for SFT runs; the {config.stage} stage has no eval loss to watch here.")
    if not config.eval_split:
        raise UserError(
            "Early stopping watches the eval loss, and this run holds no rows out: set eval_split (e.g. 0.1)."
        )
    if config.eval_steps and config.save_steps % config.eval_steps:
        raise UserError(
            f"With early stopping, save_steps ({config.save_steps}) must be a multiple of eval_steps "
            f"({config.eval_steps}) so that the best evaluation has a checkpoint to keep."
        )


def check_optimizer_device(optim: str, device: Device) -> None:
    """Refuse bitsandbytes optimizers without a GPU before a job starts."""
    bitsandbytes = (
        "bnb" in optim
        or optim.startswith("paged_")
        or optim in ("adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit")
    )
    if bitsandbytes and not device.cuda:
        raise UserError(
            f"The optimizer '{optim}' comes from bitsandbytes and needs an NVIDIA GPU; use adamw_torch here."
        )


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from YAML settings; `model: NAME` and `dataset: PATH_OR_ID` stand for their mappings
    (`model: {name_or_path: NAME}`, `dataset: {source: PATH_OR_ID}`), the shorthand a first config is written in."""
    if isinstance(data, dict):
        data = dict(data)
        if isinstance(data.get("model"), str):
            data["model"] = {"name_or_path": data["model"]}
        if isinstance(data.get("dataset"), str):
            data["dataset"] = {"source": data["dataset"]}
    return config_from_dict(TrainConfig, data, "train config")


def _cuda() -> bool:
    import model_utils

    return model_utils.detect_device().cuda


# ---------------------------------------------------------------- GPUs and processes


def visible_gpus() -> list[str]:
    """'index: name' of every CUDA GPU this process may use (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"{index}: {torch.cuda.get_device_name(index)}" for index in range(torch.cuda.device_count())]


def check_num_gpus(num_gpus: int) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus > count:
        listing = "; ".join(visible_gpus()) or "none"
        raise UserError(
            f"num_gpus is {num_gpus} but this machine has {count} visible GPU(s): {listing}. "
            "Lower num_gpus, or set it to 0 to use every visible GPU."
        )


def gpu_launch(num_gpus: int) -> tuple[int, dict[str, str]]:
    """(processes to start, environment to add) for a run on `num_gpus` GPUs (0: all visible).

    A run on fewer GPUs than are visible sees only its own: with two visible GPUs and one process, the HF Trainer
    would otherwise wrap the model in DataParallel.
    """
    import torch

    if num_gpus:
        check_num_gpus(num_gpus)
    count = torch.cuda.device_count()  # NVML-based: no CUDA context in the calling (server) process
    if count == 0:
        return 1, {}
    wanted = num_gpus or count
    env = {}
    if wanted < count:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        devices = [item.strip() for item in listed.split(",") if item.strip()] or [str(i) for i in range(count)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[:wanted])
    return wanted, env


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def ddp_fallback() -> str:
    """Under DDP, when the installed Unsloth cannot train on several GPUs: switch this process to transformers + PEFT
    (call it before Unsloth is imported) and return the note for the run's status; else ""."""
    import importlib.util

    if world_size() <= 1 or importlib.util.find_spec("unsloth") is None or unsloth_supports_ddp():
        return ""
    os.environ["FINETUNER_BACKEND"] = "transformers"
    log.warning("the installed Unsloth does not support multi-GPU training: using transformers + PEFT with DDP")
    return "The installed Unsloth does not support multi-GPU training; this run uses transformers + PEFT with DDP."


def unsloth_supports_ddp() -> bool:
    """Whether the installed Unsloth places each DDP rank on its own GPU (read from its source, without importing it:
    importing Unsloth patches transformers, so the choice must come first)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("unsloth.models.loader_utils")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return "def prepare_device_map" in Path(spec.origin).read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- the run


def launch_plan(settings: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """(processes, environment) for a training job: one process per GPU it trains on."""
    return gpu_launch(int(settings.get("num_gpus") or 0))


def train_job(config: TrainConfig, ctx: JobContext) -> str:
    """The training stage's job: picks the backend before any ML library is imported, then trains."""
    import model_utils

    fallback = ddp_fallback()
    if fallback:
        ctx.note(note=fallback)
    model_utils.select_backend()  # before transformers/trl/peft are imported: Unsloth patches them
    return train(config, ctx)


def fetch_model(name_or_path: str, ctx: JobContext) -> str | None:
    """The model's folder; a Hub id not cached yet is downloaded first, its bytes done / total in this run's live
    view (the download job's fields). None when the run was stopped during the download."""
    import download_utils
    import model_utils

    path = model_utils.local_or_cached(name_or_path, ctx.workspace)
    return path or download_utils.download_for_job(str(name_or_path).strip(), ctx)


def train(config: TrainConfig, ctx: JobContext) -> str:
    """Train into the run folder (checkpoints/, adapter/ or merged/, events); returns "done" or "stopped"."""
    import model_utils

    backend = model_utils.select_backend()  # first: Unsloth must be imported before transformers/trl/peft
    config.validate()
    run_dir, workspace = ctx.run_dir, ctx.workspace
    model_path = fetch_model(config.model.name_or_path, ctx)
    if model_path is None:
        return "stopped"
    limit = model_utils.model_max_length(model_path)
    if config.max_seq_length > limit:
        raise UserError(f"max_seq_length {config.max_seq_length} is above this model's limit of {limit} tokens.")
    log.info("backend: %s, model: %s, mode: %s, processes: %d", backend, model_path, config.mode, world_size())
    state = _distributed_state()
    ctx.note(backend=backend, processes=state.num_processes, device="GPU" if _cuda() else "CPU")

    stage = stages.get(config.stage)
    # The memory estimate is SFT's: DPO holds two sequences per row and GRPO generates, so they keep theirs.
    if config.fit_micro_batch and _cuda() and stage.memory_estimate:
        earlier = read_status(run_dir) if ctx.resume else None
        if earlier and earlier.micro_batch:  # a resumed run keeps its micro-batch: the Trainer skips batches by count
            config = dataclasses.replace(
                config,
                per_device_train_batch_size=earlier.micro_batch,
                gradient_accumulation_steps=earlier.gradient_accumulation,
            )
            config = fit_checkpointing(config, model_path)
        else:
            config = fit_micro_batch(config, model_path)
        ctx.note(
            micro_batch=config.per_device_train_batch_size, gradient_accumulation=config.gradient_accumulation_steps
        )
    if config.start_from_run:
        model, tokenizer = preference_utils.start_model(config, model_path, backend, workspace)
    else:
        model, tokenizer = load_for_training(config, model_path, backend)
    ctx.reporter.progress(None, message="model loaded")
    trainer = stage.trainer(config, model, tokenizer, ctx, backend)  # over the stage's own prepared data
    counter = None
    if stage.counts_tokens:  # its trainer logs no token count (Unsloth's SFT, ORPO): the collator's gives its tokens/s
        counter = trainer.data_collator = TokenCounter(trainer.data_collator)
    clock = preference_utils.GenerationClock().attach(trainer) if stage.generates else None
    trainer.add_callback(events_callback(ctx, counter, clock))
    checkpoint = last_checkpoint(run_dir) if ctx.resume else None
    if ctx.resume and checkpoint is None:
        raise UserError("This run has no checkpoint to resume from; start a new run instead.")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # A stop that lands on the last step finishes the run: resuming from a checkpoint at max_steps would make the
    # Trainer run one step past it.
    if ctx.stop.requested and trainer.state.global_step < trainer.state.max_steps:
        return "stopped"
    stopped_early = early_stop_message(config, trainer.state)
    if stopped_early and trainer.is_world_process_zero():
        log.info(stopped_early)
        ctx.note(note=stopped_early)
        ctx.reporter.progress(trainer.state.global_step, trainer.state.max_steps, stopped_early, force=True)
    if trainer.is_world_process_zero():
        save_final(trainer, tokenizer, config, run_dir)
    return "done"


def fit_micro_batch(config: TrainConfig, model_path: str, headroom: float = 0.85) -> TrainConfig:
    """The config with the largest micro-batch that divides the effective batch and whose memory estimate fits in
    `headroom` of the free GPU memory (never smaller than the configured one), and gradient checkpointing off when
    that micro-batch fits without it too (recomputing activations costs about a third of a step's time)."""
    import model_utils

    effective = config.per_device_train_batch_size * config.gradient_accumulation_steps
    estimate = model_utils.estimate_memory(dataclasses.replace(config, per_device_train_batch_size=1), model_path)
    if estimate.available_gib is None:
        return config
    budget = headroom * estimate.available_gib
    fixed = estimate.weights_gib + estimate.trainable_gib
    for micro in sorted((size for size in range(1, effective + 1) if effective % size == 0), reverse=True):
        if micro <= config.per_device_train_batch_size:
            break
        needed = fixed + estimate.activations_gib * micro  # activations grow with the tokens of a micro-batch
        if needed <= budget:
            log.info(
                "micro-batch %d × accumulation %d (estimate %.1f GiB of %.1f GiB free)",
                micro,
                effective // micro,
                needed,
                estimate.available_gib,
            )
            config = dataclasses.replace(
                config, per_device_train_batch_size=micro, gradient_accumulation_steps=effective // micro
            )
            break
    return fit_checkpointing(config, model_path, headroom)


def fit_checkpointing(config: TrainConfig, model_path: str, headroom: float = 0.85) -> TrainConfig:
    """The config with gradient checkpointing off when its step's memory estimate fits in `headroom` of the free GPU
    memory without it: the same computation, without recomputing the activations (1.4× faster on an H200)."""
    import model_utils

    if not config.gradient_checkpointing:
        return config
    without = model_utils.estimate_memory(dataclasses.replace(config, gradient_checkpointing=False), model_path)
    if without.available_gib is None or without.total_gib > headroom * without.available_gib:
        return config
    log.info("gradient checkpointing off: the step fits without it (estimate %.1f GiB)", without.total_gib)
    return dataclasses.replace(config, gradient_checkpointing=False)


def _distributed_state():
    """accelerate's process state, set up before the model loads so that ranks can wait for each other (one process
    when not launched by torchrun; gloo on CPU, NCCL on CUDA)."""
    from accelerate import PartialState

    import model_utils

    on_cuda = model_utils.detect_device().cuda
    if world_size() > 1 and not on_cuda:
        _restore_indexed_cpu_locations()
    return PartialState(cpu=not on_cuda)


def _restore_indexed_cpu_locations() -> None:
    """Resuming a DDP run, transformers loads the optimizer state with map_location=args.device, which CPU ranks
    name 'cpu:N'; torch.load knows only 'cpu' and fails. Teach it that 'cpu:N' is the CPU."""
    import torch.serialization

    def keep_on_cpu(storage, location: str):
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(100, lambda storage: None, keep_on_cpu)


def load_for_training(config: TrainConfig, model_path: str, backend: str):
    """(model with LoRA attached unless full fine-tune, tokenizer)."""
    if backend == "unsloth":
        return _load_unsloth(config, model_path)
    return _load_transformers(config, model_path)


def _load_unsloth(config: TrainConfig, model_path: str):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=config.max_seq_length,
        dtype=None,
        load_in_4bit=config.load_in_4bit,
        full_finetuning=config.full_finetuning,
        trust_remote_code=config.model.trust_remote_code,
    )
    if not config.full_finetuning:
        target_modules = resolve_target_modules(model, config.target_modules)
        model = FastLanguageModel.get_peft_model(
            model,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=target_modules,
            bias="none",
            random_state=config.seed,
            use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_transformers(config: TrainConfig, model_path: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import model_utils

    tokenizer = model_utils.load_tokenizer(model_path, config.model.trust_remote_code)
    device = model_utils.detect_device()
    on_cuda = device.cuda
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=(torch.bfloat16 if device.bf16 else torch.float16) if on_cuda else torch.float32,
        use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code,
        device_map={"": torch.cuda.current_device()} if on_cuda else None,  # a DDP rank's own GPU
    )
    if config.full_finetuning:
        return model, tokenizer
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=resolve_target_modules(model, config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


def resolve_target_modules(model, target_modules: list[str]) -> list[str]:
    """The names of the model's linear layers LoRA adapts: all-linear becomes every linear layer's name but the
    output layer's (as PEFT means it, and a list Unsloth accepts too); UserError for a name the model lacks."""
    import torch

    output = model.get_output_embeddings()
    layers = {
        name.rsplit(".", 1)[-1]: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }
    if ALL_LINEAR_LAYERS in target_modules:
        return sorted(layers)
    missing = [name for name in target_modules if name not in layers]
    if missing:
        raise UserError(
            f"target_modules {', '.join(missing)} not found in this model; its linear layers are: "
            f"{', '.join(sorted(layers))} (or all-linear for every one of them)."
        )
    return list(target_modules)


def prepare_training_data(config: TrainConfig, tokenizer, workspace: Path):
    import dataset_report
    import dataset_utils

    settings = dataset_report.preparation_settings(config)
    prepared = dataset_utils.prepare_dataset(config.dataset, tokenizer, workspace=workspace, **settings)
    log.info(
        "dataset: %s, %d train rows, %d eval rows, %d skipped",
        prepared.format,
        len(prepared.train),
        len(prepared.eval) if prepared.eval is not None else 0,
        prepared.dropped_rows,
    )
    return prepared


# Special tokens may be all zeros on purpose (a padding row); Unsloth's check leaves them out too.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ZERO = 1e-16


def untrained_token_ids(model, tokenizer) -> set[int]:
    """Token ids the model never trained: an input embedding of zeros whose output row is zeros too or the same as
    another such token's (Unsloth's rule: a base model's reserved chat tokens look like this, and Llama 3's output
    rows for them are equal, not zero)."""
    import torch

    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        zero = (embedding.abs().amax(dim=1) <= ZERO).nonzero().flatten()
        if not len(zero):
            return set()
        output = model.get_output_embeddings()
        rows = output.weight[zero.to(output.weight.device)] if output is not None else embedding[zero]
        _, inverse, counts = torch.unique(
            rows.float().round(decimals=3), dim=0, return_inverse=True, return_counts=True
        )
        untrained = (rows.abs().amax(dim=1) <= ZERO) | (counts[inverse] > 1)
        ids = set(zero[untrained.to(zero.device)].tolist())
    return ids - {getattr(tokenizer, f"{name}_id", None) for name in SPECIAL_TOKEN_NAMES}


def check_untrained_tokens(config: TrainConfig, model, tokenizer, rows) -> None:
    """UserError before the first step when the rows use tokens the model never trained (untrained_token_ids): LoRA
    keeps the embeddings frozen, so they would stay zeros and the loss turns NaN (Unsloth stops such a run)."""
    if config.full_finetuning:  # a full fine-tune trains the embeddings too
        return
    untrained = untrained_token_ids(model, tokenizer)
    if not untrained:
        return
    found: set[int] = set()
    examples: list[int] = []
    for index, ids in enumerate(rows["input_ids"]):
        used = untrained.intersection(ids)
        if used:
            found |= used
            examples.append(index + 1)
    if not found:
        return
    tokens = ", ".join(repr(token) for token in tokenizer.convert_ids_to_tokens(sorted(found))[:8])
    shown = ", ".join(map(str, examples[:5])) + (" …" if len(examples) > 5 else "")
    raise UserError(
        f"This model never trained the token(s) {tokens} that {len(examples)} of your rows use (rows {shown}): their "
        "embeddings are all zeros, as in a base model whose chat-template tokens were only reserved. LoRA keeps the "
        "embeddings frozen, so the model cannot learn them and the loss would turn NaN. Start from the instruct "
        "version of this model, pick a chat template made of tokens this model knows (Dataset tab, Chat template), "
        "or turn on full fine-tuning, which trains the embeddings."
    )


def log_dataset_report(config: TrainConfig, prepared) -> None:
    """The dataset quality report of the job's prepared rows, into the run's log before training (see dataset_report)."""
    import dataset_report

    for line in dataset_report.report_of_preparation(config, prepared).lines():
        log.info(line)


def sft_trainer(config: TrainConfig, model, tokenizer, ctx: JobContext, backend: str):
    """SFT's trainer (its stage record names it): the dataset prepared by rank 0 first (the other ranks read its
    cache), its quality report in the log, rows with untrained tokens refused, then TRL's SFTTrainer."""
    from accelerate import PartialState

    state = PartialState()  # train() set it up before the model loaded
    with state.main_process_first():
        prepared = prepare_training_data(config, tokenizer, ctx.workspace)
    if state.is_main_process:
        log_dataset_report(config, prepared)
    check_untrained_tokens(config, model, tokenizer, prepared.train)
    ctx.reporter.progress(None, message="data prepared")
    return build_trainer(config, model, tokenizer, prepared, ctx, backend)


def build_trainer(config: TrainConfig, model, tokenizer, prepared, ctx: JobContext, backend: str):
    """TRL's SFTTrainer over prepared rows (train() adds the token count and the events callback)."""
    from trl import SFTConfig, SFTTrainer

    has_eval = prepared.eval is not None
    args = SFTConfig(
        **preference_utils.trainer_arguments(config, ctx.run_dir, backend, has_eval),
        max_length=config.max_seq_length,
        packing=config.packing,
        # Early stopping keeps the best checkpoint and reloads it at the end, so adapter/ holds the best weights.
        load_best_model_at_end=config.early_stopping and has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        ddp_find_unused_parameters=False,  # every LoRA weight is used; the search would cost a pass each step
    )
    columns = ["input_ids", "labels"]
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=prepared.train.select_columns(columns),
        eval_dataset=prepared.eval.select_columns(columns) if has_eval else None,
    )
    if config.early_stopping and has_eval:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(
            EarlyStoppingCallback(
                early_stopping_patience=config.early_stopping_patience,
                early_stopping_threshold=config.early_stopping_threshold,
            )
        )
    return trainer


def early_stop_message(config: TrainConfig, state) -> str:
    """Where and why the run stopped before max_steps with early stopping on, or "" when it did not."""
    if not config.early_stopping or state.global_step >= state.max_steps or state.best_metric is None:
        return ""
    best = Path(state.best_model_checkpoint or "").name.removeprefix("checkpoint-") or "?"
    return (
        f"Early stopping at step {state.global_step}: the eval loss did not improve by more than "
        f"{config.early_stopping_threshold:g} for {config.early_stopping_patience} evaluation(s). The saved weights "
        f"are the best checkpoint's (step {best}, eval loss {state.best_metric:.4f})."
    )


class TokenCounter:
    """The trainer's collator, counting each batch's tokens on the host: TRL logs `num_tokens` but Unsloth's trainer
    does not, and transformers' own count (include_num_input_tokens_seen) waits for the GPU at every batch."""

    def __init__(self, collate) -> None:
        self.collate = collate
        self.tokens = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens += batch_tokens(batch)
        return batch

    def __getattr__(self, name: str):  # the Trainer and Unsloth read the collator's own settings (padding_free, …)
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def batch_tokens(batch) -> int:
    """The tokens a collated batch runs through the model: its attention mask's, both sides' of a preference pair
    (ORPO: prompt + chosen, prompt + rejected), or every id of a padding-free batch (no mask); 0 for a batch of
    raw rows (GRPO collates prompts, not tokens)."""
    if not isinstance(batch, Mapping):
        return 0
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    pair = [batch[key] for key in ("chosen_attention_mask", "rejected_attention_mask") if key in batch]
    if pair:
        return int(sum(mask.sum() for mask in pair))
    ids = batch.get("input_ids")
    return int(ids.numel()) if hasattr(ids, "numel") else 0


def save_final(trainer, tokenizer, config: TrainConfig, run_dir: Path) -> Path:
    """Write adapter/ (LoRA) or merged/ (full fine-tune) atomically, with the tokenizer and the train config."""
    from workspace import config_to_dict, dump_yaml

    target = run_dir / ("merged" if config.full_finetuning else "adapter")
    with atomic_dir(target) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "train_config.yaml").write_text(dump_yaml(config_to_dict(config)))
    shutil.rmtree(run_dir / "checkpoints" / "tmp", ignore_errors=True)
    return target


# ---------------------------------------------------------------- events


def events_callback(ctx: JobContext, counter: TokenCounter | None = None, clock=None):
    """A TrainerCallback reporting start, logs and checkpoints, and stopping (with a checkpoint) when asked.

    Under DDP every rank runs it: rank 0 alone writes (its reporter writes, the others' do not), and the ranks agree
    on stopping at the same step."""
    from transformers import TrainerCallback

    reporter = ctx.reporter

    class RunEvents(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.first_step: int | None = None
            self.last_tokens: float | None = None
            self.last_time = self.started
            self.last_step = 0
            self.trl_counts = False  # whether TRL logs num_tokens: then the rate uses its count alone
            self.stop_group = None
            self.pending = None  # the stop vote under way: (its work handle, its ballot)

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_time = time.monotonic()
            self.first_step = self.last_step = state.global_step
            if world_size() > 1:
                import torch.distributed as dist

                # A CPU-side group: the per-step stop vote must not wait on the GPU.
                self.stop_group = dist.new_group(backend="gloo")
            if state.is_world_process_zero:
                reporter.start(state.global_step, state.max_steps, processes=world_size())

        def on_step_end(self, args, state, control, **kwargs):
            stop = ctx.stop.requested
            if self.stop_group is not None:
                stop = self.vote(stop)
            if stop:
                control.should_save = True
                control.should_training_stop = True

        def vote(self, stop: bool) -> bool:
            """Whether any rank has been asked to stop, agreed by all ranks at the same step: torchrun signals the
            ranks one after another, and a rank stopping alone would hang the others.

            Each step waits for the vote started one step earlier and starts the next one, so the all-reduce runs
            beside a training step instead of between two; a stop lands one step later."""
            import torch
            import torch.distributed as dist

            agreed = False
            if self.pending is not None:
                work, ballot = self.pending
                work.wait()
                agreed = bool(ballot.item())
            ballot = torch.tensor([int(stop)])
            self.pending = (dist.all_reduce(ballot, op=dist.ReduceOp.MAX, group=self.stop_group, async_op=True), ballot)
            return agreed

        def on_train_end(self, args, state, control, **kwargs):
            if self.pending is not None:  # every rank started the same votes: finish the last one together
                self.pending[0].wait()
                self.pending = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            check_finite_logs(logs, state.global_step)  # every rank logs the same gathered values: all stop together
            if not state.is_world_process_zero:
                return
            metrics: dict[str, Any] = {"epoch": round(state.epoch or 0, 4)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    metrics[key] = logs[key]
            metrics.update(stages.log_metrics(logs))  # DPO margins, GRPO rewards, KL, …
            interval = time.monotonic() - self.last_time
            metrics.update(self.rate(logs, state.global_step))
            if clock is not None and "loss" in logs:  # GRPO: the share of the interval spent generating
                metrics.update(clock.read(interval))
            metrics["memory_gib"] = _memory_gib()
            if self.stop_group is not None and _cuda():
                metrics["gpu_memory_gib"] = _gpu_memory_used_gib()
            # An eval loss is rare and worth showing at once; train losses reach progress.json once a second.
            reporter.log(state.global_step, state.max_steps, force="eval_loss" in metrics, **metrics)

        def rate(self, logs: dict[str, Any], step: int) -> dict[str, float]:
            """{"tokens_per_s": …} for a train log that follows training steps, else {}; restarts the interval.

            One count for the whole run: TRL's num_tokens (train batches only, over every rank) once it logs one,
            else the collator's (this rank's, times the ranks), which also sees eval batches. Mixing the two made
            the step after an evaluation negative. An eval log or the end-of-run summary (no new step) gets no
            rate: it trained nothing and would read "0 tokens/s"; it only moves the interval's start past itself."""
            if "num_tokens" in logs and not self.trl_counts:
                self.trl_counts, self.last_tokens = True, None  # a count of another kind: start over
            if self.trl_counts:
                tokens = logs.get("num_tokens", self.last_tokens)  # an eval log carries eval_num_tokens only
            else:
                tokens = counter.tokens * world_size() if counter is not None else None
            now = time.monotonic()
            rate = {}
            trained = "loss" in logs and step > self.last_step
            if trained and tokens is not None and self.last_tokens is not None and now > self.last_time:
                if tokens > self.last_tokens:
                    rate["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            if trained:
                self.last_step = step
            self.last_tokens, self.last_time = tokens, now
            return rate

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                reporter.checkpoint(state.global_step)

    return RunEvents()


def check_finite_logs(logs: dict[str, Any], step: int) -> None:
    """Raise UserError when the loss or the gradient norm is NaN or infinite: the weights are ruined from here on,
    and finishing the run would save an adapter that only produces garbage."""
    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise UserError(
                f"Training diverged at step {step}: {key} is {value}. Lower the learning rate (or raise the "
                "warm-up steps), check the dataset for empty or broken rows, and start a new run."
            )


def _gpu_memory_used_gib() -> list[float]:
    """Memory in use on each visible GPU, as the driver counts it (every rank's process, not only this one's)."""
    import torch

    used = []
    for index in range(torch.cuda.device_count()):
        try:
            used.append(round(torch.cuda.device_memory_used(index) / 1024**3, 2))
        except Exception:  # no NVML: leave the list shorter rather than fail a training step
            break
    return used


def _memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
