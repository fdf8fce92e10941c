"""The arena against real components: the demo model (transformers) and its GGUF (llama.cpp) as contestants, judged
by `python -m llama_cpp.server` serving the demo GGUF, or by tests/fake_llm_servers.py where a test needs a judge
that answers on cue (the real OpenAI SDK talks to both)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_llm_servers import FakeLLMServer
from test_llm_clients import llama_server  # noqa: F401 - the session's llama_cpp.server judge

import arena_judge
import arena_report
import arena_utils
import jobs
import llm_clients
import runfolder
import submit
from arena_utils import ArenaConfig
from conftest import wait_for
from workspace import UserError, config_to_dict, dump_yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of France?", "Name a colour of the sky.", "What is two plus two?", "Say hello."]
VERDICT = '{"winner": "A", "reason": "A is clearer."}'


def demo_gguf() -> str:
    import model_utils

    return str(model_utils.demo_gguf_path())


def prompts_file(folder: Path, count: int = 2) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Paris is the answer."}]}
        for text in PROMPTS[:count]
    ]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def arena_config(folder: Path, judge_url: str, count: int = 2, **changes) -> ArenaConfig:
    values = dict(
        contestants=["base:demo", f"gguf:{demo_gguf()}"],
        prompt_source="file",
        prompts_file=str(prompts_file(folder, count)),
        max_new_tokens=16,
        judge_model="smollm2-demo",
        judge_base_url=judge_url,
        judge_response_format="json_object",
        judge_max_tokens=48,
        judge_concurrency=1,
        timeout_s=120,
        backoff_s=0.05,
    )
    values.update(changes)
    return ArenaConfig(**values)


def run_in_process(config: ArenaConfig, workspace: Path) -> tuple[Path, str]:
    """Create the arena's run folder and run its job in this process (no second Python start-up)."""
    config = arena_utils.check_arena(config, workspace)
    run_dir = jobs.create_run("arena", config_to_dict(config), workspace)
    state = arena_utils.arena_job(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state=state)
    return run_dir, state


def judgments(run_dir: Path) -> list[dict]:
    path = run_dir / arena_utils.JUDGMENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- the verdict parser and the statistics

IMPERFECT = [
    ('{"winner": "B", "reason": "B answers."}', "B"),
    ('Sure! {"winner": "tie", "reason": "both fine"} Hope this helps.', "tie"),
    ("Winner: A\nReason: it is right.", "A"),
    ("The better answer is B.", "B"),
    ('{"winner": "C", "reason": "?"}', "unparsed"),
    ('{"winner": "A", "reason": "cut off', "A"),  # cut off after the verdict: the verdict is there
    ("I think both answers are about France.", "unparsed"),
    ("", "unparsed"),
    ('{"winner": 3, "reason": null}', "unparsed"),
]


@pytest.mark.parametrize("text, verdict", IMPERFECT)
def test_the_verdict_parser_reads_what_it_can_and_counts_the_rest_as_unparsed(text, verdict):
    assert arena_judge.parse_verdict(text)[0] == verdict


def test_a_verdict_that_flips_with_the_order_is_a_tie_and_the_wilson_interval_has_known_values():
    flipped = [{"winner": "x"}, {"winner": "y"}]
    assert arena_report.prompt_outcome(flipped, "x") == 0.5
    assert arena_report.prompt_outcome([{"winner": None}, {"winner": "x"}], "x") == 1.0
    assert arena_report.prompt_outcome([{"winner": None}], "x") is None
    low, high = arena_report.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert arena_report.wilson_interval(0, 0) == (0.0, 1.0)
    assert arena_report.wilson_interval(3, 3)[1] == 1.0


def test_prompts_come_from_text_lines_a_prompt_column_or_conversations(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("First question?\n\nSecond question?\n")
    assert [p.text for p in arena_utils.prompts_from_file(text)] == ["First question?", "Second question?"]
    column = tmp_path / "prompts.jsonl"
    column.write_text('{"prompt": "Capital of Peru?", "reference": "Lima."}\n{"prompt": "Say hi."}\n')
    first, second = arena_utils.prompts_from_file(column)
    assert (first.text, first.reference, second.reference) == ("Capital of Peru?", "Lima.", "")
    conversation = arena_utils.prompts_from_file(prompts_file(tmp_path, 2))
    assert [(p.text, p.reference) for p in conversation] == [(text, "Paris is the answer.") for text in PROMPTS[:2]]


def test_bad_arena_configs_are_refused_before_a_job_exists(demo_workspace):
    judge = "http://127.0.0.1:9/v1"
    cases = [
        ({"contestants": ["base:demo"]}, "at least two contestants"),
        ({"contestants": ["base:demo", "model:x"]}, "is not KIND:WHAT"),
        ({"contestants": ["base:demo", "run:nope"]}, "No run named 'nope'"),
        ({"contestants": ["base:demo", f"gguf:{demo_workspace / 'x.gguf'}"]}, "does not exist"),
        ({"judge_model": ""}, "No judge model"),
        ({"prompts_file": ""}, "no prompts_file"),
        ({"judge_response_format": "yaml"}, "judge_response_format must be one of"),
    ]
    for changes, message in cases:
        with pytest.raises(UserError, match=message):
            submit.submit("arena", arena_config(demo_workspace, judge, **changes), demo_workspace)
    not_gguf = demo_workspace / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        submit.submit("arena", arena_config(demo_workspace, judge, contestants=["base:demo", f"gguf:{not_gguf}"]))
    assert not (demo_workspace / "runs").exists() or not list((demo_workspace / "runs").iterdir())


# ---------------------------------------------------------------- against the real llama_cpp.server judge


@pytest.mark.slow
def test_a_small_judge_without_json_mode_gives_unparsed_verdicts_and_a_report(demo_workspace, llama_server):  # noqa: F811
    config = arena_config(demo_workspace, llama_server, count=1, judge_response_format="none", judge_max_tokens=32)
    run_dir, state = run_in_process(config, demo_workspace)
    assert state == "done"
    report = json.loads((run_dir / "report.json").read_text())
    pair = report["pairs"][0]
    # Every prompt is counted once: read as win, tie or loss, or unparsed when neither order could be read.
    assert pair["wins"] + pair["ties"] + pair["losses"] + pair["unparsed"] == 1
    assert report["judgments"] == 2
    assert report["unparsed_judgments"] == sum(1 for item in judgments(run_dir) if item["verdict"] == "unparsed")
    assert all(item["raw"] is not None for item in judgments(run_dir))


@pytest.mark.slow
def test_two_contestants_on_a_few_prompts_give_a_complete_report(demo_workspace, llama_server):  # noqa: F811
    run_dir, state = run_in_process(arena_config(demo_workspace, llama_server), demo_workspace)
    assert state == "done"
    report = json.loads((run_dir / "report.json").read_text())
    base, gguf = report["contestants"]
    assert report["judgments"] == 4 and report["unparsed_judgments"] == 0  # json_object: the server's grammar
    pair = report["pairs"][0]
    assert pair["wins"] + pair["ties"] + pair["losses"] == 2
    low, high = pair["ci95"]
    assert 0 <= low <= pair["win_rate"] <= high <= 1
    assert [row["contestant"] for row in report["ranking"]].count(base) == 1
    assert all(row["tokens_per_s"] > 0 for row in report["ranking"])
    assert set(report["reference_metrics"]) == {base, gguf}
    assert all(set(values) >= {"bleu", "chrf", "rougeL"} for values in report["reference_metrics"].values())
    for row in report["per_prompt"]:
        assert set(row["replies"]) == {base, gguf} and all(row["replies"].values())
        assert sorted(item["order"] for item in row["judgments"]) == ["ab", "ba"]
        assert all(item["verdict"] in ("A", "B", "tie") for item in row["judgments"])
    markdown = (run_dir / "report.md").read_text()
    for heading in ("## Pairs", "## Ranking", "## Against the reference answers", "## Per prompt"):
        assert heading in markdown
    assert PROMPTS[0] in markdown and "95 % CI" in markdown
    from ui import arena_tab

    status, shown, *_ = arena_tab.arena_view(run_dir.name, demo_workspace)
    assert shown == markdown and "done" in status


def test_a_judge_at_a_closed_port_is_a_clear_message(demo_workspace):
    url = f"http://127.0.0.1:{jobs.free_port()}/v1"
    with pytest.raises(UserError, match=r"Cannot reach the openai server at .*Is it running, and is base_url right"):
        run_in_process(arena_config(demo_workspace, url), demo_workspace)


def test_a_judge_that_answers_garbage_stops_the_job_with_a_clear_message(demo_workspace):
    with FakeLLMServer(reply=lambda prompt, number: "banana " * 12) as judge:
        config = arena_config(demo_workspace, judge.openai_url, judge_model="fake-model", max_consecutive_unparsed=2)
        with pytest.raises(UserError, match=r"the last 2 replies of the judge 'fake-model' held no verdict.*banana"):
            run_in_process(config, demo_workspace)


def test_a_judge_url_that_serves_a_web_page_is_a_clear_message(demo_workspace):
    with FakeLLMServer(html_pages=True) as judge:
        with pytest.raises(UserError, match="not JSON — is base_url the API endpoint"):
            run_in_process(arena_config(demo_workspace, judge.openai_url, judge_model="fake-model"), demo_workspace)


def test_a_contestant_that_fails_to_load_is_a_clear_message(demo_workspace):
    broken = demo_workspace / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(256))
    with FakeLLMServer(reply=lambda prompt, number: VERDICT) as judge:
        config = arena_config(
            demo_workspace, judge.openai_url, judge_model="fake-model", contestants=["base:demo", f"gguf:{broken}"]
        )
        with pytest.raises(UserError, match=r"Contestant 'gguf:.*broken.gguf' could not be loaded"):
            run_in_process(config, demo_workspace)


# ---------------------------------------------------------------- the job: kill -9, resume, the CLI


@pytest.mark.slow
def test_kill_9_mid_arena_then_resume_judges_no_prompt_twice(demo_workspace):
    with FakeLLMServer(reply=lambda prompt, number: VERDICT, latency_s=0.7) as judge:
        config = arena_config(demo_workspace, judge.openai_url, count=3, judge_model="fake-model")
        run_dir = submit.submit("arena", config, demo_workspace)
        wait_for(lambda: len(judgments(run_dir)) >= 2, timeout=300, what="two judgements")
        os.killpg(runfolder.read_status(run_dir).pid, signal.SIGKILL)
        wait_for(lambda: jobs.job_status(run_dir).state == "failed", timeout=30, what="the job to be seen dead")
        before = {arena_utils.judgment_key(item) for item in judgments(run_dir)}
        asked_before = judge.chat_requests
        submit.resume(run_dir, demo_workspace)
        wait_for(lambda: not jobs.job_status(run_dir).active, timeout=300, what="the resumed arena to end")
        assert jobs.job_status(run_dir).state == "done", runfolder.log_tail(run_dir)
        keys = [arena_utils.judgment_key(item) for item in judgments(run_dir)]
        assert len(keys) == len(set(keys)) == 6  # 3 prompts x 1 pair x 2 orders, each once
        assert before <= set(keys)
        assert judge.chat_requests - asked_before == 6 - len(before)  # finished judgements were not asked again
    replies = (run_dir / arena_utils.REPLIES_FILE).read_text().splitlines()
    assert len(replies) == 6  # 3 prompts x 2 contestants, none generated twice
    assert json.loads((run_dir / "report.json").read_text())["pairs"][0]["wins"] == 0  # "A" both ways: ties
    assert "sk-" not in (run_dir / "config.yaml").read_text()


def test_the_cli_arena_command_refuses_a_bad_config_in_one_line(demo_workspace):
    config = config_to_dict(arena_config(demo_workspace, "http://127.0.0.1:9/v1"))
    config["contestants"] = ["base:demo"]
    path = demo_workspace / "arena.yaml"
    path.write_text(dump_yaml(config))
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--workspace", str(demo_workspace), "arena", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: An arena needs at least two contestants, e.g. base:demo and run:NAME."
    ]


def test_an_ollama_judge_that_is_not_running_is_refused_before_a_job_exists(demo_workspace):
    url = f"http://127.0.0.1:{jobs.free_port()}"
    config = arena_config(demo_workspace, url, judge_provider="ollama", judge_model="llama3.2")
    with pytest.raises(UserError, match=r"Cannot reach the ollama server at .*Is it running"):
        submit.submit("arena", config, demo_workspace)
    with FakeLLMServer(models=("qwen2.5:7b",)) as ollama:
        config = arena_config(demo_workspace, ollama.url, judge_provider="ollama", judge_model="llama3.2")
        with pytest.raises(UserError, match="llama3.2"):
            submit.submit("arena", config, demo_workspace)
    assert not (demo_workspace / "runs").exists() or not list((demo_workspace / "runs").iterdir())


def test_judges_the_user_already_has_are_offered_with_their_settings(demo_workspace):
    gguf = demo_workspace / "runs" / "train-1" / "gguf" / "train-1-q8_0.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    with FakeLLMServer(models=("qwen2.5:7b",)) as ollama:
        judges = arena_utils.local_judges(demo_workspace, ollama_url=ollama.url)
        offered = {judge["label"]: judge for judge in judges}
        assert set(offered) == {"Ollama: qwen2.5:7b", "GGUF: train-1/train-1-q8_0.gguf"}
        settings = offered["Ollama: qwen2.5:7b"]["settings"]
        # the settings offered pass the same up-front check a run gets
        llm_clients.check_server(ArenaConfig(**settings).judge_client(), None)
    served = offered["GGUF: train-1/train-1-q8_0.gguf"]
    assert served["start"] == f"python -m llama_cpp.server --model {gguf} --model_alias train-1-q8_0 --port 8000"
    assert served["settings"]["judge_model"] == "train-1-q8_0"
    assert arena_utils.ollama_models(f"http://127.0.0.1:{jobs.free_port()}") == []


@pytest.mark.slow
def test_the_command_offered_for_a_gguf_judge_serves_it_under_the_name_the_settings_use(demo_workspace, tmp_path):
    import shlex

    import model_utils

    gguf = demo_workspace / "runs" / "train-1" / "gguf" / "train-1-q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.symlink_to(model_utils.demo_gguf_path())
    offered = next(judge for judge in arena_utils.local_judges(demo_workspace) if judge["label"].startswith("GGUF"))
    port = jobs.free_port()
    command = shlex.split(offered["start"].replace(f"--port {arena_utils.LLAMA_SERVER_PORT}", f"--port {port}"))
    assert command[:3] == ["python", "-m", "llama_cpp.server"]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, *command[1:]], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        settings = {**offered["settings"], "judge_base_url": f"http://127.0.0.1:{port}/v1", "timeout_s": 60}

        def answers() -> bool:
            assert server.poll() is None, log_path.read_text()[-2000:]
            try:
                judge = ArenaConfig(**settings).judge_client()
                llm_clients.check_server(judge, llm_clients.resolve_api_key(judge))  # a local server needs no key
                return True
            except UserError as exc:
                assert "Cannot reach" in str(exc), exc  # only "not up yet" may repeat
                return False

        wait_for(answers, timeout=120, what="llama_cpp.server to answer the offered judge settings")
    finally:
        server.terminate()
        server.wait(timeout=30)
