"""Faults and attacks on the real app: the server killed with -9 during a job, jobs killed with -9, a full disk,
20 page sessions polling at once, logins, file serving, and where secrets and weights may come from.

Everything that trains uses tiny settings (≤ 6 steps, 64 tokens, batch 2) on the demo model; the app is served with
`python main.py --port P --workspace W --auth USER:PASS` and driven through its own endpoints (gradio_client, httpx)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_llm_servers import FakeLLMServer

import gguf_utils
import jobs
import main
import model_utils
import runfolder
import submit
import synthetic_utils
from conftest import capital_rows, logged_steps, wait_for, write_jsonl
from dataset_utils import DatasetConfig
from model_utils import ModelConfig
from train_config import TrainConfig
from workspace import config_to_dict, dump_yaml

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("tester", "correct-horse-battery")
KEY = "sk-fault-test-9d2e4b7a1c3f5e6d8b0a2c4e6f8a0b1c"
KEY_ENV = "FINETUNER_FAULT_TEST_KEY"
SESSIONS = 20
POLL_S = 1.5  # the Train tab's timer
POLL_WINDOW_S = 30
TINY = {
    "Max steps": 6,
    "Batch size": 2,
    "Gradient accumulation": 1,
    "Max sequence length": 64,
    "Gradient checkpointing": False,
    "Warm-up steps": 0,
    "Checkpoint every (steps)": 1,
    "LoRA rank (r)": 8,
}


def state(run_dir: Path) -> str:
    return jobs.job_status(run_dir).state


def start_steps(run_dir: Path) -> list[int]:
    return [event.step for event in runfolder.read_events(run_dir) if event.kind == "start"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def link_demo(workspace: Path, demo_model: Path) -> None:
    (workspace / "models").mkdir(parents=True, exist_ok=True)
    (workspace / "models" / demo_model.name).symlink_to(demo_model)


def end_job(run_dir: Path) -> None:
    """Cleanup: a job a test left running is killed with its process group."""
    status = jobs.job_status(run_dir)
    if status.state in runfolder.ACTIVE and status.pid:
        try:
            os.killpg(status.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def secret_hits(folder: Path, secret: str) -> list[str]:
    """Files under folder whose bytes contain the secret."""
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


# ---------------------------------------------------------------- the app server


class App:
    """`python main.py` serving one workspace, with a password; start, kill -9, start again."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of one start (a subclass serves the app another way)."""
        argv = ["main.py", "--port", str(port), "--workspace", str(self.workspace), "--auth", ":".join(AUTH)]
        return argv, {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

    def start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.port, self.url = port, f"http://127.0.0.1:{port}/"
        self.starts += 1
        argv, env = self.command(port)
        with open(self.workspace.parent / f"app-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

        def up() -> bool:
            assert self.process.poll() is None, self.log()
            try:
                return httpx.get(self.url, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=300, what="the app to serve")

    def log(self) -> str:
        return (self.workspace.parent / f"app-{self.starts}.log").read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def client(self):
        from gradio_client import Client

        return Client(self.url, auth=AUTH, verbose=False, download_files=False)

    def login(self) -> httpx.Client:
        session = httpx.Client(base_url=self.url, timeout=30)
        assert session.post("login", data={"username": AUTH[0], "password": AUTH[1]}).status_code == 200
        return session


def endpoint(client, labels: set[str], prefix: str = "/", returns: str | None = None) -> tuple[str, list[dict]]:
    """The API name and parameters of the one endpoint with these input labels (and this output label): the tabs'
    Start, Stop, Resume and page-load events, found by what they show rather than by generated names."""
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    found = [
        (name, info["parameters"])
        for name, info in endpoints.items()
        if name.startswith(prefix)
        and labels <= {parameter["label"] for parameter in info["parameters"]}
        and (returns is None or [item["label"] for item in info["returns"]] == [returns])
    ]
    assert len(found) == 1, f"expected one endpoint with inputs {labels} under {prefix}, found {[n for n, _ in found]}"
    return found[0]


def open_page(app: App):
    """A page's session: its own login, then the Train tab's run list filled (Gradio refuses a run name that is not
    among the choices this session was given; the page's load event fills them, as Refresh does here)."""
    client = app.client()
    api_name, _ = endpoint(client, {"Run"}, prefix="/refresh", returns="Run")
    client.predict(None, api_name=api_name)
    return client


def start_training(client, data: Path, name: str, **overrides: Any) -> str:
    """Press the Train tab's Start with the tiny settings: every widget at its default except these."""
    api_name, parameters = endpoint(client, {"Run name", "Max steps", "LoRA rank (r)"})
    values = {**TINY, "Dataset (path or Hub id)": str(data), "Run name": name, **overrides}
    args = [values.get(parameter["label"], parameter.get("parameter_default")) for parameter in parameters]
    chosen = client.predict(*args, api_name=api_name)  # the Run dropdown, updated to the new run
    return chosen["value"] if isinstance(chosen, dict) else chosen


def train_tab_button(client, verb: str, run: str) -> None:
    """Press a Train tab button for `run`; any other input (Resume's Judge API key box) as the page leaves it."""
    api_name, parameters = endpoint(client, {"Run"}, prefix=f"/{verb}")
    args = [
        run if parameter["label"] == "Run" else parameter.get("parameter_default") or "" for parameter in parameters
    ]
    client.predict(*args, api_name=api_name)


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_model):
    workspace = tmp_path_factory.mktemp("faults") / "ws"
    link_demo(workspace, demo_model)
    write_jsonl(workspace / "capitals.jsonl", capital_rows(16))
    served = App(workspace)
    served.start()
    yield served
    for run in jobs.list_runs(workspace):
        end_job(run.path)
    served.stop()


# ---------------------------------------------------------------- the server under load, logins, file serving


@pytest.mark.slow
def test_20_sessions_polling_a_running_job_all_keep_getting_answers(app):
    client = app.client()
    run = start_training(client, app.workspace / "capitals.jsonl", "polled")
    run_dir = runfolder.runs_dir(app.workspace) / run
    wait_for(lambda: state(run_dir) == "running", what="the job to run")
    latencies: list[list[float]] = [[] for _ in range(SESSIONS)]
    errors: list[str] = []
    states_seen: set[str] = set()
    window: dict[str, float] = {}
    # Every page opens first; then all of them poll for the same window.
    opened = threading.Barrier(SESSIONS + 1, action=lambda: window.update(end=time.monotonic() + POLL_WINDOW_S))

    def session(index: int) -> None:
        try:
            page = open_page(app)  # a page of its own: its own login and queue session
        except Exception as exc:
            errors.append(f"session {index} could not open: {type(exc).__name__}: {exc}")
            page = None
        opened.wait()
        while page is not None and time.monotonic() < window["end"]:
            try:
                started = time.perf_counter()
                view = page.predict(run, api_name="/train_view")
                latencies[index].append(time.perf_counter() - started)
                if run not in str(view[0]):
                    errors.append(f"session {index}: a view without the run: {str(view[0])[:200]}")
            except Exception as exc:  # every failure is counted, not only the first
                errors.append(f"session {index}: {type(exc).__name__}: {exc}")
            states_seen.add(state(run_dir))
            time.sleep(POLL_S)

    threads = [threading.Thread(target=session, args=(index,)) for index in range(SESSIONS)]
    for thread in threads:
        thread.start()
    opened.wait(timeout=600)
    states_seen.add(state(run_dir))
    for thread in threads:
        thread.join(timeout=POLL_WINDOW_S + 300)
    end_job(run_dir)

    answered = [len(times) for times in latencies]
    every = sorted(time_s for times in latencies for time_s in times)
    assert every and not errors, errors[:5]
    report = {
        "sessions": SESSIONS,
        "answers": sum(answered),
        "fewest_per_session": min(answered),
        "errors": len(errors),
        "median_s": round(statistics.median(every), 3),
        "p95_s": round(every[int(0.95 * (len(every) - 1))], 3),
        "max_s": round(every[-1], 3),
        "job_states": sorted(states_seen),
        "load_1m": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(report))
    assert min(answered) >= 3, report
    assert states_seen <= {"running", "done"}, report
    assert every[-1] < 30, report


@pytest.mark.slow
def test_the_app_needs_gradios_login(app):
    assert httpx.get(app.url + "config", timeout=30).status_code == 401
    wrong = httpx.post(app.url + "login", data={"username": AUTH[0], "password": "guess"}, timeout=30)
    assert wrong.status_code >= 400
    session = app.login()
    assert any(name.startswith("access-token") for name in session.cookies.keys()), session.cookies
    assert session.get("config").status_code == 200
    # gradio_client without the password cannot open the app either.
    from gradio_client import Client

    with pytest.raises(Exception):  # noqa: B017 (the client raises its own error types)
        Client(app.url, verbose=False, download_files=False).predict("x", api_name="/train_view")


@pytest.mark.slow
def test_files_outside_the_workspace_are_not_served(app, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser", encoding="utf-8")
    (app.workspace / "escape.txt").symlink_to(secret)
    inside = app.workspace / "capitals.jsonl"
    session = app.login()
    assert session.get(f"gradio_api/file={inside}").status_code == 200  # the download links work
    for path in (
        secret,
        app.workspace / "escape.txt",
        f"{app.workspace}/{os.path.relpath(secret, app.workspace)}",
        "/etc/passwd",
        ROOT / "main.py",
    ):
        response = session.get(f"gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "not for the browser" not in response.text


# ---------------------------------------------------------------- kill -9 of the server during a training job


@pytest.mark.slow
def test_server_killed_during_training_keeps_the_job_listed_and_resumable(app):
    run = start_training(app.client(), app.workspace / "capitals.jsonl", "survivor", **{"Max steps": 3})
    run_dir = runfolder.runs_dir(app.workspace) / run
    wait_for(lambda: logged_steps(run_dir) or state(run_dir) not in runfolder.ACTIVE, what="the first step")
    job_pid = jobs.job_status(run_dir).pid
    app.kill9()
    assert alive(job_pid), "the job died with the server"

    app.start()
    client = open_page(app)
    table, _ = client.predict(None, api_name="/listing")  # the Runs tab, read back from disk
    rows = {row[0]: row for row in table["data"]}
    assert run in rows and rows[run][2] in ("running", "done"), rows
    if state(run_dir) == "running":
        train_tab_button(client, "stop", run)
        wait_for(lambda: state(run_dir) in ("stopped", "failed", "done"), what="the job to stop")
    if state(run_dir) != "done":
        assert state(run_dir) == "stopped", runfolder.log_tail(run_dir)
        assert runfolder.last_checkpoint(run_dir) is not None
        train_tab_button(client, "resume", run)
        wait_for(lambda: state(run_dir) not in runfolder.ACTIVE, what="the resumed job to end")
    assert state(run_dir) == "done", runfolder.log_tail(run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert max(logged_steps(run_dir)) == 3
    print(json.dumps({"run": run, "starts": start_steps(run_dir), "server_starts": app.starts}))


# ---------------------------------------------------------------- kill -9 of a synthetic-data job


@pytest.mark.slow
def test_killed_synthetic_data_job_loses_no_row_and_resumes(workspace, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeLLMServer(api_key=KEY, latency_s=0.2) as fake:
        config = {
            "provider": "openai",
            "model": "fake-model",
            "base_url": fake.openai_url,
            "topic": "tea",
            "num_rows": 120,
            "concurrency": 2,
            "backoff_s": 0.02,
        }
        (workspace / "synth.yaml").write_text(dump_yaml(config), encoding="utf-8")
        common = ["--workspace", str(workspace), "synth"]
        assert (
            main.main([*common, str(workspace / "synth.yaml"), "--name", "rows", "--detach", "--api-key-env", KEY_ENV])
            == 0
        )
        run_dir = runfolder.runs_dir(workspace) / "rows"
        data = run_dir / synthetic_utils.DATA_FILE
        wait_for(
            lambda: data.exists() and data.read_bytes().count(b"\n") >= 20, timeout=300, interval=0.1, what="20 rows"
        )
        os.kill(jobs.job_status(run_dir).pid, signal.SIGKILL)
        before = data.read_bytes()
        wait_for(lambda: state(run_dir) != "running", timeout=30, what="the kill to be noticed")
        assert state(run_dir) == "failed"
        assert "ended unexpectedly" in jobs.job_status(run_dir).error
        assert before.endswith(b"\n"), "a half-written row"
        kept = [json.loads(line) for line in before.decode().splitlines()]

        assert main.main([*common, "--resume", "rows", "--detach", "--api-key-env", KEY_ENV]) == 0
        wait_for(lambda: state(run_dir) not in runfolder.ACTIVE, timeout=300, what="the resumed job")
    assert state(run_dir) == "done", runfolder.log_tail(run_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 120 and rows[: len(kept)] == kept
    assert len({synthetic_utils.normalize_text(synthetic_utils.row_text(row["messages"])) for row in rows}) == 120
    assert secret_hits(workspace, KEY) == [], "the API key was written to disk"
    assert KEY not in capsys.readouterr().out + runfolder.log_tail(run_dir, lines=10_000)
    print(json.dumps({"rows_before_kill": len(kept), "rows_after_resume": len(rows)}))


# ---------------------------------------------------------------- kill -9 of an export


def untrained_adapter_run(workspace: Path, demo_model: Path, name: str) -> Path:
    """A finished-looking training run whose adapter is freshly initialised (no training: B = 0)."""
    from peft import LoraConfig, get_peft_model

    config = TrainConfig(
        model=ModelConfig("demo"),
        dataset=DatasetConfig(source="unused.jsonl"),
        lora_r=2,
        target_modules=["q_proj", "v_proj"],
    )
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, name)
    model = get_peft_model(
        model_utils.load_model(str(demo_model)),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(run_dir / "adapter")
    model_utils.load_tokenizer(str(demo_model)).save_pretrained(run_dir / "adapter")
    (run_dir / "adapter" / "train_config.yaml").write_text(dump_yaml(config_to_dict(config)), encoding="utf-8")
    runfolder.write_status(run_dir, state="done")
    return run_dir


def file_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
def test_killed_export_leaves_the_adapter_and_nothing_finished_looking(workspace, demo_model):
    link_demo(workspace, demo_model)
    run_dir = untrained_adapter_run(workspace, demo_model, "tuned")
    adapter = file_hashes(run_dir / "adapter")
    job = jobs.create_run("export", config_to_dict(gguf_utils.ExportConfig(run="tuned", quants=["q8_0"])), workspace)
    jobs.start_job(job)

    def writing() -> str | None:
        assert state(job) in runfolder.ACTIVE, runfolder.log_tail(job)
        if any(path.is_file() and path.stat().st_size > 0 for path in run_dir.glob(".merged.tmp-*/*")):
            return "merge"
        if any(path.stat().st_size > 0 for path in (run_dir / "gguf").glob(".*.tmp-*")):
            return "conversion"
        return None

    phase = wait_for(writing, timeout=600, interval=0.05, what="the export to write")
    os.kill(jobs.job_status(job).pid, signal.SIGKILL)
    wait_for(lambda: state(job) != "running", timeout=30, what="the kill to be noticed")
    assert state(job) == "failed"

    assert file_hashes(run_dir / "adapter") == adapter
    merged = run_dir / "merged"
    assert not merged.exists() or (merged / gguf_utils.MERGE_STAMP).exists(), "a half merged/ folder"
    gguf = run_dir / "gguf"
    finished_looking = [path.name for path in gguf.iterdir() if not path.name.startswith(".")] if gguf.exists() else []
    assert finished_looking == []
    print(json.dumps({"killed_during": phase}))


# ---------------------------------------------------------------- a full disk


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {result.stderr.strip()}")


def fill(folder: Path, leave_bytes: int) -> Path:
    stats = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_runs_list_still_reads_when_the_disk_is_full(small_disk):
    mount_tmpfs(small_disk, "2m")
    run_dir = jobs.create_run("train", {}, small_disk, "died")
    dead = subprocess.Popen(["true"])
    dead.wait()
    runfolder.write_status(run_dir, state="running", pid=dead.pid, pid_start=None)
    fill(small_disk, 0)
    assert [(run.name, run.state) for run in jobs.list_runs(small_disk)] == [("died", "failed")]
    assert "ended unexpectedly" in jobs.job_status(run_dir).error


@pytest.mark.slow
def test_disk_full_during_training_fails_clearly_and_keeps_earlier_checkpoints(small_disk, demo_model):
    mount_tmpfs(small_disk, "160m")
    link_demo(small_disk, demo_model)
    data = write_jsonl(small_disk / "capitals.jsonl", capital_rows(16))
    config = TrainConfig(
        model=ModelConfig("demo"),
        dataset=DatasetConfig(source=str(data)),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_seq_length=64,
        gradient_checkpointing=False,
        warmup_steps=0,
        lora_r=8,
        learning_rate=1e-3,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), small_disk, "full-disk")
    jobs.start_job(run_dir)
    try:
        first = run_dir / "checkpoints" / "checkpoint-2"
        wait_for(
            lambda: (first / "trainer_state.json").exists() or state(run_dir) not in runfolder.ACTIVE,
            interval=0.1,
            what="the first checkpoint",
        )
        assert state(run_dir) == "running", runfolder.log_tail(run_dir)
        kept = file_hashes(first)
        # Room for status and log lines, not for the next checkpoint (an adapter alone is ~10 MB).
        filler = fill(small_disk, 512 * 1024)
        wait_for(lambda: state(run_dir) not in runfolder.ACTIVE, what="the job to end")
        status = jobs.job_status(run_dir)
        assert status.state == "failed" and "disk is full" in status.error, status
        assert runfolder.last_checkpoint(run_dir) == first and file_hashes(first) == kept

        filler.unlink()
        jobs.resume_job(run_dir)
        wait_for(lambda: state(run_dir) not in runfolder.ACTIVE, what="the resumed job")
        assert state(run_dir) == "done", runfolder.log_tail(run_dir)
        assert start_steps(run_dir) == [0, 2]
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    finally:
        end_job(run_dir)


# ---------------------------------------------------------------- what may be loaded, and what is never stored


def test_trust_remote_code_is_off_unless_asked_and_warns(caplog):
    from ui import forms

    assert ModelConfig().trust_remote_code is False
    assert TrainConfig().model.trust_remote_code is False
    assert forms.DEFAULTS["model.trust_remote_code"] is False
    with caplog.at_level(logging.WARNING, logger="model_utils"):
        ModelConfig().validate()
        assert not caplog.records
        ModelConfig(name_or_path="someone/custom", trust_remote_code=True).validate()
    assert any("trust_remote_code is on" in record.getMessage() for record in caplog.records)


class _Planted:
    """Unpickling this touches a file: a stand-in for code hidden in a pickled checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_only_safetensors_are_loaded_from_a_user_folder(tmp_path):
    import pickle

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)
    marker = tmp_path / "code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    loaded = model_utils.load_model(str(folder))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not marker.exists(), "a pickle was unpickled"
    (folder / "model.safetensors").unlink()
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(Exception, match="safetensors"):
        model_utils.check_model_folder(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- races and damaged run folders


def _own_process() -> dict[str, Any]:
    """Status fields naming this test's process: alive, and started when /proc says."""
    return {"pid": os.getpid(), "pid_start": jobs._process_start(os.getpid())}


def test_two_resumes_at_once_start_exactly_one_job(workspace, monkeypatch):
    run_dir = jobs.create_run("synth", {}, workspace, "stopped-synth")
    runfolder.write_status(run_dir, state="stopped")
    launched: list[list[str]] = []

    class FakeProcess:
        pid = os.getpid()

        def wait(self) -> None:
            pass

    def fake_popen(command, **kwargs):
        time.sleep(0.2)  # a slow start widens the window a second resume would slip through
        launched.append(command)
        return FakeProcess()

    monkeypatch.setattr(jobs.subprocess, "Popen", fake_popen)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def resume() -> None:
        barrier.wait()
        try:
            jobs.resume_job(run_dir)
            outcomes.append("started")
        except jobs.UserError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(launched) == 1
    assert sorted(outcomes)[1] == "started" and "is still queued" in sorted(outcomes)[0], outcomes


def test_a_finished_run_is_not_resumed(workspace):
    run_dir = jobs.create_run("synth", {}, workspace, "finished")
    runfolder.write_status(run_dir, state="done")
    with pytest.raises(jobs.UserError, match="finished; start a new run"):
        jobs.resume_job(run_dir)


READERS = {
    "export": lambda run: {"run": run},
    "arena-contestant": lambda run: {"contestants": ["base:demo", f"run:{run}"]},
    "arena-prompts": lambda run: {"contestants": ["base:demo", "base:other"], "prompts_run": run},
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("by_path", [False, True])
def test_a_run_cannot_be_deleted_while_its_export_or_eval_reads_it(workspace, by_path, reader):
    trained = jobs.create_run("train", {}, workspace, "trained-run")
    runfolder.write_status(trained, state="done")
    kind = reader.split("-")[0]
    config = READERS[reader](str(trained) if by_path else trained.name)
    job = jobs.create_run(kind, config, workspace, "reader-x")
    runfolder.write_status(job, state="running", **_own_process())

    allowed = jobs.actions(trained)
    assert not allowed.can_delete
    assert f"{kind} job 'reader-x'" in allowed.delete_reason
    with pytest.raises(jobs.UserError, match=f"{kind} job 'reader-x'"):
        jobs.delete_run(trained)

    runfolder.write_status(job, state="done")
    jobs.delete_run(trained)
    assert not trained.exists()


def test_stop_does_not_signal_a_live_process_whose_start_time_was_not_recorded(workspace):
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        run_dir = jobs.create_run("synth", {}, workspace, "no-pid-start")
        runfolder.write_status(run_dir, state="running", pid=stranger.pid, pid_start=None)
        jobs.stop_job(run_dir)
        assert runfolder.read_status(run_dir).state == "stopped"
        time.sleep(0.2)
        assert stranger.poll() is None, "a process that is not the job's was signalled"
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize(
    "status, progress",
    [
        ("[1, 2, 3]", "{}"),
        ('{"state": null, "created": 5, "pid": "many"}', "{}"),
        ('{"state": "done"}', '{"step": "x", "total": 3, "metrics": {"loss": "very high", "epoch": [1]}}'),
        ('{"state": "done"}', '["not", "a", "mapping"]'),
    ],
)
def test_a_damaged_status_or_progress_file_does_not_break_the_runs_list(workspace, status, progress):
    healthy = jobs.create_run("synth", {}, workspace, "healthy")
    runfolder.write_status(healthy, state="done")
    damaged = jobs.create_run("synth", {}, workspace, "damaged")
    (damaged / "status.json").write_text(status, encoding="utf-8")
    (damaged / "progress.json").write_text(progress, encoding="utf-8")

    runs = {info.name: info for info in jobs.list_runs(workspace)}
    assert set(runs) == {"healthy", "damaged"}
    assert "loss" not in runs["damaged"].progress.metrics
    jobs.actions(damaged)
    result = subprocess.run(
        [sys.executable, "main.py", "--workspace", str(workspace), "runs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stdout and "healthy" in result.stdout


# ---------------------------------------------------------------- Stop escalates


# A job stuck where its SIGTERM handler never runs (a regular expression backtracking, a reward file looping at import,
# a C call): a real process of its own session that ignores SIGTERM, as such a job does in effect.
STUCK = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stuck', flush=True); time.sleep(600)"
)


def stuck_job(workspace: Path, name: str, kind: str = "train") -> tuple[Path, subprocess.Popen]:
    run_dir = jobs.create_run(kind, {}, workspace, name)
    process = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout.readline() == b"stuck\n"  # its SIGTERM handler is in place
    runfolder.write_status(run_dir, state="running", pid=process.pid, pid_start=jobs._process_start(process.pid))
    return run_dir, process


@pytest.mark.timeout(120)
def test_stop_kills_a_job_that_ignores_it_after_the_grace_period_and_says_what_was_lost(workspace, monkeypatch):
    monkeypatch.setenv(jobs.STOP_GRACE_ENV, "2")
    run_dir, process = stuck_job(workspace, "stuck-train")
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}", encoding="utf-8")
    try:
        jobs.stop_job(run_dir)
        time.sleep(1)
        assert process.poll() is None, "killed before its grace period"
        assert jobs.job_status(run_dir).state == "stopping"
        assert process.wait(timeout=60) == -signal.SIGKILL
        wait_for(lambda: "killed" in runfolder.read_status(run_dir).note, timeout=30)
    finally:
        process.kill()
    status = jobs.job_status(run_dir)
    assert status.state == "stopped" and status.ended
    assert "had not ended 2 s after" in status.note and "Training since checkpoint-4 is lost" in status.note
    assert "killed (SIGKILL)" in (run_dir / "log.txt").read_text(encoding="utf-8")
    assert jobs.actions(run_dir).can_resume


@pytest.mark.timeout(120)
def test_a_job_that_ends_within_its_grace_period_is_not_killed(workspace, monkeypatch):
    run_dir = jobs.create_run("synth", {}, workspace, "obedient")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    runfolder.write_status(run_dir, state="running", pid=process.pid, pid_start=jobs._process_start(process.pid))
    jobs.stop_job(run_dir)
    assert process.wait(timeout=30) == -signal.SIGTERM
    assert not jobs.kill_after_grace(run_dir, process.pid, jobs._process_start(process.pid) or "", grace=1)
    assert jobs.job_status(run_dir).state == "stopped" and jobs.job_status(run_dir).note == ""


def test_a_killed_job_without_checkpoints_says_its_unfinished_output_is_lost(workspace):
    run_dir, process = stuck_job(workspace, "stuck-export", kind="export")
    runfolder.write_status(run_dir, state="stopping")
    try:
        assert jobs.kill_after_grace(run_dir, process.pid, jobs._process_start(process.pid), grace=0.2)
    finally:
        process.kill()
        process.wait()
    assert "not finished writing is lost" in jobs.job_status(run_dir).note


def test_deleting_a_run_that_is_a_link_removes_the_link_and_keeps_what_it_leads_to(workspace, tmp_path):
    elsewhere = jobs.create_run("synth", {}, tmp_path / "other-ws", "kept")
    runfolder.write_status(elsewhere, state="done")
    link = runfolder.runs_dir(workspace) / "linked"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    submit.delete("linked", workspace)
    assert not link.exists() and not link.is_symlink()
    assert (elsewhere / "config.yaml").exists()


LOOPING_REWARDS = """
while True:  # the job's SIGTERM handler runs between these steps, but nothing here ever looks at it
    pass


def reward_never(prompts, completions, **kwargs):
    return [0.0] * len(completions)
"""


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_stop_ends_a_grpo_job_whose_reward_file_loops_at_import(demo_workspace, tmp_path, monkeypatch):
    from conftest import demo_train_config

    monkeypatch.setenv(jobs.STOP_GRACE_ENV, "3")
    rewards_file = tmp_path / "looping_rewards.py"
    rewards_file.write_text(LOOPING_REWARDS, encoding="utf-8")
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"Capital of {c}?", "answer": a} for c, a in [("France", "Paris"), ("Italy", "Rome")]],
    )
    config = demo_train_config(
        data,
        stage="grpo",
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        reward_funcs=[],
        reward_file=str(rewards_file),
        allow_reward_file=True,
    )
    run_dir = submit.submit("train", config, demo_workspace, "looping-rewards")
    status = wait_for(lambda: (s := runfolder.read_status(run_dir)).pid_start and s, timeout=300, what="the job")
    log_text = lambda: (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")  # noqa: E731
    wait_for(lambda: "running reward functions from" in log_text(), timeout=400, what="the reward file's import")
    jobs.stop_job(run_dir)
    wait_for(lambda: not jobs._alive(status.pid, status.pid_start), timeout=120, what="the job's end")
    ended = wait_for(lambda: (s := jobs.job_status(run_dir)).note and s, timeout=30, what="the note")
    assert ended.state == "stopped"
    assert "killed (SIGKILL)" in ended.note and "no checkpoint" in ended.note
