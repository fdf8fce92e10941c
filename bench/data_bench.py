"""Dataset preparation on the CPU: the app's dataset_utils.prepare_dataset vs TRL SFTTrainer's own preprocessing of the
same Alpaca-style rows with the demo model's tokenizer (chat template, tokens, completion-only loss masks).

    .venv/bin/python bench/data_bench.py --rows 100000

Prints one JSON object per measurement, then the ratios. Both sides start from the same JSONL file: the app reads it
itself; for TRL the rows are read, turned into TRL's conversational prompt/completion form (TRL does not read Alpaca
columns) and handed to SFTTrainer, whose __init__ then applies the chat template and tokenizes. TRL's share is the
__init__ time with the rows minus its time with 8 rows (model wrapping and the rest are not preprocessing).
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
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gpu_models  # noqa: E402

SEQ = 1024


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def app_prepare(data: Path, tokenizer, workspace: Path) -> dict:
    from dataset_utils import DatasetConfig, prepare_dataset

    started = time.perf_counter()
    prepared = prepare_dataset(
        DatasetConfig(source=str(data)),
        tokenizer,
        max_seq_length=SEQ,
        train_on_responses_only=True,
        workspace=workspace,
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in prepared.train["input_ids"])
    return {
        "seconds": round(seconds, 2),
        "rows": len(prepared.train),
        "tokens": tokens,
        "cache_hit": prepared.cache_hit,
    }


def trl_prepare(data: Path, tokenizer, model, num_proc: int | None, work: Path) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    def convert(row):
        prompt = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row["input"].strip() else "")
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    def trainer(rows):
        args = SFTConfig(
            output_dir=str(work / "trl"),
            max_length=SEQ,
            dataset_num_proc=num_proc,
            report_to=[],
            bf16=False,
            use_cpu=True,
        )
        return SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=rows)

    started = time.perf_counter()
    lines = data.read_text(encoding="utf-8").splitlines()
    rows = datasets.Dataset.from_list([json.loads(line) for line in lines])
    rows = rows.map(convert, remove_columns=rows.column_names, num_proc=num_proc)
    loaded = time.perf_counter()
    prepared = trainer(rows).train_dataset
    full = time.perf_counter()
    trainer(rows.select(range(8)))
    overhead = time.perf_counter() - full
    preprocessing = full - loaded - overhead
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    return {
        "seconds": round(full - started - overhead, 2),
        "read_and_convert_s": round(loaded - started, 2),
        "sft_trainer_preprocessing_s": round(preprocessing, 2),
        "rows": len(prepared),
        "tokens": tokens,
        "dataset_num_proc": num_proc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--trl-num-proc", default="none,2", help="TRL dataset_num_proc values to measure")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import model_utils

    work = Path(args.work or tempfile.mkdtemp(prefix="data-bench-"))
    model_dir = model_utils.ensure_demo_model(ROOT / "workspace")
    tokenizer = model_utils.load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    # Answers of 20 to 400 words: ≈ 50 to 600 tokens, the spread of Alpaca's own rows.
    data = gpu_models.write_jsonl(work / "alpaca.jsonl", gpu_models.alpaca_rows(args.rows, 20, 400, seed=3))
    emit(
        {
            "measurement": "setup",
            "rows": args.rows,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"),
            "file_mb": round(data.stat().st_size / 1e6, 1),
        }
    )

    workspace = work / "workspace"
    shutil.rmtree(workspace / "cache", ignore_errors=True)
    app = {"measurement": "app_prepare_dataset", **app_prepare(data, tokenizer, workspace)}
    emit(app)
    cached = {"measurement": "app_prepare_dataset_cached", **app_prepare(data, tokenizer, workspace)}
    emit(cached)
    for value in args.trl_num_proc.split(","):
        num_proc = None if value == "none" else int(value)
        trl = {"measurement": "trl_sft_trainer_prepare", **trl_prepare(data, tokenizer, model, num_proc, work)}
        emit(trl)
        emit(
            {
                "ratio": f"trl (dataset_num_proc={value}) / app",
                "value": round(trl["seconds"] / app["seconds"], 3),
                "target": 2.0,
                "met": trl["seconds"] / app["seconds"] >= 2.0,
            }
        )
    emit(
        {
            "ratio": "app cached re-run seconds",
            "value": cached["seconds"],
            "target": 2.0,
            "met": cached["seconds"] <= 2.0 and cached["cache_hit"],
        }
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
