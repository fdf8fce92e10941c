"""What a training run is: TrainConfig (every option, names from TRL / PEFT, each with its help, bounds and choices),
the checks `validate()` runs before a job exists and the YAML shorthand (`train_config_from_dict`); the SFT rows its
settings prepare are dataset_utils.prepare_training_data's. No ML library is imported here: the UI, the CLI, planning,
chat and evaluation read a run's config without training_utils."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import llm_clients
import stages
from dataset_files import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED, DatasetConfig
from distributed import DISTRIBUTED, check_distributed, check_num_gpus
from model_utils import Device, ModelConfig, backend_plan, detect_device
from settings import check, option
from workspace import UserError, config_from_dict

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT's name for every linear layer but the output layer: Phi-3/Phi-4 fuse q/k/v into qkv_proj and gate/up into
# gate_up_proj, so only this default exists in every catalogue family (resolve_target_modules turns it into names).
ALL_LINEAR_LAYERS = "all-linear"
FUSED_LINEAR = ["qkv_proj", "gate_up_proj"]  # Phi-3 / Phi-4's layers in place of q/k/v_proj and gate/up_proj
# transformers' integrations that report_to may name: tracker → (the module it imports, the pip package to install).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


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
    # PEFT's LoraConfig names. rsLoRA scales the delta by alpha/sqrt(r) instead of alpha/r, so a high rank still
    # learns; DoRA splits each weight into a magnitude and a direction and trains both (a slower step, closer to a
    # full fine-tune at low rank).
    use_rslora: bool = option(
        False,
        help="rsLoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r, which keeps high ranks (64+) learning.",
        label="rsLoRA",
        advanced=True,
    )
    use_dora: bool = option(
        False,
        help="DoRA: train each weight's magnitude beside the LoRA direction; better at low rank, slower steps. "
        "Needs the transformers + PEFT backend (Unsloth cannot train it).",
        label="DoRA",
        advanced=True,
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
    # A comma-separated string rather than a list: "none" and "tensorboard" in older configs keep loading.
    report_to: str = option(
        "none",
        help="Experiment trackers, comma-separated: tensorboard (run folder/tensorboard), wandb, mlflow, trackio; "
        "none = only the app's own log (MLflow's default store: workspace/mlruns). Keys and servers come from the environment (WANDB_API_KEY or WANDB_MODE="
        "offline, MLFLOW_TRACKING_URI, TRACKIO_SPACE_ID), never from here.",
        label="Report to",
        advanced=True,
    )
    num_gpus: int = option(
        0,
        help="0 = every visible GPU; more than one trains with DDP or FSDP (distributed), one process per GPU (torchrun).",
        minimum=0,
        label="GPUs",
        advanced=True,
    )
    # Several processes: names from torchrun (--nnodes, --rdzv-endpoint) and transformers (fsdp).
    distributed: str = option(
        "auto",
        help="With several GPUs: ddp = every GPU holds the whole model (fastest when it fits); fsdp = the weights, "
        "gradients and optimizer state are sharded over the GPUs (FSDP2, transformers + PEFT) so a model larger "
        "than one GPU trains; auto = fsdp when the memory estimate does not fit one GPU, else ddp.",
        choices=DISTRIBUTED,
        label="Multi-GPU strategy",
        advanced=True,
    )
    nnodes: int = option(
        1,
        help="Machines the run spans (torchrun --nnodes); each other machine runs the command this app shows "
        "(main.py node-command RUN).",
        minimum=1,
        label="Nodes",
        advanced=True,
    )
    rdzv_endpoint: str = option(
        "",
        help="With several nodes: host:port of this (the first) machine that every node can reach (torchrun "
        "--rdzv-endpoint, static rendezvous: rank 0 stays on this machine).",
        label="Rendezvous endpoint",
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
        choices=llm_clients.PROVIDERS,
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
        check_lora_variant(self, backend_plan()[0])
        check_report_to(self.report_to)
        check_early_stopping(self)
        if self.num_gpus:
            check_num_gpus(self.num_gpus)
        check_distributed(self, device)
        stages.get(self.stage).check(self)


def check_lora_variant(config: TrainConfig, backend: str) -> None:
    """rsLoRA and DoRA change the LoRA adapter: refused for a full fine-tune, a run that continues another run's
    adapter (its own settings hold), and DoRA on Unsloth, whose fused LoRA kernels have no magnitude vector."""
    chosen = [name for name in ("use_rslora", "use_dora") if getattr(config, name)]
    if not chosen:
        return
    if config.full_finetuning:
        raise UserError(f"{' and '.join(chosen)} change(s) the LoRA adapter; a full fine-tune has none. Turn it off.")
    if config.start_from_run:
        raise UserError(
            f"This run continues the adapter of run '{config.start_from_run}', which keeps that run's own LoRA "
            f"settings: turn {' and '.join(chosen)} off here (set it on the SFT run instead)."
        )
    if config.use_dora and backend == "unsloth":
        raise UserError(
            "DoRA cannot train on Unsloth (its fused LoRA kernels have no DoRA magnitude). Turn DoRA off, or train "
            "with transformers + PEFT: set FINETUNER_BACKEND=transformers before starting the app."
        )


def report_to_list(report_to: str) -> list[str]:
    """The trackers a report_to value names ("none" = none), as transformers' TrainingArguments takes them."""
    names = [name.strip().lower() for name in str(report_to).split(",") if name.strip()]
    return [] if names == ["none"] else names


def check_report_to(report_to: str) -> None:
    """UserError for a tracker transformers cannot report to here: an unknown name, "none" beside others, a package
    that is not installed (named for pip), W&B with no key in the environment and no offline mode."""
    import importlib.util
    import os

    names = report_to_list(report_to)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise UserError(
            f"report_to: unknown tracker(s) {', '.join(unknown)}; choose among {', '.join(TRACKERS)} (comma-"
            "separated), or none."
        )
    if len(set(names)) != len(names):
        raise UserError(f"report_to names a tracker twice: {report_to}.")
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"report_to {name} needs the {package} package, which is not installed: `pip install {package}`, "
                "or leave it out."
            )
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if "wandb" in names and not offline and not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in():
        raise UserError(
            "report_to wandb: no W&B key found. Set WANDB_API_KEY in the environment the app runs in (or run "
            "`wandb login`), or WANDB_MODE=offline to log locally and `wandb sync` later."
        )


def _wandb_logged_in() -> bool:
    """Whether `wandb login` stored a key (in ~/.netrc, where wandb keeps it)."""
    import netrc
    import os

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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
