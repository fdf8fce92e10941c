"""What a shared app promises (docs/RELIABILITY.md, "Security"): only uploaded files are read, trust_remote_code is
refused, and the server refuses to start where it would be open without a login or cannot bind.

The HTTP checks run against one app served as a user serves a shared one (`python main.py --auth USER:PASS` with the
workspace confined), through its own endpoints."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import App

import main
import ui
import workspace
from model_utils import ModelConfig
from ui import common
from workspace import CONFINE_ENV, UserError

ROOT = Path(__file__).resolve().parent.parent
SECRET = '{"text": "server-only secret row"}\n'
FILE_COMPONENTS = {"File", "Uploadbutton", "Files"}


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("shared") / "ws"
    workspace.mkdir()
    served = App(workspace)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFINE_ENV, "1")  # what --share sets; a share link cannot be made offline
        served.start()
    yield served
    served.stop()


def file_inputs(client) -> list[tuple[str, int, list[dict]]]:
    """(api name, index of the file parameter, parameters) of every endpoint that takes a file input."""
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    return [
        (name, index, info["parameters"])
        for name, info in endpoints.items()
        for index, parameter in enumerate(info["parameters"])
        if parameter["component"] in FILE_COMPONENTS
    ]


def forged_payloads(path: Path) -> list:
    """A server path dressed as an upload: a FileData dict (with and without Gradio's marker) and a bare string."""
    marked = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
    bare = {"path": str(path), "orig_name": path.name}
    return [marked, bare, str(path)]


def call(session, api_name: str, args: list) -> str:
    """The event stream of one API call over plain HTTP (what a script holding the login cookie can send)."""
    name = api_name.lstrip("/")
    started = session.post(f"gradio_api/call/{name}", json={"data": args})
    assert started.status_code == 200, started.text
    return session.get(f"gradio_api/call/{name}/{started.json()['event_id']}").text


@pytest.mark.slow
def test_every_route_needs_the_login(shared_app):
    import httpx

    data = shared_app.workspace / "mine.jsonl"
    data.write_text('{"text": "workspace row"}\n', encoding="utf-8")
    endpoints = shared_app.client().view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert len(endpoints) > 10, endpoints
    anonymous = httpx.Client(base_url=shared_app.url, timeout=30)
    for name in endpoints:
        response = anonymous.post(f"gradio_api/call/{name.lstrip('/')}", json={"data": []})
        assert response.status_code in (401, 403), (name, response.status_code)
    for route in ("config", "gradio_api/info", f"gradio_api/file={data}", "gradio_api/upload"):
        response = anonymous.request("POST" if route.endswith("upload") else "GET", route)
        assert response.status_code in (401, 403), (route, response.status_code)
        assert "workspace row" not in response.text


@pytest.mark.slow
def test_every_file_input_refuses_a_server_path_posing_as_an_upload(shared_app, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(SECRET, encoding="utf-8")
    client = shared_app.client()
    inputs = file_inputs(client)
    assert {parameter[index]["label"] for _, index, parameter in inputs} >= {
        "Upload a data file",
        "Documents (TXT, MD, PDF) for the documents task",
    }, inputs
    session = shared_app.login()
    for api_name, index, parameters in inputs:
        multiple = "list" in json.dumps(parameters[index]["python_type"]).lower()
        for payload in forged_payloads(secret):
            args = [parameter.get("parameter_default") for parameter in parameters]
            args[index] = [payload] if multiple else payload
            stream = call(session, api_name, args)
            assert "event: error" in stream, (api_name, payload, stream)
            assert "server-only secret row" not in stream
    uploads = shared_app.workspace / "uploads"
    copied = [path for path in uploads.rglob("*") if path.is_file() and SECRET in path.read_text(errors="replace")]
    assert copied == [], copied


@pytest.mark.slow
def test_a_real_upload_through_the_client_is_kept_in_uploads(shared_app, tmp_path):
    from gradio_client import handle_file

    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "uploaded row"}\n', encoding="utf-8")
    client = shared_app.client()
    (api_name, _, _) = next(item for item in file_inputs(client) if item[2][item[1]]["label"] == "Upload a data file")
    saved = Path(client.predict(handle_file(str(data)), api_name=api_name))
    assert saved.parent == shared_app.workspace.resolve() / "uploads", saved
    assert saved.read_text(encoding="utf-8") == data.read_text(encoding="utf-8")


def test_save_upload_refuses_a_file_outside_gradios_upload_folder(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    outside = tmp_path / "server.jsonl"
    outside.write_text(SECRET, encoding="utf-8")
    with pytest.raises(UserError, match="Upload the file"):
        common.save_upload(outside, workspace)
    escape = tmp_path / "gradio" / "abc" / "escape.jsonl"
    escape.parent.mkdir(parents=True)
    escape.symlink_to(outside)
    with pytest.raises(UserError, match="Upload the file"):
        common.save_upload(escape, workspace)
    assert not (workspace / "uploads").exists() or not any((workspace / "uploads").iterdir())


def test_save_upload_keeps_a_file_from_gradios_upload_folder(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    uploaded = tmp_path / "gradio" / "abc" / "data.jsonl"
    uploaded.parent.mkdir(parents=True)
    uploaded.write_text("one\n", encoding="utf-8")
    assert common.save_upload(uploaded, workspace).read_text(encoding="utf-8") == "one\n"


def test_trust_remote_code_is_refused_when_shared(monkeypatch):
    monkeypatch.setenv(CONFINE_ENV, "1")
    ModelConfig(name_or_path="someone/custom").validate()
    with pytest.raises(UserError, match="trust_remote_code"):
        ModelConfig(name_or_path="someone/custom", trust_remote_code=True).validate()


class Reached(Exception):
    """Raised in place of building the app: serving got past every refusal."""


@pytest.fixture
def no_launch(monkeypatch):
    """serve() stops where it would build and launch the app; FINETUNER_AUTH is unset, and the confinement serve()
    turns on for a non-loopback host is put back off afterwards."""
    monkeypatch.delenv(ui.AUTH_ENV, raising=False)
    monkeypatch.setenv(CONFINE_ENV, "0")
    monkeypatch.setattr(ui, "_import_libraries", lambda: None)

    def build_app(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(ui, "build_app", build_app)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_a_non_loopback_host_without_a_login_is_refused(host, no_launch, tmp_path, capsys):
    assert main.main(["--host", host, "--workspace", str(tmp_path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error:") and "--auth" in lines[0], lines


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_host_needs_no_login(host, no_launch, tmp_path):
    with pytest.raises(Reached):
        main.main(["--host", host, "--workspace", str(tmp_path)])


def test_insecure_no_auth_serves_openly_and_says_so(no_launch, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ui"), pytest.raises(Reached):
        main.main(["--host", "0.0.0.0", "--insecure-no-auth", "--workspace", str(tmp_path)])
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(lines) == 1 and "without a login" in lines[0] and "\n" not in lines[0], lines


def test_a_non_loopback_host_with_a_login_is_served(no_launch, tmp_path, monkeypatch):
    auth_file = tmp_path / "auth"
    auth_file.write_text("ana:secret\n", encoding="utf-8")
    with pytest.raises(Reached):
        main.main(["--host", "0.0.0.0", "--auth-file", str(auth_file), "--workspace", str(tmp_path)])


@pytest.fixture
def confinement_seen(no_launch, monkeypatch):
    """Whether paths were confined when serve() reached the app (no_launch starts it off and restores it)."""
    seen = []

    def build_app(*args, **kwargs):
        seen.append(workspace.paths_confined())
        raise Reached

    monkeypatch.setattr(ui, "build_app", build_app)
    return seen


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "my-machine.lan"])
def test_a_non_loopback_host_confines_paths(host, confinement_seen, tmp_path):
    auth_file = tmp_path / "auth"
    auth_file.write_text("ana:secret\n", encoding="utf-8")
    with pytest.raises(Reached):
        main.main(["--host", host, "--auth-file", str(auth_file), "--workspace", str(tmp_path / "ws")])
    assert confinement_seen == [True]
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.resolve_user_path("/etc/hostname")


def test_an_open_non_loopback_host_confines_paths_too(confinement_seen, tmp_path):
    with pytest.raises(Reached):
        main.main(["--host", "0.0.0.0", "--insecure-no-auth", "--workspace", str(tmp_path)])
    assert confinement_seen == [True]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_host_does_not_confine_paths(host, confinement_seen, tmp_path):
    with pytest.raises(Reached):
        main.main(["--host", host, "--workspace", str(tmp_path)])
    assert confinement_seen == [False]


def test_auth_is_read_from_a_file(tmp_path):
    auth_file = tmp_path / "auth"
    auth_file.write_text("ana:pa:ss\n", encoding="utf-8")
    assert ui.parse_auth(None, auth_file) == ("ana", "pa:ss")


@pytest.mark.parametrize("content", ["", "ana\n", "ana:\n"])
def test_an_auth_file_without_user_and_password_is_refused(content, tmp_path):
    auth_file = tmp_path / "auth"
    auth_file.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="USER:PASS"):
        ui.parse_auth(None, auth_file)


def test_a_missing_auth_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="Cannot read the --auth-file"):
        ui.parse_auth(None, tmp_path / "missing")


def test_auth_and_auth_file_together_are_refused(tmp_path):
    auth_file = tmp_path / "auth"
    auth_file.write_text("ana:secret\n", encoding="utf-8")
    with pytest.raises(UserError, match="not both"):
        ui.parse_auth("bo:secret", auth_file)


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_port_out_of_range_is_one_error_line(port, no_launch, tmp_path, capsys):
    assert main.main(["--port", port, "--workspace", str(tmp_path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error:") and "--port" in lines[0], lines


@pytest.mark.slow
def test_a_port_in_use_is_one_error_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "main.py", "--port", str(port), "--workspace", str(tmp_path / "ws")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: Port {port}" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_a_null_run_name_through_the_api_is_a_blank_name_not_a_crash(shared_app):
    client = shared_app.client()
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    starts = {
        name: info["parameters"]
        for name, info in endpoints.items()
        if any(parameter["label"] == "Run name" for parameter in info["parameters"])
    }
    assert len(starts) == 4, list(starts)  # Train, Synthetic data, Arena and Benchmarks
    session = shared_app.login()
    for api_name, parameters in starts.items():
        args = [None if p["label"] == "Run name" else p.get("parameter_default") for p in parameters]
        stream = call(session, api_name, args)
        assert "Something went wrong" not in stream and "AttributeError" not in stream, (api_name, stream)
