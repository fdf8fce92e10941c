"""GGUF export: merge the LoRA adapter into 16-bit weights → llama.cpp's own converter → quantize → load each file
in llama.cpp, generate, and measure its agreement with the Hugging Face model → Ollama Modelfile.
`export` reads top to bottom; it runs as a job (`python main.py export RUN --quant q4_k_m,q8_0`)."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataset_utils import ChatTurns, chat_turns
from workspace import UserError, atomic_dir, config_from_dict, load_yaml, read_json, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
CONVERTER = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
# llama.cpp file types (llama_ftype) by the names users know from llama-quantize and Ollama.
QUANT_FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
FLOAT_TYPES = ("f16", "bf16")  # written by the converter itself; the others are quantized from one of these
# Bits per weight, rounded up: small models get bigger files because llama.cpp falls back to wider types for
# rows that do not fit a k-quant's 256-wide blocks and keeps the output layer at 6-8 bits.
BITS_PER_WEIGHT = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 8.5, "q5_k_m": 7.0, "q4_k_m": 6.5, "q4_0": 6.0}
MERGE_DTYPES = ("auto", "float16", "bfloat16")
MERGE_STAMP = "merge_source.json"  # in merged/: which adapter file it was made from, so a retrained run re-merges
MIN_CHECK_PROMPTS = 10  # fewer prompts make the agreement figure too noisy to compare quant types with
# A fixed, varied prompt set, so agreement figures of different exports compare.
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "What is 17 multiplied by 23?",
    "Give me a tip for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What should I pack for a weekend hiking trip?",
    "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a coffee shop.",
    "What are the primary colors?",
    "How many days are there in a leap year?",
)


@dataclass
class ExportConfig:
    """What to export from a finished training run, and how to check the result."""

    run: str = ""  # the training run (name or folder)
    quants: list[str] = field(default_factory=lambda: ["q8_0"])  # also accepts "q4_k_m,q8_0"
    check_prompts: int = len(CHECK_PROMPTS)  # prompts scored against the HF model: all 16 (512 tokens) by default
    check_tokens: int = 32  # tokens scored per prompt
    merge_dtype: str = "auto"  # 16-bit type of merged/: auto = the base model's if 16-bit, else float16
    temperature: float = 0.7  # Modelfile PARAMETERs
    top_p: float = 0.9
    num_ctx: int = 4096  # capped at the model's own context length

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
        if not MIN_CHECK_PROMPTS <= self.check_prompts <= len(CHECK_PROMPTS):
            raise UserError(
                f"check_prompts must be {MIN_CHECK_PROMPTS} to {len(CHECK_PROMPTS)} (got {self.check_prompts})."
            )
        if not 1 <= self.check_tokens <= 512:
            raise UserError(f"check_tokens must be 1 to 512 (got {self.check_tokens}).")
        if self.merge_dtype not in MERGE_DTYPES:
            raise UserError(f"merge_dtype must be one of: {', '.join(MERGE_DTYPES)} (got {self.merge_dtype!r}).")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1 or self.num_ctx < 1:
            raise UserError("temperature must be 0 to 2, top_p above 0 and at most 1, num_ctx 1 or more.")


def export_config_from_dict(data: dict[str, Any]) -> ExportConfig:
    return config_from_dict(ExportConfig, data, "export config")


def export_run_name(run: str) -> str:
    """The export job's own run-folder name (jobs adds -2, -3 … when it exists)."""
    return f"export-{Path(str(run)).name}"[:80]


# ---------------------------------------------------------------- what to export, and whether it fits


@dataclass
class ExportSource:
    """A training run's trained model: a LoRA adapter on a base model, or a full fine-tune already in merged/."""

    run_dir: Path
    adapter_dir: Path | None
    base_model: str | None  # folder of the adapter's base model
    trust_remote_code: bool

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.run_dir / "gguf"


def find_source(run: str | Path, workspace: str | Path | None = None) -> ExportSource:
    """The trained model of a finished training run; UserError when the run has none."""
    import jobs
    import model_utils

    run_dir = jobs.run_path(run, workspace)
    kind = jobs.read_config(run_dir).get("kind")
    if kind != "train":
        raise UserError(f"'{run_dir.name}' is a {kind} run; export takes a training run.")
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").exists():
        train_config = load_yaml(adapter / "train_config.yaml") if (adapter / "train_config.yaml").exists() else {}
        model = train_config.get("model") or {}
        name = model.get("name_or_path") or read_json(adapter / "adapter_config.json", {}).get(
            "base_model_name_or_path"
        )
        if not name:
            raise UserError(f"The adapter of run '{run_dir.name}' does not say which base model it belongs to.")
        base = model_utils.resolve_model_path(name, run_dir.parent.parent)
        return ExportSource(run_dir, adapter, base, bool(model.get("trust_remote_code", False)))
    if (run_dir / "merged" / "config.json").exists():
        return ExportSource(run_dir, None, None, False)
    raise UserError(
        f"Run '{run_dir.name}' has no trained model to export (no adapter/ or merged/ folder): it is still training or "
        "stopped before the end. Resume it until it finishes, then export."
    )


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


def needed_disk_bytes(source: ExportSource, config: ExportConfig) -> dict[str, int]:
    """Estimated bytes each part of the export writes: merged/ (when it must be made), the GGUF files, the
    16-bit GGUF that quantization starts from when it is not one of the outputs."""
    params = count_parameters(source.base_model if source.adapter_dir else source.merged_dir)
    if params == 0:
        raise UserError(f"No .safetensors weights found for run '{source.run_dir.name}'; cannot export it.")
    needed = {}
    if source.adapter_dir is not None and not _merged_is_current(source, _merge_dtype(source, config)):
        needed["merged"] = params * 2
    for quant in config.quants:
        needed[quant] = int(params * BITS_PER_WEIGHT[quant] / 8) + 32 * 2**20  # + vocabulary and metadata
    dtype = _merge_dtype(source, config) if source.adapter_dir else _model_dtype(source.merged_dir)
    for outtype in conversions(config.quants, dtype)[0]:
        if outtype not in config.quants:
            needed[f"{outtype} intermediate"] = params * 2
    return needed


def conversions(quants: list[str], model_dtype: str | None) -> tuple[list[str], str]:
    """(the converter's output types, the one quantization starts from): each 16-bit type asked for, plus the
    quantizer's source (bf16 for a bfloat16 model, else f16) when quantized types are asked for."""
    outtypes = [quant for quant in quants if quant in FLOAT_TYPES]
    base = "bf16" if model_dtype == "bfloat16" else "f16"
    if any(quant not in FLOAT_TYPES for quant in quants) and base not in outtypes:
        outtypes.append(base)
    return outtypes, base


def check_disk_space(source: ExportSource, config: ExportConfig) -> None:
    """UserError before anything is written when the export would not fit on the disk."""
    needed = needed_disk_bytes(source, config)
    free = free_disk_bytes(source.run_dir)
    if sum(needed.values()) > free:
        parts = ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in needed.items())
        raise UserError(
            f"Not enough disk space for this export: it needs about {sum(needed.values()) / 1e9:.2f} GB ({parts}) "
            f"in {source.run_dir}, and {free / 1e9:.2f} GB are free. Free some space or export fewer quant types."
        )


def check_export(config: ExportConfig, workspace: str | Path | None = None) -> ExportSource:
    """Everything that can be refused before a job starts: options, the run's model, disk space, the converter."""
    config.validate()
    source = find_source(config.run, workspace)
    check_disk_space(source, config)
    if not CONVERTER.exists():
        raise UserError(
            f"llama.cpp's converter is missing ({CONVERTER.relative_to(ROOT)}). Run `make setup`: it unpacks it from "
            "the llama-cpp-python source package."
        )
    return source


# ---------------------------------------------------------------- the export job


class _Stopped(Exception):
    """The job was asked to stop (SIGTERM)."""


def export(config: ExportConfig, job_dir: Path) -> str:
    """Run an export job: files go to the training run's gguf/ folder; returns "done" or "stopped"."""
    from jobs import StopRequested

    job_dir = Path(job_dir)
    started = time.monotonic()
    source = check_export(config, job_dir.parent.parent)
    out = source.gguf_dir
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(source)
    name = source.run_dir.name
    to_quantize = [quant for quant in config.quants if quant not in FLOAT_TYPES]
    progress = _Progress(job_dir, 3 + len(to_quantize) + len(config.quants))
    staging = _Staging(out)

    def step(message: str) -> None:
        if StopRequested.requested:
            raise _Stopped
        progress(message)

    try:
        step("merging the adapter into 16-bit weights" if source.adapter_dir else "using the full fine-tune's weights")
        merge_started = time.monotonic()
        merged, reused = ensure_merged(source, config)
        merge_s = time.monotonic() - merge_started

        step("converting with llama.cpp's convert_hf_to_gguf.py")
        outtypes, base_type = conversions(config.quants, _model_dtype(merged))
        converted = {
            outtype: staging.file(f"{name}-{outtype}.gguf") if outtype in config.quants else staging.scratch(outtype)
            for outtype in outtypes
        }
        convert_s = {}
        # The HF reference is computed while the converter runs: both read merged/, neither needs the other.
        first = start_conversion(merged, converted[outtypes[0]], outtypes[0])
        reference_started = time.monotonic()
        try:
            (reference, chat, reference_cached), reference_error = hf_side(merged, config), None
        except Exception as exc:  # reported after the converter's own verdict, which says more (e.g. unsupported)
            reference_error = exc
        reference_s = time.monotonic() - reference_started
        convert_s[outtypes[0]] = finish_conversion(first)
        for outtype in outtypes[1:]:
            convert_s[outtype] = finish_conversion(start_conversion(merged, converted[outtype], outtype))
        if reference_error is not None:
            raise reference_error

        files = {quant: converted[quant] for quant in config.quants if quant in FLOAT_TYPES}
        quantize_s = {}
        for quant in to_quantize:
            step(f"quantizing to {quant}")
            files[quant] = staging.file(f"{name}-{quant}.gguf")
            quantize_s[quant] = quantize_gguf(converted[base_type], files[quant], quant)

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
                    **check,
                }
            )
            log.info("%s: agreement %.4f, %d bytes", quant, check["agreement"], results[-1]["size_bytes"])

        step("writing the Modelfile and report.json")
        modelfile, modelfile_info = build_modelfile(f"{name}-{config.quants[0]}.gguf", chat, config, merged)
        staging.file("Modelfile").write_text(modelfile, encoding="utf-8")
        report = {
            "run": name,
            "created": _now(),
            "source": "adapter" if source.adapter_dir else "full fine-tune",
            "merged_dir": str(merged),
            "merged_reused": reused,
            "merged_dtype": _model_dtype(merged),
            "llama_cpp_python": _llama_cpp_version(),
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
                "total": round(time.monotonic() - started, 2),
            },
            "files": results,
            "modelfile": modelfile_info,
        }
        staging.file("report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        staging.commit(last="report.json")
    except _Stopped:
        log.info("export stopped; nothing was kept")
        return "stopped"
    finally:
        staging.discard()
    progress("done", finished=True)
    return "done"


class _Progress:
    """Progress events: step = steps finished, so the bar fills as each one ends."""

    def __init__(self, job_dir: Path, total: int) -> None:
        self.job_dir, self.total, self.done = job_dir, total, 0

    def __call__(self, message: str, finished: bool = False) -> None:
        from jobs import append_event

        step = self.total if finished else self.done
        append_event(self.job_dir, {"event": "progress", "step": step, "max_steps": self.total, "message": message})
        log.info("[%d/%d] %s", step, self.total, message)
        self.done += 1


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


def _remove_stale_temps(source: ExportSource) -> None:
    """Leftovers of an export that was killed: temp GGUFs whose process is gone, half-made merged/ folders."""
    for tmp in source.gguf_dir.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            tmp.unlink(missing_ok=True)
    # Exports hold the workspace's GPU lock, so no other export is merging this run right now.
    for tmp in source.run_dir.glob(".merged.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _now() -> str:
    from jobs import now

    return now()


def _llama_cpp_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama-cpp-python")


# ---------------------------------------------------------------- merge


def _merge_dtype(source: ExportSource, config: ExportConfig) -> str:
    if config.merge_dtype != "auto":
        return config.merge_dtype
    base = _model_dtype(Path(source.base_model)) if source.base_model else None
    # float16 for float32 bases: its 10-bit mantissa keeps the merged weights closer than bfloat16's 7 bits.
    return base if base in ("float16", "bfloat16") else "float16"


def _model_dtype(model_dir: Path) -> str | None:
    config = read_json(Path(model_dir) / "config.json", {}) or {}
    return config.get("dtype") or config.get("torch_dtype")


def _merge_stamp(source: ExportSource, dtype: str) -> dict[str, Any]:
    weights = next(iter(sorted(source.adapter_dir.glob("adapter_model.*"))), source.adapter_dir / "adapter_config.json")
    stat = weights.stat()
    return {"adapter": weights.name, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "dtype": dtype}


def _merged_is_current(source: ExportSource, dtype: str) -> bool:
    merged = source.merged_dir
    return (merged / "config.json").exists() and read_json(merged / MERGE_STAMP) == _merge_stamp(source, dtype)


def ensure_merged(source: ExportSource, config: ExportConfig) -> tuple[Path, bool]:
    """merged/ with the adapter merged into 16-bit weights, reused when made from the same adapter;
    returns (folder, reused). A full fine-tune's merged/ is used as it is."""
    if source.adapter_dir is None:
        return source.merged_dir, True
    dtype = _merge_dtype(source, config)
    if _merged_is_current(source, dtype):
        log.info("reusing %s", source.merged_dir)
        return source.merged_dir, True
    merge_adapter(source, dtype)
    return source.merged_dir, False


def merge_adapter(source: ExportSource, dtype: str) -> Path:
    """Merge the LoRA adapter into its base model and save it in `dtype` to merged/ (atomically)."""
    import torch
    from peft import PeftModel

    import model_utils

    log.info("merging %s into %s (%s)", source.adapter_dir, source.base_model, dtype)
    base = model_utils.load_model(source.base_model, trust_remote_code=source.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(source.adapter_dir)).merge_and_unload()
    merged = merged.to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    merged.config.dtype = dtype
    with atomic_dir(source.merged_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _load_tokenizer(source.adapter_dir).save_pretrained(str(tmp))
        write_json(tmp / MERGE_STAMP, _merge_stamp(source, dtype))
    return source.merged_dir


def _load_tokenizer(folder: Path):
    import model_utils

    return model_utils.load_tokenizer(str(folder))


# ---------------------------------------------------------------- convert and quantize


@dataclass
class _Conversion:
    process: subprocess.Popen
    output: Any  # the converter's stdout+stderr, a temp file (a pipe would fill up while we compute the reference)
    outfile: Path
    started: float
    ended: float = 0.0
    waiter: threading.Thread | None = None  # notes when the converter ends, while this thread does other work


def start_conversion(model_dir: Path, outfile: Path, outtype: str) -> _Conversion:
    """Start llama.cpp's convert_hf_to_gguf.py on a HF folder (in the background)."""
    if not CONVERTER.exists():
        raise UserError(f"llama.cpp's converter is missing ({CONVERTER}). Run `make setup`.")
    output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    command = [sys.executable, str(CONVERTER), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    log.info("running %s", " ".join(command))
    process = subprocess.Popen(
        command,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(os.getpid()),
    )
    conversion = _Conversion(process, output, outfile, time.monotonic())

    def note_end() -> None:
        conversion.process.wait()
        conversion.ended = time.monotonic()

    conversion.waiter = threading.Thread(target=note_end, daemon=True)
    conversion.waiter.start()
    return conversion


def finish_conversion(conversion: _Conversion) -> float:
    """Wait for the converter; its own message becomes a UserError when it fails. Returns the seconds it ran."""
    from jobs import StopRequested

    conversion.waiter.join()
    returncode = conversion.process.returncode
    seconds = conversion.ended - conversion.started
    conversion.output.seek(0)
    text = conversion.output.read()
    conversion.output.close()
    if StopRequested.requested:
        raise _Stopped
    if returncode != 0:
        log.info("converter output:\n%s", text[-20000:])
        raise UserError(f"llama.cpp's converter could not convert this model: {converter_message(text)}")
    if not conversion.outfile.exists():
        raise UserError(f"llama.cpp's converter finished but wrote no file; its output:\n{text[-1000:]}")
    log.info("converted to %s in %.1f s", conversion.outfile.name, seconds)
    return seconds


def converter_message(output: str) -> str:
    """The converter's own explanation: its ERROR lines, else the last line of its traceback."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.split(":", 2)[-1].strip() for line in lines if line.startswith("ERROR:")]
    if errors:
        return " ".join(errors)
    return lines[-1] if lines else "it ended without a message"


def _die_with_parent(parent: int):
    """A preexec_fn: the converter is killed when this job dies (even by kill -9), so it cannot finish a file later."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def quantize_gguf(source: Path, target: Path, quant: str) -> float:
    """Quantize a 16-bit GGUF with llama.cpp (llama_model_quantize); returns the seconds it took."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    started = time.monotonic()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.exists():
        raise UserError(
            f"llama.cpp could not quantize the model to {quant} (code {code}); its messages are in log.txt."
        )
    seconds = time.monotonic() - started
    log.info("quantized to %s in %.1f s", quant, seconds)
    return seconds


# ---------------------------------------------------------------- checking a file against the HF model


@dataclass
class Reference:
    """The HF model's greedy continuations of the check prompts: at each position, its top-1 token."""

    prompts: list[str]  # rendered with the chat template
    prompt_ids: list[list[int]]
    continuation: list[list[int]]  # check_tokens greedy tokens each
    sample: str  # its reply to the first prompt


REFERENCE_CACHE = ".export_reference.json"  # in merged/: the HF side of the check, reused while merged/ is unchanged


def hf_side(model_dir: Path, config: ExportConfig) -> tuple[Reference, dict[str, Any], bool]:
    """(the HF model's reference predictions, the chat format for the Modelfile, whether they came from the cache).

    Both depend only on merged/ and the check settings, so exporting another quant type of the same model later
    reuses them instead of loading the HF model again.
    """
    key = {
        "files": [
            [path.name, path.stat().st_size, path.stat().st_mtime_ns]
            for path in sorted(Path(model_dir).iterdir())
            if path.is_file() and path.name != REFERENCE_CACHE
        ],
        "prompts": list(CHECK_PROMPTS[: config.check_prompts]),
        "tokens": config.check_tokens,
    }
    cached = read_json(Path(model_dir) / REFERENCE_CACHE)
    if cached and cached.get("key") == key:
        return Reference(**cached["reference"]), cached["chat_format"], True
    tokenizer = _load_tokenizer(model_dir)
    reference = reference_predictions(model_dir, config, tokenizer)
    chat = chat_format(tokenizer)
    try:
        write_json(Path(model_dir) / REFERENCE_CACHE, {"key": key, "reference": asdict(reference), "chat_format": chat})
    except OSError as exc:  # a read-only merged/ only costs the next export this step again
        log.info("could not cache the reference: %s", exc)
    return reference, chat, False


def reference_predictions(model_dir: Path, config: ExportConfig, tokenizer) -> Reference:
    """Greedy continuations of the check prompts by the HF model (one batch, with a KV cache).

    Generation runs on past the end of the reply (the model then writes the next turn's markers): every prompt gets
    check_tokens real top-1 tokens. Suppressing the end token instead would force text the model does not predict,
    and score positions where every candidate is equally unlikely.
    """
    import torch

    import model_utils

    model = model_utils.load_model(str(model_dir), dtype=_reference_dtype(model_dir))
    chats = [[{"role": "user", "content": text}] for text in CHECK_PROMPTS[: config.check_prompts]]
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Left padding keeps every prompt's last token in the same column, so one forward pass serves all prompts.
    tokens = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generated, cache = [], None
    threads = torch.get_num_threads()
    # llama.cpp's converter runs beside this on one core; more threads here only make both wait on each other.
    torch.set_num_threads(max(1, threads - 1))
    try:
        with torch.inference_mode():
            for _ in range(config.check_tokens):
                out = model(
                    input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(tokens)
                cache = out.past_key_values
                mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        torch.set_num_threads(threads)
    continuation = torch.cat(generated, dim=1).tolist()
    first = continuation[0]
    stop = first.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in first else len(first)
    sample = tokenizer.decode(first[:stop], skip_special_tokens=True)
    del model
    return Reference(prompts, prompt_ids, continuation, sample)


def _reference_dtype(model_dir: Path) -> str:
    """float32, so that the reference adds no rounding of its own, unless that would not fit the GPU (a 8B model
    needs 32 GiB in float32): then the model's own 16-bit type."""
    import torch

    if not torch.cuda.is_available():
        return "float32"
    weights = sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))  # 16-bit on disk
    free, _ = torch.cuda.mem_get_info()
    return "float32" if 2 * weights < 0.8 * free else "auto"


def llama_threads() -> int:
    """Threads for llama.cpp: every core this process may use while the machine is otherwise idle, else one fewer.

    llama.cpp's threads spin-wait for each other at every layer, so one descheduled thread stalls them all: on this
    project's shared 2-core machine, 2 threads evaluated 7-60x slower than 1 while other jobs ran, but 1.8x faster
    than 1 on the idle machine. The load average counts this job itself as about 1."""
    cores = len(os.sched_getaffinity(0))
    return cores if os.getloadavg()[0] < cores - 0.5 else max(1, cores - 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_gguf(path: Path, reference: Reference) -> dict[str, Any]:
    """Load a GGUF in llama.cpp, generate, and score the reference prefixes: top-1 agreement with the HF model,
    whether llama.cpp tokenizes the prompts the same way, and a sample reply."""
    import llama_cpp
    import numpy as np

    started = time.monotonic()
    longest = max(len(ids) + len(cont) for ids, cont in zip(reference.prompt_ids, reference.continuation, strict=True))
    try:
        threads = llama_threads()
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=longest + 16,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1,
            verbose=False,
        )
    except ValueError as exc:
        raise UserError(
            f"llama.cpp could not load the converted file {path.name} ({exc}); the model's architecture or tokenizer "
            f"may not be supported by llama-cpp-python {_llama_cpp_version()}."
        ) from None
    load_s = time.monotonic() - started
    per_prompt, matches, same_tokens, previous = [], 0, 0, []
    # The prompts open alike (the template's system turn): keep that prefix's KV cache instead of recomputing it,
    # except in recurrent models, whose state cannot be cut back.
    reuse = not (getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False))
    for text, ids, cont in zip(reference.prompts, reference.prompt_ids, reference.continuation, strict=True):
        same_tokens += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        sequence = ids + cont[:-1]
        shared = min(_common_prefix(previous, sequence), len(ids) - 1) if reuse else 0
        if shared:
            llm.n_tokens = shared  # eval() drops the cache after this position
        else:
            llm.reset()
        llm.eval(sequence[shared:])
        previous = sequence
        scores = llm.scores[len(ids) - 1 : len(ids) - 1 + len(cont)]
        gguf_top1 = np.argmax(scores, axis=-1).tolist()
        agree = sum(a == b for a, b in zip(gguf_top1, cont, strict=True))
        per_prompt.append(round(agree / len(cont), 4))
        matches += agree
    reply = llm.create_completion(reference.prompt_ids[0], max_tokens=len(reference.continuation[0]), temperature=0.0)
    total = sum(len(cont) for cont in reference.continuation)
    # llama.cpp's tokenizer type and pre-tokenizer: gpt2/smollm for the demo model (DESIGN.md §4).
    vocab = f"{llm.metadata.get('tokenizer.ggml.model')}/{llm.metadata.get('tokenizer.ggml.pre')}"
    llm.close()
    return {
        "agreement": round(matches / total, 4),
        "agreement_per_prompt": per_prompt,
        "scored_tokens": total,
        "tokenizer_match": round(same_tokens / len(reference.prompts), 4),
        "vocab": vocab,
        "sample": reply["choices"][0]["text"],
        "load_s": round(load_s, 2),
        "check_s": round(time.monotonic() - started, 2),
    }


# ---------------------------------------------------------------- Ollama Modelfile


def hf_chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt as the tokenizer's chat template renders it where Ollama would use the TEMPLATE: with a generation
    prompt after a user turn."""
    return _render_plain(tokenizer, messages, generation=messages[-1]["role"] != "assistant")


def _render_plain(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tokenizer.bos_token
    # A tokenizer that adds BOS itself converts to a GGUF that does too, so the template must not write it again.
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def go_template(turns: ChatTurns) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) that renders like the chat template."""
    pieces = [turns.default_system, *turns.system, *turns.user, *turns.assistant, turns.generation]
    if any("{{" in piece or '"""' in piece for piece in pieces):
        raise ValueError("chat template text contains '{{' or '\"\"\"'")
    default = f'{{{{ if and (eq $i 0) (ne .Role "system") }}}}{turns.default_system}{{{{ end }}}}'
    return (
        "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + (default if turns.default_system else "")
        + f'{{{{ if eq .Role "system" }}}}{turns.system[0]}{{{{ .Content }}}}{turns.system[1]}'
        + f'{{{{ else if eq .Role "user" }}}}{turns.user[0]}{{{{ .Content }}}}{turns.user[1]}'
        + f"{{{{ if $last }}}}{turns.generation}{{{{ end }}}}"
        + f'{{{{ else if eq .Role "assistant" }}}}{turns.assistant[0]}{{{{ .Content }}}}'
        + f"{{{{ if not $last }}}}{turns.assistant[1]}{{{{ end }}}}"
        + "{{ end }}{{ end }}"
    )


_TEST_CHATS = (
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ],
)


def chat_format(tokenizer) -> dict[str, Any]:
    """What the Modelfile needs from the tokenizer: an Ollama TEMPLATE that renders exactly like the chat template
    (checked on sample chats; None when the template has no per-role shape) and the stop tokens."""
    turns = chat_turns(tokenizer, _render_plain) if getattr(tokenizer, "chat_template", None) else None
    template = None
    if turns is not None:
        try:
            template = go_template(turns)
            if any(render_go_template(template, chat) != hf_chat_prompt(tokenizer, chat) for chat in _TEST_CHATS):
                template = None
        except ValueError as exc:
            log.info("no Ollama template: %s", exc)
            template = None
    if template is None:
        log.warning("The chat template could not be written as an Ollama TEMPLATE; Ollama will use its own guess.")
    # Stop at the special tokens that end a reply or start the next turn, and at EOS.
    stops: list[str] = []
    for piece in ([turns.assistant[1], turns.user[0]] if template else []) + [tokenizer.eos_token or ""]:
        found = sorted((piece.find(token), token) for token in tokenizer.all_special_tokens if token and token in piece)
        stops += [token for _, token in found if token not in stops]
    return {"template": template, "stops": stops}


def build_modelfile(gguf_name: str, chat: dict[str, Any], config: ExportConfig, model_dir: Path) -> tuple[str, dict]:
    """An Ollama Modelfile for `gguf_name` (FROM, TEMPLATE, stop tokens, PARAMETERs) and what it holds."""
    max_length = int((read_json(model_dir / "config.json", {}) or {}).get("max_position_embeddings") or config.num_ctx)
    lines = [
        "# Ollama Modelfile written by LLM Finetuner. Create the model in this folder with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if chat["template"]:
        lines.append(f'TEMPLATE """{chat["template"]}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in chat["stops"]]
    lines += [
        f"PARAMETER temperature {config.temperature}",
        f"PARAMETER top_p {config.top_p}",
        f"PARAMETER num_ctx {min(config.num_ctx, max_length)}",
    ]
    info = {"file": "Modelfile", "from": gguf_name, "template": bool(chat["template"]), "stop": chat["stops"]}
    return "\n".join(lines) + "\n", info


# ---------------------------------------------------------------- a renderer for the Go template subset above

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|[^\s()]+')


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render an Ollama TEMPLATE the way Ollama does, for the subset of Go text/template that go_template writes
    (range, if / else if / else, :=, =, eq, ne, and, or, not, len, slice, index), over .Messages."""
    data = {"Messages": [{"Role": msg["role"], "Content": msg["content"]} for msg in messages]}
    nodes, position, stopper = _parse_nodes(_template_items(template), 0)
    if stopper is not None:
        raise ValueError(f"unexpected {{{{ {stopper} }}}}")
    out: list[str] = []
    _run_nodes(nodes, data, [{"$": data}], out)
    return "".join(out)


def _template_items(template: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        position, trim_next = match.end(), bool(match.group(3))
    tail = template[position:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    return items


def _parse_nodes(items: list[tuple[str, str]], position: int) -> tuple[list, int, str | None]:
    """Nodes until an {{ end }} / {{ else … }} (returned as the stopper) or the end of the template."""
    nodes: list = []
    while position < len(items):
        kind, body = items[position]
        position += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body == "else" or body.startswith("else "):
            return nodes, position, body
        elif body.startswith("if "):
            branches, otherwise, condition = [], [], body[3:]
            while True:
                block, position, stopper = _parse_nodes(items, position)
                branches.append((condition, block))
                if stopper and stopper.startswith("else if "):
                    condition = stopper[8:]
                    continue
                if stopper == "else":
                    otherwise, position, stopper = _parse_nodes(items, position)
                if stopper != "end":
                    raise ValueError("{{ if }} without {{ end }}")
                break
            nodes.append(("if", branches, otherwise))
        elif body.startswith("range "):
            head = body[6:]
            names, expression = (
                ([], head)
                if ":=" not in head
                else ([name.strip() for name in head.split(":=", 1)[0].split(",")], head.split(":=", 1)[1])
            )
            block, position, stopper = _parse_nodes(items, position)
            if stopper != "end":
                raise ValueError("{{ range }} without {{ end }}")
            nodes.append(("range", names, expression, block))
        elif re.match(r"^\$\w+\s*:?=", body):
            name, declare, expression = re.match(r"^(\$\w+)\s*(:?)=(.*)$", body, re.S).groups()
            nodes.append(("assign", name, bool(declare), expression))
        else:
            nodes.append(("output", body))
    return nodes, position, None


def _run_nodes(nodes: list, dot: Any, scopes: list[dict], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "output":
            value = _evaluate(node[1], dot, scopes)
            out.append("" if value is None else str(value))
        elif node[0] == "assign":
            _, name, declare, expression = node
            value = _evaluate(expression, dot, scopes)
            target = scopes[-1] if declare else next((s for s in reversed(scopes) if name in s), None)
            if target is None:
                raise ValueError(f"undefined variable {name}")
            target[name] = value
        elif node[0] == "if":
            _, branches, otherwise = node
            chosen = next((block for condition, block in branches if _evaluate(condition, dot, scopes)), otherwise)
            _run_nodes(chosen, dot, [*scopes, {}], out)
        elif node[0] == "range":
            _, names, expression, block = node
            for index, item in enumerate(_evaluate(expression, dot, scopes) or []):
                scope = dict(zip(names, (index, item)[2 - len(names) :], strict=True))
                _run_nodes(block, item, [*scopes, scope], out)


def _evaluate(expression: str, dot: Any, scopes: list[dict]) -> Any:
    tree, position = _parse_expression(_TOKEN.findall(expression), 0)
    return _call(tree, dot, scopes)


def _parse_expression(tokens: list[str], position: int) -> tuple[list, int]:
    items: list = []
    while position < len(tokens):
        token = tokens[position]
        position += 1
        if token == "(":
            inner, position = _parse_expression(tokens, position)
            items.append(inner)
        elif token == ")":
            return items, position
        else:
            items.append(token)
    return items, position


_FUNCTIONS = {
    "eq": lambda a, *rest: any(a == b for b in rest),
    "ne": lambda a, b: a != b,
    "and": lambda *args: next((a for a in args if not a), args[-1]),
    "or": lambda *args: next((a for a in args if a), args[-1]),
    "not": lambda a: not a,
    "len": len,
    "slice": lambda seq, start, *end: seq[start : end[0] if end else None],
    "index": lambda seq, *keys: _index(seq, keys),
}


def _index(value: Any, keys: tuple) -> Any:
    for key in keys:
        value = value[key]
    return value


def _call(tree: list, dot: Any, scopes: list[dict]) -> Any:
    if tree and isinstance(tree[0], str) and tree[0] in _FUNCTIONS:
        return _FUNCTIONS[tree[0]](*[_operand(arg, dot, scopes) for arg in tree[1:]])
    if len(tree) != 1:
        raise ValueError(f"unsupported template expression: {tree}")
    return _operand(tree[0], dot, scopes)


def _operand(token: Any, dot: Any, scopes: list[dict]) -> Any:
    if isinstance(token, list):
        return _call(token, dot, scopes)
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token == ".":
        return dot
    if token.startswith("."):
        value, path = dot, token[1:]
    elif token.startswith("$"):
        head, _, path = token.partition(".")
        scope = next((s for s in reversed(scopes) if head in s), None)
        if scope is None:
            raise ValueError(f"undefined variable {head}")
        value = scope[head]
    else:
        raise ValueError(f"unsupported template token {token!r}")
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name)
    return value
