"""LoRA+ (Hayou et al., 2024): train B with a larger learning rate than A.

With A and B at one learning rate, the update of B is too small relative to A's in wide models; LoRA+
gives B (and the 1-D parameters trained alongside, e.g. DoRA magnitudes and biases) `loraplus_lr_ratio`
times the learning rate; the A and B of embeddings get `loraplus_lr_embedding`. The parameter groups are
those of peft's `create_loraplus_optimizer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import LoRALayer


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over the trainable parameters: A and full-weight copies at `lr`, B and 1-D
    parameters at `lr * loraplus_lr_ratio` (no weight decay on biases and norms), an embedding's A and B
    at `loraplus_lr_embedding` (peft's default: 1e-6). Hand it to the Trainer as
    `Trainer(..., optimizers=(optimizer, None))`."""
    if loraplus_lr_ratio < 1:
        raise ValueError(
            f"loraplus_lr_ratio is the ratio lr_B / lr_A and should be >= 1, got {loraplus_lr_ratio}."
        )
    no_decay = _no_decay_names(model)
    embedding_factors = {
        id(p)
        for m in model.modules()
        if isinstance(m, LoRALayer) and m.lora_kind.lookup
        for p in (*m.lora_A.values(), *m.lora_B.values())
    }
    group_a, group_embedding, group_b, group_b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_factors:
            group_embedding.append(param)
        elif "lora_B" in name or param.ndim == 1:
            (group_b_no_decay if name in no_decay else group_b).append(param)
        else:
            group_a.append(param)
    groups = [
        {"params": group_a, "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": group_embedding, "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": group_b, "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the parameters of layer norms: transformers' (and peft's) rule for weight decay."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    return {n for n, _ in model.named_parameters()} - decay
