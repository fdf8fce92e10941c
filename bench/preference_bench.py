"""DPO, ORPO, KTO and GRPO throughput of the app's training job on a CUDA GPU (Unsloth where installed), on the random-weight
Llama-3.2-1B shape of bench/gpu_models.py. Prints one JSON object per stage: tokens/s (TRL's token count over the
timed steps), samples/s (pairs, KTO rows or completions per second) and peak memory, all read from the run's
events.jsonl.

    python bench/preference_bench.py --stages dpo,orpo,kto,grpo --shape 1b

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


def stage_config(stage: str, model: Path, data: Path):
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from training_utils import TrainConfig

    common = dict(
        model=ModelConfig(str(model)),
        dataset=DatasetConfig(source=str(data)),
        stage=stage,
        max_steps=STEPS,
        warmup_steps=0,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        save_steps=STEPS,
        max_seq_length=1024,
        fit_micro_batch=False,
    )
    if stage == "grpo":
        common.update(num_generations=4, max_completion_length=256, reward_funcs=["length"], reward_max_length=400)
    return TrainConfig(**common)


def measure(stage: str, model: Path, workspace: Path) -> dict:
    import jobs
    import runfolder
    from workspace import config_to_dict

    rows = pair_rows(BATCH * STEPS) if stage in PAIRED else prompt_rows(BATCH * STEPS)
    data = gpu_models.write_jsonl(workspace / f"{stage}.jsonl", rows)
    config = stage_config(stage, model, data)
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"bench-{stage}-{int(time.time())}")
    jobs.start_job(run_dir)
    while jobs.job_status(run_dir).active:
        time.sleep(2)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        return {"stage": stage, "state": status.state, "error": status.error, "log": runfolder.log_tail(run_dir)}
    logs = [event for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics]
    timed = [event for event in logs if event.step > SKIP]
    seconds = timed[-1].time - logs[SKIP - 1].time
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="dpo,grpo")
    parser.add_argument("--shape", default="1b", choices=list(gpu_models.SHAPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        os.environ["FINETUNER_WORKSPACE"] = str(workspace)
        tokenizer = gpu_models.build_tokenizer(Path(tmp) / "tokenizer")
        model = gpu_models.build_model(args.shape, Path(tmp) / f"llama-{args.shape}", tokenizer)
        for stage in args.stages.split(","):
            print(json.dumps({"shape": args.shape, **measure(stage, model, workspace)}), flush=True)


if __name__ == "__main__":
    main()
