"""The file-making steps of an export: merge a LoRA adapter into 16-bit weights (merged/), convert merged/ with
llama.cpp's own converter, quantize with llama.cpp."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import model_utils
from runfolder import StopFlag, TrainedModel
from workspace import UserError, atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CONVERTER = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
LORA_CONVERTER = CONVERTER.with_name("convert_lora_to_gguf.py")  # unpacked beside it by scripts/fetch_converter.py
# The converter's `--print-supported-models`, saved by scripts/fetch_converter.py (it takes seconds to start).
SUPPORTED_MODELS = CONVERTER.with_name("SUPPORTED_MODELS")
# llama.cpp file types (llama_ftype) by the names users know from llama-quantize and Ollama: every type the
# installed llama-cpp-python's quantizer writes (NVFP4 it refuses), largest first.
QUANT_FTYPES = {
    name: f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    for name in (
        "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_k_m", "q5_k_s", "q5_0", "q4_1", "q4_k_m", "q4_k_s", "q4_0",
        "iq4_nl", "iq4_xs", "mxfp4_moe", "q3_k_l", "q3_k_m", "iq3_m", "iq3_s", "q3_k_s", "iq3_xs", "iq3_xxs",
        "q2_k", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "q2_0", "tq2_0", "tq1_0", "iq1_m", "iq1_s", "q1_0",
    )
}  # fmt: skip
# Types llama.cpp's quantizer refuses without an importance matrix ("this quantization requires an imatrix").
IMATRIX_TYPES = ("iq3_xxs", "iq3_xs", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
FLOAT_TYPES = ("f16", "bf16")  # written by the converter itself; the others are quantized from one of these
MERGE_DTYPES = ("auto", "float16", "bfloat16")
MERGE_STAMP = "merge_source.json"  # in merged/: which adapter file it was made from, so a retrained run re-merges


class Stopped(Exception):
    """The job was asked to stop (SIGTERM)."""


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


# ---------------------------------------------------------------- which architectures convert


def parse_supported_models(text: str) -> frozenset[str]:
    """The text-model classes in the converter's `--print-supported-models` output (mmproj ones are vision parts)."""
    names, section = set(), ""
    for line in text.splitlines():
        if line.strip().endswith("models:"):
            section = line.strip()
        elif line.strip().startswith("- ") and section.startswith("TEXT"):
            names.add(line.strip()[2:].strip())
    return frozenset(names)


@functools.cache
def supported_architectures() -> frozenset[str]:
    """The Hugging Face model classes (config.json's `architectures`) llama.cpp's converter can convert."""
    if SUPPORTED_MODELS.is_file():
        return parse_supported_models(SUPPORTED_MODELS.read_text(encoding="utf-8"))
    if not CONVERTER.exists():
        return frozenset()
    result = subprocess.run(
        [sys.executable, str(CONVERTER), "--print-supported-models"], capture_output=True, text=True, check=False
    )
    return parse_supported_models(result.stdout + result.stderr)


def conversion_warning(architectures: list[str] | None) -> str | None:
    """Why a model of these architectures (config.json's `architectures`) cannot be exported to GGUF, or None.

    Training works all the same, so this is a warning shown before training, not a refusal."""
    supported = supported_architectures()
    if not supported:
        return "llama.cpp's converter is missing (run `make setup`), so no run can be exported to GGUF yet."
    names = [name for name in architectures or [] if name]
    if not names:
        return "its config.json names no architecture, so llama.cpp's converter cannot tell how to convert it."
    if any(name in supported for name in names):
        return None
    return (
        f"llama.cpp's converter (llama-cpp-python {llama_cpp_version()}) cannot convert {', '.join(names)}: you can "
        "train and chat with it here, but not export it to GGUF or Ollama."
    )


# ---------------------------------------------------------------- merge


def merged_dir(model: TrainedModel) -> Path:
    """The 16-bit model the converter reads: a full fine-tune's own folder, or the adapter merged into its base."""
    return model.run_dir / "merged"


def model_dtype(model_dir: Path) -> str | None:
    config = read_json(Path(model_dir) / "config.json", {}) or {}
    return config.get("dtype") or config.get("torch_dtype")


def merge_dtype(model: TrainedModel, requested: str) -> str:
    """The 16-bit type merged/ is saved in; `requested` is one of MERGE_DTYPES, "auto" follows the base model."""
    if requested != "auto":
        return requested
    base = model_dtype(Path(model.base_model)) if model.base_model else None
    # float16 for float32 bases: its 10-bit mantissa keeps the merged weights closer than bfloat16's 7 bits.
    return base if base in ("float16", "bfloat16") else "float16"


def _merge_stamp(adapter_dir: Path, dtype: str) -> dict[str, Any]:
    weights = next(iter(sorted(adapter_dir.glob("adapter_model.*"))), adapter_dir / "adapter_config.json")
    stat = weights.stat()
    return {"adapter": weights.name, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "dtype": dtype}


def merged_is_current(model: TrainedModel, dtype: str) -> bool:
    """Whether merged/ was made from this adapter file in `dtype` (always, for a full fine-tune)."""
    merged = merged_dir(model)
    if model.kind != "adapter":
        return True
    return (merged / "config.json").exists() and read_json(merged / MERGE_STAMP) == _merge_stamp(model.path, dtype)


def ensure_merged(model: TrainedModel, dtype: str) -> tuple[Path, bool]:
    """merged/ with the adapter merged into `dtype` weights, reused when made from the same adapter;
    returns (folder, reused). A full fine-tune's merged/ is used as it is."""
    if merged_is_current(model, dtype):
        log.info("reusing %s", merged_dir(model))
        return merged_dir(model), True
    merge_adapter(model, dtype)
    return merged_dir(model), False


def merge_adapter(model: TrainedModel, dtype: str) -> Path:
    """Merge the LoRA adapter into its base model and save it in `dtype` to merged/ (atomically)."""
    import torch
    from peft import PeftModel

    log.info("merging %s into %s (%s)", model.path, model.base_model, dtype)
    base = model_utils.load_model(model.base_model, trust_remote_code=model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(model.path)).merge_and_unload()
    merged = merged.to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    merged.config.dtype = dtype
    with atomic_dir(merged_dir(model)) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        model_utils.load_tokenizer(str(model.path)).save_pretrained(str(tmp))
        # A fast tokenizer does not save the SentencePiece model it came from, and llama.cpp's converter reads that
        # file, not tokenizer.json, for Llama-2-style, Mistral, Phi-3 and Gemma vocabularies.
        for source in (model.path, Path(model.base_model)):
            if (source / "tokenizer.model").is_file() and not (tmp / "tokenizer.model").exists():
                shutil.copy2(source / "tokenizer.model", tmp / "tokenizer.model")
        write_json(tmp / MERGE_STAMP, _merge_stamp(model.path, dtype))
    return merged_dir(model)


# ---------------------------------------------------------------- convert


def conversions(quants: list[str], dtype: str | None) -> tuple[list[str], str]:
    """(the converter's output types, the one quantization starts from) for a model in `dtype`: each 16-bit type
    asked for, plus the quantizer's source (bf16 for a bfloat16 model, else f16) when quantized types are asked for."""
    outtypes = [quant for quant in quants if quant in FLOAT_TYPES]
    base = "bf16" if dtype == "bfloat16" else "f16"
    if any(quant not in FLOAT_TYPES for quant in quants) and base not in outtypes:
        outtypes.append(base)
    return outtypes, base


@dataclass
class Conversion:
    """A running convert_hf_to_gguf.py."""

    process: subprocess.Popen
    output: Any  # the converter's stdout+stderr, a temp file (a pipe would fill up while we compute the reference)
    outfile: Path
    started: float
    ended: float = 0.0
    waiter: threading.Thread | None = None  # notes when the converter ends, while this thread does other work


def start_conversion(model_dir: Path, outfile: Path, outtype: str) -> Conversion:
    """Start llama.cpp's convert_hf_to_gguf.py on a HF folder (in the background)."""
    return _start([str(CONVERTER), str(model_dir), "--outfile", str(outfile), "--outtype", outtype], outfile)


def start_lora_conversion(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str) -> Conversion:
    """Start llama.cpp's convert_lora_to_gguf.py on a PEFT adapter folder (in the background): a GGUF holding only
    the LoRA matrices, which llama.cpp and Ollama (ADAPTER) apply on top of the base model's GGUF."""
    command = [str(LORA_CONVERTER), "--base", str(base_dir), "--outfile", str(outfile), "--outtype", outtype]
    return _start([*command, str(adapter_dir)], outfile)


def _start(arguments: list[str], outfile: Path) -> Conversion:
    if not Path(arguments[0]).exists():
        raise UserError(f"llama.cpp's converter is missing ({arguments[0]}). Run `make setup`.")
    output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    command = [sys.executable, *arguments]
    log.info("running %s", " ".join(command))
    process = subprocess.Popen(
        command,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(os.getpid()),
    )
    conversion = Conversion(process, output, outfile, time.monotonic())

    def note_end() -> None:
        conversion.process.wait()
        conversion.ended = time.monotonic()

    conversion.waiter = threading.Thread(target=note_end, daemon=True)
    conversion.waiter.start()
    return conversion


def finish_conversion(conversion: Conversion, stop: StopFlag) -> float:
    """Wait for the converter; its own message becomes a UserError when it fails. Returns the seconds it ran.

    Raises Stopped when the job was asked to stop meanwhile: the converter got the same SIGTERM, so its failure
    says nothing about the model."""
    conversion.waiter.join()
    returncode = conversion.process.returncode
    seconds = conversion.ended - conversion.started
    conversion.output.seek(0)
    text = conversion.output.read()
    conversion.output.close()
    if stop.requested:
        raise Stopped
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


# ---------------------------------------------------------------- quantize


def quantize_gguf(source: Path, target: Path, quant: str, imatrix: dict[str, Any] | None = None) -> float:
    """Quantize a 16-bit GGUF with llama.cpp (llama_model_quantize), with an importance matrix (imatrix) when given;
    returns the seconds it took."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    keep = None
    if imatrix:
        params.imatrix, keep = imatrix_array(imatrix)
    started = time.monotonic()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    del keep  # the quantizer has copied the matrix
    if code != 0 or not target.exists():
        need = " without an importance matrix" if quant in IMATRIX_TYPES and not imatrix else ""
        raise UserError(
            f"llama.cpp could not quantize the model to {quant}{need} (code {code}); its messages are in log.txt."
        )
    seconds = time.monotonic() - started
    log.info("quantized to %s in %.1f s%s", quant, seconds, " with an importance matrix" if imatrix else "")
    return seconds


def imatrix_array(imatrix: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The quantizer's null-terminated llama_model_imatrix_data array, and the buffers it points into (keep them
    alive until the quantizer returns)."""
    import llama_cpp

    keep: list[Any] = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for index, (name, values) in enumerate(sorted(imatrix.items())):
        buffer = (ctypes.c_float * len(values))(*values.tolist())
        label = name.encode()
        keep += [buffer, label]
        entries[index].name = label
        entries[index].data = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_float))
        entries[index].size = len(values)
    entries[len(imatrix)].name = None  # the terminator
    keep.append(entries)
    return entries, keep
