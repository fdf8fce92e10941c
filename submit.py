"""The submit layer: what the CLI and the UI both call to start, resume, stop and delete jobs.

Each `submit_<kind>` validates the stage's config, checks what can be refused before a job exists, creates the run
folder and starts the job, so the two entry points accept and refuse exactly the same things.
"""

from __future__ import annotations

from pathlib import Path

import jobs
import runfolder
from workspace import UserError, config_to_dict, resolve_user_path


def submit_train(
    config, workspace: str | Path | None = None, name: str | None = None, api_key: str | None = None
) -> Path:
    """Start a training run from a TrainConfig (or its settings as a dict); a GRPO judge's API key travels in the
    job's environment only, never into its folder."""
    import preference_utils
    from train_config import train_config_from_dict

    if isinstance(config, dict):
        config = train_config_from_dict(config)
    config.validate()
    check_model(config.model.name_or_path, workspace)
    env = preference_utils.job_env(config, api_key)
    preference_utils.check_judge(
        config, api_key
    )  # a judge that cannot answer is refused now, not after the model loads
    inputs = {config.reward_file: runfolder.file_sha256(config.reward_file)} if config.reward_file else {}
    source = Path(str(config.dataset.source).strip()).expanduser()
    # The CLI and Preview read a relative path from the user's folder, the job runs from the app's: fix its meaning
    # once, here. A Hub id (owner/name) that is no local path stays as it is.
    if source.exists():
        source = resolve_user_path(source, workspace)
        config.dataset.source = str(source)
        if source.is_file():
            inputs[str(source)] = runfolder.file_sha256(source)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, name, inputs=inputs)
    jobs.start_job(run_dir, env=env)
    return run_dir


def submit_synth(
    config, workspace: str | Path | None = None, name: str | None = None, api_key: str | None = None
) -> Path:
    """Start a synthetic-data run; the API key travels in the job's environment only, never into its folder."""
    import synthetic_utils

    if isinstance(config, dict):
        config = synthetic_utils.synthetic_config_from_dict(config)
    # The job runs from the app's folder: relative document paths must keep their meaning on the way.
    config.documents = [str(resolve_user_path(path, workspace)) for path in config.documents]
    config.validate(workspace)
    env = synthetic_utils.job_env(config, api_key)
    run_dir = jobs.create_run("synth", config_to_dict(config), workspace, name)
    jobs.start_job(run_dir, env=env)
    return run_dir


def submit_arena(
    config, workspace: str | Path | None = None, name: str | None = None, api_key: str | None = None
) -> Path:
    """Start an arena run; the judge's API key travels in the job's environment only, never into its folder."""
    import arena_utils

    if isinstance(config, dict):
        config = arena_utils.arena_config_from_dict(config)
    config = arena_utils.check_arena(config, workspace)
    env = arena_utils.job_env(config, api_key)
    inputs = {config.prompts_file: runfolder.file_sha256(config.prompts_file)} if config.prompt_source == "file" else {}
    run_dir = jobs.create_run("arena", config_to_dict(config), workspace, name, inputs)
    jobs.start_job(run_dir, env=env)
    return run_dir


def submit_export(config, workspace: str | Path | None = None) -> Path:
    """Start an export of a finished training run (an ExportConfig or its settings as a dict)."""
    import gguf_utils

    if isinstance(config, dict):
        config = gguf_utils.export_config_from_dict(config)
    run_dir = gguf_utils.check_export(config, workspace).run_dir
    config.run = _run_reference(run_dir, workspace)
    job = jobs.create_run("export", config_to_dict(config), workspace, gguf_utils.export_run_name(run_dir.name))
    jobs.start_job(job)
    return job


def submit_eval(config, workspace: str | Path | None = None) -> Path:
    """Start a held-out evaluation of a training run (an EvalConfig or its settings as a dict)."""
    import inference_utils

    if isinstance(config, dict):
        config = inference_utils.eval_config_from_dict(config)
    target = inference_utils.check_evaluable(config, workspace)
    config.run = _run_reference(target, workspace)
    job = jobs.create_run("eval", config_to_dict(config), workspace, inference_utils.eval_run_name(target.name))
    jobs.start_job(job)
    return job


def submit_download(config, workspace: str | Path | None = None, name: str | None = None) -> Path:
    """Start a model download (a DownloadConfig, its settings, or a Hub id); a missing or gated repo and a disk
    too small are refused here, from the Hub's metadata, before a job exists."""
    import download_utils

    if isinstance(config, str):
        config = download_utils.DownloadConfig(repo_id=config)
    elif isinstance(config, dict):
        config = download_utils.download_config_from_dict(config)
    config.validate()
    download_utils.check_download(config.repo_id, config.revision)
    run_dir = jobs.create_run("download", config_to_dict(config), workspace, name)
    jobs.start_job(run_dir)
    return run_dir


def resume(run: str | Path, workspace: str | Path | None = None, api_key: str | None = None) -> Path:
    """Resume a stopped or failed run of any kind (a training run from its last checkpoint)."""
    run_dir = runfolder.run_path(run, workspace)
    env: dict[str, str] = {}
    if runfolder.read_kind(run_dir) == "synth":
        import synthetic_utils

        settings = runfolder.stage_settings(run_dir)
        env = synthetic_utils.job_env(synthetic_utils.synthetic_config_from_dict(settings), api_key)
    elif runfolder.read_kind(run_dir) == "arena":
        import arena_utils

        env = arena_utils.job_env(arena_utils.arena_config_from_dict(runfolder.stage_settings(run_dir)), api_key)
    elif runfolder.read_kind(run_dir) == "train":
        import preference_utils
        from train_config import train_config_from_dict

        settings = runfolder.stage_settings(run_dir)
        if settings.get("stage") == "grpo" and "judge" in (settings.get("reward_funcs") or []):
            # A GRPO judge's key, as at the start; other training runs need no environment (and old ones keep
            # resuming even when their settings predate an option).
            env = preference_utils.job_env(train_config_from_dict(settings), api_key)
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


def check_model(name: str, workspace: str | Path | None = None) -> None:
    """A model a training job would have to download, checked before the job exists: a malformed id,
    HF_HUB_OFFLINE=1 with the model not cached, a missing or gated repo, a disk too small. The demo model and local
    folders are read by the job itself. The CLI calls it before its estimates, which read the model's config."""
    import download_utils
    import model_utils

    name = str(name).strip()
    if name == model_utils.DEMO_MODEL or model_utils.is_local_reference(name):
        return
    if model_utils.local_or_cached(name, workspace) is None:
        download_utils.check_download(name)


def _run_reference(run_dir: Path, workspace: str | Path | None) -> str:
    """How a job's config names its training run: by name inside this workspace, else by its full path (the job
    resolves names in its own folder's workspace)."""
    return run_dir.name if run_dir.parent == runfolder.runs_dir(workspace) else str(run_dir)
