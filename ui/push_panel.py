"""The Export tab's *Push to the Hub* panel: the chosen run's adapter, merged weights and/or GGUF files to a Hub repo
with a model card, as a push job (hub_push) whose bytes, rate and ETA show here."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import hub_push
import submit
from hub_push import PushConfig
from ui import forms
from ui.common import guarded, job_html
from workspace import read_json

POLL_S = 1.5


@dataclass
class PushPanel:
    repo_id: gr.Textbox
    private: gr.Checkbox
    what: gr.CheckboxGroup
    push: gr.Button
    stop: gr.Button
    status: gr.HTML
    result: gr.Markdown
    timer: gr.Timer


def build() -> PushPanel:
    with gr.Group():
        gr.Markdown(
            "**Push to the Hub**: upload the run's files to a Hugging Face repo (created if needed) with a model card "
            "made from the run. The token is `HF_TOKEN` or the one `hf auth login` saved, and must be able to write; "
            "pushing again skips what the repo already holds."
        )
        with gr.Row(equal_height=True):
            repo_id = forms.widget(PushConfig, "repo_id", placeholder="alice/my-model", scale=3, elem_id="push-repo")
            private = forms.widget(PushConfig, "private", scale=1, elem_id="push-private")
        what = forms.widget(
            PushConfig, "what", component=gr.CheckboxGroup, choices=list(hub_push.PARTS), elem_id="push-what"
        )
        with gr.Row():
            push = gr.Button("Push to the Hub", variant="primary", elem_id="push-start")
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="push-stop")
        status = gr.HTML(elem_id="push-status")
        result = gr.Markdown(elem_id="push-result")
    return PushPanel(repo_id, private, what, push, stop, status, result, gr.Timer(POLL_S, active=False))


def wire(panel: PushPanel, run: gr.Dropdown, workspace: Path) -> None:
    view = [panel.status, panel.result, panel.push, panel.stop, panel.timer]

    @guarded
    def show(run_name: str | None) -> list[Any]:
        return push_view(run_name, workspace)

    @guarded
    def start(run_name: str, repo_id: str, private: bool, what: list[str]) -> None:
        config = PushConfig(run=run_name or "", repo_id=repo_id or "", private=bool(private), what=list(what or []))
        submit.submit("push", config, workspace)

    @guarded
    def stop(run_name: str) -> None:
        job = submit.latest_job("push", run_name, workspace)
        if job is None or not job.active:
            raise gr.Error("No push of this run is running.")
        submit.stop(job.path, workspace)

    run.change(show, inputs=run, outputs=view, show_progress="hidden")
    inputs = [run, panel.repo_id, panel.private, panel.what]
    panel.push.click(start, inputs=inputs).success(show, inputs=run, outputs=view, show_progress="hidden")
    panel.stop.click(stop, inputs=run).success(show, inputs=run, outputs=view, show_progress="hidden")
    panel.timer.tick(show, inputs=run, outputs=view, show_progress="hidden")


def push_view(run: str | None, workspace: Path) -> list[Any]:
    """The newest push of the run: its progress line, where it went, Push / Stop and the polling timer."""
    job = submit.latest_job("push", run, workspace) if run else None
    if job is None:
        return ["", "", gr.Button(interactive=bool(run)), gr.Button(interactive=False), gr.Timer(active=False)]
    status = job_html(job.name, job.status, job.progress)
    result = ""
    pushed = read_json(job.path / "push.json", default=None)
    if pushed and not job.active:
        url = html.escape(pushed["url"])
        result = (
            f"Pushed to [{url}]({url}): {len(pushed['uploaded'])} file(s) uploaded "
            f"({hub_push.size_text(pushed['bytes_uploaded'])}), {len(pushed['skipped'])} already there."
        )
    elif job.status.state == "stopped":
        result = "Stopped: push again to resume (files already on the Hub are skipped)."
    return [
        status,
        result,
        gr.Button(interactive=not job.active),
        gr.Button(interactive=job.active),
        gr.Timer(active=job.active),
    ]
