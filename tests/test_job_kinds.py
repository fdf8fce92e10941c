"""A job kind and an export target are one entry each: a toy of each, registered here only, goes through submit,
the supervisor and resume without a line of submit.py or jobs.py knowing it.

`python main.py run RUN` (what start_job launches) is `jobs.run_job(RUN)`; a kind registered by a test exists in
the test's process only, so the tests record the launch instead of making it and run the job here.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

import export_targets
import gguf_utils
import jobs
import runfolder
import submit
from workspace import UserError, config_to_dict, import_function, load_yaml, resolve_user_path

KEY = "sk-toy-secret"


@dataclass
class ToyConfig:
    source: str = ""
    words: int = 4


def toy_config_from_dict(settings: dict) -> ToyConfig:
    return ToyConfig(**settings)


def check_toy(config: ToyConfig, workspace, api_key) -> ToyConfig:
    if config.words < 1:
        raise UserError("A toy job writes at least one word.")
    config.source = str(resolve_user_path(config.source, workspace))
    return config


def toy_inputs(config: ToyConfig) -> list[str]:
    return [config.source]


def toy_env(settings: dict, api_key) -> dict[str, str]:
    return {"TOY_KEY": api_key} if api_key else {}


def toy_job(config: ToyConfig, ctx: runfolder.JobContext) -> str:
    """Copies the source's words one per line; its first run ends halfway, as a stop request would end it."""
    out = ctx.run_dir / "words.txt"
    done = out.read_text().splitlines() if out.exists() else []
    words = Path(config.source).read_text().split()[: config.words]
    for word in words[len(done) :]:
        if not ctx.resume and len(done) == len(words) // 2:
            return "stopped"
        done.append(word)
        out.write_text("".join(line + "\n" for line in done))
        ctx.reporter.progress(len(done), len(words), word)
    return "done"


@dataclass
class ToyExportConfig:
    target: str = "toy-copy"
    run: str = ""


def toy_export_config(settings: dict) -> ToyExportConfig:
    return ToyExportConfig(**settings)


def check_toy_export(config: ToyExportConfig, workspace) -> runfolder.TrainedModel:
    return runfolder.trained_model(runfolder.run_path(config.run, workspace))


def toy_export_job(config: ToyExportConfig, ctx: runfolder.JobContext) -> str:
    model = runfolder.trained_model(runfolder.run_path(config.run, ctx.workspace))
    (model.run_dir / "toy-copy.json").write_text((model.path / "adapter_config.json").read_text())
    return "done"


@pytest.fixture
def launches(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """Each process start_job would launch, as (command, environment); the job's pid is this live process."""
    launched = []

    class Launched:
        pid = os.getpid()

        def wait(self) -> None:
            pass

    def record(command, env=None, **kwargs):
        launched.append((command, env))
        return Launched()

    monkeypatch.setattr(jobs.subprocess, "Popen", record)
    return launched


@pytest.fixture
def job_process():
    """run_job installs the job's SIGTERM handler: the test process gets its own back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield jobs.run_job
    signal.signal(signal.SIGTERM, handler)


def test_a_registered_job_kind_is_submitted_run_and_resumed_through_submit(
    workspace, monkeypatch, launches, job_process
):
    kind = jobs.JobKind(
        "toy",
        f"{__name__}:toy_config_from_dict",
        f"{__name__}:check_toy",
        f"{__name__}:toy_job",
        False,
        env=f"{__name__}:toy_env",
        inputs=f"{__name__}:toy_inputs",
    )
    monkeypatch.setitem(jobs.KINDS, "toy", kind)
    source = workspace / "notes.txt"
    source.write_text("one two three four five six")

    with pytest.raises(UserError, match="at least one word"):
        submit.submit("toy", {"source": str(source), "words": 0}, workspace, "refused")
    assert not (runfolder.runs_dir(workspace) / "refused").exists() and launches == []

    run_dir = submit.submit("toy", {"source": str(source), "words": 6}, workspace, "toy-run", api_key=KEY)
    config = load_yaml(run_dir / "config.yaml")
    assert config["kind"] == "toy" and runfolder.stage_settings(run_dir) == {"source": str(source), "words": 6}
    assert config[runfolder.INPUTS_KEY] == {str(source): runfolder.file_sha256(source)}
    assert KEY not in (run_dir / "config.yaml").read_text()
    ((command, env),) = launches
    assert command == jobs.launch_command(run_dir, False, 1) and env["TOY_KEY"] == KEY

    assert job_process(run_dir) == 0
    assert jobs.job_status(run_dir).state == "stopped"
    assert (run_dir / "words.txt").read_text().split() == ["one", "two", "three"]

    submit.resume("toy-run", workspace, api_key="sk-another")
    command, env = launches[1]
    assert command == jobs.launch_command(run_dir, True, 1) and env["TOY_KEY"] == "sk-another"
    assert job_process(run_dir, resume=True) == 0
    assert jobs.job_status(run_dir).state == "done"
    assert (run_dir / "words.txt").read_text().split() == "one two three four five six".split()


def test_an_unregistered_kind_is_refused_by_name():
    with pytest.raises(UserError, match="Unknown job kind 'toy'; one of: train, export"):
        submit.submit("toy", {})


def trained_run(workspace: Path) -> Path:
    """A finished training run with an adapter (weights not needed by the toy target)."""
    run_dir = jobs.create_run("train", {}, workspace, "trained")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text('{"r": 2}')
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    runfolder.write_status(run_dir, state="done")
    return run_dir


def test_a_registered_export_target_runs_as_an_export_job(workspace, monkeypatch, launches, job_process):
    target = export_targets.ExportTarget(
        "toy-copy", f"{__name__}:toy_export_config", f"{__name__}:check_toy_export", f"{__name__}:toy_export_job"
    )
    monkeypatch.setitem(export_targets.TARGETS, "toy-copy", target)
    trained = trained_run(workspace)

    job = submit.submit("export", ToyExportConfig(run=str(trained)), workspace)
    assert job.name == "export-trained" and runfolder.read_kind(job) == "export"
    assert runfolder.stage_settings(job) == {"target": "toy-copy", "run": "trained"}  # named as the job finds it
    assert submit.latest_job("export", "trained", workspace).path == job
    assert "export job 'export-trained' is reading run 'trained'" in jobs.actions(trained).delete_reason

    assert job_process(job) == 0
    assert jobs.job_status(job).state == "done"
    assert (trained / "toy-copy.json").read_text() == '{"r": 2}'


def test_an_export_config_that_names_no_target_is_gguf():
    assert export_targets.target_of(gguf_utils.ExportConfig(run="x")).name == "gguf"
    settings = config_to_dict(gguf_utils.ExportConfig(run="x"))
    assert "target" not in settings  # GGUF's run folders read as they did before targets
    assert isinstance(export_targets.config_from_dict(settings), gguf_utils.ExportConfig)
    with pytest.raises(UserError, match="Unknown export target 'hub'; one of: gguf"):
        export_targets.target_of({"target": "hub"})


def test_every_function_an_entry_names_exists():
    """Entries name their functions as text (imported when called): a misspelt one must fail here, not in a job."""
    names = [
        getattr(kind, field)
        for kind in jobs.KINDS.values()
        for field in ("config", "check", "entry", "env", "inputs", "run_name", "launch")
        if getattr(kind, field)
    ]
    names += [
        getattr(target, field) for target in export_targets.TARGETS.values() for field in ("config", "check", "run")
    ]
    for name in names:
        assert callable(import_function(name)), name  # a missing module or function raises here
