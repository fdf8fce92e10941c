"""Model tab: which model to start from, how to load it, what it will cost in memory, and saved presets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import model_utils
from ui import forms
from ui.common import guarded
from workspace import UserError


@dataclass
class ModelTab:
    check: gr.Button
    info: gr.Markdown
    memory: gr.Markdown
    preset_name: gr.Textbox
    save_preset: gr.Button
    presets: gr.Dropdown
    load_preset: gr.Button
    preset_status: gr.Markdown


def build(form: forms.Form, workspace: Path) -> ModelTab:
    gr.Markdown(
        "Choose the model to fine-tune. The demo model (SmolLM2-135M-Instruct) is built in and needs no "
        "download; Unsloth's catalogue and any Hub id work when the model is in the local Hugging Face cache."
    )
    with gr.Row():
        forms.setting(
            form,
            "model.name_or_path",
            component=gr.Dropdown,
            choices=[model_utils.DEMO_MODEL, *model_utils.UNSLOTH_CATALOGUE],
            allow_custom_value=True,
            scale=3,
            elem_id="model-name",
        )
        form.add(
            "mode",
            gr.Radio(
                forms.MODES,
                value=forms.DEFAULTS["mode"],
                label="Training mode",
                info=forms.MODE_HELP,
                scale=2,
                elem_id="model-mode",
            ),
        )
    forms.setting(form, "model.trust_remote_code")
    check = gr.Button("Check model and estimate memory", elem_id="model-check")
    info = gr.Markdown(elem_id="model-info")
    memory = gr.Markdown(elem_id="model-memory")
    with gr.Accordion("Presets: save or load these model and training settings", open=True):
        with gr.Row():
            preset_name = gr.Textbox(label="Preset name", placeholder="e.g. small-lora", scale=2, elem_id="preset-name")
            save_preset = gr.Button("Save preset", scale=1, elem_id="preset-save")
        with gr.Row():
            presets = gr.Dropdown(
                choices=model_utils.list_presets(workspace), label="Saved presets", scale=2, elem_id="preset-list"
            )
            load_preset = gr.Button("Load preset", scale=1, elem_id="preset-load")
        preset_status = gr.Markdown(elem_id="preset-status")
    return ModelTab(check, info, memory, preset_name, save_preset, presets, load_preset, preset_status)


def wire(tab: ModelTab, form: forms.Form, memory_outputs: list[gr.Markdown], app: gr.Blocks, workspace: Path) -> None:
    """Events; called once every tab exists, since presets and the estimate read the Train tab's widgets."""

    @guarded
    def check_model(data: dict) -> tuple[str, str, str]:
        config = forms.values_to_config(form.values(data))
        config.model.validate()
        path = model_utils.resolve_model_path(config.model.name_or_path, workspace)
        estimate = memory_estimate(config, workspace)
        return f"Model files: `{path}`", estimate, estimate

    tab.check.click(check_model, inputs=form.inputs(), outputs=[tab.info, *memory_outputs])

    @guarded
    def save(data: dict) -> tuple[gr.Dropdown, str]:
        config = forms.values_to_config(form.values(data))
        path = model_utils.save_preset(data[tab.preset_name].strip(), forms.preset_values(config), workspace)
        return gr.Dropdown(choices=model_utils.list_presets(workspace), value=path.stem), f"Saved preset `{path.stem}`."

    tab.save_preset.click(save, inputs={tab.preset_name, *form.inputs()}, outputs=[tab.presets, tab.preset_status])

    def estimate(data: dict) -> tuple[str, str]:
        # Runs by itself whenever a setting changes, so a problem is shown in place instead of as a pop-up.
        try:
            text = memory_estimate(forms.values_to_config(form.values(data)), workspace)
        except (UserError, TypeError, ValueError) as exc:  # a half-typed number reaches here as None
            text = f"**Memory estimate unavailable:** {exc}"
        return text, text

    triggers = [
        "model.name_or_path",
        "mode",
        "lora_r",
        "target_modules",
        "per_device_train_batch_size",
        "max_seq_length",
        "gradient_checkpointing",
    ]
    gr.on(
        [app.load, *[form.widgets[key].change for key in triggers]],
        estimate,
        inputs=form.inputs(),
        outputs=memory_outputs,
        trigger_mode="always_last",
        show_progress="hidden",
    )

    keys = form.preset_keys()

    @guarded
    def load(name: str | None) -> list[Any]:
        if not name:
            raise gr.Error("Choose a saved preset first.")
        from training_utils import train_config_from_dict

        values = forms.config_to_values(train_config_from_dict(model_utils.load_preset(name, workspace)))
        return [values[key] for key in keys] + [f"Loaded preset `{name}`."]

    tab.load_preset.click(load, inputs=tab.presets, outputs=[form.widgets[key] for key in keys] + [tab.preset_status])


def memory_estimate(config, workspace: Path) -> str:
    """The estimate as one line of Markdown; a model that cannot be read yet gives its reason instead."""
    path = model_utils.resolve_model_path(config.model.name_or_path, workspace)
    estimate = model_utils.estimate_memory(config, path)
    return f"**Memory estimate:** {estimate.summary()}"
