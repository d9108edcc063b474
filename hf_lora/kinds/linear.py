"""`nn.Linear` (and its subclasses, which keep their own forward for the base projection)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import init_lora_, weight_norm
from .base import BaseKind


def dense_weight(module: nn.Module) -> bool:
    """Whether the module's weight is a plain dense float tensor (a quantised Linear subclass's is packed,
    integer, or a tensor subclass that only its own forward understands)."""
    w = getattr(module, "weight", None)
    plain = type(w) in (torch.Tensor, nn.Parameter) or type(w).__name__ == "DTensor"  # (FSDP2 shards)
    return plain and w.is_floating_point()  # (any shape: ZeRO-3 leaves empty partitions outside a gather)


class LinearKind(BaseKind):
    name = "nn.Linear"
    types = (nn.Linear,)
    all_linear = True
    fused = True

    def matches(self, module: nn.Module) -> bool:
        # (a module without `weight`, nn.MultiheadAttention, holds its weights under other names)
        return isinstance(module, self.types) and (
            getattr(module, "weight", None) is None or dense_weight(module)
        )

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        w = self.weight(module)
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        init_lora_(A, B, init)

    def lora_branch(self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        x = x.to(A.dtype)
        p = layer.lora_dropout[name]
        dropped = bool(p and layer.training)
        if dropped:
            x = F.dropout(x, p)
        if name in layer.lora_magnitude:
            return self.dora_branch(layer, result, x, name, dropped)
        return F.linear(F.linear(x, A), B) * layer.lora_scaling[name]

    def dora_branch(
        self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str, dropped: bool
    ) -> torch.Tensor:
        """DoRA (weight-decomposed LoRA): the output of m * (W + s B A) / ||W + s B A|| minus the base
        output. The norm is a constant for the backward pass, as the DoRA paper (4.3) prescribes."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.lora_scaling[name]
        W = self.weight_oi(layer).to(x.dtype)
        norm = weight_norm(W, s * (B @ A).detach().to(x.dtype)).detach()  # (out,)
        scale = (layer.lora_magnitude[name] / norm).view(1, -1)
        if dropped:  # the base output was computed from the undropped input: redo it
            base = F.linear(x, W)
        else:
            base = result if layer.bias is None else result - layer.bias
        return (scale - 1) * base + scale * F.linear(F.linear(x, A), B) * s
