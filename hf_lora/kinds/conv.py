"""`nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d`, as peft adapts them: A is a convolution with the base's kernel,
stride, padding (and its padding mode) and dilation, from the base's input channels to r; B a 1x1 (1, 1x1x1)
convolution from r to the output channels, grouped like the base. The update's dense weight is B @ A with
the kernel flattened: a weight (out, in, *k) is laid out (out, in * k), A (r, in, *k) is (r, in * k) and B
(out, r, 1...) is (out, r).

Where peft differs: its A leaves out the base's dilation and padding mode, so on a dilated convolution its
forward fails (the shapes differ) and on a circular/reflect-padded one its merge changes the outputs; here
A takes both, and the merged weight computes exactly what the adapter did. Everything else is peft's,
including what it refuses: a rank not divisible by `groups`, merging a grouped convolution, and the inits
that move base weights (PiSSA, OLoRA, orthogonal); DoRA on a grouped convolution is refused too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import factor_product, weight_norm
from .linear import LinearKind

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvKind(LinearKind):
    name = "nn.ConvNd"
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    all_linear = False  # as peft: "all-linear" takes Linear and Conv1D only; name convolutions to adapt them
    # Measured (CPU, inference, r=8): one convolution with A's kernels stacked onto the base's, then B on
    # those r channels, takes 51.4 ms against the plain path's 53.8 ms (64 channels, 32x32, batch 16) and
    # 72.2 against 73.1 ms (256 channels, 16x16, batch 8), base alone 40.1 and 67.5 ms: within the noise of
    # a shared machine, not worth a second code path. Merged adapters run at the base's speed.
    fused = False
    moves_base_weights = False  # peft refuses PiSSA/OLoRA/orthogonal on convolutions: see `problem`

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = tuple(module.kernel_size)
        return (r, module.in_channels, *k), (module.out_channels, r // module.groups, *(1,) * len(k))

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (1, module.out_channels, *(1,) * len(module.kernel_size))

    def as_oi(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def to_layout(self, module: nn.Module, weight_oi: torch.Tensor) -> torch.Tensor:
        return weight_oi.reshape(weight_oi.shape[0], *module.weight.shape[1:])

    def problem(self, module: nn.Module, r: int, config: Any) -> str | None:
        groups, init = module.groups, config.init_lora_weights
        if r % groups:
            return (
                f"r={r} is not divisible by its groups={groups} (B is a grouped convolution, as in peft); "
                f"choose a multiple of {groups} (rank_pattern can give this layer its own)"
            )
        if groups > 1 and config.use_dora:
            return (
                f"DoRA needs the update as a kernel of the base's shape, which a grouped convolution's "
                f"(groups={groups}) adapter does not have (its A sees every input channel; peft's DoRA reshapes it into one that "
                "means nothing); set use_dora=False or leave this layer out"
            )
        if init not in (True, False, "gaussian"):
            return f"init_lora_weights={init!r} does not apply to convolutions (peft refuses it too)"
        return None

    def merge_problem(self, module: nn.Module) -> str | None:
        if module.groups > 1:
            return (
                f"a LoRA on a grouped convolution (groups={module.groups}) cannot be merged (nor in peft): "
                "its update is not a dense kernel of the base's shape; keep the adapter unmerged"
            )
        return None

    def lora_branch(self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """peft's `lora_B(lora_A(dropout(x))) * scaling`; DoRA as peft's `_DoraConvNdLayer`."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.lora_scaling[name]
        x = x.to(A.dtype)
        p = layer.lora_dropout[name]
        dropped = bool(p and layer.training)
        if dropped:
            x = F.dropout(x, p)
        conv = _CONV_FN[A.dim() - 2]
        update = conv(conv_a(layer, x, A), B, None, 1, 0, 1, layer.groups) * s
        if name not in layer.lora_magnitude:
            return update
        W = self.weight_oi(layer).to(x.dtype)
        norm = weight_norm(W, s * factor_product(A, B).detach().to(x.dtype)).detach()  # (out,)
        scale = layer.lora_magnitude[name] / norm.view(layer.lora_magnitude[name].shape)
        if dropped:  # the base output was computed from the undropped input: redo it
            base = conv(
                x, layer.weight.to(x.dtype), None, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        else:
            base = result if layer.bias is None else result - layer.bias.view(scale.shape)
        return (scale - 1) * base + scale * update


def conv_a(layer: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A's convolution: the base's kernel size, stride, padding (mode) and dilation, not its groups."""
    conv = _CONV_FN[A.dim() - 2]
    if layer.padding_mode != "zeros":  # what nn.ConvNd's forward does for these modes
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return conv(padded, A, None, layer.stride, 0, layer.dilation, 1)
    return conv(x, A, None, layer.stride, layer.padding, layer.dilation, 1)
