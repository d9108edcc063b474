"""The registry of base kinds: the modules LoRA can wrap, each described by a `BaseKind` (see base.py).

To add a kind: write `hf_lora/kinds/<name>.py` with a `BaseKind` subclass, and add an instance to `KINDS`
below, before any kind whose `types` its modules are also instances of (the first match wins: a
quantised Linear subclass goes before `LinearKind`).
"""

from __future__ import annotations

from torch import nn

from .base import BaseKind
from .conv import ConvKind
from .conv1d import Conv1DKind
from .embedding import EmbeddingKind
from .linear import LinearKind
from .mha import MultiheadAttentionKind, OutProjKind

KINDS: list[BaseKind] = [
    OutProjKind(),  # (an nn.Linear subclass)
    LinearKind(),
    Conv1DKind(),
    ConvKind(),
    EmbeddingKind(),
    MultiheadAttentionKind(),
]


def kind_of(module: nn.Module) -> BaseKind | None:
    """The kind of a module LoRA can wrap, or None."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def kind_of_class(cls: type) -> BaseKind | None:
    return next((kind for kind in KINDS if kind.matches_class(cls)), None)


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
    "LinearKind",
    "MultiheadAttentionKind",
    "OutProjKind",
    "kind_names",
    "kind_of",
    "kind_of_class",
]
