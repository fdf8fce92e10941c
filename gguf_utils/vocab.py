"""Real tokenizers from llama.cpp's vocabulary files (vendor/llama.cpp/models/ggml-vocab-*.gguf, unpacked by
scripts/fetch_converter.py from the llama-cpp-python sdist): Llama 3's BPE, Qwen2's BPE, Phi-3's and Llama 2's
SentencePiece. Each becomes a Hugging Face tokenizer that splits text exactly like llama.cpp does, so a tiny model
built on it exercises the family's real tokenization, special tokens and pre-tokenizer offline (tests/test_families.py).

A SentencePiece vocabulary also gets its tokenizer.model: llama.cpp's converter reads that file, not tokenizer.json,
for Llama-2-style, Phi-3 and Gemma models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf_utils.convert import CONVERTER
from workspace import UserError

VOCAB_DIR = CONVERTER.parent / "models"
# The vocabularies the catalogue's families need (README "Model families"); scripts/fetch_converter.py unpacks these.
VOCABS = ("llama-bpe", "qwen2", "phi-3", "llama-spm")
# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) as the regexes of the Hugging Face tokenizers they were hashed from.
PRE_TOKENIZER_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+",
}
# GGUF token types (llama_token_type), the same numbers as SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def vocab_path(name: str) -> Path:
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise UserError(
            f"llama.cpp's vocabulary {path.name} is missing from {VOCAB_DIR}. Run `make setup` (or `python "
            "scripts/fetch_converter.py vendor`): it unpacks it from the llama-cpp-python source package."
        )
    return path


def read_vocab(name: str) -> dict[str, Any]:
    """The tokenizer fields of a vocabulary file, keyed without the `tokenizer.ggml.` prefix, and its chat template."""
    metadata = read_gguf_metadata(vocab_path(name))
    fields = {key.removeprefix("tokenizer.ggml."): value for key, value in metadata.items()}
    fields["chat_template"] = metadata.get("tokenizer.chat_template")
    return fields


# GGUF metadata value types: struct formats of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's key-value metadata (no tensors). gguf.GGUFReader makes a numpy view of every array element:
    21 s for Llama 3's 280 000 merges, against 1 s here."""
    import struct

    import numpy as np

    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise UserError(f"{path} is not a GGUF file.")
    offset = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
    (count,) = struct.unpack_from("<Q", data, 16)

    def string() -> str:
        nonlocal offset
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8 + length
        return data[offset - length : offset].decode("utf-8")

    def value(kind: int) -> Any:
        nonlocal offset
        if kind == 8:
            return string()
        if kind == 9:
            (item_kind, items) = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if item_kind == 8:
                return [string() for _ in range(items)]
            if item_kind == 9:
                return [value(9) for _ in range(items)]
            width = struct.calcsize(_SCALARS[item_kind])
            array = np.frombuffer(data, dtype=np.dtype("<" + _SCALARS[item_kind]), count=items, offset=offset)
            offset += width * items
            return array.tolist()
        (result,) = struct.unpack_from("<" + _SCALARS[kind], data, offset)
        offset += struct.calcsize(_SCALARS[kind])
        return result

    metadata = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        metadata[key] = value(kind)
    return metadata


def tokenizer_from_vocab(name: str, chat_template: str | None = None, eos_token: str | None = None):
    """(a PreTrainedTokenizerFast tokenizing like llama.cpp does with vocabulary `name`, the bytes of its
    tokenizer.model or None for a BPE vocabulary).

    chat_template: used when the vocabulary file carries none; eos_token: an instruct model's end of turn, which
    base vocabularies do not declare (Llama 3's is <|eot_id|>, not <|end_of_text|>)."""
    from transformers import PreTrainedTokenizerFast

    fields = read_vocab(name)
    tokens, types = list(fields["tokens"]), list(fields["token_type"])
    special_ids = {fields[key] for key in ("bos_token_id", "eos_token_id", "unknown_token_id") if key in fields}
    if fields["model"] == "gpt2":
        backend, proto = _byte_level_bpe(name, fields, tokens), None
    elif fields["model"] == "llama":
        types = _spm_types(types, fields, special_ids)
        backend, proto = _sentencepiece_bpe(fields, tokens, types), _sentencepiece_model(fields, tokens, types)
    else:
        raise UserError(f"Vocabulary {name} is a '{fields['model']}' tokenizer, which this app cannot rebuild.")
    _add_special_tokens(backend, tokens, types)

    def token(key: str) -> str | None:
        return tokens[fields[key]] if key in fields else None

    bos = token("bos_token_id")
    # llama.cpp adds BOS for Llama 3's pre-tokenizer when the file does not say, as Llama 3's tokenizer.json does.
    if fields.get("add_bos_token", fields.get("pre") == "llama-bpe"):
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fields["bos_token_id"])]
        )
    eos = eos_token or token("eos_token_id")
    return (
        PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id") or eos,
            chat_template=fields.get("chat_template") or chat_template,
            clean_up_tokenization_spaces=False,
        ),
        proto,
    )


def save_tokenizer(tokenizer, proto: bytes | None, folder: Path) -> None:
    """The tokenizer's files in `folder`, with tokenizer.model for a SentencePiece vocabulary."""
    tokenizer.save_pretrained(str(folder))
    if proto is not None:
        (Path(folder) / "tokenizer.model").write_bytes(proto)


def _byte_level_bpe(name: str, fields: dict[str, Any], tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = fields.get("pre", "default")
    if pre not in PRE_TOKENIZER_REGEX:
        raise UserError(f"Vocabulary {name} uses llama.cpp's '{pre}' pre-tokenizer, which this app cannot rebuild.")
    merges = [tuple(merge.split(" ", 1)) for merge in fields["merges"]]
    backend = Tokenizer(
        models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=merges,
            byte_fallback=False,
            fuse_unk=False,
            ignore_merges=pre == "llama-bpe",  # Llama 3's tokenizer.json sets it: whole words in the vocabulary win
        )
    )
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_types(types: list[int], fields: dict[str, Any], special_ids: set[int]) -> list[int]:
    """Piece types SentencePiece accepts: exactly one UNKNOWN piece, BOS/EOS as CONTROL, other 'unknown' pieces
    (Phi-3's padding) as UNUSED."""
    unk = fields.get("unknown_token_id", 0)
    fixed = []
    for index, kind in enumerate(types):
        if index == unk:
            kind = UNKNOWN
        elif index in special_ids:
            kind = CONTROL
        elif kind == UNKNOWN:
            kind = UNUSED
        fixed.append(kind)
    return fixed


def _sentencepiece_bpe(fields: dict[str, Any], tokens: list[str], types: list[int]):
    """What transformers builds from a Llama-2-style tokenizer.model: BPE over '▁'-escaped text with byte fallback,
    a '▁' before every piece of text (llama.cpp adds the same space after each special token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = [index for index, kind in enumerate(types) if kind == NORMAL]
    scores, candidates = fields["scores"], []
    # SentencePiece's BPE joins the pair whose joined piece scores highest: each piece is one merge of two pieces.
    for index in mergeable:
        piece = tokens[index]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None and types[left] == NORMAL and types[right] == NORMAL:
                candidates.append((-scores[index], index, left, right))
    candidates.sort()
    merges = [(tokens[left], tokens[right]) for _, _, left, right in candidates]
    unk = tokens[fields.get("unknown_token_id", 0)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _sentencepiece_model(fields: dict[str, Any], tokens: list[str], types: list[int]) -> bytes:
    """A SentencePiece BPE model (tokenizer.model) holding the vocabulary's pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    for token, score, kind in zip(tokens, fields["scores"], types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), kind
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id = fields.get("unknown_token_id", 0)
    spec.bos_id = fields.get("bos_token_id", -1)
    spec.eos_id = fields.get("eos_token_id", -1)
    spec.pad_id = -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _add_special_tokens(backend, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    specials = [tokens[index] for index, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
