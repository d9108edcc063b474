"""The registry of base kinds: the modules LoRA can wrap, each described by a `BaseKind` (see base.py).

To add a kind: write `hf_lora/kinds/<name>.py` with a `BaseKind` subclass, and add an instance to `KINDS`
below, before any kind whose `types` its modules are also instances of (the first match wins: a
quantised Linear subclass goes before `LinearKind`).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BaseKind
from .bnb import Linear4bitKind, Linear8bitKind, weights_in
from .conv import ConvKind
from .conv1d import Conv1DKind
from .embedding import EmbeddingKind
from .experts import ExpertsKind, ParameterSlot, ParameterSlots, parameter_targets, prune_slots
from .linear import LinearKind
from .mha import MultiheadAttentionKind, OutProjKind
from .torchao import TorchaoKind

KINDS: list[BaseKind] = [
    Linear4bitKind(),  # (nn.Linear subclasses: before LinearKind)
    Linear8bitKind(),
    TorchaoKind(),
    OutProjKind(),
    LinearKind(),
    Conv1DKind(),
    ConvKind(),
    EmbeddingKind(),
    MultiheadAttentionKind(),
    ExpertsKind(),
]


def kind_of(module: nn.Module) -> BaseKind | None:
    """The kind of a module LoRA can wrap, or None."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def kind_of_class(cls: type) -> BaseKind | None:
    return next((kind for kind in KINDS if kind.matches_class(cls)), None)


def refusal(module: nn.Module) -> str:
    """Why no kind takes `module`, for messages: "QuantLinear (its weight is a packed int32 tensor ...)"."""
    cls = type(module).__name__
    w = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not isinstance(w, torch.Tensor):
        return cls
    return (
        f"{cls}, an nn.Linear whose weight is a {type(w).__name__} of {w.dtype} {tuple(w.shape)}, not a dense "
        "(out, in) float tensor: a quantised layer that no hf_lora base kind knows (supported: bitsandbytes "
        "4-bit and 8-bit, torchao; otherwise load the model unquantised)"
    )


def kind_names(last: str = "and") -> str:
    """The kinds' names for messages: "nn.Linear, Conv1D and nn.Embedding"."""
    names = [kind.name for kind in KINDS if kind.listed]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


__all__ = [
    "KINDS",
    "BaseKind",
    "Conv1DKind",
    "ConvKind",
    "EmbeddingKind",
    "ExpertsKind",
    "Linear4bitKind",
    "Linear8bitKind",
    "LinearKind",
    "MultiheadAttentionKind",
    "OutProjKind",
    "ParameterSlot",
    "ParameterSlots",
    "TorchaoKind",
    "kind_names",
    "kind_of",
    "kind_of_class",
    "parameter_targets",
    "prune_slots",
    "refusal",
    "weights_in",
]
