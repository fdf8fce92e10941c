"""Shared fixtures: an offline environment, a session workspace with the demo model converted once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def demo_model(session_workspace) -> Path:
    """The demo model in the session workspace; a developer's already converted copy (make run) is linked in."""
    import model_utils

    converted = model_utils.demo_model_dir(ROOT / "workspace")
    if (converted / "model.safetensors").exists():
        target = model_utils.demo_model_dir(session_workspace)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(converted)
    return model_utils.ensure_demo_model(session_workspace)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model):
    import model_utils

    return model_utils.load_tokenizer(str(demo_model))


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("FINETUNER_WORKSPACE", str(root))
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# Countries and capitals for small, learnable rows (chat rows here, preference pairs in test_preference).
COUNTRIES = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Kenya", "Nairobi"),
]


def capital_rows(count: int) -> list[dict]:
    """Small, learnable chat rows in the messages format."""
    countries = COUNTRIES[:8]
    rows = []
    for index in range(count):
        country, capital = countries[index % len(countries)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": f"The capital of {country} is {capital}. Zebra!"},
                ]
            }
        )
    return rows


def demo_train_config(data: Path, **changes):
    """A LoRA run of the demo model that learns something visible in seconds on two CPU cores."""
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig

    values = dict(
        model=ModelConfig("demo"),
        dataset=DatasetConfig(source=str(data)),
        max_steps=30,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_seq_length=128,
        save_steps=10,
        lora_r=8,
        lora_alpha=16,
        gradient_checkpointing=False,
    )
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="session")
def trained_run(session_workspace, demo_model) -> Path:
    """A finished 30-step LoRA run on the demo model (learns to end answers with "Zebra!"), made once per session."""
    import jobs
    import runfolder
    import training_utils
    from workspace import config_to_dict

    data = write_jsonl(session_workspace / "capitals.jsonl", capital_rows(48))
    config = demo_train_config(data, save_steps=30, eval_split=0.25, report_to="tensorboard")
    run_dir = jobs.create_run("train", config_to_dict(config), session_workspace, "trained")
    training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    return run_dir


@pytest.fixture
def demo_workspace(workspace, demo_model) -> Path:
    """The session's converted demo model, linked into this test's workspace (no second conversion)."""
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / demo_model.name).symlink_to(demo_model)
    return workspace


def family_config(folder, data: Path, template: str | None, **changes):
    """demo_train_config's settings on a family's tiny model (family_model): 2 steps, a smaller LoRA, short rows."""
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig

    values = dict(
        model=ModelConfig(str(folder)),
        dataset=DatasetConfig(source=str(data), chat_template=template or ""),
        max_steps=2,
        max_seq_length=96,
        save_steps=2,
        lora_r=4,
        lora_alpha=8,
    )
    values.update(changes)
    return demo_train_config(data, **values)


def wait_for(predicate, timeout: float = 900, interval: float = 0.5, what: str = "the condition"):
    """predicate()'s first true value, polled every `interval` seconds; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of a run's training-loss events."""
    import runfolder

    return [event.step for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics]


# The catalogue's families as tiny random models: each architecture from transformers' own config class, each with a
# real tokenizer from llama.cpp's vocabulary files (gguf_utils.vocab). family: (config class, its extra settings,
# vocabulary, named chat template for a vocabulary that ships none, end-of-turn token of the instruct models).
MODEL_FAMILIES = {
    "llama": ("LlamaConfig", {}, "llama-bpe", "llama3", "<|eot_id|>"),
    "qwen3": ("Qwen3Config", {}, "qwen2", None, "<|im_end|>"),
    # No Gemma 3 vocabulary is in the sdist (ggml-vocab-gemma-4 is Gemma 4's, which transformers cannot load):
    # the Gemma 3 architecture with Qwen2's BPE vocabulary and ChatML.
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 32, "query_pre_attn_scalar": 16}, "qwen2", None, "<|im_end|>"),
    # Phi-4-mini's turns on Phi-3's SentencePiece vocabulary (Phi-4's own o200k BPE is not in the sdist).
    "phi3": ("Phi3Config", {"pad_token_id": 32000}, "phi-3", "phi4", "<|end|>"),
    "mistral": ("MistralConfig", {}, "llama-spm", "mistral", None),
}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family → (a folder with a tiny random model of that family and its real tokenizer, its named template or
    None); each made once per session, on first use."""
    made: dict[str, tuple[Path, str | None]] = {}

    def make(family: str) -> tuple[Path, str | None]:
        if family not in made:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM

            from gguf_utils import vocab

            config_class, extra, vocabulary, template, eos = MODEL_FAMILIES[family]
            tokenizer, proto = vocab.tokenizer_from_vocab(vocabulary, eos_token=eos)
            config = getattr(transformers, config_class)(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=True,
                # As a real checkpoint's config names its tokenizer's pad: the architectures zero that embedding row
                # (Gemma 3's default, 0, would zero an ordinary token's row, which a real Gemma 3 never has).
                **{"pad_token_id": tokenizer.pad_token_id, **extra},
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            folder = tmp_path_factory.mktemp(f"family-{family}")
            model.save_pretrained(folder)
            vocab.save_tokenizer(tokenizer, proto, folder)
            made[family] = folder, template
        return made[family]

    return make
