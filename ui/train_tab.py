"""Train tab: every TrainConfig option, Start / Stop / Resume, and the live view of a run read from its folder.

The view is rebuilt from the run folder on every timer tick (status.json, events.jsonl, log.txt), so a page reload,
a second browser tab or a server restart shows the same thing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import jobs
from training_utils import ALL_LINEAR, REPORT_TO
from ui import forms
from ui.common import duration, guarded, latest_run, progress_html, run_names
from workspace import config_to_dict

POLL_S = 1.5
KINDS = ("train",)


@dataclass
class TrainTab:
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    hint: gr.Markdown
    memory: gr.Markdown
    runs: gr.Dropdown
    refresh: gr.Button
    status: gr.HTML
    plot: gr.LinePlot
    log: gr.Textbox
    timer: gr.Timer


def build(form: forms.Form) -> TrainTab:
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(
            label="Run name", placeholder="optional: train-<date>-<time>", scale=3, elem_id="train-run-name"
        )
        start = gr.Button("Start training", variant="primary", scale=1, elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, elem_id="train-stop")
        resume = gr.Button("Resume", interactive=False, scale=1, elem_id="train-resume")
    hint = gr.Markdown(elem_id="train-hint")
    memory = gr.Markdown(elem_id="train-memory")
    with gr.Row():
        with gr.Column(scale=5):
            _settings(form)
        with gr.Column(scale=6):
            with gr.Row(equal_height=True):
                runs = gr.Dropdown(label="Run", choices=[], scale=4, elem_id="train-runs")
                refresh = gr.Button("Refresh", scale=1, size="sm")
            status = gr.HTML(elem_id="train-status")
            plot = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                title="Loss",
                height=300,
                x_title="step",
                color_map={"train": "#2563eb", "eval": "#f97316"},
                elem_id="train-plot",
            )
            log = gr.Textbox(
                label="Log (last lines)",
                lines=12,
                max_lines=20,
                interactive=False,
                autoscroll=True,
                elem_id="train-log",
            )
    timer = gr.Timer(POLL_S, active=False)
    return TrainTab(run_name, start, stop, resume, hint, memory, runs, refresh, status, plot, log, timer)


def _settings(form: forms.Form) -> None:
    with gr.Row():
        forms.number(form, "max_steps", "Max steps", integer=True, minimum=0, elem_id="train-max-steps")
        forms.number(form, "num_train_epochs", "Epochs", minimum=0)
        forms.number(form, "learning_rate", "Learning rate", minimum=0, step=1e-5, elem_id="train-lr")
    with gr.Row():
        forms.number(form, "per_device_train_batch_size", "Batch size", integer=True, minimum=1, elem_id="train-batch")
        forms.number(
            form, "gradient_accumulation_steps", "Gradient accumulation", integer=True, minimum=1, elem_id="train-accum"
        )
        forms.number(form, "max_seq_length", "Max sequence length", integer=True, minimum=1, elem_id="train-seq")
    with gr.Row():
        forms.number(form, "lora_r", "LoRA rank (r)", integer=True, minimum=1, elem_id="train-lora-r")
        forms.number(form, "lora_alpha", "LoRA alpha", minimum=0)
        forms.number(form, "lora_dropout", "LoRA dropout", minimum=0, maximum=0.99, step=0.05)
    forms.dropdown(form, "target_modules", "LoRA target modules", ALL_LINEAR, multiselect=True, allow_custom_value=True)
    with gr.Row():
        forms.number(form, "eval_split", "Eval split", minimum=0, maximum=0.9, step=0.05, elem_id="train-eval")
        forms.number(
            form, "save_steps", "Checkpoint every (steps)", integer=True, minimum=1, elem_id="train-save-steps"
        )
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        with gr.Row():
            forms.checkbox(form, "gradient_checkpointing", "Gradient checkpointing", elem_id="train-gc")
            forms.checkbox(form, "train_on_responses_only", "Train on responses only")
            forms.checkbox(form, "packing", "Packing")
            forms.checkbox(form, "fit_micro_batch", "Fit micro-batch to GPU memory")
        with gr.Row():
            forms.number(form, "warmup_steps", "Warm-up steps", integer=True, minimum=0, elem_id="train-warmup")
            forms.dropdown(form, "lr_scheduler_type", "Scheduler", forms.SCHEDULERS, allow_custom_value=True)
            forms.number(form, "weight_decay", "Weight decay", minimum=0)
        with gr.Row():
            forms.dropdown(form, "optim", "Optimizer", forms.OPTIMIZERS, allow_custom_value=True)
            forms.number(form, "eval_steps", "Eval every (steps)", integer=True, minimum=0)
            forms.number(form, "save_total_limit", "Checkpoints kept", integer=True, minimum=1)
        with gr.Row():
            forms.number(form, "logging_steps", "Log every (steps)", integer=True, minimum=1)
            forms.number(form, "seed", "Seed", integer=True)
            forms.dropdown(form, "report_to", "Report to", list(REPORT_TO))
            forms.number(form, "num_gpus", "GPUs", integer=True, minimum=0)


def wire(tab: TrainTab, form: forms.Form, app: gr.Blocks, workspace: Path) -> None:
    view = [tab.status, tab.plot, tab.log, tab.start, tab.stop, tab.resume, tab.hint, tab.timer]

    @guarded
    def show(run: str | None) -> list[Any]:
        return live_view(run, workspace)

    @guarded
    def start(data: dict) -> gr.Dropdown:
        config = forms.values_to_config(form.values(data))
        config.validate()
        run_dir = jobs.create_run("train", config_to_dict(config), workspace, data[tab.run_name].strip() or None)
        jobs.start_job(run_dir)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def stop(run: str) -> None:
        jobs.stop_job(jobs.run_path(run, workspace))

    @guarded
    def resume(run: str) -> None:
        jobs.resume_job(jobs.run_path(run, workspace))

    @guarded
    def opened() -> list[Any]:
        # One call on page load (not two chained ones): the page shows the live run one round trip sooner.
        run = latest_run(workspace, KINDS)
        return [gr.Dropdown(choices=run_names(workspace, KINDS), value=run), *live_view(run, workspace)]

    def refresh(current: str | None) -> gr.Dropdown:
        names = run_names(workspace, KINDS)
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    tab.start.click(start, inputs={tab.run_name, *form.inputs()}, outputs=tab.runs).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.stop.click(stop, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.resume.click(resume, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.runs.input(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.refresh.click(refresh, inputs=tab.runs, outputs=tab.runs).then(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    # Named, so bench/ui_bench.py can time the same call the page makes every POLL_S seconds.
    tab.timer.tick(show, inputs=tab.runs, outputs=view, show_progress="hidden", api_name="train_view")
    app.load(opened, outputs=[tab.runs, *view], show_progress="hidden", api_name="train_opened")


def live_view(run: str | None, workspace: Path) -> list[Any]:
    """status, loss plot, log tail, Start / Stop / Resume, the reason a button is off, and whether to keep polling."""
    any_active = [r.name for r in jobs.list_runs(workspace) if r.kind in KINDS and r.state in jobs.ACTIVE_STATES]
    start_reason = f"Start: run `{any_active[0]}` is still active; stop it or wait for it to end." if any_active else ""
    start = gr.Button(interactive=not any_active)
    if not run:
        hint = start_reason or "No run yet: set the options and press Start."
        return [
            progress_html(None, None, "No run selected."),
            None,
            "",
            start,
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            hint,
            gr.Timer(active=False),
        ]
    run_dir = jobs.run_path(run, workspace)
    status = jobs.read_status(run_dir)
    state = status["state"]
    events = jobs.read_events(run_dir)
    active = state in jobs.ACTIVE_STATES
    can_stop = state in ("queued", "running")
    can_resume = state in ("stopped", "failed") and jobs.last_checkpoint(run_dir) is not None
    reasons = [start_reason]
    if not can_stop:
        reasons.append(f"Stop: the run is {state}.")
    if active:
        reasons.append("Resume: the run is still active.")
    elif state == "done":
        reasons.append("Resume: the run finished.")
    elif not can_resume:
        reasons.append("Resume: no checkpoint was saved yet; start a new run instead.")
    return [
        progress_html(*_progress(events), status_line(run, status, events)),
        loss_frame(events),
        jobs.log_tail(run_dir),
        start,
        gr.Button(interactive=can_stop),
        gr.Button(interactive=can_resume),
        " · ".join(reason for reason in reasons if reason),
        gr.Timer(active=active),
    ]


def _progress(events: list[dict]) -> tuple[int | None, int | None]:
    for event in reversed(events):
        if "step" in event and event.get("max_steps"):
            return event["step"], event["max_steps"]
    return None, None


def status_line(run: str, status: dict, events: list[dict]) -> str:
    """One line: state, step, losses, speed, ETA and memory from the newest events."""
    latest: dict[str, Any] = {}
    for event in events:
        if event.get("event") == "log":
            latest.update({key: value for key, value in event.items() if value is not None})
    parts = [f"<b>{html.escape(run)}</b>", f"<span class='state state-{status['state']}'>{status['state']}</span>"]
    step, max_steps = _progress(events)
    if step is not None:
        parts.append(f"step {step}/{max_steps}")
    if "loss" in latest:
        parts.append(f"loss {latest['loss']:.4f}")
    if "eval_loss" in latest:
        parts.append(f"eval loss {latest['eval_loss']:.4f}")
    if "tokens_per_s" in latest:
        parts.append(f"{latest['tokens_per_s']:.0f} tokens/s")
    if "eta_s" in latest and status["state"] == "running":
        parts.append(f"ETA {duration(latest['eta_s'])}")
    if "memory_gib" in latest:
        parts.append(f"memory {latest['memory_gib']:.2f} GiB")
    if (status.get("processes") or 1) > 1:
        devices = "GPUs" if status.get("device") == "GPU" else "processes"
        parts.append(f"{status['processes']} {devices}")
    if latest.get("gpu_memory_gib"):
        parts.append("per GPU " + ", ".join(f"{used:.1f}" for used in latest["gpu_memory_gib"]) + " GiB")
    if status.get("micro_batch"):
        parts.append(f"micro-batch {status['micro_batch']} × {status['gradient_accumulation']}")
    line = " · ".join(parts)
    if status.get("note"):
        line += f"<div class='run-note'>{html.escape(status['note'])}</div>"
    if status.get("error"):
        line += f"<pre class='run-error'>{html.escape(status['error'])}</pre>"
    return line


def loss_frame(events: list[dict]) -> pd.DataFrame | None:
    """Train and eval loss by step (None before the first one); a step logged again after a resume keeps its newest
    value."""
    points: dict[tuple[str, int], float] = {}
    for event in events:
        if event.get("event") != "log":
            continue
        for key, series in (("loss", "train"), ("eval_loss", "eval")):
            if key in event:
                points[(series, event["step"])] = event[key]
    if not points:
        return None
    rows = [{"step": step, "loss": loss, "series": series} for (series, step), loss in sorted(points.items())]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])
