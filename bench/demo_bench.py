"""The whole demo path on the CPU, timed stage by stage: demo model (converted from the packaged GGUF into a fresh
workspace) → 30 LoRA steps (examples/demo_train.yaml, as `python main.py train` runs it) → a chat reply from the
trained run → q8_0 GGUF export (with its load check). Target: under 5 minutes on 2 cores.

    .venv/bin/python bench/demo_bench.py

Prints one JSON object per stage and one for the total. Each job runs as the UI runs it: a run folder and a child
process started by jobs.start_job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_S = 300.0
PROMPT = "What is the capital of France?"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def wait(run_dir: Path) -> dict:
    import jobs
    import runfolder

    while jobs.job_status(run_dir).state in runfolder.ACTIVE:
        time.sleep(0.5)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        raise SystemExit(f"{run_dir.name} {status.state}: {status.error}\n{runfolder.log_tail(run_dir, 30)}")
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=None, help="a fresh workspace (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = parser.parse_args()
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="demo-bench-"))
    os.environ["FINETUNER_WORKSPACE"] = str(workspace)

    import gguf_utils
    import inference_utils
    import jobs
    import model_utils
    import runfolder
    from workspace import config_to_dict, load_yaml

    emit(
        {
            "measurement": "setup",
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"),
            "workspace": str(workspace),
        }
    )
    stages: dict[str, float] = {}
    started = time.perf_counter()

    model_utils.ensure_demo_model(workspace)
    stages["demo_model"] = time.perf_counter() - started

    mark = time.perf_counter()
    config = load_yaml(ROOT / "examples" / "demo_train.yaml")
    config["dataset"]["source"] = str(ROOT / config["dataset"]["source"])
    run_dir = jobs.create_run("train", config, workspace, "demo")
    jobs.start_job(run_dir)
    wait(run_dir)
    losses = [
        event.metrics["loss"]
        for event in runfolder.read_events(run_dir)
        if event.kind == "log" and "loss" in event.metrics
    ]
    stages["train_30_steps"] = time.perf_counter() - mark

    mark = time.perf_counter()
    chat_model = inference_utils.load_chat_model(run=run_dir.name, workspace=workspace)
    messages = [{"role": "user", "content": PROMPT}]
    greedy = inference_utils.GenerationConfig(temperature=0.0, max_new_tokens=32)
    reply = list(inference_utils.stream_chat(chat_model, messages, greedy))[-1]  # each chunk is the reply so far
    del chat_model
    stages["chat_reply"] = time.perf_counter() - mark

    mark = time.perf_counter()
    export = gguf_utils.ExportConfig(run=run_dir.name, quants=["q8_0"])
    gguf_utils.check_export(export, workspace)
    export_dir = jobs.create_run("export", config_to_dict(export), workspace, gguf_utils.export_run_name(run_dir.name))
    jobs.start_job(export_dir)
    wait(export_dir)
    report = json.loads((run_dir / "gguf" / "report.json").read_text())
    stages["export_q8_0"] = time.perf_counter() - mark

    total = time.perf_counter() - started
    for name, seconds in stages.items():
        emit({"measurement": f"demo_{name}", "seconds": round(seconds, 1)})
    emit(
        {
            "measurement": "demo_path_total",
            "seconds": round(total, 1),
            "target_s": TARGET_S,
            "met": total <= TARGET_S,
            "loss_first": round(losses[0], 3),
            "loss_last": round(losses[-1], 3),
            "reply": reply,
            "gguf_agreement": report["files"][0].get("agreement"),
            "gguf_bytes": report["files"][0]["size_bytes"],
            "load_average_after": os.getloadavg(),
        }
    )
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
