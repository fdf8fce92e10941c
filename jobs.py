"""Run folders and job processes: create, start, queue (one GPU job at a time), stop, resume, watch.

A job runs as `python main.py run <run_dir>` in its own process group, so the web server never trains and a
page reload or server restart loses nothing: everything the UI shows is read back from the run folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workspace import (
    UserError,
    atomic_write_text,
    dump_yaml,
    load_yaml,
    read_json,
    resolve_user_path,
    workspace_root,
    write_json,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
KINDS = ("train", "export", "eval", "synth")
GPU_KINDS = ("train", "export", "eval")  # jobs that need the accelerator: one at a time
ACTIVE_STATES = ("queued", "running", "stopping")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
LOG_TAIL_LINES = 20


@dataclass
class RunInfo:
    """What the Runs list shows for one run folder."""

    name: str
    path: Path
    kind: str
    state: str
    created: str
    error: str
    step: int | None
    max_steps: int | None
    last_loss: float | None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def runs_dir(workspace: str | Path | None = None) -> Path:
    return workspace_root(workspace) / "runs"


def check_run_name(name: str) -> str:
    if not RUN_NAME.fullmatch(name or "") or ".." in name:
        raise UserError(
            f"Run name '{name}' is not allowed: use letters, digits, '-', '_' and '.', no '/' or '..', up to 80 characters."
        )
    return name


def run_path(name_or_path: str | Path, workspace: str | Path | None = None) -> Path:
    """The folder of an existing run, given its name or its path."""
    candidate = Path(str(name_or_path))
    if candidate.is_dir() and (candidate / "config.yaml").exists():
        return resolve_user_path(candidate, workspace)  # refused outside the workspace when the app is shared
    folder = runs_dir(workspace) / check_run_name(str(name_or_path))
    if not (folder / "config.yaml").exists():
        raise UserError(f"No run named '{name_or_path}' in {runs_dir(workspace)}.")
    return folder


# ---------------------------------------------------------------- creating and starting

def create_run(kind: str, config: dict[str, Any], workspace: str | Path | None = None, name: str | None = None) -> Path:
    """A new run folder holding config.yaml and a queued status; the config must hold no secrets."""
    if kind not in KINDS:
        raise UserError(f"Unknown job kind '{kind}'; one of: {', '.join(KINDS)}.")
    name = check_run_name(name) if name else f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = runs_dir(workspace) / name
    if folder.exists():
        if name and not folder.name.startswith(kind + "-"):
            raise UserError(f"A run named '{name}' already exists; choose another name or resume it.")
        suffix = 2
        while (runs_dir(workspace) / f"{name}-{suffix}").exists():
            suffix += 1
        folder = runs_dir(workspace) / f"{name}-{suffix}"
    folder.mkdir(parents=True)
    atomic_write_text(folder / "config.yaml", dump_yaml({"kind": kind, **config}))
    write_status(folder, state="queued", created=now(), pid=None, error="")
    return folder


def start_job(run_dir: Path, resume: bool = False, env: dict[str, str] | None = None,
              processes: int | None = None) -> int:
    """Start the job's child process (detached from this one); returns its pid.

    A training run on several GPUs starts torchrun, which starts one `main.py run` per GPU (DDP); `processes`
    overrides the count taken from the run's num_gpus (several CPU processes train over gloo).
    """
    run_dir = Path(run_dir)
    launch_env: dict[str, str] = {}
    if processes is None:
        try:
            processes, launch_env = job_processes(run_dir)
        except UserError as exc:
            write_status(run_dir, state="failed", ended=now(), error=str(exc))
            raise
    command = launch_command(run_dir, resume, processes)
    child_env = {**os.environ, **launch_env, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if processes > 1 and "OMP_NUM_THREADS" not in child_env:
        # torchrun would give each rank one thread; the host work of a step (collation, the optimizer's CPU side)
        # gets the rank's share of the cores instead, as a one-process run has all of them.
        child_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
    write_status(run_dir, state="queued", pid=None, pid_start=None, error="", queued_at=now(), processes=processes)
    with open(run_dir / "log.txt", "ab") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env, start_new_session=True)
    write_status(run_dir, pid=process.pid, pid_start=_process_start(process.pid))
    _reap_later(process)
    return process.pid


def job_processes(run_dir: Path) -> tuple[int, dict[str, str]]:
    """(processes, environment) for a job: one per GPU for a training run, else one."""
    config = read_config(run_dir)
    if config.get("kind") != "train":
        return 1, {}
    import training_utils

    return training_utils.gpu_launch(int(config.get("num_gpus") or 0))


def launch_command(run_dir: Path, resume: bool, processes: int) -> list[str]:
    """`python main.py run RUN`, through torchrun (one process per rank, a free rendezvous port) when processes > 1."""
    entry = [str(ROOT / "main.py"), "run", str(run_dir)] + (["--resume"] if resume else [])
    if processes <= 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", *entry]


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _reap_later(process: subprocess.Popen) -> None:
    """Collect the child's exit status in the background so it does not linger as a zombie."""
    import threading

    threading.Thread(target=process.wait, daemon=True).start()


def stop_job(run_dir: Path) -> None:
    """Ask a running job to save a checkpoint and stop (SIGTERM); a queued job just ends."""
    status = read_status(run_dir)
    if status["state"] not in ACTIVE_STATES:
        raise UserError(f"Run '{Path(run_dir).name}' is not running (it is {status['state']}).")
    write_status(run_dir, state="stopping")
    try:
        os.killpg(status["pid"], signal.SIGTERM)
    except (ProcessLookupError, TypeError):
        write_status(run_dir, state="stopped", ended=now())


def resume_job(run_dir: Path, env: dict[str, str] | None = None, processes: int | None = None) -> int:
    """Start a stopped or failed run again from its last checkpoint (`processes` as for start_job)."""
    status = read_status(run_dir)
    if status["state"] in ACTIVE_STATES:
        raise UserError(f"Run '{Path(run_dir).name}' is still {status['state']}.")
    if read_config(run_dir)["kind"] == "train" and last_checkpoint(run_dir) is None:
        raise UserError(f"Run '{Path(run_dir).name}' has no checkpoint to resume from; start a new run instead.")
    return start_job(run_dir, resume=True, env=env, processes=processes)


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [path for path in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
                   if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").exists()]
    return max(checkpoints, key=lambda path: int(path.name.split("-")[-1]), default=None)


# ---------------------------------------------------------------- status and events

def write_status(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into status.json; a lock keeps the parent's and the child's updates from losing each other."""
    with open(Path(run_dir) / ".status.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = read_json(Path(run_dir) / "status.json", default={}) or {}
        status.update(changes)
        status["updated"] = now()
        write_json(Path(run_dir) / "status.json", status)
    return status


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status; a job whose process died without saying so is marked failed with its last log lines."""
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json", default={}) or {}
    status.setdefault("state", "unknown")
    if status["state"] in ACTIVE_STATES and status.get("pid") and not _alive(status["pid"], status.get("pid_start")):
        if status["state"] == "stopping":
            changes = {"state": "stopped", "ended": now()}
        else:
            changes = {"state": "failed", "ended": now(),
                       "error": "The job's process ended unexpectedly (killed or out of memory). Last log "
                                f"lines:\n{log_tail(run_dir)}"}
        try:
            status = write_status(run_dir, **changes)
        except OSError:  # a full disk must not break every view of the runs; a later read writes it down
            status = {**status, **changes}
    return status


def read_config(run_dir: Path) -> dict[str, Any]:
    return load_yaml(Path(run_dir) / "config.yaml")


def read_events(run_dir: Path, since: int = 0) -> list[dict[str, Any]]:
    """Events from events.jsonl, skipping the first `since` lines (a torn last line is left for next time)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index < since or not line.endswith("\n"):
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    with open(Path(run_dir) / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.time(), **event}) + "\n")


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    path = Path(run_dir) / "log.txt"
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # tqdm redraws with carriage returns: keep the last state of each line.
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in cleaned if line.strip()][-lines:])


def list_runs(workspace: str | Path | None = None) -> list[RunInfo]:
    """Every run on disk, newest first."""
    runs = []
    for folder in sorted(runs_dir(workspace).glob("*/config.yaml")):
        run_dir = folder.parent
        status = read_status(run_dir)
        progress = read_json(run_dir / "progress.json", default={}) or {}
        try:
            kind = read_config(run_dir).get("kind", "?")
        except UserError:
            kind = "?"
        runs.append(RunInfo(run_dir.name, run_dir, kind, status["state"], status.get("created", ""),
                            status.get("error", ""), progress.get("step"), progress.get("max_steps"),
                            progress.get("loss")))
    return sorted(runs, key=lambda run: run.created, reverse=True)


def delete_run(run_dir: Path) -> None:
    import shutil

    if read_status(run_dir)["state"] in ACTIVE_STATES:
        raise UserError(f"Run '{Path(run_dir).name}' is still active; stop it before deleting it.")
    shutil.rmtree(run_dir)


def _process_start(pid: int) -> str | None:
    """The process's start time (from /proc), so a reused pid is not taken for our job."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if stat[0] in ("Z", "X"):
        return False
    return start is None or stat[19] == start


# ---------------------------------------------------------------- inside the child process

class StopRequested:
    """Set by SIGTERM in the child; training checks it after each step and saves a checkpoint."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)


def gpu_lock(workspace: Path, run_dir: Path, wait: Callable[[float], None] = time.sleep):
    """Hold the workspace's accelerator lock for this process's lifetime, waiting (queued) while another job has it.

    An flock is released by the kernel when its holder dies, so a killed job never blocks the queue.
    """
    handle = open(workspace / "gpu.lock", "a+")
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if StopRequested.requested:
                raise SystemExit(0) from None
            wait(0.5)


def run_job(run_dir: Path, resume: bool = False) -> int:
    """The child's entry point: wait for the GPU if needed, run the job, record how it ended."""
    run_dir = Path(run_dir).resolve()
    StopRequested.install()
    config = read_config(run_dir)
    kind = config.pop("kind")
    workspace = run_dir.parent.parent
    rank, processes = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank > 0:
        return _run_other_rank(run_dir, kind, config, resume, rank)
    lock = gpu_lock(workspace, run_dir) if kind in GPU_KINDS else None
    if StopRequested.requested:
        write_status(run_dir, state="stopped", ended=now())
        return 0
    # Under torchrun the launcher's pid (from start_job) stays the job's: stop signals it, its death marks a failure.
    own_pid = {} if processes > 1 else {"pid": os.getpid(), "pid_start": _process_start(os.getpid())}
    write_status(run_dir, state="running", started=now(), error="", **own_pid)
    try:
        outcome = _dispatch(kind, config, run_dir, resume)
    except UserError as exc:
        _write_end(run_dir, state="failed", ended=now(), error=str(exc))
        log.error("error: %s", exc)
        return 2
    except BaseException as exc:  # everything else: record it readably, keep the traceback in log.txt
        traceback.print_exc()
        _write_end(run_dir, state="failed", ended=now(), error=friendly_error(exc))
        return 1
    finally:
        if lock is not None:
            lock.close()
    return 0 if _write_end(run_dir, state="stopped" if outcome == "stopped" else "done", ended=now()) else 1


def _run_other_rank(run_dir: Path, kind: str, config: dict[str, Any], resume: bool, rank: int) -> int:
    """A DDP rank other than 0: waits until rank 0 holds the GPU lock, then trains; it records only its failure."""
    logging.getLogger().setLevel(logging.WARNING)  # log.txt shows rank 0's progress once
    while (state := (read_json(run_dir / "status.json", default={}) or {}).get("state")) != "running":
        if StopRequested.requested or state not in ("queued", None):
            return 0
        time.sleep(0.5)
    try:
        _dispatch(kind, config, run_dir, resume)
    except UserError:
        return 2  # every rank meets the same bad input; rank 0 records it
    except BaseException as exc:
        traceback.print_exc()
        _write_end(run_dir, state="failed", ended=now(), error=f"rank {rank}: {friendly_error(exc)}")
        return 1
    return 0


def _write_end(run_dir: Path, **changes: Any) -> bool:
    """Record how the job ended, unless another DDP rank already recorded a failure (its error is the cause)."""
    if (read_json(Path(run_dir) / "status.json", default={}) or {}).get("state") == "failed":
        return False
    write_status(run_dir, **changes)
    return True


def _dispatch(kind: str, config: dict[str, Any], run_dir: Path, resume: bool) -> str:
    """Run one job in this process; returns "done" or "stopped". Each kind's module is imported only here."""
    if kind == "train":
        import model_utils
        import training_utils  # imports no ML library, so Unsloth can still come first

        fallback = training_utils.ddp_fallback()
        if fallback:
            write_status(run_dir, note=fallback)
        model_utils.select_backend()  # before transformers/trl/peft are imported: Unsloth patches them

        return training_utils.train(training_utils.train_config_from_dict(config), run_dir, resume=resume)
    if kind == "synth":
        import synthetic_utils

        return synthetic_utils.run_synth_job(config, run_dir)  # always continues the rows already in run_dir
    if kind == "export":
        import gguf_utils

        return gguf_utils.export(gguf_utils.export_config_from_dict(config), run_dir)  # reuses merged/ on resume
    if kind == "eval":
        import model_utils

        model_utils.select_backend()  # before transformers/peft are imported: Unsloth patches them
        import inference_utils

        result = inference_utils.evaluate(inference_utils.eval_config_from_dict(config), run_dir, run_dir.parent.parent)
        return "stopped" if result.get("stopped") else "done"
    raise UserError(f"This version cannot run '{kind}' jobs.")


def friendly_error(exc: BaseException) -> str:
    """A message a user can act on, for errors that come from deep inside torch and friends."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return ("The GPU ran out of memory. Lower the batch size or the sequence length, or use 4-bit (QLoRA). "
                f"({text.splitlines()[0][:200]})")
    if (isinstance(exc, OSError) and getattr(exc, "errno", None) == 28) or "No space left on device" in text:
        return "The disk is full. Free some space (or delete old runs) and resume the run."
    return f"The job failed: {text.splitlines()[0][:500]} (full traceback in log.txt)"
