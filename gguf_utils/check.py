"""The agreement check of an export: the Hugging Face model's greedy continuations of fixed prompts (the reference),
and how often llama.cpp, loading a GGUF file, predicts the same next token on the same prefixes."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import model_utils
from gguf_utils.convert import llama_cpp_version
from gguf_utils.modelfile import chat_format
from workspace import UserError, read_json, write_json

log = logging.getLogger(__name__)

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
REFERENCE_CACHE = ".export_reference.json"  # in merged/: the HF side of the check, reused while merged/ is unchanged


@dataclass
class Reference:
    """The HF model's greedy continuations of the check prompts: at each position, its top-1 token."""

    prompts: list[str]  # rendered with the chat template
    prompt_ids: list[list[int]]
    continuation: list[list[int]]  # check_tokens greedy tokens each
    sample: str  # its reply to the first prompt


def hf_side(model_dir: Path, prompts: int, tokens: int) -> tuple[Reference, dict[str, Any], bool]:
    """(the HF model's reference predictions, the chat format for the Modelfile, whether they came from the cache),
    for the first `prompts` check prompts and `tokens` tokens each.

    Both depend only on merged/ and the check settings, so exporting another quant type of the same model later
    reuses them instead of loading the HF model again.
    """
    key = {
        "files": [
            [path.name, path.stat().st_size, path.stat().st_mtime_ns]
            for path in sorted(Path(model_dir).iterdir())
            if path.is_file() and path.name != REFERENCE_CACHE
        ],
        "prompts": list(CHECK_PROMPTS[:prompts]),
        "tokens": tokens,
    }
    cached = read_json(Path(model_dir) / REFERENCE_CACHE)
    if cached and cached.get("key") == key:
        return Reference(**cached["reference"]), cached["chat_format"], True
    tokenizer = model_utils.load_tokenizer(str(model_dir))
    reference = reference_predictions(model_dir, prompts, tokens, tokenizer)
    chat = chat_format(tokenizer)
    try:
        write_json(Path(model_dir) / REFERENCE_CACHE, {"key": key, "reference": asdict(reference), "chat_format": chat})
    except OSError as exc:  # a read-only merged/ only costs the next export this step again
        log.info("could not cache the reference: %s", exc)
    return reference, chat, False


def reference_predictions(model_dir: Path, prompts: int, tokens: int, tokenizer) -> Reference:
    """Greedy continuations of the first `prompts` check prompts by the HF model, `tokens` each (one batch, with a
    KV cache).

    Generation runs on past the end of the reply (the model then writes the next turn's markers): every prompt gets
    `tokens` real top-1 tokens. Suppressing the end token instead would force text the model does not predict,
    and score positions where every candidate is equally unlikely.
    """
    import torch

    model = model_utils.load_model(str(model_dir), dtype=_reference_dtype(model_dir))
    chats = [[{"role": "user", "content": text}] for text in CHECK_PROMPTS[:prompts]]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Left padding keeps every prompt's last token in the same column, so one forward pass serves all prompts.
    batch = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generated, cache = [], None
    threads = torch.get_num_threads()
    # llama.cpp's converter runs beside this on one core; more threads here only make both wait on each other.
    torch.set_num_threads(max(1, threads - 1))
    try:
        with torch.inference_mode():
            for _ in range(tokens):
                out = model(
                    input_ids=batch, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                batch = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(batch)
                cache = out.past_key_values
                mask = torch.cat([mask, torch.ones_like(batch)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        torch.set_num_threads(threads)
    continuation = torch.cat(generated, dim=1).tolist()
    first = continuation[0]
    stop = first.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in first else len(first)
    sample = tokenizer.decode(first[:stop], skip_special_tokens=True)
    del model
    return Reference(texts, prompt_ids, continuation, sample)


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


def check_gguf(path: Path, reference: Reference, lora_path: Path | None = None) -> dict[str, Any]:
    """Load a GGUF in llama.cpp (with a LoRA adapter GGUF applied on top, when given), generate, and score the
    reference prefixes: top-1 agreement with the HF model, whether llama.cpp tokenizes the prompts the same way, and
    a sample reply."""
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
            lora_path=str(lora_path) if lora_path else None,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:  # RuntimeError: an adapter llama.cpp cannot apply
        names = path.name + (f" with the adapter {lora_path.name}" if lora_path else "")
        raise UserError(
            f"llama.cpp could not load the converted file {names} ({exc}); the model's architecture or tokenizer "
            f"may not be supported by llama-cpp-python {llama_cpp_version()}."
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
    # llama.cpp's tokenizer type and pre-tokenizer (gpt2/smollm for the demo model), in the report: a converter that
    # picked the wrong pre-tokenizer splits text unlike the HF tokenizer, which is what a low tokenizer_match means.
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
