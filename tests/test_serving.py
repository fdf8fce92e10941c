"""A run as an OpenAI-compatible endpoint, called with the official openai client: its GGUF through llama-cpp-python's
server and its transformers model through our own app; streaming and not, a wrong key refused, a second serve of the
same run reusing the first, bad input refused before anything starts."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served_run(trained_run, workspace) -> Path:
    """A copy of the trained run in this test's workspace, with the demo model's GGUF in its gguf/ folder (the
    export's place; a real file that llama.cpp loads)."""
    import model_utils

    run_dir = workspace / "runs" / "served"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "*.json.tmp"))
    (run_dir / "gguf").mkdir(exist_ok=True)
    (run_dir / "gguf" / "served-q4_1.gguf").symlink_to(model_utils.demo_gguf_path())
    models = workspace / "models"
    models.mkdir(exist_ok=True)
    (models / model_utils.DEMO_DIR_NAME).symlink_to(model_utils.demo_model_dir(trained_run.parent.parent))
    return run_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_endpoint(endpoint, key: str) -> None:
    """The openai client against it: the model listed, a reply streamed and not (the same, greedy), a wrong key
    refused."""
    import openai

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0, timeout=120)
    assert [model.id for model in client.models.list().data] == [endpoint.model]
    reply = client.chat.completions.create(model=endpoint.model, messages=PROMPT, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert text.strip()
    chunks = client.chat.completions.create(
        model=endpoint.model, messages=PROMPT, max_tokens=16, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([piece for piece in pieces if piece]) > 1  # streamed in pieces, not one block
    assert "".join(pieces) == text
    wrong = openai.OpenAI(base_url=endpoint.base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=endpoint.model, messages=PROMPT, max_tokens=4)


def test_the_gguf_endpoint_answers_the_openai_client_and_a_second_serve_reuses_it(served_run, workspace, capsys):
    import main
    import serving

    port = free_port()
    endpoint = serving.start_endpoint("served", workspace, port=port, api_key="sekret", timeout=120)
    try:
        assert endpoint.backend == "llama.cpp" and endpoint.base_url == f"http://127.0.0.1:{port}/v1"
        check_endpoint(endpoint, "sekret")
        again = serving.start_endpoint("served", workspace, port=free_port(), api_key="other")
        assert again == endpoint  # the same process and address, no second server
        assert main.main(["--workspace", str(workspace), "serve", "served", "--port", str(free_port())]) == 0
        assert f"already serving served (llama.cpp) at {endpoint.base_url}" in capsys.readouterr().out
    finally:
        assert serving.stop_endpoint(served_run)
    assert serving.running_endpoint(served_run) is None
    assert not (served_run / serving.ENDPOINT_FILE).exists()


@pytest.mark.slow
def test_the_transformers_endpoint_answers_with_the_runs_chat_template(served_run, workspace):
    import serving
    from inference_utils import GenerationConfig, chat_deltas, load_chat_model

    endpoint = serving.start_endpoint(
        "served", workspace, port=free_port(), api_key="sekret", weights=serving.TRANSFORMERS, timeout=300
    )
    try:
        assert endpoint.backend == "transformers"
        check_endpoint(endpoint, "sekret")
        import openai

        client = openai.OpenAI(base_url=endpoint.base_url, api_key="sekret", max_retries=0, timeout=120)
        served = client.chat.completions.create(model=endpoint.model, messages=PROMPT, max_tokens=16, temperature=0)
    finally:
        serving.stop_endpoint(served_run)
    # The same reply as the Test tab's chat with the run's model (adapter on, its chat template), greedy.
    local = load_chat_model(None, str(served_run), workspace)
    expected = "".join(chat_deltas(local, PROMPT, GenerationConfig(temperature=0, max_new_tokens=16)))
    assert served.choices[0].message.content == expected


def test_the_endpoint_ends_with_the_app_that_started_it(served_run, workspace):
    import os
    import subprocess
    import sys

    import serving
    from conftest import ROOT, wait_for

    app = (
        "import sys, time, serving\n"
        f"endpoint = serving.start_endpoint('served', {str(workspace)!r}, port={free_port()}, api_key='k', timeout=120)\n"
        "print(endpoint.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", app], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(process.stdout.readline())
        assert serving.running_endpoint(served_run).pid == pid
    finally:
        process.kill()  # as a crashed app: no atexit handler runs
        process.wait()
    wait_for(lambda: not serving._alive(pid), timeout=60, what="the endpoint to end with its app")
    assert serving.running_endpoint(served_run) is None
    assert os.path.exists(served_run / "serve.log")


def test_a_port_in_use_is_refused_before_anything_starts(served_run, workspace):
    import serving
    from workspace import UserError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"Port {port} on 127.0.0.1 is in use"):
            serving.start_endpoint("served", workspace, port=port)
    assert not (served_run / "serve.log").exists()


def test_a_key_is_required_when_shared_or_beyond_loopback(served_run, workspace):
    import serving
    from workspace import UserError

    with pytest.raises(UserError, match="The app is shared: set an API key"):
        serving.start_endpoint("served", workspace, port=free_port(), shared=True)
    with pytest.raises(UserError, match="Serving on 0.0.0.0 lets other machines call the model"):
        serving.start_endpoint("served", workspace, host="0.0.0.0", port=free_port())
    assert not (served_run / "serve.log").exists()


def test_a_run_without_a_model_or_the_named_gguf_is_refused(served_run, workspace):
    import jobs
    import serving
    from workspace import UserError

    untrained = jobs.create_run("train", {"model": {"name_or_path": "demo"}}, workspace, "untrained")
    with pytest.raises(UserError, match="has no trained model yet"):
        serving.start_endpoint(untrained.name, workspace, port=free_port())
    with pytest.raises(UserError, match="has no other.gguf in gguf/; it has: served-q4_1.gguf"):
        serving.start_endpoint("served", workspace, port=free_port(), weights="other.gguf")


def test_the_snippets_name_the_endpoint():
    import serving

    endpoint = serving.Endpoint("/w/runs/r", "http://127.0.0.1:8000/v1", "r", "llama.cpp", 1, True)
    curl, python = serving.snippets(endpoint)
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in curl and "Bearer $API_KEY" in curl
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1"' in python and 'model="r"' in python


def test_a_chat_request_takes_openai_defaults_and_refuses_what_the_model_cannot_take():
    import serving_app
    from workspace import UserError

    messages, config = serving_app._chat_request(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 7}
    )
    assert messages == [{"role": "user", "content": "Hi"}]
    assert (config.temperature, config.top_p, config.max_new_tokens) == (1.0, 1.0, 7)
    with pytest.raises(UserError, match="temperature must be at least 0 and at most 2"):
        serving_app._chat_request({"messages": [{"role": "user", "content": "Hi"}], "temperature": 5})
    with pytest.raises(UserError, match="Each message needs a role"):
        serving_app._chat_request({"messages": [{"role": "tool", "content": "Hi"}]})
    with pytest.raises(UserError, match="messages must be a non-empty list"):
        serving_app._chat_request({"messages": []})
