"""Synthetic data against real servers: the OpenAI, Anthropic and Ollama SDKs talk to tests/fake_llm_servers.py
(with injected faults) and to `python -m llama_cpp.server` serving the demo GGUF. No SDK is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_llm_servers import FakeLLMServer, Fault
from test_llm_clients import llama_server  # noqa: F401 - the session's llama_cpp.server

import jobs
import runfolder
import synthetic_rows
import synthetic_utils
from conftest import wait_for
from synthetic_utils import SyntheticConfig, generate
from workspace import UserError, config_to_dict, dump_yaml

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-5f1c9a7e3b2d4c6e8f0a1b2c3d4e5f60"
PROVIDERS = ("openai", "anthropic", "ollama")


def fake_config(server: FakeLLMServer, provider: str = "openai", **changes) -> SyntheticConfig:
    """A config aimed at the fake server, with short backoffs so retry tests take milliseconds."""
    values = dict(
        provider=provider,
        model="fake-model",
        base_url=server.openai_url if provider == "openai" else server.url,
        topic="kitchen gardening",
        num_rows=20,
        backoff_s=0.02,
        timeout_s=10,
    )
    values.update(changes)
    return SyntheticConfig(**values)


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "data.jsonl").read_text().splitlines()]


def row_keys(rows: list[dict]) -> set[str]:
    return {synthetic_utils.normalize_text(synthetic_utils.row_text(row["messages"])) for row in rows}


def write_pdf(path: Path, text: str) -> Path:
    """A one-page PDF showing `text` in Helvetica, written by hand (no PDF writer is installed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    data, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(data)
    return path


@pytest.fixture
def fake():
    with FakeLLMServer(api_key=KEY) as server:
        yield server


# ---------------------------------------------------------------- configuration and keys

BAD_CONFIGS = [
    ({"provider": "mistral"}, r"provider must be one of: openai, anthropic, ollama \(got 'mistral'\)"),
    ({"model": ""}, "No model given"),
    ({"base_url": "localhost:8000"}, "must start with http"),
    ({"task": "poems"}, r"task must be one of: instructions, documents, conversations \(got 'poems'\)"),
    ({"topic": ""}, "needs a topic"),
    ({"task": "documents"}, "needs documents"),
    ({"response_format": "yaml"}, "response_format must be one of: json_schema"),
    ({"num_rows": 0}, "num_rows"),
    ({"concurrency": 0}, "concurrency"),
    ({"temperature": 3}, "temperature"),
    ({"max_chars": 0}, "max_chars"),
    ({"near_duplicate_threshold": 0}, "near_duplicate_threshold"),
    ({"price_per_million_input": 0.15}, "both price_per_million_input"),
    ({"seed_examples": [{"question": "q"}]}, "Seed example 1 must be a mapping with the keys instruction, response"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[str(case[0]) for case in BAD_CONFIGS])
def test_bad_config_values_are_refused(changes, message):
    values = {"model": "gpt-4o-mini", "topic": "tea", **changes}
    with pytest.raises(UserError, match=message):
        SyntheticConfig(**values).validate()


def test_unknown_option_in_yaml_is_refused():
    with pytest.raises(UserError, match="Unknown option.*api_key"):
        synthetic_utils.synthetic_config_from_dict({"model": "m", "topic": "t", "api_key": "sk-nope"})


def test_the_providers_key_travels_in_the_job_environment(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    config = SyntheticConfig(provider="anthropic", model="m", topic="tea")
    assert synthetic_utils.job_env(config, KEY) == {"ANTHROPIC_API_KEY": KEY}
    with pytest.raises(UserError, match="No API key for anthropic"):
        synthetic_utils.job_env(config)
    assert synthetic_utils.job_env(SyntheticConfig(provider="ollama", model="m", topic="tea"), KEY) == {}


# ---------------------------------------------------------------- generation through each protocol


@pytest.mark.parametrize("provider", PROVIDERS)
def test_generates_200_unique_rows_through_each_protocol(tmp_path, fake, provider):
    config = fake_config(fake, provider, num_rows=200, price_per_million_input=0.5, price_per_million_output=2.0)
    summary = generate(config, tmp_path, api_key=KEY)
    rows = read_rows(tmp_path)
    assert summary.state == "done" and summary.rows_done == 200 and len(rows) == 200
    assert len(row_keys(rows)) == 200
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)
    assert summary.tokens_in > 0 and summary.tokens_out > 0
    assert summary.estimated_cost == pytest.approx((summary.tokens_in * 0.5 + summary.tokens_out * 2.0) / 1e6, abs=1e-6)
    seen = [event.step for event in runfolder.read_events(tmp_path) if event.kind == "progress"]
    assert seen[-1] == 200 and seen == sorted(seen)
    counters = runfolder.read_progress(tmp_path).metrics
    assert counters["state"] == "done" and counters["rows_done"] == 200 and counters["tokens_out"] == summary.tokens_out


def test_conversations_have_the_asked_turns_in_order(tmp_path, fake):
    summary = generate(fake_config(fake, "ollama", task="conversations", turns=3, num_rows=10), tmp_path)
    assert summary.rows_done == 10
    for row in read_rows(tmp_path):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 3
    assert all("3 user turns" in prompt for prompt in fake.prompts)


def test_documents_task_asks_about_chunks_of_txt_md_and_pdf(tmp_path, fake):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("Basil needs six hours of sun.\n\nWater it in the morning.", encoding="utf-8")
    (docs / "guide.md").write_text("# Tomatoes\n\nTomatoes want deep pots and weekly feeding.", encoding="utf-8")
    write_pdf(docs / "mint.pdf", "Mint spreads by runners and is best kept in a pot.")
    config = fake_config(
        fake,
        "anthropic",
        task="documents",
        topic="",
        num_rows=6,
        chunk_chars=200,
        documents=[str(docs / name) for name in ("notes.txt", "guide.md", "mint.pdf")],
    )
    summary = generate(config, tmp_path / "out", api_key=KEY)
    assert summary.rows_done == 6
    prompts = "\n".join(fake.prompts)
    for text in ("Basil needs six hours", "deep pots and weekly feeding", "Mint spreads by runners"):
        assert text in prompts
    assert all(row["messages"][0]["content"].endswith("?") for row in read_rows(tmp_path / "out"))


def test_unreadable_documents_are_refused(tmp_path):
    empty = write_pdf(tmp_path / "scan.pdf", "")
    with pytest.raises(UserError, match="has no text.*OCR"):
        synthetic_rows.load_document_chunks([str(empty)], 500)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        synthetic_rows.load_document_chunks([str(tmp_path / "latin1.txt")], 500)
    with pytest.raises(UserError, match="not a TXT, MD or PDF"):
        SyntheticConfig(model="m", task="documents", documents=[str(tmp_path / "a.docx")]).validate()


def test_chunks_respect_the_size_and_keep_paragraphs():
    text = "\n\n".join(f"Paragraph {n} " + "word " * 30 for n in range(10))
    chunks = synthetic_rows.chunk_text(text, 400)
    assert all(len(chunk) <= 400 for chunk in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
    assert synthetic_rows.chunk_text("x" * 1000, 300) == ["x" * 300] * 3 + ["x" * 100]


# ---------------------------------------------------------------- faults, retries, bad servers


def test_retries_are_counted_in_the_summary_and_the_progress(tmp_path, fake):
    fake.inject(Fault("429", retry_after=0.1), Fault("500"))
    summary = generate(fake_config(fake, num_rows=3, concurrency=1), tmp_path, api_key=KEY)
    assert summary.rows_done == 3 and summary.retries == 2 and summary.rejected == 0
    assert runfolder.read_progress(tmp_path).metrics["retries"] == 2


def test_a_server_that_keeps_failing_ends_the_run_with_rows_kept(tmp_path, fake):
    fake.inject(*[Fault("500")] * 3)
    config = fake_config(fake, num_rows=5, concurrency=1, max_retries=2)
    with pytest.raises(UserError, match="kept failing after 2 retries .*500.*resume later"):
        generate(config, tmp_path, api_key=KEY)
    assert runfolder.read_progress(tmp_path).metrics["state"] == "failed"
    assert generate(config, tmp_path, api_key=KEY).rows_done == 5  # the server recovered: resume finishes


def test_a_model_that_never_returns_json_stops_with_a_summary(tmp_path):
    with FakeLLMServer(always_malformed=True) as server:
        config = fake_config(server, num_rows=50, concurrency=4, max_consecutive_rejects=12)
        with pytest.raises(
            UserError,
            match=r"last 1\d replies .* unusable \(most were not valid JSON.*"
            r"0/50 rows, 1\d rejected \(invalid_json 1\d\)",
        ):
            generate(config, tmp_path)
        assert server.chat_requests <= 12 + 4
    assert (tmp_path / "data.jsonl").read_text() == ""


# ---------------------------------------------------------------- validation, duplicates, filters


def test_duplicates_and_near_duplicates_are_dropped(tmp_path):
    base = "Explain how deep to plant garlic cloves in a raised bed before the first frost of autumn"
    replies = [
        base,
        base,
        "Please " + base.lower(),
        base.upper() + "!",
        "Describe pruning an apple tree in late winter",
        "Compare clay and sandy soils for carrots",
    ]

    def reply(prompt: str, number: int) -> str:
        text = replies[(number - 1) % len(replies)]
        return json.dumps({"instruction": text, "response": "Plant them about five centimetres deep."})

    with FakeLLMServer(reply=reply) as server:
        summary = generate(fake_config(server, num_rows=3, concurrency=1), tmp_path)
    assert summary.rows_done == 3 and len(read_rows(tmp_path)) == 3
    assert summary.rejected_by_reason == {"duplicate": 2, "near_duplicate": 1}


def test_exact_only_threshold_keeps_near_duplicates():
    index = synthetic_utils.DuplicateIndex(1.0)
    index.add("one two three four five six seven eight")
    assert index.check("One, two three four five six seven eight!") == "duplicate"
    assert index.check("one two three four five six seven nine") is None
    near = synthetic_utils.DuplicateIndex(0.6)
    near.add("one two three four five six seven eight")
    assert near.check("one two three four five six seven nine") == "near_duplicate"
    assert near.check("alpha beta gamma delta") is None


def test_replies_are_validated_and_length_filtered():
    config = SyntheticConfig(model="m", topic="t", min_chars=5, max_chars=40)
    good = synthetic_rows.parse_reply('```json\n{"instruction": "Name a herb", "response": "Basil."}\n```', config)
    assert good == [{"role": "user", "content": "Name a herb"}, {"role": "assistant", "content": "Basil."}]
    cases = [
        ("no json here", "invalid_json"),
        ('{"instruction": "x", ', "invalid_json"),
        ('{"prompt": "Name a herb", "answer": "Basil"}', "wrong_shape"),
        ('{"instruction": "Name a herb", "response": "Ok"}', "too_short"),
        ('{"instruction": "Name a herb", "response": "' + "long " * 20 + '"}', "too_long"),
    ]
    for text, reason in cases:
        with pytest.raises(synthetic_rows.Rejected, match=reason):
            synthetic_rows.parse_reply(text, config)
    conversation = SyntheticConfig(model="m", topic="t", task="conversations", turns=1)
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "More?"},
    ]
    assert len(synthetic_rows.parse_reply(json.dumps({"messages": turns}), conversation)) == 2
    with pytest.raises(synthetic_rows.Rejected, match="wrong_shape"):
        synthetic_rows.parse_reply(json.dumps({"messages": turns[1:]}), conversation)


def test_length_filters_reject_rows_from_the_server(tmp_path):
    def reply(prompt: str, number: int) -> str:
        answer = "ok" if number % 2 else f"A complete answer number {number}."
        return json.dumps({"instruction": f"Question {number} about soil", "response": answer})

    with FakeLLMServer(reply=reply) as server:
        summary = generate(fake_config(server, num_rows=5, concurrency=1, min_chars=5), tmp_path)
    assert summary.rows_done == 5 and summary.rejected_by_reason == {"too_short": 5}


# ---------------------------------------------------------------- resume and output folders


def test_running_again_resumes_and_can_extend(tmp_path, fake):
    generate(fake_config(fake, num_rows=20), tmp_path, api_key=KEY)
    assert generate(fake_config(fake, num_rows=20), tmp_path, api_key=KEY).rows_this_run == 0
    summary = generate(fake_config(fake, num_rows=30, concurrency=3), tmp_path, api_key=KEY)
    assert summary.rows_done == 30 and summary.rows_this_run == 10 and fake.chat_requests == 30
    assert summary.requests == 30  # counters carry over between runs
    assert len(row_keys(read_rows(tmp_path))) == 30


def test_a_folder_with_rows_of_other_settings_is_refused(tmp_path, fake):
    generate(fake_config(fake, num_rows=3), tmp_path, api_key=KEY)
    with pytest.raises(UserError, match=r"other settings \(changed: topic, temperature\).*new folder"):
        generate(fake_config(fake, num_rows=3, topic="beekeeping", temperature=0.2), tmp_path, api_key=KEY)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.jsonl").write_text('{"text": "mine"}\n')
    with pytest.raises(UserError, match="not generated here"):
        generate(fake_config(fake, num_rows=3), foreign, api_key=KEY)


def test_a_torn_last_line_is_cut_off_on_resume(tmp_path, fake):
    generate(fake_config(fake, num_rows=4), tmp_path, api_key=KEY)
    with open(tmp_path / "data.jsonl", "a") as handle:
        handle.write('{"messages": [{"role": "user", "con')
    assert generate(fake_config(fake, num_rows=6), tmp_path, api_key=KEY).rows_this_run == 2
    assert len(read_rows(tmp_path)) == 6


@pytest.mark.slow
def test_a_job_killed_at_100_rows_resumes_to_exactly_200_unique_rows(workspace):
    with FakeLLMServer(api_key=KEY, latency_s=0.04) as server:
        config = fake_config(server, num_rows=200, concurrency=2)
        run_dir = jobs.create_run("synth", config_to_dict(config), workspace, "synth-kill")
        env = synthetic_utils.job_env(config, KEY)
        jobs.start_job(run_dir, env=env)
        data = run_dir / "data.jsonl"
        wait_for(lambda: data.exists() and data.read_text().count("\n") >= 100, timeout=60, interval=0.05)
        os.killpg(jobs.job_status(run_dir).pid, signal.SIGKILL)
        wait_for(lambda: jobs.job_status(run_dir).state == "failed", timeout=60, interval=0.05)
        killed_at = len(read_rows(run_dir))
        assert 100 <= killed_at < 200

        jobs.resume_job(run_dir, env=env)
        wait_for(lambda: data.read_text().count("\n") >= killed_at + 30, timeout=60, interval=0.05)
        jobs.stop_job(run_dir)
        wait_for(lambda: jobs.job_status(run_dir).state not in runfolder.ACTIVE)
        assert jobs.job_status(run_dir).state == "stopped"

        jobs.resume_job(run_dir, env=env)
        wait_for(lambda: jobs.job_status(run_dir).state not in runfolder.ACTIVE)
        status = jobs.job_status(run_dir)
        assert status.state == "done", status
        rows = read_rows(run_dir)
        assert len(rows) == 200 and len(row_keys(rows)) == 200
        # Only the replies in flight at the kill and the stop were lost: nothing was asked for twice.
        assert server.chat_requests <= 200 + 2 * config.concurrency
        progress = [event for event in runfolder.read_events(run_dir) if event.kind == "progress"]
        assert progress[-1].step == 200 and progress[-1].total == 200
        assert [run.progress.step for run in jobs.list_runs(workspace)] == [200]


# ---------------------------------------------------------------- CLI, keys, and the training pipeline


@pytest.mark.slow
def test_cli_job_never_writes_the_key_anywhere(workspace, tmp_path, fake):
    config = tmp_path / "synth.yaml"
    config.write_text(
        dump_yaml(
            {
                "provider": "openai",
                "model": "fake-model",
                "base_url": fake.openai_url,
                "topic": "herbs",
                "num_rows": 15,
                "backoff_s": 0.02,
            }
        )
    )
    env = {**os.environ, "MY_TEAM_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)
    fake.inject(Fault("500"))  # the retry is logged to the run's log.txt
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--workspace",
            str(workspace),
            "synth",
            str(config),
            "--name",
            "herbs",
            "--api-key-env",
            "MY_TEAM_KEY",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "15/15 rows" in result.stdout
    run_dir = workspace / "runs" / "herbs"
    assert len(read_rows(run_dir)) == 15 and jobs.job_status(run_dir).state == "done"
    assert "retry 1/5" in (run_dir / "log.txt").read_text()
    generate(fake_config(fake, "anthropic", num_rows=5), workspace / "in-process", api_key=KEY)
    files = [path for path in workspace.rglob("*") if path.is_file()]
    assert len(files) >= 8
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in result.stdout + result.stderr


def test_cli_refuses_a_missing_key_before_creating_a_run(workspace, tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = tmp_path / "synth.yaml"
    config.write_text(dump_yaml({"model": "gpt-4o-mini", "topic": "herbs"}))
    assert main.main(["--workspace", str(workspace), "synth", str(config)]) == 2
    assert "No API key for openai" in capsys.readouterr().err
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())


@pytest.mark.slow
def test_generated_rows_train_with_the_training_job(workspace, demo_model, fake):
    import training_utils
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig

    (workspace / "models").mkdir()
    (workspace / "models" / demo_model.name).symlink_to(demo_model)
    out = workspace / "runs" / "synth-for-training"
    generate(fake_config(fake, "ollama", num_rows=200), out)
    config = TrainConfig(
        model=ModelConfig("demo"),
        dataset=DatasetConfig(source=str(out / "data.jsonl")),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_seq_length=128,
        save_steps=3,
        lora_r=4,
        lora_alpha=8,
        gradient_checkpointing=False,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "train-on-synth")
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    losses = [event.metrics["loss"] for event in runfolder.read_events(run_dir) if "loss" in event.metrics]
    assert len(losses) == 3


# ---------------------------------------------------------------- the real llama.cpp server


@pytest.mark.slow
def test_llama_cpp_server_generates_rows(tmp_path, llama_server):  # noqa: F811
    # One short row: the schema grammar makes the 135M model write valid JSON, at about 4 tokens/s on 2 busy cores.
    config = SyntheticConfig(
        provider="openai",
        model="smollm2-demo",
        base_url=llama_server,
        topic="cooking pasta",
        seed_examples=[{"instruction": "How long do I boil spaghetti?", "response": "About nine minutes."}],
        num_rows=1,
        concurrency=1,
        response_format="json_object",
        max_tokens=80,
        timeout_s=240,
        temperature=0.7,
        max_consecutive_rejects=4,
    )
    summary = generate(config, tmp_path)
    rows = read_rows(tmp_path)
    assert summary.state == "done" and len(rows) == 1
    assert [message["role"] for message in rows[0]["messages"]] == ["user", "assistant"]
    assert all(message["content"] for message in rows[0]["messages"])
    assert summary.tokens_in > 0 and summary.tokens_out > 0


# ---------------------------------------------------------------- misbehaving servers (issue 13, item 8)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_huge_error_message_is_cut_everywhere_it_goes(tmp_path, fake, provider, caplog):
    fake.inject(Fault("huge_error", size=1_000_000, status=500), Fault("huge_error", size=1_000_000))
    config = fake_config(fake, provider, num_rows=1, concurrency=1, max_retries=2)
    with (
        caplog.at_level("INFO"),
        pytest.raises(UserError, match=r"refused the request \(400: Bad request: x+… \(") as raised,
    ):
        generate(config, tmp_path, api_key=KEY)
    assert len(str(raised.value)) < 1000 and "more characters)" in str(raised.value)
    assert "retry 1/2" in caplog.text and max(len(record.getMessage()) for record in caplog.records) < 1000
    assert (tmp_path / "progress.json").stat().st_size < 10_000


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_key_echoed_in_a_401_is_redacted(tmp_path, provider, caplog):
    secret = "sk-wrong-but-still-secret-9f8e7d6c5b4a"
    with FakeLLMServer(api_key=KEY, echo_key=True) as server:
        with caplog.at_level("DEBUG"), pytest.raises(UserError, match=r"You passed: \[redacted\]") as raised:
            generate(fake_config(server, provider), tmp_path, api_key=secret)
    assert secret not in str(raised.value) and secret not in caplog.text
    for path in tmp_path.rglob("*"):
        assert secret.encode() not in path.read_bytes(), path


def test_a_yaml_alias_bomb_in_seed_examples_is_refused_at_validation():
    from workspace import parse_yaml

    # Nine levels of nine aliases: a few hundred bytes of YAML standing for 387 million strings.
    levels = "".join(f"      l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]\n" for n in range(1, 10))
    text = f"model: m\ntopic: tea\nseed_examples:\n  - instruction: &l0 lol\n    response: ok\n    more:\n{levels}"
    config = synthetic_utils.synthetic_config_from_dict(parse_yaml(text))
    with pytest.raises(UserError, match=r"seed_examples expand to more than 1,000,000 characters.*aliases"):
        config.validate()
    looped = parse_yaml("model: m\ntopic: tea\nseed_examples:\n  - &e {instruction: a, response: b, again: *e}\n")
    with pytest.raises(UserError, match=r"Seed example 1 contains itself"):
        synthetic_utils.synthetic_config_from_dict(looped).validate()
    # An alias used once or twice, as people do to reuse a long answer, is fine.
    shared = (
        "model: m\ntopic: tea\nseed_examples:\n"
        "  - {instruction: a, response: &r long answer}\n  - {instruction: b, response: *r}\n"
    )
    synthetic_utils.synthetic_config_from_dict(parse_yaml(shared)).validate()
