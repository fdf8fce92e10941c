"""rsLoRA and DoRA (PEFT's use_rslora / use_dora): refused where they cannot run, reaching PEFT where they can, and a
DoRA run that trains, chats (base and tuned side by side) and merges for export to the same outputs as its adapter."""

from __future__ import annotations

import dataclasses
import math

import pytest

import gguf_utils
import inference_utils
import jobs
import lora_weights
import runfolder
import training_utils
from conftest import capital_rows, family_config, write_jsonl
from gguf_utils import convert
from train_config import TrainConfig, check_lora_variant
from workspace import UserError, config_to_dict


def test_dora_is_refused_on_unsloth_with_the_way_out():
    config = TrainConfig(use_dora=True)
    with pytest.raises(UserError, match="FINETUNER_BACKEND=transformers"):
        check_lora_variant(config, "unsloth")
    check_lora_variant(config, "transformers")
    check_lora_variant(TrainConfig(use_rslora=True), "unsloth")  # Unsloth's get_peft_model takes use_rslora


@pytest.mark.parametrize("changes", [{"full_finetuning": True}, {"start_from_run": "sft-run", "stage": "dpo"}])
def test_lora_variants_are_refused_where_no_new_adapter_is_made(changes):
    for name in ("use_rslora", "use_dora"):
        with pytest.raises(UserError, match=name):
            check_lora_variant(TrainConfig(**{name: True, **changes}), "transformers")


def test_rslora_and_dora_reach_peft(family_model, tmp_path):
    folder, template = family_model("llama")
    data = write_jsonl(tmp_path / "rows.jsonl", capital_rows(4))
    config = family_config(folder, data, template, use_rslora=True, use_dora=True)
    model, _ = training_utils.load_for_training(config, str(folder), "transformers")
    layers = list(lora_weights.lora_layers(model))
    assert layers and lora_weights.uses_dora(layers) and not lora_weights.mergeable(layers)
    _, layer = layers[0]
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    plain, _ = training_utils.load_for_training(dataclasses.replace(config, use_dora=False), str(folder), "x")
    assert not lora_weights.uses_dora(list(lora_weights.lora_layers(plain)))


def test_a_dora_run_chats_compares_and_merges_to_its_adapters_outputs(family_model, workspace):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, template = family_model("llama")
    data = write_jsonl(workspace / "capitals.jsonl", capital_rows(8))
    config = family_config(folder, data, template, use_dora=True, learning_rate=5e-2)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "dora")
    training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    assert lora_weights.adapter_variant(run_dir / "adapter") == "dora"

    chat_model = inference_utils.load_chat_model(run=str(run_dir), workspace=workspace)
    generation = inference_utils.GenerationConfig(max_new_tokens=4, temperature=0)
    # PEFT refuses a mixed base/tuned batch for DoRA: the comparison runs the sides one after the other.
    pairs = list(inference_utils.compare_deltas(chat_model, "What is the capital of Peru?", generation))
    assert "".join(base for base, _ in pairs) and "".join(tuned for _, tuned in pairs)

    # The export's merge (merge_and_unload) gives the outputs of the adapter on its base model.
    model = gguf_utils.export_source("dora", workspace)
    merged_dir, _ = convert.ensure_merged(model, "float16")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter changed something to compare
    assert torch.allclose(merged, tuned, atol=2e-2), (merged - tuned).abs().max()

    export = gguf_utils.ExportConfig(run="dora", quants=["q8_0"], lora_gguf=True)
    with pytest.raises(UserError, match="DoRA"):
        gguf_utils.check_export(export, workspace)
