"""GPT-2's `Conv1D`: a Linear whose weight is stored (in, out)."""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from .linear import LinearKind


class Conv1DKind(LinearKind):
    name = "Conv1D"
    types = (Conv1D,)
    fan_in_fan_out = True
    saved_fan_in_fan_out = True
