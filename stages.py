"""Training stages (SFT, DPO, ORPO, KTO, GRPO): one record each, and the registry every reader looks them up in.

A record says what a stage trains on, what it refuses before a job exists, how its trainer is built, what it logs,
what it produces and which settings the Train tab shows for it. Training, planning, the comparison, chat, export and
the arena read the record instead of testing the stage's name, so a new stage is one `register(Stage(...))`
(docs/ARCHITECTURE.md, "Adding a training stage").

This module sits low in the layers (it imports only `runfolder` and `workspace`): training, planning, the comparison
and the UI read the records without importing an ML library. A record's checks and trainer live with the code that trains
(preference_utils, training_utils) and are named here as "module:function" (`later`), imported on their first call,
in the training job or in the check before it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runfolder import TrainedModel, run_stage, trained_model
from workspace import UserError, import_function


def later(target: str) -> Callable[..., Any]:
    """The function `target` ("module:function"), imported when first called rather than now."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return import_function(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = target
    call.target = target  # type: ignore[attr-defined]  # tests resolve it without calling it
    return call


@dataclass(frozen=True)
class Stage:
    """What the rest of the app knows about one training stage."""

    name: str  # the `stage` setting's value
    title: str  # how messages and the UI name it
    help: str  # what it trains, a clause of the stage setting's help
    # The rows it trains on: dataset_utils.FORMATS (SFT), or preference_data's formats. The first is the one its
    # trainer takes; a row of another listed format is converted to it (KTO reads a pair as two unpaired rows).
    data_formats: tuple[str, ...]
    check: Callable[[Any], None]  # (TrainConfig) → None; UserError for a setting this stage cannot train with
    trainer: Callable[..., Any]  # (config, model, tokenizer, ctx, backend) → a transformers Trainer over its data
    metrics: Mapping[str, str] = field(default_factory=dict)  # its trainer's log key → the run's event metric
    # Event metric → its name in the live view and the comparison, in the order they show it.
    metric_labels: Mapping[str, str] = field(default_factory=dict)
    reward_functions: bool = False  # logs each reward function's mean (rewards/<name>/mean → reward_<name>)
    causal_lm: bool = True  # its adapter / merged model generates text: chat, export and the arena can load it
    memory_estimate: bool = False  # model_utils.estimate_memory describes its step: the micro-batch is fitted by it
    eval_loss: bool = False  # its eval loss is what early stopping watches
    counts_tokens: bool = False  # its trainer logs no token count: the collator's count gives its tokens/s
    generates: bool = False  # its steps generate completions: the run logs the share of time spent generating
    settings: tuple[str, ...] = ()  # TrainConfig fields of its own, shown in the Train tab's stage section

    def __post_init__(self) -> None:  # a record's tables cannot be changed behind the registry's back
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "metric_labels", MappingProxyType(dict(self.metric_labels)))


_REGISTRY: dict[str, Stage] = {}
# What is read from every record (the metric tables) on each event of each run compared: made once per registry.
_DERIVED: dict[str, Any] = {}


def register(stage: Stage) -> Stage:
    """Add `stage` (or replace the one of its name); every reader sees it from now on."""
    _REGISTRY[stage.name] = stage
    _DERIVED.clear()
    return stage


def unregister(name: str) -> None:
    """Remove a stage (a test's own, when it is done)."""
    _REGISTRY.pop(name, None)
    _DERIVED.clear()


def names() -> tuple[str, ...]:
    """The stages' names in the order they were registered: the `stage` setting's choices."""
    return tuple(_REGISTRY)


def get(name: str) -> Stage:
    """The stage called `name`; UserError naming the known ones."""
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise UserError(f"Unknown stage '{name}'; one of: {', '.join(_REGISTRY)}.") from None


def all_stages() -> tuple[Stage, ...]:
    return tuple(_REGISTRY.values())


def titles(stages: list[Stage] | tuple[Stage, ...]) -> str:
    """'DPO, ORPO and KTO'."""
    named = [stage.title for stage in stages]
    return " and ".join(filter(None, [", ".join(named[:-1]), *named[-1:]]))


def help_text() -> str:
    """The stage setting's help: each stage's name and what it trains."""
    return "; ".join(f"{stage.name}: {stage.help}" for stage in _REGISTRY.values()) + "."


def metric_labels() -> dict[str, str]:
    """Every stage's own event metrics → their labels, in the order the live view and the comparison show them."""
    return dict(_labels())


def _labels() -> dict[str, str]:
    """Every stage's own event metrics → their labels, each once, keeping each stage's order: a metric new to the
    list goes before the next one of its stage that is already there (GRPO's mean reward before the KL it shares
    with KTO), else at the end."""
    if "labels" not in _DERIVED:
        order: list[str] = []
        labels: dict[str, str] = {}
        for stage in _REGISTRY.values():
            keys = list(stage.metric_labels)
            for index, key in enumerate(keys):
                if key in labels:
                    continue
                labels[key] = stage.metric_labels[key]
                known = [order.index(later_key) for later_key in keys[index + 1 :] if later_key in order]
                order.insert(min(known) if known else len(order), key)
        _DERIVED["labels"] = {key: labels[key] for key in order}
    return _DERIVED["labels"]


def _logged_names() -> dict[str, str]:
    """Every stage's trainer log key → event metric (TRL's keys do not clash between its trainers)."""
    if "logged" not in _DERIVED:
        _DERIVED["logged"] = {key: name for stage in _REGISTRY.values() for key, name in stage.metrics.items()}
    return _DERIVED["logged"]


def log_metrics(logs: Mapping[str, Any]) -> dict[str, float]:
    """A trainer log's stage metrics under the run's event names; a reward function's mean rewards/<name>/mean
    becomes reward_<name>."""
    metrics = {name: logs[key] for key, name in _logged_names().items() if isinstance(logs.get(key), (int, float))}
    if any(stage.reward_functions for stage in _REGISTRY.values()):
        for key, value in logs.items():
            if key.startswith("rewards/") and key.endswith("/mean") and isinstance(value, (int, float)):
                metrics[f"reward_{key.split('/')[1]}"] = value
    return metrics


def is_metric(key: str) -> bool:
    """Whether an event metric is a stage's own: a labelled one, or a reward function's mean (reward_<name>; not
    one a stage logs without showing it, such as DPO's reward_chosen)."""
    if "unlabelled" not in _DERIVED:
        _DERIVED["unlabelled"] = set(_logged_names().values()) - set(_labels())
    return key in _labels() or (key.startswith("reward_") and key not in _DERIVED["unlabelled"])


def metric_order(key: str) -> tuple[int, str]:
    """Sort key of a stage metric: the labelled ones in their order, then the reward functions' by name."""
    labels = list(_labels())
    return (labels.index(key), "") if key in labels else (len(labels), key)


def metric_label(key: str) -> str:
    """'reward_margin' → 'reward margin'; a reward function's mean 'reward_format' → 'format reward'."""
    return _labels().get(key) or f"{key.removeprefix('reward_')} reward"


def causal_lm(run_dir: Path) -> TrainedModel:
    """The trained model of a run whose stage makes a causal LM, the model chat, evaluation, export, the arena and
    start_from_run load; UserError for a run without one."""
    trained = trained_model(run_dir)
    stage = get(trained.stage)
    if not stage.causal_lm:
        makers = [other for other in _REGISTRY.values() if other.causal_lm]
        raise UserError(
            f"Run '{trained.run_dir.name}' trained a {stage.title} model, which generates no text: chat, "
            f"evaluation, export and the arena need a {titles(makers)} run. Choose one of those."
        )
    return trained


def generates_text(run_dir: Path) -> bool:
    """Whether a training run's stage makes a causal LM (the runs the Test and Export tabs offer)."""
    name = run_stage(run_dir)
    return name in _REGISTRY and _REGISTRY[name].causal_lm


def own_settings() -> list[str]:
    """The TrainConfig fields the stages name as their own, each once, in the stages' order."""
    return list(dict.fromkeys(name for stage in _REGISTRY.values() for name in stage.settings))


# ---------------------------------------------------------------- the stages

# The memory estimate, packing, several GPUs and early stopping are SFT's; the other stages run TRL's own trainers on
# one GPU, from a new LoRA adapter or an SFT run's (start_from_run).
SFT = register(
    Stage(
        name="sft",
        title="SFT",
        help="supervised fine-tuning",
        data_formats=("alpaca", "sharegpt", "messages", "prompt_completion", "text"),
        check=later("preference_utils:check_sft"),
        trainer=later("training_utils:sft_trainer"),
        memory_estimate=True,
        eval_loss=True,
        counts_tokens=True,  # Unsloth's trainer logs no token count; TRL's num_tokens wins once logged
    )
)
# TRL's preference metrics (DPO, ORPO, KTO): the implicit rewards of the chosen and rejected replies.
PREFERENCE_METRICS = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
}
PREFERENCE_LABELS = {"reward_margin": "reward margin", "reward_accuracy": "reward accuracy"}
PREFERENCE_SETTINGS = ("start_from_run", "beta")
DPO = register(
    Stage(
        name="dpo",
        title="DPO",
        help="preference tuning on chosen vs rejected replies",
        data_formats=("pairs",),
        check=later("preference_utils:check_preference"),
        trainer=later("preference_utils:dpo_trainer"),
        metrics=PREFERENCE_METRICS,
        metric_labels=PREFERENCE_LABELS,
        settings=PREFERENCE_SETTINGS,
    )
)
ORPO = register(
    Stage(
        name="orpo",
        title="ORPO",
        help="preference tuning on chosen vs rejected replies with no reference model",
        data_formats=("pairs",),
        check=later("preference_utils:check_preference"),
        trainer=later("preference_utils:orpo_trainer"),
        metrics={**PREFERENCE_METRICS, "log_odds_ratio": "log_odds_ratio", "nll_loss": "nll_loss"},
        metric_labels={**PREFERENCE_LABELS, "log_odds_ratio": "log-odds ratio"},
        counts_tokens=True,  # TRL's ORPO logs no token count
        settings=PREFERENCE_SETTINGS,
    )
)
KTO = register(
    Stage(
        name="kto",
        title="KTO",
        help="preference tuning on completions labelled desirable or not (or pairs)",
        data_formats=("unpaired", "pairs"),
        check=later("preference_utils:check_kto"),
        trainer=later("preference_utils:kto_trainer"),
        metrics={**PREFERENCE_METRICS, "kl": "kl"},
        metric_labels={**PREFERENCE_LABELS, "kl": "KL"},
        settings=PREFERENCE_SETTINGS,
    )
)
GRPO = register(
    Stage(
        name="grpo",
        title="GRPO",
        help="reinforcement learning from reward functions on prompts",
        data_formats=("prompts",),
        check=later("preference_utils:check_grpo"),
        trainer=later("preference_utils:grpo_trainer"),
        metrics={
            "reward": "reward",
            "reward_std": "reward_std",
            "kl": "kl",
            "completions/mean_length": "completion_length",
        },
        metric_labels={
            "reward": "mean reward",
            "kl": "KL",
            "completion_length": "completion length",
            "completions_per_s": "completions/s",
            "generation_share": "share of time generating",
        },
        reward_functions=True,
        generates=True,
        settings=(
            *PREFERENCE_SETTINGS,
            "num_generations",
            "max_completion_length",
            "temperature",
            "reward_funcs",
            "reward_weights",
            "reward_pattern",
            "reference_column",
            "reward_min_length",
            "reward_max_length",
            "judge_provider",
            "judge_model",
            "judge_base_url",
            "judge_min_score",
            "judge_max_score",
            "judge_rubric",
            "reward_file",
            "reward_file_functions",
            "allow_reward_file",
        ),
    )
)
