"""The app without a browser: serving rules, the training form, error messages, uploads, and the live views read
back from real run folders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

import dataset_utils
import jobs
import runfolder
import settings
import ui
from dataset_utils import DatasetConfig
from model_utils import ModelConfig
from train_config import TrainConfig
from ui import common, forms, runs_tab, train_tab
from workspace import UserError, config_to_dict

ROOT = Path(__file__).resolve().parent.parent


def test_a_public_link_without_a_password_is_refused(monkeypatch):
    monkeypatch.delenv(ui.AUTH_ENV, raising=False)
    with pytest.raises(UserError, match="needs a password"):
        ui.serve(share=True)


@pytest.mark.slow
def test_the_command_line_refuses_share_without_auth(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "main.py", "--share", "--workspace", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "needs a password" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["admin", ":secret", "admin:"])
def test_auth_must_be_user_and_password(value):
    with pytest.raises(UserError, match="USER:PASS"):
        ui.parse_auth(value)


def test_auth_comes_from_the_environment_too(monkeypatch):
    monkeypatch.setenv(ui.AUTH_ENV, "ana:pa:ss")
    assert ui.parse_auth(None) == ("ana", "pa:ss")


def test_every_tab_is_built(workspace):
    app = ui.build_app(workspace)
    labels = [block.label for block in app.blocks.values() if isinstance(block, gr.Tab)]
    for tab in ("Model", "Dataset", "Synthetic data", "Train", "Test & compare", "Export", "Runs"):
        assert tab in labels


def test_every_train_config_option_has_a_widget(workspace):
    import dataclasses

    from ui import dataset_tab, model_tab

    form = forms.Form()
    with gr.Blocks():
        model_tab.build(form, workspace)
        dataset_tab.build(form)
        train_tab.build(form)
    covered = {"load_in_4bit": "mode", "full_finetuning": "mode", "dataset.column_map": "map.output"}
    # Set in YAML or by flag only: the form has no list-of-numbers widget (the UI weighs every reward 1).
    yaml_only = {"reward_weights"}
    for prefix, config in (("", TrainConfig()), ("model.", ModelConfig()), ("dataset.", DatasetConfig())):
        for field in dataclasses.fields(config):
            key = prefix + field.name
            if key not in ("model", "dataset", *yaml_only):
                assert covered.get(key, key) in form.widgets, f"no widget for {key}"


def test_widget_defaults_are_the_train_config_defaults():
    assert forms.values_to_config(forms.config_to_values(TrainConfig())) == TrainConfig()


def test_widget_values_become_the_run_config():
    values = {
        **forms.DEFAULTS,
        "mode": "full",
        "max_steps": 0,
        "map.output": "answer",
        "map.instruction": "question",
        "map.input": "",
        "dataset.source": "  data.csv ",
        "lora_r": 8,
    }
    config = forms.values_to_config(values)
    assert config.full_finetuning and not config.load_in_4bit
    assert config.max_steps is None
    assert config.dataset.column_map == {"output": "answer", "instruction": "question"}
    assert config.dataset.source == "data.csv"
    assert config.lora_r == 8


def test_a_preset_holds_the_settings_but_not_the_data():
    config = forms.values_to_config({**forms.DEFAULTS, "dataset.source": "mine.jsonl", "lora_r": 4})
    preset = forms.preset_values(config)
    assert "dataset" not in preset and preset["lora_r"] == 4 and preset["model"]["name_or_path"] == "demo"


def test_widgets_take_label_help_bounds_and_choices_from_the_field():
    with gr.Blocks():
        batch = forms.widget(TrainConfig, "per_device_train_batch_size")
        optim = forms.widget(TrainConfig, "optim")
        source = forms.widget(TrainConfig, "dataset.source")
    assert (batch.label, batch.minimum, batch.precision, batch.value) == ("Batch size", 1, 0, 2)
    assert batch.info == settings.describe(TrainConfig, "per_device_train_batch_size").help
    assert ("adamw_torch", "adamw_torch") in optim.choices and optim.value == "adamw_torch"
    assert isinstance(source, gr.Textbox) and source.label == "Dataset (path or Hub id)"


def test_user_errors_reach_the_page_as_readable_messages():
    @common.guarded
    def handler():
        raise UserError("Column 'output' not found; columns are: <prompt>, answer.")

    with pytest.raises(gr.Error) as caught:
        handler()
    assert caught.value.message == "Column &#x27;output&#x27; not found; columns are: &lt;prompt&gt;, answer."


def test_unexpected_errors_in_streaming_handlers_are_named_without_a_traceback():
    @common.guarded
    def handler():
        yield "partial"
        raise KeyError("reply")

    stream = handler()
    assert next(stream) == "partial"
    with pytest.raises(gr.Error, match="KeyError"):
        next(stream)


def test_uploads_are_copied_into_the_workspace_without_overwriting(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # save_upload takes only files from Gradio's upload folder
    first = tmp_path / "a" / "data.jsonl"
    second = tmp_path / "b" / "data.jsonl"
    for path, text in ((first, "one\n"), (second, "two\n")):
        path.parent.mkdir()
        path.write_text(text)
    saved_first = common.save_upload(first, workspace)
    assert saved_first == workspace / "uploads" / "data.jsonl"
    assert common.save_upload(first, workspace) == saved_first  # same content: same file
    saved_second = common.save_upload(second, workspace)
    assert saved_second == workspace / "uploads" / "data-2.jsonl"
    assert saved_first.read_text() == "one\n" and saved_second.read_text() == "two\n"


def finished_run(workspace: Path, name: str, state: str) -> Path:
    """A run folder written through the supervisor and the reporter, as a training job leaves it."""
    run_dir = jobs.create_run("train", config_to_dict(TrainConfig()), workspace, name)
    reporter = runfolder.Reporter(run_dir)
    reporter.start(0, 4)
    for step, loss in ((1, 2.5), (2, 2.1), (3, 1.8), (4, 1.6)):
        reporter.log(step, 4, loss=loss, tokens_per_s=900.0, eta_s=10.0 * (4 - step), memory_gib=1.25)
    reporter.log(4, 4, eval_loss=1.9)
    runfolder.write_status(run_dir, state=state)
    return run_dir


def test_live_view_of_a_finished_run(workspace):
    finished_run(workspace, "train-done", "done")
    status, plot, _log, start, stop, resume, hint, timer = train_tab.live_view("train-done", workspace)
    assert "done" in status and "step 4/4" in status and "loss 1.6000" in status and "eval loss 1.9000" in status
    assert "900 tokens/s" in status and "memory 1.25 GiB" in status
    assert sorted(set(plot["series"])) == ["eval", "train"] and len(plot) == 5
    assert start.interactive and not stop.interactive and not resume.interactive
    assert "Resume: Run 'train-done' finished" in hint
    assert timer.active is False


def test_a_stopped_run_with_a_checkpoint_can_resume(workspace):
    run_dir = finished_run(workspace, "train-stopped", "stopped")
    *_, resume, hint, _timer = train_tab.live_view("train-stopped", workspace)
    assert not resume.interactive and "no checkpoint" in hint
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    *_, resume, hint, _timer = train_tab.live_view("train-stopped", workspace)
    assert resume.interactive and "Resume" not in hint


def test_a_running_run_queues_the_next_start_and_keeps_polling(workspace):
    run_dir = finished_run(workspace, "train-live", "running")
    runfolder.write_status(run_dir, pid=None)  # no pid yet: the job is starting
    _status, _plot, _log, start, stop, _resume, hint, timer = train_tab.live_view("train-live", workspace)
    # As on the command line, a second run may be started: it waits in the queue for the GPU.
    assert start.interactive and "still active" in hint and "queue" in hint
    assert stop.interactive and timer.active is True


def test_runs_tab_shows_config_metrics_and_outputs(workspace):
    run_dir = finished_run(workspace, "train-shown", "done")
    (run_dir / "adapter").mkdir()
    runfolder.write_status(run_dir, state="done")
    (run_dir / "progress.json").write_text(json.dumps({"step": 4, "loss": 1.6}))
    status, config, metrics, plot, _log, delete = runs_tab.run_details("train-shown", workspace)
    assert "train-shown" in status and "kind: train" in config
    assert metrics["progress"]["loss"] == 1.6 and "adapter/" in metrics["outputs"]
    assert len(plot) == 5 and delete.interactive


def test_seed_examples_name_the_bad_line():
    rows = dataset_utils.parse_jsonl('{"instruction": "a", "response": "b"}\n\n', "Seed example")
    assert rows == [{"instruction": "a", "response": "b"}]
    with pytest.raises(UserError, match="line 2"):
        dataset_utils.parse_jsonl('{"instruction": "a", "response": "b"}\n[1, 2]', "Seed example")


def test_the_colab_notebook_installs_gpu_requirements_and_shares_with_a_password():
    notebook = json.loads((ROOT / "notebooks" / "colab.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for source in sources:
        compile(source, "colab cell", "exec")
    text = "\n".join(sources)
    assert "requirements-gpu.txt" in text and '"--share", "--auth"' in text and "secrets.token_urlsafe" in text


def test_the_live_view_names_the_gpus_their_memory_the_micro_batch_and_a_fallback(tmp_path):
    status = runfolder.Status(
        state=runfolder.State.RUNNING,
        processes=2,
        device="GPU",
        micro_batch=8,
        gradient_accumulation=1,
        note="The installed Unsloth does not support multi-GPU training; this run uses transformers + PEFT.",
    )
    metrics = {"loss": 1.5, "memory_gib": 3.3, "gpu_memory_gib": [7.05, 5.67]}
    runfolder.append_event(tmp_path, runfolder.Event(runfolder.EventKind.LOG, step=3, total=10, metrics=metrics))
    events = runfolder.EventLog(tmp_path).update()
    line = train_tab.status_line("ddp", status, events)
    for shown in ("step 3/10", "2 GPUs", "per GPU 7.0, 5.7 GiB", "micro-batch 8 × 1", "transformers + PEFT"):
        assert shown in line, line
    cpu = train_tab.status_line("ddp", dataclasses.replace(status, device="CPU", micro_batch=None, note=""), events)
    assert "2 processes" in cpu and "micro-batch" not in cpu


def _log(run_dir, step, loss, total=100_000):
    event = runfolder.Event(runfolder.EventKind.LOG, step=step, total=total, metrics={"loss": loss})
    runfolder.append_event(run_dir, event)


def test_the_live_view_reads_only_the_events_appended_since_its_last_poll(tmp_path):
    events = runfolder.EventLog(tmp_path)
    assert events.update().step is None and events.losses() == []
    _log(tmp_path, 1, 2.0)
    _log(tmp_path, 2, 1.5)
    assert events.update().count == 2 and events.step == 2
    # A line still being written waits; the lines before it were read once and are not read again.
    with open(tmp_path / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"event": "log", "step": 3, "max_steps": 100000, "lo')
    assert events.update().count == 2
    with open(tmp_path / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write('ss": 1.25}\n')
    assert events.update().count == 3 and events.latest["loss"] == 1.25
    # The run deleted and started again under its name: the new file is read from its start.
    (tmp_path / "events.jsonl").unlink()
    _log(tmp_path, 1, 9.0)
    assert events.update().count == 1 and events.losses() == [("train", 1, 9.0)]


def test_the_loss_chart_of_a_long_run_stays_small_and_skips_damaged_values(tmp_path):
    lines = [
        json.dumps({"event": "log", "step": step, "max_steps": 200_000, "loss": 1 / step}) + "\n"
        for step in range(1, 200_001)
    ]
    lines.insert(10, '{"event": "log", "step": 11, "loss": "NaN?"}\n')
    lines.insert(20, "not json\n")
    (tmp_path / "events.jsonl").write_text("".join(lines), encoding="utf-8")
    frame = common.loss_frame(runfolder.EventLog(tmp_path).update())
    assert 1000 <= len(frame) <= 2001
    assert frame["step"].iloc[0] == 1 and frame["step"].iloc[-1] == 200_000  # the newest step is always shown
    assert frame["loss"].map(lambda value: isinstance(value, float)).all()


def test_the_column_mapping_offers_each_column_with_its_first_value():
    from ui import dataset_tab

    rows = {"customer_message": ["How do I reset my password, please?\nThanks"], "agent_reply": [""], "n": [3]}
    choices = dataset_tab.column_choices(list(rows), rows)
    assert choices == [
        ("customer_message — “How do I reset my password, please? Than…”", "customer_message"),
        ("agent_reply", "agent_reply"),
        ("n — “3”", "n"),
    ]
    opened, closed = dataset_tab.mapping_section(True), dataset_tab.mapping_section(False)
    assert opened.open and "format was not detected" in opened.label and not closed.open


def test_the_preview_says_why_the_first_skipped_row_is_skipped(tmp_path, demo_tokenizer):
    from ui import dataset_tab

    path = tmp_path / "support.csv"
    path.write_text("question,answer\nWhere is my order?,It ships tomorrow.\nCan I pay by card?,\n", encoding="utf-8")
    config = DatasetConfig(source=str(path), column_map={"instruction": "question", "output": "answer"})
    prepared = dataset_utils.prepare_dataset(config, demo_tokenizer, workspace=tmp_path)
    assert dataset_tab._stats(prepared) == (
        "Format **alpaca**: 2 rows read, **1 skipped** (first: row 2: Turn 2 (assistant) is empty; *Report* lists "
        "every one); 1 train, 0 eval."
    )


# ---------------------------------------------------------------- a newcomer's first hour (issue 30, part B)


def test_the_test_tab_lists_a_new_gguf_of_the_same_run_and_keeps_the_chosen_file(workspace):
    from ui import test_tab

    run_dir = finished_run(workspace, "train-gguf", "done")
    assert test_tab.weights_dropdown("train-gguf", "", workspace).choices == [test_tab.PYTORCH]
    (run_dir / "gguf").mkdir()
    (run_dir / "gguf" / "model-q8_0.gguf").write_bytes(b"GGUF")
    refreshed = test_tab.weights_dropdown("train-gguf", "", workspace)
    assert ("GGUF: model-q8_0.gguf", "model-q8_0.gguf") in refreshed.choices and refreshed.value == ""
    assert test_tab.weights_dropdown("train-gguf", "model-q8_0.gguf", workspace).value == "model-q8_0.gguf"
    assert test_tab.weights_dropdown("train-gguf", "gone.gguf", workspace).value == ""


def test_a_finished_job_line_says_done_once(workspace):
    run_dir = finished_run(workspace, "export-x", "done")
    runfolder.Reporter(run_dir).progress(4, 4, "done", force=True)
    line = common.job_html("export-x", jobs.job_status(run_dir), runfolder.read_progress(run_dir))
    import re

    assert re.sub("<[^>]+>", "", line).count("done") == 1  # the text a person reads, not "done · done"


def test_disabled_stop_buttons_are_not_red_and_hints_are_not_errors():
    assert "button.stop:disabled" in ui.CSS
    assert "#train-hint" in ui.CSS and "#export-hint" in ui.CSS


def test_a_hub_id_not_downloaded_gets_downloads_words_at_once_when_the_hub_is_out_of_reach(workspace):
    import time

    import download_utils
    from ui import model_tab

    config = TrainConfig(model=ModelConfig(name_or_path="someone/not-downloaded-model"))
    started = time.monotonic()
    with pytest.raises(UserError) as estimate:
        model_tab.memory_estimate(config, workspace)
    assert time.monotonic() - started < 10  # no background retries (they took ~40 s)
    with pytest.raises(UserError) as download:
        download_utils.check_download("someone/not-downloaded-model")
    assert str(estimate.value) == str(download.value)


def test_the_stage_section_shows_only_the_chosen_stages_fields():
    assert not any(train_tab.stage_field_visibility("sft").values())  # SFT has no fields of its own
    dpo = train_tab.stage_field_visibility("dpo")
    assert dpo["beta"] and dpo["start_from_run"] and not dpo["judge_model"] and not dpo["num_generations"]
    grpo = train_tab.stage_field_visibility("grpo")
    assert grpo["judge_model"] and grpo["reward_funcs"] and grpo["beta"]


def test_a_stopped_run_with_a_checkpoint_offers_it_as_its_model(workspace):
    run_dir = finished_run(workspace, "train-halfway", "stopped")
    with pytest.raises(UserError, match="no trained model yet"):
        runfolder.trained_model(run_dir)
    assert common.model_runs(workspace) == []
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "adapter_config.json").write_text('{"base_model_name_or_path": "demo"}')
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    trained = runfolder.trained_model(run_dir)
    assert (trained.path, trained.kind, trained.base_model) == (checkpoint, "adapter", "demo")
    assert common.model_runs(workspace) == [("train-halfway (stopped: checkpoint-2)", "train-halfway")]
    runfolder.write_status(run_dir, state="running")  # a run still going: its checkpoints are not its model
    with pytest.raises(UserError, match="no trained model yet"):
        runfolder.trained_model(run_dir)


def test_chat_compares_greedily_unless_asked_to_sample():
    from inference_utils import GenerationConfig

    assert GenerationConfig().temperature == 0


def test_the_train_tab_says_which_model_and_data_start_takes():
    line = train_tab.start_summary(dict(forms.DEFAULTS))
    assert "`demo` (16-bit LoRA)" in line and "no dataset chosen yet" in line and "SFT, 60 steps" in line
    values = {
        **forms.DEFAULTS,
        "dataset.source": "uploads/prefs.jsonl",
        "stage": "dpo",
        "start_from_run": "sft-run",
        "max_steps": 0,
        "num_train_epochs": 2,
    }
    assert "on `uploads/prefs.jsonl`: DPO, from run `sft-run`, 2 epochs." in train_tab.start_summary(values)


def test_stop_says_it_waits_for_the_current_step_and_how_long_the_last_took(workspace):
    run_dir = jobs.create_run("train", config_to_dict(TrainConfig()), workspace, "train-slow")
    logged = [
        {"event": "log", "time": 1000.0 + 156.0 * step, "step": step, "max_steps": 10, "loss": 2.0} for step in (1, 2)
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logged))
    assert runfolder.EventLog(run_dir).update().step_s == 156.0
    runfolder.write_status(run_dir, state="running")
    *_, hint, _timer = train_tab.live_view("train-slow", workspace)
    assert "Stop: ends the run once the current step is done (the last one took 2:36)" in hint
    assert "waiting for the current step" in train_tab.stop_note("stopping", 156.0)
    assert "(the last one took 2:36)" in train_tab.stop_note("stopping", 156.0)
