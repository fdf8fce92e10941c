"""Chat, base-vs-tuned comparison and held-out evaluation with the demo model and a trained LoRA run."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import inference_utils
import jobs
import runfolder
from inference_utils import EvalConfig, GenerationConfig
from training_utils import TrainConfig
from workspace import UserError, config_to_dict

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"  # one of the trained prompts; training taught replies to end in "Zebra!"
GREEDY = GenerationConfig(temperature=0, max_new_tokens=20)


@pytest.fixture(scope="module")
def tuned(trained_run):
    return inference_utils.load_chat_model(run=str(trained_run))


@pytest.fixture(scope="module")
def greedy_replies(tuned) -> tuple[str, str]:
    """(base, tuned) greedy replies to PROMPT, generated once for the tests that compare against them."""
    return final_reply(tuned, use_adapter=False), final_reply(tuned)


def final_reply(chat_model, prompt: str = PROMPT, use_adapter: bool = True) -> str:
    *_, last = inference_utils.stream_chat(chat_model, [{"role": "user", "content": prompt}], GREEDY, use_adapter)
    return last


def main_py(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- bad input

BAD_GENERATION = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize("changes, message", BAD_GENERATION, ids=[str(v[0]) for v in BAD_GENERATION])
def test_bad_generation_values_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        GenerationConfig(**changes).validate()


def test_chat_with_empty_prompt_is_refused(tuned):
    with pytest.raises(UserError, match="prompt is empty"):
        list(inference_utils.stream_chat(tuned, [{"role": "user", "content": "  \n"}], GREEDY))
    with pytest.raises(UserError, match="prompt is empty"):
        list(inference_utils.stream_compare(tuned, "", GREEDY))


def test_chat_with_max_new_tokens_0_is_refused(tuned):
    with pytest.raises(UserError, match="max_new_tokens"):
        list(
            inference_utils.stream_chat(
                tuned, [{"role": "user", "content": PROMPT}], GenerationConfig(max_new_tokens=0)
            )
        )


def test_unknown_run_is_refused(workspace):
    with pytest.raises(UserError, match="No run named 'nope'"):
        inference_utils.load_chat_model(run="nope")


def test_run_without_adapter_is_refused(workspace):
    jobs.create_run("train", config_to_dict(TrainConfig()), workspace, "unfinished")
    with pytest.raises(UserError, match="no trained model yet"):
        inference_utils.load_chat_model(run="unfinished")
    with pytest.raises(UserError, match="no trained model yet"):
        inference_utils.evaluate(EvalConfig(run="unfinished"))


def test_adapter_on_a_model_of_another_shape_is_refused(trained_run, demo_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = tmp_path / "tiny-llama"
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(demo_tokenizer),
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    demo_tokenizer.save_pretrained(tiny)
    with pytest.raises(UserError, match="was trained on 'demo' and does not fit model .*size mismatch"):
        inference_utils.load_chat_model(str(tiny), run=str(trained_run))


def test_eval_of_a_run_without_eval_split_is_refused(trained_run, workspace):
    copy = workspace / "runs" / "no-split"
    shutil.copytree(trained_run / "adapter", copy / "adapter")
    shutil.copy(trained_run / "config.yaml", copy / "config.yaml")
    saved = copy / "adapter" / "train_config.yaml"
    saved.write_text(yaml.safe_dump({**yaml.safe_load(saved.read_text()), "eval_split": 0.0}))
    with pytest.raises(UserError, match="eval_split 0"):
        inference_utils.check_evaluable(EvalConfig(run="no-split"))


def test_cli_refuses_empty_prompt_and_zero_tokens_before_loading(workspace):
    empty = main_py("--workspace", str(workspace), "chat", "--prompt", " ")
    assert empty.returncode == 2 and "error: The prompt is empty" in empty.stderr
    zero = main_py("--workspace", str(workspace), "chat", "--prompt", "Hi", "--max-new-tokens", "0")
    assert zero.returncode == 2 and "error: max_new_tokens" in zero.stderr


# ---------------------------------------------------------------- chat and comparison


def test_tuned_reply_differs_from_base_on_a_trained_prompt(greedy_replies):
    base, tuned_reply = greedy_replies
    assert tuned_reply != base
    assert "Zebra" in tuned_reply and "Zebra" not in base


def test_streaming_yields_growing_prefixes(tuned, greedy_replies):
    chunks = list(inference_utils.stream_chat(tuned, [{"role": "user", "content": PROMPT}], GREEDY))
    assert len(chunks) > 1
    for before, after in itertools.pairwise(chunks):
        assert after.startswith(before) and len(after) > len(before)
    assert chunks[-1] == greedy_replies[1]


def test_compare_gives_both_sides_from_one_model(tuned, greedy_replies):
    from peft import PeftModel

    pairs = list(inference_utils.stream_compare(tuned, PROMPT, GREEDY))
    assert len(pairs) > 1
    assert isinstance(tuned.model, PeftModel) and tuned.has_adapter  # one set of base weights, adapter toggled
    assert pairs[-1] == greedy_replies


def test_compare_needs_a_run(demo_model, session_workspace):
    base = inference_utils.load_chat_model("demo", workspace=session_workspace)
    assert base.kind == "base" and final_reply(base)
    with pytest.raises(UserError, match="needs a training run"):
        list(inference_utils.stream_compare(base, PROMPT, GREEDY))


@pytest.mark.slow
def test_chat_cli_streams_the_reply(trained_run, session_workspace):
    done = main_py(
        "--workspace",
        str(session_workspace),
        "chat",
        "--run",
        "trained",
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--compare",
    )
    assert done.returncode == 0, done.stderr
    base, tuned_part = done.stdout.split("[tuned]")
    assert base.startswith("[base]") and "Zebra" not in base
    assert "Zebra" in tuned_part


# ---------------------------------------------------------------- held-out evaluation


@pytest.mark.slow
def test_eval_shows_lower_held_out_loss_for_tuned(trained_run, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    reporter = runfolder.Reporter(job_dir)
    result = inference_utils.evaluate(EvalConfig(run=str(trained_run), max_rows=4, batch_size=2), reporter)
    assert result["rows"] == 4 and result["eval_rows_total"] == 12  # 25 % of 48 rows held out
    assert result["tokens"] > 0
    assert result["tuned"]["loss"] < result["base"]["loss"]
    assert result["tuned"]["perplexity"] < result["base"]["perplexity"]
    assert json.loads((trained_run / "eval.json").read_text()) == result
    assert "| tuned (adapter) |" in (trained_run / "eval.md").read_text()
    progress = [event for event in runfolder.read_events(job_dir) if event.kind == "progress"]
    assert progress[-1].step == progress[-1].total == 4  # 2 batches × (base, tuned)
    assert runfolder.read_progress(job_dir).fraction == 1.0


@pytest.mark.slow
def test_eval_cli_runs_an_eval_job(trained_run, workspace):
    done = main_py("--workspace", str(workspace), "eval", str(trained_run), "--max-rows", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "| base (demo) |" in done.stdout
    (job,) = [run for run in jobs.list_runs(workspace) if run.kind == "eval"]
    assert job.name == "eval-trained" and job.state == "done"
    assert json.loads((trained_run / "eval.json").read_text())["rows"] == 2
