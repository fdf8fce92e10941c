"""The training stages' records: a stage registered in one place reaches the settings and the CLI, the Train tab, the
data, the live view and the comparison; each real stage's record agrees with the modules it names."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

import compare_utils
import dataset_utils
import jobs
import main
import preference_data
import runfolder
import settings
import stages
from conftest import demo_train_config
from dataset_utils import DatasetConfig
from train_config import TrainConfig, train_config_from_dict
from workspace import UserError, config_to_dict, dump_yaml


def _no_trainer(config, model, tokenizer, ctx, backend):
    raise AssertionError("the toy stage trains nothing here")


def toy_record(**changes) -> stages.Stage:
    values = dict(
        name="toy",
        title="TOY",
        help="a stage of this test",
        data_formats=("pairs",),
        check=lambda config: None,
        trainer=_no_trainer,
        metrics={"toy/score": "toy_score"},
        metric_labels={"toy_score": "toy score"},
        settings=("beta",),
    )
    return stages.Stage(**{**values, **changes})


@pytest.fixture
def toy():
    """A stage registered by this test alone, gone again afterwards."""
    yield stages.register(toy_record())
    stages.unregister("toy")


# ---------------------------------------------------------------- one registration reaches every reader


def test_a_registered_stage_is_a_choice_of_the_settings_and_the_cli(toy, workspace, capsys):
    assert "toy" in settings.describe(TrainConfig, "stage").choice_list()
    data = workspace / "data.jsonl"
    config = train_config_from_dict({"model": "demo", "dataset": str(data), "stage": "toy"})
    config.validate()  # what `main.py train` runs before anything else

    unknown = workspace / "unknown.yaml"
    unknown.write_text(dump_yaml({"model": "demo", "dataset": str(data), "stage": "nope"}))
    assert main.main(["--workspace", str(workspace), "train", str(unknown)]) == 2
    error = capsys.readouterr().err
    assert "stage must be one of: sft, dpo, orpo, kto, grpo, toy" in error


def test_a_registered_stage_runs_its_own_check(workspace):
    checked = []
    stages.register(toy_record(check=lambda config: checked.append(config.beta)))
    try:
        train_config_from_dict({"dataset": "x.jsonl", "stage": "toy", "beta": 0.25}).validate()
    finally:
        stages.unregister("toy")
    assert checked == [0.25]


def test_a_registered_stage_is_a_choice_of_the_train_tab(toy):
    import gradio as gr

    from ui import forms, train_tab

    form = forms.Form()
    with gr.Blocks():
        train_tab.build(form)
    assert [value for _, value in form.widgets["stage"].choices] == ["sft", "dpo", "orpo", "kto", "grpo", "toy"]
    assert "beta" in form.widgets  # the toy stage's own setting


def test_a_registered_stage_s_metrics_reach_the_events_the_live_view_and_the_comparison(toy, workspace, capsys):
    from types import SimpleNamespace

    import training_utils
    from ui.train_tab import stage_parts

    runs = []
    for name, score in (("toy-a", 0.5), ("toy-b", 0.75)):
        config = demo_train_config(workspace / "data.jsonl", stage="toy")
        run_dir = jobs.create_run("train", config_to_dict(config), workspace, name)
        # The trainer's log goes through the job's own events callback, as in training.
        callback = training_utils.events_callback(runfolder.JobContext.for_run(run_dir))
        state = SimpleNamespace(is_world_process_zero=True, global_step=1, max_steps=1, epoch=1.0)
        callback.on_log(None, state, None, logs={"loss": 1.0, "toy/score": score})
        runfolder.write_status(run_dir, state="done")
        runs.append(run_dir)

    latest = runfolder.read_progress(runs[0]).metrics
    assert latest["toy_score"] == 0.5
    assert stage_parts(latest) == ["toy score 0.5"]
    comparison = compare_utils.compare_runs(["toy-a", "toy-b"], workspace)
    assert [(run.stage, run.stage_metrics) for run in comparison.runs] == [
        ("toy", {"toy_score": 0.5}),
        ("toy", {"toy_score": 0.75}),
    ]
    assert compare_utils.metric_columns(comparison)[-1] == "toy score"
    assert main.main(["--workspace", str(workspace), "runs", "--compare", "toy-a", "toy-b"]) == 0
    assert "toy score" in capsys.readouterr().out


def test_a_registered_stage_reads_its_data_formats(toy):
    pairs = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
    fmt, converted = preference_data.convert_rows(pairs, list(pairs[0]), "toy", DatasetConfig("x"))
    assert fmt == "pairs" and converted[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    with pytest.raises(UserError, match="TOY needs prompt / chosen / rejected columns"):
        preference_data.convert_rows([{"text": "a"}], ["text"], "toy", DatasetConfig("x"))


def _finished_run(workspace: Path, name: str, stage: str) -> Path:
    """A finished training run of `stage` with a (tiny, fake) LoRA adapter."""
    config = demo_train_config(workspace / "data.jsonl", stage=stage)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, name)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "demo"}))
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    runfolder.write_status(run_dir, state="done")
    return run_dir


def test_chat_export_and_the_arena_refuse_a_stage_that_makes_no_causal_lm(workspace):
    import arena_utils
    import gguf_utils
    import inference_utils

    stages.register(toy_record(causal_lm=False))
    try:
        toy_run = _finished_run(workspace, "toy-run", "toy")
        sft_run = _finished_run(workspace, "sft-run", "sft")
        assert stages.causal_lm(sft_run).stage == "sft" and stages.generates_text(sft_run)
        assert not stages.generates_text(toy_run)
        refusal = "trained a TOY model, which generates no text"
        with pytest.raises(UserError, match=refusal):
            inference_utils.trained_run("toy-run", workspace)
        with pytest.raises(UserError, match=refusal):
            gguf_utils.export_source("toy-run", workspace)
        with pytest.raises(UserError, match=refusal):
            arena_utils.check_contestants(arena_utils.ArenaConfig(contestants=["run:toy-run", "base:demo"]), workspace)
    finally:
        stages.unregister("toy")


# ---------------------------------------------------------------- the registry


def test_an_unknown_stage_is_refused_with_the_known_ones():
    with pytest.raises(UserError, match="Unknown stage 'rm'; one of: sft, dpo, orpo, kto, grpo."):
        stages.get("rm")


def test_a_record_cannot_be_changed_after_it_is_made():
    with pytest.raises(dataclasses.FrozenInstanceError):
        stages.DPO.title = "changed"
    with pytest.raises(TypeError):
        stages.DPO.metrics["rewards/margins"] = "changed"


def test_the_stage_setting_lists_every_stage_with_its_help():
    option = settings.describe(TrainConfig, "stage")
    assert option.choice_list() == stages.names() == ("sft", "dpo", "orpo", "kto", "grpo")
    assert all(f"{stage.name}: {stage.help}" in option.help for stage in stages.all_stages())


# ---------------------------------------------------------------- each real stage's record


@pytest.mark.parametrize("stage", stages.all_stages(), ids=stages.names())
def test_a_stage_s_data_formats_are_ones_the_data_modules_read(stage):
    if stage.name == "sft":
        assert stage.data_formats == dataset_utils.FORMATS
    else:
        assert set(stage.data_formats) <= set(preference_data.NEEDED_COLUMNS)


@pytest.mark.parametrize("stage", stages.all_stages(), ids=stages.names())
def test_a_stage_s_check_and_trainer_are_functions_of_their_modules(stage):
    for named in (stage.check, stage.trainer):
        module, _, function = named.target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), named.target


@pytest.mark.parametrize("stage", stages.all_stages(), ids=stages.names())
def test_a_stage_labels_only_metrics_it_logs_and_names_only_its_config_s_settings(stage):
    clock = {"completions_per_s", "generation_share"} if stage.generates else set()
    assert set(stage.metric_labels) <= set(stage.metrics.values()) | clock
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(stage.settings) <= fields
    assert stage.causal_lm  # every stage so far trains a LoRA adapter or a full model that writes text
