"""Pushing a run to the Hub through the real huggingface_hub client against tests/fake_hub.py (its whoami, create,
preupload, LFS batch and commit endpoints): the files, the model card made from the run, progress in bytes, a second
push that skips what the repo holds, and each refusal — no token, a read-only token, someone else's namespace, a name
the Hub refuses, no network — as one message before any upload."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, user
from test_ui_browser import browser  # noqa: F401 (the browser fixture, for the Export tab's panel)

import hub_push
import runfolder
from conftest import ROOT, capital_rows, family_config, write_jsonl
from workspace import UserError

UPLOADS = ("POST /api/repos/create", "/preupload/", "/info/lfs/objects/batch", "PUT /lfs-upload/", "/commit/")


@pytest.fixture(scope="module")
def pushable(family_model, tmp_path_factory) -> Path:
    """A workspace with a finished 2-step LoRA run of a tiny Llama ("tiny", an eval loss logged) and its q8_0 GGUF
    export (report.json with the agreement figure)."""
    import gguf_utils
    import jobs
    import training_utils
    from workspace import config_to_dict

    workspace = tmp_path_factory.mktemp("push-ws")
    previous = os.environ.get("FINETUNER_WORKSPACE")
    os.environ["FINETUNER_WORKSPACE"] = str(workspace)
    try:
        folder, template = family_model("llama")
        data = write_jsonl(workspace / "capitals.jsonl", capital_rows(8))
        config = family_config(folder, data, template, eval_steps=1, eval_split=0.25)
        run_dir = jobs.create_run("train", config_to_dict(config), workspace, "tiny")
        training_utils.train(config, runfolder.JobContext.for_run(run_dir))
        runfolder.write_status(run_dir, state="done")
        export = gguf_utils.ExportConfig(
            run="tiny", quants=["q8_0"], check_prompts=gguf_utils.MIN_CHECK_PROMPTS, check_tokens=2
        )
        export_dir = jobs.create_run("export", config_to_dict(export), workspace)
        assert gguf_utils.export_job(export, runfolder.JobContext.for_run(export_dir)) == "done"
    finally:
        if previous is None:
            os.environ.pop("FINETUNER_WORKSPACE", None)
        else:
            os.environ["FINETUNER_WORKSPACE"] = previous
    return workspace


def push_cli(args: list[str], hub_url: str, home: Path, workspace: Path, **env: str) -> subprocess.CompletedProcess:
    """`main.py push` in a process of its own: the client reads HF_ENDPOINT when imported (this session is offline)."""
    clean = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--workspace", str(workspace), "push", *args],
        env={**clean, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def push_runs(workspace: Path) -> list[Path]:
    return sorted(path for path in (workspace / "runs").iterdir() if path.name.startswith("push-"))


@pytest.mark.slow  # two push jobs through the CLI, each a process of its own: ~25 s
def test_push_uploads_the_files_and_a_card_and_a_second_push_skips_them(pushable, tmp_path):
    run_dir = pushable / "runs" / "tiny"
    with FakeHub(users={"tok-alice": user("alice")}, storage=tmp_path / "hub") as hub:
        done = push_cli(
            ["tiny", "--repo", "alice/tiny-capitals", "--what", "adapter,gguf", "--private"],
            hub.url,
            tmp_path / "hf",
            pushable,
            HF_TOKEN="tok-alice",
        )
        assert done.returncode == 0, done.stdout + done.stderr + "\n".join(hub.requests)
        repo = hub.repos[("model", "alice/tiny-capitals")]
        assert repo.extra_info["private"] is True
        pushed = {path.relative_to(repo.folder).as_posix() for path in repo.files()}
        gguf = "tiny-q8_0.gguf"
        assert {"adapter_model.safetensors", "adapter_config.json", gguf, "Modelfile", "README.md"} <= pushed
        assert "loss_curve.png" in pushed
        for name, local in (("adapter_model.safetensors", run_dir / "adapter"), (gguf, run_dir / "gguf")):
            assert (repo.folder / name).read_bytes() == (local / name).read_bytes()
        # Weights went through the LFS upload, the small files inline in the commit.
        assert len(hub.lfs_uploads) == 2 and len(hub.commits) == 1

        card = (repo.folder / "README.md").read_text(encoding="utf-8")
        header = card.split("---")[1]
        assert "library_name: peft" in header and "- gguf" in header and "pipeline_tag: text-generation" in header
        report = json.loads((run_dir / "gguf" / "report.json").read_text())
        assert f"| {gguf} | q8_0 |" in card and f"{100 * report['files'][0]['agreement']:.1f} %" in card
        losses = [e.metrics["loss"] for e in runfolder.read_events(run_dir) if "loss" in e.metrics]
        assert f"final training loss: {losses[-1]:.4f}" in card and "final eval loss" in card
        assert "8 rows: 6 train, 2 held out" in card
        assert "llama-cli -hf alice/tiny-capitals:Q8_0" in card and "ollama run hf.co/alice/tiny-capitals:Q8_0" in card
        assert 'PeftModel.from_pretrained(base, "alice/tiny-capitals")' in card

        (first,) = push_runs(pushable)
        events = [e for e in runfolder.read_events(first) if "bytes_total" in e.metrics]
        total = sum((repo.folder / name).stat().st_size for name in pushed)
        assert events[-1].metrics["bytes_done"] == events[-1].metrics["bytes_total"] == total
        assert json.loads((first / "push.json").read_text())["skipped"] == []

        # Pushing again (a re-run after a stop, say) sends nothing the repo holds with the same content.
        again = push_cli(
            ["tiny", "--repo", "alice/tiny-capitals", "--what", "adapter,gguf"],
            hub.url,
            tmp_path / "hf",
            pushable,
            HF_TOKEN="tok-alice",
        )
        assert again.returncode == 0, again.stdout + again.stderr
        second = push_runs(pushable)[-1]
        result = json.loads((second / "push.json").read_text())
        assert result["uploaded"] == [] and sorted(result["skipped"]) == sorted(pushed)
        assert len(hub.lfs_uploads) == 2 and len(hub.commits) == 1

    from ui import push_panel  # the Export tab's panel reads the newest push of the run

    status, result, *_ = push_panel.push_view("tiny", pushable)
    assert "push-tiny" in status and "alice/tiny-capitals" in result and "already there" in result

    # merged/ exists only after an export of a LoRA run (this one's export kept it) or for a full fine-tune.
    model = hub_push.push_source(hub_push.PushConfig(run=str(run_dir), repo_id="alice/x"))
    assert "model.safetensors" in hub_push.plan_files(model, ["merged", "adapter"])
    assert "adapter/adapter_config.json" in hub_push.plan_files(model, ["merged", "adapter"])


@pytest.fixture
def online(monkeypatch, tmp_path):
    """This process's huggingface_hub, online, with no saved token: a test sets HF_TOKEN and the endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return monkeypatch


def refusal(monkeypatch, endpoint: str, repo_id: str = "alice/tiny-capitals") -> str:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(UserError) as caught:
        hub_push.check_destination(repo_id)
    return str(caught.value)


@pytest.mark.parametrize(
    "token, repo_id, expected",
    [
        (None, "alice/tiny-capitals", "No Hugging Face token"),
        ("tok-reader", "alice/tiny-capitals", "cannot write"),
        ("tok-alice", "bob/tiny-capitals", "belongs to 'bob'"),
        ("tok-alice", "acme/tiny-capitals", "belongs to 'acme'"),  # an organization where alice only reads
        ("tok-bogus", "alice/tiny-capitals", "does not accept this token"),
        ("tok-alice", "alice/bad--name", "refuses the repo id"),
        ("tok-alice", "alice/name.git", "refuses the repo id"),
        ("tok-alice", "alice/" + "x" * 97, "refuses the repo id"),
        ("tok-alice", "tiny-capitals", "OWNER/NAME"),
    ],
)
def test_each_problem_is_one_message_before_any_upload(online, tmp_path, token, repo_id, expected):
    users = {"tok-alice": user("alice", {"acme": "read", "team": "write"}), "tok-reader": user("alice", role="read")}
    with FakeHub(users=users, storage=tmp_path / "hub") as hub:
        if token:
            online.setenv("HF_TOKEN", token)
        message = refusal(online, hub.url, repo_id)
    assert expected in message, message
    assert not [request for request in hub.requests if any(part in request for part in UPLOADS)]


def test_the_users_own_namespace_and_an_organization_it_writes_to_are_accepted(online, tmp_path):
    from huggingface_hub import constants

    with FakeHub(users={"tok-alice": user("alice", {"team": "write"})}, storage=tmp_path / "hub") as hub:
        online.setenv("HF_TOKEN", "tok-alice")
        online.setattr(constants, "ENDPOINT", hub.url)
        assert hub_push.check_destination("team/capitals") == "alice"
        assert hub_push.check_destination("alice/capitals") == "alice"


def test_no_network_is_one_message(online):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    online.setenv("HF_TOKEN", "tok-alice")
    message = refusal(online, f"http://127.0.0.1:{port}")
    assert "cannot be reached" in message and "Nothing was uploaded" in message


def test_parts_are_checked_by_name():
    with pytest.raises(UserError, match="Unknown part"):
        hub_push.PushConfig(run="tiny", repo_id="alice/x", what="adapter,weights").validate()
    with pytest.raises(UserError, match="twice"):
        hub_push.PushConfig(run="tiny", repo_id="alice/x", what="gguf,gguf").validate()
    assert hub_push.PushConfig(run="tiny", repo_id="alice/x", what="adapter, GGUF").what == ["adapter", "gguf"]


def test_a_push_that_failed_or_stopped_resumes_without_sending_stored_files_again(online, tmp_path):
    from huggingface_hub import constants

    files = {"config.json": tmp_path / "config.json", "model.safetensors": tmp_path / "model.safetensors"}
    files["config.json"].write_text('{"model_type": "llama"}')
    files["model.safetensors"].write_bytes(os.urandom(300_000))
    reports: list[tuple[int, int, float]] = []
    with FakeHub(users={"tok-alice": user("alice")}, storage=tmp_path / "hub") as hub:
        online.setenv("HF_TOKEN", "tok-alice")
        online.setattr(constants, "ENDPOINT", hub.url)
        # Stopped at the first bytes read for the upload: nothing is committed.
        with pytest.raises(hub_push.Stopped):
            hub_push.upload("alice/resume", files, False, "first", lambda *args: None, stop=lambda: True)
        assert hub.commits == []
        # The weights reach the Hub's storage, then the commit fails (an outage): one message, nothing committed.
        hub.fail_commits = 1
        with pytest.raises(UserError, match="refused the upload"):
            hub_push.upload("alice/resume", files, False, "second", lambda *args: None)
        assert len(hub.lfs_uploads) == 1 and hub.commits == []
        # Pushing again commits both files without sending the stored weights again.
        result = hub_push.upload("alice/resume", files, False, "third", lambda *args: reports.append(args))
    assert len(hub.lfs_uploads) == 1 and hub.commits == [["config.json", "model.safetensors"]]
    assert sorted(result["uploaded"]) == sorted(files) and result["skipped"] == []
    repo = hub.repos[("model", "alice/resume")].folder
    assert (repo / "model.safetensors").read_bytes() == files["model.safetensors"].read_bytes()
    assert reports[0][:2] == (0, result["bytes_uploaded"]) and reports[-1][0] == reports[-1][1]
    assert any(0 < done < total and rate > 0 for done, total, rate in reports)  # counted as the client reads


@pytest.fixture(scope="module")
def push_app(family_model, tmp_path_factory):
    """The app online with a finished tiny run, its Hub a local fake where the token HF_TOKEN=tok-alice is alice's."""
    from test_ui_browser import serve_app

    import jobs
    import training_utils
    from workspace import config_to_dict

    workspace = tmp_path_factory.mktemp("push-app")
    folder, template = family_model("llama")
    data = write_jsonl(workspace / "capitals.jsonl", capital_rows(8))
    config = family_config(folder, data, template)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNER_WORKSPACE", str(workspace))
        run_dir = jobs.create_run("train", config_to_dict(config), workspace, "tiny")
        training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    with FakeHub(users={"tok-alice": user("alice")}, storage=workspace.parent / "push-app-hub") as hub:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": "tok-alice"}
        for app in serve_app(workspace, {**env, "HF_HOME": str(workspace.parent / "push-app-home")}):
            yield app, hub


@pytest.mark.browser
@pytest.mark.slow  # the app, a browser and a push job: ~1 min
@pytest.mark.timeout(600)
def test_a_person_pushes_a_run_from_the_export_tab(browser, push_app):  # noqa: F811 (the imported fixture)
    from test_ui_browser import open_tab, type_into, wait_text

    app, hub = push_app
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app.url)
    page.wait_for_selector("#tab-model-button")
    open_tab(page, "export")
    page.wait_for_function("() => document.querySelector('#export-run input')?.value === 'tiny'")
    type_into(page, "push-repo", "alice/tiny-from-the-tab")
    page.click("#push-start")
    wait_text(page, "push-status", "done", timeout=300_000)
    wait_text(page, "push-result", "Pushed to")
    assert "alice/tiny-from-the-tab" in page.inner_text("#push-result")
    repo = hub.repos[("model", "alice/tiny-from-the-tab")].folder
    assert (repo / "adapter_model.safetensors").exists() and (repo / "README.md").exists()

    # Someone else's namespace: one readable message, and no job.
    type_into(page, "push-repo", "bob/not-mine")
    page.click("#push-start")
    page.wait_for_selector(".toast-body:has-text(\"belongs to 'bob'\")")
    context.close()


def test_the_card_carries_the_runs_benchmark_table(tmp_path):
    import benchmark
    import benchmark_report
    import model_card

    def harness_result(accuracy: float) -> dict:  # the shape of lm-eval's simple_evaluate result for one task
        return {
            "results": {"capitals_mc": {"acc,none": accuracy, "acc_stderr,none": 0.125, "alias": "capitals_mc"}},
            "higher_is_better": {"capitals_mc": {"acc": True}},
            "n-samples": {"capitals_mc": {"original": 16, "effective": 16}},
        }

    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    assert model_card.benchmark_lines(run_dir) == []  # no benchmark yet: no section
    scored = {"base": {"capitals_mc": harness_result(0.4375)}, "tuned": {"capitals_mc": harness_result(0.5)}}
    table = benchmark.benchmark_table(scored, run="tiny", base_model="demo", limit=16)
    (run_dir / benchmark_report.RESULT_FILE).write_text(json.dumps(table))
    text = "\n".join(model_card.benchmark_lines(run_dir))
    assert "| task | metric | rows | base | tuned | tuned − base |" in text
    assert "| capitals_mc | acc ↑ | 16 | 0.4375 ± 0.1250 | 0.5000 ± 0.1250 | +0.0625 |" in text
