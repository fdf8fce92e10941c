"""The app's training job on a CUDA GPU through Unsloth: bf16 LoRA and 4-bit QLoRA on a random-init
Llama-3.2-1B-shaped model (the Hub is unreachable, so the model is built from its config with a generated tokenizer).

Each run is a real job (`jobs.start_job` → `python main.py run`), exactly what the UI starts. Run with `-s` to see
the figures: one JSON line per mode with the card's name, tokens/s and peak memory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

import jobs
import runfolder
from bench import gpu_models
from dataset_utils import DatasetConfig
from model_utils import ModelConfig
from training_utils import TrainConfig
from workspace import config_to_dict

pytestmark = pytest.mark.gpu

STEPS = 30
WARMUP_STEPS = 5  # compilation and allocator warm-up; excluded from tokens/s
SEQ = 1024
BATCH = 4


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-models")
    tokenizer = gpu_models.build_tokenizer(root / "tokenizer")
    return gpu_models.build_model("1b", root / "llama-3.2-1b-random", tokenizer)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> Path:
    """BATCH rows, each longer than SEQ tokens: every step trains on the same full batch."""
    rows = gpu_models.alpaca_rows(BATCH, min_words=1200, max_words=1400, seed=1)
    return gpu_models.write_jsonl(tmp_path_factory.mktemp("gpu-data") / "batch.jsonl", rows)


def run_training(workspace: Path, model: Path, data: Path, load_in_4bit: bool) -> dict:
    config = TrainConfig(
        model=ModelConfig(str(model)),
        dataset=DatasetConfig(source=str(data)),
        load_in_4bit=load_in_4bit,
        max_steps=STEPS,
        learning_rate=1e-3,
        warmup_steps=0,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_seq_length=SEQ,
        lora_r=16,
        lora_alpha=16,
        save_steps=STEPS,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "qlora" if load_in_4bit else "lora")
    jobs.start_job(run_dir)
    deadline = time.monotonic() + 600
    while jobs.job_status(run_dir).state in runfolder.ACTIVE and time.monotonic() < deadline:
        time.sleep(1)
    status = jobs.job_status(run_dir)
    assert status.state == "done", f"{status.error}\n{runfolder.log_tail(run_dir, 60)}"
    assert status.backend == "unsloth"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    return {
        "run_dir": run_dir,
        "events": [e for e in runfolder.read_events(run_dir) if e.kind == "log" and "loss" in e.metrics],
    }


def figures(events: list[runfolder.Event]) -> dict:
    """tokens/s over the steps after warm-up (every row fills SEQ tokens) and the peak memory the job logged."""
    timed = [event for event in events if event.step >= WARMUP_STEPS]
    seconds = timed[-1].time - timed[0].time
    tokens = (timed[-1].step - timed[0].step) * BATCH * SEQ
    logged = [event.metrics["tokens_per_s"] for event in timed[1:] if "tokens_per_s" in event.metrics]
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "logged_tokens_per_s": round(sum(logged) / len(logged), 1) if logged else None,
        "peak_memory_gib": max(event.metrics["memory_gib"] for event in events),
    }


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["bf16-lora", "4bit-qlora"])
def test_unsloth_job_trains_a_1b_model_with_falling_loss(workspace, llama_1b, one_batch, load_in_4bit):
    import torch

    result = run_training(workspace, llama_1b, one_batch, load_in_4bit)
    losses = [event.metrics["loss"] for event in result["events"]]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, f"loss did not fall on a repeated batch: {losses}"
    report = {
        "test": "gpu_job",
        "mode": "qlora" if load_in_4bit else "lora",
        "card": torch.cuda.get_device_name(0),
        "model": "Llama-3.2-1B shape, random init",
        "seq": SEQ,
        "batch": BATCH,
        "steps": STEPS,
        "loss_first5": round(first, 4),
        "loss_last5": round(last, 4),
        **figures(result["events"]),
    }
    print(json.dumps(report))


def test_the_chat_worker_on_cuda_imports_unsloth_first_and_streams(llama_1b, tmp_path):
    """The Test tab's worker on the GPU (the demo model's package is not on the device: the 1B shape stands in)."""
    import chat_worker
    from inference_utils import GenerationConfig

    workspace = tmp_path / "ws"
    workspace.mkdir()
    worker = chat_worker.ChatWorker(workspace)
    key = (str(llama_1b), "", "")
    try:
        assert worker.load(*key)["backend"] == "unsloth"
        messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
        chunks = list(worker.chat(key, messages, GenerationConfig(temperature=0, max_new_tokens=32), False))
        assert len(chunks) > 1 and chunks[-1] and worker.pid is not None
        log = worker.log_path.read_text(encoding="utf-8", errors="replace")
        assert "should be imported before" not in log  # Unsloth's warning when transformers came first
    finally:
        worker.end()
