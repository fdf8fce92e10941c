"""Synthetic data tab: generate training rows with OpenAI, Anthropic, Ollama or any OpenAI-compatible server.

The API key goes to the job's process through its environment only; it is never written to the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import dataset_utils
import jobs
import runfolder
import submit
import synthetic_rows
import synthetic_utils
from synthetic_utils import SyntheticConfig
from ui import forms
from ui.common import active_runs, guarded, job_html, latest_run, run_names, save_upload

KINDS = ("synth",)
POLL_S = 1.5
PREVIEW_ROWS = 8
TAIL_BYTES = 256 * 1024
KEY_HELP = (
    "Sent to the job's process only, never saved. Empty: the OPENAI_API_KEY / ANTHROPIC_API_KEY of the "
    "server's environment; local servers need none."
)


@dataclass
class SyntheticTab:
    fields: dict[str, gr.components.Component]  # SyntheticConfig field -> widget
    seed_examples: gr.Code
    documents: gr.File
    api_key: gr.Textbox
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    use: gr.Button
    hint: gr.Markdown
    runs: gr.Dropdown
    status: gr.HTML
    rows: gr.Dataframe
    log: gr.Textbox
    timer: gr.Timer


def build() -> SyntheticTab:
    gr.Markdown(
        "Generate chat rows for training from a larger model: an instruction task about a topic, "
        "multi-turn conversations, or questions and answers grounded in your documents. Rows are checked, "
        "deduplicated and appended to the run's `data.jsonl` as they arrive; Resume continues where it "
        "stopped."
    )
    fields: dict[str, gr.components.Component] = {}

    def add(name: str, widget: gr.components.Component) -> None:
        fields[name] = widget

    with gr.Row():
        add("provider", forms.widget(SyntheticConfig, "provider", component=gr.Radio, elem_id="synth-provider"))
        add(
            "model",
            forms.widget(
                SyntheticConfig,
                "model",
                placeholder="gpt-4o-mini, claude-sonnet-4-5, llama3.2 …",
                elem_id="synth-model",
            ),
        )
    with gr.Row():
        add(
            "base_url",
            forms.widget(
                SyntheticConfig,
                "base_url",
                placeholder="empty: the provider's API (Ollama: http://localhost:11434)",
                elem_id="synth-base-url",
            ),
        )
        api_key = gr.Textbox(label="API key", type="password", info=KEY_HELP, elem_id="synth-api-key")
    with gr.Row():
        add("task", forms.widget(SyntheticConfig, "task", component=gr.Radio, elem_id="synth-task"))
        add(
            "topic",
            forms.widget(
                SyntheticConfig, "topic", placeholder="What the data is about", elem_id="synth-topic", scale=2
            ),
        )
    with gr.Row():
        add("num_rows", forms.widget(SyntheticConfig, "num_rows", elem_id="synth-rows"))
        for name in ("turns", "temperature", "concurrency"):
            add(name, forms.widget(SyntheticConfig, name))
    with gr.Accordion("Seed examples and documents", open=False):
        seed_examples = gr.Code(
            label='Seed examples (JSONL: one row a line, in the task\'s shape, e.g. {"instruction": …, "response": …})',
            language=None,
            lines=4,
            elem_id="synth-seeds",
        )
        documents = gr.File(
            label="Documents (TXT, MD, PDF) for the documents task",
            file_count="multiple",
            file_types=list(synthetic_rows.DOCUMENT_SUFFIXES),
            elem_id="synth-documents",
        )
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            add("response_format", forms.widget(SyntheticConfig, "response_format", elem_id="synth-response-format"))
            for name in ("max_tokens", "chunk_chars"):
                add(name, forms.widget(SyntheticConfig, name))
        for row in (
            ("max_retries", "backoff_s", "timeout_s", "max_consecutive_rejects"),
            ("min_chars", "max_chars", "near_duplicate_threshold"),
            ("price_per_million_input", "price_per_million_output"),
        ):
            with gr.Row():
                for name in row:
                    add(name, forms.widget(SyntheticConfig, name))
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(
            label="Run name", placeholder="optional: synth-<date>-<time>", scale=3, elem_id="synth-run-name"
        )
        start = gr.Button("Generate", variant="primary", scale=1, elem_id="synth-start")
        stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, elem_id="synth-stop")
        resume = gr.Button("Resume", interactive=False, scale=1, elem_id="synth-resume")
    hint = gr.Markdown(elem_id="synth-hint")
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label="Generation run", choices=[], scale=4, elem_id="synth-runs")
        use = gr.Button("Use as training data", interactive=False, scale=1, elem_id="synth-use")
    status = gr.HTML(elem_id="synth-status")
    rows = gr.Dataframe(
        headers=["conversation"],
        label="Newest rows",
        interactive=False,
        wrap=True,
        max_height=300,
        elem_id="synth-rows-table",
    )
    log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=10, interactive=False, elem_id="synth-log")
    timer = gr.Timer(POLL_S, active=False)
    return SyntheticTab(
        fields,
        seed_examples,
        documents,
        api_key,
        run_name,
        start,
        stop,
        resume,
        use,
        hint,
        runs,
        status,
        rows,
        log,
        timer,
    )


def wire(
    tab: SyntheticTab, dataset_source: gr.Textbox, dataset_tab_id: str, tabs: gr.Tabs, app: gr.Blocks, workspace: Path
) -> None:
    names = list(tab.fields)
    view = [tab.status, tab.rows, tab.log, tab.start, tab.stop, tab.resume, tab.use, tab.hint, tab.timer]

    def config_from(values: tuple, seeds: str, documents: list[str] | None) -> SyntheticConfig:
        data = dict(zip(names, values, strict=True))
        data["seed_examples"] = dataset_utils.parse_jsonl(seeds or "", "Seed example")
        data["documents"] = [str(save_upload(path, workspace)) for path in documents or []]
        return synthetic_utils.synthetic_config_from_dict(data)

    @guarded
    def show(run: str | None) -> list[Any]:
        return synth_view(run, workspace)

    @guarded
    def start(run_name: str, api_key: str, seeds: str, documents: list[str] | None, *values: Any) -> gr.Dropdown:
        config = config_from(values, seeds, documents)
        run_dir = submit.submit("synth", config, workspace, run_name, api_key=api_key or None)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def stop(run: str) -> None:
        submit.stop(run, workspace)

    @guarded
    def resume(run: str, api_key: str) -> None:
        submit.resume(run, workspace, api_key=api_key or None)

    @guarded
    def use(run: str) -> tuple[str, gr.Tabs]:
        data = runfolder.run_path(run, workspace) / synthetic_utils.DATA_FILE
        if not data.exists():
            raise gr.Error(f"Run '{run}' has no rows yet.")
        return str(data), gr.Tabs(selected=dataset_tab_id)

    @guarded
    def opened() -> list[Any]:
        run = latest_run(workspace, KINDS)
        return [gr.Dropdown(choices=run_names(workspace, KINDS), value=run), *synth_view(run, workspace)]

    widgets = [tab.fields[name] for name in names]
    tab.start.click(
        start, inputs=[tab.run_name, tab.api_key, tab.seed_examples, tab.documents, *widgets], outputs=tab.runs
    ).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.stop.click(stop, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.resume.click(resume, inputs=[tab.runs, tab.api_key]).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.use.click(use, inputs=tab.runs, outputs=[dataset_source, tabs])
    tab.runs.input(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.timer.tick(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    app.load(opened, outputs=[tab.runs, *view], show_progress="hidden")


def synth_view(run: str | None, workspace: Path) -> list[Any]:
    """status, newest rows, log, Generate / Stop / Resume / Use, the reason a button is off, and polling."""
    running = active_runs(workspace, KINDS)
    start = gr.Button(interactive=True)
    reasons = [f"Generate: run `{running[0]}` is still active; a new run starts beside it." if running else ""]
    if not run:
        return [
            "",
            None,
            "",
            start,
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            " · ".join(filter(None, reasons)),
            gr.Timer(active=False),
        ]
    run_dir = runfolder.run_path(run, workspace)
    status = jobs.job_status(run_dir)
    allowed = jobs.actions(run_dir, status)
    rows = newest_rows(run_dir / synthetic_utils.DATA_FILE)
    if not allowed.can_stop:
        reasons.append(f"Stop: {allowed.stop_reason}")
    if not allowed.can_resume:
        reasons.append(f"Resume: {allowed.resume_reason}")
    if rows is None:
        reasons.append("Use as training data: no rows yet.")
    return [
        job_html(run, status, runfolder.read_progress(run_dir)),
        rows,
        runfolder.log_tail(run_dir),
        start,
        gr.Button(interactive=allowed.can_stop),
        gr.Button(interactive=allowed.can_resume),
        gr.Button(interactive=rows is not None),
        " · ".join(filter(None, reasons)),
        gr.Timer(active=status.active),
    ]


def newest_rows(path: Path) -> pd.DataFrame | None:
    """The newest rows of data.jsonl as readable 'role: text' conversations (read from the file's end only)."""
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        start = max(0, handle.tell() - TAIL_BYTES)
        handle.seek(start)
        lines = handle.read().decode("utf-8", errors="replace").split("\n")
    if start:
        lines = lines[1:]  # the first line read is probably cut
    shown = []
    for line in [line for line in lines if line.strip()][-PREVIEW_ROWS:]:
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        shown.append(["\n".join(f"{m['role']}: {m['content']}" for m in messages)])
    return pd.DataFrame(shown, columns=["conversation"]) if shown else None
