"""`nn.MultiheadAttention`, as peft adapts it: one adapter on the packed query/key/value projection
(`in_proj_weight`, (3 * embed_dim, embed_dim)) and one on `out_proj`, a Linear child adapted with it (its
own LoRA layer, of kind `OutProjKind`). The module computes its projections from the weights themselves,
never calling a Linear's forward, so the adapters act by adding their updates to the weights for the
call (`lora_forward`): W + s B A, differentiable in A and B. As in peft, lora_dropout does not apply
(there is no input to drop before the update), and DoRA, mixed batches and separate q/k/v weights
(kdim/vdim != embed_dim) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..weights import factor_product
from .linear import LinearKind


class MultiheadAttentionKind(LinearKind):
    name = "nn.MultiheadAttention"
    types = (nn.MultiheadAttention,)
    all_linear = False  # as peft: "all-linear" takes Linear and Conv1D only
    fused = False
    moves_base_weights = False
    companions = ("out_proj",)
    wraps_forward = True

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        return module.embed_dim, 3 * module.embed_dim

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.in_proj_weight

    def write_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.in_proj_weight.copy_(weight)

    def problem(self, module: nn.Module, r: int, config: Any) -> str | None:
        if not module._qkv_same_embed_dim:
            return "its query, key and value have separate weights (kdim/vdim != embed_dim), which peft does not adapt either"
        if config.use_dora:
            return "DoRA does not apply to nn.MultiheadAttention (peft refuses it too); set use_dora=False"
        if config.init_lora_weights not in (True, False, "gaussian"):
            return (
                f"init_lora_weights={config.init_lora_weights!r} does not apply to nn.MultiheadAttention here"
            )
        return None

    def lora_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The module's own forward, with W + sum of s B A for the live adapters in place of `in_proj_weight`
        and of `out_proj.weight` for the call."""
        out_proj = layer.out_proj
        w_in = updated(layer, layer.in_proj_weight)
        w_out = updated(out_proj, out_proj.weight) if hasattr(out_proj, "lora_A") else out_proj.weight
        with swapped(layer, "in_proj_weight", w_in), swapped(out_proj, "weight", w_out):
            return layer._base_forward(x, *args, **kwargs)


class OutProjKind(LinearKind):
    """The `out_proj` of an nn.MultiheadAttention (a Linear subclass used nowhere else): a Linear whose
    forward is never called; its adapters act through its parent's `lora_forward`. peft keeps it inside the
    parent's `base_layer`, so its file keys are `<mha>.base_layer.out_proj.lora_A.weight`."""

    name = "MultiheadAttention.out_proj"
    listed = False  # adapted with its parent only
    all_linear = False  # (peft's "all-linear" puts a LoRA on it that never acts)
    types = (NonDynamicallyQuantizableLinear,)
    fused = False
    moves_base_weights = False

    def file_path(self, path: str, module: nn.Module | None = None) -> str:
        parent, _, leaf = path.rpartition(".")
        return f"{parent}.base_layer.{leaf}" if parent else path


def updated(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """`weight` plus the scaled updates of `layer`'s live adapters, in the weight's dtype (peft's merge)."""
    for name in layer._live:
        A, B = layer.lora_A[name], layer.lora_B[name]
        weight = weight + (factor_product(A, B) * layer.lora_scaling[name]).to(weight.dtype)
    return weight


@contextmanager
def swapped(module: nn.Module, name: str, tensor: torch.Tensor) -> Iterator[None]:
    """`module.<name>` reads `tensor` instead of its Parameter inside the block; the very same Parameter is
    back after it (also on an error), in its place among the module's parameters."""
    params = module._parameters
    original = params[name]
    params[name] = tensor
    try:
        yield
    finally:
        params[name] = original
