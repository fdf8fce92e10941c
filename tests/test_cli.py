"""The CLI's setting flags: every command's flags come from its config's field metadata, override the YAML file, and
a bad one is one `error:` line; a field added to a config is a flag without touching main.py."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import gguf_utils
import job_checks
import main
import settings
import submit
from arena_utils import ArenaConfig
from conftest import write_jsonl
from dataset_utils import DatasetConfig
from download_utils import DownloadConfig
from evaluation import EvalConfig
from gguf_utils import ExportConfig
from inference_utils import GenerationConfig
from synthetic_utils import SyntheticConfig
from train_config import TrainConfig
from workspace import config_to_dict, dump_yaml

ERROR_LINE = re.compile(r"(^|: )error: ")
# (command, its config, the options it takes otherwise than as a flag: a positional, --map)
COMMANDS = [
    ("train", TrainConfig, ()),
    ("synth", SyntheticConfig, ()),
    ("arena", ArenaConfig, ()),
    ("export", ExportConfig, ("run",)),
    ("eval", EvalConfig, ("run",)),
    ("download", DownloadConfig, ("repo_id",)),
    ("chat", GenerationConfig, ()),
    ("dataset", DatasetConfig, ("source", "column_map")),
]


@pytest.fixture
def submitted(monkeypatch, tmp_path) -> dict:
    """submit.submit records the config each kind gets (nothing starts); train's estimates are skipped."""
    seen: dict = {}

    def fake(kind, config, workspace=None, *args, **kwargs):
        seen[kind] = config
        return tmp_path / f"{kind}-run"

    monkeypatch.setattr(submit, "submit", fake)
    monkeypatch.setattr(job_checks, "check_model", lambda *args: None)
    monkeypatch.setattr(main, "_print_memory_estimate", lambda *args: None)
    monkeypatch.setattr(main, "_print_time_estimate", lambda *args: None)
    return seen


def run_cli(argv: list[str], workspace: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main.main(["--workspace", str(workspace), *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(dump_yaml(data), encoding="utf-8")
    return str(path)


def test_a_flag_overrides_the_yaml_and_reaches_the_training_config(submitted, tmp_path, capsys):
    config = write_yaml(tmp_path / "train.yaml", {"model": "demo", "dataset": "data.jsonl", "lora_r": 16})
    argv = ["train", config, "--lora_r", "8", "--dataset.max_rows", "5", "--learning-rate", "1e-4"]
    argv += ["--target_modules", "q_proj,v_proj", "--no-gradient_checkpointing", "--detach"]
    code, err = run_cli(argv, tmp_path, capsys)
    assert code == 0, err
    trained = submitted["train"]
    assert (trained.lora_r, trained.dataset.max_rows, trained.learning_rate) == (8, 5, 1e-4)
    assert trained.target_modules == ["q_proj", "v_proj"] and trained.gradient_checkpointing is False
    # the YAML's shorthand (`model: NAME`, `dataset: PATH`) is kept beside the flags of those sections
    assert (trained.model.name_or_path, trained.dataset.source) == ("demo", "data.jsonl")


def test_train_takes_flags_alone(submitted, tmp_path, capsys):
    code, err = run_cli(["train", "--dataset.source", "data.jsonl", "--max_steps", "3", "--detach"], tmp_path, capsys)
    assert code == 0, err
    assert submitted["train"].dataset.source == "data.jsonl" and submitted["train"].max_steps == 3
    assert submitted["train"].model.name_or_path == TrainConfig().model.name_or_path


def test_synth_and_arena_take_yaml_plus_overrides(submitted, tmp_path, capsys):
    synth = write_yaml(tmp_path / "synth.yaml", {"model": "llama3.2", "topic": "herbs", "num_rows": 50})
    code, err = run_cli(["synth", synth, "--num_rows", "7", "--provider", "ollama", "--detach"], tmp_path, capsys)
    assert code == 0, err
    assert (submitted["synth"].num_rows, submitted["synth"].provider, submitted["synth"].topic) == (
        7,
        "ollama",
        "herbs",
    )
    arena = write_yaml(tmp_path / "arena.yaml", {"contestants": ["base:demo", "run:a"], "judge_model": "gpt-4o-mini"})
    argv = ["arena", arena, "--contestants", "base:demo", "--contestants", "run:b", "--max_prompts", "3", "--detach"]
    code, err = run_cli(argv, tmp_path, capsys)
    assert code == 0, err
    assert submitted["arena"].contestants == ["base:demo", "run:b"] and submitted["arena"].max_prompts == 3
    assert submitted["arena"].judge_model == "gpt-4o-mini"


def test_export_has_every_option_of_the_export_tab(submitted, tmp_path, capsys):
    argv = ["export", "trained", "--check_prompts", "12", "--check_tokens", "8", "--merge_dtype", "bfloat16"]
    argv += ["--temperature", "0.2", "--top_p", "0.5", "--num_ctx", "1024", "--quant", "q4_k_m,q8_0", "--lora-gguf"]
    code, err = run_cli([*argv, "--detach"], tmp_path, capsys)
    assert code == 0, err
    exported = submitted["export"]
    assert exported.run == "trained" and exported.quants == ["q4_k_m", "q8_0"] and exported.lora_gguf is True
    assert (exported.check_prompts, exported.check_tokens, exported.merge_dtype) == (12, 8, "bfloat16")
    assert (exported.temperature, exported.top_p, exported.num_ctx) == (0.2, 0.5, 1024)
    code, err = run_cli(["export", "trained", "--detach"], tmp_path, capsys)  # no flag: the defaults, as before
    assert code == 0, err
    assert submitted["export"] == ExportConfig(run="trained")


def test_eval_and_download_take_a_yaml_file_too(submitted, tmp_path, capsys):
    config = write_yaml(tmp_path / "eval.yaml", {"max_rows": 50, "batch_size": 2})
    code, err = run_cli(["eval", "trained", "--config", config, "--batch-size", "4", "--detach"], tmp_path, capsys)
    assert code == 0, err
    assert submitted["eval"] == EvalConfig(run="trained", max_rows=50, batch_size=4)
    code, err = run_cli(["download", "owner/name", "--revision", "v2", "--detach"], tmp_path, capsys)
    assert code == 0, err
    assert submitted["download"] == DownloadConfig(repo_id="owner/name", revision="v2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--stage", "ppo"], r"stage must be one of: sft, dpo, orpo, kto, grpo \(got 'ppo'\)"),
        (["train", "--lora_r", "0"], r"lora_r must be at least 1 \(got 0\); try 16 \(the default\)"),
        (["train", "--dataset.max_rows", "-1"], r"dataset\.max_rows must be at least 0 \(got -1\)"),
        (["train", "--learning_rate", "nan"], r"learning_rate must be a finite number \(got nan\)"),
        (["train", "--lora_r", "2.5"], r"argument --lora_r: invalid int value: '2\.5'"),
        (["train", "--lora_rank", "8"], "unrecognized arguments: --lora_rank"),
        (["train", "--optim", "sgd_nonsense"], "optim must be one of: "),  # choices read from transformers
        (["export", "trained", "--merge_dtype", "int4"], "argument --merge_dtype: invalid choice: 'int4'"),
        (["export", "trained", "--top_p", "0"], r"top_p must be above 0 and at most 1 \(got 0\.0\)"),
        (["synth", "--num_rows", "0"], r"num_rows must be at least 1 \(got 0\)"),
        (["arena", "--max_prompts", "0"], r"max_prompts must be at least 1 and at most 10000 \(got 0\)"),
        (["train", "--resume", "ghost", "--lora_r", "8"], "--resume continues the run with its own saved settings"),
    ],
)
def test_a_bad_flag_is_one_error_line(argv, message, submitted, tmp_path, capsys):
    code, err = run_cli(argv, tmp_path, capsys)
    assert code not in (0, None), err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ERROR_LINE.search(line)]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), err
    assert not submitted  # nothing was started


@pytest.mark.parametrize("command, cls, excluded", COMMANDS, ids=[command for command, *_ in COMMANDS])
def test_every_option_of_a_commands_config_is_one_of_its_flags(command, cls, excluded, capsys):
    with pytest.raises(SystemExit):
        main.main([command, "--help"])
    shown = capsys.readouterr().out
    for key in settings.option_keys(cls):
        if key not in excluded:
            assert re.search(rf"--{re.escape(key)}\b", shown), f"{command} --help lacks --{key}"


def test_a_field_added_to_a_config_is_a_flag_without_editing_main(monkeypatch, submitted, tmp_path, capsys):
    # The next export option, declared once in the config as any other.
    extended = dataclasses.make_dataclass(
        "ExportConfig",
        [("draft_tokens", int, settings.option(4, help="Tokens drafted per step.", minimum=1, maximum=16))],
        bases=(ExportConfig,),
    )
    monkeypatch.setattr(gguf_utils, "ExportConfig", extended)
    with pytest.raises(SystemExit):
        main.main(["export", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--draft_tokens N Tokens drafted per step. (at least 1 and at most 16; default: 4)" in shown
    code, err = run_cli(["export", "trained", "--draft_tokens", "6", "--detach"], tmp_path, capsys)
    assert code == 0, err
    assert submitted["export"].draft_tokens == 6
    code, err = run_cli(["export", "trained", "--draft-tokens", "17"], tmp_path, capsys)
    assert code == 2 and "draft_tokens must be at least 1 and at most 16 (got 17)" in err


def test_the_dashed_spellings_of_earlier_releases_still_work(submitted, tmp_path, capsys):
    parser = main.build_parser()
    args = parser.parse_args(["dataset", "d.jsonl", "--max-seq-length", "64", "--no-train-on-responses-only"])
    assert settings.given_settings(args) == {"max_seq_length": 64, "train_on_responses_only": False}
    args = parser.parse_args(["dataset", "d.jsonl", "--system-prompt", "Be brief.", "--max-rows", "3"])
    assert settings.given_settings(args) == {"dataset": {"system_prompt": "Be brief.", "max_rows": 3}}
    args = parser.parse_args(["chat", "--prompt", "hi", "--max-new-tokens", "20", "--temperature", "0"])
    assert settings.given_settings(args) == {"max_new_tokens": 20, "temperature": 0.0}


def test_dataset_previews_and_reports_preference_pairs(demo_workspace, capsys):
    rows = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    ]
    data = str(write_jsonl(demo_workspace / "prefs.jsonl", rows))
    assert main.main(["--workspace", str(demo_workspace), "dataset", data, "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: pairs (read as DPO reads it)" in out
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in out
    assert "[chosen] ⟦Paris.<|im_end|>" in out and "[rejected] ⟦Lyon.<|im_end|>" in out
    assert main.main(["--workspace", str(demo_workspace), "dataset", data, "--report", "--stage", "kto"]) == 0
    out = capsys.readouterr().out
    assert "(pairs, 2 rows, 2 usable)" in out and "exact duplicates: 1 (rows 2)" in out
    code, err = run_cli(["dataset", data, "--stage", "nope"], demo_workspace, capsys)
    assert code != 0 and err.strip() == "error: Unknown stage 'nope'; one of: sft, dpo, orpo, kto, grpo."


def test_a_followed_run_prints_one_line_per_step_when_piped(tmp_path, capsys):
    import jobs
    import runfolder

    run_dir = jobs.create_run("train", config_to_dict(TrainConfig()), tmp_path, "piped")
    reporter = runfolder.Reporter(run_dir)
    reporter.start(0, 3)
    for step in (1, 2, 3):
        reporter.log(step, 3, loss=1.0 / step)
        reporter.progress(step, 3, "saving a checkpoint")  # a second event of the same step
    runfolder.write_status(run_dir, state="done")
    assert main.follow(run_dir) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["step 0/3", "step 1/3, loss 1", "step 2/3, loss 0.5", "step 3/3, loss 0.3333"]
    assert captured.out == "done\n"


def test_export_ends_with_each_file_and_its_agreement(tmp_path):
    import jobs
    import runfolder

    trained = jobs.create_run("train", config_to_dict(TrainConfig()), tmp_path, "trained")
    (trained / "gguf").mkdir()
    files = [
        {"quant": "f16", "file": "trained-f16.gguf", "size_bytes": 271_000_000, "agreement": 1.0},
        {"quant": "q8_0", "file": "trained-q8_0.gguf", "size_bytes": 145_000_000, "agreement": 0.973},
    ]
    lora = {"file": "trained-lora-f16.gguf", "size_bytes": 4_900_000, "base_file": "base-f16.gguf", "agreement": 1.0}
    (trained / "gguf" / "report.json").write_text(json.dumps({"files": files, "lora": lora}))
    export = jobs.create_run("export", config_to_dict(ExportConfig(run="trained")), tmp_path, "export-trained")
    assert main.export_summary(export) == []  # not finished: nothing to show
    runfolder.write_status(export, state="done")
    assert main.export_summary(export) == [
        f"{trained / 'gguf' / 'trained-f16.gguf'}  271.0 MB, top-1 agreement with the HF model 100.0%",
        f"{trained / 'gguf' / 'trained-q8_0.gguf'}  145.0 MB, top-1 agreement with the HF model 97.3%",
        f"{trained / 'gguf' / 'trained-lora-f16.gguf'}  4.9 MB, the LoRA adapter on base-f16.gguf: top-1 agreement "
        "100.0%",
    ]
