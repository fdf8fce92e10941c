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
from train_config import TrainConfig
from workspace import config_to_dict

pytestmark = pytest.mark.gpu

STEPS = 30
REPLY_TOKENS = 64  # greedy chat replies of the GPU chat tests
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


@pytest.fixture(scope="module")
def adapter_run(llama_1b, tmp_path_factory) -> tuple[Path, Path]:
    """(workspace, run folder) of a finished run whose adapter is a random (non-zero) LoRA on every linear layer;
    every greedy reply of the model is REPLY_TOKENS text tokens (gpu_models.fix_reply_length)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workspace = tmp_path_factory.mktemp("chat-ws")
    config = TrainConfig(model=ModelConfig(str(llama_1b)), dataset=DatasetConfig(source=str(llama_1b / "x.jsonl")))
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "tuned")
    model = AutoModelForCausalLM.from_pretrained(llama_1b, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # PEFT's random B is large for a random model: a delta of a few percent of the weights
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(llama_1b).save_pretrained(run_dir / "adapter")
    gpu_models.fix_reply_length(llama_1b, llama_1b, REPLY_TOKENS)
    runfolder.write_status(run_dir, state="done")
    return workspace, run_dir


def greedy_under(model, prompt_ids: list[int], reply_ids: list[int]) -> list[float]:
    """For each token of the reply, how far its logit lies below the best one of `model` (eager, no cache) at that
    place, the reply so far given: 0 where the token is the model's own greedy choice."""
    import torch

    ids = torch.tensor([prompt_ids + reply_ids], device="cuda")
    with torch.inference_mode():  # the in-place masking below needs the logits made inside it too
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        suppressed = model.generation_config.suppress_tokens or []
        logits[:, suppressed] = -math.inf  # what the generation config rules out is no one's choice
        chosen = logits.gather(1, torch.tensor(reply_ids, device="cuda")[:, None])[:, 0]
        return (logits.max(dim=1).values - chosen).tolist()


def test_chat_on_cuda_decodes_base_and_tuned_as_the_unmerged_and_merged_models(adapter_run, llama_1b, monkeypatch):
    """The tab's fast path (LoRA out of PEFT's wrappers, merged in place, compiled static-cache step): the tuned
    weights equal merge_and_unload()'s and the base side's the base model's, bit for bit; every token each side
    picks is the greedy choice of that model run eagerly without a cache (within bf16's rounding: compiled kernels
    round differently, and a random model's best two logits are often that close); and the two sides differ.
    tests/test_inference_utils.py checks the same path token for token in float32 on the CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import inference_utils

    picked: list[list[int]] = []

    class Recording(inference_utils.Detokenizer):
        def __init__(self, tokenizer) -> None:
            super().__init__(tokenizer)
            picked.append(self.ids)

    monkeypatch.setattr(inference_utils, "Detokenizer", Recording)
    workspace, run_dir = adapter_run
    lines = []
    chat_model = inference_utils.load_for_chat(run=run_dir.name, workspace=workspace, status=lines.append)
    assert chat_model.backend == "transformers" and chat_model.static_cache and chat_model.lora_layers
    assert any(line.startswith("Warming up") for line in lines)
    config = inference_utils.GenerationConfig(temperature=0, max_new_tokens=REPLY_TOKENS)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
    prompt_ids = inference_utils._prompt_ids(chat_model, messages, config)
    picked.clear()
    list(inference_utils.stream_chat(chat_model, messages, config, use_adapter=True))
    merged_weights = {name: m.get_base_layer().weight.detach().clone() for name, m in chat_model.lora_layers}
    list(inference_utils.stream_chat(chat_model, messages, config, use_adapter=False))
    list(inference_utils.stream_chat(chat_model, messages, config, use_adapter=False))
    restored = {name: m.get_base_layer().weight.detach().clone() for name, m in chat_model.lora_layers}
    tuned_ids, base_ids, again_ids = picked
    del chat_model
    torch.cuda.empty_cache()

    assert len(base_ids) == len(tuned_ids) == REPLY_TOKENS  # the whole reply on both sides
    assert base_ids == again_ids  # nothing of one reply stays behind for the next
    assert base_ids != tuned_ids  # the adapter is off on one side and merged on the other
    plain = AutoModelForCausalLM.from_pretrained(llama_1b, dtype=torch.bfloat16).to("cuda").eval()
    plain_weights = dict(plain.named_parameters())
    for name, weight in restored.items():  # "base_model.model.<module>" in the adapter's naming
        assert torch.equal(weight, plain_weights[name.removeprefix("base_model.model.") + ".weight"]), name
    base_gaps = greedy_under(plain, prompt_ids, base_ids)
    merged = PeftModel.from_pretrained(plain, str(run_dir / "adapter")).merge_and_unload().eval()
    merged_weights_reference = dict(merged.named_parameters())
    for name, weight in merged_weights.items():
        assert torch.equal(weight, merged_weights_reference[name.removeprefix("base_model.model.") + ".weight"]), name
    tuned_gaps = greedy_under(merged, prompt_ids, tuned_ids)
    rounding = 0.1  # a few bf16 steps of a logit near 8
    figures = {
        "base_exact": sum(gap == 0 for gap in base_gaps),
        "tuned_exact": sum(gap == 0 for gap in tuned_gaps),
        "largest_gap": round(max(base_gaps + tuned_gaps), 4),
    }
    print(json.dumps({"test": "gpu_chat_greedy", "card": torch.cuda.get_device_name(0), **figures}))
    assert max(base_gaps) <= rounding and max(tuned_gaps) <= rounding, figures


def test_the_chat_worker_on_cuda_warms_up_while_loading_and_streams_both_sides(adapter_run):
    """The Test tab's worker on the GPU: no Unsloth, the step compiled while loading (said as "warming up"), then
    both sides stream every token."""
    import torch

    import chat_worker
    from inference_utils import GenerationConfig

    workspace, run_dir = adapter_run
    worker = chat_worker.ChatWorker(workspace)
    key = ("", run_dir.name, "")
    try:
        lines = list(worker.prepare(*key))
        assert any(line.startswith("Warming up") for line in lines), lines
        info = worker.info
        assert info["backend"] == "transformers" and info["compiled"]
        messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
        config = GenerationConfig(temperature=0, max_new_tokens=REPLY_TOKENS)
        figures = {}
        for side, use_adapter in (("tuned", True), ("base", False)):
            started = time.monotonic()
            first = None
            chunks = []
            for text in worker.chat(key, messages, config, use_adapter):
                first = first or time.monotonic() - started
                chunks.append(text)
            seconds = time.monotonic() - started
            assert len(chunks) > REPLY_TOKENS // 2 and chunks[-1], side  # streamed token by token, every token
            figures[side] = {"ttft_s": round(first, 3), "chunks_per_s": round(len(chunks) / seconds, 1)}
        log = worker.log_path.read_text(encoding="utf-8", errors="replace")
        assert "Unsloth" not in log
    finally:
        worker.end()
    print(json.dumps({"test": "gpu_chat_worker", "card": torch.cuda.get_device_name(0), **figures}))
