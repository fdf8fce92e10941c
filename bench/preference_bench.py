"""DPO, ORPO, KTO and GRPO throughput of the app's training job on a CUDA GPU (Unsloth where installed), on the random-weight
Llama-3.2-1B shape of bench/gpu_models.py. Prints one JSON object per stage: tokens/s (TRL's token count over the
timed steps), samples/s (pairs, KTO rows or completions per second) and peak memory, all read from the run's
events.jsonl.

    python bench/preference_bench.py --stages dpo,orpo,kto,grpo --shape 1b
    python bench/preference_bench.py --probe-generation --shape 1b   # GRPO's generate call, variants side by side

Each stage is a real job (jobs.create_run + jobs.start_job → `python main.py run`), exactly what the UI starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402

STEPS = 20
SKIP = 5  # steps left out of the timing (compilation, allocator warm-up)
BATCH = 8  # DPO / ORPO: pairs per step; KTO: rows per step (pairs split in two); GRPO: 2 prompts × 4 generations
PAIRED = ("dpo", "orpo", "kto")  # the stages read pairs here (KTO unpairs them)


def pair_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "prompt": gpu_models.words(rng, 60),
            "chosen": gpu_models.words(rng, 200),
            "rejected": gpu_models.words(rng, 200),
        }
        for _ in range(count)
    ]


def prompt_rows(count: int) -> list[dict]:
    rng = random.Random(1)
    return [{"prompt": gpu_models.words(rng, 60), "answer": "42"} for _ in range(count)]


def stage_config(stage: str, model: Path, data: Path, steps: int = STEPS, completion_tokens: int = 256, **overrides):
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig

    common = dict(
        model=ModelConfig(str(model)),
        dataset=DatasetConfig(source=str(data)),
        stage=stage,
        max_steps=steps,
        warmup_steps=0,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        save_steps=steps,
        max_seq_length=1024,
        fit_micro_batch=False,
    )
    if stage == "grpo":
        common.update(
            num_generations=4, max_completion_length=completion_tokens, reward_funcs=["length"], reward_max_length=400
        )
    return TrainConfig(**{**common, **overrides})


def measure(
    stage: str,
    model: Path,
    workspace: Path,
    steps: int = STEPS,
    completion_tokens: int = 256,
    timeout_s: float | None = None,
    **overrides,
) -> dict:
    import jobs
    import runfolder
    from workspace import config_to_dict

    rows = pair_rows(BATCH * steps) if stage in PAIRED else prompt_rows(BATCH * steps)
    data = gpu_models.write_jsonl(workspace / f"{stage}.jsonl", rows)
    config = stage_config(stage, model, data, steps, completion_tokens, **overrides)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"bench-{stage}-{int(time.time())}")
    jobs.start_job(run_dir)
    deadline = time.monotonic() + (timeout_s or float("inf"))
    while jobs.job_status(run_dir).active:
        if time.monotonic() > deadline:  # say where the job was, rather than leave a caller's timeout to kill it
            log = runfolder.log_tail(run_dir, 60)
            jobs.stop_job(run_dir)
            return {"stage": stage, "state": "timed out", "error": f"no result in {timeout_s:.0f} s", "log": log}
        time.sleep(2)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        return {"stage": stage, "state": status.state, "error": status.error, "log": runfolder.log_tail(run_dir)}
    logs = [event for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics]
    skip = min(SKIP, steps // 2)
    timed = [event for event in logs if event.step > skip]
    seconds = timed[-1].time - logs[skip - 1].time
    rates = [event.metrics["tokens_per_s"] for event in timed if "tokens_per_s" in event.metrics]
    return {
        "stage": stage,
        "backend": status.backend,
        "steps_timed": len(timed),
        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "samples_per_s": round(BATCH * len(timed) / seconds, 2),
        "peak_memory_gib": max(event.metrics.get("memory_gib", 0) for event in logs),
        "reward_margin": logs[-1].metrics.get("reward_margin"),
        "completion_length": logs[-1].metrics.get("completion_length"),
        "generation_share": mean_metric(timed, "generation_share"),
        "completions_per_s": mean_metric(timed, "completions_per_s"),
        "settings": overrides,
    }


def mean_metric(events, key: str) -> float | None:
    values = [event.metrics[key] for event in events if key in event.metrics]
    return round(sum(values) / len(values), 3) if values else None


def probe_generation(model: Path, workspace: Path, completion_tokens: int, repeats: int = 2) -> None:
    """GRPO's generate call in this process, on the app's own GRPO trainer (its model, LoRA and generation config),
    with generation settings varied: completions/s of each, one JSON line per variant."""
    import model_utils

    backend = model_utils.select_backend()  # Unsloth first, as the job does
    import torch

    import jobs
    import runfolder
    import stages
    import training_utils
    from workspace import config_to_dict

    data = gpu_models.write_jsonl(workspace / "probe.jsonl", prompt_rows(64))
    config = stage_config("grpo", model, data, 4, completion_tokens)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"probe-{int(time.time())}")
    ctx = runfolder.JobContext.for_run(run_dir)
    loaded, tokenizer = training_utils.load_for_training(config, str(model), backend)
    trainer = stages.get("grpo").trainer(config, loaded, tokenizer, ctx, backend)
    prompts = [
        tokenizer(row["prompt"] if isinstance(row["prompt"], str) else "")["input_ids"] for row in prompt_rows(32)
    ]
    base = dict(trainer.generation_config.to_dict())
    variants = {
        "as_trained": ({}, 2),
        "static_cache": ({"cache_implementation": "static"}, 2),
        "static_cache_compiled": ({"cache_implementation": "static", "disable_compile": False}, 2),
        "as_trained_4x_prompts": ({}, 8),
        "static_cache_compiled_4x_prompts": ({"cache_implementation": "static", "disable_compile": False}, 8),
    }
    for name, (settings, prompt_count) in variants.items():
        for key, value in {**base, **settings}.items():
            setattr(trainer.generation_config, key, value)
        batch = [ids for ids in prompts[:prompt_count] for _ in range(config.num_generations)]
        record = {"probe": "grpo_generation", "variant": name, "completions": len(batch), "settings": settings}
        try:
            trainer._generate_single_turn(batch, None, {}, 1)  # warm-up: compilation, cache allocation
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            tokens = 0
            for _ in range(repeats):
                completion_ids, _ = trainer._generate_single_turn(batch, None, {}, 1)
                tokens += sum(len(ids) for ids in completion_ids)
            seconds = (time.perf_counter() - started) / repeats
            record.update(
                seconds=round(seconds, 3),
                completions_per_s=round(len(batch) / seconds, 2),
                tokens_per_s=round(tokens / repeats / seconds, 1),
            )
        except Exception as error:  # one variant failing must not hide the others
            record["error"] = f"{type(error).__name__}: {error}"[:500]
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="dpo,grpo")
    parser.add_argument("--shape", default="1b", choices=list(gpu_models.SHAPES))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--settings", default="{}", help="JSON: TrainConfig fields changed for every stage")
    parser.add_argument("--probe-generation", action="store_true", help="time GRPO's generate call's variants")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        os.environ["FINETUNER_WORKSPACE"] = str(workspace)
        tokenizer = gpu_models.build_tokenizer(Path(tmp) / "tokenizer")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a quick check of this script (tiny shape)
        model = gpu_models.build_model(args.shape, Path(tmp) / f"llama-{args.shape}", tokenizer, device=device)
        if args.probe_generation:
            return probe_generation(model, workspace, args.completion_tokens)
        for stage in args.stages.split(","):
            result = measure(stage, model, workspace, args.steps, args.completion_tokens, **json.loads(args.settings))
            print(json.dumps({"shape": args.shape, **result}), flush=True)


if __name__ == "__main__":
    main()
