"""The time estimate against the real wall time from Start to done, and the fitter of planning.TIME_MODEL.

Each case starts a real training run the way the app does (submit.submit("train", …)), after asking planning for its
estimate the way the Train tab does, and reads the run's phases from its events: Start (the call), model loaded,
data prepared, the first step begins (the trainer's start event), the last step, done. Prints one JSON line per case
(real_s, estimate_s, error, each phase measured and estimated, the run's own ETA error against the time left to done
after the first tenth of its steps, and at least two); a failed or timed-out case prints an error line and the bench goes on.

    python bench/estimate_bench.py --cases cpu --fit               # the demo model on this machine
    python bench/estimate_bench.py --cases gpu --fit --out r.jsonl # 1B / 3B shapes of bench/gpu_models.py
    python bench/estimate_bench.py --cases 1b-varied-40,demo-fixed-10

A case is SHAPE-DATA-STEPS: SHAPE demo, 1b or 3b; DATA fixed (every row cut at max_seq_length) or varied (Alpaca
rows of log-uniform length). With --fit the last line is {"fit": {...}}: planning.TIME_MODEL's constants for this
device kind, least-squares over the cases (non-negative), ready to paste.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
import traceback
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
from train_config import TrainConfig  # noqa: E402

# Chosen so that `--cases gpu` takes about 6 minutes on an H200 (each run pays ~30-60 s of imports and loading) and
# `--cases cpu` about 3 minutes on a 2-core machine; two step counts of one shape separate the per-step cost from the
# fixed costs, fixed vs varied rows and 1B vs 3B separate the per-step overhead from the arithmetic.
CASES = {
    "gpu": ["1b-fixed-20", "1b-fixed-60", "1b-varied-40", "3b-fixed-20", "3b-varied-30"],
    "cpu": ["demo-fixed-10", "demo-fixed-30", "demo-varied-20"],
}
SETTINGS = {  # per shape: micro-batch, max_seq_length, (min, max) answer words of the varied rows
    "demo": {"batch": 2, "seq": 256, "words": (5, 150)},
    "1b": {"batch": 8, "seq": 1024, "words": (20, 900)},
    "3b": {"batch": 8, "seq": 1024, "words": (20, 900)},
}
PHASES = ("start", "load", "data", "steps", "save")


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def model_path(shape: str, models: Path) -> str:
    if shape == "demo":
        return str(model_utils.ensure_demo_model(models))
    import gpu_models  # bench/gpu_models.py: random-weight models of real shapes

    tokenizer = gpu_models.build_tokenizer(models / "tokenizer")
    return str(gpu_models.build_model(shape, models / "models" / shape, tokenizer))


def write_rows(path: Path, data: str, count: int, words: tuple[int, int]) -> Path:
    import gpu_models

    low, high = words if data == "varied" else (4 * words[1], 4 * words[1] + 10)  # fixed: all cut at max_seq_length
    return gpu_models.write_jsonl(path, gpu_models.alpaca_rows(count, low, high))


def run_case(name: str, models: Path, root: Path, timeout: float) -> dict:
    shape, data, steps = name.split("-")
    steps = int(steps)
    settings = SETTINGS[shape]
    workspace = root / name
    workspace.mkdir(parents=True)
    path = model_path(shape, models)
    source = write_rows(workspace / "data.jsonl", data, max(64, steps * settings["batch"]), settings["words"])
    config = TrainConfig(
        model=ModelConfig(path),
        dataset=DatasetConfig(source=str(source)),
        max_steps=steps,
        per_device_train_batch_size=settings["batch"],
        gradient_accumulation_steps=1,
        max_seq_length=settings["seq"],
        save_steps=10_000,
        warmup_steps=0,
        logging_steps=1,
    )
    report = planning.dataset_report_for(config, workspace)  # as the Train tab does, before Start
    estimate = planning.estimate_time(config, path, report, workspace)
    started = time.time()
    run_dir = submit.submit("train", config, workspace, "bench")
    while jobs.job_status(run_dir).active:
        if time.time() - started > timeout:
            jobs.stop_job(run_dir)
            raise TimeoutError(f"still running after {timeout:.0f} s: stopped")
        time.sleep(0.5)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        raise RuntimeError(f"the run ended {status.state}: {status.error}")
    events = runfolder.read_events(run_dir)

    def first(test) -> float:
        return next(event.time for event in events if test(event))

    loaded = first(lambda e: e.kind == "progress" and e.message == "model loaded")
    begin = first(lambda e: e.kind == "start")
    logs = [event for event in events if event.kind == "log" and "loss" in event.metrics]
    last, done = logs[-1].time, first(lambda e: e.kind == "end")
    measured = {
        "start": 0.0,
        "load": loaded - started,
        "data": begin - loaded,
        "steps": last - begin,
        "save": done - last,
    }
    tenth = next(
        (e for e in logs if e.step >= max(2, math.ceil(steps / 10)) and e.eta_s is not None and e.time < last), None
    )
    eta_error = (tenth.eta_s - (done - tenth.time)) / (done - tenth.time) if tenth else None
    real = done - started
    parts = estimate.parts
    return {
        "case": name,
        "device": model_utils.detect_device().name,
        "steps": steps,
        "real_s": round(real, 1),
        "estimate_s": round(estimate.seconds, 1),
        "error": round(estimate.seconds / real - 1, 3),
        "basis": estimate.basis,
        # start and load are one phase in the measurement (the job's imports end where its model load begins)
        "measured": {key: round(value, 2) for key, value in measured.items()},
        "estimated": {key: round(parts[key], 2) for key in PHASES},
        "first_step_s": round(logs[0].time - begin, 2),
        "step_s_median": round(sorted(b.time - a.time for a, b in itertools.pairwise(logs))[len(logs) // 2 - 1], 3)
        if len(logs) > 2
        else None,
        "eta_error_after_tenth": round(eta_error, 3) if eta_error is not None else None,
        "data_prepared_s": round(first(lambda e: e.message == "data prepared") - loaded, 2),
        "inputs": estimate.inputs,
        "weights_gb": estimate.inputs["weights_gb"],
    }


def nonnegative_fit(rows: list[list[float]], targets: list[float], names: list[str]) -> dict[str, float]:
    """Least squares of targets ≈ rows · x with x ≥ 0: the best fit over the subsets of variables left free."""
    import numpy as np

    a, b = np.array(rows, dtype=float), np.array(targets, dtype=float)
    best, best_residual = dict.fromkeys(names, 0.0), float(np.sum(b**2))
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            x, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (x < 0).any():
                continue
            residual = float(np.sum((a[:, subset] @ x - b) ** 2))
            if residual < best_residual - 1e-12:
                best = dict.fromkeys(names, 0.0) | {names[i]: float(v) for i, v in zip(subset, x, strict=True)}
                best_residual = residual
    return best


def fit(results: list[dict], kind: str) -> dict[str, float]:
    """planning.TIME_MODEL[kind] refitted from the cases; a constant the cases cannot separate keeps its value."""
    constants = dict(planning.TIME_MODEL[kind])
    sizes = {round(r["weights_gb"], 2) for r in results}
    load = [r["measured"]["load"] for r in results]
    if len(sizes) > 1:  # start_s and load_s are one constant: imports and the load's fixed part
        found = nonnegative_fit([[1, r["weights_gb"]] for r in results], load, ["start_s", "load_s_per_gb"])
        constants.update(found, load_s=0.0)
    else:
        constants.update(
            start_s=sum(y - constants["load_s_per_gb"] * r["weights_gb"] for y, r in zip(load, results, strict=True))
            / len(results),
            load_s=0.0,
        )
    if len({r["inputs"]["rows"] for r in results}) > 1:
        constants.update(
            nonnegative_fit(
                [[1, r["inputs"]["rows"]] for r in results],
                [r["measured"]["data"] for r in results],
                ["prep_s", "prep_s_per_row"],
            )
        )
    found = nonnegative_fit(
        [[1, r["steps"], r["inputs"].get("varied_steps", 0), r["inputs"]["flop_s"]] for r in results],
        [r["measured"]["steps"] for r in results],
        ["warmup_s", "step_s", "varied_step_s", "inverse_efficiency"],
    )
    inverse = found.pop("inverse_efficiency")
    constants.update(found, efficiency=1 / inverse if inverse > 0 else constants["efficiency"])
    constants["save_s"] = sum(r["measured"]["save"] for r in results) / len(results)
    return {key: round(value, 4 if value < 1 else 2) for key, value in constants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cpu", help="cpu, gpu, or a comma-separated list of SHAPE-DATA-STEPS")
    parser.add_argument("--fit", action="store_true", help="print planning.TIME_MODEL's constants fitted to the cases")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--case-timeout", type=float, default=240.0, help="seconds one case may take")
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole bench: later cases skip")
    args = parser.parse_args()
    began = time.time()
    names = CASES.get(args.cases) or [name.strip() for name in args.cases.split(",") if name.strip()]
    root = Path(tempfile.mkdtemp(prefix="estimate-bench-"))
    models = root / "shared"
    results = []
    for name in names:
        left = args.budget - (time.time() - began)
        if left < 30:
            emit({"case": name, "error": f"skipped: {left:.0f} s of the budget left"}, args.out)
            continue
        try:
            result = run_case(name, models, root, min(args.case_timeout, left))
        except Exception as exc:  # one failed case must not end the bench
            traceback.print_exc(file=sys.stderr)
            emit({"case": name, "error": f"{type(exc).__name__}: {exc}"}, args.out)
            continue
        results.append(result)
        emit(result, args.out)
    if args.fit and results:
        kind = "gpu" if model_utils.detect_device().cuda else "cpu"
        emit({"fit": {kind: fit(results, kind)}, "cases": [r["case"] for r in results]}, args.out)


if __name__ == "__main__":
    main()
