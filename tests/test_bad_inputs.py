"""The bad-input corpus (tests/bad_inputs/cases*.yaml): every case goes through the function the UI and the CLI call,
must be refused with a message that names the problem, and must leave every file of the workspace as it was."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

import dataset_utils
import jobs
import main
import model_utils
import runfolder
import submit
import synthetic_utils
from train_config import train_config_from_dict
from workspace import CONFINE_ENV, UserError

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
# cases.yaml, then one file per area (cases_<area>.yaml), all in one list.
CASES: list[dict[str, Any]] = [
    case
    for path in sorted(CORPUS.glob("cases*.yaml"))
    for case in yaml.safe_load(path.read_text(encoding="utf-8")) or []
]
ERROR_LINE = re.compile(r"(^|: )error: ")
CPU = model_utils.Device(cuda=False, gpu_count=0, names=(), bf16=False)


# ---------------------------------------------------------------- one function per entry point


def call_dataset(args: dict, ctx: dict) -> None:
    tokenizer = ctx["tokenizer"]
    template = tokenizer.chat_template  # a case may set a broken template on the shared tokenizer
    try:
        dataset_utils.prepare_dataset(
            dataset_utils.DatasetConfig(**args["config"]),
            tokenizer,
            max_seq_length=args.get("max_seq_length", 64),
            eval_split=args.get("eval_split", 0.0),
            workspace=ctx["ws"],
        )
    finally:
        tokenizer.chat_template = template


def call_upload(args: dict, ctx: dict) -> None:
    from ui.common import save_upload

    # Gradio hands the handler its own temporary copy of the browser's file.
    source = CORPUS / "files" / ctx["case"]["file"]
    browser_copy = ctx["tmp"] / "gradio-upload" / source.name
    browser_copy.parent.mkdir()
    shutil.copy(source, browser_copy)
    # save_upload takes only files from Gradio's upload folder; here that is this case's folder.
    with mock.patch.dict(os.environ, {"GRADIO_TEMP_DIR": str(browser_copy.parent)}):
        saved = save_upload(browser_copy, ctx["ws"])
    ctx["expected_new"] = {str(saved.relative_to(ctx["ws"])): sha256(browser_copy)}
    dataset_utils.load_rows(dataset_utils.DatasetConfig(source=str(saved)), ctx["ws"])


def call_train_config(args: dict, ctx: dict) -> None:
    train_config_from_dict(args).validate(device=CPU)


def call_model(args: str, ctx: dict) -> None:
    model_utils.resolve_model_path(args, ctx["ws"])


def call_run_name(args: dict, ctx: dict) -> None:
    jobs.create_run(args["kind"], {}, ctx["ws"], args["name"])


def call_resume(args: str, ctx: dict) -> None:
    submit.resume(args, ctx["ws"])


def call_stop(args: str, ctx: dict) -> None:
    submit.stop(args, ctx["ws"])


def call_preset(args: dict, ctx: dict) -> None:
    if "save" in args:
        model_utils.save_preset(args["save"], {"lora_r": 8}, ctx["ws"])
    else:
        model_utils.load_preset(args["load"], ctx["ws"])


def call_export(args: dict, ctx: dict) -> None:
    submit.submit("export", args, ctx["ws"])


def call_submit(args: dict, ctx: dict) -> None:
    submit.submit(args["kind"], args["config"], ctx["ws"])


def call_synth_config(args: dict, ctx: dict) -> None:
    synthetic_utils.synthetic_config_from_dict(args).validate(ctx["ws"])


def call_synth_reply(args: dict, ctx: dict) -> None:
    synthetic_utils.parse_reply(args["reply"], synthetic_utils.SyntheticConfig(**args["config"]))


def call_synth_server(args: dict, ctx: dict) -> None:
    from fake_llm_servers import FakeLLMServer

    out_dir = ctx["tmp"] / "synth-out"
    server = FakeLLMServer(**args["server"]).start() if "server" in args else None
    try:
        base_url = server.openai_url if server else ""
        config = synthetic_utils.SyntheticConfig(**fill(args["config"], {"base_url": base_url}))
        config.backoff_s = 0.01
        try:
            synthetic_utils.generate(config, out_dir, api_key=args.get("api_key", "sk-local"))
        finally:
            data = out_dir / synthetic_utils.DATA_FILE
            assert not data.exists() or data.read_bytes() == b"", "a refused generation wrote rows"
    finally:
        if server is not None:
            server.stop()


def call_cli(args: list[str], ctx: dict) -> None:
    argv = ["--workspace", str(ctx["ws"]), *args]
    if ctx["case"].get("subprocess"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(
            [sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
        )
        code, stderr = result.returncode, result.stderr
    else:
        capsys = ctx["capsys"]
        capsys.readouterr()
        try:
            code = main.main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        stderr = capsys.readouterr().err
    assert code not in (0, None), f"exit code {code}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if ERROR_LINE.search(line)]
    assert len(error_lines) == 1, stderr
    raise UserError(stderr[stderr.index(error_lines[0]) :])  # the message checked like the others


ENTRIES = {
    "dataset": call_dataset,
    "upload": call_upload,
    "train_config": call_train_config,
    "model": call_model,
    "run_name": call_run_name,
    "resume": call_resume,
    "stop": call_stop,
    "preset": call_preset,
    "export": call_export,
    "submit": call_submit,
    "synth_config": call_synth_config,
    "synth_reply": call_synth_reply,
    "synth_server": call_synth_server,
    "cli": call_cli,
}


# ---------------------------------------------------------------- the workspace, before and after


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: files by size, modification time and hash; links by target (never followed)."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = ("dir",)
            else:
                stat = path.stat()
                entries[key] = ("file", stat.st_size, stat.st_mtime_ns, sha256(path))
    return entries


def fill(value: Any, names: dict[str, str]) -> Any:
    """The case's input with {ws}, {outside}, {file}, {base_url} replaced, in every string it holds."""
    if isinstance(value, str):
        for name, text in names.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [fill(item, names) for item in value]
    if isinstance(value, dict):
        return {fill(key, names): fill(item, names) for key, item in value.items()}
    return value


def prepare(case: dict, ws: Path, outside: Path, demo_model: Path) -> dict[str, str]:
    """The case's files, links and runs; returns the placeholders for its input."""
    (ws / "models").mkdir(exist_ok=True)
    (ws / "models" / demo_model.name).symlink_to(demo_model)
    names = {"ws": str(ws), "outside": str(outside), "long": "a" * 5000}
    if "file" in case and case["entry"] != "upload":  # an upload comes from the browser, not the workspace
        source = CORPUS / "files" / case["file"]
        target = ws / "data" / source.name
        target.parent.mkdir(exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        names["file"] = str(target)
    setup = case.get("setup", {})
    for name, text in setup.get("outside", {}).items():
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_text(text, encoding="utf-8")
    for link, target in setup.get("symlinks", {}).items():
        (ws / link).parent.mkdir(parents=True, exist_ok=True)
        (ws / link).symlink_to(fill(target, names))
    for run in setup.get("runs", []):
        run_dir = jobs.create_run(run["kind"], {}, ws, run["name"])
        runfolder.write_status(run_dir, state=run["state"])
        for name, text in run.get("files", {}).items():
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text(text, encoding="utf-8")
        for name, target in run.get("links", {}).items():
            (run_dir / name).symlink_to(fill(target, names))
    return names


# ---------------------------------------------------------------- the test


def test_the_corpus_covers_every_entry_point():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 40
    assert {case["entry"] for case in CASES} == set(ENTRIES)
    for case in CASES:
        if "file" in case:
            assert (CORPUS / "files" / case["file"]).exists(), case["id"]


# Every case has a time limit: some render a chat template or match a pattern, which are programs. The "thread"
# method ends the run even while a case holds the interpreter in C code (where the "signal" method's handler waits).
@pytest.mark.timeout(400, method="thread")
@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(
    case, workspace, tmp_path, demo_model, demo_tokenizer, monkeypatch, capsys
):
    outside = tmp_path / "outside"
    outside.mkdir()
    names = prepare(case, workspace, outside, demo_model)
    if case.get("shared"):
        monkeypatch.setenv(CONFINE_ENV, "1")
    for key, value in case.get("env", {}).items():
        monkeypatch.setenv(key, fill(value, names))
    ctx = {
        "ws": workspace,
        "tmp": tmp_path,
        "tokenizer": demo_tokenizer,
        "capsys": capsys,
        "case": case,
        "expected_new": {},
    }
    before = snapshot(workspace)

    expected_error = synthetic_utils.Rejected if case["entry"] == "synth_reply" else UserError
    with pytest.raises(expected_error) as raised:
        ENTRIES[case["entry"]](fill(case.get("input"), names), ctx)

    message = str(raised.value)
    assert case["expect"].lower() in message.lower(), f"{case['id']}: {message!r}"
    assert "Traceback" not in message
    after = snapshot(workspace)
    assert {key: after.get(key) for key in before if before[key] != after.get(key)} == {}, "files changed or went away"
    # Only an upload leaves something: the user's file, whole, in uploads/.
    added = {key: entry[-1] if entry[0] == "file" else entry[0] for key, entry in after.items() if key not in before}
    expected = {**{str(Path(key).parent): "dir" for key in ctx["expected_new"]}, **ctx["expected_new"]}
    assert added == expected, "files were left in the workspace"
