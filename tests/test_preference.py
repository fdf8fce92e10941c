"""Preference tuning (DPO) and RL (GRPO) on the demo model: the data formats, learning, stop / resume, metrics."""

from __future__ import annotations

import pytest

import jobs
import planning
import preference_data
import runfolder
import submit
import training_utils
from conftest import COUNTRIES, demo_train_config, logged_steps, wait_for, write_jsonl
from dataset_utils import DatasetConfig
from workspace import UserError, config_to_dict


def pair_rows(countries) -> list[dict]:
    """Pairs preferring a reply that ends with 'Zebra!' over the same reply without it."""
    return [
        {
            "prompt": f"What is the capital of {country}?",
            "chosen": f"The capital of {country} is {capital}. Zebra!",
            "rejected": f"The capital of {country} is {capital}.",
        }
        for country, capital in countries
    ]


def preference_config(data, **changes):
    values = dict(stage="dpo", max_steps=3, learning_rate=5e-4, per_device_train_batch_size=2, save_steps=6, beta=0.1)
    return demo_train_config(data, **{**values, **changes})


# ---------------------------------------------------------------- data


def test_pairs_as_text_become_conversations():
    rows = pair_rows(COUNTRIES[:1])
    fmt, pairs = preference_data.convert_rows(rows, list(rows[0]), "dpo", DatasetConfig(source="x"))
    assert fmt == "pairs"
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The capital of France is Paris. Zebra!"}]


def test_pairs_as_whole_conversations_share_their_prompt():
    user = {"role": "user", "content": "Hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "What."}],
    }
    fmt, pairs = preference_data.convert_rows([row], ["chosen", "rejected"], "dpo", DatasetConfig(source="x"))
    assert pairs[0]["prompt"] == [user]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "What."}]


def test_grpo_prompts_come_from_any_sft_format_with_the_reply_as_reference():
    rows = [{"instruction": "2+2?", "output": "4"}]
    fmt, prompts = preference_data.convert_rows(rows, ["instruction", "output"], "grpo", DatasetConfig("x"))
    assert prompts == [{"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}]
    rows = [{"prompt": "2+3?", "answer": "5"}]
    _, prompts = preference_data.convert_rows(rows, ["prompt", "answer"], "grpo", DatasetConfig("x"))
    assert prompts[0]["answer"] == "5"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi", "chosen": "", "rejected": "No"}, "chosen side is empty"),
        ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "identical"),
    ],
)
def test_broken_pairs_are_refused_with_their_row(row, message):
    with pytest.raises(UserError, match=message):
        preference_data.convert_rows([row], list(row), "dpo", DatasetConfig(source="x"))


def test_sft_data_given_to_dpo_names_the_columns_it_needs():
    with pytest.raises(UserError, match="prompt / chosen / rejected"):
        preference_data.convert_rows([{"text": "a"}], ["text"], "dpo", DatasetConfig(source="x"))


def test_a_pair_is_previewed_side_by_side():
    rows = pair_rows(COUNTRIES[:2])
    shown = preference_data.preview_pairs(rows, list(rows[0]), {})
    assert shown[1] == {
        "prompt": "What is the capital of Italy?",
        "chosen": "The capital of Italy is Rome. Zebra!",
        "rejected": "The capital of Italy is Rome.",
    }


# ---------------------------------------------------------------- DPO learns


def _margins(model, tokenizer, pairs) -> float:
    """Mean log p(chosen) − log p(rejected) of held-out pairs under `model`."""
    import torch

    def logprob(prompt: list[dict], reply: list[dict]) -> float:
        prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        ids = tokenizer(full, return_tensors="pt").input_ids
        start = len(tokenizer(prefix).input_ids)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        return float(logits[start - 1 :].gather(1, targets[start - 1 :, None]).sum())

    return sum(logprob(p["prompt"], p["chosen"]) - logprob(p["prompt"], p["rejected"]) for p in pairs) / len(pairs)


@pytest.mark.parametrize(
    "stage, changes, metrics",
    [
        ("dpo", {}, {"reward_margin", "reward_accuracy", "tokens_per_s"}),
        # TRL's ORPO logs no token count: its tokens/s is the collator's count of the chosen and rejected sequences.
        ("orpo", {"learning_rate": 1e-3, "beta": 1.0}, {"reward_margin", "log_odds_ratio", "nll_loss", "tokens_per_s"}),
    ],
)
def test_a_few_preference_steps_raise_the_margin_on_held_out_pairs(demo_workspace, demo_model, stage, changes, metrics):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(demo_workspace / "pairs.jsonl", pair_rows(COUNTRIES[:8]))
    _, held_out = preference_data.convert_rows(
        pair_rows(COUNTRIES[8:]), ["prompt", "chosen", "rejected"], stage, DatasetConfig("x")
    )
    config = preference_config(data, stage=stage, **changes)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, stage)
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    base = AutoModelForCausalLM.from_pretrained(demo_model)
    before = _margins(base, tokenizer, held_out)
    after = _margins(PeftModel.from_pretrained(base, run_dir / "adapter"), tokenizer, held_out)
    assert after > before + 1.0, (before, after)
    logs = [
        event.metrics for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics
    ]
    assert metrics <= set(logs[-1])


# ---------------------------------------------------------------- GRPO learns a format


@pytest.mark.slow  # 20–70 s of GRPO steps on the CPU
def test_grpo_with_the_format_reward_raises_the_mean_reward(demo_workspace):
    # The demo model starts some of its replies with "The capital of X is"; the format reward teaches it to always.
    rows = [{"prompt": f"What is the capital of {country}?", "answer": capital} for country, capital in COUNTRIES]
    data = write_jsonl(demo_workspace / "prompts.jsonl", rows)
    config = preference_config(
        data,
        stage="grpo",
        max_steps=6,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=6,
        reward_funcs=["format"],
        reward_pattern=r"^The capital of \w+ is",
        save_steps=6,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "grpo")
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"
    logs = [
        event.metrics for event in runfolder.read_events(run_dir) if event.kind == "log" and "reward" in event.metrics
    ]
    scores = [m["reward_format"] for m in logs]
    assert len(scores) == 6
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2, scores
    assert {"kl", "completion_length"} <= set(logs[-1])
    # Where a step's time goes: the share spent generating its 8 completions, and completions per second.
    assert all(0 < m["generation_share"] <= 1 and m["completions_per_s"] > 0 for m in logs)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- a run stops and resumes


@pytest.mark.slow
def test_a_dpo_run_stops_and_resumes_from_its_checkpoint(demo_workspace):
    data = write_jsonl(demo_workspace / "pairs.jsonl", pair_rows(COUNTRIES[:8]))
    run_dir = submit.submit("train", preference_config(data, max_steps=4, save_steps=1), demo_workspace, "dpo-stop")
    wait_for(lambda: len(logged_steps(run_dir)) >= 1)
    jobs.stop_job(run_dir)
    wait_for(lambda: jobs.job_status(run_dir).state == "stopped", timeout=300)
    stopped_at = int(runfolder.last_checkpoint(run_dir).name.split("-")[1])
    jobs.resume_job(run_dir)
    wait_for(lambda: jobs.job_status(run_dir).state in ("done", "failed"))
    assert jobs.job_status(run_dir).state == "done", runfolder.log_tail(run_dir)
    starts = [event.step for event in runfolder.read_events(run_dir) if event.kind == "start"]
    assert starts == [0, stopped_at] and stopped_at < 4
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- settings refused before a job


def test_grpo_settings_that_cannot_work_are_refused(workspace):
    data = write_jsonl(workspace / "p.jsonl", [{"prompt": "Hi"}])
    with pytest.raises(UserError, match="not a valid regular expression"):
        preference_config(data, stage="grpo", reward_pattern="(unclosed").validate()
    with pytest.raises(UserError, match="multiple of num_generations"):
        preference_config(data, stage="grpo", per_device_train_batch_size=3, num_generations=2).validate()
    with pytest.raises(UserError, match="one weight per function"):
        preference_config(data, stage="grpo", reward_funcs=["format", "json"], reward_weights=[1.0]).validate()
    with pytest.raises(UserError, match="Unknown reward"):
        preference_config(data, stage="grpo", reward_funcs=["magic"]).validate()


# ---------------------------------------------------------------- on a CUDA GPU with Unsloth


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    """The random-weight Llama-3.2-1B shape, built once for this module's GPU tests."""
    from bench import gpu_models

    folder = tmp_path_factory.mktemp("llama-1b")
    tokenizer = gpu_models.build_tokenizer(folder / "tokenizer")
    return gpu_models.build_model("1b", folder / "model", tokenizer)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_unsloth_trains_dpo_and_grpo_on_the_1b_shape(workspace, llama_1b, stage):
    import json

    from bench import preference_bench

    # Enough steps to train and log past the warm-up; short completions: this checks that it runs, the bench times it.
    result = preference_bench.measure(stage, llama_1b, workspace, steps=8, completion_tokens=64, timeout_s=150)
    print(json.dumps(result))
    assert "error" not in result, result
    assert result["backend"] == "unsloth"
    assert result["samples_per_s"] > 0 and result["peak_memory_gib"] > 0
    if stage == "grpo":  # where a step's time goes, in the run's own events
        assert 0 < result["generation_share"] <= 1 and result["completions_per_s"] > 0


# ---------------------------------------------------------------- the UI's views


def test_the_live_view_shows_each_stage_s_metrics():
    from ui.train_tab import stage_parts

    dpo = stage_parts({"loss": 0.3, "reward_margin": 1.25, "reward_accuracy": 1.0, "reward_chosen": 0.8})
    assert dpo == ["reward margin 1.25", "reward accuracy 1"]
    grpo = stage_parts({"reward": 0.5, "reward_format": 0.75, "kl": 0.01, "completion_length": 9.5})
    assert grpo == ["mean reward 0.5", "KL 0.01", "completion length 9.5", "format reward 0.75"]


def test_the_dataset_tab_shows_a_pair_side_by_side():
    from ui.dataset_tab import pairs_html

    rows = pair_rows(COUNTRIES[:1])
    shown = pairs_html(preference_data.preview_pairs(rows, list(rows[0]), {}))
    chosen = shown.split("<b>Chosen</b>")[1].split("<b>Rejected</b>")[0]
    assert ">The capital of France is Paris. Zebra!</pre></td>" in chosen
    assert "white-space:pre-wrap" in chosen  # a long reply wraps in its cell (the browser walk measures it)
    assert pairs_html([]) == ""


# ---------------------------------------------------------------- start from an SFT run


def test_a_dpo_run_starts_from_an_sft_run_s_adapter_and_trains_it(demo_workspace, demo_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import preference_utils

    sft = jobs.create_run("train", {}, demo_workspace, "sft-first")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, weight in peft.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.01)  # a trained adapter: B is no longer zero
    peft.save_pretrained(sft / "adapter")
    AutoTokenizer.from_pretrained(demo_model).save_pretrained(sft / "adapter")  # as training_utils.save_final does
    data = write_jsonl(demo_workspace / "pairs.jsonl", pair_rows(COUNTRIES[:2]))
    config = preference_config(data, start_from_run="sft-first")
    config.validate()
    model, _ = preference_utils.start_model(config, str(demo_model), "transformers", demo_workspace)
    trained = {name: weight for name, weight in model.named_parameters() if weight.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(float(w.mean()) == pytest.approx(0.01) for name, w in trained.items() if "lora_B" in name)


def test_start_from_run_refuses_a_run_without_an_adapter(demo_workspace):
    jobs.create_run("train", {}, demo_workspace, "unfinished")
    data = write_jsonl(demo_workspace / "pairs.jsonl", pair_rows(COUNTRIES[:2]))
    with pytest.raises(UserError, match="unfinished"):
        preference_config(data, start_from_run="unfinished").validate()


# ---------------------------------------------------------------- ORPO and KTO


def kto_rows(countries) -> list[dict]:
    """KTO's unpaired rows: the reply ending with 'Zebra!' desirable, the plain one not."""
    return [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in pair_rows(countries)
        for side in ("chosen", "rejected")
    ]


def test_a_few_kto_steps_train_and_write_the_stage_metrics(demo_workspace):
    data = write_jsonl(demo_workspace / "kto.jsonl", kto_rows(COUNTRIES[:2]))
    config = preference_config(data, stage="kto", max_steps=2, per_device_train_batch_size=2)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "kto")
    assert training_utils.train(config, runfolder.JobContext.for_run(run_dir)) == "done"
    logs = [
        event.metrics for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics
    ]
    assert len(logs) == 2 and {"kl", "reward_chosen", "reward_rejected"} <= set(logs[-1])
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_kto_rows_keep_their_label_and_pairs_are_unpaired_for_kto():
    rows = kto_rows(COUNTRIES[:1])
    fmt, converted = preference_data.convert_rows(rows, ["prompt", "completion", "label"], "kto", DatasetConfig("x"))
    assert fmt == "unpaired" and [row["label"] for row in converted] == [True, False]
    assert converted[1]["completion"] == [{"role": "assistant", "content": "The capital of France is Paris."}]
    pairs = pair_rows(COUNTRIES[:1])
    fmt, converted = preference_data.convert_rows(pairs, list(pairs[0]), "kto", DatasetConfig("x"))
    assert (
        fmt == "pairs" and converted == preference_data.convert_rows(rows, list(rows[0]), "kto", DatasetConfig("x"))[1]
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "Hi", "completion": "Hello", "label": "yes"}], "label must be true"),
        ([{"prompt": "Hi", "completion": "Hello", "label": 1}], "label must be true"),
        ([{"prompt": "Hi", "completion": " ", "label": True}], "completion is empty"),
        ([{"prompt": "Hi", "completion": "Hello", "label": True}], "add rows of the other kind"),
    ],
)
def test_broken_kto_rows_are_refused_with_their_row(rows, message):
    with pytest.raises(UserError, match=message):
        preference_data.convert_rows(rows, list(rows[0]), "kto", DatasetConfig(source="x"))


def test_a_kto_row_is_previewed_on_its_side():
    rows = kto_rows(COUNTRIES[:1])
    shown = preference_data.preview_pairs(rows, list(rows[0]), {})
    assert shown[0]["chosen"].endswith("Zebra!") and shown[0]["rejected"] == ""
    assert shown[1]["chosen"] == "" and shown[1]["rejected"] == "The capital of France is Paris."


def test_kto_with_one_row_per_batch_is_refused(workspace):
    data = write_jsonl(workspace / "kto.jsonl", kto_rows(COUNTRIES[:1]))
    with pytest.raises(UserError, match="per_device_train_batch_size to 2"):
        preference_config(data, stage="kto", per_device_train_batch_size=1).validate()


# ---------------------------------------------------------------- the preview and the report of pairs and prompts


def messy_pairs(tmp_path):
    """Pairs with a repeated row and an empty chosen reply, as a user's first preference file has."""
    rows = [*pair_rows(COUNTRIES[:3]), pair_rows(COUNTRIES[:1])[0], {"prompt": "Hi?", "chosen": "", "rejected": "No."}]
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


def test_pairs_are_previewed_as_the_chat_template_renders_them(tmp_path, demo_tokenizer):
    config = DatasetConfig(source=str(messy_pairs(tmp_path)))
    fmt, shown = preference_data.rendered_rows(config, "dpo", demo_tokenizer, 5)
    assert fmt == "pairs" and len(shown) == 5
    first = shown[0]
    # TRL's reading: the prompt with the generation prompt, each reply as what the template adds after it
    prompt = [{"role": "user", "content": pair_rows(COUNTRIES[:1])[0]["prompt"]}]
    assert first["prompt"] == demo_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert first["chosen"].startswith(pair_rows(COUNTRIES[:1])[0]["chosen"]) and first["chosen"] != first["rejected"]
    assert "<|im_end|>" in first["chosen"]  # the reply's end of turn is part of what is trained
    assert shown[4] == {"row": "5", "error": shown[4]["error"]} and "chosen side is empty" in shown[4]["error"]


def test_kto_and_grpo_previews_show_their_own_reading(tmp_path, demo_tokenizer):
    config = DatasetConfig(source=str(messy_pairs(tmp_path)))
    _, kto = preference_data.rendered_rows(config, "kto", demo_tokenizer, 1)
    assert {"prompt", "chosen", "rejected"} <= set(kto[0])  # pairs stay pairs: KTO's data splits them
    rows = [{"prompt": "What is 2+2?", "answer": "4"}]
    fmt, grpo = preference_data.rendered_rows(
        DatasetConfig(source=str(write_jsonl(tmp_path / "p.jsonl", rows))), "grpo", demo_tokenizer, 3
    )
    assert fmt == "prompts" and grpo[0]["answer"] == "4" and grpo[0]["prompt"].endswith("assistant\n")


def test_an_sft_stage_reads_preference_columns_as_their_stage():
    assert preference_data.view_stage("sft", ["prompt", "chosen", "rejected"]) == "dpo"
    assert preference_data.view_stage("sft", ["prompt", "completion", "label"]) == "kto"
    assert preference_data.view_stage("sft", ["instruction", "output"]) == "sft"
    assert preference_data.view_stage("orpo", ["prompt", "chosen", "rejected"]) == "orpo"


def test_the_report_of_pairs_counts_duplicates_empty_sides_cuts_and_lengths(tmp_path, demo_tokenizer):
    config = DatasetConfig(source=str(messy_pairs(tmp_path)))
    whole = planning.stage_data_report(config, "dpo", demo_tokenizer, max_seq_length=2048)
    assert (whole.format, whole.rows, whole.usable_rows) == ("pairs", 5, 4)
    assert whole.duplicates == [4] and whole.duplicate_of == {4: 1} and whole.empty_replies == [5]
    assert whole.truncated == [] and whole.reply_tokens_lost == 0 and whole.reply_tokens > 0
    assert 30 < whole.lengths["p50"] <= whole.lengths["max"] < 100
    cut = planning.stage_data_report(config, "dpo", demo_tokenizer, max_seq_length=whole.lengths["max"] - 3)
    assert cut.truncated and 0 < cut.reply_tokens_lost < cut.reply_tokens
    assert "exact duplicates: 1 (rows 4)" in whole.text() and "empty replies: 1 (rows 5)" in whole.text()


def test_sft_rows_given_to_dpo_report_name_the_columns_it_needs(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match="DPO needs prompt / chosen / rejected columns"):
        planning.stage_data_report(DatasetConfig(source=str(path)), "dpo", demo_tokenizer)


def test_a_broken_pair_is_previewed_in_its_place_with_its_reason():
    rows = [*pair_rows(COUNTRIES[:1]), {"prompt": "Hi?", "chosen": "", "rejected": "No."}]
    shown = preference_data.preview_pairs(rows, list(rows[0]), {})
    assert shown[0]["chosen"].endswith("Zebra!") and "Row 2: the chosen side is empty" in shown[1]["prompt"]
