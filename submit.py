"""The submit layer: what the CLI and the UI both call to start, resume, stop and delete jobs.

`submit(kind, config, ...)` does the same for every kind of job, from its entry in `jobs.KINDS`: build the config,
check what can be refused before a job exists, create the run folder and start the job, so the two entry points
accept and refuse exactly the same things. `resume` gives a run its kind's environment again (an API key) and starts
it once more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jobs
import runfolder
from workspace import UserError, config_to_dict, import_function


def submit(
    kind: str,
    config: Any,
    workspace: str | Path | None = None,
    name: str | None = None,
    api_key: str | None = None,
) -> Path:
    """Start a job of this kind from its config dataclass (or its settings as a dict); returns its run folder.

    An API key (a synthetic-data provider's, a judge's) travels in the job's environment only, never into its folder.
    `name` blank: the kind's default (export-RUN, eval-RUN, else KIND-date-time)."""
    job_kind = jobs.job_kind(kind)
    if isinstance(config, dict):
        config = import_function(job_kind.config)(config)
    config = import_function(job_kind.check)(config, workspace, api_key)
    settings = config_to_dict(config)
    env = import_function(job_kind.env)(settings, api_key) if job_kind.env else {}
    files = import_function(job_kind.inputs)(config) if job_kind.inputs else []
    inputs = {str(path): runfolder.file_sha256(path) for path in files}
    if not (name or "").strip() and job_kind.run_name:
        name = import_function(job_kind.run_name)(config)
    run_dir = jobs.create_run(kind, settings, workspace, name, inputs=inputs)
    jobs.start_job(run_dir, env=env)
    return run_dir


def resume(run: str | Path, workspace: str | Path | None = None, api_key: str | None = None) -> Path:
    """Resume a stopped or failed run of any kind (a training run from its last checkpoint), with its kind's
    environment made again from its saved settings."""
    run_dir = runfolder.run_path(run, workspace)
    try:
        kind = runfolder.read_config(run_dir).get("kind")
    except UserError as exc:
        raise UserError(f"Run '{run_dir.name}' cannot be resumed: {exc} Start a new run.") from None
    if kind not in jobs.KINDS:
        raise UserError(
            f"Run '{run_dir.name}' cannot be resumed: its config.yaml names no job kind ({', '.join(jobs.KINDS)}). "
            "Start a new run."
        )
    job_kind = jobs.job_kind(kind)
    env = import_function(job_kind.env)(runfolder.stage_settings(run_dir), api_key) if job_kind.env else {}
    jobs.resume_job(run_dir, env=env)
    return run_dir


def stop(run: str | Path, workspace: str | Path | None = None) -> Path:
    run_dir = runfolder.run_path(run, workspace)
    jobs.stop_job(run_dir)
    return run_dir


def delete(run: str | Path, workspace: str | Path | None = None) -> None:
    jobs.delete_run(runfolder.run_path(run, workspace))


def latest_job(kind: str, target_run: str | None, workspace: str | Path | None = None) -> jobs.RunInfo | None:
    """The newest `kind` job (export, eval) made from the training run `target_run`."""
    if not target_run:
        return None
    try:
        target = runfolder.run_path(target_run, workspace)
    except UserError:
        return None
    return next((info for info in jobs.list_runs(workspace, kinds=(kind,)) if jobs.reads_run(info.path, target)), None)
