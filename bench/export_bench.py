"""Export benchmark (CPU): the app's GGUF export job vs llama.cpp's converter + quantizer run by hand on the same
merged/ folder, per quant type, both sides timed in this run. Prints one JSON object per measurement.

    .venv/bin/python bench/export_bench.py [--workspace DIR] [--run RUN] [--quants f16,q8_0,q4_k_m] [--repeat 2]

Without --run it first trains a short LoRA run of the demo model (the app's own training code). The app's side is
exactly what the UI and `python main.py export` start: `python main.py run <export job>` (merge → convert →
quantize → load-check and agreement with the HF model → Modelfile → report.json). The first export also merges the
adapter; later ones reuse merged/, as the app does, so the comparison is with a person who already has merged/.
"cold" app runs compute the HF side of the agreement check (the HF model's greedy continuations); "warm" ones reuse
it from merged/, as a second export of the same model does. Target: app ≤ 1.1× by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf_utils  # noqa: E402
import jobs  # noqa: E402
import runfolder  # noqa: E402
from gguf_utils.convert import llama_cpp_version  # noqa: E402
from workspace import config_to_dict  # noqa: E402

QUANTIZE_BY_HAND = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def train_demo_run(workspace: Path, steps: int) -> str:
    import training_utils
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig

    countries = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Peru", "Lima")]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {capital}."},
            ]
        }
        for country, capital in countries * 4
    ]
    data = workspace / "bench-capitals.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(
        model=ModelConfig("demo"),
        dataset=DatasetConfig(source=str(data)),
        max_steps=steps,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_seq_length=128,
        save_steps=steps,
        lora_r=8,
        lora_alpha=16,
        gradient_checkpointing=False,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, "bench-export")
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout carries only JSON lines
        training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    emit({"measurement": "train_demo_lora", "steps": steps, "seconds": round(time.monotonic() - started, 2)})
    return run_dir.name


def app_export(workspace: Path, run: str, quants: list[str]) -> tuple[float, dict]:
    """The app's export job, run the way jobs.start_job runs it; returns (seconds, report.json)."""
    config = gguf_utils.ExportConfig(run=run, quants=quants)
    job = jobs.create_run("export", config_to_dict(config), workspace, gguf_utils.export_run_name(run))
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "run", str(job)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    status = jobs.job_status(job)
    if status.state != "done":
        sys.exit(f"export job {job} ended {status.state}: {status.error}")
    return seconds, json.loads((runfolder.run_path(run, workspace) / "gguf" / "report.json").read_text())


def by_hand(merged: Path, quant: str, scratch: Path) -> tuple[float, float]:
    """llama.cpp's converter, then (for quantized types) llama_model_quantize, as a person runs them;
    returns (convert seconds, quantize seconds)."""
    outtype = quant if quant in gguf_utils.FLOAT_TYPES else "f16"
    converted = scratch / f"by-hand-{outtype}.gguf"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(gguf_utils.CONVERTER), str(merged), "--outfile", str(converted), "--outtype", outtype],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    convert_s = time.monotonic() - started
    quantize_s = 0.0
    if quant not in gguf_utils.FLOAT_TYPES:
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-c",
                QUANTIZE_BY_HAND,
                str(converted),
                str(scratch / f"by-hand-{quant}.gguf"),
                gguf_utils.QUANT_FTYPES[quant],
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        quantize_s = time.monotonic() - started
    for path in scratch.glob("by-hand-*.gguf"):
        path.unlink()
    return convert_s, quantize_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=None, help="workspace (default: a new temporary one)")
    parser.add_argument("--run", default=None, help="a finished training run to export (default: train one)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--repeat", type=int, default=2, help="timings per side; the median is reported")
    args = parser.parse_args()

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="export-bench-")).resolve()
    os.environ["FINETUNER_WORKSPACE"] = str(workspace)
    emit(
        {
            "measurement": "setup",
            "workspace": str(workspace),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "llama_cpp_python": llama_cpp_version(),
        }
    )
    run = args.run or train_demo_run(workspace, args.train_steps)
    quants = gguf_utils.ExportConfig(run=run, quants=args.quants).quants

    seconds, report = app_export(workspace, run, quants)  # the first export merges the adapter into merged/
    emit(
        {
            "measurement": "app_export_all_with_merge",
            "quants": quants,
            "seconds": round(seconds, 2),
            "merge_s": report["times_s"]["merge"],
            "agreement": {f["quant"]: f["agreement"] for f in report["files"]},
        }
    )
    merged = runfolder.run_path(run, workspace) / "merged"

    cache = merged / gguf_utils.REFERENCE_CACHE
    with tempfile.TemporaryDirectory(dir=workspace) as scratch:
        for quant in quants:
            times: dict[str, list[float]] = {"by_hand": [], "app_cold": [], "app_warm": []}
            parts: list[tuple[float, float]] = []
            reports: dict[str, dict] = {}
            for _ in range(args.repeat):  # interleaved, so a change in machine load hits all sides alike
                convert_s, quantize_s = by_hand(merged, quant, Path(scratch))
                times["by_hand"].append(convert_s + quantize_s)
                parts.append((convert_s, quantize_s))
                cache.unlink(missing_ok=True)  # cold: the job loads the HF model for the reference
                seconds, reports["app_cold"] = app_export(workspace, run, [quant])
                times["app_cold"].append(seconds)
                seconds, reports["app_warm"] = app_export(workspace, run, [quant])  # reuses the cached reference
                times["app_warm"].append(seconds)
            median = {side: statistics.median(values) for side, values in times.items()}
            cold, warm = reports["app_cold"], reports["app_warm"]
            emit(
                {
                    "measurement": "export_vs_by_hand",
                    "quant": quant,
                    "by_hand_s": round(median["by_hand"], 2),
                    "app_cold_s": round(median["app_cold"], 2),
                    "app_warm_s": round(median["app_warm"], 2),
                    "ratio_cold": round(median["app_cold"] / median["by_hand"], 3),
                    "ratio_warm": round(median["app_warm"] / median["by_hand"], 3),
                    "target": "<= 1.1",
                    "runs_s": {side: [round(t, 2) for t in values] for side, values in times.items()},
                    "by_hand_convert_s": [round(c, 2) for c, _ in parts],
                    "by_hand_quantize_s": [round(q, 2) for _, q in parts],
                    "app_cold_parts_s": _parts(cold),
                    "app_warm_parts_s": _parts(warm),
                    "agreement": warm["files"][0]["agreement"],
                    "size_bytes": warm["files"][0]["size_bytes"],
                    "load_average": round(os.getloadavg()[0], 2),
                }
            )


def _parts(report: dict) -> dict:
    file = report["files"][0]
    return {
        "convert": file["convert_s"],
        "reference": report["times_s"]["reference"],
        "quantize": file["quantize_s"],
        "check": file["check_s"],
        "job_total": report["times_s"]["total"],
    }


if __name__ == "__main__":
    main()
