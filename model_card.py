"""The model card of a pushed run, made from the run folder: README.md with the Hub's metadata header (base_model,
library_name, tags, datasets), the base model, the dataset and its rows, the stage and settings, final and best
losses, the loss curve (loss_curve.png), held-out evaluation and arena results when the workspace has some, the GGUF
files with their agreement figures, and how to run the model in transformers, llama.cpp and Ollama."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import lora_weights
import runfolder
import stages
from runfolder import TrainedModel

log = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """Whether a model or dataset name is a Hub id the card's metadata may link (not a local folder or file)."""
    return bool(HUB_ID.fullmatch(str(name or ""))) and not Path(str(name)).exists()


def losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of the training loss and of the eval loss, from the run's events."""
    found: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    for event in runfolder.read_events(run_dir):
        for key in found:
            if event.step is not None and isinstance(event.metrics.get(key), (int, float)):
                found[key].append((event.step, float(event.metrics[key])))
    return found


def draw_loss_curve(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """The loss curves as a PNG (Pillow: the Hub renders it in the card), train in blue, eval in orange."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [point for curve in curves.values() for point in curve]
    steps = [step for step, _ in points]
    values = [value for _, value in points]
    low, high = min(values), max(values)
    span_y, span_x = (high - low) or 1.0, (max(steps) - min(steps)) or 1

    def place(step: int, value: float) -> tuple[float, float]:
        x = margin + (step - min(steps)) / span_x * (width - 2 * margin)
        y = height - margin - (value - low) / span_y * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="#999999")
    draw.text((margin, height - margin + 8), f"step {min(steps)}", fill="black")
    draw.text((width - margin - 60, height - margin + 8), f"step {max(steps)}", fill="black")
    draw.text((4, margin - 14), f"{high:.3f}", fill="black")
    draw.text((4, height - margin - 4), f"{low:.3f}", fill="black")
    for (name, curve), color in zip(curves.items(), ("#1f77b4", "#ff7f0e"), strict=False):
        if not curve:
            continue
        line = [place(step, value) for step, value in curve]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) < 40 else line[-1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((width - margin - 120, margin + 6 + 14 * list(curves).index(name)), name, fill=color)
    image.save(path)


def dataset_rows(settings: dict[str, Any], workspace: Path) -> int | None:
    """Rows the run read from its dataset (max_rows applied) when it is a local file still there; None for a Hub
    dataset (not downloaded again for a card) or a file that moved."""
    from dataset_files import DatasetConfig, local_file, read_rows
    from workspace import UserError, config_from_dict

    try:
        config = config_from_dict(DatasetConfig, settings.get("dataset") or {}, "dataset")
        path = local_file(config, workspace)
        return len(read_rows(config, path)) if path is not None and path.is_file() else None
    except (UserError, OSError, ValueError):  # the card says less rather than failing the push over a moved file
        return None


def related_results(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(eval.json of each held-out evaluation of the run, report.json of each arena it took part in)."""
    evaluations, arenas = [], []
    for other in sorted(run_dir.parent.iterdir()):
        kind = runfolder.read_kind(other) if (other / "config.yaml").is_file() else ""
        try:
            if kind == "eval" and (other / "eval.json").is_file():
                result = json.loads((other / "eval.json").read_text(encoding="utf-8"))
                if result.get("run") == run_dir.name:
                    evaluations.append(result)
            elif kind == "arena" and (other / "report.json").is_file():
                report = json.loads((other / "report.json").read_text(encoding="utf-8"))
                if any(str(name).endswith(run_dir.name) for name in report.get("contestants", [])):
                    arenas.append(report)
        except (OSError, ValueError):
            continue
    return evaluations, arenas


def benchmark_lines(run_dir: Path) -> list[str]:
    """The run's latest benchmark table (the benchmark job's benchmark.json), base vs tuned; nothing without one."""
    import benchmark_report

    table = benchmark_report.benchmark_results(run_dir)
    if not table:
        return []
    headers, rows = benchmark_report.table_rows(table)
    return [
        "",
        f"Benchmarks ({table['harness']}, at most {table['limit']} rows per task; value ± standard error):",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(headers) - 3)) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]


def card_text(model: TrainedModel, repo_id: str, files: dict[str, Path], curve: bool) -> str:
    """README.md of the repo: the Hub's metadata header, then the card."""
    from huggingface_hub import ModelCardData

    run_dir, settings = model.run_dir, model.train_config
    base = str((settings.get("model") or {}).get("name_or_path", model.base_model or ""))
    dataset = str((settings.get("dataset") or {}).get("source", ""))
    stage = stages.get(model.stage)
    variant = lora_weights.adapter_variant(model.path) if model.kind == "adapter" else "full fine-tune"
    adapter_at_root = "adapter_config.json" in files
    ggufs = sorted(name for name in files if name.endswith(".gguf"))
    tags = ["llm-finetuner", model.stage, "trl", *(["peft", variant] if model.kind == "adapter" else [])]
    tags += ["gguf"] if ggufs else []
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name="peft" if adapter_at_root else "transformers" if "config.json" in files else "gguf",
        tags=tags,
        datasets=[dataset] if is_hub_id(dataset) else None,
        pipeline_tag="text-generation",
    )
    name = repo_id.split("/")[1]
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {name}", ""]
    lines.append(
        f"{stage.title} of **{base or 'an unnamed base model'}** ({variant}), trained with LLM Finetuner "
        f"(run `{run_dir.name}`)."
    )
    rows = dataset_rows(settings, runfolder.run_workspace(run_dir))
    eval_split = float(settings.get("eval_split") or 0)
    held = round(rows * eval_split) if rows and eval_split else 0
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    table = [
        ("base model", base),
        ("dataset", dataset + (f" ({rows} rows: {rows - held} train, {held} held out)" if rows else "")),
        ("stage", stage.title),
        ("method", variant),
    ]
    if model.kind == "adapter":
        table += [
            (
                "LoRA rank / alpha / dropout",
                f"{settings.get('lora_r')} / {settings.get('lora_alpha')} / {settings.get('lora_dropout')}",
            ),
            ("target modules", ", ".join(map(str, settings.get("target_modules") or []))),
            ("4-bit base (QLoRA)", str(bool(settings.get("load_in_4bit")))),
        ]
    for key in (
        "learning_rate",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "lr_scheduler_type",
        "optim",
        "seed",
    ):
        if settings.get(key) is not None:
            table.append((key, str(settings[key])))
    lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in table]

    found = losses(run_dir)
    lines += ["", "## Results", ""]
    for key, label in (("loss", "training loss"), ("eval_loss", "eval loss")):
        if found[key]:
            step, best = min(found[key], key=lambda point: point[1])
            lines.append(
                f"- final {label}: {found[key][-1][1]:.4f} (step {found[key][-1][0]}); best {best:.4f} (step {step})"
            )
    if curve:
        lines += ["", f"![Loss curve]({LOSS_CURVE})"]
    evaluations, arenas = related_results(run_dir)
    for result in evaluations:
        lines += [
            "",
            f"Held-out evaluation ({result.get('rows')} rows, {result.get('tokens')} reply tokens): loss "
            f"{result['base']['loss']:.4f} → {result['tuned']['loss']:.4f}, perplexity "
            f"{result['base']['perplexity']} → {result['tuned']['perplexity']} (base → tuned).",
        ]
    for report in arenas:
        lines += ["", f"Arena ({report.get('prompts')} prompts, judge {report.get('judge', {}).get('model')}):", ""]
        lines += ["| contestant | wins | ties | losses | score |", "|---|---:|---:|---:|---:|"]
        for row in report.get("ranking", []):
            lines.append(
                f"| {row['contestant']} | {row['wins']} | {row['ties']} | {row['losses']} | "
                f"{100 * row['score']:.1f} % |"
            )
    lines += benchmark_lines(run_dir)
    report = _gguf_report(run_dir)
    if ggufs and report:
        lines += [
            "",
            "## GGUF files",
            "",
            "Agreement: top-1 next-token agreement with the Hugging Face model under teacher forcing "
            f"({report.get('check', {}).get('prompts')} prompts × "
            f"{report.get('check', {}).get('tokens_per_prompt')} tokens).",
            "",
            "| file | type | size | agreement |",
            "|---|---|---:|---:|",
        ]
        for entry in report.get("files", []):
            if entry["file"] in files:
                lines.append(
                    f"| {entry['file']} | {entry['quant']} | {entry['size_bytes'] / 1e6:.1f} MB | "
                    f"{100 * entry['agreement']:.1f} % |"
                )
    lines += ["", "## Use it", ""]
    if "config.json" in files:
        lines += [
            "transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    if any(name.endswith("adapter_config.json") for name in files):
        folder = "" if adapter_at_root else ', subfolder="adapter"'
        lines += [
            "transformers + PEFT (the adapter on its base model):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}"{folder})',
            "```",
            "",
        ]
    if ggufs:
        quant = ggufs[0].rsplit("-", 1)[-1].removesuffix(".gguf").upper()
        lines += [
            "llama.cpp and Ollama (the GGUF files):",
            "",
            "```sh",
            f"llama-cli -hf {repo_id}:{quant}",
            f"llama-server -hf {repo_id}:{quant}",
            f"ollama run hf.co/{repo_id}:{quant}",
            "```",
            "",
            "or download a file and `ollama create NAME -f Modelfile` beside it.",
        ]
    return "\n".join(lines) + "\n"


def _gguf_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "gguf" / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_card(model: TrainedModel, repo_id: str, files: dict[str, Path], folder: Path) -> dict[str, Path]:
    """README.md (and loss_curve.png when the run logged a loss) into `folder`: path in the repo → file."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    curves = losses(model.run_dir)
    if curves["loss"] or curves["eval_loss"]:
        draw_loss_curve(curves, folder / LOSS_CURVE)
        written[LOSS_CURVE] = folder / LOSS_CURVE
    text = card_text(model, repo_id, files, curve=bool(written))
    (folder / "README.md").write_text(text, encoding="utf-8")
    written["README.md"] = folder / "README.md"
    return written
