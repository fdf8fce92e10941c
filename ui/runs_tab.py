"""Runs tab: every run folder on disk with its config, metrics, status and log; delete with a confirmation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import compare_utils
import jobs
import runfolder
import submit
from ui.common import duration, event_log, guarded, loss_frame
from workspace import dump_yaml, read_json

COLUMNS = ["name", "kind", "state", "created", "progress", "last loss", "error"]


@dataclass
class RunsTab:
    refresh: gr.Button
    table: gr.Dataframe
    run: gr.Dropdown
    status: gr.Markdown
    config: gr.Code
    metrics: gr.JSON
    plot: gr.LinePlot
    log: gr.Textbox
    delete: gr.Button
    confirm_row: gr.Row
    confirm_text: gr.Markdown
    confirm: gr.Button
    cancel: gr.Button
    compare_runs: gr.Dropdown
    compare: gr.Button
    compare_plot: gr.LinePlot
    compare_metrics: gr.Dataframe
    compare_differences: gr.Dataframe


def build() -> RunsTab:
    gr.Markdown("Every run in the workspace (training, export, evaluation, synthetic data), read from its folder.")
    refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, max_height=320, elem_id="runs-table")
    with gr.Row(equal_height=True):
        run = gr.Dropdown(label="Run", choices=[], scale=4, elem_id="runs-run")
        delete = gr.Button("Delete run…", variant="stop", scale=1, interactive=False, elem_id="runs-delete")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown()
        confirm = gr.Button("Yes, delete it", variant="stop", elem_id="runs-confirm")
        cancel = gr.Button("Cancel", elem_id="runs-cancel")
    status = gr.Markdown(elem_id="runs-status")
    with gr.Row():
        config = gr.Code(label="config.yaml", language="yaml", interactive=False, lines=14, elem_id="runs-config")
        metrics = gr.JSON(label="Metrics and outputs", elem_id="runs-metrics")
    plot = gr.LinePlot(
        x="step",
        y="loss",
        color="series",
        title="Loss",
        height=240,
        x_axis_format="d",  # steps are whole numbers: a short run's axis ticked 0.5, 1.5, …
        color_map={"train": "#2563eb", "eval": "#f97316"},
    )
    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, interactive=False, elem_id="runs-log")
    with gr.Accordion("Compare training runs", open=False):
        with gr.Row(equal_height=True):
            compare_runs = gr.Dropdown(
                label="Training runs", choices=[], multiselect=True, scale=4, elem_id="runs-compare-runs"
            )
            compare = gr.Button("Compare", scale=1, elem_id="runs-compare")
        compare_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Loss and eval loss", height=280)
        compare_metrics = gr.Dataframe(
            headers=compare_utils.METRIC_COLUMNS,
            label="Final and best (a stage's own metrics: their last values)",
            interactive=False,
            elem_id="runs-compare-table",
        )
        compare_differences = gr.Dataframe(
            label="Settings that differ", interactive=False, wrap=True, elem_id="runs-compare-differences"
        )
    return RunsTab(
        refresh,
        table,
        run,
        status,
        config,
        metrics,
        plot,
        log,
        delete,
        confirm_row,
        confirm_text,
        confirm,
        cancel,
        compare_runs,
        compare,
        compare_plot,
        compare_metrics,
        compare_differences,
    )


def wire(tab: RunsTab, tab_container: gr.Tab, workspace: Path) -> None:
    details = [tab.status, tab.config, tab.metrics, tab.plot, tab.log, tab.delete]

    def listing(current: str | None) -> tuple[pd.DataFrame, gr.Dropdown]:
        runs = jobs.list_runs(workspace)
        rows = [
            [
                run.name,
                run.kind,
                str(run.state),
                run.status.created,
                progress_cell(run),
                f"{run.progress.metrics['loss']:.4f}" if run.progress.metrics.get("loss") is not None else "",
                run.status.error.splitlines()[0] if run.status.error else "",
            ]
            for run in runs
        ]
        names = [run.name for run in runs]
        chosen = current if current in names else (names[0] if names else None)
        return pd.DataFrame(rows, columns=COLUMNS), gr.Dropdown(choices=names, value=chosen)

    @guarded
    def show(run: str | None) -> list[Any]:
        return run_details(run, workspace)

    def pick_row(event: gr.SelectData) -> str:
        return event.row_value[0]

    @guarded
    def ask(run: str | None) -> tuple[gr.Row, str]:
        if not run:
            raise gr.Error("Choose a run first.")
        return gr.Row(visible=True), f"Delete run **{run}** and every file in its folder? This cannot be undone."

    @guarded
    def delete(run: str) -> tuple[gr.Row, str]:
        submit.delete(run, workspace)
        return gr.Row(visible=False), f"Deleted run `{run}`."

    hide = lambda: gr.Row(visible=False)  # noqa: E731

    def compare_choices(current: list[str] | None) -> gr.Dropdown:
        names = [run.name for run in jobs.list_runs(workspace, kinds=("train",))]
        return gr.Dropdown(choices=names, value=[name for name in current or [] if name in names])

    @guarded
    def compare(chosen: list[str] | None) -> list[Any]:
        return comparison_view(chosen or [], workspace)

    for trigger in (tab.refresh.click, tab_container.select):
        trigger(compare_choices, inputs=tab.compare_runs, outputs=tab.compare_runs)
    tab.compare.click(
        compare, inputs=tab.compare_runs, outputs=[tab.compare_plot, tab.compare_metrics, tab.compare_differences]
    )

    for trigger in (tab.refresh.click, tab_container.select):
        trigger(listing, inputs=tab.run, outputs=[tab.table, tab.run]).then(show, inputs=tab.run, outputs=details)
    # Another run chosen: its details, and no confirmation of the last one's deletion. The confirmation hides first:
    # hidden after the details load, it also hid a Delete clicked while they loaded (seen in the browser test).
    tab.table.select(pick_row, outputs=tab.run).then(hide, outputs=tab.confirm_row).then(
        show, inputs=tab.run, outputs=details
    )
    tab.run.input(hide, outputs=tab.confirm_row).then(show, inputs=tab.run, outputs=details)
    tab.delete.click(ask, inputs=tab.run, outputs=[tab.confirm_row, tab.confirm_text])
    tab.cancel.click(hide, outputs=tab.confirm_row)
    tab.confirm.click(delete, inputs=tab.run, outputs=[tab.confirm_row, tab.status]).success(
        listing, inputs=tab.run, outputs=[tab.table, tab.run]
    ).then(show, inputs=tab.run, outputs=details)


def progress_cell(run: jobs.RunInfo) -> str:
    """step/total, ETA while running, and the newest message: the same for every kind of job."""
    progress = run.progress
    parts = [f"{progress.step}/{progress.total}"] if progress.step is not None and progress.total else []
    if progress.eta_s is not None and run.state == runfolder.State.RUNNING:
        parts.append(f"ETA {duration(progress.eta_s)}")
    if progress.message:
        parts.append(progress.message)
    return " · ".join(parts)


def run_details(run: str | None, workspace: Path) -> list[Any]:
    """status line, config YAML, metrics and outputs, loss plot, log tail, and whether Delete applies."""
    if not run:
        return ["No runs yet.", "", None, None, "", gr.Button(interactive=False)]
    run_dir = runfolder.run_path(run, workspace)
    status = jobs.job_status(run_dir)
    allowed = jobs.actions(run_dir, status)
    line = f"**{run}** · {status.state} · created {status.created or '?'} · folder `{run_dir}`"
    if status.error:
        line += f"\n\n```\n{status.error}\n```"
    if not allowed.can_delete:
        line += f"\n\nDelete: {allowed.delete_reason}"
    metrics = {"progress": read_json(run_dir / "progress.json", default=None)}
    for report in sorted(run_dir.glob("*.json")):
        if report.name not in runfolder.BOOKKEEPING:
            metrics[report.stem] = read_json(report, default=None)
    metrics["outputs"] = sorted(
        path.name + ("/" if path.is_dir() else "")
        for path in run_dir.iterdir()
        if path.name not in runfolder.BOOKKEEPING and not path.name.startswith(".")
    )
    return [
        line,
        dump_yaml(runfolder.read_config(run_dir)),
        json.loads(json.dumps(metrics, default=str)),
        loss_frame(event_log(run_dir)),
        runfolder.log_tail(run_dir),
        gr.Button(interactive=allowed.can_delete),
    ]


def comparison_view(runs: list[str], workspace: Path) -> list[Any]:
    """Overlaid loss curves, the final-and-best table (with each run's stage and its stage metrics) and the settings
    that differ, for the chosen training runs."""
    comparison = compare_utils.compare_runs(runs, workspace)
    curves = pd.DataFrame(
        [(f"{run} · {series}", step, loss) for run, series, step, loss in comparison.curves],
        columns=["curve", "step", "loss"],
    )
    names = [run.name for run in comparison.runs]
    differences = pd.DataFrame(compare_utils.difference_rows(comparison), columns=["setting", *names])
    return [
        curves,
        pd.DataFrame(compare_utils.metric_rows(comparison), columns=compare_utils.metric_columns(comparison)),
        differences,
    ]
