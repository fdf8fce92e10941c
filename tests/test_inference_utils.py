"""Chat and base-vs-tuned comparison with the demo model and a trained LoRA run."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import inference_utils
import jobs
import lora_weights
import runfolder
from inference_utils import GenerationConfig
from train_config import TrainConfig
from workspace import UserError, config_to_dict

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"  # one of the trained prompts; training taught replies to end in "Zebra!"
GREEDY = GenerationConfig(temperature=0, max_new_tokens=20)


@pytest.fixture(scope="module")
def tuned(trained_run):
    return inference_utils.load_chat_model(run=str(trained_run))


@pytest.fixture(scope="module")
def greedy_replies(tuned) -> tuple[str, str]:
    """(base, tuned) greedy replies to PROMPT, generated once for the tests that compare against them."""
    return final_reply(tuned, use_adapter=False), final_reply(tuned)


def final_reply(chat_model, prompt: str = PROMPT, use_adapter: bool = True) -> str:
    *_, last = inference_utils.stream_chat(chat_model, [{"role": "user", "content": prompt}], GREEDY, use_adapter)
    return last


def main_py(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- bad input

BAD_GENERATION = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize("changes, message", BAD_GENERATION, ids=[str(v[0]) for v in BAD_GENERATION])
def test_bad_generation_values_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        GenerationConfig(**changes).validate()


def test_chat_with_empty_prompt_is_refused(tuned):
    with pytest.raises(UserError, match="prompt is empty"):
        list(inference_utils.stream_chat(tuned, [{"role": "user", "content": "  \n"}], GREEDY))
    with pytest.raises(UserError, match="prompt is empty"):
        list(inference_utils.compare_deltas(tuned, "", GREEDY))


def test_chat_with_max_new_tokens_0_is_refused(tuned):
    with pytest.raises(UserError, match="max_new_tokens"):
        list(
            inference_utils.stream_chat(
                tuned, [{"role": "user", "content": PROMPT}], GenerationConfig(max_new_tokens=0)
            )
        )


def test_unknown_run_is_refused(workspace):
    with pytest.raises(UserError, match="No run named 'nope'"):
        inference_utils.load_chat_model(run="nope")


def test_run_without_adapter_is_refused(workspace):
    jobs.create_run("train", config_to_dict(TrainConfig()), workspace, "unfinished")
    with pytest.raises(UserError, match="no trained model yet"):
        inference_utils.load_chat_model(run="unfinished")


def test_adapter_on_a_model_of_another_shape_is_refused(trained_run, demo_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = tmp_path / "tiny-llama"
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(demo_tokenizer),
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    demo_tokenizer.save_pretrained(tiny)
    with pytest.raises(UserError, match="was trained on 'demo' and does not fit model .*size mismatch"):
        inference_utils.load_chat_model(str(tiny), run=str(trained_run))


def test_cli_refuses_empty_prompt_and_zero_tokens_before_loading(workspace):
    empty = main_py("--workspace", str(workspace), "chat", "--prompt", " ")
    assert empty.returncode == 2 and "error: The prompt is empty" in empty.stderr
    zero = main_py("--workspace", str(workspace), "chat", "--prompt", "Hi", "--max-new-tokens", "0")
    assert zero.returncode == 2 and "error: max_new_tokens" in zero.stderr


# ---------------------------------------------------------------- chat and comparison


def test_tuned_reply_differs_from_base_on_a_trained_prompt(greedy_replies):
    base, tuned_reply = greedy_replies
    assert tuned_reply != base
    assert "Zebra" in tuned_reply and "Zebra" not in base


def test_streaming_yields_growing_prefixes(tuned, greedy_replies):
    chunks = list(inference_utils.stream_chat(tuned, [{"role": "user", "content": PROMPT}], GREEDY))
    assert len(chunks) > 1
    for before, after in itertools.pairwise(chunks):
        assert after.startswith(before) and len(after) > len(before)
    assert chunks[-1] == greedy_replies[1]


def test_compare_gives_both_sides_from_one_model(tuned, greedy_replies):
    from peft import PeftModel

    pairs = list(inference_utils.compare_deltas(tuned, PROMPT, GREEDY))  # as the chat worker streams them
    assert len(pairs) > 1
    assert isinstance(tuned.model, PeftModel) and tuned.has_adapter  # one set of base weights, adapter toggled
    assert ("".join(base for base, _ in pairs), "".join(tuned for _, tuned in pairs)) == greedy_replies


def test_compare_needs_a_run(demo_model, session_workspace):
    base = inference_utils.load_chat_model("demo", workspace=session_workspace)
    assert base.kind == "base" and final_reply(base)
    with pytest.raises(UserError, match="needs a training run"):
        list(inference_utils.compare_deltas(base, PROMPT, GREEDY))


@pytest.mark.slow
def test_chat_cli_streams_the_reply(trained_run, session_workspace):
    done = main_py(
        "--workspace",
        str(session_workspace),
        "chat",
        "--run",
        "trained",
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--compare",
    )
    assert done.returncode == 0, done.stderr
    base, tuned_part = done.stdout.split("[tuned]")
    assert base.startswith("[base]") and "Zebra" not in base
    assert "Zebra" in tuned_part


# ---------------------------------------------------------------- decoding


def test_stream_equals_plain_generate_and_decodes_a_short_window_per_token(tuned, monkeypatch):
    import torch

    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    config = GenerationConfig(temperature=0, max_new_tokens=48)
    prompt = inference_utils._prompt_ids(tuned, messages, config)
    with torch.inference_mode(), tuned.model.disable_adapter():
        output = tuned.model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=tuned.tokenizer.pad_token_id,
        )
    expected = tuned.tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    windows = []
    decode = tuned.tokenizer.decode
    monkeypatch.setattr(tuned.tokenizer, "decode", lambda ids, **kw: windows.append(len(ids)) or decode(ids, **kw))
    *_, reply = inference_utils.stream_chat(tuned, messages, config, use_adapter=False)
    assert reply == expected
    assert len(windows) > 40 and max(windows) <= 6  # never the whole reply: the cost per token does not grow


def test_tuned_side_merges_the_adapter_in_place_and_base_restores_the_weights_bit_for_bit(tuned, greedy_replies):
    import torch

    assert not tuned.merge_lora  # on the CPU the adapter stays unmerged (a merge costs more than it saves)
    _, layer = next(lora_weights.lora_layers(tuned.model))
    original = layer.get_base_layer().weight.detach().clone()
    tuned.merge_lora = True  # what load_chat_model sets on CUDA
    try:
        assert final_reply(tuned) == greedy_replies[1]
        assert tuned.merged and not torch.equal(layer.get_base_layer().weight, original)
        assert final_reply(tuned, use_adapter=False) == greedy_replies[0]
        assert not tuned.merged and torch.equal(layer.get_base_layer().weight, original)
    finally:
        inference_utils._set_side(tuned, "base")
        tuned.merge_lora = False


def test_the_cuda_chat_path_without_compiling_decodes_exactly_as_merge_and_unload_and_the_base(trained_run):
    """load_for_chat's CUDA path on the CPU, where float32 makes it exact: PEFT's wrappers out of the model, the LoRA
    merged in place for the tuned side and the weights restored for the base side, one static KV cache size. Greedy
    replies equal those of merge_and_unload() and of the model loaded without the adapter (the GPU test checks the
    compiled step the same way, within bf16's rounding)."""
    import torch
    from peft import PeftModel

    import model_utils

    chat_model = inference_utils.load_chat_model(run=str(trained_run), backend="transformers")
    inference_utils._unwrap_adapter(chat_model)
    chat_model.static_cache, chat_model.cache_tokens = True, 256
    assert not chat_model.wrapped and not hasattr(chat_model.model, "disable_adapter")  # a plain transformers model
    config = GenerationConfig(temperature=0, max_new_tokens=24)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = inference_utils._prompt_ids(chat_model, messages, config)
    tuned = list(inference_utils.stream_chat(chat_model, messages, config, use_adapter=True))[-1]
    base = list(inference_utils.stream_chat(chat_model, messages, config, use_adapter=False))[-1]
    path = model_utils.resolve_model_path("demo", runfolder.run_workspace(trained_run))

    def reference(model) -> str:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                cache_implementation="static",
                eos_token_id=sorted(inference_utils._stop_token_ids(model, chat_model.tokenizer)),
                pad_token_id=chat_model.tokenizer.pad_token_id,
            )
        return chat_model.tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)

    plain = model_utils.load_model(path)
    assert base == reference(plain)
    merged = PeftModel.from_pretrained(plain, str(trained_run / "adapter")).merge_and_unload()
    assert tuned == reference(merged) and "Zebra" in tuned and "Zebra" not in base


def test_load_for_chat_on_the_cpu_says_it_loads_and_compiles_nothing(trained_run):
    lines = []
    chat_model = inference_utils.load_for_chat(run=str(trained_run), status=lines.append)
    assert lines == ["Loading the model…"]
    assert chat_model.backend == "transformers" and chat_model.wrapped and not chat_model.static_cache


def test_static_cache_is_off_on_the_cpu(tuned):
    assert tuned.static_cache is False  # a static cache and torch.compile pay off on CUDA only


# ---------------------------------------------------------------- an exported GGUF through llama.cpp


@pytest.fixture(scope="module")
def exported_gguf(trained_run, demo_model, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the trained run exported to q8_0 (the file a user ships): (workspace, GGUF file name)."""
    import main

    workspace = tmp_path_factory.mktemp("gguf-chat")
    (workspace / "models").mkdir()
    (workspace / "models" / demo_model.name).symlink_to(demo_model)
    run_dir = jobs.create_run("train", runfolder.stage_settings(trained_run), workspace, "trained")
    shutil.copytree(trained_run / "adapter", run_dir / "adapter")
    runfolder.write_status(run_dir, state="done")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNER_WORKSPACE", str(workspace))
        code = main.main(["--workspace", str(workspace), "export", "trained", "--quant", "q8_0"])
    assert code == 0, runfolder.log_tail(runfolder.runs_dir(workspace) / "export-trained")
    (name,) = inference_utils.gguf_files("trained", workspace)
    return workspace, name


def test_chat_with_the_exported_gguf_gives_the_tuned_reply(exported_gguf):
    workspace, name = exported_gguf
    chat_model = inference_utils.load_chat_model(run="trained", workspace=workspace, gguf=name)
    assert (chat_model.kind, chat_model.backend) == ("gguf", "llama.cpp")
    chunks = list(inference_utils.stream_chat(chat_model, [{"role": "user", "content": PROMPT}], GREEDY))
    assert len(chunks) > 1 and all(after.startswith(before) for before, after in itertools.pairwise(chunks))
    assert "Paris" in chunks[-1] and "Zebra" in chunks[-1]
    with pytest.raises(UserError, match="no base side"):
        list(inference_utils.compare_deltas(chat_model, PROMPT, GREEDY))
    with pytest.raises(UserError, match="exported GGUF"):
        list(inference_utils.stream_chat(chat_model, [{"role": "user", "content": PROMPT}], GREEDY, False))


def test_a_missing_gguf_is_refused_with_the_files_there(exported_gguf):
    workspace, name = exported_gguf
    with pytest.raises(UserError, match=f"'nope.gguf' not found; run 'trained' has {name}"):
        inference_utils.load_chat_model(run="trained", workspace=workspace, gguf="nope.gguf")


def test_the_chat_worker_loads_the_gguf_as_the_test_tab_does(exported_gguf):
    import chat_worker

    workspace, name = exported_gguf
    worker = chat_worker.ChatWorker(workspace)
    try:
        info = worker.load("", "trained", name)
        assert info["kind"] == "gguf" and info["backend"] == "llama.cpp"
        *_, reply = worker.chat(("", "trained", name), [{"role": "user", "content": PROMPT}], GREEDY, True)
        assert "Zebra" in reply
    finally:
        worker.end()


def test_cli_chat_with_the_exported_gguf(exported_gguf):
    workspace, name = exported_gguf
    done = main_py(
        "--workspace", str(workspace), "chat", "--run", "trained", "--gguf", name, "--prompt", PROMPT,
        "--temperature", "0", "--max-new-tokens", "20",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Zebra" in done.stdout
