"""`nn.Embedding`: a lookup in a (num_embeddings, dim) table, i.e. a Linear from one-hot rows with its
weight stored (in, out): the update is looked up in A.T instead of multiplied (peft's
`lora_embedding_A` / `_B`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import init_embedding_lora_, weight_norm
from .linear import LinearKind


class EmbeddingKind(LinearKind):
    name = "nn.Embedding"
    types = (nn.Embedding,)
    all_linear = False  # as in peft: "all-linear" leaves embeddings, naming them adapts them
    fan_in_fan_out = True
    fused = False
    moves_base_weights = False  # as in peft: PiSSA/OLoRA/orthogonal do not apply to embeddings
    lookup = True
    file_keys = ("lora_embedding_A", "lora_embedding_B")

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        init_embedding_lora_(A, B, init)

    def lora_branch(self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """peft's Embedding: the token ids looked up in A.T, a second (num_embeddings, r) table, times B.T;
        no dropout (there is no input to drop). A scale the base applies to its lookups (Gemma's scaled
        embeddings) applies to the update too. DoRA rescales per embedding dimension."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.lora_scaling[name]
        after_A = F.embedding(
            x, A.T, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
        )  # (..., r)
        update = (after_A @ B.T) * s  # (..., dim)
        scale_of_lookups = embed_scale(layer)
        if name in layer.lora_magnitude:
            W = self.weight_oi(layer).to(A.dtype)  # (dim, num_embeddings)
            norm = weight_norm(W, s * (B @ A).detach()).detach()  # (dim,)
            scale = layer.lora_magnitude[name] / norm
            update = scale * update
            if scale_of_lookups is not None:
                update = update * scale_of_lookups.to(update.dtype)
            return (scale - 1) * result + update  # result + this = scale * result + scaled update, as peft
        if scale_of_lookups is not None:
            update = update * scale_of_lookups.to(update.dtype)
        return update


def embed_scale(module: nn.Module) -> torch.Tensor | None:
    """The scalar an embedding multiplies its lookups by (`embed_scale`, e.g. Gemma3's), as peft reads it."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None
