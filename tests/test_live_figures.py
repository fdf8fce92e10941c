"""The live view's figures: tokens/s after an evaluation and at the end of a run, and the loss plot's step axis."""

from __future__ import annotations

import time

import pytest

import jobs
import runfolder
import training_utils
from train_config import TrainConfig
from training_utils import TokenCounter
from workspace import config_to_dict


def batch_of(tokens: int) -> dict:
    import torch

    return {"input_ids": torch.ones(1, tokens, dtype=torch.long), "attention_mask": torch.ones(1, tokens)}


def logged_rates(workspace, trl_counts: bool) -> list:
    """Drive the job's callback through what a run with an evaluation logs: train logs (with TRL's num_tokens when
    `trl_counts`, as TRL's trainer logs it; without, as Unsloth's), an eval at step 4 whose batches pass through the
    same collator, and the end-of-run summary."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    run_dir = jobs.create_run("train", config_to_dict(TrainConfig()), workspace, "figures")
    counter = TokenCounter(lambda examples: batch_of(examples[0]))
    callback = training_utils.events_callback(runfolder.JobContext.for_run(run_dir), counter)
    args, state, control = (
        TrainingArguments(output_dir=str(run_dir / "out"), report_to=[]),
        TrainerState(),
        TrainerControl(),
    )
    state.max_steps = 6
    callback.on_train_begin(args, state, control)
    trained = 0

    def train_steps(steps: int) -> None:
        nonlocal trained
        for _ in range(steps):
            counter([100])
            trained += 100
            state.global_step += 1
        time.sleep(0.02)
        logs = {"loss": 1.0, "learning_rate": 1e-4, "grad_norm": 1.0}
        callback.on_log(args, state, control, logs | ({"num_tokens": float(trained)} if trl_counts else {}))

    train_steps(2)
    train_steps(2)
    for _ in range(5):  # the eval batches: five times the tokens of the train steps since the last log
        counter([200])
    callback.on_log(args, state, control, {"eval_loss": 0.9, "eval_num_tokens": float(trained)})
    train_steps(2)
    callback.on_log(args, state, control, {"train_runtime": 1.0, "train_loss": 0.95})  # the end-of-run summary
    return [(event.step, event.metrics.get("tokens_per_s")) for event in runfolder.read_events(run_dir)[1:]]


@pytest.mark.parametrize("trl_counts", [True, False], ids=["trl-num-tokens", "collator-count"])
def test_tokens_per_s_stays_positive_after_an_evaluation_and_is_absent_at_the_end(workspace, trl_counts):
    rates = logged_rates(workspace, trl_counts)
    assert [step for step, _ in rates] == [2, 4, 4, 6, 6]
    first, second, evaluation, after_eval, summary = (rate for _, rate in rates)
    assert first is None  # no interval before the first log
    assert second > 0 and after_eval > 0  # the step after the evaluation was negative
    assert evaluation is None and summary is None  # they trained nothing: no "0 tokens/s"
    # The eval batches' tokens and time are left out: the rate after the eval is of the same order as before it.
    assert after_eval < 3 * second


def test_the_loss_plots_step_axis_shows_whole_numbers(workspace):
    import gradio as gr

    import ui

    app = ui.build_app(workspace)
    plots = [block for block in app.blocks.values() if isinstance(block, gr.LinePlot)]
    loss_plots = [plot for plot in plots if plot.x == "step" and plot.y == "loss" and plot.color == "series"]
    assert len(loss_plots) == 2  # the Train tab's live view and the Runs tab's
    assert all(plot.x_axis_format == "d" for plot in loss_plots)
