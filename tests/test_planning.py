"""Suggested settings, the time estimate, and early stopping on the eval loss (a real over-trained run)."""

from __future__ import annotations

import dataclasses

import pytest

import jobs
import main
import model_utils
import planning
import runfolder
import submit
from conftest import capital_rows, demo_train_config, wait_for, write_jsonl
from dataset_report import DatasetReport
from model_utils import Device
from workspace import UserError

CPU = Device(cuda=False, gpu_count=0, names=(), bf16=False)


def report(rows: int, p99: int = 100) -> DatasetReport:
    return DatasetReport(
        "data.jsonl", "messages", rows, 2048, usable_rows=rows, lengths={"p50": 40, "p95": 90, "p99": p99, "max": 300}
    )


def test_suggestions_follow_the_data_and_each_has_a_reason(demo_model, tmp_path):
    config = demo_train_config(tmp_path / "data.jsonl", max_seq_length=2048, max_steps=60, lora_r=16)
    suggestions = {item.field: item for item in planning.suggest(config, report(50, p99=100), str(demo_model), CPU)}
    assert suggestions["max_seq_length"].value == 128  # p99 100 rounded up to a multiple of 64
    assert suggestions["eval_split"].value == 0.0  # 50 rows: too few to hold some out
    assert suggestions["lora_r"].value == 8
    assert suggestions["learning_rate"].value == 2e-4
    assert suggestions["max_steps"].value == 38  # 3 passes over 50 rows at 4 rows per step
    assert all(item.reason and "\n" not in item.reason for item in suggestions.values())
    assert "p99" in suggestions["max_seq_length"].line()
    large = {item.field: item.value for item in planning.suggest(config, report(5000), str(demo_model), CPU)}
    assert large["eval_split"] == 0.05 and large["lora_r"] == 16


def test_only_accepted_suggestions_are_applied(demo_model, tmp_path):
    config = demo_train_config(tmp_path / "data.jsonl", max_seq_length=2048, lora_r=16)
    suggestions = planning.suggest(config, report(50), str(demo_model), CPU)
    changed = planning.apply(config, suggestions, ["max_seq_length"])
    assert changed.max_seq_length == 128
    assert dataclasses.replace(changed, max_seq_length=config.max_seq_length) == config
    with pytest.raises(UserError, match="No suggestion for num_gpus"):
        planning.apply(config, suggestions, ["num_gpus"])


def test_no_usable_rows_gives_no_suggestions(demo_model, tmp_path):
    config = demo_train_config(tmp_path / "data.jsonl")
    with pytest.raises(UserError, match="nothing to suggest"):
        planning.suggest(config, report(0), str(demo_model), CPU)


def test_time_estimate_covers_start_to_done_and_scales_with_steps(demo_model, tmp_path, workspace):
    config = demo_train_config(tmp_path / "data.jsonl", max_steps=30)
    short = planning.estimate_time(config, str(demo_model), report(50), workspace, CPU)
    long = planning.estimate_time(
        dataclasses.replace(config, max_steps=300), str(demo_model), report(50), workspace, CPU
    )
    assert short.basis.startswith("calibrated model") and set(short.parts) == {"start", "load", "data", "steps", "save"}
    assert short.seconds == pytest.approx(sum(short.parts.values()))
    fixed = short.seconds - short.parts["steps"]
    assert long.seconds - fixed == pytest.approx(
        10 * (short.parts["steps"] - planning.TIME_MODEL["cpu"]["warmup_s"]) + planning.TIME_MODEL["cpu"]["warmup_s"],
        rel=0.01,
    )
    assert "start and model load" in long.summary() and "300 steps" in long.summary() and "on CPU" in long.summary()
    epochs = planning.estimate_time(
        dataclasses.replace(config, max_steps=None, num_train_epochs=2), str(demo_model), report(40), workspace, CPU
    )
    assert epochs.steps == 20  # 2 epochs × 40 rows ÷ 4 rows per step


def test_padded_batches_cost_their_longest_row_and_cuts_apply():
    lengths = {"p50": 40, "p95": 90, "p99": 100, "max": 300}
    mean, longest = planning.row_tokens(lengths, 2048, 4)
    assert 30 < mean < 60 and mean < longest < 300
    assert planning.row_tokens(lengths, 2048, 1)[1] == pytest.approx(mean)
    cut_mean, cut_longest = planning.row_tokens(lengths, 64, 4)
    assert cut_mean < mean and cut_longest <= 64
    assert planning.row_tokens({"p50": 256, "p95": 256, "p99": 256, "max": 256}, 1024, 8) == pytest.approx((256, 256))


def test_no_dataset_gives_no_time_figure_but_says_what_is_missing(demo_workspace):
    config = demo_train_config("", max_steps=60)
    text = planning.time_estimate_text(config, demo_workspace)
    assert text == "choose a dataset to get a time estimate: the time depends on its token count."
    assert not any(character.isdigit() for character in text)


def test_cli_suggest_prints_reasons_and_starts_nothing(demo_workspace, capsys):
    data = write_jsonl(demo_workspace / "data.jsonl", capital_rows(8))
    config = demo_workspace / "train.yaml"
    config.write_text(f"model: {{name_or_path: demo}}\ndataset: {{source: {data}}}\nmax_seq_length: 2048\n")
    assert main.main(["--workspace", str(demo_workspace), "train", str(config), "--suggest"]) == 0
    out = capsys.readouterr().out
    assert "max_seq_length: 2048 → " in out and "p99" in out
    assert not (demo_workspace / "runs").exists() or not any((demo_workspace / "runs").iterdir())


# ---------------------------------------------------------------- early stopping


@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory, demo_model):
    """A run over-trained on 8 rows (a high learning rate) that early stopping must end before max_steps."""
    ws = tmp_path_factory.mktemp("early")
    (ws / "models").mkdir()
    (ws / "models" / demo_model.name).symlink_to(demo_model)
    data = write_jsonl(ws / "data.jsonl", capital_rows(8))
    config = demo_train_config(
        data,
        max_steps=60,
        learning_rate=5e-3,
        eval_split=0.25,
        eval_steps=2,
        save_steps=2,
        save_total_limit=2,  # with 1, transformers deletes every checkpoint but the best at the end
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_threshold=0.02,
    )
    run_dir = submit.submit("train", config, ws, "early")
    wait_for(lambda: jobs.job_status(run_dir).state in ("done", "failed", "stopped"), timeout=900)
    return run_dir


def test_over_trained_run_stops_by_itself_and_saves_the_best_checkpoint(early_stopped_run):
    import json

    from safetensors.torch import load_file

    run_dir = early_stopped_run
    status = jobs.job_status(run_dir)
    assert status.state == "done", status.error
    events = runfolder.read_events(run_dir)
    losses = {event.step: event.metrics["eval_loss"] for event in events if "eval_loss" in event.metrics}
    last_step = max(event.step for event in events if event.step is not None)
    assert last_step < 60, "early stopping did not stop the run"
    best_step = min(losses, key=losses.get)  # transformers' best: the lowest eval loss, improvement or not
    message = f"Early stopping at step {last_step}"
    assert message in status.note and f"step {best_step}" in status.note
    assert any(event.kind == "progress" and message in event.message for event in events)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    best = load_file(run_dir / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(run_dir / "checkpoints" / f"checkpoint-{last_step}" / "adapter_model.safetensors")
    assert saved.keys() == best.keys()
    assert all((saved[key] == best[key]).all() for key in saved)
    if best_step != last_step:
        assert any((saved[key] != last[key]).any() for key in saved), "the adapter is the last step's, not the best"
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{last_step}" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(losses[best_step])
    assert "dataset report:" in (run_dir / "log.txt").read_text()  # the report is logged before training


def test_a_finished_run_calibrates_the_next_estimate(early_stopped_run, demo_model):
    ws = early_stopped_run.parent.parent
    config = runfolder.stage_settings(early_stopped_run)
    from train_config import train_config_from_dict

    config = train_config_from_dict(config)
    estimate = planning.estimate_time(config, str(demo_model), report(6), ws, CPU)
    assert estimate.basis == "measured in run early"
    assert estimate.parts["start"] == planning.TIME_MODEL["cpu"]["start_s"]  # the overheads stay in
    other_stage = planning.estimate_time(dataclasses.replace(config, stage="grpo"), str(demo_model), report(6), ws, CPU)
    assert other_stage.basis.startswith("calibrated model")  # an SFT run's tokens/s is no GRPO pace


def test_the_time_estimate_reads_preference_data_in_its_stage_s_format(demo_workspace):
    rows = [{"prompt": f"Q{n}?", "chosen": f"A good answer {n}.", "rejected": "No."} for n in range(8)]
    data = write_jsonl(demo_workspace / "prefs.jsonl", rows)
    for stage in ("dpo", "orpo", "kto", "grpo"):
        text = planning.time_estimate_text(demo_train_config(data, stage=stage, max_steps=3), demo_workspace)
        assert text.startswith("≈ ") and "3 steps" in text and text.endswith("; data: prefs.jsonl"), (stage, text)
    config = demo_train_config(data, stage="dpo", max_steps=3)
    pairs = planning.dataset_report_for(config, demo_workspace)
    assert pairs.format == "pairs" and pairs.usable_rows == 8
    # DPO runs both replies of a row: twice the tokens of the same rows read one sequence each
    path = str(model_utils.demo_model_dir(demo_workspace))
    dpo = planning.estimate_time(config, path, pairs, demo_workspace, CPU)
    single = planning.estimate_time(config, path, dataclasses.replace(pairs, format="prompts"), demo_workspace, CPU)
    assert dpo.inputs["real_tokens"] == 2 * single.inputs["real_tokens"]
