"""Does packing change what is learned? The app's training job, packed vs not packed, after the same trained tokens.

Data: templated Alpaca rows about invented towns (each town has fixed facts: river, founding year, export, festival
month, mayor), replies of 2-20 sentences (about 10-190 words), so a 135M model can learn the facts and the phrasing
and the eval loss falls. One row in ten is held out (eval_split 0.1, the same seed, so the same rows on both sides).

Side A: packing off, BATCH rows a step, --steps steps. Its trained tokens (TRL's num_tokens, from the final
checkpoint's trainer_state.json) set side B's step count: packing on, BATCH packed sequences of SEQ tokens a step,
as many steps as train the same tokens (fewer, larger steps). Same learning rate, linear schedule, warm-up a tenth of
each side's steps. Each side is a real job (jobs.create_run + jobs.start_job → `python main.py run`), evaluated at its
last step (the trainer's eval_loss) and then by the app's eval job (`main.py eval`: token-weighted loss on the same
held-out rows, unpacked, for both sides). One JSON line per side, then a comparison line.

    .venv/bin/python bench/packing_bench.py --steps 40 --threads 1   # bench/RESULTS.md section 12
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ = 256
BATCH = 2
LORA_R = 8
LEARNING_RATE = 2e-4
SEED = 3407
RIVERS = ["Alder", "Brisk", "Coldwater", "Dunmore", "Elvey", "Fenn", "Greywash", "Holm"]
EXPORTS = ["wool", "copper", "glass", "cheese", "timber", "salt", "paper", "barley", "silk", "clocks"]
MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]
SURNAMES = ["Hale", "Varga", "Okafor", "Lind", "Moreau", "Tanaka", "Quill", "Brandt", "Osei", "Pryce"]
ASKS = ["Tell me about {t}.", "Write a short profile of the town of {t}.", "What should a visitor know about {t}?"]


def towns(count: int, rng: random.Random) -> list[dict]:
    syllables = ["bar", "ven", "tal", "mor", "kes", "lin", "dra", "sol", "wick", "ham", "port", "ley"]
    names = sorted({(rng.choice(syllables) + rng.choice(syllables)).title() for _ in range(count * 3)})[:count]
    return [
        {
            "t": name,
            "river": rng.choice(RIVERS),
            "year": rng.randint(1100, 1850),
            "export": rng.choice(EXPORTS),
            "month": rng.choice(MONTHS),
            "mayor": rng.choice(SURNAMES),
        }
        for name in names
    ]


SENTENCES = [
    "{t} lies on the river {river}.",
    "{t} was founded in {year}.",
    "The main export of {t} is {export}.",
    "Every year in {month}, {t} holds its {export} festival.",
    "The mayor of {t} is Ms {mayor}.",
    "Boats on the {river} carry {export} from {t} to the coast.",
    "The old bridge over the {river} in {t} dates from {year}.",
    "Visitors to {t} in {month} should book early.",
    "Ms {mayor} opened the new {export} market in {t}.",
    "People in {t} say the {river} is the coldest river in the region.",
]


def alpaca_rows(count: int, seed: int) -> list[dict]:
    """Rows whose replies are 2-20 fact sentences (about 10-190 words, log-uniform) about one town."""
    rng = random.Random(seed)
    places = towns(30, rng)
    rows = []
    for _ in range(count):
        town = rng.choice(places)
        length = int(math.exp(rng.uniform(math.log(2), math.log(21))))
        reply = " ".join(rng.choice(SENTENCES).format(**town) for _ in range(length))
        rows.append({"instruction": rng.choice(ASKS).format(**town), "input": "", "output": reply})
    return rows


def train_side(model: Path, data: Path, workspace: Path, packing: bool, steps: int, env: dict) -> dict:
    """One training job and its held-out evaluation; figures from the run folder the UI reads."""
    import jobs
    import runfolder
    from dataset_utils import DatasetConfig
    from model_utils import ModelConfig
    from train_config import TrainConfig
    from workspace import config_to_dict

    config = TrainConfig(
        model=ModelConfig(str(model)),
        dataset=DatasetConfig(source=str(data)),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        warmup_steps=max(1, round(steps / 10)),
        lr_scheduler_type="linear",
        max_seq_length=SEQ,
        packing=packing,
        eval_split=0.1,
        eval_steps=steps,
        save_steps=steps,
        lora_r=LORA_R,
        lora_alpha=LORA_R,
        seed=SEED,
    )
    started = time.monotonic()
    run_dir = jobs.create_run("train", config_to_dict(config), workspace, f"packing-{packing}-{time.time_ns()}")
    wait(run_dir, env)
    seconds = time.monotonic() - started
    events = runfolder.read_events(run_dir)
    evals = [e.metrics["eval_loss"] for e in events if e.kind == "log" and "eval_loss" in e.metrics]
    losses = [e.metrics["loss"] for e in events if e.kind == "log" and "loss" in e.metrics]
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    tokens = max(entry.get("num_tokens", 0) for entry in state["log_history"])
    eval_dir = jobs.create_run("eval", {"run": str(run_dir), "max_rows": 0}, workspace, f"eval-{run_dir.name}")
    wait(eval_dir, env)
    held_out = json.loads((run_dir / "eval.json").read_text())
    return {
        "bench": "packing",
        "packing": packing,
        "steps": steps,
        "tokens_trained": int(tokens),
        "tokens_per_step": round(tokens / steps, 1),
        "last_train_loss": losses[-1],
        "trainer_eval_loss": round(evals[-1], 4),
        "held_out_loss": held_out["tuned"]["loss"],
        "base_held_out_loss": held_out["base"]["loss"],
        "held_out_tokens": held_out["tokens"],
        "seconds": round(seconds, 1),
        "run": run_dir.name,
    }


def wait(run_dir: Path, env: dict) -> None:
    import jobs
    import runfolder

    jobs.start_job(run_dir, env=env)
    while jobs.job_status(run_dir).state in runfolder.ACTIVE:
        time.sleep(1)
    status = jobs.job_status(run_dir)
    if status.state != "done":
        raise RuntimeError(f"{run_dir.name} {status.state}: {status.error}\n{runfolder.log_tail(run_dir, 60)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="side A's steps (not packed)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS for the jobs (1 on a machine shared with other work)"
    )
    parser.add_argument("--work", help="folder for the workspace and data (default: a new temporary folder)")
    args = parser.parse_args()
    import model_utils

    work = Path(args.work or tempfile.mkdtemp(prefix="packing-bench-"))
    workspace = work / "workspace"
    model = model_utils.ensure_demo_model(workspace)
    data = work / "facts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in alpaca_rows(args.rows, seed=7)), encoding="utf-8")

    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    plain = train_side(model, data, workspace, packing=False, steps=args.steps, env=env)
    print(json.dumps(plain), flush=True)
    # Best-fit packing fills nearly every sequence to SEQ tokens; the packed side's own count is reported after its run.
    packed_steps = max(1, round(plain["tokens_trained"] / (BATCH * SEQ)))
    packed = train_side(model, data, workspace, packing=True, steps=packed_steps, env=env)
    print(json.dumps(packed), flush=True)
    comparison = {
        "bench": "packing",
        "comparison": "packed_minus_plain",
        "token_ratio": round(packed["tokens_trained"] / plain["tokens_trained"], 3),
        "step_ratio": round(packed["steps"] / plain["steps"], 3),
        "trainer_eval_loss_diff": round(packed["trainer_eval_loss"] - plain["trainer_eval_loss"], 4),
        "held_out_loss_diff": round(packed["held_out_loss"] - plain["held_out_loss"], 4),
        "seconds_ratio": round(packed["seconds"] / plain["seconds"], 3),
    }
    print(json.dumps(comparison), flush=True)


if __name__ == "__main__":
    main()
