"""LoRA layers: `y = base(x) + (dropout(x) @ A.T @ B.T) * scaling`, with A (r, in) and B (out, r).

A LoRA layer is the original `nn.Linear` / GPT-2 `Conv1D` object with its class swapped for a subclass
that adds the adapter (loralib's approach): the base `weight`/`bias` stay the same Parameter objects
under the same names, nothing is copied, and `unload()` swaps the class back. Adapters are keyed by name
(`lora_A["default"]`), so several can live side by side. An `nn.Embedding` is a lookup in a
(num_embeddings, dim) table, i.e. a Linear from one-hot rows with its weight stored (in, out) as Conv1D's
is: the same layer serves it, with the update looked up in A.T instead of multiplied.

Training and inference go through `_LoRAFunction`, a fused autograd function: the scaled LoRA update is
accumulated into the base output in place (no full-size `* scaling` / `+` passes), the input is saved
once, and dropout keeps only its mask; under autocast it casts once for the base and the adapter. Anything
it does not cover (several active adapters, mixed dtypes without autocast, DoRA, trainable base weights,
unknown Linear subclasses, tensor subclasses) takes the plain path, which computes exactly what peft
computes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import AdapterStateError

BASE_ROWS = "__base__"  # name of "no adapter" in mixed batches, as in peft


# ---- pure functions over weights --------------------------------------------------------------------


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """The dense update `scaling * B @ A` in at least fp32, laid out like the base weight ((in, out) for
    Conv1D)."""
    dtype = torch.promote_types(A.dtype, torch.float32)
    delta = (B.to(dtype) @ A.to(dtype)) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """`weight + sign * delta`, added in the wider of the two dtypes and rounded once to the weight's."""
    if weight.dtype == delta.dtype:
        return weight + delta if sign > 0 else weight - delta
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + sign * delta.to(wide)).to(weight.dtype)


def init_lora_(A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
    """True: A kaiming-uniform(a=sqrt(5)), B zeros (the update starts at zero, as in the LoRA paper);
    "gaussian": A ~ N(0, 1/r); "orthogonal" (peft's): A and B both non-zero, built on the odd and even rows
    of a random orthogonal (r, r) matrix, so B @ A = 0; False: both as nn.Linear initialises weights."""
    with torch.no_grad():
        if init == "orthogonal":
            r = A.shape[0]
            Q, _ = torch.linalg.qr(torch.randn(r, r))  # rows orthonormal: Q[1::2] @ Q[0::2].T = 0
            A.copy_((torch.randn(A.shape[1], r // 2) @ Q[0::2]).T / 10)  # (r, in)
            B.copy_(torch.randn(B.shape[0], r // 2) @ Q[1::2] / 10)  # (out, r)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


def init_embedding_lora_(A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
    """peft's (and loralib's) embedding init, whatever the init named: A zeros, B standard normal (the
    update starts at zero); False: both standard normal."""
    with torch.no_grad():
        if init is False:
            A.normal_()
        else:
            A.zero_()
        B.normal_()


def svd_init(
    weight_oi: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: A, B from the top-r singular triplets of W (so that scaling * B @ A is W's best rank-r part)
    and the residual W - scaling * B @ A that stays in the base. `niter` uses randomised SVD."""
    W = weight_oi.float()
    if niter is None:
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Uhr = randomized_svd(W, r, niter)
        Sr = Sr / scaling
    A = torch.diag(Sr.sqrt()) @ Uhr  # (r, in)
    B = Vr @ torch.diag(Sr.sqrt())  # (out, r)
    return A, B, W - scaling * B @ A


def randomized_svd(W: torch.Tensor, r: int, niter: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """torch.svd_lowrank's algorithm (Halko et al.: a random range, `niter` power iterations), drawn from
    a generator of its own with a fixed seed: loading a "pissa_niter_<n>" adapter repeats its init, and
    must leave the very residual in the base that training saw (peft's draw from the global RNG does not:
    its reload is off by a few 1e-2). Returns (U_r, S_r, Vh_r)."""
    g = torch.Generator(device=W.device).manual_seed(seed)
    Q = torch.linalg.qr(
        W @ torch.randn(W.shape[1], r, generator=g, dtype=W.dtype, device=W.device)
    ).Q  # (out, r)
    for _ in range(niter):
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (r, r), (r,), (r, in)
    return Q @ U, S, Vh


def qr_init(
    weight_oi: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: A, B from W's QR decomposition (B orthonormal), and the residual left in the base."""
    W = weight_oi.float()
    Q, R = torch.linalg.qr(W)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, W - scaling * B @ A


def weight_norm(weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """DoRA's column norm ||W + delta|| per output feature, (out,)."""
    return torch.linalg.norm(weight_oi + delta_oi, dim=1)


def combine_adapters(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float], how: str, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) pair, with scaling 1, from several weighted (A, B, scaling) adapters of a layer.

    "cat" is exact (ranks concatenated: B_new @ A_new = sum w_i s_i B_i @ A_i); "svd" truncates that same
    sum to `rank` by SVD (the best rank-`rank` approximation); "linear" adds the factors themselves
    (sqrt(w s) on each side), which is only an approximation, as in peft. The result is zero-padded to
    `rank` so every layer of the new adapter has the rank its config states."""
    A0 = parts[0][0]
    if how == "cat":
        A = torch.cat([A * (w * s) for (A, _, s), w in zip(parts, weights)])
        B = torch.cat([B for _, B, _ in parts], dim=1)
    elif how == "linear":
        root = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(parts, weights)]
        signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(parts, weights)]
        # ranks may differ by layer (rank_pattern, zero-padded weighted adapters): pad, do not broadcast
        top = max(A.shape[0] for A, _, _ in parts)
        A = sum(
            F.pad(A, (0, 0, 0, top - A.shape[0])) * (r * g) for (A, _, _), r, g in zip(parts, root, signs)
        )
        B = sum(F.pad(B, (0, top - B.shape[1])) * r for (_, B, _), r in zip(parts, root))
    elif how == "svd":
        delta = sum(w * delta_weight(A, B, s, fan_in_fan_out=False) for (A, B, s), w in zip(parts, weights))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]
    else:
        raise ValueError(f"combination_type must be 'cat', 'svd' or 'linear', got {how!r}.")
    A = F.pad(A, (0, 0, 0, rank - A.shape[0]))  # (rank, in)
    B = F.pad(B, (0, rank - B.shape[1]))  # (out, rank)
    return A.to(A0.dtype).contiguous(), B.to(A0.dtype).contiguous()


# ---- dropout masks ----------------------------------------------------------------------------------

_INT64_MIN = -(2**63)
_exact_masks = False  # set by peft_dropout_masks()


@contextlib.contextmanager
def peft_dropout_masks(enabled: bool = True) -> Iterator[None]:
    """Within this block the fused path draws its dropout masks with torch's Bernoulli, element for
    element as `F.dropout` (and so peft) does on CPU: a seeded run drops exactly what peft drops. Slower on CPU
    (see `keep_mask`); meant for comparing against peft, not for training. With gradient checkpointing,
    run the backward inside the block too: the recomputation draws its masks again then."""
    global _exact_masks
    before, _exact_masks = _exact_masks, enabled
    try:
        yield
    finally:
        _exact_masks = before


def keep_mask(shape: Sequence[int], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True with probability 1 - p, drawn from torch's default generator (so
    `torch.manual_seed` reproduces it and the Trainer's RNG checkpointing resumes it).

    On CPU, torch's Bernoulli runs one serial mt19937 draw per element (6-8 ns each: 12-16 % of a LoRA
    step at dropout 0.05). Here each 64-bit draw is cut into 8-, 16- or 32-bit uniform lanes, the
    narrowest that resolves p to 1e-4 of itself (16 bits, four per draw, for p = 0.05 or 0.1), each
    compared with a threshold: 4.3-4.9x faster (2.2x with 32-bit lanes), the same distribution up to
    that rounding of p, but not the same elements as `F.dropout` draws; `peft_dropout_masks()` switches
    to those. Other devices (CUDA's Philox Bernoulli is already fast) and torch.compile use the
    Bernoulli."""
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    lanes = _lanes(p)
    if lanes is None or _exact_masks or device.type != "cpu" or torch.compiler.is_compiling():
        # bernoulli_ on a bool tensor draws the same elements as F.dropout's on a float one (CPU).
        return keep.bernoulli_(1 - p)
    lane_dtype, threshold = lanes
    per_word = 8 // lane_dtype.itemsize  # mask elements per 64-bit random word
    flat = keep.view(-1)
    chunk = per_word * _SCRATCH_WORDS  # mask elements per batch of random words
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]  # (m,)
        words = _random_words(-(-part.numel() // per_word))  # (ceil(m / per_word),) int64
        torch.ge(words.view(lane_dtype)[: part.numel()], threshold, out=part)
    return keep


_P_TOLERANCE = 1e-4  # how far, relative to p and to 1 - p, the lanes may round the drop probability


def _lanes(p: float) -> tuple[torch.dtype, int] | None:
    """The narrowest signed lane type whose uniform values give P(lane < threshold) = p to within
    `_P_TOLERANCE`, and that threshold; None where even 32 bits are too coarse (p within ~1e-6 of 0 or 1)."""
    for lane_dtype in (torch.int8, torch.int16, torch.int32):
        bits = 8 * lane_dtype.itemsize
        level = round(p * 2**bits)  # lanes below the threshold: level of the 2**bits values
        if 0 < level < 2**bits and abs(level / 2**bits - p) <= _P_TOLERANCE * min(p, 1 - p):
            return lane_dtype, level - 2 ** (bits - 1)
    return None


# The random words go into a per-thread buffer that is reused (at most 2 MB): a fresh buffer per mask,
# freed right away, makes glibc's heap grow around the long-lived masks (+70 MB peak on the Llama shape,
# against -70 MB with the buffer, compared with torch's Bernoulli). Its size does not change the mask
# (the words are drawn in order either way); the buffers stay allocated, so they count at the peak.
_SCRATCH_WORDS = 1 << 18
_scratch = threading.local()


def _random_words(n: int) -> torch.Tensor:
    """n uniform 64-bit integers (the full int64 range) from the default generator, in the scratch buffer."""
    if torch.is_inference_mode_enabled():  # a buffer made here could never be written outside it again
        return torch.empty(n, dtype=torch.int64).random_(_INT64_MIN, None)
    buf = getattr(_scratch, "words", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.words = torch.empty(n, dtype=torch.int64)
    return buf[:n].random_(_INT64_MIN, None)


# ---- full-size temporaries of the dropout path ------------------------------------------------------

# With dropout, the fused path needs full-size temporaries: the dropped input (forward, and again for
# A's gradient) and the mask-weighted part of the input gradient. On CPU, fresh ones cost more in page
# faults than in arithmetic (glibc hands large blocks back to the kernel on free: a 6 MB temporary took
# 1.5 ms to fill against 0.06 ms reused), so they are rows of reused per-thread buffers of at most
# _SCRATCH_BYTES each (1 MB chunks would hold 6 MB less, but made a GPT-2 step 4-8 % slower: more,
# smaller GEMMs). Elsewhere (CUDA's caching allocator already reuses memory) and under torch.compile they
# are ordinary tensors, in one chunk.
_SCRATCH_BYTES = 4 << 20


def _reuse_buffers(x: torch.Tensor) -> bool:
    # Not under inference_mode: tensors created there are inference tensors, which a later training
    # forward could not write into.
    return (
        x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
    )


def _row_chunks(x2d: torch.Tensor) -> list[slice]:
    """Row ranges of x2d whose temporaries fit a scratch buffer (all rows where buffers are not reused)."""
    n = x2d.shape[0]
    step = max(1, _SCRATCH_BYTES // (x2d.shape[1] * x2d.element_size())) if _reuse_buffers(x2d) else n
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _flat_buffer(slot: int, like: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (n,) tensor of `dtype` on like's device; on CPU, per-thread buffer `slot`."""
    if not _reuse_buffers(like):
        return like.new_empty(n, dtype=dtype)
    buffers = _scratch.__dict__.setdefault("floats", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = buffers[slot, dtype] = like.new_empty(n, dtype=dtype)
    return buf[:n]


def _buffer(slot: int, like: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised (rows, like.shape[1]) tensor of like's dtype; on CPU, per-thread buffer `slot`."""
    return _flat_buffer(slot, like, rows * like.shape[1], like.dtype).view(rows, like.shape[1])


def _dropped(x2d: torch.Tensor, keep: torch.Tensor, rows: slice) -> torch.Tensor:
    """x2d[rows] * keep (the mask's rows, unscaled dropout), in buffer 0."""
    xk = _buffer(0, x2d, rows.stop - rows.start)
    return xk.copy_(keep).mul_(x2d[rows])  # the 0/1 mask as floats, times x


# ---- bit-packed keep-masks --------------------------------------------------------------------------

# The keep-mask saved for backward holds one bit per input element, an eighth of a one-byte mask (28 MB
# less saved for a GPT-2-small step of 4 x 128 tokens, 64 MB on SmolLM2-135M), packed and unpacked by
# multiplying 64-bit words: packing moves the low bit of byte k of a word of eight 0/1 bytes to bit
# 56 + k (the terms of the product never overlap, so no carries); unpacking copies a byte into all eight
# bytes of a word and keeps bit k in byte k. Together a few vectorised passes over a byte per element:
# 0.1-0.25 ms per GPT-2 layer input, 7-13 % of drawing the mask.
_GATHER = 0x0102040810204080  # sum of 2**(56 - 7k), k = 0..7
_SPREAD = 0x0101010101010101
_BIT_K_OF_BYTE_K = 0x8040201008040201 - 2**64  # as an int64


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A 0/1 uint8 mask as ceil(n / 8) bytes, flat element i at bit i % 8 of byte i // 8."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    words = flat.view(torch.int64) * _GATHER  # (n / 8,): the top byte holds the word's eight bits
    return words.bitwise_right_shift_(56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat elements start:stop of a mask packed by `pack_mask`, as 0/1 bytes in per-thread buffer 2."""
    first, last = start // 8, -(-stop // 8)
    words = _flat_buffer(2, packed, last - first, torch.int64).copy_(packed[first:last])
    words.mul_(_SPREAD).bitwise_and_(_BIT_K_OF_BYTE_K)  # byte k of each word: 0, or bit k set
    return words.view(torch.uint8).clamp_(max=1)[start - 8 * first : stop - 8 * first]


# ---- the fused path ---------------------------------------------------------------------------------


def _keep_bytes(x2d: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """x2d's keep-mask as 0/1 bytes (uint8 -> float is vectorised on CPU, bool -> float is not: 8x
    slower); None without dropout."""
    return keep_mask(x2d.shape, dropout_p, x2d.device).view(torch.uint8) if dropout_p > 0 else None


class _LoRAFunction(torch.autograd.Function):
    """Base projection + one LoRA adapter, forward and backward, for a frozen base weight.

    Saved for backward: the input (usually held anyway by the layer before), the small (N, r) tensor h,
    and with dropout a keep-mask of one bit per input element (peft's Dropout + Linear keep the dropped
    input and a float mask: 8 bytes per input element, against 1/8 here). The dropout scale 1/(1-p) is
    applied to the small (N, r) tensors instead of the full-size input."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, dropout_p: float, fan_in_fan_out: bool):
        x2d = x.reshape(-1, A.shape[1])  # (N, in)
        keep = _keep_bytes(x2d, dropout_p)
        packed = pack_mask(keep) if keep is not None else None
        y, h = _lora_forward(x2d, weight, bias, A, B, scaling, fan_in_fan_out, keep, dropout_p)
        ctx.save_for_backward(x, weight, A, B, h, packed)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, h, packed = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        gh = (g @ B).mul_(s)  # (N, r): gradient w.r.t. h
        x2d = x.reshape(-1, A.shape[1])  # (N, in)
        grad_x = grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight.T if ctx.fan_in_fan_out else weight)  # (N, in)
        if packed is None:
            if grad_x is not None:
                grad_x.addmm_(gh, A)
            if ctx.needs_input_grad[3]:
                grad_A = gh.T @ x2d  # (r, in)
        else:
            gh.mul_(1 / (1 - ctx.dropout_p))  # the gradient w.r.t. the kept inputs' product with A
            if ctx.needs_input_grad[3]:
                grad_A = gh.new_zeros(A.shape)
            width = x2d.shape[1]
            for rows in _row_chunks(x2d):
                n = rows.stop - rows.start
                keep = unpack_mask(packed, rows.start * width, rows.stop * width).view(n, width)
                keep = _buffer(1, x2d, n).copy_(keep)  # (n, in) 0/1 floats
                if grad_A is not None:
                    grad_A.addmm_(gh[rows].T, torch.mul(x2d[rows], keep, out=_buffer(0, x2d, n)))
                if grad_x is not None:  # grad_x += (gh @ A) * keep
                    grad_x[rows].addcmul_(torch.mm(gh[rows], A, out=_buffer(0, x2d, n)), keep)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[4]:
            # (out, r) as the transpose of h.T @ g: MKL/oneDNN run g.T @ h 3-5x slower on CPU.
            grad_B = (h.T @ g).T.mul_(s)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def _lora_forward(x2d, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, keep=None, dropout_p=0.0):
    """(y, h) with h = dropout(x) @ A.T and y = base(x) + scaling * h @ B.T, the update added in place."""
    w_io = weight if fan_in_fan_out else weight.T  # (in, out), a view
    y = torch.addmm(bias, x2d, w_io) if bias is not None else x2d @ w_io  # (N, out)
    if keep is None:
        h = x2d @ A.T  # (N, r)
    else:
        h = x2d.new_empty(x2d.shape[0], A.shape[0])
        for rows in _row_chunks(x2d):
            torch.mm(_dropped(x2d, keep[rows], rows), A.T, out=h[rows])
        h.mul_(1 / (1 - dropout_p))
    y.addmm_(h, B.T, alpha=scaling)  # y += scaling * h @ B.T
    return y, h


def _lora_linear(x, weight, bias, A, B, scaling: float, fan_in_fan_out: bool, dropout_p: float = 0.0):
    """`_LoRAFunction`'s forward without autograd bookkeeping."""
    x2d = x.reshape(-1, A.shape[1])  # (N, in)
    y, _ = _lora_forward(
        x2d, weight, bias, A, B, scaling, fan_in_fan_out, _keep_bytes(x2d, dropout_p), dropout_p
    )
    return y.view(*x.shape[:-1], y.shape[-1])


_PLAIN = (torch.Tensor, nn.Parameter)  # not tensor subclasses (DTensor, quantized, ...)
_AUTOCASTABLE = {torch.float32, torch.float16, torch.bfloat16}


def _fusable(autocast: bool, x, w, b, A, B) -> bool:
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


# ---- the layer --------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """Mixin for a Linear-like base class; instances are made by `make_lora_layer`, never constructed."""

    lora_A: nn.ParameterDict  # adapter -> (r, in)
    lora_B: nn.ParameterDict  # adapter -> (out, r)
    lora_magnitude: nn.ParameterDict  # DoRA adapter -> (out,)
    _dora_norms: dict[str, torch.Tensor]  # ||W + delta|| of merged DoRA adapters, to unmerge them
    lora_scaling: dict[str, float]
    lora_dropout: dict[str, float]
    active_adapters: tuple[str, ...]  # what the user selected
    merged_adapters: list[str]  # folded into `weight`, in merge order
    adapters_disabled: bool
    fan_in_fan_out: bool  # base weight stored (in, out), as GPT-2's Conv1D does
    _live: tuple[str, ...]  # active, not merged, not disabled: what forward adds
    _fusable_adapter: str | None  # the only live adapter, if not DoRA: the one the fused path may run
    _row_adapters: Sequence[str] | None  # one adapter name per batch row (mixed batches), or None
    _fused: bool  # the base class is plain nn.Linear / Conv1D, so _LoRAFunction may replace its forward

    @property
    def in_features_(self) -> int:
        return self.weight.shape[0] if self.fan_in_fan_out else self.weight.shape[1]

    @property
    def out_features_(self) -> int:
        return self.weight.shape[1] if self.fan_in_fan_out else self.weight.shape[0]

    # -- adapters --

    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float,
        init: bool | str | None = True,
        use_dora: bool = False,
    ) -> None:
        """Create adapter `name`. `init=None` leaves A and B uninitialised (they are loaded next); "pissa",
        "pissa_niter_<n>" and "olora" move the adapter's share of W out of the base weight."""
        w = self.weight
        # Adapters train in fp32 on a half-precision base (peft's default): tiny tensors, stable updates.
        dtype = (
            torch.float32
            if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point()
            else w.dtype
        )
        A = torch.empty(r, self.in_features_, dtype=dtype, device=w.device)
        B = torch.empty(self.out_features_, r, dtype=dtype, device=w.device)
        if isinstance(self, nn.Embedding):  # as in peft: PiSSA/OLoRA/orthogonal do not apply to embeddings
            if init is not None:
                init_embedding_lora_(A, B, init)
        elif isinstance(init, str) and init.startswith(("pissa", "olora")):
            niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
            with torch.no_grad():
                a, b, residual = (
                    qr_init(self._weight_oi(), r, scaling)
                    if init == "olora"
                    else svd_init(self._weight_oi(), r, scaling, niter)
                )
                A.copy_(a), B.copy_(b)
                w.copy_((residual.T if self.fan_in_fan_out else residual).to(w.dtype))
        elif init is not None:
            init_lora_(A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_scaling[name] = scaling
        self.lora_dropout[name] = dropout
        if use_dora:  # the magnitude starts as ||W + s B A|| per output: the adapter starts as the identity
            with torch.no_grad():
                magnitude = (
                    torch.empty(self.out_features_, dtype=dtype, device=w.device)
                    if init is None
                    else weight_norm(self._weight_oi().float(), (B @ A).float() * scaling)
                )
            self.lora_magnitude[name] = nn.Parameter(magnitude.to(dtype))
        self._refresh()

    def _weight_oi(self) -> torch.Tensor:
        """The base weight laid out (out, in), a view."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_B, self.lora_magnitude):
            if name in store:
                del store[name]
        self.lora_scaling.pop(name, None)
        self.lora_dropout.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)
        self._refresh()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = tuple(names)
        self._refresh()

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def _refresh(self) -> None:
        """Recompute the adapters forward must add, once per state change instead of once per call."""
        if self.adapters_disabled:
            self._live = ()
        else:
            self._live = tuple(
                a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters
            )
        live = self._live
        self._fusable_adapter = live[0] if len(live) == 1 and live[0] not in self.lora_magnitude else None

    # -- merging --

    def delta_weight(self, name: str) -> torch.Tensor:
        return delta_weight(
            self.lora_A[name], self.lora_B[name], self.lora_scaling[name], self.fan_in_fan_out
        )

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the base weight. Idempotent: an adapter already merged is skipped. `safe`
        checks the merged weight for NaN/inf before writing it."""
        for name in self.active_adapters if names is None else names:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            with torch.no_grad():
                if name in self.lora_magnitude:
                    weight = self._merged_dora(name)
                else:
                    weight = merged_weight(self.weight, self.delta_weight(name))
                if safe and not torch.isfinite(weight).all():
                    self._dora_norms.pop(name, None)
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN/inf into the weights; the adapter is broken "
                        "(check its training: learning rate, loss scaling)."
                    )
                self.weight.copy_(weight)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Subtract merged adapters again, last merged first. A DoRA merge scales what was merged before
        it, so where one follows an adapter to unmerge, the adapters merged after that one are unmerged
        too and merged again (deleting a merged adapter must leave the others exactly as if merged alone)."""
        merged = self.merged_adapters
        todo = [n for n in merged if names is None or n in names]
        if todo:
            later = merged[merged.index(todo[0]) :]
            keep = [n for n in later if n not in todo]
            undo = later if keep and any(n in self.lora_magnitude for n in later) else todo
            for name in reversed(undo):
                self._unmerge_one(name)
            self.merge(keep if undo is later else [])
        self._refresh()

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            if name in self.lora_magnitude:
                self._unmerge_dora(name)
            else:
                self.weight.copy_(merged_weight(self.weight, self.delta_weight(name), sign=-1))
        self.merged_adapters.remove(name)

    def _unmerged_weight_oi(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in) with the merged adapters taken out again (a copy in `dtype`): the
        weight forward sees, which a DoRA norm must be taken from."""
        W = self._weight_oi().to(dtype, copy=True)
        for name in reversed(self.merged_adapters):
            delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False).to(
                dtype
            )
            if name in self.lora_magnitude:
                W.mul_((self._dora_norms[name].to(dtype) / self.lora_magnitude[name].to(dtype)).view(-1, 1))
            W.sub_(delta)
        return W

    def base_weight(self) -> torch.Tensor:
        """The base weight as the model has it without the merged adapters (itself if none are merged)."""
        if not self.merged_adapters:
            return self.weight
        W = self._unmerged_weight_oi(torch.promote_types(self.weight.dtype, torch.float32))
        return (W.T if self.fan_in_fan_out else W).to(self.weight.dtype)

    def _merged_dora(self, name: str) -> torch.Tensor:
        """m / ||W0 + delta|| * (W + delta), row-wise in (out, in) layout, with W0 the base weight without
        earlier merged adapters (as forward and peft take the norm), in the weight's layout; the norm is
        kept so that unmerging can divide it out again (it cannot be recomputed from the merged weight)."""
        W = self._weight_oi()
        delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False)
        wide = torch.promote_types(W.dtype, delta.dtype)
        base = self._unmerged_weight_oi(wide) if self.merged_adapters else W.to(wide)
        norm = weight_norm(base, delta.to(wide))
        self._dora_norms[name] = norm
        factor = (self.lora_magnitude[name].to(wide) / norm).view(-1, 1)
        merged = (factor * (W.to(wide) + delta.to(wide))).to(W.dtype)
        return merged.T if self.fan_in_fan_out else merged

    def _unmerge_dora(self, name: str) -> None:
        W = self._weight_oi()
        delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False)
        wide = torch.promote_types(W.dtype, delta.dtype)
        factor = (self.lora_magnitude[name].to(wide) / self._dora_norms.pop(name)).view(-1, 1)
        W.copy_((W.to(wide) / factor - delta.to(wide)).to(W.dtype))

    # -- forward --

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._row_adapters is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        live = self._live
        if not live:
            return self._base_forward(x, *args, **kwargs)
        name = self._fusable_adapter
        if name is not None and self._fused:
            # getattr, as ParameterDict's [] does (FSDP may put plain tensors there), minus a call layer.
            w, b, A, B = self.weight, self.bias, getattr(self.lora_A, name), getattr(self.lora_B, name)
            autocast = torch.is_autocast_enabled(x.device.type)
            if _fusable(autocast, x, w, b, A, B):
                return self._fused_forward(x, w, b, A, B, name, autocast)
        result = self._base_forward(x, *args, **kwargs)
        dtype = result.dtype
        for name in live:  # as peft: summed in the adapters' dtype (fp32), rounded once
            result = result + self._lora_update(result, x, name)
        return result.to(dtype)

    def _fused_forward(self, x, w, b, A, B, name: str, autocast: bool) -> torch.Tensor:
        s = self.lora_scaling[name]
        if autocast:
            device_type = x.device.type
            # What autocast does for F.linear, once for the base and the adapter together: cast the inputs
            # to the compute dtype (A and B through autograd, so their gradients come back in fp32), then
            # run with autocast off. peft instead upcasts x for dropout and lets autocast cast it back.
            dtype = torch.get_autocast_dtype(device_type)
            x, w, A, B = x.to(dtype), w.to(dtype), A.to(dtype), B.to(dtype)
            b = b.to(dtype) if b is not None else None
            with torch.autocast(device_type, enabled=False):
                return self._fused_apply(x, w, b, A, B, s, name)
        return self._fused_apply(x, w, b, A, B, s, name)

    def _fused_apply(self, x, w, b, A, B, s: float, name: str) -> torch.Tensor:
        p = self.lora_dropout[name] if self.training else 0.0
        if torch.is_grad_enabled():
            return _LoRAFunction.apply(x, w, b, A, B, s, p, self.fan_in_fan_out)
        # Without autograd: inference, or a training forward under no_grad (the first pass of reentrant
        # gradient checkpointing, which must drop what its recomputation drops): the same GEMMs and mask.
        return _lora_linear(x, w, b, A, B, s, self.fan_in_fan_out, p)

    def _lora_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` adds to `result` (the reference computation, op for op as peft does it),
        in the adapter's dtype."""
        if isinstance(self, nn.Embedding):
            return self._embedding_update(result, x, name)
        A, B = self.lora_A[name], self.lora_B[name]
        x = x.to(A.dtype)
        p = self.lora_dropout[name]
        dropped = bool(p and self.training)
        if dropped:
            x = F.dropout(x, p)
        if name in self.lora_magnitude:
            return self._dora_update(result, x, name, dropped)
        return F.linear(F.linear(x, A), B) * self.lora_scaling[name]

    def _dora_update(self, result: torch.Tensor, x: torch.Tensor, name: str, dropped: bool) -> torch.Tensor:
        """DoRA (weight-decomposed LoRA): the output of m * (W + s B A) / ||W + s B A|| minus the base
        output. The norm is a constant for the backward pass, as the DoRA paper (4.3) prescribes."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.lora_scaling[name]
        W = self._weight_oi().to(x.dtype)
        norm = weight_norm(W, s * (B @ A).detach().to(x.dtype)).detach()  # (out,)
        scale = (self.lora_magnitude[name] / norm).view(1, -1)
        if dropped:  # the base output was computed from the undropped input: redo it
            base = F.linear(x, W)
        else:
            base = result if self.bias is None else result - self.bias
        return (scale - 1) * base + scale * F.linear(F.linear(x, A), B) * s

    def _embedding_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """peft's Embedding: the token ids looked up in A.T, a second (num_embeddings, r) table, times B.T;
        no dropout (there is no input to drop). A scale the base applies to its lookups (Gemma's scaled
        embeddings) applies to the update too. DoRA rescales per embedding dimension."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.lora_scaling[name]
        after_A = F.embedding(
            x, A.T, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )  # (..., r)
        update = (after_A @ B.T) * s  # (..., dim)
        embed_scale = _embed_scale(self)
        if name in self.lora_magnitude:
            W = self._weight_oi().to(A.dtype)  # (dim, num_embeddings)
            norm = weight_norm(W, s * (B @ A).detach()).detach()  # (dim,)
            scale = self.lora_magnitude[name] / norm
            update = scale * update
            if embed_scale is not None:
                update = update * embed_scale.to(update.dtype)
            return (scale - 1) * result + update  # result + this = scale * result + scaled update, as peft
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return update

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each batch row gets the adapter named for it (or none, for "__base__")."""
        if self.merged_adapters:  # a merged adapter would be in every row, "__base__" ones included
            raise AdapterStateError(
                f"adapter(s) {self.merged_adapters} are merged into the weights; unmerge_adapter() before a "
                "mixed-batch forward (adapter_names=...)."
            )
        rows = _rows_for_batch(self._row_adapters, x.shape[0])
        result = self._base_forward(x, *args, **kwargs)
        if self.adapters_disabled:
            return result
        for name in dict.fromkeys(rows):
            if name == BASE_ROWS or name not in self.lora_A:
                continue
            idx = [i for i, n in enumerate(rows) if n == name]
            result[idx] += self._lora_update(result[idx], x[idx], name).to(result.dtype)  # as peft
        return result

    def __reduce_ex__(self, protocol: int):
        if type(self) in (LoRALinear, LoRAConv1D, LoRAEmbedding):
            return super().__reduce_ex__(protocol)
        # A class lora_layer_class generated for a Linear subclass cannot be found by name: rebuild it.
        return (rebuild_swapped, (lora_layer_class, self._lora_base_class, self.__dict__.copy()))

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.rank(n)}" for n in self.lora_A)
        return f"{super().extra_repr()}, lora=[{adapters}]"


class LoRALinear(LoRALayer, nn.Linear):
    """An `nn.Linear` with LoRA adapters."""


class LoRAConv1D(LoRALayer, Conv1D):
    """GPT-2's `Conv1D` (a Linear with its weight stored (in, out)) with LoRA adapters."""


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """An `nn.Embedding` with LoRA adapters (peft's `lora_embedding_A`/`_B`): A (r, num_embeddings),
    B (dim, r), the weight (num_embeddings, dim) laid out (in, out)."""


_LAYER_CLASSES: dict[type, type[LoRALayer]] = {
    nn.Linear: LoRALinear,
    Conv1D: LoRAConv1D,
    nn.Embedding: LoRAEmbedding,
}


def lora_layer_class(base_cls: type[nn.Module]) -> type[LoRALayer]:
    """The LoRA class for a base class; subclasses of Linear/Conv1D (quantised layers and the like) get
    a generated subclass that keeps their own forward for the base projection."""
    if base_cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[base_cls] = type(f"LoRA{base_cls.__name__}", (LoRALayer, base_cls), {})
    return _LAYER_CLASSES[base_cls]


def _rebuild_lora_layer(base_cls: type[nn.Module], state: dict[str, Any]) -> LoRALayer:
    """(What pickles made before rebuild_swapped() call.)"""
    return rebuild_swapped(lora_layer_class, base_cls, state)


def rebuild_swapped(class_for: Any, base_cls: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    """Unpickle (or deep-copy) a module whose class was swapped for one generated at run time, which
    cannot be found by name: `class_for(base_cls)` makes the class again (`lora_layer_class`, ...)."""
    obj = nn.Module.__new__(class_for(base_cls))
    obj.__dict__.update(state)
    return obj


class ModulesToSave(nn.Module):
    """A module trained and saved in full (e.g. a classification head): keeps the original and one
    trainable copy per adapter, and calls the active adapter's copy. Attribute names match peft's."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self._row_adapters: Sequence[str] | None = None

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def current(self) -> nn.Module:
        if self.adapters_disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self._row_adapters
        if rows is None or self.adapters_disabled:
            return self.current()(x, *args, **kwargs)
        rows = _rows_for_batch(rows, x.shape[0])
        out = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name != BASE_ROWS and name in self.modules_to_save:
                idx = [i for i, n in enumerate(rows) if n == name]
                out[idx] = self.modules_to_save[name](x[idx], *args, **kwargs)
        return out

    def __getattr__(self, name: str) -> Any:
        # `weight`, `in_features`, ... of the module it stands for, so code that inspects heads still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "original_module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.current(), name)


def _embed_scale(module: nn.Module) -> torch.Tensor | None:
    """The scalar an embedding multiplies its lookups by (`embed_scale`, e.g. Gemma3's), as peft reads it."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def _rows_for_batch(rows: Sequence[str], batch: int) -> Sequence[str]:
    """Adapter names per row; `generate` repeats each row k times for beams / several sequences."""
    if len(rows) == batch:
        return rows
    if rows and batch % len(rows) == 0:
        k = batch // len(rows)
        return [name for name in rows for _ in range(k)]
    raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows.")


def make_lora_layer(module: nn.Module) -> LoRALayer:
    """Turn a Linear/Conv1D/Embedding into a LoRA layer in place (no adapters yet). Idempotent."""
    if isinstance(module, LoRALayer):
        return module
    base_cls = type(module)
    module.__class__ = lora_layer_class(base_cls)
    module.lora_A = nn.ParameterDict()
    module.lora_B = nn.ParameterDict()
    module.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
    module._dora_norms = {}
    module.lora_scaling, module.lora_dropout = {}, {}
    module.active_adapters, module.merged_adapters = (), []
    module.adapters_disabled = False
    module.fan_in_fan_out = isinstance(module, (Conv1D, nn.Embedding))
    module._row_adapters = None
    module._fused = base_cls in (nn.Linear, Conv1D)
    module._lora_base_class = base_cls
    module._refresh()
    return module


def unmake_lora_layer(module: LoRALayer) -> nn.Module:
    """Remove every adapter (without merging) and give the module its original class back."""
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        delattr(module, name)
    for name in (
        "lora_scaling",
        "lora_dropout",
        "active_adapters",
        "merged_adapters",
        "adapters_disabled",
        "fan_in_fan_out",
        "_row_adapters",
        "_fused",
        "_live",
        "_fusable_adapter",
        "_dora_norms",
    ):
        module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_lora_base_class")
    return module
