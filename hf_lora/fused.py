"""The fused path: base projection + one LoRA adapter in one autograd function, for a frozen base weight.

The scaled LoRA update is accumulated into the base output in place (no full-size `* scaling` / `+`
passes), the input is saved once, and dropout keeps only its bit-packed mask (`hf_lora.dropout`). A base
kind whose forward is `x @ W.T + b` (`BaseKind.fused`) runs through `fused_lora`; `fusable` says when the
tensors allow it (otherwise the layer takes the plain path, which computes exactly what peft computes). A
kind whose base runs its own forward (a quantised matmul: `BaseKind.fused_around`) runs through
`fused_around`: the base's forward and input gradient as they are, the adapter around them.
"""

from __future__ import annotations

import torch
from torch import nn

from .dropout import buffer, dropped, keep_bytes, pack_mask, row_chunks, unpack_mask


class _LoRAFunction(torch.autograd.Function):
    """Base projection + one LoRA adapter, forward and backward, for a frozen base weight.

    Saved for backward: the input (usually held anyway by the layer before), the small (N, r) tensor h,
    and with dropout a keep-mask of one bit per input element (peft's Dropout + Linear keep the dropped
    input and a float mask: 8 bytes per input element, against 1/8 here). The dropout scale 1/(1-p) is
    applied to the small (N, r) tensors instead of the full-size input."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, dropout_p: float, fan_in_fan_out: bool):
        x2d = x.reshape(-1, A.shape[1])  # (N, in)
        keep = keep_bytes(x2d, dropout_p)
        packed = pack_mask(keep) if keep is not None else None
        y, h = _lora_forward(x2d, weight, bias, A, B, scaling, fan_in_fan_out, keep, dropout_p)
        ctx.save_for_backward(x, weight, A, B, h, packed)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, h, packed = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight.T if ctx.fan_in_fan_out else weight)  # (N, in)
        grad_x, grad_A, grad_B = _lora_backward(
            ctx, g, grad_x, x, A, B, h, packed, ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        )
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


class _AroundFunction(torch.autograd.Function):
    """One LoRA adapter around a base that runs its own forward (a quantised matmul): `base(x)` is that
    forward, as is, and `input_grad(g)` the base's gradient w.r.t. its input, g @ W, computed as the base's
    own backward computes it (bitsandbytes dequantises W again there: nothing the size of W is kept).
    Otherwise `_LoRAFunction`: the update added in place, bit-packed dropout masks, the small tensors saved."""

    @staticmethod
    def forward(ctx, x, A, B, base, input_grad, scaling: float, dropout_p: float):
        y = _around_forward(x, A, B, base, scaling, dropout_p, ctx)
        ctx.input_grad, ctx.scaling, ctx.dropout_p = input_grad, scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, h, packed = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = ctx.input_grad(g) if ctx.needs_input_grad[0] else None  # (N, in)
        grad_x, grad_A, grad_B = _lora_backward(
            ctx, g, grad_x, x, A, B, h, packed, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        )
        return grad_x, grad_A, grad_B, None, None, None, None


def _around_forward(x, A, B, base, scaling: float, dropout_p: float, ctx=None):
    """`base(x) + scaling * dropout(x) @ A.T @ B.T`, the update added into the base's fresh output; what
    backward needs saved on `ctx` if one is given."""
    y = base(x)  # (..., out): the base module's own forward
    if not y.is_contiguous():
        y = y.contiguous()
    x2d = x.reshape(-1, A.shape[1])  # (N, in)
    keep = keep_bytes(x2d, dropout_p)
    h = _lora_h(x2d, A, keep, dropout_p)  # (N, r)
    y.view(-1, y.shape[-1]).addmm_(h, B.T, alpha=scaling)  # y += scaling * h @ B.T
    if ctx is not None:
        ctx.save_for_backward(x, A, B, h, pack_mask(keep) if keep is not None else None)
    return y


def _lora_backward(ctx, g, grad_x, x, A, B, h, packed, need_A: bool, need_B: bool):
    """The adapter's share of the backward: (grad_x with the update's part added, grad_A, grad_B), for
    g = the output's gradient (N, out) and grad_x = the base's part (N, in) or None."""
    s = ctx.scaling
    gh = (g @ B).mul_(s)  # (N, r): gradient w.r.t. h
    x2d = x.reshape(-1, A.shape[1])  # (N, in)
    grad_A = grad_B = None
    if packed is None:
        if grad_x is not None:
            grad_x.addmm_(gh, A)
        if need_A:
            grad_A = gh.T @ x2d  # (r, in)
    else:
        gh.mul_(1 / (1 - ctx.dropout_p))  # the gradient w.r.t. the kept inputs' product with A
        if need_A:
            grad_A = gh.new_zeros(A.shape)
        width = x2d.shape[1]
        for rows in row_chunks(x2d):
            n = rows.stop - rows.start
            keep = unpack_mask(packed, rows.start * width, rows.stop * width).view(n, width)
            keep = buffer(1, x2d, n).copy_(keep)  # (n, in) 0/1 floats
            if grad_A is not None:
                grad_A.addmm_(gh[rows].T, torch.mul(x2d[rows], keep, out=buffer(0, x2d, n)))
            if grad_x is not None:  # grad_x += (gh @ A) * keep
                grad_x[rows].addcmul_(torch.mm(gh[rows], A, out=buffer(0, x2d, n)), keep)
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    if need_B:
        # (out, r) as the transpose of h.T @ g: MKL/oneDNN run g.T @ h 3-5x slower on CPU.
        grad_B = (h.T @ g).T.mul_(s)
    return grad_x, grad_A, grad_B


def _lora_h(x2d, A, keep, dropout_p: float) -> torch.Tensor:
    """h = dropout(x) @ A.T, (N, r), the dropped inputs never materialised whole."""
    if keep is None:
        return x2d @ A.T
    h = x2d.new_empty(x2d.shape[0], A.shape[0])
    for rows in row_chunks(x2d):
        torch.mm(dropped(x2d, keep[rows], rows), A.T, out=h[rows])
    return h.mul_(1 / (1 - dropout_p))


def _lora_forward(x2d, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, keep=None, dropout_p=0.0):
    """(y, h) with h = dropout(x) @ A.T and y = base(x) + scaling * h @ B.T, the update added in place."""
    w_io = weight if fan_in_fan_out else weight.T  # (in, out), a view
    y = torch.addmm(bias, x2d, w_io) if bias is not None else x2d @ w_io  # (N, out)
    h = _lora_h(x2d, A, keep, dropout_p)
    y.addmm_(h, B.T, alpha=scaling)  # y += scaling * h @ B.T
    return y, h


def _lora_linear(x, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, dropout_p: float = 0.0):
    """`_LoRAFunction`'s forward without autograd bookkeeping."""
    x2d = x.reshape(-1, A.shape[1])  # (N, in)
    y, _ = _lora_forward(
        x2d, weight, bias, A, B, scaling, fan_in_fan_out, keep_bytes(x2d, dropout_p), dropout_p
    )
    return y.view(*x.shape[:-1], y.shape[-1])


_PLAIN = (torch.Tensor, nn.Parameter)  # not tensor subclasses (DTensor, quantized, ...)
_AUTOCASTABLE = {torch.float32, torch.float16, torch.bfloat16}


def fusable(autocast: bool, x, w, b, A, B) -> bool:
    """Whether `_LoRAFunction` covers these tensors: a frozen base, plain tensors, and one dtype for all
    (under autocast, any dtypes autocast casts: it casts them all). Plain comparisons, no generators:
    it runs on every call of every adapted layer."""
    if w.requires_grad or type(x) not in _PLAIN or type(w) not in _PLAIN:
        return False
    if type(A) not in _PLAIN or type(B) not in _PLAIN:
        return False
    if b is not None and (b.requires_grad or type(b) not in _PLAIN):
        return False
    if autocast:
        return {x.dtype, w.dtype, A.dtype, B.dtype, w.dtype if b is None else b.dtype} <= _AUTOCASTABLE
    return x.dtype == w.dtype == A.dtype == B.dtype and (b is None or b.dtype == w.dtype)


def fusable_around(x, A, B) -> bool:
    """Whether `_AroundFunction` covers these tensors: plain tensors of one dtype, no autocast (its casts
    would land between the base and the adapter)."""
    if type(x) not in _PLAIN or type(A) not in _PLAIN or type(B) not in _PLAIN:
        return False
    return x.dtype == A.dtype == B.dtype and not torch.is_autocast_enabled(x.device.type)


def fused_lora(x, weight, bias, A, B, scaling: float, dropout_p: float, fan_in_fan_out: bool) -> torch.Tensor:
    """`base(x) + scaling * dropout(x) @ A.T @ B.T` for a Linear-like base (`weight` (out, in), or (in, out)
    with `fan_in_fan_out`), through `_LoRAFunction` when autograd records."""
    if torch.is_grad_enabled():
        return _LoRAFunction.apply(x, weight, bias, A, B, scaling, dropout_p, fan_in_fan_out)
    # Without autograd: inference, or a training forward under no_grad (the first pass of reentrant
    # gradient checkpointing, which must drop what its recomputation drops): the same GEMMs and mask.
    return _lora_linear(x, weight, bias, A, B, scaling, fan_in_fan_out, dropout_p)


def fused_around(x, A, B, base, input_grad, scaling: float, dropout_p: float) -> torch.Tensor:
    """`base(x) + scaling * dropout(x) @ A.T @ B.T` for a base that runs its own forward (`base`), with
    `input_grad(g)` its gradient w.r.t. the input (see `_AroundFunction`); x, A and B of one dtype."""
    if torch.is_grad_enabled():
        return _AroundFunction.apply(x, A, B, base, input_grad, scaling, dropout_p)
    return _around_forward(x, A, B, base, scaling, dropout_p)  # as fused_lora without autograd
