"""GGUF export: merge the LoRA adapter into 16-bit weights → llama.cpp's own converter → quantize → load each file
in llama.cpp, generate, and measure its agreement with the Hugging Face model → Ollama Modelfile; optionally the
adapter alone as a LoRA GGUF beside the base model's GGUF (Modelfile.lora with ADAPTER), checked the same way.

`export_job` reads top to bottom; it runs as a job (`python main.py export RUN --quant q4_k_m,q8_0`). The steps
live in `convert` (merge, convert, quantize), `check` (agreement with the HF model), `modelfile` (Ollama) and
`ollama` (handing the files to a running Ollama).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lora_weights
import model_utils
import runfolder
import settings
import stages
from gguf_utils.check import CHECK_PROMPTS, MIN_CHECK_PROMPTS, REFERENCE_CACHE, Reference, check_gguf, hf_side
from gguf_utils.convert import (
    CONVERTER,
    FLOAT_TYPES,
    IMATRIX_TYPES,
    LORA_CONVERTER,
    MERGE_DTYPES,
    MERGE_STAMP,
    QUANT_FTYPES,
    Stopped,
    conversion_warning,
    conversions,
    ensure_merged,
    finish_conversion,
    llama_cpp_version,
    merge_dtype,
    merged_dir,
    merged_is_current,
    model_dtype,
    quantize_gguf,
    start_conversion,
    start_lora_conversion,
    supported_architectures,
)
from gguf_utils.imatrix import compute_imatrix, training_rows
from gguf_utils.modelfile import build_modelfile
from runfolder import JobContext, StopFlag, TrainedModel
from workspace import UserError, config_from_dict

__all__ = [
    "CHECK_PROMPTS",
    "CONVERTER",
    "FLOAT_TYPES",
    "IMATRIX_TYPES",
    "QUANT_GUIDE",
    "MERGE_DTYPES",
    "MERGE_STAMP",
    "MIN_CHECK_PROMPTS",
    "QUANT_FTYPES",
    "REFERENCE_CACHE",
    "ExportConfig",
    "check_export",
    "conversion_warning",
    "export_config_from_dict",
    "export_job",
    "export_run_name",
    "export_source",
    "needed_disk_bytes",
    "supported_architectures",
]

log = logging.getLogger(__name__)

# Bits per weight, rounded up: small models get bigger files because llama.cpp falls back to wider types for
# rows that do not fit a k-quant's 256-wide blocks and keeps the output layer at 6-8 bits.
BITS_PER_WEIGHT = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 8.5, "q5_k_m": 7.0, "q4_k_m": 6.5, "q4_0": 6.0}
# The other types: llama.cpp's nominal bits per weight (llama-quantize's table) plus the same 2-bit allowance.
BITS_PER_WEIGHT |= {
    quant: min(16.0, bits + 2)
    for quant, bits in {
        "q5_1": 6.0, "q5_k_s": 5.5, "q5_0": 5.5, "q4_1": 5.0, "q4_k_s": 4.6, "iq4_nl": 4.5, "iq4_xs": 4.3,
        "mxfp4_moe": 8.5, "q3_k_l": 4.3, "q3_k_m": 3.9, "iq3_m": 3.7, "iq3_s": 3.5, "q3_k_s": 3.5, "iq3_xs": 3.3,
        "iq3_xxs": 3.1, "q2_k": 3.4, "q2_k_s": 3.0, "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.3, "iq2_xxs": 2.1,
        "q2_0": 2.5, "tq2_0": 2.1, "tq1_0": 1.7, "iq1_m": 1.8, "iq1_s": 1.6, "q1_0": 1.5,
    }.items()
}  # fmt: skip
# The Export tab's one line on which type to pick (file size ≈ parameters × bits per weight / 8).
QUANT_GUIDE = (
    "Which type: the file must fit in memory with room for the context. Plenty of memory: q8_0 (≈ 8.5 bits per "
    "weight, nearly lossless) or f16/bf16; the usual choice: q4_k_m (≈ 4.9 bits), or q5_k_m / q6_k when a little more "
    "fits; tight memory: iq4_xs, q3_k_m, iq3_xxs (≈ 3 bits); only as a last resort: the 2-bit and 1-bit types "
    "(q2_k, iq2_*, iq1_*), which lose the most. tq1_0 / tq2_0 suit only ternary (BitNet-trained) models and mxfp4_moe "
    "only mixture-of-experts ones. The agreement column shows what each file lost."
)


@dataclass
class ExportConfig:
    """What to export from a finished training run, and how to check the result."""

    run: str = settings.option(
        "", help="The finished training run to export (its name or folder).", label="Training run"
    )
    # No `choices`: settings.check compares the whole value with them, and this is a list; validate() checks each.
    quants: list[str] = settings.option(
        default_factory=lambda: ["q8_0"],
        help="GGUF types to write (also as 'q4_k_m,q8_0'): q8_0 is nearly lossless; q4_k_m is the usual small "
        f"choice; f16/bf16 are unquantized; {', '.join(IMATRIX_TYPES)} get an importance matrix computed from the "
        f"run's own training rows. One or more of: {', '.join(QUANT_FTYPES)}.",
        label="Quant types",
    )
    check_prompts: int = settings.option(
        len(CHECK_PROMPTS),
        help="Prompts scored against the Hugging Face model (all 16, 512 tokens, by default).",
        minimum=MIN_CHECK_PROMPTS,
        maximum=len(CHECK_PROMPTS),
        label="Check prompts",
        advanced=True,
    )
    check_tokens: int = settings.option(
        32, help="Tokens scored per prompt.", minimum=1, maximum=512, label="Tokens per prompt", advanced=True
    )
    merge_dtype: str = settings.option(
        "auto",
        help="16-bit type of merged/: auto = the base model's 16-bit type, else float16.",
        choices=MERGE_DTYPES,
        label="Merge dtype",
        advanced=True,
    )
    temperature: float = settings.option(
        0.7, help="The Modelfile's sampling temperature.", minimum=0, maximum=2, label="Modelfile temperature"
    )
    top_p: float = settings.option(
        0.9,
        help="The Modelfile's top_p.",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        label="Modelfile top_p",
    )
    num_ctx: int = settings.option(
        4096, help="The Modelfile's context length; capped at the model's own.", minimum=1, label="Modelfile num_ctx"
    )
    lora_gguf: bool = settings.option(
        False,
        help="Also write the adapter alone as a small LoRA GGUF, the base model's GGUF (in the first quant type) and "
        "Modelfile.lora (FROM base + ADAPTER), for keeping one base model and many adapters; checked like the "
        "merged files. LoRA runs only.",
        label="LoRA-only GGUF",
    )

    def __post_init__(self) -> None:
        quants = self.quants.split(",") if isinstance(self.quants, str) else list(self.quants or [])
        self.quants = [str(quant).strip().lower() for quant in quants if str(quant).strip()]
        # Sliders and YAML may give 10.0 for 10.
        for name in ("check_prompts", "check_tokens", "num_ctx"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))

    def validate(self) -> None:
        if not str(self.run).strip():
            raise UserError("No training run chosen. Give the name of a finished training run to export.")
        if not self.quants:
            raise UserError(f"No quant type chosen. Choose one or more of: {', '.join(QUANT_FTYPES)}.")
        unknown = [quant for quant in self.quants if quant not in QUANT_FTYPES]
        if unknown:
            raise UserError(f"Unknown quant type(s): {', '.join(unknown)}. Valid types: {', '.join(QUANT_FTYPES)}.")
        if len(set(self.quants)) != len(self.quants):
            raise UserError(f"Quant types are listed twice: {', '.join(self.quants)}.")
        for name in ("check_prompts", "check_tokens", "num_ctx"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be a whole number (got {getattr(self, name)!r}).")
        settings.check(self)


def export_config_from_dict(data: dict[str, Any]) -> ExportConfig:
    return config_from_dict(ExportConfig, data, "export config")


def export_run_name(run: str) -> str:
    """The export job's own run-folder name (jobs adds -2, -3 … when it exists)."""
    return f"export-{Path(str(run)).name}"[:80]


# ---------------------------------------------------------------- what to export, and whether it fits


def export_source(run: str | Path, workspace: str | Path | None = None) -> TrainedModel:
    """The trained model of a finished training run, an adapter's base model resolved to its folder; UserError when
    the run has none."""
    run_dir = runfolder.run_path(run, workspace)
    model = stages.causal_lm(run_dir)
    if model.kind != "adapter":
        return model
    if not model.base_model:
        raise UserError(f"The adapter of run '{run_dir.name}' does not say which base model it belongs to.")
    base = model_utils.resolve_model_path(model.base_model, runfolder.run_workspace(run_dir))
    return dataclasses.replace(model, base_model=base)


def gguf_dir(model: TrainedModel) -> Path:
    return model.run_dir / "gguf"


def count_parameters(folder: str | Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers (no weights loaded)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for size in info["shape"]:
                    count *= size
                total += count
    return total


def free_disk_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def needed_disk_bytes(model: TrainedModel, config: ExportConfig) -> dict[str, int]:
    """Estimated bytes each part of the export writes: merged/ (when it must be made), the GGUF files, the
    16-bit GGUF that quantization starts from when it is not one of the outputs."""
    adapter = model.kind == "adapter"
    params = count_parameters(model.base_model if adapter else merged_dir(model))
    if params == 0:
        raise UserError(f"No .safetensors weights found for run '{model.run_dir.name}'; cannot export it.")
    dtype = merge_dtype(model, config.merge_dtype) if adapter else model_dtype(merged_dir(model))
    needed = {}
    if not merged_is_current(model, dtype):
        needed["merged"] = params * 2
    for quant in config.quants:
        needed[quant] = int(params * BITS_PER_WEIGHT[quant] / 8) + 32 * 2**20  # + vocabulary and metadata
    for outtype in conversions(config.quants, dtype)[0]:
        if outtype not in config.quants:
            needed[f"{outtype} intermediate"] = params * 2
    if config.lora_gguf and adapter:
        base_quant = config.quants[0]
        needed[f"base {base_quant}"] = int(params * BITS_PER_WEIGHT[base_quant] / 8) + 32 * 2**20
        if base_quant not in FLOAT_TYPES:
            needed["base 16-bit intermediate"] = params * 2
        needed["LoRA adapter"] = sum(path.stat().st_size for path in model.path.glob("adapter_model.*"))
    return needed


def check_disk_space(model: TrainedModel, config: ExportConfig) -> None:
    """UserError before anything is written when the export would not fit on the disk."""
    needed = needed_disk_bytes(model, config)
    free = free_disk_bytes(model.run_dir)
    if sum(needed.values()) > free:
        parts = ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in needed.items())
        raise UserError(
            f"Not enough disk space for this export: it needs about {sum(needed.values()) / 1e9:.2f} GB ({parts}) "
            f"in {model.run_dir}, and {free / 1e9:.2f} GB are free. Free some space or export fewer quant types."
        )


def check_export(config: ExportConfig, workspace: str | Path | None = None) -> TrainedModel:
    """Everything that can be refused before a job starts: options, the run's model, disk space, the converter."""
    config.validate()
    model = export_source(config.run, workspace)
    if config.lora_gguf and model.kind != "adapter":
        raise UserError(
            f"Run '{model.run_dir.name}' is a full fine-tune: it has no LoRA adapter to write as a LoRA GGUF. "
            "Export it without the LoRA-only GGUF option."
        )
    if config.lora_gguf and lora_weights.adapter_variant(model.path) == "dora":
        raise UserError(
            f"Run '{model.run_dir.name}' trained a DoRA adapter: llama.cpp's LoRA GGUF has no place for DoRA's "
            "magnitudes. Export it without the LoRA-only GGUF option (the merged GGUF files hold DoRA's weights)."
        )
    check_disk_space(model, config)
    for script in (CONVERTER, LORA_CONVERTER) if config.lora_gguf else (CONVERTER,):
        if not script.exists():
            raise UserError(
                f"llama.cpp's converter is missing ({script}). Run `make setup` (or `python "
                "scripts/fetch_converter.py vendor` in a checkout): it unpacks it from the llama-cpp-python source "
                "package."
            )
    return model


# ---------------------------------------------------------------- the export job


def export_job(config: ExportConfig, ctx: JobContext) -> str:
    """Run an export job: files go to the training run's gguf/ folder; returns "done" or "stopped"."""
    started = time.monotonic()
    model = check_export(config, ctx.workspace)
    out = gguf_dir(model)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(model)
    name = model.run_dir.name
    to_quantize = [quant for quant in config.quants if quant not in FLOAT_TYPES]
    needs_imatrix = any(quant in IMATRIX_TYPES for quant in config.quants)
    total = 3 + len(to_quantize) + len(config.quants) + needs_imatrix
    if config.lora_gguf:
        total += 2 + (config.quants[0] not in FLOAT_TYPES)
    finished = iter(range(total))
    staging = _Staging(out)

    def step(message: str) -> None:
        """Report the step that starts now; the bar's step counts the steps finished, so it fills as each ends."""
        if ctx.stop.requested:
            raise Stopped
        done = next(finished)
        ctx.reporter.progress(done, total, message)
        log.info("[%d/%d] %s", done, total, message)

    try:
        adapter = model.kind == "adapter"
        step("merging the adapter into 16-bit weights" if adapter else "using the full fine-tune's weights")
        merge_started = time.monotonic()
        merged, reused = ensure_merged(model, merge_dtype(model, config.merge_dtype))
        merge_s = time.monotonic() - merge_started

        step("converting with llama.cpp's convert_hf_to_gguf.py")
        outtypes, base_type = conversions(config.quants, model_dtype(merged))
        converted = {
            outtype: staging.file(f"{name}-{outtype}.gguf") if outtype in config.quants else staging.scratch(outtype)
            for outtype in outtypes
        }
        convert_s, (reference, chat, reference_cached), reference_s = _convert(merged, converted, config, ctx.stop)

        files = {quant: converted[quant] for quant in config.quants if quant in FLOAT_TYPES}
        imatrix, imatrix_s = None, 0.0
        if needs_imatrix:
            step("computing the importance matrix from the run's training rows")
            imatrix_started = time.monotonic()
            rows = training_rows(model, ctx.workspace)
            imatrix = compute_imatrix(merged, converted[base_type], rows)
            imatrix_s = time.monotonic() - imatrix_started
        quantize_s = {}
        for quant in to_quantize:
            step(f"quantizing to {quant}")
            files[quant] = staging.file(f"{name}-{quant}.gguf")
            uses = imatrix if quant in IMATRIX_TYPES else None
            quantize_s[quant] = quantize_gguf(converted[base_type], files[quant], quant, uses)

        results = []
        for quant in config.quants:
            step(f"loading {quant} in llama.cpp and comparing with the HF model")
            check = check_gguf(files[quant], reference)
            converted_s = convert_s[quant if quant in convert_s else base_type]
            results.append(
                {
                    "quant": quant,
                    "file": f"{name}-{quant}.gguf",
                    "size_bytes": files[quant].stat().st_size,
                    "convert_s": round(converted_s, 2),
                    "quantize_s": round(quantize_s.get(quant, 0.0), 2),
                    "export_s": round(converted_s + quantize_s.get(quant, 0.0), 2),
                    "imatrix": quant in IMATRIX_TYPES,
                    **check,
                }
            )
            log.info("%s: agreement %.4f, %d bytes", quant, check["agreement"], results[-1]["size_bytes"])

        lora = _lora_files(model, config, staging, reference, ctx.stop, step, imatrix) if config.lora_gguf else None

        step("writing the Modelfile and report.json")
        modelfile, modelfile_info = build_modelfile(
            f"{name}-{config.quants[0]}.gguf", chat, merged, config.temperature, config.top_p, config.num_ctx
        )
        staging.file("Modelfile").write_text(modelfile, encoding="utf-8")
        if lora is not None:
            text, lora["modelfile"] = build_modelfile(
                lora["base_file"], chat, merged, config.temperature, config.top_p, config.num_ctx, lora["file"]
            )
            staging.file("Modelfile.lora").write_text(text, encoding="utf-8")
        report = {
            "run": name,
            "created": runfolder.now(),
            "source": "adapter" if adapter else "full fine-tune",
            "merged_dir": str(merged),
            "merged_reused": reused,
            "merged_dtype": model_dtype(merged),
            "llama_cpp_python": llama_cpp_version(),
            "reference": "the Hugging Face model in merged/, computed in float32 (in 16 bits on a GPU too small)",
            "reference_cached": reference_cached,
            "check": {
                "method": "top-1 agreement under teacher forcing: at every position both models score the same "
                "prefix (prompt + the HF model's greedy continuation so far)",
                "prompts": config.check_prompts,
                "tokens_per_prompt": config.check_tokens,
            },
            "hf_sample": reference.sample,
            "times_s": {
                "merge": round(merge_s, 2),
                "convert": {key: round(value, 2) for key, value in convert_s.items()},
                "reference": round(reference_s, 2),
                **({"imatrix": round(imatrix_s, 2)} if needs_imatrix else {}),
                "total": round(time.monotonic() - started, 2),
            },
            "files": results,
            "modelfile": modelfile_info,
        }
        if lora is not None:
            report["lora"] = lora
        staging.file("report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        staging.commit(last="report.json")
    except Stopped:
        log.info("export stopped; nothing was kept")
        return "stopped"
    finally:
        staging.discard()
    ctx.reporter.progress(total, total, "done")
    return "done"


def _lora_files(
    model: TrainedModel,
    config: ExportConfig,
    staging: _Staging,
    reference: Reference,
    stop: StopFlag,
    step,
    imatrix: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The adapter as a LoRA GGUF and the base model's GGUF in the first quant type, then both loaded together in
    llama.cpp and scored against the HF reference (the merged model) like the merged files: what report.json says
    about them."""
    base_dir, base_quant = Path(model.base_model), config.quants[0]
    outtype = "bf16" if model_dtype(base_dir) == "bfloat16" else "f16"
    adapter_name = f"{model.run_dir.name}-lora-{outtype}.gguf"
    base_name = f"{base_dir.name}-{base_quant}.gguf"
    step("converting the adapter with llama.cpp's convert_lora_to_gguf.py, and the base model")
    adapter_file = staging.file(adapter_name)
    quantized = base_quant not in FLOAT_TYPES
    base_source = staging.scratch(f"base-{outtype}") if quantized else staging.file(base_name)
    # Both converters at once: each waits on its own file most of the time.
    adapter_conversion = start_lora_conversion(model.path, base_dir, adapter_file, outtype)
    base_conversion = start_conversion(base_dir, base_source, outtype if quantized else base_quant)
    adapter_s = finish_conversion(adapter_conversion, stop)
    base_s = finish_conversion(base_conversion, stop)
    base_file, quantize_s = base_source, 0.0
    if quantized:
        step(f"quantizing the base model to {base_quant}")
        base_file = staging.file(base_name)
        # The merged model's importance matrix: the base model's tensors have the same names and widths.
        quantize_s = quantize_gguf(base_source, base_file, base_quant, imatrix if base_quant in IMATRIX_TYPES else None)
    step(f"loading the base model ({base_quant}) + the LoRA GGUF in llama.cpp and comparing with the HF model")
    check = check_gguf(base_file, reference, lora_path=adapter_file)
    log.info("LoRA GGUF: agreement %.4f, %d bytes", check["agreement"], adapter_file.stat().st_size)
    return {
        "file": adapter_name,
        "size_bytes": adapter_file.stat().st_size,
        "base_file": base_name,
        "base_quant": base_quant,
        "base_size_bytes": base_file.stat().st_size,
        "convert_s": round(adapter_s, 2),
        "base_export_s": round(base_s + quantize_s, 2),
        **check,
    }


def _convert(
    merged: Path, converted: dict[str, Path], config: ExportConfig, stop: StopFlag
) -> tuple[dict[str, float], tuple[Reference, dict[str, Any], bool], float]:
    """Convert merged/ to each of `converted`'s types (in order) while the HF reference is computed:
    (seconds per type, hf_side's answer, the reference's seconds). Both read merged/, neither needs the other."""
    outtypes = list(converted)
    first = start_conversion(merged, converted[outtypes[0]], outtypes[0])
    reference_started = time.monotonic()
    try:
        reference, reference_error = hf_side(merged, config.check_prompts, config.check_tokens), None
    except Exception as exc:  # reported after the converter's own verdict, which says more (e.g. unsupported)
        reference, reference_error = None, exc
    reference_s = time.monotonic() - reference_started
    convert_s = {outtypes[0]: finish_conversion(first, stop)}
    for outtype in outtypes[1:]:
        convert_s[outtype] = finish_conversion(start_conversion(merged, converted[outtype], outtype), stop)
    if reference_error is not None:
        raise reference_error
    return convert_s, reference, reference_s


class _Staging:
    """Files written under temporary names and renamed together at the end, so a killed export leaves nothing
    that looks finished. Temp names carry the pid, so a later export can tell a dead export's leftovers."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.pending, self.scratch_files = folder, {}, []

    def file(self, final_name: str) -> Path:
        tmp = self.folder / f".{final_name}.tmp-{os.getpid()}"
        self.pending[final_name] = tmp
        return tmp

    def scratch(self, label: str) -> Path:
        tmp = self.folder / f".intermediate-{label}.gguf.tmp-{os.getpid()}"
        self.scratch_files.append(tmp)
        return tmp

    def commit(self, last: str) -> None:
        for final_name in sorted(self.pending, key=lambda name: name == last):
            os.replace(self.pending[final_name], self.folder / final_name)
        self.pending = {}

    def discard(self) -> None:
        for tmp in [*self.pending.values(), *self.scratch_files]:
            tmp.unlink(missing_ok=True)


def remove_stale_temps(model: TrainedModel) -> None:
    """Leftovers of an export that was killed: temp GGUFs whose process is gone, half-made merged/ folders."""
    for tmp in gguf_dir(model).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            tmp.unlink(missing_ok=True)
    # Exports hold the workspace's GPU lock, so no other export is merging this run right now.
    for tmp in model.run_dir.glob(".merged.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
