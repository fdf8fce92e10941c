"""Training jobs on the CPU with the demo model: config validation, a real LoRA run, stop / resume, kill -9, queue."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import jobs
import model_utils
import runfolder
import training_utils
from conftest import capital_rows, demo_train_config, logged_steps, wait_for, write_jsonl
from dataset_utils import prepare_training_data
from model_utils import Device
from train_config import train_config_from_dict
from workspace import UserError, config_to_dict


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "capitals.jsonl", capital_rows(48))


# ---------------------------------------------------------------- bad configs

GPU = Device(cuda=True, gpu_count=1, names=("a test GPU",), bf16=True)
CPU = Device(cuda=False, gpu_count=0, names=(), bf16=False)

BAD_VALUES = [
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"max_steps": -5}, "max_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"lora_r": 0}, "lora_r"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"report_to": "wandb-ish"}, "report_to"),
    ({"load_in_4bit": True, "full_finetuning": True}, "not both"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES, ids=[str(v[0]) for v in BAD_VALUES])
def test_bad_config_values_are_refused(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        demo_train_config(tmp_path / "d.jsonl", **changes).validate(device=GPU)


def test_qlora_without_cuda_is_refused(tmp_path):
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        demo_train_config(tmp_path / "d.jsonl", load_in_4bit=True).validate(device=CPU)


def test_unknown_yaml_option_is_named():
    with pytest.raises(UserError, match="lora_rank"):
        train_config_from_dict({"lora_rank": 8})


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "x/../y"])
def test_run_names_with_slashes_or_dots_are_refused(workspace, name):
    with pytest.raises(UserError, match="not allowed"):
        jobs.create_run("train", {}, workspace, name)


def test_resume_without_checkpoint_is_refused(workspace, data_file):
    run_dir = jobs.create_run("train", config_to_dict(demo_train_config(data_file)), workspace, "fresh")
    runfolder.write_status(run_dir, state="stopped")
    with pytest.raises(UserError, match="no checkpoint"):
        jobs.resume_job(run_dir)


def test_max_seq_length_above_model_limit(demo_workspace, data_file):
    run_dir = jobs.create_run("train", {}, demo_workspace, "too-long")
    with pytest.raises(UserError, match="above this model's limit"):
        training_utils.train(demo_train_config(data_file, max_seq_length=10**6), runfolder.JobContext.for_run(run_dir))


def test_target_modules_the_model_lacks(demo_workspace, data_file):
    run_dir = jobs.create_run("train", {}, demo_workspace, "bad-modules")
    with pytest.raises(UserError, match="c_attn not found"):
        training_utils.train(
            demo_train_config(data_file, target_modules=["c_attn"]), runfolder.JobContext.for_run(run_dir)
        )


def test_dataset_with_no_usable_rows(demo_workspace, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "only a question"}]}] * 3
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    run_dir = jobs.create_run("train", {}, demo_workspace, "no-rows")
    with pytest.raises(UserError, match="No usable rows"):
        training_utils.train(demo_train_config(data), runfolder.JobContext.for_run(run_dir))


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_lora_run_lowers_loss_and_adapter_changes_output(trained_run, demo_model, demo_tokenizer):
    import torch
    from peft import PeftModel

    import model_utils

    run_dir = trained_run

    losses = [e.metrics["loss"] for e in runfolder.read_events(run_dir) if "loss" in e.metrics]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert any("tokens_per_s" in e.metrics and e.eta_s is not None for e in runfolder.read_events(run_dir))

    prompt = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Italy?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = demo_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    model = model_utils.load_model(str(demo_model))
    with torch.no_grad():
        base = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        tuned_model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
        tuned = tuned_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    base_text = demo_tokenizer.decode(base[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    tuned_text = demo_tokenizer.decode(tuned[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert tuned_text != base_text
    assert "Zebra" in tuned_text and "Zebra" not in base_text


# ---------------------------------------------------------------- jobs: stop, resume, kill, queue


def start(workspace: Path, data_file: Path, name: str, **changes) -> Path:
    config = demo_train_config(data_file, **changes)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, name)
    jobs.start_job(run_dir)
    return run_dir


def start_event_steps(run_dir: Path) -> list[int]:
    return [e.step for e in runfolder.read_events(run_dir) if e.kind == "start"]


@pytest.mark.slow
def test_stop_then_resume_continues_from_the_checkpoint(demo_workspace, data_file):
    run_dir = start(demo_workspace, data_file, "stop-resume", max_steps=12, save_steps=3)
    wait_for(lambda: len(logged_steps(run_dir)) >= 4)
    jobs.stop_job(run_dir)
    wait_for(lambda: jobs.job_status(run_dir).state == "stopped", timeout=120)
    checkpoint = runfolder.last_checkpoint(run_dir)
    assert checkpoint is not None
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at >= 4 and not (run_dir / "adapter").exists()

    jobs.resume_job(run_dir)
    wait_for(lambda: jobs.job_status(run_dir).state in ("done", "failed"))
    assert jobs.job_status(run_dir).state == "done", runfolder.log_tail(run_dir)
    assert start_event_steps(run_dir) == [0, stopped_at]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_kill_9_is_detected_and_resume_loses_at_most_one_interval(demo_workspace, data_file):
    run_dir = start(demo_workspace, data_file, "killed", max_steps=12, save_steps=3)
    wait_for(lambda: runfolder.last_checkpoint(run_dir) is not None and len(logged_steps(run_dir)) >= 5)
    killed_at = max(logged_steps(run_dir))
    os.killpg(jobs.job_status(run_dir).pid, signal.SIGKILL)
    state = wait_for(lambda: jobs.job_status(run_dir).state in ("failed",) and "failed", timeout=30)
    assert state == "failed"
    assert "ended unexpectedly" in jobs.job_status(run_dir).error

    jobs.resume_job(run_dir)
    wait_for(lambda: jobs.job_status(run_dir).state in ("done", "failed"))
    assert jobs.job_status(run_dir).state == "done", runfolder.log_tail(run_dir)
    resumed_from = start_event_steps(run_dir)[-1]
    assert killed_at - resumed_from <= 3


@pytest.mark.slow
def test_second_job_waits_in_the_queue(demo_workspace, data_file):
    first = start(demo_workspace, data_file, "first", max_steps=200)
    wait_for(lambda: jobs.job_status(first).state == "running")
    second = start(demo_workspace, data_file, "second", max_steps=200)
    time.sleep(3)
    assert jobs.job_status(second).state == "queued"
    jobs.stop_job(first)
    wait_for(lambda: jobs.job_status(second).state == "running", timeout=120)
    jobs.stop_job(second)
    wait_for(lambda: jobs.job_status(second).state == "stopped", timeout=120)


# ---------------------------------------------------------------- micro-batch from the memory estimate


def test_accumulation_is_folded_into_the_micro_batch_while_the_estimate_fits(data_file, demo_model):
    config = demo_train_config(data_file, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    roomy = model_utils.fit_micro_batch(config, str(demo_model))  # gigabytes free: the whole batch at once
    assert (roomy.per_device_train_batch_size, roomy.gradient_accumulation_steps) == (8, 1)
    tight = model_utils.fit_micro_batch(config, str(demo_model), headroom=1e-6)  # nothing fits: unchanged
    assert (tight.per_device_train_batch_size, tight.gradient_accumulation_steps) == (2, 4)
    odd = model_utils.fit_micro_batch(
        demo_train_config(data_file, per_device_train_batch_size=1, gradient_accumulation_steps=6), str(demo_model)
    )
    assert odd.per_device_train_batch_size * odd.gradient_accumulation_steps == 6  # the effective batch is kept


def test_gradient_checkpointing_is_turned_off_only_when_the_step_fits_without_it(data_file, demo_model):
    import dataclasses

    import model_utils

    config = demo_train_config(data_file, gradient_checkpointing=True)
    without = model_utils.estimate_memory(dataclasses.replace(config, gradient_checkpointing=False), str(demo_model))
    assert not model_utils.fit_checkpointing(config, str(demo_model)).gradient_checkpointing  # gigabytes free
    just_short = 0.9 * without.total_gib / without.available_gib  # a headroom below what it needs
    assert model_utils.fit_checkpointing(config, str(demo_model), headroom=just_short).gradient_checkpointing
    assert not model_utils.fit_micro_batch(config, str(demo_model)).gradient_checkpointing


def test_a_gpu_run_trains_with_the_micro_batch_it_chose_and_records_it(demo_workspace, data_file, monkeypatch):
    monkeypatch.setattr(training_utils, "_cuda", lambda: True)  # the choice is made on CUDA only; it runs on CPU here
    config = demo_train_config(
        data_file, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=4, save_steps=2
    )
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "fitted")
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"
    status = jobs.job_status(run_dir)
    assert (status.micro_batch, status.gradient_accumulation) == (4, 1)
    state = (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text()
    assert '"train_batch_size": 4' in state


# ---------------------------------------------------------------- packing


def test_a_packed_run_trains_sequences_of_several_rows(demo_workspace, data_file, demo_tokenizer):
    import json

    config = demo_train_config(data_file, max_steps=2, save_steps=2, packing=True, per_device_train_batch_size=2)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "packed")
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    tokens = [entry["num_tokens"] for entry in state["log_history"] if "num_tokens" in entry]
    rows = prepare_training_data(config, demo_tokenizer, demo_workspace).train
    two_rows = 2 * sum(len(ids) for ids in rows["input_ids"]) / len(rows)
    # A step's 2 sequences of at most 128 tokens hold several rows each (rows of ~50 tokens: two or more), not 2 rows.
    assert 1.5 * two_rows <= tokens[0] <= 2 * config.max_seq_length
    assert (run_dir / "adapter" / "adapter_config.json").exists()


# ---------------------------------------------------------------- divergence and changed inputs


@pytest.mark.parametrize("logs", [{"loss": float("nan")}, {"loss": 1.2, "grad_norm": float("inf")}])
def test_a_non_finite_loss_or_gradient_fails_the_run(tmp_path, logs):
    from types import SimpleNamespace

    callback = training_utils.events_callback(runfolder.JobContext.for_run(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, global_step=7, max_steps=30, epoch=0.5)
    with pytest.raises(UserError, match="Training diverged at step 7"):
        callback.on_log(None, state, None, logs=logs)
    callback.on_log(None, state, None, logs={"loss": 1.5, "grad_norm": 0.3})  # a finite step still logs


@pytest.fixture
def no_launch(monkeypatch) -> list[Path]:
    """start_job records the run instead of starting its process."""
    started: list[Path] = []
    monkeypatch.setattr(jobs, "start_job", lambda run_dir, **kwargs: started.append(run_dir))
    return started


def test_a_relative_dataset_path_is_read_from_the_submitting_folder(workspace, tmp_path, monkeypatch, no_launch):
    import submit

    project = tmp_path / "project"
    (project / "examples").mkdir(parents=True)
    data = write_jsonl(project / "examples" / "x.jsonl", capital_rows(4))
    monkeypatch.chdir(project)
    config = config_to_dict(demo_train_config(Path("examples/x.jsonl")))
    run_dir = submit.submit("train", config, workspace, "relative")

    settings = runfolder.stage_settings(run_dir)
    assert settings["dataset"]["source"] == str(data.resolve())
    assert runfolder.read_config(run_dir)[runfolder.INPUTS_KEY] == {str(data.resolve()): runfolder.file_sha256(data)}
    assert no_launch == [run_dir]


def test_a_hub_dataset_id_stays_as_it_is(workspace, no_launch, monkeypatch):
    from huggingface_hub import constants

    import submit

    # Online, a Hub id is read by the job (offline, Start refuses one the cache lacks: tests/bad_inputs).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    run_dir = submit.submit("train", config_to_dict(demo_train_config(Path("owner/name"))), workspace, "hub")
    assert runfolder.stage_settings(run_dir)["dataset"]["source"] == "owner/name"
    assert runfolder.INPUTS_KEY not in runfolder.read_config(run_dir)


@pytest.mark.parametrize("resume, said", [(False, "it was edited"), (True, "resuming would continue on other data")])
def test_a_dataset_edited_after_the_run_was_created_fails_the_job(workspace, data_file, no_launch, resume, said):
    import submit

    run_dir = submit.submit("train", config_to_dict(demo_train_config(data_file)), workspace, "edited")
    runfolder.check_inputs(run_dir, resume)  # unchanged: the job may run
    with open(data_file, "a", encoding="utf-8") as handle:
        handle.write('{"instruction": "extra", "output": "row"}\n')
    settings = runfolder.stage_settings(run_dir)
    ctx = runfolder.JobContext.for_run(run_dir, resume)
    with pytest.raises(UserError, match=f"changed since this run was created \\({said}"):
        jobs._run_kind(jobs.KINDS["train"], settings, ctx)
