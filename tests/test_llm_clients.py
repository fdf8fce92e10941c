"""The LLM clients against real servers: the OpenAI, Anthropic and Ollama SDKs talk to tests/fake_llm_servers.py
(with injected faults) and to `python -m llama_cpp.server` serving the demo GGUF. No SDK is mocked."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest
from fake_llm_servers import FakeLLMServer, Fault

import jobs
import llm_clients
from conftest import wait_for
from llm_clients import ClientConfig, Reply
from workspace import UserError

KEY = "sk-test-5f1c9a7e3b2d4c6e8f0a1b2c3d4e5f60"
PROVIDERS = ("openai", "anthropic", "ollama")
SYSTEM = "You write training data. Answer with one JSON object and nothing else."
ROW_SCHEMA = {
    "type": "object",
    "properties": {"instruction": {"type": "string"}, "response": {"type": "string"}},
    "required": ["instruction", "response"],
    "additionalProperties": False,
}


def client_config(server: FakeLLMServer, provider: str = "openai", **changes) -> ClientConfig:
    """A config aimed at the fake server, with short backoffs so retry tests take milliseconds."""
    values = dict(
        provider=provider,
        model="fake-model",
        base_url=server.openai_url if provider == "openai" else server.url,
        backoff_s=0.02,
        timeout_s=10,
    )
    values.update(changes)
    return ClientConfig(**values)


def ask(
    config: ClientConfig, count: int = 1, api_key: str | None = KEY, schema: dict | None = ROW_SCHEMA
) -> tuple[list[Reply], int]:
    """Check the server, then ask `count` prompts one after another, as the synthetic-data job and the judges do:
    (the replies, the retries counted)."""
    retries = []

    async def run() -> list[Reply]:
        async with llm_clients.open_client(config, api_key, on_retry=lambda: retries.append(1)) as client:
            await client.check()
            return [
                await client.complete(
                    f'Write row {number}. Reply with JSON: {{"instruction": "...", "response": "..."}}',
                    SYSTEM,
                    schema,
                    schema_name="row",
                )
                for number in range(count)
            ]

    return asyncio.run(run()), len(retries)


def whole_rows(replies: list[Reply]) -> bool:
    return all(set(json.loads(reply.text)) == {"instruction", "response"} for reply in replies)


@pytest.fixture
def fake():
    with FakeLLMServer(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """`python -m llama_cpp.server` serving the demo GGUF on the CPU, once per session."""
    import model_utils

    port = jobs.free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model_utils.demo_gguf_path()),
                "--model_alias",
                "smollm2-demo",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "1024",
                "--n_threads",
                "2",
                "--verbose",
                "False",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"llama_cpp.server exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(ready, timeout=120, interval=0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


# ---------------------------------------------------------------- configuration and keys


BAD_CONFIGS = [
    ({"provider": "mistral"}, r"provider must be one of: openai, anthropic, ollama \(got 'mistral'\)"),
    ({"model": " "}, "No model given"),
    ({"base_url": "localhost:8000"}, "must start with http"),
    ({"response_format": "yaml"}, "response_format must be one of: json_schema"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_retries": 101}, "max_retries"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[str(case[0]) for case in BAD_CONFIGS])
def test_bad_client_settings_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        ClientConfig(**{"model": "gpt-4o-mini", **changes}).validate()


@pytest.mark.parametrize("provider, variable", [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
def test_missing_key_for_the_providers_own_api_is_refused(monkeypatch, provider, variable):
    monkeypatch.delenv(variable, raising=False)
    config = ClientConfig(provider=provider, model="m")
    with pytest.raises(UserError, match=f"No API key for {provider}.*{variable}"):
        llm_clients.resolve_api_key(config)
    monkeypatch.setenv(variable, KEY)
    assert llm_clients.resolve_api_key(config) == KEY
    assert llm_clients.job_env(config) == {variable: KEY}


def test_local_servers_and_ollama_need_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = ClientConfig(model="m", base_url="http://127.0.0.1:8000/v1")
    assert llm_clients.resolve_api_key(local) == llm_clients.NO_KEY
    assert llm_clients.job_env(local) == {}
    assert llm_clients.resolve_api_key(ClientConfig(provider="ollama", model="m")) is None


# ---------------------------------------------------------------- what each provider is sent


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_gets_the_system_prompt_and_the_schema_in_its_own_option(fake, provider):
    replies, _ = ask(client_config(fake, provider, temperature=0.3, max_tokens=77), count=1)
    ask(client_config(fake, provider, response_format="json_object"), count=1)
    ask(client_config(fake, provider), count=1, schema=None)
    schema_body, object_body, plain_body = fake.bodies
    assert whole_rows(replies) and replies[0].tokens_in > 0 and replies[0].tokens_out > 0
    if provider == "anthropic":
        assert schema_body["system"] == SYSTEM and schema_body["max_tokens"] == 77 and "temperature" not in schema_body
        assert schema_body["output_config"] == {"format": {"type": "json_schema", "schema": ROW_SCHEMA}}
        assert "output_config" not in object_body and "output_config" not in plain_body  # the prompt alone
        return
    assert schema_body["messages"][0] == {"role": "system", "content": SYSTEM}
    if provider == "openai":
        assert schema_body["temperature"] == 0.3 and schema_body["max_tokens"] == 77  # not the official API
        assert schema_body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "row", "schema": ROW_SCHEMA, "strict": True},
        }
        assert object_body["response_format"] == {"type": "json_object", "schema": ROW_SCHEMA}  # llama_cpp.server
        assert "response_format" not in plain_body
    else:
        assert schema_body["options"] == {"temperature": 0.3, "num_predict": 77}
        assert schema_body["format"] == ROW_SCHEMA and object_body["format"] == "json"
        assert plain_body.get("format") is None


# ---------------------------------------------------------------- faults, retries, bad servers


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_500_dropped_and_slow_replies_are_retried(fake, provider):
    fake.inject(Fault("429", retry_after=0.1), Fault("500"), Fault("drop"), Fault("slow", seconds=1.5), Fault("529"))
    replies, retries = ask(client_config(fake, provider, timeout_s=0.5), count=10)
    assert len(replies) == 10 and retries == 5 and whole_rows(replies)
    assert {429, 500, 529} <= set(fake.statuses)


def test_retry_after_is_honoured(fake):
    fake.inject(Fault("429", retry_after=1.0))
    started = time.monotonic()
    replies, retries = ask(client_config(fake, backoff_s=0.01), count=1)
    assert retries == 1 and len(replies) == 1
    assert time.monotonic() - started >= 1.0


def test_backoff_doubles_with_jitter():
    delays = [llm_clients.backoff_delay(attempt, 1.0, None) for attempt in range(4)]
    for attempt, delay in enumerate(delays):
        assert 0.5 * 2**attempt <= delay <= 2**attempt
    assert 3.0 <= llm_clients.backoff_delay(0, 1.0, retry_after=3.0) <= 3.5
    assert llm_clients.retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert llm_clients.retry_after_seconds({"retry-after": "7"}) == 7.0
    assert llm_clients.retry_after_seconds({}) is None


def test_a_server_that_keeps_failing_is_busy_not_broken(fake):
    fake.inject(*[Fault("500")] * 3)
    with pytest.raises(llm_clients.ServerBusy, match=r"kept failing after 2 retries \(500: injected 500\)\.$"):
        ask(client_config(fake, max_retries=2))
    assert ask(client_config(fake, max_retries=2))[1] == 0  # the server recovered


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connection_refused_is_a_clear_error_within_seconds(provider):
    url = f"http://127.0.0.1:{jobs.free_port()}" + ("/v1" if provider == "openai" else "")
    config = ClientConfig(provider=provider, model="m", base_url=url, max_retries=5)
    started = time.monotonic()
    with pytest.raises(UserError, match=f"Cannot reach the {provider} server at {url}.*base_url"):
        ask(config)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "provider, hint",
    [
        ("openai", "it serves: fake-model"),
        ("anthropic", "Check the model name"),
        ("ollama", "ollama pull no-such-model"),
    ],
)
def test_unknown_model_is_named(fake, provider, hint):
    with pytest.raises(UserError, match=f"'no-such-model'.*{hint}"):
        ask(client_config(fake, provider, model="no-such-model"))
    assert fake.chat_requests == 0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_wrong_key_is_refused_without_retrying(fake, provider):
    with pytest.raises(UserError, match=f"refused the request \\(401.*{provider.upper()}_API_KEY"):
        ask(client_config(fake, provider), api_key="sk-wrong")


@pytest.mark.slow
def test_llama_cpp_server_names_an_unknown_model(llama_server):
    with pytest.raises(UserError, match="'gpt-4o' is not served .*it serves: smollm2-demo"):
        ask(ClientConfig(model="gpt-4o", base_url=llama_server))


# ---------------------------------------------------------------- misbehaving servers (issue 13, item 8)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_trickling_reply_is_cut_at_timeout_s_and_retried(fake, provider):
    # One byte every 20 ms: each read is far inside the timeout, the whole reply takes ~15 s.
    fake.inject(Fault("trickle", seconds=0.02))
    config = client_config(fake, provider, timeout_s=0.5, max_retries=0)
    with pytest.raises(UserError, match=r"kept failing .*no complete reply within timeout_s = 0.5 s"):
        ask(config)
    fake.inject(Fault("trickle", seconds=0.02))
    config.max_retries = 1
    replies, retries = ask(config)
    assert len(replies) == 1 and retries == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_endless_body_is_cut_at_the_size_cap(fake, provider, monkeypatch):
    monkeypatch.setattr(llm_clients, "MAX_RESPONSE_BYTES", 2**20)
    fake.inject(Fault("endless", size=64 * 2**20))
    with pytest.raises(UserError, match=r"sent a reply larger than 1 MiB"):
        ask(client_config(fake, provider, max_retries=3))
    assert fake.chat_requests == 1  # the same request would only do it again


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_huge_error_message_is_cut_everywhere_it_goes(fake, provider, caplog):
    fake.inject(Fault("huge_error", size=1_000_000, status=500), Fault("huge_error", size=1_000_000))
    with (
        caplog.at_level("INFO"),
        pytest.raises(UserError, match=r"refused the request \(400: Bad request: x+… \(") as raised,
    ):
        ask(client_config(fake, provider, max_retries=2))
    assert len(str(raised.value)) < 1000 and "more characters)" in str(raised.value)
    assert "retry 1/2" in caplog.text and max(len(record.getMessage()) for record in caplog.records) < 1000


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_200_with_a_web_page_is_named_not_a_traceback(fake, provider):
    fake.inject(Fault("html"))
    with pytest.raises(UserError, match=r"answered 200 with text/html, not JSON.*is base_url the API endpoint"):
        ask(client_config(fake, provider, max_retries=3))
    assert fake.chat_requests == 1  # a web page stays a web page: no retries


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_web_page_at_base_url_is_named_at_the_model_check(provider):
    with FakeLLMServer(html_pages=True) as server:
        with pytest.raises(UserError, match=r"answered 200 with text/html, not JSON"):
            ask(client_config(server, provider))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cut_off_json_200_is_retried_then_named(fake, provider):
    fake.inject(Fault("truncated"))
    config = client_config(fake, provider, max_retries=0)
    with pytest.raises(UserError, match=r"kept failing .*answered 200 with invalid JSON \(began: '\{\"id\""):
        ask(config)
    fake.inject(Fault("truncated"))
    config.max_retries = 1
    replies, retries = ask(config)
    assert len(replies) == 1 and retries == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_json_of_another_shape_is_named_not_a_traceback(fake, provider):
    fake.inject(Fault("wrong_shape"))
    with pytest.raises(UserError, match=r"answered 200 with JSON that is not a chat reply"):
        ask(client_config(fake, provider, max_retries=3))
    assert fake.chat_requests == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_key_echoed_in_a_401_is_redacted(provider, caplog):
    secret = "sk-wrong-but-still-secret-9f8e7d6c5b4a"
    with FakeLLMServer(api_key=KEY, echo_key=True) as server:
        with caplog.at_level("DEBUG"), pytest.raises(UserError, match=r"You passed: \[redacted\]") as raised:
            ask(client_config(server, provider), api_key=secret)
    assert secret not in str(raised.value) and secret not in caplog.text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cross_origin_redirect_is_refused_before_it_is_followed(fake, provider):
    with FakeLLMServer(redirect_to=fake.url) as redirector:
        url = redirector.openai_url if provider == "openai" else redirector.url
        with pytest.raises(UserError, match=f"redirected to {fake.url}/.*set base_url to the final address"):
            ask(client_config(redirector, provider, base_url=url))
    assert fake.requests == 0
