"""What submit asks of each built-in job kind before its run folder exists, named by the kinds in `jobs.KINDS`.

For every kind: `check_<kind>(config, workspace, api_key)` refuses what can be refused now and returns the config
as it is saved (user paths resolved to their meaning, a training run named as the job will find it); where the kind
has them, the local files it reads (`<kind>_inputs`), its environment from its saved settings (`<kind>_env`, also
called on resume) and its default run name (`<kind>_run_name`). Stage modules are imported inside each function:
looking a kind up imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import runfolder
from workspace import UserError, import_function, resolve_user_path

# ---------------------------------------------------------------- train


def check_train(config, workspace: str | Path | None = None, api_key: str | None = None):
    """A training run's settings, its model (a download the job would need) and a GRPO judge, checked now."""
    import dataset_files
    import preference_utils

    config.validate()
    check_model(config.model.name_or_path, workspace)
    preference_utils.check_judge(
        config, api_key
    )  # a judge that cannot answer is refused now, not after the model loads
    # The CLI and Preview read a relative path from the user's folder, the job runs from the app's: fix its meaning
    # once, here (local_file refuses a missing file, and one outside the workspace when shared). A Hub id stays as
    # it is, once its form and (offline) the cache are checked.
    local = dataset_files.local_file(config.dataset, workspace)
    if local is not None:
        dataset_files.check_data_file(local)  # a folder, a pipe, a file of no data type, an empty file
        config.dataset.source = str(local)
    else:
        dataset_files.check_hub_dataset(config.dataset)
    return config


def train_inputs(config) -> list[str]:
    """The reward file and a local dataset file: the job refuses to run if either changed since the start."""
    files = [config.reward_file] if config.reward_file else []
    if Path(str(config.dataset.source)).is_file():  # check_train made a local file's path absolute
        files.append(str(config.dataset.source))
    return files


def train_env(settings: dict[str, Any], api_key: str | None = None) -> dict[str, str]:
    """A GRPO judge's API key; other training runs need no environment (and old ones keep resuming even when their
    settings predate an option, so their config is not rebuilt)."""
    import preference_utils
    import stages
    from train_config import train_config_from_dict

    if stages.get(settings.get("stage", "sft")).reward_functions and "judge" in (settings.get("reward_funcs") or []):
        return preference_utils.job_env(train_config_from_dict(settings), api_key)
    return {}


def check_model(name: str, workspace: str | Path | None = None) -> None:
    """A model a job would load, checked before the job exists: a local folder (inside the workspace when the app
    is shared, holding a model), a malformed id, HF_HUB_OFFLINE=1 with the model not cached, a missing or gated
    repo, a disk too small. The CLI calls it before its estimates, which read the model's config."""
    import download_utils
    import model_utils

    name = str(name).strip()
    if name == model_utils.DEMO_MODEL:
        return
    if model_utils.is_local_reference(name):
        model_utils.resolve_model_path(name, workspace)  # a folder: nothing is downloaded
        return
    if model_utils.local_or_cached(name, workspace) is None:
        download_utils.check_download(name)


# ---------------------------------------------------------------- synthetic data and arena


def check_synth(config, workspace: str | Path | None = None, api_key: str | None = None):
    # The job runs from the app's folder: relative document paths must keep their meaning on the way.
    config.documents = [str(resolve_user_path(path, workspace)) for path in config.documents]
    config.validate(workspace)
    return config


def synth_env(settings: dict[str, Any], api_key: str | None = None) -> dict[str, str]:
    """The provider's API key, in the job's environment only."""
    import synthetic_utils

    return synthetic_utils.job_env(synthetic_utils.synthetic_config_from_dict(settings), api_key)


def check_arena(config, workspace: str | Path | None = None, api_key: str | None = None):
    """The arena's own checks, each base: contestant as a training run's model is checked (check_model), then the
    judge is asked whether it answers."""
    import arena_config
    import arena_utils

    config = arena_utils.check_arena(config, workspace)
    for contestant in config.contestants:
        kind, model = arena_config.parse_contestant(contestant)
        if kind == "base":
            try:
                check_model(model, workspace)
            except UserError as exc:
                raise UserError(f"Contestant '{contestant}': {exc}") from None
    arena_utils.check_judge(config, api_key)
    return config


def arena_inputs(config) -> list[str]:
    return [config.prompts_file] if config.prompt_source == "file" else []


def arena_env(settings: dict[str, Any], api_key: str | None = None) -> dict[str, str]:
    """The judge's API key, in the job's environment only."""
    import arena_utils

    return arena_utils.job_env(arena_utils.arena_config_from_dict(settings), api_key)


# ---------------------------------------------------------------- jobs on a finished training run


def check_export(config, workspace: str | Path | None = None, api_key: str | None = None):
    """Everything the config's export target refuses before a job exists; `run` then names the run as the job finds
    it."""
    import export_targets

    target = export_targets.target_of(config)
    model = import_function(target.check)(config, workspace)
    config.run = run_reference(model.run_dir, workspace)
    return config


def export_run_name(config) -> str:
    """export-RUN, whatever the target (jobs adds -2, -3 … when it exists)."""
    import gguf_utils

    return gguf_utils.export_run_name(config.run)


def check_eval(config, workspace: str | Path | None = None, api_key: str | None = None):
    import evaluation

    config.run = run_reference(evaluation.check_evaluable(config, workspace), workspace)
    return config


def eval_run_name(config) -> str:
    import evaluation

    return evaluation.eval_run_name(config.run)


def check_benchmark(config, workspace: str | Path | None = None, api_key: str | None = None):
    """The run's trained model (and GGUF), every task's name and, offline, its data, checked now."""
    import benchmark

    config = benchmark.check_benchmark(config, workspace)
    config.run = run_reference(runfolder.run_path(config.run, workspace), workspace)
    return config


def benchmark_inputs(config) -> list[str]:
    """A custom task file: the job refuses to run if it changed since the start."""
    return [config.task_file] if config.task_file else []


def benchmark_run_name(config) -> str:
    import benchmark

    return benchmark.benchmark_run_name(config)


def run_reference(run_dir: Path, workspace: str | Path | None) -> str:
    """How a job's config names its training run: by name inside this workspace, else by its full path (the job
    resolves names in its own folder's workspace)."""
    return run_dir.name if run_dir.parent == runfolder.runs_dir(workspace) else str(run_dir)


# ---------------------------------------------------------------- model download


def check_download(config, workspace: str | Path | None = None, api_key: str | None = None):
    """A missing or gated repo and a disk too small are refused here, from the Hub's metadata."""
    import download_utils

    config.validate()
    download_utils.check_download(config.repo_id, config.revision)
    return config


# ---------------------------------------------------------------- push to the Hub


def check_push(config, workspace: str | Path | None = None, api_key: str | None = None):
    """The run's files, the token (present, may write), the owner and the repo name, checked before a job exists;
    `run` then names the run as the job finds it."""
    import hub_push

    model = hub_push.check_push(config, workspace)
    config.run = run_reference(model.run_dir, workspace)
    return config


def push_run_name(config) -> str:
    import hub_push

    return hub_push.push_run_name(config.run)
