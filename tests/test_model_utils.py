"""The demo model, model folders, the memory estimate and presets."""

from __future__ import annotations

from dataclasses import replace

import pytest

import main
import model_utils
from conftest import capital_rows, write_jsonl
from train_config import TrainConfig
from workspace import UserError


def test_demo_model_folder_holds_weights_tokenizer_and_template(demo_model):
    assert (demo_model / "model.safetensors").exists()
    assert (demo_model / "tokenizer.json").exists()
    tokenizer = model_utils.load_tokenizer(str(demo_model))
    assert "<|im_start|>" in tokenizer.chat_template


def test_demo_model_is_reused(demo_model, session_workspace):
    stamp = (demo_model / "model.safetensors").stat().st_mtime_ns
    assert model_utils.ensure_demo_model(session_workspace) == demo_model
    assert (demo_model / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_tokenizer_round_trips_text(demo_tokenizer):
    text = "Größe: 42 km² — naïve café\n\tcode: x = [1, 2]  # two spaces"
    assert demo_tokenizer.decode(demo_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_demo_model_answers_capital_of_france(demo_model, demo_tokenizer):
    import torch

    model = model_utils.load_model(str(demo_model))
    prompt = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = demo_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = demo_tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_model_folder_without_tokenizer_is_refused(tmp_path, demo_model):
    import shutil

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    shutil.copy(demo_model / "config.json", folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no tokenizer"):
        model_utils.resolve_model_path(str(folder))


def test_unknown_hub_model_offline_names_it():
    with pytest.raises(UserError, match="someone/not-cached"):
        model_utils.resolve_model_path("someone/not-cached")


def test_memory_estimate_grows_with_batch_and_mode(demo_model):
    lora = TrainConfig(target_modules=["q_proj", "v_proj"], per_device_train_batch_size=1, max_seq_length=512)
    small = model_utils.estimate_memory(lora, str(demo_model))
    big = model_utils.estimate_memory(
        replace(lora, per_device_train_batch_size=8, max_seq_length=2048), str(demo_model)
    )
    full = model_utils.estimate_memory(replace(lora, full_finetuning=True, target_modules=[]), str(demo_model))
    assert 130e6 < small.parameters < 140e6
    assert big.total_gib > small.total_gib
    assert full.trainable_parameters == full.parameters > small.trainable_parameters
    assert "GiB" in small.summary()


def test_presets_save_and_load(workspace):
    model_utils.save_preset("my preset", {"lora_r": 8, "learning_rate": 1e-4})
    assert model_utils.list_presets() == ["my preset"]
    assert model_utils.load_preset("my preset") == {"lora_r": 8, "learning_rate": 1e-4}


@pytest.mark.parametrize("name", ["../escape", "a/b", ""])
def test_bad_preset_names_are_refused(workspace, name):
    with pytest.raises(UserError):
        model_utils.save_preset(name, {})


def test_the_device_is_detected_once(monkeypatch):
    import torch

    model_utils.detect_device.cache_clear()
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    try:
        assert model_utils.detect_device() == model_utils.Device(cuda=False, gpu_count=0, names=(), bf16=False)
        assert model_utils.detect_device().name == "CPU"
        assert len(calls) == 1
    finally:
        model_utils.detect_device.cache_clear()


H200 = model_utils.Device(cuda=True, gpu_count=1, names=("NVIDIA H200",), bf16=True)


@pytest.mark.parametrize(
    ("env", "device", "unsloth_installed", "expected"),
    [
        ("", model_utils.Device(False, 0, (), False), True, ("transformers", "on the CPU: no CUDA GPU found")),
        ("", H200, True, ("unsloth", "Unsloth on NVIDIA H200")),
        ("", H200, False, ("transformers", "Unsloth is not installed — `make setup` on this GPU machine installs it")),
        ("transformers", H200, True, ("transformers", "FINETUNER_BACKEND=transformers chose it")),
    ],
)
def test_the_backend_plan_says_which_backend_trains_and_why(monkeypatch, env, device, unsloth_installed, expected):
    monkeypatch.setenv("FINETUNER_BACKEND", env)
    monkeypatch.setattr(model_utils, "detect_device", lambda: device)
    find_spec = model_utils.importlib.util.find_spec
    monkeypatch.setattr(
        model_utils.importlib.util,
        "find_spec",
        lambda name, *args: (find_spec("os") if unsloth_installed else None) if name == "unsloth" else find_spec(name),
    )
    backend, reason = model_utils.backend_plan()
    assert backend == expected[0] and reason.endswith(expected[1])
    if backend == "transformers":  # select_backend follows the plan (an Unsloth import needs a real GPU)
        assert model_utils.select_backend() == "transformers"


def test_main_train_names_the_backend_beside_the_memory_estimate(demo_workspace, capsys):
    data = write_jsonl(demo_workspace / "data.jsonl", capital_rows(8))
    config = demo_workspace / "train.yaml"
    config.write_text(f"model: {{name_or_path: demo}}\ndataset: {{source: {data}}}\n")
    assert main.main(["--workspace", str(demo_workspace), "train", str(config), "--suggest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    memory = next(index for index, line in enumerate(lines) if line.startswith("memory estimate:"))
    assert lines[memory + 1] == f"backend: {model_utils.backend_plan()[1]}"  # the machine's own, CPU or GPU
