"""Training throughput on a CUDA GPU: the app's own training job vs a bare Unsloth script vs bare HF + PEFT + TRL.

Same random-init Llama-3.2 model, data and settings on every side (seq 2048, batch 4, LoRA r=16 on all linear
layers, adamw_torch); bf16 LoRA and 4-bit QLoRA. Every measurement runs in its own process (Unsloth patches
transformers on import, and peak memory must be the run's own) and prints one JSON object; ratios are printed
from measurements of the same invocation, next to the card's measured bf16 matmul peak for model-FLOPs utilisation
(4 · parameters · tokens/s: forward and input-gradient matmuls of a LoRA step).

    python bench/train_bench.py run --shapes 1b,3b --modes lora,qlora --sides app,unsloth,hf
    python bench/train_bench.py run --shapes 1b,3b --modes lora --sides "" --defaults --repeat 2
        # varied lengths: the app's defaults vs bare Unsloth's notebook defaults vs HF + PEFT, and the app's
        # defaults on fixed rows (the same model's speed without length variation)
    python bench/train_bench.py run --shapes 1b --modes lora --sides "" --variants 'packed={"packing": true}'
        # the app's defaults with some settings (and environment variables, "env": {...}) changed, varied lengths
    python bench/train_bench.py run --shapes 1b --modes lora --scaling 2     # the app on 1 and on 2 GPUs

The app side is a real job (jobs.create_run + jobs.start_job → `python main.py run`), exactly what the UI starts;
its figures come from the events.jsonl the UI reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 2048
BATCH = 4
LORA_R = 16
LEARNING_RATE = 2e-4
WARMUP_STEPS = 5  # as the app's TrainConfig default, on every side
STEPS = {"1b": 30, "3b": 20}
SKIP = 5  # optimizer steps left out of the timing (compilation, allocator warm-up)
PROCESS_TIMEOUT_S = 300
TARGETS = {
    "app_vs_unsloth_speed": 0.97,
    "app_vs_unsloth_memory": 1.02,
    "defaults_vs_hf_speed": 5.0,
    "defaults_vs_unsloth_defaults": 4.0,
    "varied_vs_fixed": 0.6,
    "scaling_2_gpus": 1.8,
}


# ---------------------------------------------------------------- inputs


def input_paths(work: Path, shape: str) -> dict[str, Path]:
    return {"model": work / f"llama-3.2-{shape}-random", "fixed": work / "fixed.jsonl", "varied": work / "varied.jsonl"}


def prepare(work: Path, shapes: list[str]) -> None:
    """Tokenizer, model folders and the two data files under `work` (kept between invocations on one machine)."""
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        gpu_models.build_tokenizer(tokenizer)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a quick check of this script (tiny shape)
    for shape in shapes:
        gpu_models.build_model(shape, input_paths(work, shape)["model"], tokenizer, device=device)
    paths = input_paths(work, shapes[0])
    # Every row longer than SEQ tokens (≈1.4 tokens a word), so each step trains exactly BATCH × SEQ tokens.
    if not paths["fixed"].exists():
        gpu_models.write_jsonl(paths["fixed"], gpu_models.alpaca_rows(240, 1700, 2200, seed=1))
    # Answers of 30 to 1400 words (log-uniform): lengths vary as in real instruction data, so padding matters.
    if not paths["varied"].exists():
        gpu_models.write_jsonl(paths["varied"], gpu_models.alpaca_rows(800, 30, 1400, seed=2))


def prompt_completion_rows(path: Path):
    """The Alpaca rows as TRL conversational prompt/completion pairs: TRL trains on the completion only, as the app
    does with train_on_responses_only."""
    from datasets import load_dataset

    def convert(row):
        prompt = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row["input"].strip() else "")
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    rows = load_dataset("json", data_files=str(path), split="train")
    return rows.map(convert, remove_columns=rows.column_names)


# ---------------------------------------------------------------- one measurement (own process)


def bare_trainer_args(output_dir: Path, steps: int, batch: int, accumulation: int, gradient_checkpointing: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        optim="adamw_torch",
        max_length=SEQ,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=3407,
        gradient_checkpointing=gradient_checkpointing,
    )


class StepClock:
    """Records (time, step, tokens seen) at every step's log, where the trainer's loss .item() has synchronised the
    GPU. Tokens: TRL's count when it logs one (Unsloth's trainer does not), else the collator's, as the app counts."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                import torch

                if "loss" not in (logs or {}):  # the closing summary is no step
                    return
                tokens = logs.get("num_tokens", clock.counter.tokens if clock.counter is not None else None)
                clock.marks.append(
                    {
                        "time": time.time(),
                        "step": state.global_step,
                        "num_tokens": tokens,
                        "loss": logs["loss"],
                        "memory": torch.cuda.max_memory_allocated(),
                    }
                )

        self.marks: list[dict] = []
        self.counter = None
        self.callback = Callback()


# Unsloth's notebooks: per-device batch 2, gradient accumulation 4, Unsloth's own batching (padding-free, chosen by
# its SFTTrainer when padding_free is left unset).
NOTEBOOK_BATCH, NOTEBOOK_ACCUMULATION = 2, 4


def measure_bare(
    side: str, model_path: Path, data: Path, mode: str, steps: int, batch: int, work: Path, accumulation: int = 1
) -> dict:
    """A bare Unsloth or HF + PEFT + TRL script, as their docs write it."""
    import torch

    qlora = mode == "qlora"
    if side == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_path), max_seq_length=SEQ, dtype=None, load_in_4bit=qlora
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=LORA_R,
            lora_alpha=LORA_R,
            lora_dropout=0.0,
            target_modules=ALL_LINEAR,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=3407,
        )
        peft_config, checkpointing = None, False
    else:
        from peft import LoraConfig, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quantization = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            if qlora
            else None
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path),
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            device_map={"": 0},
            quantization_config=quantization,
        )
        if qlora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        peft_config = LoraConfig(
            r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=ALL_LINEAR, bias="none", task_type="CAUSAL_LM"
        )
        checkpointing = True
    from trl import SFTTrainer

    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=prompt_completion_rows(data),
        args=bare_trainer_args(work / f"out-{side}", steps, batch, accumulation, checkpointing),
        peft_config=peft_config,
    )
    from training_utils import TokenCounter

    clock.counter = trainer.data_collator = TokenCounter(trainer.data_collator)
    trainer.add_callback(clock.callback)
    trainer.train()
    # As the app's events: the process's peak since it started, read at the last log.
    peak = clock.marks[-1]["memory"] / 1024**3
    return {
        **window(clock.marks, batch, accumulation),
        "peak_memory_gib": round(peak, 3),
        "batch": batch,
        "gradient_accumulation_steps": accumulation,
        "padding_free": bool(getattr(trainer.args, "padding_free", False)),
        "packing": bool(getattr(trainer.args, "packing", False)),
        "card": torch.cuda.get_device_name(0),
    }


def window(marks: list[dict], batch: int, accumulation: int, processes: int = 1) -> dict:
    """tokens/s after the first SKIP steps: from the trainer's token count when logged, else from the step count
    (exact when every row fills SEQ tokens)."""
    timed = [mark for mark in marks if mark["step"] >= SKIP]
    seconds = timed[-1]["time"] - timed[0]["time"]
    steps = timed[-1]["step"] - timed[0]["step"]
    result = {
        "timed_steps": steps,
        "seconds": round(seconds, 3),
        "step_seconds": [
            round(later["time"] - earlier["time"], 4) for earlier, later in zip(timed[:-1], timed[1:], strict=True)
        ],
        "step_tokens_per_s": round(steps * batch * accumulation * processes * SEQ / seconds, 1),
        "losses": [round(mark["loss"], 4) for mark in marks if mark.get("loss") is not None],
    }
    if timed[0].get("num_tokens") is not None and timed[-1].get("num_tokens") is not None:
        result["tokens_per_s"] = round((timed[-1]["num_tokens"] - timed[0]["num_tokens"]) / seconds, 1)
    else:
        result["tokens_per_s"] = result["step_tokens_per_s"]
    return result


def measure_app(
    model_path: Path,
    data: Path,
    mode: str,
    steps: int,
    batch: int | None,
    work: Path,
    num_gpus: int = 1,
    overrides: dict | None = None,
) -> dict:
    """The app's training job; batch None keeps the app's own defaults (batch size, accumulation, packing), and
    `overrides` changes some TrainConfig fields (a variant of the defaults)."""
    import jobs
    import runfolder
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig
    from workspace import config_to_dict

    settings = (
        {}
        if batch is None
        else {
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "lora_r": LORA_R,
            "lora_alpha": LORA_R,
            "target_modules": ALL_LINEAR,
            "optim": "adamw_torch",
            "learning_rate": LEARNING_RATE,
            "warmup_steps": WARMUP_STEPS,
        }
    )
    config = TrainConfig(
        model=ModelConfig(str(model_path)),
        dataset=DatasetConfig(source=str(data)),
        load_in_4bit=mode == "qlora",
        max_steps=steps,
        max_seq_length=SEQ,
        save_steps=steps + 1000,
        num_gpus=num_gpus,
        **{**settings, **(overrides or {})},
    )
    workspace = work / "workspace"
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"bench-{mode}-{int(time.time())}")
    jobs.start_job(run_dir)
    while jobs.job_status(run_dir).state in runfolder.ACTIVE:
        time.sleep(1)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        raise RuntimeError(f"app run {status.state}: {status.error}\n{runfolder.log_tail(run_dir, 60)}")
    events = [event for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics]
    # The job logs tokens/s between consecutive logs (TRL's token count): weight each by its interval.
    counted = any("tokens_per_s" in event.metrics for event in events)
    marks, seen = [], 0.0
    for previous, event in zip([None, *events[:-1]], events, strict=True):
        if previous is not None and "tokens_per_s" in event.metrics:
            seen += event.metrics["tokens_per_s"] * (event.time - previous.time)
        marks.append(
            {
                "time": event.time,
                "step": event.step,
                "num_tokens": seen if counted else None,
                "loss": event.metrics["loss"],
            }
        )
    accumulation = config.gradient_accumulation_steps
    result = window(marks, config.per_device_train_batch_size, accumulation, status.processes)
    import torch

    return {
        **result,
        "peak_memory_gib": max(event.metrics["memory_gib"] for event in events),
        "gpu_memory_gib": events[-1].metrics.get("gpu_memory_gib"),
        "backend": status.backend,
        "processes": status.processes,
        "batch": config.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "packing": config.packing,
        "settings": overrides or {},
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "job_log": str(run_dir / "log.txt"),
    }


def matmul_peak() -> dict:
    """The card's bf16 matmul rate: median of 30 timed 8192³ products on random data."""
    import torch

    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    median = sorted(times)[len(times) // 2]
    return {
        "measurement": "bf16_matmul_peak",
        "card": torch.cuda.get_device_name(0),
        "tflops": round(2 * size**3 / median / 1e12, 1),
    }


def one(args: argparse.Namespace) -> None:
    """Child process: one measurement, printed as a JSON line prefixed with RESULT."""
    if args.side.startswith("unsloth"):
        import unsloth  # noqa: F401  (before transformers, trl and peft: it patches them)
    work = Path(args.work)
    paths = input_paths(work, args.shape)
    model, data = paths["model"], paths[args.data]
    steps = args.steps or STEPS[args.shape]
    if args.side == "app":
        overrides = json.loads(args.settings) if args.settings else None
        batch = None if args.defaults else BATCH
        result = measure_app(model, data, args.mode, steps, batch, work, args.num_gpus, overrides)
    elif args.side == "unsloth-defaults":
        result = measure_bare(
            "unsloth", model, data, args.mode, steps, NOTEBOOK_BATCH, work, accumulation=NOTEBOOK_ACCUMULATION
        )
    else:
        result = measure_bare(args.side, model, data, args.mode, steps, BATCH, work)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the whole comparison


def spawn(work: Path, log_dir: Path, label: str, env: dict | None = None, **options) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "one", "--work", str(work)]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            command += [f"--{key.replace('_', '-')}", str(value)]
    started = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:  # one stuck side must not take the whole invocation's time
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        (log_dir / f"{label}.log").write_text(output)
        return {"error": f"no result in {PROCESS_TIMEOUT_S} s", "log_tail": "\n".join(output.splitlines()[-40:])}
    (log_dir / f"{label}.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        return {"error": f"exit {done.returncode}", "log_tail": tail}
    result = json.loads(lines[-1][len("RESULT ") :])
    if "job_log" in result:  # the app's job writes its own log, in its run folder
        (log_dir / f"{label}-job.log").write_text(Path(result.pop("job_log")).read_text(errors="replace"))
    return {**result, "process_s": round(time.monotonic() - started, 1)}


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as handle:
            handle.write(line + "\n")


def ratio(name: str, numerator: dict, denominator: dict, target: float, higher_is_better: bool, key: str) -> dict:
    if "error" in numerator or "error" in denominator:
        return {"ratio": name, "error": "a side failed"}
    value = numerator[key] / denominator[key]
    return {
        "ratio": name,
        "of": key,
        "value": round(value, 3),
        "target": target,
        "met": value >= target if higher_is_better else value <= target,
    }


def run(args: argparse.Namespace) -> None:
    import torch

    work = Path(args.work)
    log_dir = Path(args.logs or work / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else None
    shapes, modes = args.shapes.split(","), args.modes.split(",")
    sides = [side for side in args.sides.split(",") if side]
    prepare(work, shapes)
    peak = matmul_peak()
    emit({**peak, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}, out)
    torch.cuda.empty_cache()

    def measured(shape: str, mode: str, side: str, data: str, label: str, env=None, **options) -> dict:
        steps = args.steps
        result = spawn(work, log_dir, label, env, shape=shape, mode=mode, side=side, data=data, steps=steps, **options)
        record = {"measurement": label, "shape": shape, "mode": mode, "side": side, "data": data, "seq": SEQ, **result}
        if "tokens_per_s" in result:
            params = gpu_models.parameter_count(input_paths(work, shape)["model"])
            per_gpu = result["tokens_per_s"] / result.get("processes", 1)
            record.update(parameters=params, mfu=round(4 * params * per_gpu / (peak["tflops"] * 1e12), 4))
        emit(record, out)
        return record

    def compare(name: str, numerator: list[dict], denominator: list[dict], speed: float, memory: float | None) -> None:
        emit(ratio(name, mean(numerator), mean(denominator), speed, True, "tokens_per_s"), out)
        if memory is not None:
            emit(ratio(name, mean(numerator), mean(denominator), memory, False, "peak_memory_gib"), out)

    def defaults(shape: str, mode: str, measured, compare) -> None:
        """Varied lengths, what a user gets without tuning anything: the app's defaults, bare Unsloth's notebook
        defaults and HF + PEFT at batch 4, alternating (each repeat starts with the next side); then the app's
        defaults on fixed rows, the same model's speed when lengths do not vary."""
        order = ["app", "unsloth-defaults", "hf"]
        runs: dict[str, list[dict]] = {side: [] for side in order}
        for repeat in range(args.repeat):
            for side in order[repeat % 3 :] + order[: repeat % 3]:
                label = f"{shape}-{mode}-{side}-varied-r{repeat}"
                runs[side].append(measured(shape, mode, side, "varied", label, defaults=side == "app"))
        fixed = measured(shape, mode, "app", "fixed", f"{shape}-{mode}-app-defaults-fixed", defaults=True)
        name = f"{shape}-{mode} varied lengths, app defaults"
        compare(
            f"{name} / hf", runs["app"], runs["hf"], TARGETS["defaults_vs_hf_speed"], TARGETS["defaults_vs_hf_memory"]
        )
        compare(
            f"{name} / unsloth notebook defaults",
            runs["app"],
            runs["unsloth-defaults"],
            TARGETS["defaults_vs_unsloth_defaults"],
            None,
        )
        compare(f"{name} / app defaults on fixed rows", runs["app"], [fixed], TARGETS["varied_vs_fixed"], None)

    variants = [variant.split("=", 1) for variant in args.variants]

    for shape in shapes:
        for mode in modes:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for repeat in range(args.repeat):  # the sides alternate, so a drift of the card's clocks hits each alike
                for side in sides:
                    label = f"{shape}-{mode}-{side}" + (f"-r{repeat}" if args.repeat > 1 else "")
                    runs[side].append(measured(shape, mode, side, "fixed", label))
            if runs.get("app") and runs.get("unsloth"):
                compare(
                    f"{shape}-{mode} app/unsloth",
                    runs["app"],
                    runs["unsloth"],
                    TARGETS["app_vs_unsloth_speed"],
                    TARGETS["app_vs_unsloth_memory"],
                )
            for side in ("app", "unsloth"):
                if runs.get(side) and runs.get("hf"):
                    compare(f"{shape}-{mode} {side}/hf", runs[side], runs["hf"], 0, 1)
            if args.defaults:
                defaults(shape, mode, measured, compare)
            for name, spec in variants:  # the defaults with some settings changed
                settings = json.loads(spec)
                env = settings.pop("env", None)
                label = f"{shape}-{mode}-app-{name}-{args.variant_data}"
                options = dict(env=env, defaults=True, settings=json.dumps(settings))
                measured(shape, mode, "app", args.variant_data, label, **options)
            if args.scaling > 1:
                single = measured(shape, mode, "app", "fixed", f"{shape}-{mode}-app-1gpu", num_gpus=1)
                several = measured(
                    shape, mode, "app", "fixed", f"{shape}-{mode}-app-{args.scaling}gpu", num_gpus=args.scaling
                )
                target = TARGETS["scaling_2_gpus"] if args.scaling == 2 else 0
                emit(
                    ratio(
                        f"{shape}-{mode} app {args.scaling} GPUs/1 GPU", several, single, target, True, "tokens_per_s"
                    ),
                    out,
                )


def mean(records: list[dict]) -> dict:
    """The mean tokens/s and peak memory of the repeats that worked."""
    good = [record for record in records if "error" not in record]
    if not good:
        return {"error": "every repeat failed"}
    return {key: sum(record[key] for record in good) / len(good) for key in ("tokens_per_s", "peak_memory_gib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    whole = commands.add_parser("run", help="every measurement, each in its own process, then the ratios")
    whole.add_argument("--shapes", default="1b,3b")
    whole.add_argument("--modes", default="lora,qlora")
    whole.add_argument("--sides", default="app,unsloth,hf", help="any of app, unsloth, hf; empty for none")
    whole.add_argument(
        "--defaults",
        action="store_true",
        help="also, on varied lengths, the app's defaults vs bare Unsloth's notebook defaults vs HF + PEFT",
    )
    whole.add_argument(
        "--variants",
        action="append",
        default=[],
        metavar='NAME={"setting": value, "env": {...}}',
        help="also the app's defaults with these TrainConfig settings (and environment) changed",
    )
    whole.add_argument("--variant-data", choices=["fixed", "varied"], default="varied", help="the variants' data")
    whole.add_argument("--scaling", type=int, default=0, help="also the app on 1 and on this many GPUs")
    whole.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per shape)")
    whole.add_argument("--repeat", type=int, default=1, help="measure each side this many times, alternating")
    whole.add_argument("--work", default="/tmp/train-bench", help="models, data and run folders")
    whole.add_argument("--logs", default=None, help="folder for each process's log (default WORK/logs)")
    whole.add_argument("--out", default=None, help="also append the JSON lines to this file")
    single = commands.add_parser("one", help="(internal) one measurement in this process")
    single.add_argument("--work", required=True)
    single.add_argument("--shape", choices=sorted(gpu_models.SHAPES), required=True)
    single.add_argument("--mode", choices=["lora", "qlora"], required=True)
    single.add_argument("--side", choices=["app", "unsloth", "unsloth-defaults", "hf"], required=True)
    single.add_argument("--data", choices=["fixed", "varied"], default="fixed")
    single.add_argument("--defaults", action="store_true")
    single.add_argument("--settings", default=None, help="JSON: TrainConfig fields the app side changes")
    single.add_argument("--num-gpus", type=int, default=1)
    single.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "one":
        one(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
