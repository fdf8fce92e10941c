"""What every tab shares: turning utility errors into readable messages, uploads, run lists, download links."""

from __future__ import annotations

import filecmp
import functools
import html
import inspect
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder

import jobs
import runfolder
import stages
from workspace import UserError, workspace_root

log = logging.getLogger(__name__)

UPLOADS = "uploads"


def _readable(exc: BaseException) -> gr.Error:
    if isinstance(exc, UserError):
        return gr.Error(html.escape(str(exc)), print_exception=False)
    log.exception("unexpected error in an event handler")
    return gr.Error(html.escape(f"Something went wrong: {type(exc).__name__}: {exc}. The server log has the details."))


def guarded(fn: Callable) -> Callable:
    """Wrap an event handler so that a UserError (or any other error) reaches the user as one readable message."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise _readable(exc) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise _readable(exc) from None

    return call


def save_upload(temp_path: str | Path, workspace: Path) -> Path:
    """Copy a file uploaded through the browser into workspace/uploads/, keeping its name (suffixed if taken).

    Gradio's own copy lives in a temp folder that is cleaned up; runs refer to their data by path, so keep it here.
    Only a file inside that folder is taken: an API call can name any server path as its "upload", and copying it
    into the workspace would let a logged-in user download the server's files.
    """
    source = Path(temp_path).resolve()
    if not source.is_relative_to(Path(get_upload_folder()).resolve()) or not source.is_file():
        raise UserError(f"'{Path(temp_path).name}' was not uploaded through this page. Upload the file instead.")
    folder = workspace_root(workspace) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    suffix = 2
    while target.exists() and not filecmp.cmp(source, target, shallow=False):
        target = folder / f"{source.stem}-{suffix}{source.suffix}"
        suffix += 1
    if not target.exists():
        shutil.copyfile(source, target)
    return target


def run_names(workspace: Path, kinds: tuple[str, ...] = ("train",), states: tuple[str, ...] | None = None) -> list[str]:
    """Names of the runs of these kinds (newest first), optionally only those in these states."""
    return [run.name for run in jobs.list_runs(workspace, kinds) if states is None or run.state in states]


def model_runs(workspace: Path) -> list[tuple[str, str]]:
    """(label, name) of the training runs that have a model that writes text, newest first: finished ones, and those
    stopped or failed with a checkpoint (labelled with it: its weights are what chat, export and the arena load)."""
    choices = []
    for run in jobs.list_runs(workspace, ("train",)):
        checkpoint = None if run.state == runfolder.State.DONE else runfolder.checkpoint_model(run.path)
        if (run.state == runfolder.State.DONE or checkpoint is not None) and stages.generates_text(run.path):
            label = f"{run.name} ({run.state}: {checkpoint.name})" if checkpoint is not None else run.name
            choices.append((label, run.name))
    return choices


def latest_run(workspace: Path, kinds: tuple[str, ...]) -> str | None:
    """The newest active run of these kinds, else the newest one, else None: what a freshly opened page shows."""
    runs = jobs.list_runs(workspace, kinds)
    chosen = [run for run in runs if run.active] or runs
    return chosen[0].name if chosen else None


def active_runs(workspace: Path, kinds: tuple[str, ...]) -> list[str]:
    return [run.name for run in jobs.list_runs(workspace, kinds) if run.active]


# One EventLog per run folder that a page shows, kept between polls so each poll reads only new events.
_EVENT_LOGS: OrderedDict[Path, runfolder.EventLog] = OrderedDict()
_EVENT_LOGS_LOCK = threading.Lock()
_EVENT_LOGS_KEPT = 64


def event_log(run_dir: Path) -> runfolder.EventLog:
    """The run's events, brought up to date (only the lines appended since the last poll are read)."""
    key = Path(run_dir).resolve()
    with _EVENT_LOGS_LOCK:
        events = _EVENT_LOGS.pop(key, None) or runfolder.EventLog(key)
        _EVENT_LOGS[key] = events  # newest last
        while len(_EVENT_LOGS) > _EVENT_LOGS_KEPT:
            _EVENT_LOGS.popitem(last=False)
    return events.update()


def job_html(name: str, status: runfolder.Status, progress: runfolder.Progress) -> str:
    """A job's progress bar and line (name, state, its newest message, ETA) and its error, the same for every kind."""
    text = f"<b>{html.escape(name)}</b> · <span class='state state-{status.state}'>{status.state}</span>"
    if progress.message and progress.message.strip().lower() != status.state:  # not "done · done"
        text += f" · {html.escape(progress.message)}"
    if progress.eta_s is not None and status.state == runfolder.State.RUNNING:
        text += f" · ETA {duration(progress.eta_s)}"
    if status.error:
        text += f"<pre class='run-error'>{html.escape(status.error)}</pre>"
    return progress_html(progress.step, progress.total, text)


def file_url(path: Path) -> str:
    # The workspace is in launch(allowed_paths=…), so Gradio serves its files directly (with the login cookie when
    # auth is on); a gr.File output would instead hash and copy a multi-GiB GGUF into Gradio's cache.
    return f"/gradio_api/file={path}"


def download_links(paths: list[Path]) -> str:
    """HTML list of download links for files inside the workspace."""
    if not paths:
        return ""
    items = "".join(
        f'<li><a href="{html.escape(file_url(path))}" download="{html.escape(path.name)}">{html.escape(path.name)}</a>'
        f" ({file_size(path.stat().st_size)})</li>"
        for path in paths
        if path.exists()
    )
    return f"<ul class='downloads'>{items}</ul>"


def file_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def progress_html(step: int | None, max_steps: int | None, text: str) -> str:
    """A progress bar with a line of text under it."""
    bar = ""
    if step is not None and max_steps:
        bar = f'<progress value="{int(step)}" max="{int(max_steps)}" style="width:100%"></progress>'
    return f"<div class='run-status'>{bar}<div>{text}</div></div>"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def loss_frame(events: runfolder.EventLog) -> pd.DataFrame | None:
    """A run's train and eval loss by step (the Train tab's live plot, the Runs tab's details) (None before the first one), thinned out for a long run."""
    rows = [{"step": step, "loss": loss, "series": series} for series, step, loss in events.losses()]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]) if rows else None


def job_view(run: str | None, workspace: Path, result_file: str) -> list[Any]:
    """A job tab's view of its run: status, the result file (markdown, once written), Stop / Resume, the reason a
    button is off, and polling while the job is active."""
    if not run:
        off = gr.Button(interactive=False)
        return ["", "", off, off, "", gr.Timer(active=False)]
    run_dir = runfolder.run_path(run, workspace)
    status = jobs.job_status(run_dir)
    allowed = jobs.actions(run_dir, status)
    result = run_dir / result_file
    reasons = []
    if not allowed.can_stop:
        reasons.append(f"Stop: {allowed.stop_reason}")
    if not allowed.can_resume:
        reasons.append(f"Resume: {allowed.resume_reason}")
    return [
        job_html(run, status, runfolder.read_progress(run_dir)),
        result.read_text(encoding="utf-8") if result.exists() else "",
        gr.Button(interactive=allowed.can_stop),
        gr.Button(interactive=allowed.can_resume),
        " · ".join(reasons),
        gr.Timer(active=status.active),
    ]


def job_controls(prefix: str, noun: str, run_placeholder: str, result_id: str, poll_s: float) -> tuple:
    """A job tab's bottom half, built alike for the Arena and the Benchmarks: run name, Start / Stop / Resume, the hint
    under them, the runs list with Refresh, the run's status, its result (markdown) and the polling timer; in that
    order. Element ids start with `prefix` (the browser tests find them by it)."""
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(label="Run name", placeholder=run_placeholder, scale=3)
        start = gr.Button(f"Start {noun}", variant="primary", scale=1, elem_id=f"{prefix}-start")
        stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, elem_id=f"{prefix}-stop")
        resume = gr.Button("Resume", interactive=False, scale=1, elem_id=f"{prefix}-resume")
    hint = gr.Markdown(elem_id=f"{prefix}-hint")
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label=f"{noun.capitalize()} run", choices=[], scale=4, elem_id=f"{prefix}-runs")
        refresh = gr.Button("Refresh", size="sm", scale=1)
    status = gr.HTML(elem_id=f"{prefix}-status")
    result = gr.Markdown(elem_id=result_id)
    timer = gr.Timer(poll_s, active=False)
    return run_name, start, stop, resume, refresh, hint, runs, status, result, timer
