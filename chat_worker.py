"""The chat worker: the Test tab's model lives in a child process of its own, not in the web server.

The server starts it on first use (`ChatWorker`), one at a time; it loads the model through
`inference_utils.load_for_chat` (on CUDA: bf16, a static KV cache and a compiled decoding step, warmed up while
loading) and streams the reply's new text back as JSON lines. It ends itself after an idle time,
when the server goes away (its stdin closes), or when a GPU job takes the workspace's GPU lock; the server ends it
before it starts a GPU job (`jobs.before_gpu_job`). A crash in generation ends only this process: the tab shows
the error and the next message starts a new worker.

Protocol (one JSON object per line): requests on stdin — {"op": "load", ...}, {"op": "chat", ...},
{"op": "compare", ...}, {"op": "cancel"}; replies on the worker's own copy of stdout — {"type": "status",
"message": ...} (loading, warming up), {"type": "loaded"}, {"type": "piece", "rows": [...]}, {"type": "done"},
{"type": "error", "message": ..., "user": bool}.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from workspace import UserError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
IDLE_S = 15 * 60.0  # an unused model gives its memory back after this long
EXIT_GPU_JOB = 3  # the worker saw a GPU job take the workspace's GPU lock
POLL_S = 1.0  # how often a waiting worker looks at its idle time and the GPU lock


# ---------------------------------------------------------------- the server's side


class WorkerEnded(UserError):
    """The worker was ended in the middle of a request (a job took the machine); the reply so far stands."""


def job_needs() -> str:
    """What a training or export job takes from the chat model on this machine: the GPU, or without one the
    memory and the cores (a model loaded twice on the CPU can run the machine out of memory)."""
    import model_utils

    return "the GPU" if model_utils.detect_device().cuda else "this machine's memory and CPU cores"


class ChatWorker:
    """The server's handle on the one chat worker of a workspace: starts it when needed, one request at a time."""

    def __init__(self, workspace: str | Path, idle_s: float = IDLE_S) -> None:
        self.workspace = Path(workspace)
        self.idle_s = idle_s
        self._lock = threading.Lock()  # one request (and one process) at a time
        self._process: subprocess.Popen | None = None
        self._key: tuple[str, str, str] | None = None
        self._info: dict[str, Any] = {}
        self._ended_because = ""  # why the last worker was ended by us (a GPU job), told once
        self.notice = ""  # what the tab says about the last reload ("" when nothing happened)
        self.activity = ""  # what the worker is busy with, for a request that waits ("warming up …")

    @property
    def log_path(self) -> Path:
        return self.workspace / "logs" / "chat-worker.log"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.alive else None

    def load(self, model: str = "", run: str = "", gguf: str = "") -> dict[str, Any]:
        """Make sure the worker holds this model (starting the worker or reloading); returns what it loaded."""
        for _ in self.prepare(model, run, gguf):
            pass
        return self._info

    def prepare(self, model: str = "", run: str = "", gguf: str = "") -> Iterator[str]:
        """Make sure the worker holds this model, yielding what happens meanwhile as lines for the tab (waiting for
        another request, loading, warming up); `info` is what is loaded afterwards."""
        key = (model.strip(), run or "", gguf or "")
        while not self._lock.acquire(timeout=0.5):
            busy = (
                f"another request is loading the model ({self.activity})"
                if self.activity
                else "another reply is being generated"
            )
            yield f"Waiting: {busy}…"
        try:
            yield from self._ensure_steps(key)
        finally:
            self._lock.release()

    @property
    def info(self) -> dict[str, Any]:
        return self._info

    def chat(self, key: tuple[str, str, str], messages: list[dict], config, use_adapter: bool) -> Iterator[str]:
        """The reply so far, token by token, from the model `key` = (model, run, gguf)."""
        request = {"op": "chat", "messages": messages, "config": asdict(config), "use_adapter": use_adapter}
        text = ""
        for rows in self._stream(key, request):
            text += rows[0]
            yield text

    def compare(self, key: tuple[str, str, str], prompt: str, config) -> Iterator[tuple[str, str]]:
        """(base so far, tuned so far) for one prompt."""
        base = tuned = ""
        for rows in self._stream(key, {"op": "compare", "prompt": prompt, "config": asdict(config)}):
            base, tuned = base + rows[0], tuned + rows[1]
            yield base, tuned

    def end(self, reason: str = "") -> None:
        """End the worker now (its GPU memory is freed with the process); `reason` is told on the next load."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self._ended_because = reason
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def state_line(self) -> str:
        """One line for the tab: what is loaded, or why the model is no longer loaded."""
        if self.alive and self._key is not None:
            return f"Loaded **{self._info['name']}** ({self._info['backend']}, worker pid {self.pid})."
        process = self._process
        if process is None:
            return ""
        if self._ended_because or process.returncode == EXIT_GPU_JOB:
            because = self._ended_because or f"a training or export job started and needs {job_needs()}"
            return f"The chat model was unloaded because {because}; the next message loads it again."
        if process.returncode not in (0, None):
            return f"The chat worker ended (exit code {process.returncode}); the next message starts it again."
        return "The chat model was unloaded after a while unused; the next message loads it again."

    def end_for_job(self, run_dir: Path) -> None:
        """jobs.before_gpu_job's hook: the card goes to the job."""
        if self.alive:
            self.end(f"run '{Path(run_dir).name}' started and needs {job_needs()}")

    # ------------------------------------------------------------ inside

    def _ensure(self, key: tuple[str, str, str]) -> dict[str, Any]:
        for _ in self._ensure_steps(key):
            pass
        return self._info

    def _ensure_steps(self, key: tuple[str, str, str]) -> Iterator[str]:
        """Load `key` if it is not loaded (called under the lock), yielding the worker's status lines."""
        if self.alive and self._key != key and self._info.get("compiled"):
            # Compiled code and CUDA graphs keep memory that only the process's end gives back.
            self.end()
            self._process = None  # a restart of our own: nothing to tell
        if not self.alive:
            self._note_exit()
            self._start()
        if self._key == key:
            return
        self._key = None
        self._send({"op": "load", "model": key[0], "run": key[1], "gguf": key[2]})
        finished = False
        try:
            while (reply := self._read()).get("type") == "status":
                self.activity = reply["message"].rstrip("…")
                yield reply["message"]
            finished = True
        finally:
            self.activity = ""
            if not finished and self.alive:  # the page stopped listening: let the load finish unseen
                while (reply := self._read()).get("type") == "status":
                    pass
        if reply.get("type") != "loaded":
            self._raise(reply)
        self._key, self._info = key, reply["info"]

    def _note_exit(self) -> None:
        """Say why the previous worker is gone, when it did not just idle out."""
        if self._process is None:
            return
        code = self._process.returncode
        if self._ended_because:
            self.notice = f"The chat model was unloaded because {self._ended_because}; it was loaded again."
        elif code == EXIT_GPU_JOB:
            self.notice = (
                f"The chat model was unloaded because a training or export job started and needs {job_needs()}; "
                "it was loaded again."
            )
        elif code not in (0, None):
            self.notice = f"The chat worker had ended (exit code {code}); it was started again."
        else:
            self.notice = ""
        self._ended_because, self._process, self._key = "", None, None

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "chat_worker.py"), str(self.workspace), str(self.idle_s)]
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C in the server's terminal reaches the server, which ends it
            )
        log.info("chat worker started (pid %d)", self._process.pid)

    def _stream(self, key: tuple[str, str, str], request: dict) -> Iterator[list[str]]:
        with self._lock:
            self._ensure(key)
            self._send(request)
            finished = False
            try:
                while True:
                    reply = self._read()
                    if reply.get("type") == "piece":
                        yield reply["rows"]
                    elif reply.get("type") == "done":
                        finished = True
                        return
                    else:
                        finished = True
                        self._raise(reply)
            finally:
                if not finished and self.alive:  # the page stopped listening: stop generating, drain the rest
                    self._send({"op": "cancel"})
                    while self._read().get("type") == "piece":
                        pass

    def _send(self, message: dict) -> None:
        try:
            self._process.stdin.write((json.dumps(message) + "\n").encode())
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the read that follows reports the worker's end

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if line:
            return json.loads(line)
        self._process.wait()
        return {"type": "exit", "code": self._process.returncode}

    def _raise(self, reply: dict) -> None:
        if reply.get("type") == "error":
            if reply.get("user"):
                raise UserError(reply["message"])
            raise UserError(f"The chat model failed: {reply['message']}. Send the message again to retry.")
        # The process ended in the middle of a request.
        self._key = None
        if self._ended_because:
            raise WorkerEnded(
                f"The chat model was unloaded because {self._ended_because}; the reply stops here. Send the message "
                "again to load the model again."
            )
        raise UserError(
            f"The chat worker crashed (exit code {reply.get('code')}); the next message starts it again. "
            f"Last lines of {self.log_path.name}:\n{_tail(self.log_path)}"
        )


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- the worker process


def gpu_job_running(workspace: Path) -> bool:
    """Whether a job holds the workspace's GPU lock (jobs.gpu_lock) right now."""
    path = Path(workspace) / "gpu.lock"
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def serve(workspace: Path, idle_s: float) -> int:
    """The worker's loop: read requests, answer them; returns the exit code."""
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # libraries that print (Unsloth's banner) write to the log, not into the protocol
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # No Unsloth here: chat decodes fastest through transformers' compiled static-cache step (load_for_chat).
    import inference_utils

    requests: queue.Queue[dict | None] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            message = json.loads(line)
            if message.get("op") == "cancel":
                cancel.set()
            requests.put(message)
        requests.put(None)  # the server is gone

    cancel = threading.Event()
    threading.Thread(target=read_stdin, name="requests", daemon=True).start()

    def reply(**message: Any) -> None:
        replies.write(json.dumps(message) + "\n")

    chat_model = None
    last_used = time.monotonic()
    while True:
        try:
            request = requests.get(timeout=POLL_S)
        except queue.Empty:
            if time.monotonic() - last_used > idle_s:
                log.info("idle for %.0f s: ending", idle_s)
                return 0
            if gpu_job_running(workspace):
                log.info("a GPU job started: ending to free the card")
                return EXIT_GPU_JOB
            continue
        if request is None:
            return 0
        if request["op"] == "cancel":
            continue
        cancel.clear()
        try:
            if request["op"] == "load":
                chat_model = None  # the old model's memory goes before the next one loads
                chat_model = inference_utils.load_for_chat(
                    request["model"] or None,
                    request["run"] or None,
                    workspace,
                    gguf=request["gguf"] or None,
                    status=lambda line: reply(type="status", message=line),
                )
                reply(type="loaded", info=describe(chat_model))
            else:
                for rows in answer(inference_utils, chat_model, request):
                    if cancel.is_set():
                        break
                    reply(type="piece", rows=rows)
                reply(type="done")
        except UserError as exc:
            reply(type="error", message=str(exc), user=True)
        except Exception as exc:  # the model failed; the worker itself can go on
            log.exception("generation failed")
            reply(type="error", message=f"{type(exc).__name__}: {exc}"[:500], user=False)
        last_used = time.monotonic()


def answer(inference_utils, chat_model, request: dict) -> Iterator[list[str]]:
    """The new text of each row (one for chat, base and tuned for compare) as it is generated."""
    if chat_model is None:
        raise UserError("No model is loaded; send the message again.")
    config = inference_utils.GenerationConfig(**request["config"])
    if request["op"] == "chat":
        for piece in inference_utils.chat_deltas(chat_model, request["messages"], config, request["use_adapter"]):
            yield [piece]
    else:
        for base, tuned in inference_utils.compare_deltas(chat_model, request["prompt"], config):
            yield [base, tuned]


def describe(chat_model) -> dict[str, Any]:
    """What the tab shows about the loaded model."""
    return {
        "name": chat_model.name,
        "kind": chat_model.kind,
        "backend": chat_model.backend,
        "static_cache": chat_model.static_cache,
        # A compiled decoding step on the GPU: its memory is freed only with the process (ChatWorker restarts it).
        "compiled": bool(chat_model.static_cache and chat_model.cache_tokens),
        "pid": os.getpid(),
    }


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), float(sys.argv[2])))
