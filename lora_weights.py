"""The weights of a LoRA adapter loaded for chat: its layers, whether their delta can be merged into the base
weights, the merge in place and the base weights restored bit for bit (how inference_utils switches a shared model
between the base and the tuned side)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# PEFT's name for "no adapter" in a mixed batch (adapter_names), and the name PeftModel.from_pretrained gives ours.
BASE_ADAPTER = "__base__"
TUNED_ADAPTER = "default"


def lora_layers(model) -> Iterator[tuple[str, Any]]:
    """(name, layer) of each LoRA layer of the model that holds the run's adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and TUNED_ADAPTER in getattr(module, "lora_A", {}):
            yield name, module


def uses_dora(layers: list[tuple[str, Any]]) -> bool:
    """Whether any layer is DoRA: its delta is not a sum, and PEFT cannot mix it with the base model in one batch."""
    return any(any(getattr(module, "use_dora", {}).values()) for _, module in layers)


def mergeable(layers: list[tuple[str, Any]]) -> bool:
    """Whether each layer's delta adds to its weight: a float weight (a 4-bit base cannot take the merge) and plain
    LoRA (DoRA's delta is not a sum)."""
    return not uses_dora(layers) and all(module.get_base_layer().weight.dtype.is_floating_point for _, module in layers)


def adapter_variant(adapter_dir: str | Path) -> str:
    """What a saved PEFT adapter is, read from its adapter_config.json: dora, rslora or lora."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"


def host_copy(layers: list[tuple[str, Any]]) -> dict[str, Any]:
    """The wrapped layers' base weights on the host (pinned on CUDA, for fast copies back), so that taking the merge
    out restores them bit for bit instead of subtracting the delta again (bf16 would drift with every switch)."""
    import torch

    saved = {}
    for name, module in layers:
        weight = module.get_base_layer().weight.detach()
        copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=weight.is_cuda)
        saved[name] = copy.copy_(weight)
    return saved


def merge_in_place(layers: list[tuple[str, Any]]) -> None:
    """Add each layer's LoRA delta to its base weight (on the weight's own device), rounded as PEFT's merge rounds
    it (the delta in its own precision, one rounding to the weight's): the weights equal merge_and_unload()'s."""
    import torch

    with torch.no_grad():
        for _, module in layers:
            module.get_base_layer().weight.add_(module.get_delta_weight(TUNED_ADAPTER))


def restore(layers: list[tuple[str, Any]], saved: dict[str, Any]) -> None:
    """Copy the base weights that host_copy kept back into the layers: the merge taken out, bit for bit."""
    import torch

    with torch.no_grad():
        for name, module in layers:
            module.get_base_layer().weight.copy_(saved[name], non_blocking=True)
