"""Merging task tensors (LoRA factors or dense updates) into one: task arithmetic, TIES, DARE and magnitude
pruning, as peft's `merge_utils` does them, and the factors of a combined update (concatenation, SVD).

Functions of tensors only. The random drops of DARE come from `generator` (the global RNG if None, as in
peft): a generator seeded with s draws on the CPU exactly what `torch.manual_seed(s)` then peft draws.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # the A's and B's merged
DELTA_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # W's, then SVD
COMBINATION_TYPES = ("cat", *DELTA_TYPES, *FACTOR_TYPES)
PRUNING_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("total", "frequency")


def prune(
    tensor: torch.Tensor, density: float, random: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a fraction `density` of the entries: the largest in magnitude, or (`random`, DARE) each with
    probability `density`, the kept ones divided by `density` so the expectation stays."""
    if density >= 1:
        return tensor
    if not random:
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each task tensor agrees with the elected sign: that of the sum ("total") or of the most
    entries ("frequency"); ties elect +."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`method` is a combination type without "_svd" ("svd" alone is "linear"): pruned (magnitude or DARE)
    or not, then the weighted sum, or for TIES the weighted mean of the entries that agree with the
    elected sign."""
    method = method.removesuffix("_svd") if method != "svd" else "linear"
    if method.startswith(("ties", "dare", "magnitude")):
        tensors = [prune(t, density, random=method.startswith("dare"), generator=generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if not method.endswith("ties"):
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def merge_factors(
    method: str,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    rank: int,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (A, B), scaling 1, merging the factors of (A, B, scaling) adapters with sqrt(|w s|) on each
    side (the sign on A's side): exact for one adapter, only an approximation of the weighted sum of the
    updates for several (peft's "linear" and its pruned forms). Factors of a lower rank than the layer's
    largest are zero-padded to it (as they merge), the result to `rank`."""
    roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(parts, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(parts, weights)]
    top = max(A.shape[0] for A, _, _ in parts)
    As = [F.pad(A, (0, 0, 0, top - A.shape[0])) for A, _, _ in parts]
    Bs = [F.pad(B, (0, top - B.shape[1])) for _, B, _ in parts]
    A = merge_tensors(method, As, [r * g for r, g in zip(roots, signs)], **options)
    B = merge_tensors(method, Bs, roots, **options)
    dtype = parts[0][0].dtype
    return F.pad(A, (0, 0, 0, rank - top)).to(dtype), F.pad(B, (0, rank - top)).to(dtype)


def cat_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: the ranks side by side, B_new @ A_new = sum w_i s_i B_i @ A_i (zero-padded to `rank`)."""
    A = torch.cat([A * (w * s) for (A, _, s), w in zip(parts, weights)])
    B = torch.cat([B for _, B, _ in parts], dim=1)
    return F.pad(A, (0, 0, 0, rank - A.shape[0])), F.pad(B, (0, rank - B.shape[1]))


def svd_factors(
    delta_oi: torch.Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the best rank-`rank` approximation of an (out, in) update, B carrying the singular values
    (peft's, after kohya-ss's svd_merge_lora). `clamp`: a quantile of all the factors' entries, beyond
    which (in magnitude) they are clipped. Zero-padded to `rank` where the update has fewer singular values."""
    U, S, Vh = torch.linalg.svd(delta_oi, full_matrices=full_matrices, driver=driver)
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return F.pad(A, (0, 0, 0, rank - A.shape[0])), F.pad(B, (0, rank - B.shape[1]))


def check_merge_options(how: str, density: float | None, majority_sign_method: str) -> None:
    """Clear errors for arguments the combination type needs or cannot take."""
    if how not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}; got {how!r}.")
    if how in PRUNING_TYPES:
        if density is None or not 0 <= density <= 1:
            raise ValueError(
                f"combination_type={how!r} prunes each adapter: give density, the fraction of entries to keep, "
                f"in [0, 1] (e.g. density=0.5); got {density!r}."
            )
        if density == 1:
            logger.warning("density=1 keeps every entry: %s prunes nothing.", how)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be 'total' or 'frequency'; got {majority_sign_method!r}."
        )
