"""Export tab: turn a finished run into GGUF files (llama.cpp / Ollama), check them, download them, and hand them to
a running Ollama in one step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import gguf_utils
import runfolder
import submit
from gguf_utils import ExportConfig, ollama
from ui import forms, push_panel
from ui.common import download_links, guarded, job_html, model_runs
from workspace import UserError, read_json

SETTINGS = ("check_prompts", "check_tokens", "merge_dtype", "temperature", "top_p", "num_ctx", "lora_gguf")
POLL_S = 1.5


@dataclass
class ExportTab:
    run: gr.Dropdown
    refresh: gr.Button
    quants: gr.CheckboxGroup
    settings: list[gr.components.Component]
    start: gr.Button
    stop: gr.Button
    hint: gr.Markdown
    status: gr.HTML
    log: gr.Textbox
    results: gr.Markdown
    downloads: gr.HTML
    modelfile: gr.Code
    timer: gr.Timer
    ollama_name: gr.Textbox
    ollama_modelfile: gr.Dropdown
    ollama_add: gr.Button
    ollama_result: gr.Markdown
    push: push_panel.PushPanel


def build() -> ExportTab:
    gr.Markdown(
        "Merge a finished run's adapter into the base model, convert it with llama.cpp, quantize it, load "
        "each file back in llama.cpp and compare its predictions with the Hugging Face model. The files "
        "land in the run's `gguf/` folder with an Ollama `Modelfile` (`ollama create NAME -f Modelfile`)."
    )
    with gr.Row(equal_height=True):
        run = gr.Dropdown(label="Training run", choices=[], scale=4, elem_id="export-run")
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    quants = forms.widget(
        ExportConfig,
        "quants",
        component=gr.CheckboxGroup,
        choices=list(gguf_utils.QUANT_FTYPES),
        elem_id="export-quants",
    )
    gr.Markdown(
        f"{gguf_utils.QUANT_GUIDE} {', '.join(gguf_utils.IMATRIX_TYPES)} need an importance matrix: the export "
        "computes one from the run's own training rows (llama-cpp-python's quantizer takes it).",
        elem_id="export-quant-guide",
    )
    lora_gguf = forms.widget(ExportConfig, "lora_gguf", elem_id="export-lora-gguf")
    with gr.Accordion("Check and Modelfile settings", open=False):
        with gr.Row():
            check_prompts = forms.widget(ExportConfig, "check_prompts")
            check_tokens = forms.widget(ExportConfig, "check_tokens", elem_id="export-check-tokens")
            merge_dtype = forms.widget(ExportConfig, "merge_dtype")
        with gr.Row():
            temperature = forms.widget(ExportConfig, "temperature")
            top_p = forms.widget(ExportConfig, "top_p")
            num_ctx = forms.widget(ExportConfig, "num_ctx")
    with gr.Row():
        start = gr.Button("Export", variant="primary", elem_id="export-start")
        stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="export-stop")
    hint = gr.Markdown(elem_id="export-hint")
    status = gr.HTML(elem_id="export-status")
    results = gr.Markdown(elem_id="export-results")
    downloads = gr.HTML(elem_id="export-downloads")
    # No line numbers: CodeMirror measures its gutter while the Export tab is hidden and keeps rows shorter than the
    # lines, so the numbers drifted away from them; a Modelfile is a few lines.
    modelfile = gr.Code(
        label="Modelfile",
        language=None,
        interactive=False,
        lines=8,
        show_line_numbers=False,
        elem_id="export-modelfile",
    )
    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=12, interactive=False, elem_id="export-log")
    with gr.Group():
        gr.Markdown(
            "**Add to Ollama**: upload the exported GGUF to the Ollama running at `OLLAMA_HOST` (now "
            f"`{ollama.ollama_host()}`), create the model with the Modelfile's template, stop tokens and "
            "parameters, and ask it one question."
        )
        with gr.Row(equal_height=True):
            ollama_name = gr.Textbox(label="Ollama model name", placeholder="my-model", scale=3, elem_id="ollama-name")
            ollama_modelfile = gr.Dropdown(
                label="From",
                choices=[
                    ("merged model (Modelfile)", "Modelfile"),
                    ("base + LoRA adapter (Modelfile.lora)", "Modelfile.lora"),
                ],
                value="Modelfile",
                scale=2,
            )
            ollama_add = gr.Button("Add to Ollama", interactive=False, scale=1, elem_id="ollama-add")
        ollama_result = gr.Markdown(elem_id="ollama-result")
    push = push_panel.build()
    timer = gr.Timer(POLL_S, active=False)
    return ExportTab(
        run,
        refresh,
        quants,
        [check_prompts, check_tokens, merge_dtype, temperature, top_p, num_ctx, lora_gguf],
        start,
        stop,
        hint,
        status,
        log,
        results,
        downloads,
        modelfile,
        timer,
        ollama_name,
        ollama_modelfile,
        ollama_add,
        ollama_result,
        push,
    )


def wire(tab: ExportTab, tab_container: gr.Tab, workspace: Path) -> None:
    view = [
        tab.status,
        tab.log,
        tab.results,
        tab.downloads,
        tab.modelfile,
        tab.start,
        tab.stop,
        tab.hint,
        tab.timer,
        tab.ollama_add,
    ]

    def run_choices(current: str | None) -> gr.Dropdown:
        # Runs whose stage made a causal LM, the model a GGUF file holds (its record says), a stopped run's
        # checkpoint included.
        runs = model_runs(workspace)
        names = [name for _, name in runs]
        return gr.Dropdown(choices=runs, value=current if current in names else (names[0] if names else None))

    @guarded
    def show(run: str | None) -> list[Any]:
        return export_view(run, workspace)

    @guarded
    def start(run: str, quants: list[str], *settings: Any) -> None:
        config = ExportConfig(run=run or "", quants=list(quants or []), **dict(zip(SETTINGS, settings, strict=True)))
        submit.submit("export", config, workspace)

    @guarded
    def add(run: str, name: str, modelfile: str) -> str:
        return add_to_ollama(run, name, modelfile, workspace)

    @guarded
    def stop(run: str) -> None:
        job = submit.latest_job("export", run, workspace)
        if job is None:
            raise gr.Error("No export of this run is running.")
        submit.stop(job.path, workspace)

    for trigger in (tab.refresh.click, tab_container.select):
        trigger(run_choices, inputs=tab.run, outputs=tab.run).then(
            show, inputs=tab.run, outputs=view, show_progress="hidden"
        )
    tab.run.input(show, inputs=tab.run, outputs=view, show_progress="hidden")
    tab.start.click(start, inputs=[tab.run, tab.quants, *tab.settings]).success(
        show, inputs=tab.run, outputs=view, show_progress="hidden"
    )
    tab.stop.click(stop, inputs=tab.run).success(show, inputs=tab.run, outputs=view, show_progress="hidden")
    tab.timer.tick(show, inputs=tab.run, outputs=view, show_progress="hidden")
    tab.ollama_add.click(add, inputs=[tab.run, tab.ollama_name, tab.ollama_modelfile], outputs=tab.ollama_result)
    push_panel.wire(tab.push, tab.run, workspace)


def export_view(run: str | None, workspace: Path) -> list[Any]:
    """progress, log, results table, download links, Modelfile, Export / Stop, the reason one is off, polling."""
    if not run:
        return [
            "",
            "",
            "",
            "",
            "",
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            "Export: no finished training run yet; train one first.",
            gr.Timer(active=False),
            gr.Button(interactive=False),
        ]
    job = submit.latest_job("export", run, workspace)
    active = job is not None and job.active
    status, log = "", ""
    if job is not None:
        status, log = job_html(job.name, job.status, job.progress), runfolder.log_tail(job.path)
    gguf_dir = runfolder.run_path(run, workspace) / "gguf"
    report = read_json(gguf_dir / "report.json", default=None) if not active else None
    results, links, modelfile = "", "", ""
    if report:
        results = report_table(report)
        files = [gguf_dir / item["file"] for item in report["files"]] + [
            gguf_dir / "Modelfile",
            gguf_dir / "report.json",
        ]
        links = download_links(files)
        modelfile = (gguf_dir / "Modelfile").read_text(encoding="utf-8") if (gguf_dir / "Modelfile").exists() else ""
    hint = "Export: an export of this run is running." if active else "Stop: no export is running."
    if not report:
        hint += " Add to Ollama: no finished export of this run yet."
    return [
        status,
        log,
        results,
        links,
        modelfile,
        gr.Button(interactive=not active),
        gr.Button(interactive=active),
        hint,
        gr.Timer(active=active),
        gr.Button(interactive=bool(report)),
    ]


def add_to_ollama(run: str | None, name: str, modelfile: str, workspace: Path) -> str:
    """Hand a finished export to the running Ollama; what it answered, as Markdown."""
    if not run:
        raise UserError("Choose a training run whose export to hand to Ollama.")
    gguf_dir = runfolder.run_path(run, workspace) / "gguf"
    if not (gguf_dir / "report.json").exists():
        raise UserError("This run has no finished export yet: export it first.")
    if modelfile == "Modelfile.lora" and not (gguf_dir / "Modelfile.lora").exists():
        raise UserError("This export has no LoRA GGUF: export it again with the LoRA-only GGUF option.")
    added = ollama.add_to_ollama(gguf_dir, name, modelfile)
    return (
        f"Created **{added['model']}** in the Ollama at `{added['host']}` (`ollama run {added['model']}`). "
        f"Asked *{added['question']}*, it answered:\n\n> {added['reply']}"
    )


def report_table(report: dict) -> str:
    """The export report as a Markdown table: one line per file with its size and agreement with the HF model."""
    lines = ["| file | size | agreement with HF | tokenizer match | export time |", "|---|---:|---:|---:|---:|"]
    for item in report["files"]:
        lines.append(
            f"| `{item['file']}`{' (imatrix)' if item.get('imatrix') else ''} | {item['size_bytes'] / 1024**2:.1f} MiB | "
            f"{item['agreement']:.1%} | "
            f"{item['tokenizer_match']:.0%} | {item['export_s']:.1f} s |"
        )
    lora = report.get("lora")
    if lora:
        lines.append(
            f"| `{lora['file']}` on `{lora['base_file']}` | {lora['size_bytes'] / 1024**2:.1f} MiB "
            f"(+ {lora['base_size_bytes'] / 1024**2:.1f} MiB) | {lora['agreement']:.1%} | "
            f"{lora['tokenizer_match']:.0%} | {lora['convert_s'] + lora['base_export_s']:.1f} s |"
        )
    check = report.get("check", {})
    lines.append(
        f"\nAgreement: top-1 predictions of llama.cpp vs the Hugging Face model over {check.get('prompts')} "
        f"prompts × {check.get('tokens_per_prompt')} tokens (teacher forcing). Total "
        f"{report.get('times_s', {}).get('total', 0):.0f} s."
    )
    return "\n".join(lines)
