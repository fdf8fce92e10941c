"""Random-weight models of real shapes, a small tokenizer and generated Alpaca rows, for GPU tests and benchmarks.

The GPU machines cannot reach the Hub, so Llama-3.2-1B / 3B are rebuilt from their published configs with random
weights: the arithmetic of a training step depends on the shapes alone. The tokenizer is a byte-level BPE trained
on generated words with a ChatML template; its ids are a small part of the model's 128256-row vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# From meta-llama/Llama-3.2-{1B,3B}-Instruct config.json.
SHAPES: dict[str, dict] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    # For checking this module on a CPU in seconds.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
}
LLAMA_3_2 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "so",
    "vi",
    "de",
    "pa",
    "zu",
    "fe",
    "gi",
    "ho",
    "bar",
    "ten",
    "ost",
    "ple",
    "qui",
    "wen",
    "dro",
    "sta",
    "mon",
    "el",
]


def words(rng: random.Random, count: int) -> str:
    """`count` pseudo-words with punctuation, like prose to a tokenizer."""
    out = []
    for index in range(count):
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        out.append(word + ("." if index % 13 == 12 else "," if index % 7 == 6 else ""))
    return " ".join(out)


def build_tokenizer(folder: Path, vocab_size: int = 4096, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer (ChatML template, eos <|im_end|>) saved as a PreTrainedTokenizerFast folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [words(rng, 200) for _ in range(500)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=LLAMA_3_2["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def build_model(shape: str, folder: Path, tokenizer_folder: Path, device: str = "cuda") -> Path:
    """A random-init Llama-3.2 model of `shape` in bf16 with the tokenizer beside it; reused when already there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    values = {
        **LLAMA_3_2,
        **SHAPES[shape],
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**{key: value for key, value in values.items() if key != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3B parameters takes seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def fix_reply_length(model_folder: Path, tokenizer_folder: Path, new_tokens: int) -> None:
    """Make every greedy reply of the random model in `model_folder` exactly `new_tokens` text tokens long, through
    its generation config: no token that ends a chat reply (its EOS and the tokenizer's) before then, and no token
    that decodes to no text (the special tokens, and the ids past the small tokenizer's vocabulary: a Llama-3.2
    shape has 128,256 rows, the tokenizer 4,096, so a random model picks text-less ids 97 % of the time)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    vocab = AutoConfig.from_pretrained(str(model_folder)).vocab_size
    saved = (Path(model_folder) / "generation_config.json").exists()
    generation = GenerationConfig.from_pretrained(str(model_folder)) if saved else GenerationConfig()
    configured = generation.eos_token_id
    ends = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    generation.eos_token_id = sorted(ends - {None})
    generation.min_new_tokens = new_tokens
    textless = set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab))
    generation.suppress_tokens = sorted(textless - set(generation.eos_token_id)) or None
    generation.save_pretrained(str(model_folder))


def alpaca_rows(count: int, min_words: int, max_words: int, seed: int = 0) -> list[dict]:
    """Alpaca-style rows (instruction, input, output) whose answers have min_words..max_words words, log-uniform."""
    import math

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        length = int(math.exp(rng.uniform(math.log(min_words), math.log(max_words))))
        rows.append(
            {
                "instruction": f"Task {index}: " + words(rng, rng.randint(6, 24)),
                "input": words(rng, rng.randint(0, 30)) if index % 3 == 0 else "",
                "output": words(rng, length),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def parameter_count(folder: Path) -> int:
    """Parameters of a saved model, from the safetensors headers (tied embeddings counted once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():
                shape = weights.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                total += size
    return total
