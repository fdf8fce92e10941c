"""Hub downloads and Hub datasets through the real `huggingface_hub` and `datasets` clients, pointed by HF_ENDPOINT
at tests/fake_hub.py. Each case runs the CLI or a job in a process of its own: the clients read HF_ENDPOINT and
HF_HUB_OFFLINE when imported, and this test session is offline (conftest)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, small_model

from conftest import ROOT, wait_for

MODEL = "tester/tiny"
# huggingface_hub reports a file's bytes once per 10 MiB chunk it reads: three chunks show progress in between.
WEIGHTS_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repo with what training reads, plus a pickle that must not be fetched."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    generator = torch.Generator().manual_seed(0)
    save_file({"weight": torch.rand(WEIGHTS_BYTES // 4, generator=generator)}, folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"pickle" * 1000)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(args: list[str], hub_url: str, home: Path, workspace: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--workspace", str(workspace), *args],
        env=hub_env(hub_url, home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def python(script: str, args: list[str], hub_url: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    """A Python snippet in a process of its own, whose clients read HF_ENDPOINT (the fake hub) when imported."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=hub_env(hub_url, home, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def hub_env(hub_url: str, home: Path, **env: str) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**clean, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **env}


def snapshot(home: Path, repo_id: str = MODEL) -> Path:
    return next((home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def run_folder(output: str) -> Path:
    return Path(next(line for line in output.splitlines() if line.startswith("run: ")).removeprefix("run: "))


def test_download_reports_bytes_rate_and_eta_and_skips_pickles(tiny_repo, tmp_path):
    with FakeHub(rate=12e6) as hub:
        hub.add(MODEL, tiny_repo)
        result = cli(["download", MODEL], hub.url, tmp_path / "hf", tmp_path / "ws")
    assert result.returncode == 0, result.stderr + result.stdout
    folder = snapshot(tmp_path / "hf")
    assert sha256(folder / "model.safetensors") == sha256(tiny_repo / "model.safetensors")
    assert (folder / "chat_template.jinja").exists() and (folder / "tokenizer_config.json").exists()
    assert not (folder / "pytorch_model.bin").exists()
    progress = [event for event in events(run_folder(result.stdout)) if "bytes_total" in event]
    wanted = sum(path.stat().st_size for path in tiny_repo.iterdir() if path.suffix != ".bin")
    assert {event["bytes_total"] for event in progress} == {wanted}
    middle = [event for event in progress if 0 < event["bytes_done"] < wanted]
    assert middle, "no progress between the start and the end"
    assert all(event["rate_bytes_per_s"] > 0 and event["eta_s"] is not None for event in middle[1:])
    assert events(run_folder(result.stdout))[-2]["message"].startswith("Ready in ")
    assert "B/s" in result.stderr  # huggingface_hub's own bar in the terminal


def test_killed_download_resumes_to_identical_files(tiny_repo, tmp_path):
    home, workspace = tmp_path / "hf", tmp_path / "ws"
    with FakeHub(rate=8e6) as hub:
        hub.add(MODEL, tiny_repo)
        started = cli(["download", MODEL, "--detach"], hub.url, home, workspace)
        assert started.returncode == 0, started.stderr
        run_dir = run_folder(started.stdout)

        def half_way():
            progress = (
                json.loads((run_dir / "progress.json").read_text()) if (run_dir / "progress.json").exists() else {}
            )
            return progress.get("step", 0) > WEIGHTS_BYTES // 4

        wait_for(half_way, timeout=60, interval=0.1, what="a quarter of the download")
        pid = json.loads((run_dir / "status.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        # This huggingface_hub writes each file to a process-unique `.incomplete` name and never continues one
        # (file_download._download_to_tmp_and_move opens it "wb"): the resume keeps the finished files and fetches
        # the half-way one again from its first byte. The README says so; this fails if a later client resumes.
        finished = {path.name for path in (home / "hub").rglob("blobs/*") if not path.name.endswith(".incomplete")}
        assert wait_for(lambda: list(home.rglob("*.incomplete")), timeout=10, what="the partial file")
        hub.rate, hub.requests[:] = None, []
        resumed = cli(["download", "--resume", run_dir.name], hub.url, home, workspace)
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout
        fetched = [request for request in hub.requests if request.startswith("GET") and "/resolve/" in request]
    folder = snapshot(home)
    for path in tiny_repo.iterdir():
        if path.suffix != ".bin":
            assert sha256(folder / path.name) == sha256(path)
    assert len(fetched) == 4 - len(finished)
    assert hub.ranged == []  # no byte of the partial file was reused
    assert not list(home.rglob("*.incomplete"))  # the killed process's partial copy is cleaned up
    states = [event["state"] for event in events(run_dir) if event["event"] == "end"]
    assert states == ["done"]  # the killed attempt wrote no end: it died; the resumed one finished


def test_gated_repo_says_where_to_ask_for_access_and_a_token_opens_it(tiny_repo, tmp_path):
    with FakeHub(tokens=("hf_granted",)) as hub:
        hub.add("meta-llama/Gated-1B", tiny_repo, gated=True)
        refused = cli(["download", "meta-llama/Gated-1B"], hub.url, tmp_path / "hf", tmp_path / "ws")
        wrong = cli(["download", "meta-llama/Gated-1B"], hub.url, tmp_path / "hf", tmp_path / "ws", HF_TOKEN="hf_no")
        allowed = cli(
            ["download", "meta-llama/Gated-1B"], hub.url, tmp_path / "hf", tmp_path / "ws", HF_TOKEN="hf_granted"
        )
    for result in (refused, wrong):
        assert result.returncode == 2
        error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1, result.stderr
        assert f"{hub.url}/meta-llama/Gated-1B" in error[0] and "HF_TOKEN" in error[0] and "hf auth login" in error[0]
    assert allowed.returncode == 0, allowed.stderr
    assert not list((tmp_path / "ws").rglob("*token*"))  # the app wrote no token anywhere


def test_missing_repo_says_it_does_not_exist(tmp_path):
    with FakeHub() as hub:
        result = cli(["download", "nobody/no-such-model"], hub.url, tmp_path / "hf", tmp_path / "ws")
    assert result.returncode == 2
    assert "There is no model 'nobody/no-such-model' on the Hub" in result.stderr


def test_closed_port_says_the_hub_cannot_be_reached(tmp_path):
    import jobs

    url = f"http://127.0.0.1:{jobs.free_port()}"
    result = cli(["download", MODEL], url, tmp_path / "hf", tmp_path / "ws")
    assert result.returncode == 2
    assert f"The Hugging Face Hub ({url}) cannot be reached" in result.stderr


def test_offline_mode_set_by_the_user_says_so(tiny_repo, tmp_path):
    with FakeHub() as hub:
        hub.add(MODEL, tiny_repo)
        result = cli(["download", MODEL], hub.url, tmp_path / "hf", tmp_path / "ws", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE=1" in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a real filesystem that a 31 MB model cannot fit on."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_too_small_is_refused_with_numbers_before_anything_is_written(tiny_repo, tmp_path, small_disk):
    with FakeHub() as hub:
        hub.add(MODEL, tiny_repo)
        result = cli(["download", MODEL], hub.url, small_disk / "hf", tmp_path / "ws")
    assert result.returncode == 2
    assert "needs 31.5 MB more on disk" in result.stderr and "has only 16.8 MB free" in result.stderr, result.stderr
    assert not (tmp_path / "ws" / "runs").exists() or not list((tmp_path / "ws" / "runs").iterdir())


def test_model_facts_from_hub_metadata_then_from_the_cache(tiny_repo, tmp_path):
    script = (
        "import json, model_utils, download_utils; "
        "before = model_utils.model_facts('tester/tiny'); "
        "download_utils.download_model('tester/tiny'); "
        "after = model_utils.model_facts('tester/tiny'); "
        "print(json.dumps([before.__dict__, after.__dict__]))"
    )
    with FakeHub() as hub:
        hub.add(MODEL, tiny_repo, safetensors={"total": WEIGHTS_BYTES // 4, "parameters": {"F32": WEIGHTS_BYTES // 4}})
        result = python(script, [], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.splitlines()[-1])
    assert (before["source"], before["cached"], before["context_length"]) == ("hub", False, 4096)
    assert before["parameters"] == after["parameters"] == WEIGHTS_BYTES // 4
    assert before["size_bytes"] == after["size_bytes"]
    assert (after["source"], after["cached"]) == ("cache", True)


def test_hub_dataset_preview_streams_the_first_rows(tmp_path):
    data = tmp_path / "qa"
    (data / "data").mkdir(parents=True)
    rows = [{"question": f"q{index}", "answer": f"a{index}"} for index in range(2000)]
    (data / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = (
        "import json, dataset_utils; "
        "config = dataset_utils.DatasetConfig(source='tester/qa', split='train'); "
        "preview = dataset_utils.preview_hub_rows(config, 3); "
        "print(json.dumps(preview))"
    )
    with FakeHub() as hub:
        hub.add("tester/qa", data, kind="dataset")
        result = python(script, [], hub.url, tmp_path / "hf", HF_DATASETS_OFFLINE="0")
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout.splitlines()[-1])
    assert preview["rows"] == rows[:3]
    assert preview["column_map"] == {"instruction": "question", "output": "answer"}
    # Streaming read the file over HTTP; nothing was saved as a prepared dataset.
    assert not list((tmp_path / "hf").rglob("*.arrow"))


def test_first_config_shorthand_is_accepted():
    from train_config import train_config_from_dict

    short = train_config_from_dict({"model": "unsloth/Qwen3-0.6B", "dataset": "data.csv"})
    long = train_config_from_dict({"model": {"name_or_path": "unsloth/Qwen3-0.6B"}, "dataset": {"source": "data.csv"}})
    assert short == long
    assert train_config_from_dict({"model": "demo"}).model.name_or_path == "demo"


@pytest.mark.parametrize(
    ("columns", "mapped"),
    [
        (["question", "answer"], {"instruction": "question", "output": "answer"}),
        (["prompt", "response"], {"completion": "response"}),
        (["query", "response"], {"instruction": "query", "output": "response"}),
        (["instruction", "response"], {"output": "response"}),
        (["input", "output"], {"instruction": "input"}),
        (["instruction", "input", "output"], {}),
        (["human", "assistant"], {"prompt": "human", "completion": "assistant"}),
        (["question", "answer", "context"], {"instruction": "question", "output": "answer", "input": "context"}),
        (["messages"], {}),
    ],
)
def test_common_column_pairs_are_mapped(columns, mapped):
    import dataset_utils

    assert dataset_utils.suggest_column_map(columns) == mapped


def test_a_mapping_the_user_chose_wins_over_the_suggestion(tmp_path, demo_tokenizer):
    import dataset_utils

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "short": f"s{i}"}) + "\n" for i in range(4))
    )
    assert dataset_utils.suggest_column_map(["question", "answer", "short"], {"output": "short"}) == {
        "instruction": "question",
        "output": "short",
    }
    config = dataset_utils.DatasetConfig(source=str(data), column_map={"output": "short"})
    prepared = dataset_utils.prepare_dataset(config, demo_tokenizer, max_seq_length=64, workspace=tmp_path)
    assert prepared.format == "alpaca"
    assert "s0" in demo_tokenizer.decode(prepared.train[0]["input_ids"])


@pytest.fixture
def small_repo(demo_model, tmp_path_factory) -> Path:
    return small_model(demo_model, tmp_path_factory.getbasetemp() / "small-model")


def test_training_a_hub_id_downloads_it_first_with_its_bytes_in_the_live_view(small_repo, tmp_path):
    """A run on a model not cached yet: the download's bytes done / total are the run's progress (the download
    job's fields), the Train tab's live view shows them, then the run trains on the downloaded model."""
    import jobs
    from conftest import capital_rows, demo_train_config, write_jsonl
    from ui import train_tab
    from workspace import config_to_dict

    data = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(8))
    config = demo_train_config(data, max_steps=1, save_steps=1, max_seq_length=64, per_device_train_batch_size=1)
    config.model.name_or_path = "tester/smol"
    workspace = tmp_path / "ws"
    total = sum(path.stat().st_size for path in small_repo.iterdir())
    with FakeHub(rate=8e6) as hub:  # about 3 s for its 30 MB: progress in between
        hub.add("tester/smol", small_repo)
        run_dir = jobs.create_run("train", config_to_dict(config), workspace, "from-hub")
        jobs.start_job(run_dir, env=hub_env(hub.url, tmp_path / "hf"))
        downloading = wait_for(lambda: train_tab.model_download(run_dir), timeout=120, interval=0.2, what="bytes")
        status_html = train_tab.live_view(run_dir.name, workspace)[0]
        wait_for(lambda: not jobs.job_status(run_dir).active, timeout=300, what="the run's end")
    assert jobs.job_status(run_dir).state == "done", (run_dir / "log.txt").read_text()
    assert downloading.total == total and downloading.metrics["bytes_total"] == total
    assert "Downloading tester/smol: " in status_html and f" of {total / 1e6:.1f} MB" in status_html
    assert f'max="{total}"' in status_html  # the bar counts bytes while the model downloads
    kinds = [(event["event"], event.get("bytes_done")) for event in events(run_dir)]
    first_training = next(index for index, (kind, _) in enumerate(kinds) if kind == "start")
    bytes_done = [done for kind, done in kinds[:first_training] if done is not None]
    assert bytes_done[-1] == total and any(0 < done < total for done in bytes_done), bytes_done
    assert "log" in [kind for kind, _ in kinds[first_training:]]  # then it trained
    assert "step 1/1" in train_tab.live_view(run_dir.name, workspace)[0]


# `main.py train` for each model in one process (the Hub client is imported once): its exit status per model.
TRAIN_EACH = (
    "import json, sys, main\n"
    "from pathlib import Path\n"
    "data, workspace = sys.argv[1], sys.argv[2]\n"
    "for index, model in enumerate(sys.argv[3:]):\n"
    "    config = Path(workspace).parent / f'train-{index}.yaml'\n"
    "    config.write_text(json.dumps({'model': model, 'dataset': data}))\n"
    "    print(main.main(['--workspace', workspace, 'train', str(config)]), flush=True)\n"
)


def test_train_refuses_a_hub_id_no_job_could_fetch_before_a_run_exists(tiny_repo, tmp_path, workspace):
    import submit
    from workspace import UserError

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    models = ["not a model", "nobody/no-such-model", "meta-llama/Gated-1B"]
    with FakeHub() as hub:
        hub.add("meta-llama/Gated-1B", tiny_repo, gated=True)
        result = python(TRAIN_EACH, [str(data), str(workspace), *models], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2", "2"], result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    errors = dict(zip(models, lines, strict=True))  # one error line per model
    assert "'not a model' is neither a local folder nor a Hub id" in errors["not a model"]
    assert "There is no model 'nobody/no-such-model' on the Hub" in errors["nobody/no-such-model"]
    gated = errors["meta-llama/Gated-1B"]
    assert "is gated" in gated and f"{hub.url}/meta-llama/Gated-1B" in gated and "HF_TOKEN" in gated
    # This test's own process is offline (conftest), like a user's HF_HUB_OFFLINE=1, and its cache lacks the id.
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 keeps this app off the Hub. Unset HF_HUB_OFFLINE"):
        submit.submit("train", {"model": "tester/not-cached", "dataset": str(data)}, workspace)
    assert not (workspace / "runs").exists() or not list((workspace / "runs").iterdir())


def test_the_time_estimate_asks_for_a_download_instead_of_downloading(tmp_path, workspace):
    """The Train tab recomputes its time estimate on every change: it must not fetch gigabytes in the UI's thread."""
    import planning
    from train_config import train_config_from_dict
    from workspace import UserError

    config = train_config_from_dict({"model": "tester/not-cached", "dataset": str(tmp_path / "data.jsonl")})
    with pytest.raises(UserError, match="'tester/not-cached' is not downloaded yet. Click Download in the Model tab"):
        planning.time_estimate_text(config, workspace)


def test_the_memory_estimate_of_an_id_it_cannot_read_says_why(tmp_path, workspace):
    """Offline (this session) and not cached: the Model tab's estimate names the id and what to do, no traceback."""
    from train_config import train_config_from_dict
    from ui.model_tab import memory_estimate
    from workspace import UserError

    config = train_config_from_dict({"model": "tester/not-cached", "dataset": str(tmp_path / "data.jsonl")})
    # Download's own words, at once: offline, the id is neither cached nor reachable.
    with pytest.raises(
        UserError,
        match="The model 'tester/not-cached' is not in the local Hugging Face cache, and "
        "HF_HUB_OFFLINE=1 keeps this app off the Hub",
    ):
        memory_estimate(config, workspace)
