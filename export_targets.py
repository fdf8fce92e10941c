"""Where an export job sends a finished training run: one `ExportTarget` per target in `TARGETS` (GGUF today).

Every target's runs are `export` jobs (`jobs.KINDS`), so the Export tab, the runs list and the guard that keeps a
run from being deleted while it is read treat them alike. A target is its module (a config dataclass, a check, a
job function) and one record here; its config's `target` field, defaulting to the target's name, says in the run's
settings which target a run is for. GGUF's `ExportConfig` predates targets and has none: a run that names no target
is GGUF's, so every export run made before targets keeps resuming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workspace import UserError, import_function

DEFAULT = "gguf"


@dataclass(frozen=True)
class ExportTarget:
    """One export target. Functions are named `module:function`, imported only when called."""

    name: str  # what a config's `target` field holds
    config: str  # function(settings: dict) -> the target's config dataclass (its `run` names the training run)
    check: str  # function(config, workspace) -> the runfolder.TrainedModel it exports; UserError before a job exists
    run: str  # function(config, ctx: runfolder.JobContext) -> "done" | "stopped"


TARGETS = {
    target.name: target
    for target in (
        ExportTarget("gguf", "gguf_utils:export_config_from_dict", "gguf_utils:check_export", "gguf_utils:export_job"),
    )
}


def export_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise UserError(f"Unknown export target '{name}'; one of: {', '.join(TARGETS)}.")
    return TARGETS[name]


def target_of(config: Any) -> ExportTarget:
    """The target of an export config, or of its saved settings (a mapping)."""
    name = config.get("target", DEFAULT) if isinstance(config, dict) else getattr(config, "target", DEFAULT)
    return export_target(str(name))


def config_from_dict(settings: dict[str, Any]) -> Any:
    """The export job kind's config: the config dataclass of the target its settings name."""
    target = target_of(settings)
    return import_function(target.config)(settings)


def export_job(config: Any, ctx) -> str:
    """The export job kind's job function: the config's target runs it."""
    target = target_of(config)
    return import_function(target.run)(config, ctx)
