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
    assert out.splitlines()[0].split()[:3] == ["run", "state", "steps"]
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
