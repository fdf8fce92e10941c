"""A LoRA step of the demo model on the CPU: the app's training job vs a bare transformers + PEFT + TRL script.

Same model (SmolLM2-135M-Instruct from the demo package), data and settings on both sides: fp32, LoRA r=16 on all
linear layers, batch 2, no accumulation, sequence 128 (every row is longer, so each step trains 2 × 128 tokens),
gradient checkpointing on (the app's default), adamw_torch. Each measurement runs in its own process, the sides
alternate (this machine's load moves between repeats), and the ratio is printed from the same invocation: from each
side's quickest quarter of steps (see fast_tokens_per_s; the ratio of the runs' medians is printed beside it).

    python bench/cpu_train_bench.py --repeats 2 --steps 10

The app side is a real job (jobs.create_run + jobs.start_job → `python main.py run`), as the UI starts it; its
step times come from the events.jsonl the UI reads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SEQ = 128
BATCH = 2
LORA_R = 16
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIP = 2  # steps left out of the timing (allocator and thread-pool warm-up)
TARGET = 1.0


def prepare(work: Path) -> tuple[Path, Path]:
    import gpu_models

    import model_utils

    model = model_utils.ensure_demo_model(work / "workspace")
    data = work / "rows.jsonl"
    if not data.exists():  # answers of 300+ words: every row is cut at SEQ tokens
        gpu_models.write_jsonl(data, gpu_models.alpaca_rows(160, 300, 420, seed=4))
    return model, data


def step_seconds(marks: list[tuple[float, int]], tokens_per_step: float) -> dict:
    """Seconds per optimizer step after the first SKIP steps, from (time, step) at each step's log; tokens_per_step
    is each side's own count (TRL's num_tokens, the app's events), so a side that trained fewer tokens shows it."""
    timed = [(at, step) for at, step in marks if step >= SKIP]
    seconds = timed[-1][0] - timed[0][0]
    steps = timed[-1][1] - timed[0][1]
    return {
        "timed_steps": steps,
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_step": round(tokens_per_step, 1),
        "tokens_per_s": round(steps * tokens_per_step / seconds, 1),
        "step_seconds": [
            round((later - earlier) / (after - before), 3)
            for (earlier, before), (later, after) in zip(timed[:-1], timed[1:], strict=True)
        ],
    }


def measure_bare(model_path: Path, data: Path, steps: int, work: Path) -> dict:
    """transformers + PEFT + TRL as their docs write a LoRA script, with the app's settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=str(data), split="train")
    rows = rows.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row["instruction"]}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        },
        remove_columns=rows.column_names,
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    marks: list[tuple[float, int]] = []
    counted: list[float] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                marks.append((time.time(), state.global_step))
                counted.append(logs["num_tokens"])

    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=rows,
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=ALL_LINEAR),
        args=SFTConfig(
            output_dir=str(work / "out-bare"),
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=2e-4,
            warmup_steps=0,
            optim="adamw_torch",
            max_length=SEQ,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=3407,
        ),
    )
    trainer.add_callback(Clock())
    trainer.train()
    per_step = (counted[-1] - counted[0]) / (marks[-1][1] - marks[0][1])
    return {**step_seconds(marks, per_step), "threads": torch.get_num_threads()}


def measure_app(model_path: Path, data: Path, steps: int, work: Path) -> dict:
    import jobs
    import runfolder
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig
    from workspace import config_to_dict

    config = TrainConfig(
        model=ModelConfig(str(model_path)),
        dataset=DatasetConfig(source=str(data)),
        max_steps=steps,
        max_seq_length=SEQ,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        lora_r=LORA_R,
        lora_alpha=LORA_R,
        lora_dropout=0.0,
        target_modules=ALL_LINEAR,
        warmup_steps=0,
        save_steps=steps + 1000,
        logging_steps=1,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), work / "workspace", f"cpu-bench-{time.time_ns()}")
    jobs.start_job(run_dir)
    while jobs.job_status(run_dir).state in runfolder.ACTIVE:
        time.sleep(0.5)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        raise RuntimeError(f"app run {status.state}: {status.error}\n{runfolder.log_tail(run_dir, 40)}")
    logs = [e for e in runfolder.read_events(run_dir) if e.kind == "log" and "loss" in e.metrics]
    # The job logs tokens/s between consecutive logs: back to tokens, per step.
    pairs = list(zip(logs[:-1], logs[1:], strict=True))
    counted = sum(later.metrics["tokens_per_s"] * (later.time - earlier.time) for earlier, later in pairs)
    per_step = counted / (logs[-1].step - logs[0].step)
    return step_seconds([(e.time, e.step) for e in logs], per_step)


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    model_path, data = prepare(work)
    measure = measure_app if args.side == "app" else measure_bare
    print("RESULT " + json.dumps({"side": args.side, **measure(model_path, data, args.steps, work)}), flush=True)


def spawn(side: str, work: Path, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", side, "--work", str(work), "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs (app, bare)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", choices=["app", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="cpu-train-bench-"))
    prepare(work)
    results: dict[str, list[dict]] = {"app": [], "bare": []}
    for repeat in range(args.repeats):
        for side in ("app", "bare") if repeat % 2 == 0 else ("bare", "app"):
            record = spawn(side, work, args.steps)
            results[side].append(record)
            print(json.dumps({"bench": "cpu_train", "repeat": repeat, **record}), flush=True)
    app = statistics.median(r["tokens_per_s"] for r in results["app"])
    bare = statistics.median(r["tokens_per_s"] for r in results["bare"])
    app_fast, bare_fast = (fast_tokens_per_s(results[side]) for side in ("app", "bare"))
    print(
        json.dumps(
            {
                "bench": "cpu_train",
                "ratio": "app_vs_bare_tokens_per_s",
                "app_tokens_per_s": app,
                "bare_tokens_per_s": bare,
                "median_ratio": round(app / bare, 3),
                "app_fast_tokens_per_s": app_fast,
                "bare_fast_tokens_per_s": bare_fast,
                "value": round(app_fast / bare_fast, 3),
                "target": TARGET,
                "met": app_fast / bare_fast >= TARGET,
            }
        ),
        flush=True,
    )


def fast_tokens_per_s(records: list[dict]) -> float:
    """Tokens/s at the lower quartile of a side's step times, pooled over its runs. This machine's steps run at two
    speeds (about 1.9 s and 2.4 s here, on either side, switching within a run and hitting both sides alike when
    they alternate step by step in one process), so a run's median tells which speed the run landed on more than
    which side it was; the quickest quarter of the steps is each side's own undisturbed speed."""
    steps = sorted(seconds for record in records for seconds in record["step_seconds"])
    tokens = statistics.median(record["tokens_per_step"] for record in records)
    return round(tokens / steps[(len(steps) - 1) // 4], 1)


if __name__ == "__main__":
    main()
