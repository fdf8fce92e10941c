"""The run-folder protocol: what a job writes into `workspace/runs/<name>/` and how every reader reads it back.

A leaf module (it imports only `workspace`): the supervisor (`jobs`), every stage and every reader (UI, CLI) share
it, so no stage needs the supervisor. Files of a run folder (docs/ARCHITECTURE.md has the schema):

- `config.yaml`   the job's kind and settings, written once when the run is created;
- `status.json`   a `Status`: state, pid, error, times and what the job reports about itself (backend, GPUs, …);
- `events.jsonl`  one `Event` per line (start, log, progress, checkpoint, end), appended;
- `progress.json` the newest `Progress` (step, total, message, ETA, metrics), rewritten at most once a second;
- `log.txt`       the job process's output; `checkpoints/`, `adapter/`, `merged/`, `gguf/` the stages' outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workspace import (
    UserError,
    atomic_write_text,
    dump_yaml,
    fits,
    load_yaml,
    paths_confined,
    read_json,
    resolve_user_path,
    workspace_root,
    write_json,
)

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
LOG_TAIL_LINES = 20
# progress.json is rewritten at most this often: the write can sit between two GPU steps, and the UI polls each second.
PROGRESS_EVERY_S = 1.0
RECENT_PACES = 50  # the ETA's pace: the mean over at most this many recent steps
# config.yaml's key for the SHA-256 of the local files a run reads ({absolute path: hash}), checked when the job starts.
INPUTS_KEY = "inputs_sha256"
BOOKKEEPING = frozenset({"config.yaml", "status.json", "events.jsonl", "log.txt", "progress.json", ".status.lock"})


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- paths


def runs_dir(workspace: str | Path | None = None) -> Path:
    return workspace_root(workspace) / "runs"


def check_run_name(name: str) -> str:
    if not RUN_NAME.fullmatch(name or "") or ".." in name:
        raise UserError(
            f"Run name '{name}' is not allowed: use letters, digits, '-', '_' and '.', no '/' or '..', "
            "up to 80 characters."
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
    if paths_confined():
        resolve_user_path(folder, workspace)  # a run folder that is a link out of the workspace is refused
    return folder


def run_workspace(run_dir: Path) -> Path:
    """The workspace a run folder belongs to (runs live in <workspace>/runs/<name>)."""
    return Path(run_dir).resolve().parent.parent


def write_config(run_dir: Path, kind: str, config: dict[str, Any], inputs: dict[str, str] | None = None) -> None:
    """config.yaml: the kind, the SHA-256 of the local input files (`inputs`) when given, and the stage's settings."""
    head: dict[str, Any] = {"kind": kind, **({INPUTS_KEY: inputs} if inputs else {})}
    atomic_write_text(Path(run_dir) / "config.yaml", dump_yaml({**head, **config}))


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml with its `kind` key."""
    return load_yaml(Path(run_dir) / "config.yaml")


def read_kind(run_dir: Path) -> str:
    try:
        return str(read_config(run_dir).get("kind", "?"))
    except UserError:
        return "?"


def stage_settings(run_dir: Path) -> dict[str, Any]:
    """config.yaml without its `kind` key: the settings the stage's config class is built from."""
    config = read_config(run_dir)
    config.pop("kind", None)
    config.pop(INPUTS_KEY, None)
    return config


def run_stage(run_dir: Path) -> str:
    """The training stage of a training run (config.yaml's `stage`, sft when unset)."""
    try:
        return str(stage_settings(run_dir).get("stage") or "sft")
    except UserError:  # an unreadable config.yaml: the run is listed, its own view says what is wrong
        return "sft"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_inputs(run_dir: Path, resume: bool = False) -> None:
    """UserError when a local file the run reads has changed (or gone) since the run was created: the job would
    train on other data than the one the run was made from."""
    recorded = read_config(run_dir).get(INPUTS_KEY) or {}
    for path, expected in recorded.items() if isinstance(recorded, dict) else ():
        try:
            changed = file_sha256(path) != expected
        except OSError:
            raise UserError(f"The input file '{path}' of this run is gone; restore it or start a new run.") from None
        if changed:
            when = "resuming would continue on other data than the run started with" if resume else "it was edited"
            raise UserError(
                f"The input file '{path}' changed since this run was created ({when}). Restore the file, or start a "
                "new run to train on the new content."
            )


# ---------------------------------------------------------------- status


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"
    UNKNOWN = "unknown"


ACTIVE = frozenset({State.QUEUED, State.RUNNING, State.STOPPING})


@dataclass(frozen=True)
class Status:
    """status.json as a value. The supervisor writes the lifecycle fields; a stage adds what it knows (backend, …)."""

    state: State = State.UNKNOWN
    created: str = ""
    updated: str = ""
    queued_at: str = ""
    started: str = ""
    ended: str = ""
    pid: int | None = None
    pid_start: str | None = None
    processes: int = 1
    error: str = ""
    note: str = ""  # something the user should know about how the job runs (a backend fallback, …)
    backend: str = ""
    device: str = ""
    micro_batch: int | None = None
    gradient_accumulation: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @classmethod
    def from_dict(cls, data: Any) -> Status:
        """A Status from status.json; a damaged file (not a mapping, a value of the wrong type) reads as unknown
        fields instead of breaking every view of the runs."""
        data = data if isinstance(data, dict) else {}
        hints = typing.get_type_hints(cls)
        values = {
            key: value
            for key, value in data.items()
            if key in hints and key != "state" and value is not None and fits(value, hints[key])
        }
        try:
            values["state"] = State(data.get("state", State.UNKNOWN))
        except (ValueError, TypeError):
            values["state"] = State.UNKNOWN
        return cls(**values)


STATUS_FIELDS = frozenset(item.name for item in dataclasses.fields(Status))


def read_status(run_dir: Path) -> Status:
    """status.json as it is on disk (never writes; the supervisor's `jobs.job_status` also checks the process)."""
    return Status.from_dict(read_json(Path(run_dir) / "status.json", default={}))


_held = threading.local()  # the run folders whose status lock this thread holds


@contextmanager
def status_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's `.status.lock` (an flock: other processes and other threads wait); re-entrant in one thread,
    so a supervisor step that reads, decides and writes under it can call write_status."""
    key = str(Path(run_dir).resolve())
    held: set[str] = _held.__dict__.setdefault("folders", set())
    if key in held:
        yield
        return
    with open(Path(run_dir) / ".status.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def write_status(run_dir: Path, **changes: Any) -> Status:
    """Merge `changes` into status.json; a lock keeps the parent's and the child's updates from losing each other."""
    unknown = set(changes) - STATUS_FIELDS
    if unknown:
        raise ValueError(f"not status fields: {', '.join(sorted(unknown))}")
    run_dir = Path(run_dir)
    with status_lock(run_dir):
        status = read_json(run_dir / "status.json", default={})
        status = status if isinstance(status, dict) else {}
        status.update({key: str(value) if isinstance(value, State) else value for key, value in changes.items()})
        status["updated"] = now()
        write_json(run_dir / "status.json", status)
    return Status.from_dict(status)


# ---------------------------------------------------------------- events and progress


class EventKind(enum.StrEnum):
    START = "start"  # a job (or a resumed job) began: its step and total
    LOG = "log"  # training metrics of one logging step
    PROGRESS = "progress"  # a stage's step with a message
    CHECKPOINT = "checkpoint"  # a checkpoint was saved at this step
    END = "end"  # the job ended: its state and message


@dataclass(frozen=True)
class Event:
    """One line of events.jsonl: {"event", "time", "step", "max_steps", "message", "eta_s", …metrics}."""

    kind: EventKind
    time: float = 0.0
    step: int | None = None
    total: int | None = None
    message: str = ""
    eta_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # loss, eval_loss, tokens_per_s, memory_gib, …

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"event": str(self.kind), "time": self.time}
        for key, value in (("step", self.step), ("max_steps", self.total), ("eta_s", self.eta_s)):
            if value is not None:
                data[key] = value
        if self.message:
            data["message"] = self.message
        return {**data, **self.metrics}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        metrics = {key: value for key, value in data.items() if key not in _EVENT_KEYS}
        try:
            kind = EventKind(data.get("event"))
        except ValueError:
            kind = EventKind.PROGRESS
        return cls(
            kind,
            float(data.get("time") or 0.0),
            data.get("step"),
            data.get("max_steps"),
            str(data.get("message") or ""),
            data.get("eta_s"),
            metrics,
        )


_EVENT_KEYS = frozenset({"event", "time", "step", "max_steps", "message", "eta_s"})


def append_event(run_dir: Path, event: Event) -> None:
    line = json.dumps(event.to_json(), default=str) + "\n"
    with open(Path(run_dir) / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line)


def read_events(run_dir: Path, since: int = 0) -> list[Event]:
    """Events after the first `since` complete lines (a torn last line is left for the next read)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index >= since and line.endswith("\n"):
                events.append(_parse_event(line))
    return events


def _parse_event(line: str | bytes) -> Event:
    try:
        return Event.from_json(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
        return Event(EventKind.PROGRESS)  # a damaged line still counts as one, so `since` keeps counting lines


class EventLog:
    """events.jsonl read incrementally, for views that poll a run every second or two: each update() parses only
    the bytes appended since the last one (a 200k-step run's file is megabytes) and keeps what the views show.

    A file that shrank or was replaced (the run deleted and started again under its name) is read from the start.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "events.jsonl"
        self._lock = threading.Lock()  # Gradio runs handlers in threads; two polls may share one log
        self._clear(None)

    def _clear(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self._offset = 0
        self.count = 0
        self.step: int | None = None
        self.total: int | None = None
        self.latest: dict[str, Any] = {}  # the newest value of each logged metric, and eta_s
        self.step_s: float | None = None  # seconds the newest logged step took (between the last two logged steps)
        self._last_logged: tuple[float, int] | None = None  # (time, step) of the newest logged step
        self._losses: dict[str, dict[int, float]] = {"train": {}, "eval": {}}

    def update(self) -> EventLog:
        with self._lock:
            try:
                stat = self.path.stat()
            except OSError:
                self._clear(None)
                return self
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self._offset:
                self._clear(identity)
            if stat.st_size > self._offset:
                with open(self.path, "rb") as handle:
                    handle.seek(self._offset)
                    chunk = handle.read(stat.st_size - self._offset)
                complete = chunk.rfind(b"\n") + 1  # a torn last line waits for the next update
                self._offset += complete
                for line in chunk[:complete].splitlines():
                    self._add(_parse_event(line))
        return self

    def _add(self, event: Event) -> None:
        self.count += 1
        if isinstance(event.step, int) and isinstance(event.total, int) and event.total > 0:
            self.step, self.total = event.step, event.total
        if event.kind in (EventKind.START, EventKind.END):
            self.latest.pop("eta_s", None)  # a job that ended (and one resumed) has no pace until its next steps
        if event.kind != EventKind.LOG:
            return
        if isinstance(event.step, int):
            if self._last_logged is not None and event.step > self._last_logged[1] and event.time:
                self.step_s = (event.time - self._last_logged[0]) / (event.step - self._last_logged[1])
            self._last_logged = (event.time, event.step)
        self.latest.update({key: value for key, value in event.metrics.items() if value is not None})
        if event.eta_s is not None:
            self.latest["eta_s"] = event.eta_s
        for key, series in (("loss", "train"), ("eval_loss", "eval")):
            value = event.metrics.get(key)
            if isinstance(event.step, int) and _finite_number(value):
                self._losses[series][event.step] = float(value)  # a step logged again after a resume: newest wins

    def losses(self, max_points: int = 2000) -> list[tuple[str, int, float]]:
        """(series, step, loss) sorted by series and step, about `max_points` per series: evenly spaced steps and
        always the newest, so a chart of a long run stays small."""
        with self._lock:
            points = []
            for series, by_step in self._losses.items():
                steps = sorted(by_step)
                stride = max(1, -(-len(steps) // max_points))
                kept = steps[::stride]
                if steps and kept[-1] != steps[-1]:
                    kept.append(steps[-1])
                points.extend((series, step, by_step[step]) for step in kept)
            return points


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Progress:
    """The newest progress of a job, the same for every kind: what the Runs tab and the CLI show."""

    step: int | None = None
    total: int | None = None
    message: str = ""
    eta_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the newest value of each metric (loss, eval_loss, …)

    @property
    def fraction(self) -> float | None:
        return self.step / self.total if self.step is not None and self.total else None


# Metrics the views format as numbers: another value under these names (a damaged file) is left out.
NUMERIC_METRICS = frozenset(
    {"loss", "eval_loss", "learning_rate", "grad_norm", "epoch", "tokens_per_s", "memory_gib", "gpu_memory_gib"}
)


def read_progress(run_dir: Path) -> Progress:
    """progress.json as a Progress; a damaged file reads as empty, a value of the wrong type as missing."""
    data = read_json(Path(run_dir) / "progress.json", default={})
    data = data if isinstance(data, dict) else {}
    whole = {key: data.get(key) for key in ("step", "total") if fits(data.get(key), int)}
    eta = data.get("eta_s")
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    return Progress(
        **{key: int(value) for key, value in whole.items()},
        message=data["message"] if isinstance(data.get("message"), str) else "",
        eta_s=_eta_now(eta, data.get("updated")) if fits(eta, float) and math.isfinite(eta) else None,
        metrics={key: value for key, value in metrics.items() if key not in NUMERIC_METRICS or _numeric(value)},
    )


def _numeric(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numeric(item) for item in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eta_now(eta_s: float, updated: Any, clock=time.time) -> float | None:
    """The ETA written at `updated`, counted down to now: a long step between two reports (an export's conversion)
    must not show the same figure all along; None once it has run out (the step takes longer than its pace said)."""
    if not fits(updated, float):
        return eta_s
    left = eta_s - max(0.0, clock() - updated)
    return round(left, 1) if left > 0 else None


def forget_eta(run_dir: Path) -> None:
    """progress.json without its ETA: a job started again (resume) has not measured its own pace yet, and the
    process before it was stopped on another."""
    path = Path(run_dir) / "progress.json"
    data = read_json(path, default={})
    if isinstance(data, dict) and data.get("eta_s") is not None:
        write_json(path, {**data, "eta_s": None})


class Reporter:
    """How a stage reports: events.jsonl and progress.json in one shape for every kind of job.

    ETA comes from the recent pace: the steps after the first quarter of those done since `start` (the first steps
    pay for compilation and warm-up, so the mean since `start` overstates what is left). Under DDP only the main
    process writes (`writes=False` elsewhere).
    """

    def __init__(self, run_dir: Path | None, writes: bool = True, clock=time.monotonic) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writes = writes and run_dir is not None
        self.clock = clock
        self.started = clock()
        self.first_step = 0
        self.total: int | None = None
        self.latest = Progress()
        self.written = float("-inf")
        self.pace_times: list[float] = []  # the clock at each new step reported since `start`
        self.pace_steps: list[int] = []
        if self.writes:
            forget_eta(self.run_dir)  # a new process (a resumed job): the ETA comes from its own pace

    def start(self, step: int = 0, total: int | None = None, message: str = "", **metrics: Any) -> None:
        self.started, self.first_step, self.total = self.clock(), step, total
        self.pace_times, self.pace_steps = [], []
        self._emit(EventKind.START, step, total, message, metrics, force=True)

    def progress(
        self, step: int | None, total: int | None = None, message: str = "", force: bool = False, **metrics: Any
    ) -> None:
        """A stage's step (`step` of `total` done) with a message; progress.json at most once a second unless
        `force`."""
        self._emit(EventKind.PROGRESS, step, total, message, metrics, force=force)

    def log(self, step: int, total: int | None = None, force: bool = False, **metrics: Any) -> None:
        """Training metrics of one logging step; progress.json takes them at most once a second unless `force`."""
        self._emit(EventKind.LOG, step, total, "", metrics, force=force)

    def checkpoint(self, step: int) -> None:
        self._emit(EventKind.CHECKPOINT, step, None, "", {}, progress=False)

    def end(self, state: str, message: str = "") -> None:
        self._emit(EventKind.END, self.latest.step, self.latest.total, message, {"state": str(state)}, force=True)

    def eta(self, step: int | None, total: int | None) -> float | None:
        """Seconds left: the steps to go at the mean pace of the recent steps, leaving out the first quarter of the
        steps so far (at least the first step). The first steps pay for compilation and warm-up, so the mean since
        Start overstates the rest of the run; a mean, not a median, because on varied lengths the steps' times
        have a long tail, and the remaining steps have it too."""
        done = (step or 0) - self.first_step
        if step is None or not total or done <= 0:
            return None
        now = self.clock()
        if not self.pace_steps or self.pace_steps[-1] < step:
            self.pace_times.append(now)
            self.pace_steps.append(step)
        times, steps = [self.started, *self.pace_times], [self.first_step, *self.pace_steps]
        if len(times) > 2:  # past the warm-up, and no further back than the recent steps
            skip = max(1, (len(times) - 1) // 4)
            first = max(skip, len(times) - 1 - RECENT_PACES)
        else:
            first = 0
        seconds, counted = times[-1] - times[first], steps[-1] - steps[first]
        return round(seconds / counted * max(total - step, 0), 1)

    def _emit(
        self, kind: EventKind, step, total, message: str, metrics: dict, force: bool = False, progress: bool = True
    ) -> None:
        total = total if total is not None else self.total
        self.total = total
        eta = self.eta(step, total) if kind in (EventKind.LOG, EventKind.PROGRESS) else None
        if "eta_s" in metrics:  # a stage that knows better (training counts optimizer steps, not events)
            eta = metrics.pop("eta_s")
        event = Event(kind, time.time(), step, total, message, eta, metrics)
        if progress:
            self.latest = Progress(
                step if step is not None else self.latest.step,
                total,
                message or self.latest.message,
                eta,
                {**self.latest.metrics, **{key: value for key, value in metrics.items() if value is not None}},
            )
        if not self.writes:
            return
        append_event(self.run_dir, event)
        finished = step is not None and total is not None and step >= total
        if progress and (force or finished or self.clock() - self.written >= PROGRESS_EVERY_S):
            write_json(self.run_dir / "progress.json", {**dataclasses.asdict(self.latest), "updated": time.time()})
            self.written = self.clock()


# ---------------------------------------------------------------- stop flag and the job's context


class StopFlag:
    """Set when the job is asked to stop (SIGTERM in the job's process); stages poll it between units of work."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def request(self) -> None:
        self.requested = True

    def install(self) -> StopFlag:
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        return self


@dataclass
class JobContext:
    """What a stage's job function receives: where to write, how to report, when to stop."""

    run_dir: Path
    reporter: Reporter
    stop: StopFlag
    resume: bool = False

    @classmethod
    def for_run(cls, run_dir: Path, resume: bool = False) -> JobContext:
        """A context that reports into `run_dir` and is never asked to stop (a stage called in this process)."""
        return cls(Path(run_dir), Reporter(run_dir), StopFlag(), resume)

    @property
    def workspace(self) -> Path:
        return run_workspace(self.run_dir)

    def note(self, **changes: Any) -> None:
        """Record what the job knows about itself (backend, device, micro-batch, a note) in status.json."""
        if self.reporter.writes:
            write_status(self.run_dir, **changes)


# ---------------------------------------------------------------- outputs


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


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [
        path
        for path in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").exists()
    ]
    return max(checkpoints, key=lambda path: int(path.name.split("-")[-1]), default=None)


@dataclass(frozen=True)
class TrainedModel:
    """The model a finished training run produced: a LoRA adapter on a base model, or a full fine-tune."""

    run_dir: Path
    path: Path  # adapter/ or merged/ (a stopped run: its last checkpoint)
    kind: str  # "adapter" or "merged"
    base_model: str | None  # the base model's name or folder (adapters only)
    trust_remote_code: bool
    train_config: dict[str, Any]  # the settings it was trained with (saved beside it, else the run's config.yaml)
    stage: str = "sft"  # the training stage that made it: its record (stages) says what the model is


def _check_safetensors(folder: Path, run_name: str) -> None:
    """UserError unless the weights are safetensors: a run folder can be copied in from anywhere, and PEFT and
    transformers fall back to a pickle (adapter_model.bin, pytorch_model.bin) whose loading can run code."""
    wanted = "adapter_model.safetensors" if folder.name == "adapter" else "*.safetensors"
    if not list(folder.glob(wanted)):
        pickles = sorted(path.name for path in folder.glob("*.bin")) or ["no weights file"]
        raise UserError(
            f"Run '{run_name}' has {', '.join(pickles)} in {folder.name}/ but no {wanted}: only safetensors weights "
            "are loaded (a .bin file is a pickle that can run code). Retrain the run, or convert its weights to "
            "safetensors where you trust them."
        )


def _check_inside(part: Path, run_dir: Path) -> None:
    """When the app is shared, a run's model folder must be inside the run folder: a link out of it (to weights
    anywhere on the machine) is refused."""
    if paths_confined() and not part.resolve().is_relative_to(Path(run_dir).resolve()):
        raise UserError(
            f"Run '{Path(run_dir).name}': {part.name}/ leads outside the run folder; a shared app only reads a run's "
            "own files."
        )


def trained_model(run_dir: Path) -> TrainedModel:
    """The trained model of a training run; UserError for another kind of run or one without a model yet. A run
    stopped (or failed) before its end offers its last checkpoint, which holds the same kind of weights."""
    run_dir = Path(run_dir)
    kind = read_kind(run_dir)
    if kind != "train":
        raise UserError(f"Run '{run_dir.name}' is a {kind} run, not a training run; choose a training run.")
    for name in ("adapter", "merged"):
        folder = run_dir / name
        if (folder / "adapter_config.json").exists() or (folder / "config.json").exists():
            return _trained(run_dir, folder, name)
    state = read_status(run_dir).state
    checkpoint = checkpoint_model(run_dir)
    if checkpoint is not None:
        return _trained(run_dir, checkpoint, "adapter" if (checkpoint / "adapter_config.json").exists() else "merged")
    raise UserError(
        f"Run '{run_dir.name}' has no trained model yet (no adapter/ or merged/ folder and no checkpoint; the run is "
        f"{state}). Wait for it to finish, resume it, or choose another run."
    )


def checkpoint_model(run_dir: Path) -> Path | None:
    """The last checkpoint of a training run that ended without its final model (stopped or failed), when it holds
    weights (an adapter or a full model); None for a run still going, a finished one or one without checkpoints."""
    run_dir = Path(run_dir)
    if (run_dir / "adapter").is_dir() or (run_dir / "merged").is_dir() or read_status(run_dir).state in ACTIVE:
        return None
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return None
    return checkpoint if any((checkpoint / name).exists() for name in ("adapter_config.json", "config.json")) else None


def _trained(run_dir: Path, folder: Path, kind: str) -> TrainedModel:
    _check_inside(folder, run_dir)
    _check_safetensors(folder, run_dir.name)
    saved = folder / "train_config.yaml"
    settings = load_yaml(saved) if saved.exists() else stage_settings(run_dir)
    settings.pop("kind", None)
    model = settings.get("model") or {}
    base = None
    if kind == "adapter":
        base = model.get("name_or_path") or (read_json(folder / "adapter_config.json", {}) or {}).get(
            "base_model_name_or_path"
        )
    stage = str(settings.get("stage") or "sft")
    return TrainedModel(run_dir, folder, kind, base, bool(model.get("trust_remote_code")), settings, stage)
