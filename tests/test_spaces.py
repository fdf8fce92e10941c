"""Hugging Face Spaces: the app started the way the Space's Dockerfile starts it (`python main.py`, no flags: host
0.0.0.0 and the port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, the login from the FINETUNER_AUTH secret,
SPACE_ID set by Spaces) applies the rules of a public link: every page and API route needs the login, file inputs
take uploads only, trust_remote_code is refused; the workspace goes to the Space's persistent storage."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import httpx
import pytest
from test_faults import AUTH, App
from test_shared_mode import Reached, no_launch  # noqa: F401  (no_launch is a fixture)
from test_shared_mode import test_every_file_input_refuses_a_server_path_posing_as_an_upload as check_file_inputs
from test_shared_mode import test_every_route_needs_the_login as check_every_route

import main
import ui
from model_utils import ModelConfig
from workspace import CONFINE_ENV, WORKSPACE_ENV, UserError

ROOT = Path(__file__).resolve().parent.parent
SPACE = "someone/llm-finetuner"


def space_environment(port: int) -> dict[str, str]:
    """What a Space's container holds: Spaces' SPACE_ID, the Dockerfile's ENV lines, the secret."""
    env = {key: value for key, value in os.environ.items() if key not in (CONFINE_ENV, WORKSPACE_ENV)}
    return {
        **env,
        "SPACE_ID": SPACE,
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": str(port),
        ui.AUTH_ENV: ":".join(AUTH),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }


class SpaceApp(App):
    """`python main.py` with no flags in a Space's environment; App's client, login and stop."""

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        # No /data here: the workspace stands where the Space's persistent storage would put it.
        return ["main.py"], {**space_environment(port), WORKSPACE_ENV: str(self.workspace)}


@pytest.fixture(scope="module")
def space_app(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("space") / "ws"
    workspace.mkdir()
    served = SpaceApp(workspace)
    served.start()
    yield served
    served.stop()


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket of this machine listens on at `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.slow
def test_a_space_serves_on_every_interface_at_its_port_and_every_route_needs_the_login(space_app):
    assert listening_addresses(space_app.port) == {"0.0.0.0"}
    check_every_route(space_app)
    # The page itself is the login form: no tab, no workspace path before logging in.
    page = httpx.get(space_app.url, timeout=30).text
    assert "Synthetic data" not in page and str(space_app.workspace) not in page
    assert str(space_app.workspace) in space_app.login().get("config").text


@pytest.mark.slow
def test_a_space_takes_uploads_only(space_app, tmp_path):
    check_file_inputs(space_app, tmp_path)


def test_a_space_without_the_login_secret_refuses_to_start(no_launch, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SPACE_ID", SPACE)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert main.main([]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "secret named FINETUNER_AUTH" in lines[0], lines


def test_a_space_refuses_an_open_server_even_when_asked(no_launch, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SPACE_ID", SPACE)
    with pytest.raises(UserError, match="needs a login"):
        ui.serve(host="0.0.0.0", insecure_no_auth=True)


def test_a_space_confines_paths_and_refuses_remote_code(no_launch, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("SPACE_ID", SPACE)
    monkeypatch.setenv(ui.AUTH_ENV, ":".join(AUTH))
    monkeypatch.setenv(CONFINE_ENV, "0")  # serve() sets it; monkeypatch puts this value back afterwards
    with pytest.raises(Reached):
        main.main(["--workspace", str(tmp_path)])
    assert os.environ[CONFINE_ENV] == "1"
    with pytest.raises(UserError, match="trust_remote_code"):
        ModelConfig(name_or_path="someone/custom", trust_remote_code=True).validate()


def test_the_workspace_goes_to_the_spaces_persistent_storage(monkeypatch, tmp_path):
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setattr(ui, "SPACE_STORAGE", tmp_path / "data")
    assert ui.space_workspace() is None  # not a Space
    monkeypatch.setenv("SPACE_ID", SPACE)
    assert ui.space_workspace() is None  # a Space without persistent storage: the container's ./workspace
    (tmp_path / "data").mkdir()
    assert ui.space_workspace() == tmp_path / "data" / "workspace"
    assert os.environ["HF_HOME"] == str(tmp_path / "data" / "huggingface")
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "chosen"))
    assert ui.space_workspace() is None  # a workspace set in the Space's variables wins


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    block, _, _ = text[4:].partition("\n---\n")
    return dict(line.split(": ", 1) for line in block.splitlines() if line.strip())


def test_readme_front_matter_and_dockerfile_agree_on_the_space(tmp_path):
    settings = front_matter()
    assert settings["sdk"] == "docker"
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"GRADIO_SERVER_PORT={settings['app_port']}" in dockerfile
    assert "GRADIO_SERVER_NAME=0.0.0.0" in dockerfile
    assert re.search(r'^CMD \["python", "main.py"\]$', dockerfile, re.M)
    assert "fetch_converter.py" in dockerfile  # the export's converter is unpacked in the image
    # What a reader sees first, after the front matter: the title, one line, then the two set-up commands.
    visible = (ROOT / "README.md").read_text(encoding="utf-8").split("\n---\n", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", visible, re.S).group(1).splitlines()
    assert [line.split()[:2] for line in commands] == [["make", "run"], ["make", "test"]]
    assert visible.index("```bash") < visible.index("\n## ")
