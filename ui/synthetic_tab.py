"""Synthetic data tab: generate training rows with OpenAI, Anthropic, Ollama or any OpenAI-compatible server.

The API key goes to the job's process through its environment only; it is never written to the run folder.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import dataset_utils
import jobs
import synthetic_utils
from synthetic_utils import SyntheticConfig
from ui.common import guarded, latest_run, progress_html, run_names, save_upload
from workspace import config_to_dict

DEFAULTS = SyntheticConfig()
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
        add(
            "provider",
            gr.Radio(
                list(synthetic_utils.PROVIDERS),
                value=DEFAULTS.provider,
                label="Provider",
                info="openai also covers vLLM, llama.cpp server and LM Studio (set the base URL).",
                elem_id="synth-provider",
            ),
        )
        add(
            "model",
            gr.Textbox(
                value=DEFAULTS.model,
                label="Model",
                placeholder="gpt-4o-mini, claude-sonnet-4-5, llama3.2 …",
                elem_id="synth-model",
            ),
        )
    with gr.Row():
        add(
            "base_url",
            gr.Textbox(
                value=DEFAULTS.base_url,
                label="Base URL",
                placeholder="empty: the provider's API (Ollama: http://localhost:11434)",
                elem_id="synth-base-url",
            ),
        )
        api_key = gr.Textbox(label="API key", type="password", info=KEY_HELP, elem_id="synth-api-key")
    with gr.Row():
        add("task", gr.Radio(list(synthetic_utils.TASKS), value=DEFAULTS.task, label="Task", elem_id="synth-task"))
        add(
            "topic",
            gr.Textbox(
                value=DEFAULTS.topic,
                label="Topic",
                placeholder="What the data is about",
                elem_id="synth-topic",
                scale=2,
            ),
        )
    with gr.Row():
        add("num_rows", gr.Number(value=DEFAULTS.num_rows, label="Rows", precision=0, minimum=1, elem_id="synth-rows"))
        add("turns", gr.Number(value=DEFAULTS.turns, label="Turns (conversations)", precision=0, minimum=1))
        add("temperature", gr.Number(value=DEFAULTS.temperature, label="Temperature", minimum=0, maximum=2))
        add("concurrency", gr.Number(value=DEFAULTS.concurrency, label="Requests at once", precision=0, minimum=1))
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
            file_types=list(synthetic_utils.DOCUMENT_SUFFIXES),
            elem_id="synth-documents",
        )
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            add(
                "response_format",
                gr.Dropdown(
                    list(synthetic_utils.RESPONSE_FORMATS),
                    value=DEFAULTS.response_format,
                    label="Response format",
                    info="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
                    elem_id="synth-response-format",
                ),
            )
            add("max_tokens", gr.Number(value=DEFAULTS.max_tokens, label="Max tokens per reply", precision=0))
            add("chunk_chars", gr.Number(value=DEFAULTS.chunk_chars, label="Document chunk (chars)", precision=0))
        with gr.Row():
            add("max_retries", gr.Number(value=DEFAULTS.max_retries, label="Retries", precision=0, minimum=0))
            add("backoff_s", gr.Number(value=DEFAULTS.backoff_s, label="First retry delay (s)", minimum=0))
            add("timeout_s", gr.Number(value=DEFAULTS.timeout_s, label="Request timeout (s)", minimum=0))
            add(
                "max_consecutive_rejects",
                gr.Number(
                    value=DEFAULTS.max_consecutive_rejects, label="Stop after rejects in a row", precision=0, minimum=1
                ),
            )
        with gr.Row():
            add("min_chars", gr.Number(value=DEFAULTS.min_chars, label="Min chars per turn", precision=0, minimum=0))
            add("max_chars", gr.Number(value=DEFAULTS.max_chars, label="Max chars per turn", precision=0, minimum=1))
            add(
                "near_duplicate_threshold",
                gr.Number(
                    value=DEFAULTS.near_duplicate_threshold, label="Near-duplicate threshold", minimum=0, maximum=1
                ),
            )
        with gr.Row():
            add(
                "price_per_million_input",
                gr.Number(value=DEFAULTS.price_per_million_input, label="USD per million input tokens", minimum=0),
            )
            add(
                "price_per_million_output",
                gr.Number(value=DEFAULTS.price_per_million_output, label="USD per million output tokens", minimum=0),
            )
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
        config = synthetic_utils.synthetic_config_from_dict(data)
        config.validate(workspace)
        return config

    @guarded
    def show(run: str | None) -> list[Any]:
        return synth_view(run, workspace)

    @guarded
    def start(run_name: str, api_key: str, seeds: str, documents: list[str] | None, *values: Any) -> gr.Dropdown:
        config = config_from(values, seeds, documents)
        env = synthetic_utils.job_env(config, api_key or None)
        run_dir = jobs.create_run("synth", config_to_dict(config), workspace, run_name.strip() or None)
        jobs.start_job(run_dir, env=env)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def stop(run: str) -> None:
        jobs.stop_job(jobs.run_path(run, workspace))

    @guarded
    def resume(run: str, api_key: str) -> None:
        run_dir = jobs.run_path(run, workspace)
        config = synthetic_utils.synthetic_config_from_dict(
            {key: value for key, value in jobs.read_config(run_dir).items() if key != "kind"}
        )
        jobs.resume_job(run_dir, env=synthetic_utils.job_env(config, api_key or None))

    @guarded
    def use(run: str) -> tuple[str, gr.Tabs]:
        data = jobs.run_path(run, workspace) / synthetic_utils.DATA_FILE
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
    active_runs = [
        info.name for info in jobs.list_runs(workspace) if info.kind in KINDS and info.state in jobs.ACTIVE_STATES
    ]
    start = gr.Button(interactive=not active_runs)
    reasons = [f"Generate: run `{active_runs[0]}` is still active." if active_runs else ""]
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
    run_dir = jobs.run_path(run, workspace)
    status = jobs.read_status(run_dir)
    state = status["state"]
    active = state in jobs.ACTIVE_STATES
    events = [event for event in jobs.read_events(run_dir) if event.get("event") == "progress"]
    last = events[-1] if events else {}
    text = f"<b>{html.escape(run)}</b> · <span class='state state-{state}'>{state}</span>"
    if last.get("message"):
        text += f" · {html.escape(last['message'])}"
    if status.get("error"):
        text += f"<pre class='run-error'>{html.escape(status['error'])}</pre>"
    rows = newest_rows(run_dir / synthetic_utils.DATA_FILE)
    can_stop, can_resume = state in ("queued", "running"), state in ("stopped", "failed")
    if not can_stop:
        reasons.append(f"Stop: the run is {state}.")
    if not can_resume:
        reasons.append("Resume: the run is still active." if active else f"Resume: the run is {state}.")
    if rows is None:
        reasons.append("Use as training data: no rows yet.")
    return [
        progress_html(last.get("step"), last.get("max_steps"), text),
        rows,
        jobs.log_tail(run_dir),
        start,
        gr.Button(interactive=can_stop),
        gr.Button(interactive=can_resume),
        gr.Button(interactive=rows is not None),
        " · ".join(filter(None, reasons)),
        gr.Timer(active=active),
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
