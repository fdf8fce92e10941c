"""The time estimate's error: planning's calibrated model and the run's own ETA (timed steps), against the measured
time of the same training run, measured in one process. Prints one JSON line per case.

    python bench/estimate_bench.py                        # the demo model on this machine (CPU or GPU)
    python bench/estimate_bench.py --shape 1b --steps 60  # a 1B / 3B shape of bench/gpu_models.py (GPU)

`implied_efficiency` is the EFFICIENCY constant that would have made the calibrated model exact on this run:
planning.EFFICIENCY takes it from here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs  # noqa: E402
import model_utils  # noqa: E402
import planning  # noqa: E402
import runfolder  # noqa: E402
import submit  # noqa: E402
from dataset_utils import DatasetConfig  # noqa: E402
from model_utils import ModelConfig  # noqa: E402
from training_utils import TrainConfig  # noqa: E402


def rows(count: int) -> list[dict]:
    return [
        {
            "instruction": f"Write two sentences about garden plot number {index}.",
            "output": f"Plot {index} grows beans along the fence. Its soil is dark and needs water twice a week.",
        }
        for index in range(count)
    ]


def model_path(shape: str, workspace: Path) -> str:
    if shape == "demo":
        return str(model_utils.ensure_demo_model(workspace))
    import gpu_models  # bench/gpu_models.py: random-weight models of real shapes

    tokenizer = gpu_models.build_tokenizer(workspace / "tokenizer")
    return str(gpu_models.build_model(shape, workspace / "models" / shape, tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", help="demo, or a shape of bench/gpu_models.py (1b, 3b)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="estimate-bench-"))
    path = model_path(args.shape, workspace)
    data = workspace / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows(max(64, args.steps * args.batch))))
    config = TrainConfig(
        model=ModelConfig(path),
        dataset=DatasetConfig(source=str(data)),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_seq_length=args.max_seq_length,
        save_steps=10_000,
        warmup_steps=0,
    )
    report = planning.dataset_report_for(config, workspace)
    estimate = planning.estimate_time(config, path, report, workspace)
    run_dir = submit.submit_train(config, workspace, "bench")
    while jobs.job_status(run_dir).active:
        time.sleep(1)
    status = jobs.job_status(run_dir)
    events = runfolder.read_events(run_dir)
    logs = [event for event in events if event.kind == "log" and "loss" in event.metrics]
    start = next(event.time for event in events if event.kind == "start")
    real = logs[-1].time - start
    # The run's ETA after its first minute (or after its first quarter on a short run) against what was left.
    cut = start + min(60.0, real / 4)
    after = next((event for event in logs if event.time >= cut and event.eta_s), None)
    eta_error = (after.eta_s - (logs[-1].time - after.time)) / (logs[-1].time - after.time) if after else None
    device = model_utils.detect_device()
    print(
        json.dumps(
            {
                "bench": "estimate",
                "shape": args.shape,
                "device": device.name,
                "state": status.state,
                "steps": args.steps,
                "real_s": round(real, 1),
                "estimate_s": round(estimate.seconds, 1),
                "estimate_basis": estimate.basis,
                "calibrated_error": round(estimate.seconds / real - 1, 3),
                "eta_after_first_minute_error": round(eta_error, 3) if eta_error is not None else None,
                "implied_efficiency": round(
                    planning.EFFICIENCY["gpu" if device.cuda else "cpu"] * estimate.seconds / real, 3
                ),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
