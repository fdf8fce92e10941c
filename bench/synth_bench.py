"""Synthetic data throughput: rows/s at concurrency 1 and 8 against a local server with a fixed 200 ms reply latency.

Prints one JSON object per measurement, then the speedup of 8 over 1 per provider (target: at least 7x). The server
(tests/fake_llm_servers.py) runs in its own process so that its work does not share this process's interpreter
lock with the client being measured. Both sides of every ratio are measured in the same run.

    .venv/bin/python bench/synth_bench.py [--providers openai anthropic ollama] [--rows 16] [--latency-s 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import synthetic_utils  # noqa: E402

TARGET = 7.0


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_llm_servers.py"), "--latency-s", str(latency_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().strip()


def measure(provider: str, url: str, concurrency: int, rows: int) -> dict:
    config = synthetic_utils.SyntheticConfig(
        provider=provider,
        model="fake-model",
        base_url=url + "/v1" if provider == "openai" else url,
        topic="benchmarks",
        num_rows=rows,
        concurrency=concurrency,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        summary = synthetic_utils.generate(config, out_dir, api_key="bench-key")
        seconds = time.perf_counter() - started
    assert summary.rows_done == rows, summary
    return {
        "provider": provider,
        "concurrency": concurrency,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 2),
        "requests": summary.requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", default=["openai", "anthropic", "ollama"])
    parser.add_argument("--rows", type=int, default=16, help="rows at concurrency 1; concurrency 8 makes 8x as many")
    parser.add_argument("--latency-s", type=float, default=0.2)
    args = parser.parse_args()
    process, url = start_server(args.latency_s)
    machine = {
        "latency_s": args.latency_s,
        "cpus": len(os.sched_getaffinity(0)),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    try:
        for provider in args.providers:
            measure(provider, url, 1, 2)  # warm-up: imports the SDK and opens connections
            results = {}
            for concurrency, rows in ((1, args.rows), (8, 8 * args.rows)):
                results[concurrency] = measure(provider, url, concurrency, rows)
                print(json.dumps({"measurement": "rows_per_s", **results[concurrency], **machine}), flush=True)
            ratio = results[8]["rows_per_s"] / results[1]["rows_per_s"]
            print(
                json.dumps(
                    {
                        "measurement": "speedup_8_vs_1",
                        "provider": provider,
                        "ratio": round(ratio, 2),
                        "target": TARGET,
                        "meets_target": ratio >= TARGET,
                        "load_1m_after": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
