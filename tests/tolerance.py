"""How far two computations of the same numbers may differ, derived from the arithmetic.

Every floating-point operation rounds its exact result to within a relative u = eps/2 (eps =
torch.finfo(dtype).eps: 2^-23 = 1.2e-7 for float32, 2^-52 = 2.2e-16 for float64, 2^-7 = 7.8e-3 for bfloat16).
hf_lora and peft evaluate the same formulas in another order (one fused addmm against a matmul and an add;
our autograd function against peft's Dropout + Linear), so their results differ by rounding alone. Two
bounds follow:

- **One evaluation** (a forward, a gradient, a merged weight): an output that passes through k operations
  that round differently is off by at most about k * eps relative to the largest magnitude summed into it.
  For the tiny test models (2 blocks, width <= 128, logits of magnitude <= 10) k is a few dozen: each
  block has ~8 stages (norms, 4-6 matmuls, softmax, activation), and a sum of n <= 128 terms rounded in
  another order adds ~sqrt(n) * u <= 6 u in the usual random-walk model. `ROUNDINGS = 64` eps of the
  largest magnitude covers that with room, and is still 100x below any real defect (a wrong scaling,
  mask or weight moves logits by 1e-3 or more).
- **Training curves** are chaotic: AdamW divides each gradient by its own running RMS, so a rounding
  difference in a small gradient becomes an O(lr) difference in a weight, and the two runs drift apart
  step by step (measured: after 20 steps peft's own float32 curve is 1.1e-5 away from its float64 one on
  tiny Llama with rank_pattern/alpha_pattern). No fixed float32 tolerance holds by construction there.
  So curves are compared twice: in float64, where rounding is 2^29 times smaller and the same algorithm
  must agree to `curve_atol(float64)`; and in float32, where our run must be as close to the exact
  (float64) curve as peft's own float32 run is, within a factor `ACCURACY_FACTOR`: the same algorithm in
  the same precision is equally accurate, whatever the conditioning of the problem.
"""

from __future__ import annotations

import torch

ROUNDINGS = 64  # roundings that can differ along one evaluation of a tiny model (see above)
ACCURACY_FACTOR = 8  # our float32 error against the exact curve, at most this times peft's own


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def magnitude(*tensors: torch.Tensor | float) -> float:
    """The largest magnitude among the values compared, at least 1 (below 1 the absolute bound rules)."""
    values = [t.detach().abs().max().item() if isinstance(t, torch.Tensor) else abs(t) for t in tensors]
    return max([1.0, *values])


def atol(
    *reference: torch.Tensor | float, dtype: torch.dtype = torch.float32, roundings: int = ROUNDINGS
) -> float:
    """Bound for one evaluation computed in two orders: `roundings` eps of the largest magnitude."""
    return roundings * eps(dtype) * magnitude(*reference)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 roundings: int = ROUNDINGS, what: str = "") -> None:  # fmt: skip
    """`actual` equals `expected` up to rounding in `dtype` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    bound = atol(expected, dtype=dtype, roundings=roundings)
    diff = (actual.detach().to(expected.dtype) - expected.detach()).abs().max().item()
    assert diff <= bound, (
        f"{what or 'values'} differ by {diff:.3g} > {bound:.3g} ({roundings} eps of {dtype})"
    )


def curve_atol(curve: torch.Tensor, dtype: torch.dtype) -> float:
    """Bound for two runs of the same training steps in `dtype`, before chaos can amplify anything: every
    step's loss `ROUNDINGS` eps of its magnitude, accumulated over the steps."""
    return len(curve) * atol(curve, dtype=dtype)


def assert_same_training(ours: dict[torch.dtype, torch.Tensor], ref: dict[torch.dtype, torch.Tensor]) -> None:
    """Loss curves of the same steps from hf_lora and peft, run in float64 and in float32 (see the module
    docstring): equal in float64 up to rounding; in float32 no further from the exact curve than peft's
    own float32 curve is, up to `ACCURACY_FACTOR` (and the float32 rounding of the steps themselves)."""
    exact = ref[torch.float64]
    gap64 = (ours[torch.float64] - exact).abs().max().item()
    assert gap64 <= curve_atol(exact, torch.float64), (
        f"float64 curves differ by {gap64:.3g}: not the same algorithm"
    )
    ours_err = (ours[torch.float32].double() - exact).abs().max().item()
    peft_err = (ref[torch.float32].double() - exact).abs().max().item()
    floor = curve_atol(exact, torch.float32) / ROUNDINGS  # one eps of each step's loss, over the steps
    assert ours_err <= ACCURACY_FACTOR * max(peft_err, floor), (
        f"our float32 curve is {ours_err:.3g} from the exact one, peft's {peft_err:.3g}"
    )


# ---- bounds for cases with their own arithmetic ------------------------------------------------------

MERGE_ROUNDINGS = 4
"""A merge and its unmerge of the same delta (W + d, then - d, with d computed the same way both times): two
roundings, each within u of |W| + |d|, i.e. 1 eps of the magnitude; 4 eps leaves room and is still far below
a forgotten or doubled delta (|d| ~ 1e-2 and more in these tests)."""

LAYER_ROUNDINGS = 16
"""One LoRA layer alone (base(x) + s * B A x, or its gradients) computed in two orders (a fused addmm
against a matmul, a matmul and an add; a mask applied before or after): each of the ~4 stages rounds
within u of what it sums, and a sum of n terms in another order adds ~sqrt(n) u in the random-walk model,
<= 12 u = 6 eps for the n <= 15 x 40 = 600 terms of A's gradient in the layer tests: 16 eps of the largest
magnitude covers both (measured: at most 0.4 of it)."""

BF16_LAYER_ROUNDINGS = 4
"""One LoRA layer in a 16-bit type (bf16, fp16), where one path rounds to it after each of its ~4 stages
(x A^T, then B, * s, + base) and the other once: each rounding within u = eps/2 of the output's magnitude,
2 eps in all; 4 eps with room (3e-2 relative in bf16, 4e-3 in fp16)."""


def assert_close_states(actual: dict, expected: dict, *, dtype: torch.dtype | None = None,
                        roundings: int = ROUNDINGS, what: str = "") -> None:  # fmt: skip
    """Each tensor of `actual` equals the same-named one of `expected` up to rounding (see `assert_close`),
    each bounded relative to its own magnitude."""
    for key in actual:
        assert_close(
            actual[key], expected[key], dtype=dtype, roundings=roundings, what=f"{what} {key}".strip()
        )


def assert_as_accurate(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, *, floor_dtype: torch.dtype,
                       what: str = "") -> None:  # fmt: skip
    """In a low precision (bf16, fp16) one evaluation of a whole model may be off by dozens of that
    precision's roundings, so an absolute bound derived from eps would be too loose to catch anything. The
    same algorithm in the same precision is equally accurate, though: `actual` (ours) must be as close to
    `exact` (the float32 or float64 result) as `reference` (peft, same precision) is, within
    `ACCURACY_FACTOR`, with a floor of a few roundings of `floor_dtype` (should peft be exact by chance)."""
    exact = exact.detach().double()
    ours_err = (actual.detach().double() - exact).abs().max().item()
    ref_err = (reference.detach().double() - exact).abs().max().item()
    floor = atol(exact, dtype=floor_dtype, roundings=MERGE_ROUNDINGS)
    assert ours_err <= ACCURACY_FACTOR * max(ref_err, floor), (
        f"{what or 'values'}: ours are {ours_err:.3g} from the exact ones, the reference's {ref_err:.3g}"
    )


def adamw_atol(steps: int, lr: float, *weights: torch.Tensor | float, betas=(0.9, 0.999)) -> float:
    """Bound for two AdamW runs of the same `steps` whose gradients differ by rounding alone (the same
    algorithm in another order: a batch split over ranks, micro-batches, a loss in chunks), on weights of
    `weights`' magnitude. A step moves a weight by lr * m / (sqrt(v) + eps_adam), and |m / sqrt(v)| is at
    most max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba, section 2.1). Gradients that differ by a
    relative ROUNDINGS eps (as one evaluation does, for a component that is not a near-total cancellation)
    change m by that relative amount and sqrt(v) by as much, so m / sqrt(v) by twice that; and each update
    rounds the weight once (eps |w|). Summed over the steps. A gap in the weights feeds back into later
    gradients through lr |H| (1e-2 x O(1) here) per step: within the room that ROUNDINGS leaves."""
    beta1, beta2 = betas
    gain = max(1.0, (1 - beta1) / (1 - beta2) ** 0.5)
    per_step = 2 * gain * lr * ROUNDINGS * eps() + eps() * magnitude(*weights)
    return steps * per_step
