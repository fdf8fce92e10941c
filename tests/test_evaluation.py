"""Held-out evaluation of base vs tuned with the demo model and a trained LoRA run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import evaluation
import jobs
import runfolder
from conftest import ROOT
from evaluation import EvalConfig
from train_config import TrainConfig
from workspace import UserError, config_to_dict


def test_eval_of_a_run_without_adapter_is_refused(workspace):
    jobs.create_run("train", config_to_dict(TrainConfig()), workspace, "unfinished")
    with pytest.raises(UserError, match="no trained model yet"):
        evaluation.evaluate(EvalConfig(run="unfinished"))


def test_eval_of_a_run_without_eval_split_is_refused(trained_run, workspace):
    copy = workspace / "runs" / "no-split"
    shutil.copytree(trained_run / "adapter", copy / "adapter")
    shutil.copy(trained_run / "config.yaml", copy / "config.yaml")
    saved = copy / "adapter" / "train_config.yaml"
    saved.write_text(yaml.safe_dump({**yaml.safe_load(saved.read_text()), "eval_split": 0.0}))
    with pytest.raises(UserError, match="eval_split 0"):
        evaluation.check_evaluable(EvalConfig(run="no-split"))


@pytest.mark.slow
def test_eval_shows_lower_held_out_loss_for_tuned(trained_run, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    reporter = runfolder.Reporter(job_dir)
    result = evaluation.evaluate(EvalConfig(run=str(trained_run), max_rows=4, batch_size=2), reporter)
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
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--workspace",
            str(workspace),
            "eval",
            str(trained_run),
            "--max-rows",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "| base (demo) |" in done.stdout
    (job,) = [run for run in jobs.list_runs(workspace) if run.kind == "eval"]
    assert job.name == "eval-trained" and job.state == "done"
    assert json.loads((trained_run / "eval.json").read_text())["rows"] == 2
