"""Training runs side by side, read from run folders written through the run-folder protocol (Reporter events,
status.json, config.yaml), as a training job writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

import compare_utils
import jobs
import main
import runfolder
from conftest import demo_train_config
from workspace import UserError, config_to_dict


def training_run(workspace: Path, name: str, losses: list[float], eval_losses: dict[int, float], **changes) -> Path:
    """A finished training run folder whose events log these losses (one step each), 100 tokens/s, 1.5 GiB."""
    config = demo_train_config(workspace / "data.jsonl", **changes)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, name)
    reporter = runfolder.Reporter(run_dir)
    reporter.start(0, len(losses))
    for step, loss in enumerate(losses, 1):
        reporter.log(step, len(losses), loss=loss, tokens_per_s=100.0 + step, memory_gib=1.0 + step / 10)
        if step in eval_losses:
            reporter.log(step, len(losses), eval_loss=eval_losses[step])
    runfolder.write_status(
        run_dir, state="done", started="2026-12-01T10:00:00+00:00", ended="2026-12-01T10:02:05+00:00"
    )
    return run_dir


@pytest.fixture
def two_runs(workspace) -> tuple[Path, Path]:
    first = training_run(workspace, "lr-high", [2.0, 1.5, 1.2, 1.3], {2: 1.8, 4: 1.6})
    second = training_run(workspace, "lr-low", [2.0, 1.9, 1.8], {3: 1.9}, learning_rate=1e-4, lora_r=16)
    return first, second


def test_compare_runs_gives_curves_final_and_best_metrics_and_only_the_settings_that_differ(two_runs, workspace):
    comparison = compare_utils.compare_runs(["lr-high", "lr-low"], workspace)
    high, low = comparison.runs
    assert (high.final_loss, high.best_loss, high.final_eval_loss, high.best_eval_loss) == (1.3, 1.2, 1.6, 1.6)
    assert (low.final_loss, low.best_loss, low.steps) == (1.8, 1.8, 3)
    assert high.tokens_per_s == 102.5 and high.seconds == 125.0 and high.peak_memory_gib == 1.4
    assert ("lr-high", "eval", 2, 1.8) in comparison.curves and ("lr-low", "train", 3, 1.8) in comparison.curves
    assert dict(comparison.differences) == {
        "learning_rate": {"lr-high": 1e-3, "lr-low": 1e-4},
        "lora_r": {"lr-high": 8, "lr-low": 16},
    }


def test_a_comparison_needs_two_training_runs(two_runs, workspace):
    with pytest.raises(UserError, match="at least two training runs"):
        compare_utils.compare_runs(["lr-high"], workspace)
    synth = jobs.create_run("synth", {"model": "x"}, workspace, "synth-one")
    with pytest.raises(UserError, match="'synth-one' is a synth run; only training runs"):
        compare_utils.compare_runs(["lr-high", synth.name], workspace)
    with pytest.raises(UserError, match="No run named 'gone'"):
        compare_utils.compare_runs(["lr-high", "gone"], workspace)


def test_the_cli_prints_runs_side_by_side(two_runs, workspace, capsys):
    assert main.main(["--workspace", str(workspace), "runs", "--compare", "lr-high", "lr-low"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["run", "state", "stage", "steps"]
    assert "lr-high" in out and "1.2000" in out and "2:05" in out
    assert "settings that differ:" in out and "learning_rate" in out and "max_steps" not in out


def test_the_cli_refuses_one_run_in_one_line(two_runs, workspace, capsys):
    assert main.main(["--workspace", str(workspace), "runs", "--compare", "lr-high"]) == 2
    assert capsys.readouterr().err.strip() == "error: Choose at least two training runs to compare."


def test_the_runs_tab_shows_the_comparison(two_runs, workspace):
    from ui import runs_tab

    curves, metrics, differences = runs_tab.comparison_view(["lr-high", "lr-low"], workspace)
    assert set(curves["curve"]) == {"lr-high · train", "lr-high · eval", "lr-low · train", "lr-low · eval"}
    assert list(metrics["run"]) == ["lr-high", "lr-low"]
    assert list(differences["setting"]) == ["learning_rate", "lora_r"]


def test_runs_of_other_stages_show_their_stage_and_its_last_metrics(workspace, capsys):
    dpo = training_run(workspace, "dpo-run", [0.7, 0.6], {}, stage="dpo")
    grpo = training_run(workspace, "grpo-run", [0.1, 0.2], {}, stage="grpo")
    for step, margin in ((1, 0.5), (2, 1.5)):
        runfolder.Reporter(dpo).log(step, 2, reward_margin=margin, reward_accuracy=1.0, reward_chosen=0.3)
    runfolder.Reporter(grpo).log(2, 2, reward=0.75, reward_format=0.5, kl=0.01, completion_length=9.0)
    comparison = compare_utils.compare_runs(["dpo-run", "grpo-run"], workspace)
    first, second = comparison.runs
    assert (first.stage, first.stage_metrics) == ("dpo", {"reward_margin": 1.5, "reward_accuracy": 1.0})
    assert second.stage_metrics == {"reward": 0.75, "kl": 0.01, "completion_length": 9.0, "reward_format": 0.5}
    columns = compare_utils.metric_columns(comparison)
    assert columns[-6:] == [
        "reward margin",
        "reward accuracy",
        "mean reward",
        "KL",
        "completion length",
        "format reward",
    ]
    assert compare_utils.metric_rows(comparison)[0][-6:] == ["1.5000", "1.0000", "–", "–", "–", "–"]

    assert main.main(["--workspace", str(workspace), "runs", "--compare", "dpo-run", "grpo-run"]) == 0
    header, dpo_line = capsys.readouterr().out.splitlines()[:2]
    assert "stage" in header and "reward margin" in header and "format reward" in header
    assert dpo_line.split()[:3] == ["dpo-run", "done", "dpo"] and "1.5000" in dpo_line

    from ui import runs_tab

    _, metrics, _ = runs_tab.comparison_view(["dpo-run", "grpo-run"], workspace)
    assert list(metrics["stage"]) == ["dpo", "grpo"] and list(metrics["format reward"]) == ["–", "0.5000"]


def test_the_same_setting_spelled_by_the_ui_and_by_yaml_is_no_difference():
    from_ui = {"warmup_steps": 0.0, "num_train_epochs": 1.0, "save_steps": 10.0, "dataset": {"column_map": {}}}
    from_yaml = {"warmup_steps": 0, "num_train_epochs": 1, "save_steps": 10, "dataset": {"column_map": None}}
    assert compare_utils.config_differences({"ui": from_ui, "yaml": from_yaml}) == []
    changed = {**from_yaml, "warmup_steps": 0.5, "dataset": {"column_map": {"output": "reply"}}}
    assert compare_utils.config_differences({"ui": from_ui, "yaml": changed}) == [
        ("dataset.column_map.output", {"ui": None, "yaml": "reply"}),
        ("warmup_steps", {"ui": 0.0, "yaml": 0.5}),
    ]
