"""Benchmarks tab: a training run's base and tuned models (and its GGUF) on lm-evaluation-harness tasks, as a job
with progress, stop and resume; the table base vs tuned with standard errors and the difference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import benchmark
import submit
from benchmark import BenchmarkConfig
from ui import forms
from ui.common import guarded, job_controls, job_view, latest_run, run_names, save_upload

KINDS = ("benchmark",)
POLL_S = 2.0
FIELDS = ("limit", "num_fewshot", "gguf", "batch_size")


@dataclass
class BenchTab:
    run: gr.Dropdown
    tasks: gr.Dropdown
    task_file: gr.Textbox
    upload: gr.File
    contestants: gr.CheckboxGroup
    fields: dict[str, gr.components.Component]
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    refresh: gr.Button
    hint: gr.Markdown
    runs: gr.Dropdown
    status: gr.HTML
    table: gr.Markdown
    timer: gr.Timer


def build() -> BenchTab:
    gr.Markdown(
        "Did tuning make the model worse at everything else? Score the run's base and tuned models on "
        "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) tasks: pick common ones, type "
        "any task name the harness knows, or give a custom task file in its YAML format. Standard tasks download "
        "their data from the Hugging Face Hub on first use."
    )
    with gr.Row():
        run = forms.widget(BenchmarkConfig, "run", None, gr.Dropdown, choices=[], elem_id="bench-run")
        tasks = forms.widget(
            BenchmarkConfig,
            "tasks",
            choices=list(benchmark.COMMON_TASKS),
            multiselect=True,
            allow_custom_value=True,
            scale=2,
            elem_id="bench-tasks",
        )
    with gr.Row():
        task_file = forms.widget(BenchmarkConfig, "task_file", scale=2, elem_id="bench-task-file")
        upload = gr.File(
            label="…or upload a task YAML (its data files beside it must be reachable)", file_types=[".yaml"]
        )
        contestants = forms.widget(
            BenchmarkConfig,
            "contestants",
            component=gr.CheckboxGroup,
            choices=list(benchmark.CONTESTANTS),
            elem_id="bench-contestants",
        )
    fields: dict[str, gr.components.Component] = {}
    with gr.Row():
        for name in FIELDS:
            fields[name] = forms.widget(BenchmarkConfig, name)
    controls = job_controls("bench", "benchmark", "optional: bench-<run>", "bench-table", POLL_S)
    return BenchTab(
        run,
        tasks,
        task_file,
        upload,
        contestants,
        fields,
        *controls,
    )


def wire(tab: BenchTab, tab_container: gr.Tab, app: gr.Blocks, workspace: Path) -> None:
    names = list(tab.fields)
    view = [tab.status, tab.table, tab.stop, tab.resume, tab.hint, tab.timer]

    @guarded
    def start(run: str, tasks: list[str], task_file: str, upload: str | None, contestants, run_name: str, *values):
        data: dict[str, Any] = dict(zip(names, values, strict=True))
        data.update(run=run or "", tasks=list(tasks or []), contestants=list(contestants or []))
        data["task_file"] = str(save_upload(upload, workspace)) if upload else (task_file or "").strip()
        if data.get("num_fewshot") is not None:
            data["num_fewshot"] = int(data["num_fewshot"])
        config = benchmark.benchmark_config_from_dict(data)
        run_dir = submit.submit("benchmark", config, workspace, run_name or None)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def show(run: str | None) -> list[Any]:
        return bench_view(run, workspace)

    @guarded
    def stop(run: str) -> None:
        submit.stop(run, workspace)

    @guarded
    def resume(run: str) -> None:
        submit.resume(run, workspace)

    def opened(current: str | None, run: str | None) -> list[Any]:
        trained = run_names(workspace, ("train",), states=("done",))
        runs = run_names(workspace, KINDS)
        chosen = run if run in runs else latest_run(workspace, KINDS)
        return [
            gr.Dropdown(choices=trained, value=current if current in trained else (trained[0] if trained else None)),
            gr.Dropdown(choices=runs, value=chosen),
            *bench_view(chosen, workspace),
        ]

    inputs = [tab.run, tab.tasks, tab.task_file, tab.upload, tab.contestants, tab.run_name]
    tab.start.click(start, inputs=[*inputs, *(tab.fields[name] for name in names)], outputs=tab.runs).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.stop.click(stop, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.resume.click(resume, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.runs.input(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.timer.tick(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    for trigger in (tab.refresh.click, tab_container.select):
        trigger(opened, inputs=[tab.run, tab.runs], outputs=[tab.run, tab.runs, *view])
    app.load(opened, inputs=[tab.run, tab.runs], outputs=[tab.run, tab.runs, *view])


def bench_view(run: str | None, workspace: Path) -> list[Any]:
    """status, the table (once written), Stop / Resume, the reason a button is off, and polling."""
    return job_view(run, workspace, benchmark.TABLE_FILE)
