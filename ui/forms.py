"""The training form: one widget per TrainConfig option, spread over the Model, Dataset and Train tabs, each built
from its field's metadata (settings.option); `widget` does the same for the other stages' configs.

Widgets are keyed by their place in TrainConfig ("lora_r", "model.name_or_path", "dataset.source"), so their
defaults, presets and the config of a new run all go through `config_to_values` / `values_to_config`.
"""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

import dataset_utils
import rewards
import settings
from train_config import TrainConfig, train_config_from_dict
from workspace import config_to_dict

MODES = [("16-bit LoRA", "lora"), ("4-bit QLoRA (NVIDIA GPU only)", "qlora"), ("Full fine-tune", "full")]
# The mode radio stands for two TrainConfig fields (load_in_4bit, full_finetuning), so its help is here.
MODE_HELP = (
    "LoRA trains small adapter matrices; QLoRA does the same on a 4-bit base (least memory); full fine-tuning "
    "changes every weight (most memory)."
)
# Every field a column can be mapped to, over all formats, in the order the Dataset tab shows them.
MAP_FIELDS = list(dict.fromkeys(name for names in dataset_utils.FORMAT_FIELDS.values() for name in names))
# Settings a preset holds: everything except the data.
PRESET_EXCLUDES = ("dataset",)


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
        elif name == "reward_weights":  # a text box of comma-separated numbers
            values[name] = ", ".join(f"{weight:g}" for weight in value)
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
        elif key == "reward_weights":
            data[key] = rewards.parse_weights(value)
        else:
            data[key] = value
    if column_map:
        data["dataset"]["column_map"] = column_map
    return train_config_from_dict(data)


def preset_values(config: TrainConfig) -> dict[str, Any]:
    """What a preset stores: the config without its data section."""
    return {name: value for name, value in config_to_dict(config).items() if name not in PRESET_EXCLUDES}


DEFAULTS = config_to_values(TrainConfig())


def widget(cls: type, name: str, value: Any = MISSING, component: type | None = None, **kwargs: Any) -> Any:
    """A widget for field `name` of dataclass `cls`, its label, help, bounds, choices and integer-ness read from the
    field; `component` replaces the widget class the field's type picks, `kwargs` win over what the field says."""
    meta = settings.describe(cls, name)
    kind = settings.field_type(cls, name)
    choices = meta.choice_list()
    common: dict[str, Any] = {
        "value": settings.default_of(cls, name) if value is MISSING else value,
        "label": meta.label,
        "info": meta.help,
    }
    if kind is bool:
        make = gr.Checkbox
    elif choices is not None or kind is list:
        make = gr.Dropdown
        common["choices"] = list(choices or ())
    elif kind in (int, float):
        make = gr.Number
        # Widgets only know inclusive bounds: an exclusive one is the next whole number, or is left to validate().
        step = 1 if kind is int else 0
        if meta.minimum is not None:
            common["minimum"] = meta.minimum + step if meta.exclusive_minimum else meta.minimum
        if meta.maximum is not None:
            common["maximum"] = meta.maximum - step if meta.exclusive_maximum else meta.maximum
    else:
        make = gr.Textbox
    make = component or make
    if make is gr.Number:
        common["precision"] = 0 if kind is int else None
    if make is gr.Textbox:  # a list typed as text (reward weights, comma-separated) has no choices
        common.pop("choices", None)
    if make is gr.Dropdown:
        common["multiselect"] = kind is list
    return make(**{**common, **kwargs})


def setting(form: Form, key: str, **kwargs: Any) -> Any:
    """Add the widget of TrainConfig option `key` ("lora_r", "dataset.source") to `form`, at its default."""
    return form.add(key, widget(TrainConfig, key, DEFAULTS[key], **kwargs))


# ---------------------------------------------------------------- the form kept across page reloads


def keep_in_browser(form: Form, app: gr.Blocks, workspace: Path) -> gr.BrowserState:
    """Keep the form's values in this browser's localStorage and put them back when the page is opened again, so a
    reload keeps the dataset, the column mapping, applied suggestions and every training setting.

    One key per workspace: another workspace served to the same browser does not get this one's paths. The values
    are encrypted with a key of this server process, so a restarted server starts from the defaults.
    """
    storage_key = "llm-finetuner-form-" + hashlib.sha256(str(Path(workspace).resolve()).encode()).hexdigest()[:16]
    stored = gr.BrowserState({}, storage_key=storage_key)
    keys = list(form.widgets)
    widgets = [form.widgets[key] for key in keys]

    def save(*values: Any) -> dict[str, Any]:
        return dict(zip(keys, values, strict=True))

    def restore(saved: dict[str, Any] | None) -> list[Any]:
        saved = saved or {}
        return [restored(form.widgets[key], key, saved[key]) if key in saved else gr.skip() for key in keys]

    gr.on(
        [widget.change for widget in widgets],
        save,
        inputs=widgets,
        outputs=stored,
        trigger_mode="always_last",
        show_progress="hidden",
    )
    app.load(restore, inputs=stored, outputs=widgets, show_progress="hidden")
    return stored


def restored(widget: gr.components.Component, key: str, value: Any) -> Any:
    """The update that puts a stored value back, or gr.skip() when the widget cannot take it any more (a choice
    that is gone). A column mapping names a column of the dataset, whose columns the Dataset tab lists only after
    Load: its one choice is kept until then."""
    choices = getattr(widget, "choices", None)
    if choices is None or getattr(widget, "allow_custom_value", False):
        return value
    allowed = {choice[1] if isinstance(choice, tuple) else choice for choice in choices}
    wanted = value if isinstance(value, list) else [value]
    if all(item in allowed for item in wanted):
        return value
    if key.startswith("map.") and isinstance(value, str):
        return gr.Dropdown(choices=[*choices, (value, value)], value=value)
    return gr.skip()
