"""The importance matrix the lowest-bit GGUF types need (llama.cpp refuses IQ1/IQ2/IQ3_XXS/IQ3_XS/Q2_K_S without
one): for every matrix the GGUF holds, the mean square of each input column over the run's own training rows, as
llama.cpp's imatrix tool measures it, here with forward hooks on the merged Hugging Face model. Names follow the GGUF
(gguf-py's tensor name map, checked against the file's own tensors and their row width), and the quantizer takes it
through llama-cpp-python's `llama_model_imatrix_data` array (convert.imatrix_array)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import model_utils

log = logging.getLogger(__name__)

# Enough rows to see every column used, few enough to take seconds on the CPU for a small model.
IMATRIX_ROWS = 64
IMATRIX_TOKENS = 16384


def gguf_matrices(gguf_path: Path) -> tuple[str, dict[str, int]]:
    """(the GGUF's architecture, {2-D tensor name: its row width}) of a converted file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    return arch, {tensor.name: int(tensor.shape[0]) for tensor in reader.tensors if len(tensor.shape) == 2}


def compute_imatrix(merged: Path, gguf_path: Path, rows: list[list[int]]) -> dict[str, Any]:
    """GGUF tensor name → float32 mean of squared inputs per column, from the HF model in `merged` run over `rows`
    (token ids). Only tensors the GGUF holds with the same row width are kept."""
    import gguf
    import numpy as np
    import torch

    arch, widths = gguf_matrices(gguf_path)
    names = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    model = model_utils.load_model(str(merged))  # float32 on the CPU, 16-bit on a GPU; the squares sum in float32
    model.eval()
    blocks = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    name_map = gguf.get_tensor_name_map(names[arch], blocks)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(target: str):
        def record(_module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[target] = sums.get(target, 0) + (x * x).sum(dim=0)
            counts[target] = counts.get(target, 0) + x.shape[0]

        return record

    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        target = name_map.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if target and widths.get(target) == module.in_features:
            hooks.append(module.register_forward_hook(hook(target)))
    try:
        with torch.no_grad():
            for ids in rows:
                model(torch.tensor([ids], device=model.device))
    finally:
        for handle in hooks:
            handle.remove()
    log.info("importance matrix: %d tensors over %d rows", len(sums), len(rows))
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sums}


def training_rows(model, workspace: Path) -> list[list[int]]:
    """Token ids of the run's own training rows (its train split, prepared as it trained), at most IMATRIX_ROWS rows
    and IMATRIX_TOKENS tokens."""
    from dataset_utils import prepare_training_data
    from train_config import train_config_from_dict

    config = train_config_from_dict(model.train_config)
    tokenizer = model_utils.load_tokenizer(str(model.path), config.model.trust_remote_code)
    prepared = prepare_training_data(config, tokenizer, workspace)
    rows, tokens = [], 0
    for ids in prepared.train["input_ids"][:IMATRIX_ROWS]:
        if tokens + len(ids) > IMATRIX_TOKENS and rows:
            break
        rows.append(list(ids))
        tokens += len(ids)
    return rows
