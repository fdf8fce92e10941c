"""Preference tuning (DPO, ORPO, KTO) and RL (GRPO) through TRL's own trainers, as stages of a training run.

training_utils.train stays the one recipe (config → model → data → trainer → callbacks → save); for a stage other
than SFT it asks this module for the starting model (`start_model`, e.g. an SFT run's adapter), and the stage's
record (stages) names this module's checks and trainers (`dpo_trainer`, …: the data from preference_data, then TRL's
trainer). The run folder, stop / resume, events and export are the SFT run's own. This module imports no ML library
at module level (Unsloth must come first) and not training_utils.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import llm_clients
import rewards
import stages
import train_config
from runfolder import JobContext, run_path, run_workspace
from workspace import UserError, path_is_file, paths_confined, resolve_user_path

log = logging.getLogger(__name__)

JUDGE_PROVIDERS = llm_clients.PROVIDERS
# A score is a few characters; the room is for a model that writes a word or two before it.
JUDGE_MAX_TOKENS = 64


def check_sft(config) -> None:
    """SFT's check: start_from_run belongs to the stages that continue an SFT run's adapter."""
    if config.start_from_run:
        starting = [stage for stage in stages.all_stages() if "start_from_run" in stage.settings]
        raise UserError(f"start_from_run is for {stages.titles(starting)} runs; clear it for SFT.")


def check_trl_stage(config) -> None:
    """What a stage on TRL's own trainers refuses: packing, several GPUs, a start from a run without a LoRA adapter."""
    if config.packing:
        raise UserError(f"Packing is for SFT only; turn it off for {config.stage.upper()}.")
    if config.num_gpus > 1:
        raise UserError(
            f"{config.stage.upper()} trains on one GPU here; set num_gpus to 1 (or 0 on a one-GPU machine)."
        )
    if config.start_from_run and config.full_finetuning:
        raise UserError("start_from_run continues an SFT run's LoRA adapter; turn off full fine-tuning.")
    if config.start_from_run:
        start_adapter(config, None)


def check_preference(config) -> None:
    """DPO's and ORPO's check: the settings, then a local file's pairs."""
    check_trl_stage(config)
    check_data(config)


def check_kto(config) -> None:
    """KTO's check: the settings (a batch of two rows at least), then a local file's rows."""
    check_trl_stage(config)
    if config.per_device_train_batch_size < 2:
        raise UserError(
            "KTO estimates its KL term from other rows of the same batch: set per_device_train_batch_size to 2 or more."
        )
    check_data(config)


def check_grpo(config) -> None:
    """GRPO's check: the settings, its rewards and generation, then a local file's prompts."""
    check_trl_stage(config)
    check_rewards(config)
    check_data(config)
    check_references(config)


def check_references(config) -> None:
    """Refuse a local file whose rows give an equals / contains reward no reference answer (every completion would
    score 0); a Hub dataset's rows are checked by the reward in the job."""
    import dataset_utils
    import preference_data

    source = Path(str(config.dataset.source).strip()).expanduser()
    if not path_is_file(source) or not set(config.reward_funcs) & set(rewards.REFERENCE_REWARDS):
        return
    raw = dataset_utils.load_rows(config.dataset)
    columns = list(raw.column_names)
    column = config.reference_column or next(
        (name for name in preference_data.REFERENCE_COLUMNS if name in columns), ""
    )
    _, rows = preference_data.convert_rows(raw.to_list(), columns, "grpo", config.dataset, config.reference_column)
    rewards.check_references(config.reward_funcs, rows, columns, column)


def check_data(config) -> None:
    """Refuse a local file whose rows cannot train this stage (an empty side, identical replies) before a job
    exists; a Hub dataset is read, and checked, by the job."""
    import preference_data

    source = Path(str(config.dataset.source).strip()).expanduser()
    if path_is_file(source):  # False for a name too long to look up: a Hub id's form is checked at Start
        preference_data.check_rows(config.dataset, config.stage, config.reference_column)


def check_rewards(config) -> None:
    """UserError for GRPO rewards or generation settings that cannot work (before a job exists)."""
    unknown = [name for name in config.reward_funcs if name not in rewards.BUILTIN_REWARDS]
    if unknown:
        raise UserError(f"Unknown reward '{unknown[0]}'; choose from: {', '.join(rewards.BUILTIN_REWARDS)}.")
    names = [*config.reward_funcs, *reward_file_names(config)]
    if not names:
        raise UserError("GRPO needs at least one reward function (reward_funcs, or a reward_file), e.g. format.")
    config.reward_weights = rewards.check_weights(config.reward_weights)
    if config.reward_weights and len(config.reward_weights) != len(names):
        raise UserError(
            f"reward_weights has {len(config.reward_weights)} values for {len(names)} reward functions "
            f"({', '.join(names)}): give one weight per function, in that order, or none for equal weights."
        )
    builtin_rewards(config)  # a pattern that does not compile, a length range upside down, a judge without a model
    generation_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.num_generations < 2:
        raise UserError("num_generations must be at least 2: GRPO compares completions of the same prompt.")
    if generation_batch % config.num_generations:
        raise UserError(
            f"Batch size × gradient accumulation ({generation_batch}) must be a multiple of num_generations "
            f"({config.num_generations}): each prompt's completions are scored together."
        )
    if config.max_completion_length >= config.max_seq_length:
        raise UserError("max_completion_length must be below max_seq_length (the prompt needs room too).")


def reward_file_names(config) -> list[str]:
    """The reward file's functions (read, not run); refused in a shared app and unless allow_reward_file is on.

    The path is made absolute here, on the way to the run folder: the job runs from the app's folder."""
    if not config.reward_file:
        if config.reward_file_functions:
            raise UserError("reward_file_functions names functions of a reward_file; give the file, or clear them.")
        return []
    if paths_confined():
        raise UserError(
            "Reward functions from a file are refused in a shared app: they would run Python code on this server "
            "for anyone who can log in. Clear reward_file, or run the app unshared on your own machine."
        )
    if not config.allow_reward_file:
        raise UserError(
            f"reward_file '{config.reward_file}' is Python code that would run in the training job: turn on "
            "allow_reward_file (Run reward file code) if you trust it, or clear reward_file."
        )
    path = resolve_user_path(config.reward_file)
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"reward_file '{config.reward_file}' must be a Python (.py) file.")
    config.reward_file = str(path)
    return rewards.file_reward_names(path, config.reward_file_functions)


def judge_settings(config) -> rewards.JudgeSettings:
    """The judge reward's settings: the LLM client (provider, model, URL; temperature 0), the rubric and the score
    range; UserError for a judge that cannot be asked."""
    if not str(config.judge_model).strip():
        raise UserError("The judge reward needs a judge model (judge_model), e.g. gpt-4o-mini or llama3.2.")
    client = llm_clients.ClientConfig(
        provider=config.judge_provider,
        model=config.judge_model,
        base_url=config.judge_base_url,
        response_format="none",
        temperature=0.0,
        max_tokens=JUDGE_MAX_TOKENS,
    )
    client.validate()
    return rewards.JudgeSettings(client, config.judge_rubric, config.judge_min_score, config.judge_max_score)


def uses_judge(config) -> bool:
    return stages.get(config.stage).reward_functions and "judge" in config.reward_funcs


def job_env(config, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the judge's API key to the job's process (never to its folder)."""
    return llm_clients.job_env(judge_settings(config).client, api_key) if uses_judge(config) else {}


def check_judge(config, api_key: str | None = None) -> None:
    """UserError now (before a job exists) when the judge reward's server cannot answer: nothing listening at
    judge_base_url, a refused key, an unknown model. Quick for a closed port; at most a few seconds otherwise."""
    if uses_judge(config):
        rewards.check_judge(judge_settings(config), api_key)


def builtin_rewards(config) -> list:
    settings = rewards.RewardSettings(
        config.reward_pattern,
        config.reward_min_length,
        config.reward_max_length,
        judge_settings(config) if "judge" in config.reward_funcs else None,
    )
    return [rewards.make_reward(name, settings) for name in config.reward_funcs]


def reward_functions(config) -> list:
    """Every reward of a GRPO run, in reward_weights' order: the built-in ones chosen, then the reward file's
    (imported here, in the job: its code runs)."""
    functions = builtin_rewards(config)
    if "judge" in config.reward_funcs:
        check_judge(config)  # a judge gone since the run was submitted fails the job before training starts
    if config.reward_file:
        functions += rewards.file_rewards(Path(config.reward_file), reward_file_names(config))
    return functions


# ---------------------------------------------------------------- model


def start_adapter(config, workspace: Path | None) -> Path:
    """The adapter/ folder of the SFT run named in start_from_run (checked: a finished LoRA training run)."""
    trained = stages.causal_lm(run_path(config.start_from_run, workspace))
    if trained.kind != "adapter":
        raise UserError(
            f"Run '{trained.run_dir.name}' is a full fine-tune; start from its merged model as the base model instead."
        )
    return trained.path


def start_model(config, model_path: str, backend: str, workspace: Path):
    """(model with the SFT run's adapter, trainable, tokenizer) for a run that starts from another run."""
    adapter = start_adapter(config, workspace)
    log.info("starting from the adapter of %s", adapter)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter),
            max_seq_length=config.max_seq_length,
            dtype=None,
            load_in_4bit=config.load_in_4bit,
            trust_remote_code=config.model.trust_remote_code,
        )
        FastLanguageModel.for_training(model)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        import model_utils

        # save_final keeps the SFT run's tokenizer (its chat template) beside the adapter.
        source = adapter if (adapter / "tokenizer_config.json").exists() else Path(model_path)
        tokenizer = model_utils.load_tokenizer(str(source), config.model.trust_remote_code)
        on_cuda = model_utils.detect_device().cuda
        base = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=(torch.bfloat16 if model_utils.detect_device().bf16 else torch.float16) if on_cuda else torch.float32,
            use_safetensors=True,
            trust_remote_code=config.model.trust_remote_code,
            device_map={"": torch.cuda.current_device()} if on_cuda else None,
        )
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---------------------------------------------------------------- data


def prepare_data(config, tokenizer, workspace: Path):
    import preference_data

    return preference_data.prepare_preference_data(
        config.dataset,
        config.stage,
        tokenizer,
        eval_split=config.eval_split,
        seed=config.seed,
        workspace=workspace,
        reference_column=config.reference_column,
    )


# ---------------------------------------------------------------- trainer


def tracker_places(report_to: list[str], run_dir: Path) -> None:
    """Where the local trackers write, when the environment does not say: TensorBoard's and W&B's files in the run
    folder; MLflow's file store in the workspace (one experiment list over all runs). Keys are never set here."""
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # transformers 5 reads it from here
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    if "mlflow" in report_to:
        uri = os.environ.setdefault("MLFLOW_TRACKING_URI", (run_workspace(run_dir) / "mlruns").as_uri())
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store for those who ask for it; mlflow-skinny has no SQLite store to offer.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def trainer_arguments(config, run_dir: Path, backend: str, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every stage shares, SFT's too (training_utils.build_trainer adds its own; it imports
    this module, never the other way round)."""
    import model_utils

    device = model_utils.detect_device()
    report_to = train_config.report_to_list(config.report_to)
    tracker_places(report_to, run_dir)
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=config.learning_rate,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        optim=config.optim,
        # TRL turns bf16 on by default; on CPU bf16 autocast made a demo step 20x slower (measured on the demo model).
        bf16=device.bf16,
        fp16=device.cuda and not device.bf16,
        # Unsloth applies its own checkpointing in get_peft_model.
        gradient_checkpointing=config.gradient_checkpointing and backend != "unsloth",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.save_steps) if has_eval else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        seed=config.seed,
        report_to=report_to,
        run_name=run_dir.name,  # the trackers' name for the run
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=not device.cuda,  # several CPU processes then train with DDP over gloo
    )


def _trl_setup(config, tokenizer, ctx: JobContext, backend: str):
    """(the arguments every TRL stage's config shares, the trainer's datasets): the run's data prepared for its stage."""
    data = prepare_data(config, tokenizer, ctx.workspace)
    common = {**trainer_arguments(config, ctx.run_dir, backend, data.eval is not None), "beta": config.beta}
    return common, {"train_dataset": data.train, "eval_dataset": data.eval}


def dpo_trainer(config, model, tokenizer, ctx: JobContext, backend: str):
    """DPO's trainer over the run's pairs (training_utils adds its events callback)."""
    from trl import DPOConfig, DPOTrainer

    return _preference_trainer(DPOConfig, DPOTrainer, config, model, tokenizer, ctx, backend)


def orpo_trainer(config, model, tokenizer, ctx: JobContext, backend: str):
    """ORPO's trainer over the run's pairs."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return _preference_trainer(ORPOConfig, ORPOTrainer, config, model, tokenizer, ctx, backend)


def kto_trainer(config, model, tokenizer, ctx: JobContext, backend: str):
    """KTO's trainer over the run's unpaired rows (pairs split in two). A LoRA model is its own reference (the
    adapter switched off); a full fine-tune gets a frozen copy."""
    from trl import KTOConfig, KTOTrainer

    return _preference_trainer(KTOConfig, KTOTrainer, config, model, tokenizer, ctx, backend)


def _preference_trainer(config_class, trainer_class, config, model, tokenizer, ctx: JobContext, backend: str):
    """A TRL preference trainer (DPO, ORPO, KTO) over the run's prepared rows: they differ only in their classes."""
    common, datasets = _trl_setup(config, tokenizer, ctx, backend)
    args = config_class(**common, max_length=config.max_seq_length)
    return trainer_class(model=model, args=args, processing_class=tokenizer, **datasets)


def grpo_trainer(config, model, tokenizer, ctx: JobContext, backend: str):
    """GRPO's trainer over the run's prompts, scored by its reward functions."""
    from trl import GRPOConfig, GRPOTrainer

    common, datasets = _trl_setup(config, tokenizer, ctx, backend)
    args = GRPOConfig(
        **common,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        reward_weights=list(config.reward_weights) or None,
    )
    return GRPOTrainer(
        model=model, reward_funcs=reward_functions(config), args=args, processing_class=tokenizer, **datasets
    )


class GenerationClock:
    """Seconds a GRPO trainer spends generating completions, and how many it generated, since the last read: where
    an RL step's time goes (generation, not the gradient step, is usually most of it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.completions = 0

    def attach(self, trainer) -> GenerationClock:
        generate = getattr(trainer, "_generate_single_turn", None)
        if generate is None:  # a TRL without this method: no figure rather than a wrong one
            return self

        def timed(prompt_ids, *args, **kwargs):
            started = time.perf_counter()
            result = generate(prompt_ids, *args, **kwargs)  # ends in .tolist() / .cpu(): the GPU is done
            self.seconds += time.perf_counter() - started
            self.completions += len(result[0]) if isinstance(result, tuple) else len(prompt_ids)
            return result

        trainer._generate_single_turn = timed
        return self

    def read(self, interval_s: float) -> dict[str, float]:
        """{"generation_share": …, "completions_per_s": …} over the last `interval_s` seconds; restarts the count."""
        metrics = {}
        if self.completions and interval_s > 0:
            metrics = {
                "generation_share": round(min(self.seconds / interval_s, 1.0), 3),
                "completions_per_s": round(self.completions / interval_s, 2),
            }
        self.seconds, self.completions = 0.0, 0
        return metrics
