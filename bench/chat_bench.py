"""Chat decoding benchmark: the app's streamed reply vs plain transformers `generate` on the merged model, same
prompt, same number of new tokens, greedy, after one warm-up; both sides measured in this run. One JSON object per
line.

    .venv/bin/python bench/chat_bench.py                       # CPU: the demo model (+ llama.cpp on its q8_0 GGUF)
    python bench/chat_bench.py --shapes 1b,3b                  # GPU: random-init Llama-3.2 shapes (bench/gpu_models)

Each shape gets a LoRA run trained for a few steps by the app's own training code (so the adapter is not zero).
Sides, each in a fresh process so that one side's imports (Unsloth patches transformers) cannot change another's:

- app_worker / app_worker_base: what the Test tab does: `chat_worker.ChatWorker` (its own process, the reply
  streamed back as JSON lines), tuned side (LoRA merged in place) and base side (weights restored); tokens counted
  by re-encoding the reply; `load_s` includes the warm-up (compiling the decoding step on CUDA).
- app_stream / app_stream_base: `inference_utils.load_for_chat` + `stream_chat` in the process, tuned / base side.
- app_unsloth / app_unsloth_base (CUDA, Unsloth installed): the path the tab used before, Unsloth's
  `for_inference` model with the adapter switched off for the base side (`load_chat_model`).
- plain_generate / plain_generate_static: `AutoModelForCausalLM` (bf16 on CUDA, float32 on the CPU as the app
  loads it there) + the adapter merged (`merge_and_unload`), `generate` without a streamer; exactly --new-tokens
  new tokens, as every side (min_new_tokens = max_new_tokens); _static with the static KV cache, whose step
  transformers compiles.
- llama_cpp (CPU): the run's q8_0 GGUF exported by the app, llama-cpp-python's streamed chat completion.

Targets on the GPU: app_worker and app_worker_base ≥ 0.9 × plain_generate_static, both with all the new tokens, and
the time to the first token ≤ 0.3 s after the warm-up; on the CPU app_worker ≥ 0.9 × plain_generate.
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

PROMPT = "Write a long story about a dragon who learns to paint. Describe every colour she mixes."


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- setting up a run


def make_run(workspace: Path, shape: str, steps: int, new_tokens: int) -> tuple[str, str]:
    """(model name or path, run name): a short LoRA run of the demo model or of a random-init GPU shape."""
    import jobs
    import model_utils
    import runfolder
    import training_utils
    from bench import gpu_models
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig
    from workspace import config_to_dict

    if shape == "demo":
        model = "demo"
        rows = gpu_models.alpaca_rows(16, 20, 60, seed=1)
    else:
        tokenizer = gpu_models.build_tokenizer(workspace / "tokenizer")
        model = str(gpu_models.build_model(shape, workspace / f"llama-3.2-{shape}-random", tokenizer))
        rows = gpu_models.alpaca_rows(16, 100, 200, seed=1)
    data = gpu_models.write_jsonl(workspace / f"bench-chat-{shape}.jsonl", rows)
    config = TrainConfig(
        model=ModelConfig(model),
        dataset=DatasetConfig(source=str(data)),
        max_steps=steps,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_seq_length=256,
        save_steps=steps,
        lora_r=16,
        lora_alpha=16,
        gradient_checkpointing=False,
    )
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"bench-chat-{shape}")
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints; stdout carries only JSON lines
        training_utils.train(config, runfolder.JobContext.for_run(run_dir))
    runfolder.write_status(run_dir, state="done")
    # Every side's reply is new_tokens of text long (the tokenizer the chat loads: the run's).
    gpu_models.fix_reply_length(Path(model_utils.resolve_model_path(model, workspace)), run_dir / "adapter", new_tokens)
    emit({"measurement": "chat_bench_setup", "shape": shape, "steps": steps, "seconds": elapsed(started)})
    return model, run_dir.name


def export_q8_0(workspace: Path, run: str) -> str:
    """The app's own export job (as `main.py export` runs it); returns the q8_0 file's name."""
    import main

    with contextlib.redirect_stdout(sys.stderr):
        code = main.main(["--workspace", str(workspace), "export", run, "--quant", "q8_0"])
    if code != 0:
        raise SystemExit(f"export failed with exit code {code}")
    import inference_utils

    return inference_utils.gguf_files(run, workspace)[0]


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 3)


# ---------------------------------------------------------------- the sides (each in a process of its own)


def timed_stream(pieces, count_tokens) -> dict:
    """Time a stream of text pieces: seconds to the first piece and to the end, tokens of the whole reply."""
    started = time.monotonic()
    first = None
    text = ""
    for piece in pieces:
        if first is None and piece:
            first = time.monotonic() - started
        text += piece
    seconds = time.monotonic() - started
    tokens = count_tokens(text)
    return {"tokens": tokens, "seconds": round(seconds, 4), "ttft_s": round(first or seconds, 4), "text": text}


def summary(side: str, shape: str, runs: list[dict], **extra) -> dict:
    """The median of the timed runs (the warm-up is not among them)."""
    rates = [run["tokens"] / run["seconds"] for run in runs]
    return {
        "measurement": "chat_decode",
        "shape": shape,
        "side": side,
        "device": device_name(),
        "new_tokens": runs[-1]["tokens"],
        "tokens_per_s": round(statistics.median(rates), 2),
        "ttft_s": round(statistics.median(run["ttft_s"] for run in runs), 4),
        "repeat": len(runs),
        **extra,
    }


def side_app(args) -> list[dict]:
    import inference_utils

    started = time.monotonic()
    chat_model = inference_utils.load_for_chat(run=args.run, workspace=args.workspace)
    load_s = elapsed(started)
    return decode_sides(args, inference_utils, chat_model, "app_stream", load_s=load_s)


def side_unsloth(args) -> list[dict]:
    import model_utils

    if model_utils.select_backend() != "unsloth":  # first, before transformers is imported
        return []
    import inference_utils

    chat_model = inference_utils.load_chat_model(run=args.run, workspace=args.workspace)
    return decode_sides(args, inference_utils, chat_model, "app_unsloth")


def decode_sides(args, inference_utils, chat_model, name: str, **extra) -> list[dict]:
    """The tuned and the base side of one loaded chat model, greedy, each reply exactly args.new_tokens long."""
    config = inference_utils.GenerationConfig(temperature=0, max_new_tokens=args.new_tokens)
    messages = [{"role": "user", "content": PROMPT}]

    def count(text: str) -> int:
        return len(chat_model.tokenizer(text, add_special_tokens=False)["input_ids"])

    results = []
    for side, use_adapter in ((name, True), (f"{name}_base", False)):
        try:
            runs = [
                timed_stream(inference_utils.chat_deltas(chat_model, messages, config, use_adapter), count)
                for _ in range(args.repeat + 1)
            ][1:]
        except Exception as exc:  # e.g. the installed stack cannot compile this model: say what blocks it
            results.append({"measurement": "chat_decode", "shape": args.shape, "side": side, "error": repr(exc)[:400]})
            continue
        results.append(
            summary(
                side,
                args.shape,
                runs,
                backend=chat_model.backend,
                static_cache=chat_model.static_cache,
                reply=runs[-1]["text"][:80],
                **extra,
            )
        )
    return results


def side_worker(args) -> list[dict]:
    import chat_worker
    import model_utils
    from inference_utils import GenerationConfig

    tokenizer = model_utils.load_tokenizer(args.tokenizer)
    worker = chat_worker.ChatWorker(args.workspace)
    key = ("", args.run, "")
    try:
        started = time.monotonic()
        info = worker.load(*key)
        load_s = elapsed(started)
        config = GenerationConfig(temperature=0, max_new_tokens=args.new_tokens)
        messages = [{"role": "user", "content": PROMPT}]

        results = []
        for side, use_adapter in (("app_worker", True), ("app_worker_base", False)):

            def pieces(use_adapter=use_adapter):
                shown = ""
                for text in worker.chat(key, messages, config, use_adapter):
                    yield text[len(shown) :]
                    shown = text

            runs = [
                timed_stream(pieces(), lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
                for _ in range(args.repeat + 1)
            ][1:]
            results.append(
                summary(side, args.shape, runs, backend=info["backend"], compiled=info.get("compiled"), load_s=load_s)
            )
    finally:
        worker.end()
    return results


def side_plain(args) -> list[dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model_utils
    import runfolder

    trained = runfolder.trained_model(runfolder.run_path(args.run, args.workspace))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    base_path = model_utils.resolve_model_path(args.model, args.workspace)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to("cuda" if cuda else "cpu")
    model = PeftModel.from_pretrained(model, str(trained.path)).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(trained.path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    variants = [("plain_generate", {})] + (
        [("plain_generate_static", {"cache_implementation": "static"})] if cuda else []
    )
    results = []
    for side, extra in variants:
        runs = []
        for _ in range(args.repeat + 1):
            if cuda:
                torch.cuda.synchronize()
            started = time.monotonic()
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                )
            if cuda:
                torch.cuda.synchronize()
            seconds = time.monotonic() - started
            runs.append({"tokens": output.shape[1] - input_ids.shape[1], "seconds": seconds, "ttft_s": seconds})
        results.append(summary(side, args.shape, runs[1:], dtype=str(dtype).removeprefix("torch.")))
    return results


def side_llama_cpp(args) -> list[dict]:
    import inference_utils

    chat_model = inference_utils.load_chat_model(run=args.run, workspace=args.workspace, gguf=args.gguf)
    llm = chat_model.model
    eos = llm.token_eos()

    def pieces():
        chunks = llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            max_tokens=args.tokens,
            temperature=0.0,
            logit_bias={eos: -1e9},  # the same reply length as the other sides
        )
        for chunk in chunks:
            yield chunk["choices"][0]["delta"].get("content") or ""

    runs = [
        timed_stream(pieces(), lambda text: len(llm.tokenize(text.encode(), add_bos=False, special=False)))
        for _ in range(args.repeat + 1)
    ][1:]
    return [summary("llama_cpp", args.shape, runs, file=args.gguf, threads=llm.n_threads)]


SIDES = {
    "app": side_app,
    "unsloth": side_unsloth,
    "worker": side_worker,
    "plain": side_plain,
    "llama_cpp": side_llama_cpp,
}


def run_side(name: str, args, **values) -> list[dict]:
    """One side in a fresh process; its JSON lines are printed as they come and returned."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", name, "--shape", args.shape]
    for key, value in {**vars(args), **values}.items():
        if key not in ("side", "shape", "shapes", "sides") and value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        records.append({"measurement": "chat_decode", "side": name, "shape": args.shape, "error": done.stderr[-600:]})
    for record in records:
        emit({key: value for key, value in record.items() if key != "text"})
    return records


def ratio(name: str, shape: str, top: dict | None, bottom: dict | None, target: float | None) -> None:
    if not top or not bottom or "tokens_per_s" not in top or "tokens_per_s" not in bottom:
        return
    value = round(top["tokens_per_s"] / bottom["tokens_per_s"], 3)
    record = {"measurement": "chat_ratio", "shape": shape, "ratio": name, "value": value}
    if target is not None:
        record |= {"target": target, "met": value >= target}
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="demo (CPU default) or 1b,3b (GPU default)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side after one warm-up")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the LoRA run")
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="a scratch workspace (its models' generation configs are rewritten)",
    )
    parser.add_argument(
        "--sides", default="unsloth,llama_cpp", help="optional sides to add: unsloth (CUDA), llama_cpp (CPU)"
    )
    # Internal: one side in its own process.
    for name in ("side", "shape", "run", "model", "gguf", "tokenizer"):
        parser.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.workspace = Path(args.workspace)
        os.environ["FINETUNER_WORKSPACE"] = str(args.workspace)
        with contextlib.redirect_stdout(sys.stderr):  # libraries print; stdout carries only JSON lines
            records = SIDES[args.side](args)
        for record in records:
            emit(record)
        return

    import torch

    cuda = torch.cuda.is_available()
    shapes = (args.shapes or ("1b,3b" if cuda else "demo")).split(",")
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as scratch:
        workspace = (args.workspace or Path(scratch)).resolve()
        os.environ["FINETUNER_WORKSPACE"] = str(workspace)
        args.workspace = workspace
        for shape in shapes:
            args.shape = shape
            model, run = make_run(workspace, shape, args.steps, args.new_tokens)
            args.run, args.model = run, model
            app = {record.get("side"): record for record in run_side("app", args)}
            tokens = args.new_tokens  # every side's reply is that long (make_run: gpu_models.fix_reply_length)
            plain = {record.get("side"): record for record in run_side("plain", args, tokens=tokens)}
            tokenizer = str(workspace / "runs" / run / "adapter")
            worker = {record.get("side"): record for record in run_side("worker", args, tokenizer=tokenizer)}
            if cuda and "unsloth" in args.sides.split(","):
                app |= {record.get("side"): record for record in run_side("unsloth", args)}
            # What the tab decodes with, against the fastest plain transformers decoding of the same merged model.
            best = plain.get("plain_generate_static") if cuda else plain.get("plain_generate")
            name = "plain_generate_static" if cuda else "plain_generate"
            for side in ("app_worker", "app_worker_base"):
                ratio(f"{side}/{name}", shape, worker.get(side), best, 0.9)
                first = worker.get(side) or {}
                if cuda and "ttft_s" in first:
                    emit({"measurement": "chat_ttft", "shape": shape, "side": side, "value": first["ttft_s"],
                          "target": 0.3, "met": first["ttft_s"] <= 0.3})  # fmt: skip
            for side in ("app_stream", "app_stream_base", "app_unsloth", "app_unsloth_base"):
                ratio(f"{side}/{name}", shape, app.get(side), best, None)
            if cuda:
                ratio("plain_generate_static/plain_generate", shape, plain.get("plain_generate_static"),
                      plain.get("plain_generate"), None)  # fmt: skip
            elif "llama_cpp" in args.sides.split(","):
                gguf = export_q8_0(workspace, run)
                llama = {record.get("side"): record for record in run_side("llama_cpp", args, gguf=gguf, tokens=tokens)}
                ratio("llama_cpp/app_stream", shape, llama.get("llama_cpp"), app.get("app_stream"), None)


if __name__ == "__main__":
    main()
