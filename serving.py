"""An OpenAI-compatible endpoint for a training run: its exported GGUF through llama-cpp-python's server, or without
an export its transformers model (base + adapter, or merged) through a small FastAPI app of our own with the run's
chat template.

The endpoint's process is `main.py serve RUN` (serving_app.serve_forever); it writes endpoint.json into the run
folder while it runs, so a second serve of the same run, from the CLI or the app, finds it and reuses it.
`start_endpoint` starts that process from the app, tied to it: it ends when the app's process does. This module
loads no model: the app and the benchmark job import it.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import runfolder
from workspace import UserError, is_loopback, read_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
ENDPOINT_FILE = "endpoint.json"  # in the run folder while its endpoint runs (no key in it)
API_KEY_ENV = "FINETUNER_SERVE_API_KEY"  # how the app hands the key to the endpoint's process (not in ps)
DEFAULT_PORT = 8000
START_TIMEOUT_S = 600.0
_STARTED: dict[str, subprocess.Popen] = {}  # run folder → the endpoint process this app started


@dataclass(frozen=True)
class Endpoint:
    """A running endpoint: where it answers and what it serves."""

    run: str  # the run folder
    base_url: str  # http://HOST:PORT/v1
    model: str  # the model id clients send
    backend: str  # "llama.cpp" (a GGUF) or "transformers"
    pid: int
    key_required: bool


# ---------------------------------------------------------------- checks


def check_port(host: str, port: int) -> None:
    """UserError when `port` on `host` cannot be bound now (in use, or not an address of this machine)."""
    if not 1 <= int(port) <= 65535:
        raise UserError(f"Port {port} is not a port number; choose one from 1 to 65535.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a listener still refuses
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise UserError(
                f"Port {port} on {host} is in use or not available ({exc.strerror}); choose another port."
            ) from exc


def check_key(host: str, api_key: str, shared: bool) -> None:
    """An endpoint others can reach (the app shared, or bound beyond loopback) needs an API key."""
    if api_key:
        return
    if shared:
        raise UserError("The app is shared: set an API key for the endpoint, so only those who have it can call it.")
    if not is_loopback(host):
        raise UserError(
            f"Serving on {host} lets other machines call the model: set an API key (--api-key), or bind to 127.0.0.1."
        )


AUTO = "auto"  # weights: the run's largest GGUF when it exported one, else its transformers model
TRANSFORMERS = "transformers"


def model_to_serve(
    run: str | Path, workspace: str | Path | None = None, weights: str = AUTO
) -> tuple[Path, Path | None]:
    """(the run folder, the GGUF file to serve or None for the transformers model); UserError without a model.

    weights: auto, transformers, or the name of a GGUF file in the run's gguf/ folder."""
    run_dir = runfolder.run_path(run, workspace)
    trained = runfolder.trained_model(run_dir)  # refuses a run that is not a finished training run
    files = sorted((run_dir / "gguf").glob("*.gguf"), key=lambda path: (path.stat().st_size, path.name))
    if weights == TRANSFORMERS:
        return trained.run_dir, None
    if weights and weights != AUTO:
        chosen = [path for path in files if path.name == weights]
        if not chosen:
            raise UserError(f"Run '{run_dir.name}' has no {weights} in gguf/; it has: {_names(files) or 'none'}.")
        return trained.run_dir, chosen[0]
    return trained.run_dir, files[-1] if files else None  # the largest: the closest to the tuned weights


def _names(files: list[Path]) -> str:
    return ", ".join(path.name for path in files)


# ---------------------------------------------------------------- the app's side


def running_endpoint(run_dir: Path) -> Endpoint | None:
    """The run's endpoint when its process is alive and answers; None otherwise (a stale file is removed)."""
    data = read_json(Path(run_dir) / ENDPOINT_FILE, None)
    if not data:
        return None
    endpoint = Endpoint(**data)
    if _alive(endpoint.pid) and _answers(endpoint.base_url):
        return endpoint
    if not _alive(endpoint.pid):
        (Path(run_dir) / ENDPOINT_FILE).unlink(missing_ok=True)
    return None


def start_endpoint(
    run: str | Path,
    workspace: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str = "",
    shared: bool = False,
    weights: str = AUTO,
    timeout: float = START_TIMEOUT_S,
) -> Endpoint:
    """The run's endpoint: the one already running, else a new process tied to this one (it ends with it)."""
    run_dir, _ = model_to_serve(run, workspace, weights)
    existing = running_endpoint(run_dir)
    if existing is not None:
        return existing
    check_key(host, api_key, shared)
    check_port(host, port)
    command = [sys.executable, str(ROOT / "main.py"), "serve", str(run_dir), "--host", host, "--port", str(port)]
    command += ["--weights", weights or AUTO]
    env = {**os.environ, API_KEY_ENV: api_key}
    log_file = open(Path(run_dir) / "serve.log", "ab")  # noqa: SIM115 - the child holds it open
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_end_with_parent
    )
    log_file.close()
    _STARTED[str(run_dir)] = process
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        endpoint = running_endpoint(run_dir)
        if endpoint is not None and endpoint.pid == process.pid:
            return endpoint
        if process.poll() is not None:
            tail = (Path(run_dir) / "serve.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            raise UserError(f"The endpoint did not start: {tail[-1] if tail else f'exit code {process.returncode}'}")
        time.sleep(0.5)
    stop_endpoint(run_dir)
    raise UserError(f"The endpoint did not answer within {timeout:.0f} s; see {Path(run_dir) / 'serve.log'}.")


def stop_endpoint(run_dir: Path) -> bool:
    """Stop the run's endpoint (one this app started, or another process's); False when none was running."""
    run_dir = Path(run_dir)
    process = _STARTED.pop(str(run_dir), None)
    data = read_json(run_dir / ENDPOINT_FILE, None)
    pid = process.pid if process is not None else (data or {}).get("pid")
    if not pid or not _alive(pid):
        (run_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    try:
        if process is not None:
            process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    (run_dir / ENDPOINT_FILE).unlink(missing_ok=True)
    return True


@atexit.register
def _stop_started() -> None:
    for run_dir in list(_STARTED):
        stop_endpoint(Path(run_dir))


def _end_with_parent() -> None:
    """In the child: SIGTERM when the app's process dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (ended, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _answers(base_url: str) -> bool:
    """Whether the endpoint answers HTTP at all (401 without a key counts: it is up)."""
    try:
        urllib.request.urlopen(f"{base_url}/models", timeout=5).close()  # noqa: S310 - our own http URL
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def snippets(endpoint: Endpoint, api_key_hint: str = "$API_KEY") -> tuple[str, str]:
    """(a curl command, a Python openai client call) that talk to the endpoint."""
    key = api_key_hint if endpoint.key_required else "none"
    curl = (
        f"curl {endpoint.base_url}/chat/completions \\\n"
        f'  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"model": "{endpoint.model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )
    python = (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{endpoint.base_url}", api_key="{key}")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{endpoint.model}", messages=[{{"role": "user", "content": "Hello!"}}]\n'
        ")\n"
        "print(reply.choices[0].message.content)"
    )
    return curl, python


# ---------------------------------------------------------------- a private llama.cpp server (benchmarks)


@dataclass
class LlamaServer:
    """A llama-cpp-python server on a free loopback port, for one job's use."""

    process: subprocess.Popen
    base_url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_llama_server(
    gguf_path: Path, logits_all: bool = False, n_ctx: int = 2048, timeout: float = START_TIMEOUT_S
) -> LlamaServer:
    """python -m llama_cpp.server over `gguf_path` on 127.0.0.1; logits_all for prompt log-probabilities. With it
    llama.cpp keeps logits for the whole context (n_ctx × vocabulary floats): a small n_ctx keeps requests fast."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", str(logits_all), "--verbose", "False"]
    # Its log goes to a file: a pipe nobody reads would fill up with request lines and block the server.
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_end_with_parent)
    server = LlamaServer(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output.seek(0)
            raise UserError(f"llama.cpp's server did not start: {output.read().decode(errors='replace')[-300:]}")
        if _answers(f"{server.base_url}/v1"):
            return server
        time.sleep(0.5)
    server.stop()
    raise UserError(f"llama.cpp's server did not answer within {timeout:.0f} s.")
