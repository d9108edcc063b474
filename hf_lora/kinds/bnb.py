"""bitsandbytes' quantised Linears (QLoRA): `Linear4bit` (NF4/FP4, double quantisation) and `Linear8bitLt`.

The base projection stays the quantised module's own forward; the adapter is a plain fp32 LoRA branch on
top (peft's `lora.bnb.Linear4bit/Linear8bitLt`). A quantised weight is no dense tensor: its shapes come
from `in_features`/`out_features` (a 4-bit weight is packed (n, 1)), `weight` dequantises it and
`write_weight` quantises a dense weight again, as peft merges (dequantise, add in fp32, requantise). That
rounding is why merging into a quantised base changes outputs: `requantises` tells the layer to measure it.

bitsandbytes is imported only when a model has such layers: the classes are recognised by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import LinearKind


def _is_bnb(cls: type, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


def weights_in(param: torch.Tensor) -> int:
    """How many weights a parameter stands for: a 4-bit one packs two per byte of its storage (as peft counts)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


class BnbKind(LinearKind):
    """What the two bitsandbytes kinds share."""

    class_name = ""  # the bitsandbytes class, e.g. "Linear4bit"
    fused = False  # the base forward is the quantised matmul: the plain path
    requantises = True  # write_weight rounds: a merge is measured and warned about (see layers)
    listed = False  # (messages name nn.Linear, which covers it)
    bits = 0

    def matches(self, module: nn.Module) -> bool:
        return _is_bnb(type(module), self.class_name)

    def matches_class(self, cls: type) -> bool:
        return _is_bnb(cls, self.class_name)

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    fused_around = True  # the quantised matmul runs as is, the adapter around it (hf_lora.fused)

    def fuses_around(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # (a trained bias needs the base's own gradient for it: the plain path)
        return layer.bias is None or not layer.bias.requires_grad


class Linear4bitKind(BnbKind):
    name = "bitsandbytes Linear4bit"
    class_name = "Linear4bit"
    bits = 4

    def weight(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        w = module.weight
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 CPUs at inference
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state)  # (out, in), the dtype it was quantised from

    def fuses_around(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # Computing in the input's dtype: no casts around the quantised matmul (else the plain path)
        return layer.compute_dtype == x.dtype and super().fuses_around(layer, x)

    def input_grad(self, layer: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' MatMul4Bit.backward: dequantise again, grad_out (N, out) @ W (out, in)
        return torch.matmul(grad_out, self.weight(layer).to(grad_out.dtype))

    def write_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu"),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(old.device)  # .to quantises (and sets module.quant_state)


class Linear8bitKind(BnbKind):
    name = "bitsandbytes Linear8bitLt"
    class_name = "Linear8bitLt"
    bits = 8

    def weight(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        w, state = module.weight, module.state
        if w.dtype != torch.int8:  # has_fp16_weights: kept dense
            return w.data
        # Before the first forward the row scales are on the weight; after it, on the module's state.
        scb = w.SCB if getattr(w, "SCB", None) is not None else state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))  # (out, in) float32

    def fuses_around(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # On CPU bitsandbytes' MatMul8bitFp (training) and MatMul8bitLt (eval) both answer in the input's
        # dtype, and both backwards take grad_out @ (CB * SCB / 127). (CUDA, fp16 weights: the plain path.)
        return x.device.type == "cpu" and not layer.state.has_fp16_weights and super().fuses_around(layer, x)

    def input_grad(self, layer: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' MatMul8bitFp/MatMul8bitLt.backward: CB * SCB / 127, then grad_out (N, out) @ W (out, in)
        state = layer.state
        weight = state.CB.to(grad_out.dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad_out, weight)

    def write_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Int8Params(
            weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        )
        module.weight = new.to(old.device)  # .to quantises: CB, SCB on the new weight
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None  # the next forward takes them from the new weight
