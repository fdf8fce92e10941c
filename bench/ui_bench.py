"""UI responsiveness: how fast the app answers while a training job runs, against the same calls with no job.

Serves the app (`python main.py`) on a scratch workspace with the demo model, then times, idle and during a LoRA
run of the demo model on this machine:
- page: GET / (the HTML page)
- config: GET /config (what the page fetches next to build itself)
- train_view: the Train tab's live-view call, through Gradio's queue (the page makes it every 1.5 s)
- browser_*: real page loads in chromium (when it exists): until the tabs show, until the Train tab shows the run's
  live status, and a one-line Gradio page for scale (the same browser's floor for any Gradio app)

Prints one JSON object per measurement and side, then one per measurement with both sides: for the server's answers,
whether the during-training p95 is under the 1 s target; for browser loads, the ratio to the one-line Gradio page.
Both sides are measured in the same run.

    .venv/bin/python bench/ui_bench.py [--repeats 20] [--browser-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jobs  # noqa: E402
import model_utils  # noqa: E402
import runfolder  # noqa: E402
from dataset_utils import DatasetConfig  # noqa: E402
from train_config import TrainConfig  # noqa: E402
from workspace import config_to_dict, workspace_root  # noqa: E402

TARGET_S = 1.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def prepare_workspace(folder: Path) -> None:
    """The demo model, linked from the default workspace when it was converted there already."""
    converted = model_utils.demo_model_dir(workspace_root())
    if (converted / "model.safetensors").exists():
        (folder / "models").mkdir(parents=True)
        (folder / "models" / converted.name).symlink_to(converted)
    else:
        model_utils.ensure_demo_model(folder)


def start_app(workspace: Path) -> tuple[subprocess.Popen, str]:
    port = jobs.free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--workspace", str(workspace)],
        cwd=ROOT,
        stdout=open(workspace / "app.log", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the app did not start; see {workspace / 'app.log'}") from None
            time.sleep(0.5)


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    call()  # warm-up: the first call pays for imports and connections
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "n": len(seconds),
        "median_s": round(statistics.median(ordered), 4),
        "p95_s": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 4),
        "max_s": round(ordered[-1], 4),
    }


def browser_loads(url: str, run: str, minimal_url: str, repeats: int) -> Callable[[], dict[str, list[float]]]:
    """Page loads in chromium: until the tabs show, until the Train tab shows the run's live status, and, for scale,
    until a one-line Gradio page shows (what this browser and machine take for any Gradio app)."""

    def measure() -> dict[str, list[float]]:
        from playwright.sync_api import sync_playwright

        seconds: dict[str, list[float]] = {
            "browser_tabs_shown": [],
            "browser_live_view_shown": [],
            "browser_minimal_gradio_page": [],
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for index in range(repeats + 1):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                started = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#tab-train-button", timeout=60_000)
                tabs = time.perf_counter() - started
                page.click("#tab-train-button")
                page.wait_for_selector(f"#train-status:has-text({run!r})", timeout=60_000)
                live = time.perf_counter() - started
                page.close()
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                started = time.perf_counter()
                page.goto(minimal_url)
                page.wait_for_selector("#minimal", timeout=60_000)
                minimal = time.perf_counter() - started
                page.close()
                if index:  # the first load warms the browser's and the server's caches
                    seconds["browser_tabs_shown"].append(tabs)
                    seconds["browser_live_view_shown"].append(live)
                    seconds["browser_minimal_gradio_page"].append(minimal)
            browser.close()
        return seconds

    return measure


def serve_minimal_gradio_page() -> str:
    import gradio as gr

    with gr.Blocks() as minimal:
        gr.Markdown("minimal", elem_id="minimal")
    port = jobs.free_port()
    minimal.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def logged_step(run_dir: Path) -> int:
    return max((event.step for event in runfolder.read_events(run_dir) if event.kind == "log"), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--browser-repeats", type=int, default=3)
    args = parser.parse_args()
    from gradio_client import Client

    scratch = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    process = None
    run_dir = None
    try:
        prepare_workspace(scratch)
        data = scratch / "capitals.jsonl"
        shutil.copy(ROOT / "examples" / "capitals.jsonl", data)
        # Long enough to keep training through every measurement; stopped at the end.
        config = TrainConfig(
            dataset=DatasetConfig(source=str(data)),
            max_steps=500,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_seq_length=128,
            gradient_checkpointing=False,
            save_steps=1000,
        )
        run_dir = jobs.create_run("train", config_to_dict(config), scratch, "bench-run")
        process, url = start_app(scratch)
        client = Client(url, verbose=False, download_files=False)
        client.predict(api_name="/train_opened")  # as on page load: fills the run list this session may choose from
        calls = {
            "page": lambda: urllib.request.urlopen(url, timeout=30).read(),
            "config": lambda: urllib.request.urlopen(url + "config", timeout=30).read(),
            "train_view": lambda: client.predict(run_dir.name, api_name="/train_view"),
        }
        browser = (
            browser_loads(url, run_dir.name, serve_minimal_gradio_page(), args.browser_repeats)
            if Path(CHROMIUM).exists()
            else None
        )
        machine = {"cpus": os.cpu_count()}
        results: dict[str, dict[str, dict]] = {}

        def measure_side(side: str) -> None:
            for name, call in calls.items():
                load = round(os.getloadavg()[0], 2)
                results.setdefault(name, {})[side] = summary(timed(call, args.repeats))
                print(
                    json.dumps({"measurement": name, "side": side, **results[name][side], "load_1m": load, **machine}),
                    flush=True,
                )
            if browser is not None:
                load = round(os.getloadavg()[0], 2)
                for name, seconds in browser().items():
                    results.setdefault(name, {})[side] = summary(seconds)
                    print(
                        json.dumps(
                            {"measurement": name, "side": side, **results[name][side], "load_1m": load, **machine}
                        ),
                        flush=True,
                    )

        measure_side("idle")
        jobs.start_job(run_dir)
        deadline = time.monotonic() + 900
        while not any(event.kind == "log" for event in runfolder.read_events(run_dir)):
            if jobs.job_status(run_dir).state not in runfolder.ACTIVE or time.monotonic() > deadline:
                raise SystemExit(f"the training job did not reach its first step:\n{runfolder.log_tail(run_dir)}")
            time.sleep(1)
        first_step = logged_step(run_dir)
        measure_side("training")
        steps = f"{first_step}-{logged_step(run_dir)}"
        for name, sides in results.items():
            idle, busy = sides["idle"], sides["training"]
            line = {
                "measurement": name,
                "idle_median_s": idle["median_s"],
                "training_median_s": busy["median_s"],
                "idle_p95_s": idle["p95_s"],
                "training_p95_s": busy["p95_s"],
                "slowdown_median": round(busy["median_s"] / idle["median_s"], 2),
                "training_steps_during_bench": steps,
            }
            if name.startswith("browser_"):
                # A browser's render time is mostly the machine's: compare it with a one-line Gradio page's.
                floor = results["browser_minimal_gradio_page"]
                line["vs_minimal_gradio_page_idle"] = round(idle["median_s"] / floor["idle"]["median_s"], 2)
                line["vs_minimal_gradio_page_training"] = round(busy["median_s"] / floor["training"]["median_s"], 2)
            else:
                line.update({"target_s": TARGET_S, "meets_target": busy["p95_s"] < TARGET_S})
            print(json.dumps(line), flush=True)
    finally:
        if run_dir is not None and jobs.job_status(run_dir).state in runfolder.ACTIVE:
            jobs.stop_job(run_dir)
            deadline = time.monotonic() + 120
            while jobs.job_status(run_dir).state in runfolder.ACTIVE and time.monotonic() < deadline:
                time.sleep(1)
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
