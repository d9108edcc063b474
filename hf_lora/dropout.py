"""Dropout for the fused path: keep-masks drawn fast on CPU (or as `F.dropout` draws them, for comparing
with peft), packed to one bit per element for backward, and the per-thread scratch buffers the dropout
temporaries go through."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

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


def row_chunks(x2d: torch.Tensor) -> list[slice]:
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


def buffer(slot: int, like: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised (rows, like.shape[1]) tensor of like's dtype; on CPU, per-thread buffer `slot`."""
    return _flat_buffer(slot, like, rows * like.shape[1], like.dtype).view(rows, like.shape[1])


def dropped(x2d: torch.Tensor, keep: torch.Tensor, rows: slice) -> torch.Tensor:
    """x2d[rows] * keep (the mask's rows, unscaled dropout), in buffer 0."""
    xk = buffer(0, x2d, rows.stop - rows.start)
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


def keep_bytes(x2d: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """x2d's keep-mask as 0/1 bytes (uint8 -> float is vectorised on CPU, bool -> float is not: 8x
    slower); None without dropout."""
    return keep_mask(x2d.shape, dropout_p, x2d.device).view(torch.uint8) if dropout_p > 0 else None
