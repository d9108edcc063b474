"""The pure weight maths of LoRA: the dense update, merging it, the initialisations (plain, PiSSA, OLoRA),
DoRA's norm (combining adapters: `task_merge`). Functions of tensors only: no modules, no state."""

from __future__ import annotations

import math

import torch
from torch import nn


def factor_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B @ A (out, in), with a convolution's factors flattened: A (r, in, *k) as (r, in * k), B (out, r, 1...)
    as (out, r)."""
    return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """The dense update `scaling * B @ A` in at least fp32, laid out (out, in) ((in, out) with
    `fan_in_fan_out`: Conv1D; a convolution's kernel flattened, see `factor_product`)."""
    dtype = torch.promote_types(A.dtype, torch.float32)
    delta = factor_product(A.to(dtype), B.to(dtype)) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """`weight + sign * delta`, added in the wider of the two dtypes and rounded once to the weight's."""
    if weight.dtype == delta.dtype:
        return weight + delta if sign > 0 else weight - delta
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + sign * delta.to(wide)).to(weight.dtype)


def rounding_share(stored: torch.Tensor, intended: torch.Tensor, before: torch.Tensor) -> float:
    """How much of an update `intended - before` a lossy store (a quantised weight) lost: ||stored -
    intended|| / ||intended - before|| (0: all of it kept; 1: as much error as the update itself)."""
    update = (intended.float() - before.float()).norm()
    return ((stored.float() - intended.float()).norm() / update.clamp_min(1e-30)).item()


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
