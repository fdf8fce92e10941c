"""The job supervisor: create, start, queue (one GPU job at a time), stop, resume, delete and list runs.

A job runs as `python main.py run <run_dir>` in its own process group, so the web server never trains and a page
reload or server restart loses nothing: everything the UI shows is read back from the run folder (`runfolder`).
Every kind of job is one `JobKind` in `KINDS`: its config, its checks before a run exists, its environment, the
files and runs it reads and how its process starts. Its job function is imported only inside the job's process, and
stage modules never import this module: they receive a `runfolder.JobContext`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import distributed
import runfolder
from runfolder import JobContext, Progress, Reporter, State, Status, StopFlag
from workspace import UserError, import_function, read_json, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class JobKind:
    """One kind of job: everything submit and the supervisor need to start, run and resume it.

    Functions are named `module:function` and imported only where they are called (the job's own function only in
    the job's process), so looking a kind up imports none of its code.
    """

    name: str  # the run folder's `kind` and the default run name's prefix
    config: str  # function(settings: dict) -> the kind's config dataclass
    check: str  # function(config, workspace, api_key) -> the config to save; refuses (UserError) before a run exists
    entry: str  # function(config, ctx: JobContext) -> "done" | "stopped"
    gpu: bool  # needs the accelerator: such jobs take turns (the workspace's GPU lock)
    env: str = ""  # function(settings, api_key) -> the job's environment (secrets: never in its folder); "" for none
    inputs: str = ""  # function(config) -> local files the job reads (their SHA-256 is checked before it runs)
    run_name: str = ""  # function(config) -> the run's default name; "" for <kind>-<date>-<time>
    reads: tuple[str, ...] = ()  # settings naming training runs it reads (a run, or a list's `run:NAME` items)
    launch: str = ""  # function(settings) -> (processes, environment); "" for one process
    checkpoints: bool = False  # resumes from its last checkpoint: a stopped run with none cannot resume
    read_by_jobs: bool = False  # other kinds' jobs read its runs (their `reads`): deleting one waits for them


KINDS = {
    kind.name: kind
    for kind in (
        JobKind(
            "train",
            "train_config:train_config_from_dict",
            "job_checks:check_train",
            "training_utils:train_job",
            True,
            env="job_checks:train_env",
            inputs="job_checks:train_inputs",
            launch="training_utils:launch_plan",
            checkpoints=True,
            read_by_jobs=True,
        ),
        JobKind(
            "export",
            "export_targets:config_from_dict",
            "job_checks:check_export",
            "export_targets:export_job",
            True,
            run_name="job_checks:export_run_name",
            reads=("run",),
        ),
        JobKind(
            "eval",
            "evaluation:eval_config_from_dict",
            "job_checks:check_eval",
            "evaluation:eval_job",
            True,
            run_name="job_checks:eval_run_name",
            reads=("run",),
        ),
        JobKind(
            "synth",
            "synthetic_utils:synthetic_config_from_dict",
            "job_checks:check_synth",
            "synthetic_utils:synth_job",
            False,
            env="job_checks:synth_env",
        ),
        JobKind(
            "arena",
            "arena_utils:arena_config_from_dict",
            "job_checks:check_arena",
            "arena_utils:arena_job",
            True,
            env="job_checks:arena_env",
            inputs="job_checks:arena_inputs",
            reads=("prompts_run", "contestants"),
        ),
        JobKind(
            "benchmark",
            "benchmark:benchmark_config_from_dict",
            "job_checks:check_benchmark",
            "benchmark:benchmark_job",
            True,
            inputs="job_checks:benchmark_inputs",
            run_name="job_checks:benchmark_run_name",
            reads=("run",),
        ),
        JobKind(
            "download",
            "download_utils:download_config_from_dict",
            "job_checks:check_download",
            "download_utils:download_job",
            False,
        ),
        JobKind(
            "push",
            "hub_push:push_config_from_dict",
            "job_checks:check_push",
            "hub_push:push_job",
            False,
            run_name="job_checks:push_run_name",
            reads=("run",),
        ),
    )
}


# Called with the run folder before a job that needs the GPU starts: the server's chat worker registers here to
# give its memory back (this layer cannot import the UI that owns it).
GPU_JOB_HOOKS: list[Callable[[Path], None]] = []


def before_gpu_job(hook: Callable[[Path], None]) -> None:
    """Register `hook(run_dir)` to run before any GPU job of this process starts (once per hook)."""
    if hook not in GPU_JOB_HOOKS:
        GPU_JOB_HOOKS.append(hook)


def job_kind(kind: str) -> JobKind:
    if kind not in KINDS:
        raise UserError(f"Unknown job kind '{kind}'; one of: {', '.join(KINDS)}.")
    return KINDS[kind]


# ---------------------------------------------------------------- creating and starting


def create_run(
    kind: str,
    config: dict[str, Any],
    workspace: str | Path | None = None,
    name: str | None = None,
    inputs: dict[str, str] | None = None,
) -> Path:
    """A new run folder holding config.yaml and a queued status; the config must hold no secrets.

    inputs: {absolute path: SHA-256} of local files the job reads; the job refuses to run if one changed."""
    job_kind(kind)
    # A blank name (or none: an API call can send null for the textbox) means the dated default.
    name = name.strip() if isinstance(name, str) else name
    name = runfolder.check_run_name(name) if name else f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    runs = runfolder.runs_dir(workspace)
    folder = runs / name
    if folder.exists():
        if name and not folder.name.startswith(kind + "-"):
            raise UserError(f"A run named '{name}' already exists; choose another name or resume it.")
        suffix = 2
        while (runs / f"{name}-{suffix}").exists():
            suffix += 1
        folder = runs / f"{name}-{suffix}"
    folder.mkdir(parents=True)
    runfolder.write_config(folder, kind, config, inputs)
    runfolder.write_status(folder, state=State.QUEUED, created=runfolder.now(), pid=None, error="")
    return folder


def start_job(
    run_dir: Path, resume: bool = False, env: dict[str, str] | None = None, processes: int | None = None
) -> int:
    """Start the job's child process (detached from this one); returns its pid.

    A training run on several GPUs starts torchrun, which starts one `main.py run` per GPU (DDP); `processes`
    overrides the count from the kind's launch plan (several CPU processes train over gloo).
    """
    run_dir = Path(run_dir)
    with runfolder.status_lock(run_dir):  # two starts at once must not launch two processes on one folder
        status = runfolder.read_status(run_dir)
        if status.pid and _alive(status.pid, status.pid_start):
            raise UserError(f"Run '{run_dir.name}' is still {status.state}.")
        runfolder.write_status(run_dir, state=State.QUEUED, pid=None, pid_start=None, error="")
    launch_env: dict[str, str] = {}
    if processes is None:
        try:
            processes, launch_env = launch_plan(run_dir)
        except UserError as exc:
            runfolder.write_status(run_dir, state=State.FAILED, ended=runfolder.now(), error=str(exc))
            raise
    if job_kind(runfolder.read_kind(run_dir)).gpu:
        for hook in list(GPU_JOB_HOOKS):
            try:
                hook(run_dir)
            except Exception:  # a hook must not keep the job from starting
                log.exception("a before-GPU-job hook failed")
    nodes, endpoint = node_plan(run_dir)
    command = launch_command(run_dir, resume, processes, nodes, endpoint)
    if nodes > 1:
        write_node_launch(run_dir, resume, processes, nodes, endpoint, launch_env)
    child_env = {**os.environ, **launch_env, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if processes > 1 and "OMP_NUM_THREADS" not in child_env:
        # torchrun would give each rank one thread; the host work of a step (collation, the optimizer's CPU side)
        # gets the rank's share of the cores instead, as a one-process run has all of them.
        child_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
    runfolder.write_status(
        run_dir, state=State.QUEUED, pid=None, pid_start=None, error="", queued_at=runfolder.now(), processes=processes
    )
    with open(run_dir / "log.txt", "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            start_new_session=True,
        )
    runfolder.write_status(run_dir, pid=process.pid, pid_start=_process_start(process.pid))
    # Collect the child's exit status in the background so it does not linger as a zombie.
    threading.Thread(target=process.wait, daemon=True).start()
    return process.pid


def launch_plan(run_dir: Path) -> tuple[int, dict[str, str]]:
    """(processes, environment) for a job, from its kind's launch plan (one process unless it says otherwise)."""
    kind = job_kind(runfolder.read_kind(run_dir))
    if not kind.launch:
        return 1, {}
    return import_function(kind.launch)(runfolder.stage_settings(run_dir))


def launch_command(
    run_dir: Path, resume: bool, processes: int, nodes: int = 1, endpoint: str = "", node_rank: int = 0
) -> list[str]:
    """`python main.py run RUN`, through torchrun (one process per rank, a free rendezvous port) when processes > 1;
    on several nodes, this node's part of the run (distributed.node_arguments)."""
    entry = [str(ROOT / "main.py"), "run", str(run_dir)] + (["--resume"] if resume else [])
    if nodes > 1:
        arguments = distributed.node_arguments(processes, nodes, endpoint, node_rank, Path(run_dir).name)
        return [sys.executable, "-m", "torch.distributed.run", *arguments, *entry]
    if processes <= 1:
        return [sys.executable, *entry]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *entry,
    ]


# ---------------------------------------------------------------- several nodes

NODE_LAUNCH = "launch.json"  # how the first node started a multi-node run: what node_commands repeats


def node_plan(run_dir: Path) -> tuple[int, str]:
    """(nodes, rendezvous endpoint) of a run; one node for a job kind without them."""
    settings = runfolder.stage_settings(run_dir)
    return int(settings.get("nnodes") or 1), str(settings.get("rdzv_endpoint") or "")


def write_node_launch(
    run_dir: Path, resume: bool, processes: int, nodes: int, endpoint: str, env: dict[str, str]
) -> None:
    """Record the first node's launch: every other node's command repeats it with its own node rank."""
    launch = {"resume": resume, "processes": processes, "nodes": nodes, "endpoint": endpoint}
    launch["environment"] = {key: value for key, value in env.items() if key == distributed.STRATEGY_ENV}
    write_json(Path(run_dir) / NODE_LAUNCH, launch)


def node_commands(run_dir: Path) -> list[str]:
    """The shell command each other node runs to join a multi-node run the first node started (node 1, 2, …), in
    this install's folder; UserError for a run that was not started on several nodes."""
    import shlex

    run_dir = Path(run_dir)
    launch = read_json(run_dir / NODE_LAUNCH, default=None)
    if not isinstance(launch, dict) or int(launch.get("nodes") or 1) < 2:
        raise UserError(
            f"Run '{run_dir.name}' was not started on several nodes: set nnodes and rdzv_endpoint, then start it."
        )
    environment = [f"{key}={shlex.quote(str(value))}" for key, value in (launch.get("environment") or {}).items()]
    commands = []
    for node_rank in range(1, int(launch["nodes"])):
        command = launch_command(
            run_dir,
            bool(launch.get("resume")),
            int(launch["processes"]),
            int(launch["nodes"]),
            launch["endpoint"],
            node_rank,
        )
        commands.append(" ".join([f"cd {shlex.quote(str(ROOT))} &&", *environment, shlex.join(command)]))
    return commands


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- what can be done with a run


@dataclass(frozen=True)
class Actions:
    """What a run allows now, each with the reason when it does not: the buttons and the commands obey the same."""

    can_stop: bool
    stop_reason: str
    can_resume: bool
    resume_reason: str
    can_delete: bool
    delete_reason: str


def actions(run_dir: Path, status: Status | None = None) -> Actions:
    run_dir = Path(run_dir)
    status = status or job_status(run_dir)
    state, name = status.state, run_dir.name
    job_kind = KINDS.get(runfolder.read_kind(run_dir))
    can_stop = state in (State.QUEUED, State.RUNNING)
    stop_reason = "" if can_stop else f"Run '{name}' is not running (it is {state})."
    if status.active:
        resume_reason = f"Run '{name}' is still {state}."
    elif state == State.DONE:
        resume_reason = f"Run '{name}' finished; start a new run instead."
    elif state not in (State.STOPPED, State.FAILED):
        resume_reason = f"Run '{name}' is {state}; only a stopped or failed run can be resumed."
    elif job_kind and job_kind.checkpoints and runfolder.last_checkpoint(run_dir) is None:
        resume_reason = f"Run '{name}' has no checkpoint to resume from; start a new run instead."
    else:
        resume_reason = ""
    if status.active:
        delete_reason = f"Run '{name}' is still active; stop it before deleting it."
    else:
        user = active_user(run_dir) if job_kind and job_kind.read_by_jobs else None
        delete_reason = (
            f"The {user.kind} job '{user.name}' is reading run '{name}' ({user.state}); wait for it or stop it "
            "before deleting this run."
            if user
            else ""
        )
    return Actions(can_stop, stop_reason, not resume_reason, resume_reason, not delete_reason, delete_reason)


def reads_run(job_dir: Path, run_dir: Path) -> bool:
    """Whether a job's config names this training run (by name or by full path) in one of its kind's `reads`
    settings: a run (export and eval's `run`, an arena's `prompts_run`) or a list's `run:NAME` items (an arena's
    contestants)."""
    kind = KINDS.get(runfolder.read_kind(job_dir))
    if kind is None or not kind.reads:
        return False
    try:
        settings = runfolder.stage_settings(job_dir)
    except UserError:
        return False
    references = []
    for key in kind.reads:
        value = settings.get(key)
        if isinstance(value, list):
            references += [item[len("run:") :] for item in value if str(item).startswith("run:")]
        else:
            references.append(value)
    return any(_names_run(str(reference or ""), run_dir) for reference in references)


def _names_run(reference: str, run_dir: Path) -> bool:
    if not reference:
        return False
    if reference == Path(run_dir).name:
        return True
    return Path(reference).is_absolute() and Path(reference).resolve() == Path(run_dir).resolve()


def active_user(run_dir: Path) -> RunInfo | None:
    """An active job that reads this training run (its adapter, merged model or eval split)."""
    run_dir = Path(run_dir)
    for config in run_dir.parent.glob("*/config.yaml"):
        job = config.parent
        if job == run_dir or not reads_run(job, run_dir):
            continue
        status = job_status(job)
        if status.active:
            return RunInfo(job.name, job, runfolder.read_kind(job), status, Progress())
    return None


STOP_GRACE_ENV = "FINETUNER_STOP_GRACE_S"
# How long a job has after Stop to save and end by itself; a training step and a checkpoint of a large model fit.
DEFAULT_STOP_GRACE_S = 300.0


def stop_grace_s() -> float:
    """Seconds between Stop's SIGTERM and its SIGKILL: $FINETUNER_STOP_GRACE_S, else DEFAULT_STOP_GRACE_S."""
    try:
        grace = float(os.environ.get(STOP_GRACE_ENV) or DEFAULT_STOP_GRACE_S)
    except ValueError:
        return DEFAULT_STOP_GRACE_S
    return grace if 0 <= grace < float("inf") else DEFAULT_STOP_GRACE_S


def stop_job(run_dir: Path) -> None:
    """Ask a running job to save a checkpoint and stop (SIGTERM), and kill it (SIGKILL) if it has not ended
    stop_grace_s() later; a queued job just ends."""
    status = job_status(run_dir)
    allowed = actions(run_dir, status)
    if not allowed.can_stop:
        raise UserError(allowed.stop_reason)
    # Only a process whose start time matches the one recorded is ours: a pid alone may have been reused since.
    if status.pid and status.pid_start and _alive(status.pid, status.pid_start):
        runfolder.write_status(run_dir, state=State.STOPPING)
        try:
            os.killpg(status.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        else:
            _watch_stop(Path(run_dir), status.pid, status.pid_start, stop_grace_s())
            return
    runfolder.write_status(run_dir, state=State.STOPPED, ended=runfolder.now())


def _watch_stop(run_dir: Path, pid: int, pid_start: str, grace: float) -> None:
    """Start the process that kills the job if it outlives its grace period. It is its own session, so it outlives
    the caller (`main.py stop` ends at once, a server may be restarted), and a fresh interpreter: a job stuck in a
    regular expression or in user code never runs its SIGTERM handler, and nothing inside it can end it."""
    code = "import sys, jobs; jobs.kill_after_grace(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))"
    with open(run_dir / "log.txt", "ab") as log_file:
        watcher = subprocess.Popen(
            [sys.executable, "-c", code, str(run_dir), str(pid), pid_start, str(grace)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    threading.Thread(target=watcher.wait, daemon=True).start()


def kill_after_grace(run_dir: str | Path, pid: int, pid_start: str, grace: float, poll_s: float = 0.5) -> bool:
    """Wait up to `grace` seconds for the stopped job (pid, started at pid_start) to end; kill its process group if
    it has not, and say in the run's note what was lost. True when it had to be killed."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + grace
    while _alive(pid, pid_start):
        if time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    else:
        return False
    with runfolder.status_lock(run_dir):
        if not _alive(pid, pid_start):
            return False
        stopping = runfolder.read_status(run_dir).state == State.STOPPING
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
    killed_by = time.monotonic() + 10  # SIGKILL cannot be caught; the kernel takes a moment to free its memory
    while _alive(pid, pid_start) and time.monotonic() < killed_by:
        time.sleep(0.05)
    note = _killed_note(run_dir, grace)
    log.warning("%s", note)
    changes = {"state": State.STOPPED, "ended": runfolder.now()} if stopping else {}
    runfolder.write_status(run_dir, note=note, **changes)
    return True


def _killed_note(run_dir: Path, grace: float) -> str:
    """What a user lost when Stop had to kill the job."""
    head = f"Stop: the job had not ended {grace:g} s after it was asked to, so it was killed (SIGKILL)."
    if not job_kind(runfolder.read_kind(run_dir)).checkpoints:
        return f"{head} What it had not finished writing is lost; run it again."
    checkpoint = runfolder.last_checkpoint(run_dir)
    if checkpoint is None:
        return f"{head} It had saved no checkpoint: all its training is lost, and a resume starts from the beginning."
    return f"{head} Training since {checkpoint.name} is lost; resume continues from there."


def resume_job(run_dir: Path, env: dict[str, str] | None = None, processes: int | None = None) -> int:
    """Start a stopped or failed run again (a training run from its last checkpoint); `processes` as for start_job.

    The check and the claim (state queued) happen in one step under the run's status lock, so of two resumes at
    the same moment one starts the job and the other is told the run is queued."""
    run_dir = Path(run_dir)
    with runfolder.status_lock(run_dir):
        allowed = actions(run_dir)
        if not allowed.can_resume:
            raise UserError(allowed.resume_reason)
        runfolder.write_status(run_dir, state=State.QUEUED, pid=None, pid_start=None, error="")
    return start_job(run_dir, resume=True, env=env, processes=processes)


def delete_run(run_dir: Path) -> None:
    allowed = actions(run_dir)
    if not allowed.can_delete:
        raise UserError(allowed.delete_reason)
    if Path(run_dir).is_symlink():  # the link is this workspace's entry; the folder it leads to is not ours to delete
        Path(run_dir).unlink()
        return
    shutil.rmtree(run_dir)


# ---------------------------------------------------------------- watching


def job_status(run_dir: Path) -> Status:
    """The run's status; a job whose process died without saying so is recorded as failed with its last log lines."""
    run_dir = Path(run_dir)
    status = runfolder.read_status(run_dir)
    if not status.active or not status.pid or _alive(status.pid, status.pid_start):
        return status
    if status.state == State.STOPPING:
        changes = {"state": State.STOPPED, "ended": runfolder.now()}
    else:
        changes = {
            "state": State.FAILED,
            "ended": runfolder.now(),
            "error": "The job's process ended unexpectedly (killed or out of memory). Last log "
            f"lines:\n{runfolder.log_tail(run_dir)}",
        }
    try:
        return runfolder.write_status(run_dir, **changes)
    except OSError:  # a full disk must not break every view of the runs; a later read writes it down
        return Status.from_dict({**status.__dict__, **changes})


@dataclass(frozen=True)
class RunInfo:
    """What the Runs list shows for one run folder."""

    name: str
    path: Path
    kind: str
    status: Status
    progress: Progress

    @property
    def state(self) -> State:
        return self.status.state

    @property
    def active(self) -> bool:
        return self.status.active


def list_runs(workspace: str | Path | None = None, kinds: tuple[str, ...] | None = None) -> list[RunInfo]:
    """Every run on disk (of these kinds), newest first."""
    runs = []
    for config in runfolder.runs_dir(workspace).glob("*/config.yaml"):
        run_dir = config.parent
        kind = runfolder.read_kind(run_dir)
        if kinds is None or kind in kinds:
            runs.append(RunInfo(run_dir.name, run_dir, kind, job_status(run_dir), runfolder.read_progress(run_dir)))
    return sorted(runs, key=lambda run: (run.status.created, run.name), reverse=True)


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


# ---------------------------------------------------------------- inside the job's process


def gpu_lock(workspace: Path, stop: StopFlag, wait: Callable[[float], None] = time.sleep):
    """Hold the workspace's accelerator lock for this process's lifetime, waiting (queued) while another job has it.

    An flock is released by the kernel when its holder dies, so a killed job never blocks the queue.
    """
    handle = open(Path(workspace) / "gpu.lock", "a+")
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if stop.requested:
                raise SystemExit(0) from None
            wait(0.5)


def run_job(run_dir: Path, resume: bool = False) -> int:
    """The child's entry point: wait for the GPU if needed, run the job's kind, record how it ended."""
    run_dir = Path(run_dir).resolve()
    stop = StopFlag().install()
    kind = job_kind(runfolder.read_kind(run_dir))
    settings = runfolder.stage_settings(run_dir)
    rank, processes = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank > 0:
        return _run_other_rank(run_dir, kind, settings, resume, rank, stop)
    lock = gpu_lock(runfolder.run_workspace(run_dir), stop) if kind.gpu else None
    if stop.requested:
        runfolder.write_status(run_dir, state=State.STOPPED, ended=runfolder.now())
        return 0
    # Under torchrun the launcher's pid (from start_job) stays the job's: stop signals it, its death marks a failure.
    own_pid = {} if processes > 1 else {"pid": os.getpid(), "pid_start": _process_start(os.getpid())}
    runfolder.write_status(run_dir, state=State.RUNNING, started=runfolder.now(), error="", **own_pid)
    reporter = Reporter(run_dir)
    try:
        outcome = _run_kind(kind, settings, JobContext(run_dir, reporter, stop, resume))
    except UserError as exc:
        _write_end(run_dir, reporter, State.FAILED, str(exc))
        log.error("error: %s", exc)
        return 2
    except BaseException as exc:  # everything else: record it readably, keep the traceback in log.txt
        traceback.print_exc()
        _write_end(run_dir, reporter, State.FAILED, friendly_error(exc))
        return 1
    finally:
        if lock is not None:
            lock.close()
    state = State.STOPPED if outcome == "stopped" else State.DONE
    return 0 if _write_end(run_dir, reporter, state) else 1


def _run_kind(kind: JobKind, settings: dict[str, Any], ctx: JobContext) -> str:
    runfolder.check_inputs(ctx.run_dir, ctx.resume)
    config = import_function(kind.config)(settings)
    return import_function(kind.entry)(config, ctx)


def _run_other_rank(
    run_dir: Path, kind: JobKind, settings: dict[str, Any], resume: bool, rank: int, stop: StopFlag
) -> int:
    """A DDP rank other than 0: waits until rank 0 holds the GPU lock, then trains; it records only its failure."""
    logging.getLogger().setLevel(logging.WARNING)  # log.txt shows rank 0's progress once
    # On another machine the run folder may be a copy rank 0 never updates: its ranks wait in the rendezvous instead.
    while distributed.node_rank() == 0 and (state := runfolder.read_status(run_dir).state) != State.RUNNING:
        if stop.requested or state not in (State.QUEUED, State.UNKNOWN):
            return 0
        time.sleep(0.5)
    try:
        _run_kind(kind, settings, JobContext(run_dir, Reporter(run_dir, writes=False), stop, resume))
    except UserError as exc:
        log.error("error: %s", exc)  # on another node this log is the only one that shows it
        return 2  # every rank meets the same bad input; rank 0 records it
    except BaseException as exc:
        traceback.print_exc()
        _write_end(run_dir, None, State.FAILED, f"rank {rank}: {friendly_error(exc)}")
        return 1
    return 0


def _write_end(run_dir: Path, reporter: Reporter | None, state: State, error: str = "") -> bool:
    """Record how the job ended, unless another DDP rank already recorded a failure (its error is the cause)."""
    if runfolder.read_status(run_dir).state == State.FAILED:
        return False
    runfolder.write_status(run_dir, state=state, ended=runfolder.now(), error=error)
    if reporter is not None:
        reporter.end(state, error)
    return True


def friendly_error(exc: BaseException) -> str:
    """A message a user can act on, for errors that come from deep inside torch and friends."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return (
            "The GPU ran out of memory. Lower the batch size or the sequence length, or use 4-bit (QLoRA). "
            f"({text.splitlines()[0][:200]})"
        )
    if (isinstance(exc, OSError) and getattr(exc, "errno", None) == 28) or "No space left on device" in text:
        return "The disk is full. Free some space (or delete old runs) and resume the run."
    return f"The job failed: {text.splitlines()[0][:500]} (full traceback in log.txt)"
