"""Every model family of the catalogue, end to end on the CPU: a tiny random model of the family's architecture with
a real tokenizer (conftest.MODEL_FAMILIES) is trained by the app's train stage with its default LoRA targets, chats,
is merged and converted by the app's export, loads in llama.cpp with the same token ids, and gets a Modelfile whose
TEMPLATE renders like the chat template."""

from __future__ import annotations

import json

import pytest

import dataset_utils
import gguf_utils
import inference_utils
import jobs
import model_utils
import runfolder
import training_utils
from conftest import MODEL_FAMILIES, capital_rows, family_config, write_jsonl
from dataset_utils import DatasetConfig
from gguf_utils import modelfile
from model_utils import ModelConfig
from train_config import TrainConfig
from workspace import UserError, config_to_dict

# Special tokens, digits, spaces and newlines in runs, accents and a CJK word: where pre-tokenizers differ.
TOKENIZER_TEXT = "Hello, world! It's 12345 and  3.14\n\n\tüñï — 日本語  x <unk>"
CHATS = [
    [{"role": "user", "content": "What is the capital of Peru?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
]


@pytest.mark.slow  # each family trains, exports and loads a GGUF: 9–40 s apiece on the CPU
@pytest.mark.parametrize("family", list(MODEL_FAMILIES))
def test_family_trains_chats_exports_and_loads_in_llama_cpp(family, family_model, workspace):
    import llama_cpp
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, template = family_model(family)
    data = write_jsonl(workspace / "capitals.jsonl", capital_rows(8))
    config = family_config(folder, data, template)
    tokenizer = model_utils.load_tokenizer(str(folder))

    # Assistant-only loss: exactly the reply and the template's end of turn are trained.
    prepared = dataset_utils.prepare_dataset(config.dataset, tokenizer, config.max_seq_length, workspace=workspace)
    row = prepared.train[0]
    segments = dataset_utils.loss_segments(row["input_ids"], row["labels"], tokenizer)
    trained = "".join(text for text, is_trained in segments if is_trained)
    reply = next(r["messages"][1]["content"] for r in capital_rows(8) if r["messages"][1]["content"] in trained)
    turns = dataset_utils.chat_turns(tokenizer)
    assert trained.strip() == (reply + turns.assistant[1]).strip()

    # Training with the default target modules: LoRA on every linear layer the family has, whatever it calls them.
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "run")
    training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not base.get_output_embeddings()
    }
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == linear
    if family == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= linear and "q_proj" not in linear

    # Chat with the trained adapter: the prompt is the family's template, the reply stops within its budget.
    chat_model = inference_utils.load_chat_model(run=str(run_dir), workspace=workspace)
    assert chat_model.has_adapter
    generation = inference_utils.GenerationConfig(max_new_tokens=4, temperature=0)
    pieces = list(inference_utils.chat_deltas(chat_model, CHATS[0], generation))
    assert len(tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]) <= 4 + 1

    # Merge, convert with llama.cpp's converter, quantize, load in llama.cpp and compare with the HF model.
    export = gguf_utils.ExportConfig(run="run", quants=["q8_0"], check_prompts=10, check_tokens=4)
    export_dir = jobs.create_run("export", config_to_dict(export), workspace)
    assert gguf_utils.export_job(export, runfolder.JobContext.for_run(export_dir)) == "done"
    report = json.loads((run_dir / "gguf" / "report.json").read_text())
    result = report["files"][0]
    assert result["tokenizer_match"] == 1.0, result
    assert result["agreement"] >= 0.9, result

    # The same ids for the same text, special tokens included, in llama.cpp and in transformers.
    llm = llama_cpp.Llama(str(run_dir / "gguf" / result["file"]), vocab_only=True, verbose=False)
    merged_tokenizer = model_utils.load_tokenizer(str(run_dir / "merged"))
    text = TOKENIZER_TEXT + "".join(merged_tokenizer.all_special_tokens[:3])
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=True)
        == merged_tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    llm.close()

    # The Modelfile's TEMPLATE renders like the family's chat template, and stops at its end of turn.
    text = (run_dir / "gguf" / "Modelfile").read_text()
    assert 'TEMPLATE """' in text
    turns = modelfile.template_turns(merged_tokenizer)
    for chat in CHATS:
        assert modelfile.render_turns(turns, chat) == modelfile.hf_chat_prompt(merged_tokenizer, chat)
    assert f"PARAMETER stop {json.dumps(merged_tokenizer.eos_token)}" in text


def test_converter_lists_every_catalogue_architecture_it_supports():
    supported = gguf_utils.supported_architectures()
    for _, architecture in model_utils.CATALOGUE_ARCHITECTURES.values():
        assert gguf_utils.conversion_warning([architecture]) is None
        assert architecture in supported
    warning = gguf_utils.conversion_warning(["OPTForCausalLM"])
    assert "cannot convert OPTForCausalLM" in warning and "not export it to GGUF" in warning


def test_catalogue_entry_transformers_cannot_load_says_why():
    from ui import model_tab

    labels = dict((value, label) for label, value in model_tab.catalogue_choices())
    assert "no causal-LM class for 'mistral3'" in labels["unsloth/Mistral-Small-3.2-24B-Instruct-2506"]
    assert labels["unsloth/Qwen3-0.6B"] == "unsloth/Qwen3-0.6B"


def test_memory_estimate_warns_before_training_that_an_architecture_cannot_be_exported(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from ui import model_tab

    folder = tmp_path / "opt"
    OPTForCausalLM(
        OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    ).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    config = TrainConfig(model=ModelConfig(str(folder)), dataset=DatasetConfig(source="d.jsonl"))
    text = model_tab.memory_estimate(config, tmp_path)
    assert text.startswith("**Memory estimate:**")
    assert "**Export:** llama.cpp's converter (llama-cpp-python" in text and "cannot convert OPTForCausalLM" in text


def test_a_model_that_never_trained_its_chat_tokens_is_refused_before_the_first_step(family_model, workspace, tmp_path):
    """Llama 3's header tokens with all-zero embeddings, as in Llama 3 base, whose chat tokens were only reserved: the
    run stops before training with one message naming the tokens and what to do, and writes no checkpoint."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder, template = family_model("llama")
    base = tmp_path / "base-model"
    shutil.copytree(folder, base)
    model = AutoModelForCausalLM.from_pretrained(base)
    headers = model_utils.load_tokenizer(str(base)).convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    with torch.no_grad():
        model.get_input_embeddings().weight[headers] = 0  # tied: the output rows are zero too
    model.save_pretrained(base)
    data = write_jsonl(workspace / "capitals.jsonl", capital_rows(8))
    config = family_config(base, data, template)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "base-run")
    with pytest.raises(
        UserError,
        match=r"never trained the token\(s\) '<\|start_header_id\|>', '<\|end_header_id\|>' that 8 of your rows",
    ) as error:
        training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    assert "instruct version" in str(error.value) and "full fine-tuning" in str(error.value)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())

    # A full fine-tune trains the embeddings: the same rows are not refused.
    tokenizer = model_utils.load_tokenizer(str(base))
    prepared = dataset_utils.prepare_dataset(config.dataset, tokenizer, config.max_seq_length, workspace=workspace)
    full = family_config(base, data, template)
    full.full_finetuning = True
    training_utils.check_untrained_tokens(full, model, tokenizer, prepared.train)


def test_the_catalogue_says_how_the_demo_and_the_hubs_smollm2_differ():
    from ui import model_tab

    labels = dict((value, label) for label, value in model_tab.catalogue_choices())
    assert "offline" in labels["demo"] and "Q4_1" in labels["demo"]
    assert "full precision" in labels["unsloth/SmolLM2-135M-Instruct"]
    assert "from the Hub" in labels["unsloth/SmolLM2-135M-Instruct"]
