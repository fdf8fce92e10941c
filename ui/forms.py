"""The training form: one widget per TrainConfig option, spread over the Model, Dataset and Train tabs.

Widgets are keyed by their place in TrainConfig ("lora_r", "model.name_or_path", "dataset.source"), so their
defaults, presets and the config of a new run all go through `config_to_values` / `values_to_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

import dataset_utils
import training_utils
from training_utils import TrainConfig
from workspace import config_to_dict

MODES = [("16-bit LoRA", "lora"), ("4-bit QLoRA (NVIDIA GPU only)", "qlora"), ("Full fine-tune", "full")]
# Every field a column can be mapped to, over all formats, in the order the Dataset tab shows them.
MAP_FIELDS = list(dict.fromkeys(name for names in dataset_utils.FORMAT_FIELDS.values() for name in names))
SCHEDULERS = ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"]
# Settings a preset holds: everything except the data.
PRESET_EXCLUDES = ("dataset",)

HELP = {
    "model.name_or_path": "The built-in demo model works offline; type any Hub id (from the local cache) or a "
    "local folder.",
    "model.trust_remote_code": "Runs Python code shipped with the model. Only for models you trust.",
    "mode": "LoRA trains small adapter matrices; QLoRA does the same on a 4-bit base (least memory); full "
    "fine-tuning changes every weight (most memory).",
    "dataset.source": "A file inside the workspace (upload one above), any local path, or a Hub dataset id.",
    "dataset.split": "Which split of a Hub dataset to read.",
    "dataset.format": "auto detects Alpaca, ShareGPT, messages, prompt/completion or text from the columns.",
    "dataset.chat_template": "Empty = the model's own template. 'chatml' (or a Jinja template) for models without one.",
    "dataset.system_prompt": "Added as a system turn to rows that have none.",
    "dataset.max_rows": "Read at most this many rows (0 = all).",
    "max_steps": "Optimizer steps to train for; 0 = train for the number of epochs instead.",
    "num_train_epochs": "Passes over the data (used when max steps is 0).",
    "learning_rate": "2e-4 suits LoRA; full fine-tunes want about 10x less.",
    "per_device_train_batch_size": "Rows per step on each device. Memory grows with it.",
    "gradient_accumulation_steps": "Steps whose gradients are summed before an update: a larger effective batch "
    "without more memory.",
    "fit_micro_batch": "On a GPU, run the accumulation steps as one larger batch while the memory estimate fits "
    "(same effective batch, faster).",
    "max_seq_length": "Longer examples are cut to this many tokens.",
    "lora_r": "Rank of the LoRA matrices: 8-64. Higher learns more and uses more memory.",
    "lora_alpha": "LoRA scaling; usually equal to the rank or twice it.",
    "lora_dropout": "Dropout on the LoRA path; 0 is fastest.",
    "target_modules": "Linear layers that get LoRA adapters (type others for models with other names).",
    "warmup_steps": "Steps over which the learning rate ramps up from 0.",
    "lr_scheduler_type": "How the learning rate changes after warm-up.",
    "weight_decay": "L2 penalty on the weights.",
    "optim": "Optimizer; 8-bit ones need bitsandbytes and a GPU.",
    "packing": "Pack several short examples into one sequence (faster on short rows).",
    "train_on_responses_only": "Compute the loss only on the assistant's replies, not on the prompts.",
    "gradient_checkpointing": "Recompute activations in the backward pass: much less memory, ~30% slower.",
    "eval_split": "Fraction of rows held out to measure eval loss (0 = none).",
    "eval_steps": "Evaluate every this many steps (0 = at each checkpoint).",
    "save_steps": "Save a checkpoint (a resume point) every this many steps.",
    "save_total_limit": "Keep only this many checkpoints.",
    "logging_steps": "Log loss every this many steps.",
    "seed": "Random seed for shuffling and LoRA initialisation.",
    "report_to": "Also log to TensorBoard (run folder/tensorboard).",
    "num_gpus": "0 = every visible GPU; more than one trains with DDP, one process per GPU.",
}


@dataclass
class Form:
    """Widgets keyed by their TrainConfig place; handlers take `inputs=form.inputs()` and get a dict of values."""

    widgets: dict[str, gr.components.Component] = field(default_factory=dict)

    def add(self, key: str, widget: gr.components.Component) -> gr.components.Component:
        self.widgets[key] = widget
        return widget

    def inputs(self) -> set[gr.components.Component]:
        return set(self.widgets.values())

    def values(self, data: dict[gr.components.Component, Any]) -> dict[str, Any]:
        return {key: data[widget] for key, widget in self.widgets.items() if widget in data}

    def preset_keys(self) -> list[str]:
        return [key for key in self.widgets if not key.startswith(PRESET_EXCLUDES) and not key.startswith("map.")]


def config_to_values(config: TrainConfig) -> dict[str, Any]:
    """Widget values for a TrainConfig."""
    values: dict[str, Any] = {"mode": config.mode}
    for name, value in config_to_dict(config).items():
        if name in ("model", "dataset"):
            for sub, sub_value in value.items():
                if sub == "column_map":
                    values.update({f"map.{key}": sub_value.get(key, "") for key in MAP_FIELDS})
                else:
                    values[f"{name}.{sub}"] = sub_value
        elif name == "max_steps":
            values[name] = value or 0
        elif name not in ("load_in_4bit", "full_finetuning"):
            values[name] = value
    return values


def values_to_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from widget values (not validated); keys that are absent keep their defaults."""
    data: dict[str, Any] = {"model": {}, "dataset": {}}
    column_map = {}
    for key, value in values.items():
        if key == "mode":
            data["load_in_4bit"], data["full_finetuning"] = value == "qlora", value == "full"
        elif key.startswith("map."):
            if value:
                column_map[key.removeprefix("map.")] = value
        elif "." in key:
            section, name = key.split(".", 1)
            data[section][name] = value.strip() if isinstance(value, str) else value
        elif key == "max_steps":
            data[key] = int(value) if value else None
        else:
            data[key] = value
    if column_map:
        data["dataset"]["column_map"] = column_map
    return training_utils.train_config_from_dict(data)


def preset_values(config: TrainConfig) -> dict[str, Any]:
    """What a preset stores: the config without its data section."""
    return {name: value for name, value in config_to_dict(config).items() if name not in PRESET_EXCLUDES}


DEFAULTS = config_to_values(TrainConfig())


def number(form: Form, key: str, label: str, integer: bool = False, **kwargs: Any) -> gr.Number:
    return form.add(
        key, gr.Number(value=DEFAULTS[key], label=label, info=HELP.get(key), precision=0 if integer else None, **kwargs)
    )


def checkbox(form: Form, key: str, label: str, **kwargs: Any) -> gr.Checkbox:
    return form.add(key, gr.Checkbox(value=DEFAULTS[key], label=label, info=HELP.get(key), **kwargs))


def textbox(form: Form, key: str, label: str, **kwargs: Any) -> gr.Textbox:
    return form.add(key, gr.Textbox(value=DEFAULTS[key], label=label, info=HELP.get(key), **kwargs))


def dropdown(form: Form, key: str, label: str, choices: list, **kwargs: Any) -> gr.Dropdown:
    return form.add(key, gr.Dropdown(choices=choices, value=DEFAULTS[key], label=label, info=HELP.get(key), **kwargs))
