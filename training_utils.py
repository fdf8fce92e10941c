"""Training: TrainConfig → model (Unsloth on CUDA, transformers + PEFT otherwise) → the stage's trainer over its
prepared data (TRL's SFTTrainer for SFT: `sft_trainer`; the others' in preference_utils, named by their records in
`stages`) → a callback that writes the run's events and honours stop requests → save. Reads top to bottom in `train`."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import preference_utils
import stages
from dataset_utils import prepare_training_data
from distributed import (
    STRATEGY_ENV,
    Heartbeat,
    ddp_fallback,
    distributed_state,
    fsdp_arguments,
    fsdp_fallback,
    gpu_launch,
    lost_node_error,
    resolve_strategy,
    sharded,
    strategy,
    world_size,
)
from model_utils import fit_checkpointing, fit_micro_batch
from runfolder import JobContext, last_checkpoint, read_status
from train_config import ALL_LINEAR_LAYERS, TrainConfig
from workspace import UserError, atomic_dir

log = logging.getLogger(__name__)


def _cuda() -> bool:
    import model_utils

    return model_utils.detect_device().cuda


# ---------------------------------------------------------------- the run


def launch_plan(settings: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """(processes, environment) for a training job: one process per GPU it trains on, and on several processes (or
    nodes) the strategy every rank uses, `auto` resolved here once."""
    processes, env = gpu_launch(int(settings.get("num_gpus") or 0))
    if processes * int(settings.get("nnodes") or 1) > 1:
        env[STRATEGY_ENV] = launch_strategy(settings)
    return processes, env


def launch_strategy(settings: dict[str, Any]) -> str:
    """ddp or fsdp for a multi-process run: `auto` asks the memory estimate whether the model fits one GPU."""
    import model_utils
    from train_config import train_config_from_dict

    config = train_config_from_dict(settings)
    fits = True
    if config.distributed == "auto" and config.stage == "sft":
        fits = model_utils.estimate_memory(config, model_utils.model_reference(config.model.name_or_path)).fits
    chosen = resolve_strategy(config.distributed, config.stage, fits)
    log.info("multi-GPU strategy: %s (distributed: %s)", chosen, config.distributed)
    return chosen


def train_job(config: TrainConfig, ctx: JobContext) -> str:
    """The training stage's job: picks the backend before any ML library is imported, then trains."""
    import model_utils

    fallback = fsdp_fallback(config.distributed) or ddp_fallback()
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
    state = distributed_state(_cuda())
    ctx.note(backend=backend, processes=state.num_processes, device="GPU" if _cuda() else "CPU")
    if strategy():
        log.info("%s over %d processes on %d node(s)", strategy(), world_size(), _nodes())

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
    train_watched(trainer, str(checkpoint) if checkpoint else None)

    # A stop that lands on the last step finishes the run: resuming from a checkpoint at max_steps would make the
    # Trainer run one step past it.
    if ctx.stop.requested and trainer.state.global_step < trainer.state.max_steps:
        return "stopped"
    stopped_early = early_stop_message(config, trainer.state)
    if stopped_early and trainer.is_world_process_zero():
        log.info(stopped_early)
        ctx.note(note=stopped_early)
        ctx.reporter.progress(trainer.state.global_step, trainer.state.max_steps, stopped_early, force=True)
    # Sharded, every rank takes part in gathering the weights; rank 0 saves them.
    weights = full_state_dict(trainer, not config.full_finetuning) if sharded() else None
    if trainer.is_world_process_zero():
        save_final(trainer, tokenizer, config, run_dir, weights)
    return "done"


def train_watched(trainer, checkpoint: str | None) -> None:
    """trainer.train, and on several processes a heartbeat per rank: when a peer dies, the error names its node."""
    heartbeat = Heartbeat() if world_size() > 1 else None
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as exc:
        lost = lost_node_error(heartbeat, exc)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        if heartbeat is not None:
            heartbeat.close()


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
            use_rslora=config.use_rslora,  # DoRA is refused on Unsloth (train_config.check_lora_variant)
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
    dtype = (torch.bfloat16 if device.bf16 else torch.float16) if on_cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=config.model.trust_remote_code,
        # A DDP rank's own GPU; FSDP loads into host memory and moves each rank's shard onto its GPU when it wraps
        # (bitsandbytes quantizes on the GPU, so a 4-bit model loads there first).
        device_map={"": torch.cuda.current_device()} if on_cuda and (config.load_in_4bit or not sharded()) else None,
        quantization_config=qlora_quantization(dtype, sharded()) if config.load_in_4bit else None,
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
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    return get_peft_model(model, lora), tokenizer


def qlora_quantization(compute_dtype, sharded_model: bool):
    """bitsandbytes' 4-bit NF4 settings for QLoRA on transformers + PEFT. Sharded (FSDP-QLoRA), the packed 4-bit
    weights are stored in the compute dtype (bnb_4bit_quant_storage): FSDP shards only tensors of one float dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if sharded_model else torch.uint8,
    )


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
        # FSDP's arguments replace some shared ones (gradient checkpointing's kind).
        **{
            **preference_utils.trainer_arguments(config, ctx.run_dir, backend, has_eval),
            **sharding_arguments(config, model),
        },
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
    if sharded() and not _cuda():
        shard_on_cpu(trainer)
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


def save_final(trainer, tokenizer, config: TrainConfig, run_dir: Path, weights: dict | None = None) -> Path:
    """Write adapter/ (LoRA) or merged/ (full fine-tune) atomically, with the tokenizer and the train config;
    `weights`: the gathered full state dict of a sharded (FSDP) model, saved in the one-GPU format."""
    from workspace import config_to_dict, dump_yaml

    target = run_dir / ("merged" if config.full_finetuning else "adapter")
    model = trainer.accelerator.unwrap_model(trainer.model) if weights is not None else trainer.model
    with atomic_dir(target) as tmp:
        gathered = {"state_dict": weights} if weights is not None else {}
        model.save_pretrained(str(tmp), safe_serialization=True, **gathered)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "train_config.yaml").write_text(dump_yaml(config_to_dict(config)))
    shutil.rmtree(run_dir / "checkpoints" / "tmp", ignore_errors=True)
    return target


# ---------------------------------------------------------------- FSDP


def sharding_arguments(config: TrainConfig, model) -> dict[str, Any]:
    """The TrainingArguments that shard the model with FSDP2 when this run's ranks do (distributed.strategy), else {}."""
    if not sharded():
        return {}
    return fsdp_arguments(decoder_layer_classes(model), config.gradient_checkpointing)


def shard_on_cpu(trainer) -> None:
    """Turn on the Trainer's FSDP2 path on CPU ranks (gloo), as on GPUs. accelerate (1.16) keeps the FSDP plugin
    only for GPU-like process types and drops it on CPU ranks, so they would train with DDP; torch's FSDP2 itself runs
    over gloo. The plugin is the one the Trainer built from the same arguments."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def decoder_layer_classes(model) -> list[str]:
    """The class names of the model's repeated blocks (transformers names them in _no_split_modules): FSDP shards
    each one as a unit, gathered for its forward and freed after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise UserError(
            f"FSDP needs the model's decoder-layer class and {type(base).__name__} does not name it; "
            "train it with distributed: ddp."
        )
    return names


def full_state_dict(trainer, lora: bool) -> dict:
    """The model's weights gathered from the FSDP shards onto rank 0 (the others get {}), as plain CPU tensors;
    `lora`: the LoRA weights alone, all a saved adapter holds. Every rank must call it: gathering is collective."""
    from torch.distributed.tensor import DTensor

    state = trainer.accelerator.get_state_dict(trainer.model) or {}
    main = trainer.is_world_process_zero()
    weights = {}
    for key, value in state.items():  # the same keys in the same order on every rank
        if lora and "lora_" not in key:
            continue
        # Weights FSDP left sharded (here: the LoRA ones) come back as DTensors; gathering one is collective too.
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            weights[key] = value.detach().to("cpu").clone()
    return weights


def _nodes() -> int:
    import os

    return max(1, world_size() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


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
