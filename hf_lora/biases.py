"""The base model's biases, which an adapter with bias="all" or "lora_only" trains (one set for all
adapters, as in peft: at most one adapter may train them)."""

from __future__ import annotations

from typing import Any


def set_bias_trainable(model: Any) -> None:
    """The base model's biases train while the adapter with bias="all" or "lora_only" (there is at most
    one) is active and trainable, and only then: training another adapter must not change them."""
    owner = next((n for n, c in model.peft_config.items() if c.bias != "none"), None)
    if owner is not None:
        config = model.peft_config[owner]
        set_owned_biases_trainable(model, owner, owner in model.active_adapters and not config.inference_mode)


def set_owned_biases_trainable(model: Any, owner: str, train: bool) -> None:
    config = model.peft_config[owner]
    lora_paths = {path for path, layer in model.lora_layers() if owner in layer.lora_A}
    wrapped = [path for path, _ in model.saved_modules()]  # their copies follow their adapters
    for pname, p in model.named_parameters():
        path, _, leaf = pname.rpartition(".")
        # Parameters named `bias` only (T5's relative_attention_bias is an embedding, not a bias).
        if leaf != "bias" or any(path == w or path.startswith(w + ".") for w in wrapped):
            continue
        if config.bias == "all" or path in lora_paths:
            p.requires_grad_(train)
