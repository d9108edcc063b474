"""The LoRA layer: the fused path against the plain reference path, merging as pure functions, init."""

from __future__ import annotations

import copy
import math
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from tolerance import BF16_LAYER_ROUNDINGS, LAYER_ROUNDINGS, MERGE_ROUNDINGS, ROUNDINGS, assert_close, eps
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
from transformers.pytorch_utils import Conv1D

from hf_lora import dropout
from hf_lora.dropout import _lanes, keep_mask, pack_mask, peft_dropout_masks, unpack_mask
from hf_lora.fused import _LoRAFunction
from hf_lora.layers import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    make_lora_layer,
    unmake_lora_layer,
)
from hf_lora.weights import delta_weight, init_lora_, merged_weight


def lora_layer(
    kind: str, bias: bool = True, dropout: float = 0.0, dtype=torch.float32, seed: int = 0, width: int = 24
):
    torch.manual_seed(seed)
    base = nn.Linear(width, 40, bias=bias) if kind == "linear" else Conv1D(40, width)
    if kind == "conv1d":  # GPT-2's Conv1D always has a bias
        nn.init.normal_(base.weight, std=0.2)
    base = base.to(dtype)
    base.requires_grad_(False)
    layer = make_lora_layer(base)
    layer.add_adapter("default", r=4, scaling=2.0, dropout=dropout)
    layer.set_active(["default"])
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.5)
    return layer


def run(layer, x, fused: bool, seed: int = 7):
    """Output and gradients (input, A, B) through one path, with the RNG at the same state."""
    layer._fused = fused
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(("kind", "bias"), [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_fused_path_equals_plain_path(kind, bias, dropout, shape):
    """With peft's masks the fused path computes what the plain (peft) path does, dropout included."""
    layer = lora_layer(kind, bias=bias, dropout=dropout).train()
    x = torch.randn(shape)
    with peft_dropout_masks():
        fused_out, fused_grads = run(layer, x, fused=True)
        plain_out, plain_grads = run(layer, x, fused=False)
    assert_close(fused_out, plain_out, roundings=LAYER_ROUNDINGS, what="output")
    for f, p in zip(fused_grads, plain_grads):
        assert_close(f, p, roundings=LAYER_ROUNDINGS, what="gradient")
    if dropout:  # and dropout really drops something: a different seed changes the output
        other, _ = run(layer, x, fused=True, seed=8)
        # another mask moves the LoRA term (|s B A x| / (1 - p) ~ 1 here) by O(1): 1e-3 is far above rounding
        assert (other - fused_out).abs().max() > 1e-3


@pytest.mark.parametrize(("kind", "bias"), [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("scratch_bytes", [4 << 20, 200])  # 200 bytes: chunks of 2 rows, the last of 1
@pytest.mark.parametrize("width", [24, 21])  # 21: row chunks start inside a byte of the packed mask
def test_fused_path_with_fast_masks_is_dropout_with_that_mask(kind, bias, scratch_bytes, width, monkeypatch):
    """The default CPU masks: output and gradients are those of `base(x) + B A (x * keep) / (1-p) * s`
    for the mask `keep_mask` draws from the same seed, whether the dropout temporaries fit one reused
    buffer or go through it in row chunks (which stay at the buffer's cap)."""
    import hf_lora.dropout as dropout

    monkeypatch.setattr(dropout, "_SCRATCH_BYTES", scratch_bytes)
    monkeypatch.setattr(dropout, "_scratch", dropout.threading.local())
    p = 0.3
    layer = lora_layer(kind, bias=bias, dropout=p, width=width).train()
    x = torch.randn(5, 3, width)
    out, grads = run(layer, x, fused=True, seed=7)
    for buf in dropout._scratch.floats.values():
        assert buf.numel() * buf.element_size() <= max(scratch_bytes, width * 4)
    torch.manual_seed(7)
    keep = keep_mask((15, width), p, x.device).view(5, 3, width)
    assert 0 < keep.sum() < keep.numel()
    xr = x.clone().requires_grad_(True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    ref = layer._base_forward(xr) + ((xr * keep / (1 - p)) @ A.T @ B.T) * 2.0
    ref.backward(torch.linspace(-1, 1, ref.numel()).view_as(ref))
    assert_close(out, ref, roundings=LAYER_ROUNDINGS, what="output")
    for got, want in zip(grads, [xr.grad, A.grad, B.grad]):  # fp32 sums over 15 rows, in another order
        assert_close(got, want, roundings=LAYER_ROUNDINGS, what="gradient")


def test_pack_mask_golden_value():
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8)  # element i -> bit i % 8
    assert pack_mask(keep).tolist() == [0b10001101, 0b00000001]


@pytest.mark.parametrize(
    "n, start, stop",
    [
        (1, 0, 1),
        (8, 0, 8),
        (9, 0, 9),
        (64, 0, 64),
        (1000, 0, 1000),
        (1000, 3, 997),
        (1000, 8, 16),
        (45, 42, 45),
    ],
)
def test_unpack_mask_returns_the_packed_elements(n, start, stop):
    torch.manual_seed(n + start)
    keep = (torch.rand(n) < 0.5).to(torch.uint8)
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_mask(packed, start, stop), keep[start:stop])


def test_dropout_saves_a_bit_packed_mask():
    """With dropout the fused layer saves its input, h and one bit per input element, nothing full-size
    besides the input (peft's Dropout + Linear save the dropped copy and a float mask)."""
    layer = lora_layer("linear", dropout=0.3).train()
    x = torch.randn(5, 3, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    small = [t for t in saved if t.data_ptr() not in (x.data_ptr(), layer.weight.data_ptr())]
    masks = [t for t in small if t.dtype == torch.uint8]
    assert [m.numel() for m in masks] == [15 * 24 // 8]
    assert sum(t.numel() * t.element_size() for t in small) < x.numel() * x.element_size()


@pytest.mark.parametrize(
    "p, lane_dtype, threshold",
    [
        (0.5, torch.int8, 0),  # exact in 8 bits
        (0.25, torch.int8, -64),
        (0.05, torch.int16, 3277 - 2**15),  # 3277 / 2**16 = 0.0500030...
        (0.1, torch.int16, 6554 - 2**15),
        (0.9, torch.int16, 58982 - 2**15),
        (0.01, torch.int32, 42949673 - 2**31),  # 16 bits would give 0.009995 (5e-4 off)
        (1e-7, None, None),  # 32 bits: 429 / 2**32 is 1e-3 off
    ],
)
def test_lanes_are_the_narrowest_that_resolve_p(p, lane_dtype, threshold):
    lanes = _lanes(p)
    assert (lanes is None) == (lane_dtype is None)
    if lanes is not None:
        assert lanes == (lane_dtype, threshold)
        bits = 8 * lane_dtype.itemsize
        # (not rounding: the resolution `_lanes` promises, layers._P_TOLERANCE relative to min(p, 1 - p))
        assert abs((threshold + 2 ** (bits - 1)) / 2**bits - p) <= 1e-4 * min(p, 1 - p)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.01, 1e-7])  # 16, 16, 8, 16, 32 bits, Bernoulli
def test_keep_mask_statistics(p):
    """Keep rate 1 - p, and neighbouring elements independent at every position in a 64-bit random
    word (lanes of one draw, and across draws): both dropped with probability p**2. Binomial tolerance
    of 5 standard deviations."""
    n = 1_000_003  # not a multiple of the lanes per word: the last draw is partly used
    torch.manual_seed(0)
    keep = keep_mask((n,), p, torch.device("cpu"))
    assert keep.shape == (n,) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    drop = ~keep
    for phase in range(8):  # pairs (i, i + 1) with i = phase mod 8: every lane boundary of a word
        i = torch.arange(phase, n - 1, 8)
        pairs, q = drop[i] & drop[i + 1], p * p
        assert abs(pairs.float().mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / i.numel()) + 1e-12


def test_keep_mask_is_seeded_and_fresh_each_call():
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    first, second = keep_mask((64, 33), 0.5, cpu), keep_mask((64, 33), 0.5, cpu)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 33), 0.5, cpu), first)
    assert not torch.equal(first, second)


def test_keep_mask_does_not_depend_on_the_scratch_buffer_size(monkeypatch):
    """Masks larger than the reused buffer of random words are drawn in batches: the same mask, and the
    buffer stays at its cap."""
    import hf_lora.dropout as dropout

    cpu = torch.device("cpu")
    torch.manual_seed(11)
    whole = keep_mask((37, 29), 0.4, cpu)
    monkeypatch.setattr(dropout, "_SCRATCH_WORDS", 50)
    monkeypatch.setattr(dropout, "_scratch", dropout.threading.local())
    torch.manual_seed(11)
    # 1073 elements, 16-bit lanes (4 per word): 6 batches of 200, the last of 73 ends inside a word
    assert torch.equal(keep_mask((37, 29), 0.4, cpu), whole)
    assert dropout._scratch.words.numel() == 50


def test_peft_dropout_masks_draws_f_dropouts_elements():
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    expected = F.dropout(torch.ones(40, 50), 0.2) != 0
    with peft_dropout_masks():
        torch.manual_seed(5)
        assert torch.equal(keep_mask((40, 50), 0.2, cpu), expected)
        with peft_dropout_masks(False):
            torch.manual_seed(5)
            assert not torch.equal(keep_mask((40, 50), 0.2, cpu), expected)
        torch.manual_seed(5)
        assert torch.equal(keep_mask((40, 50), 0.2, cpu), expected), "the outer setting is restored"
    torch.manual_seed(5)
    assert not torch.equal(keep_mask((40, 50), 0.2, cpu), expected)


def test_fused_path_is_the_one_that_runs():
    layer = lora_layer("linear").train()
    out = layer(torch.randn(3, 24, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_LoRAFunctionBackward"


def test_training_after_a_forward_under_inference_mode(monkeypatch):
    # The dropout path's per-thread buffers must not be created as inference tensors: a later training
    # forward writes into them (sampling mid-training without eval() used to break every later step).
    monkeypatch.setattr(dropout, "_scratch", threading.local())  # no buffers yet on this thread
    layer = lora_layer("linear", dropout=0.3).train()
    x = torch.randn(6, 24)
    with torch.inference_mode():
        layer(x)
    out, grads = run(layer, x, fused=True)
    assert out.shape == (6, 40) and all(g is not None for g in grads)


def test_fused_function_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: _LoRAFunction.apply(t[0], w, t[1], t[2], t[3], 1.5, 0.0, False), (x, b, A, B)
    )
    assert torch.autograd.gradcheck(
        lambda *t: _LoRAFunction.apply(t[0], w.T, t[1], t[2], t[3], 0.5, 0.0, True), (x, b, A, B)
    )


@pytest.mark.parametrize(("kind", "bias"), [("linear", True), ("conv1d", True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_path_under_autocast_matches_the_plain_path(kind, bias, dropout):
    """Trainer(bf16=True) runs the model under autocast: the fused path casts once and must agree with
    the plain (peft) path to bf16 rounding, draw the same dropout mask, and give fp32 adapter grads."""
    layer = lora_layer(kind, bias=bias, dropout=dropout).train()
    x = torch.randn(4, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), peft_dropout_masks():
        fused_out, fused_grads = run(layer, x, fused=True)
        plain_out, plain_grads = run(layer, x, fused=False)
        layer._fused = True
        assert type(layer(x.requires_grad_()).grad_fn).__name__ == "_LoRAFunctionBackward"
    assert fused_out.dtype == plain_out.dtype == torch.bfloat16
    # the plain path rounds to bf16 after each of x A^T, (.) B^T, * s and + base, the fused path once: a
    # handful of bf16 roundings of the output's magnitude (BF16_LAYER_ROUNDINGS); the same for each gradient
    assert_close(fused_out.float(), plain_out.float(), dtype=torch.bfloat16, roundings=BF16_LAYER_ROUNDINGS)
    for f, p in zip(fused_grads, plain_grads):
        assert f.dtype == p.dtype
        assert_close(
            f.float(), p.float(), dtype=torch.bfloat16, roundings=BF16_LAYER_ROUNDINGS, what="gradient"
        )
    assert fused_grads[1].dtype == fused_grads[2].dtype == torch.float32, "A and B grads stay fp32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_take_the_plain_path(dtype):
    layer = lora_layer("linear", dtype=dtype)
    x = torch.randn(2, 24, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert type(out.grad_fn).__name__ != "_LoRAFunctionBackward"
    expected = (
        layer._base_forward(x).float()
        + (x.float() @ layer.lora_A["default"].T @ layer.lora_B["default"].T) * 2.0
    ).to(dtype)
    # the layer's LoRA term is computed in `dtype` (x A^T, B, * s, + base each rounded), `expected` in fp32
    # and rounded once: a handful of roundings of `dtype` (BF16_LAYER_ROUNDINGS, whatever the 16-bit type)
    assert_close(out.float(), expected.float(), dtype=dtype, roundings=BF16_LAYER_ROUNDINGS)


def test_delta_and_merge_golden_values():
    A = torch.tensor([[1.0, 0.0, 2.0]])  # (r=1, in=3)
    B = torch.tensor([[1.0], [-1.0]])  # (out=2, r=1)
    expected = torch.tensor([[0.5, 0.0, 1.0], [-0.5, 0.0, -1.0]])
    assert torch.equal(delta_weight(A, B, 0.5, fan_in_fan_out=False), expected)
    assert torch.equal(delta_weight(A, B, 0.5, fan_in_fan_out=True), expected.T)
    w = torch.ones(2, 3, dtype=torch.bfloat16)
    merged = merged_weight(w, expected)
    assert merged.dtype == torch.bfloat16 and torch.equal(
        merged.float(), (1 + expected).to(torch.bfloat16).float()
    )
    assert torch.equal(merged_weight(merged, expected, sign=-1), w)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_merge_is_idempotent_and_exact(kind):
    layer = lora_layer(kind)
    x = torch.randn(4, 24)
    expected = layer(x).detach()
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert_close(layer(x), expected, roundings=LAYER_ROUNDINGS, what="merged forward against unmerged")
    layer.unmerge()
    layer.unmerge()
    assert_close(layer.weight, w0, roundings=MERGE_ROUNDINGS, what="unmerged weight")
    assert not layer.merged_adapters


def test_init_modes():
    A, B = torch.empty(8, 256), torch.empty(32, 8)
    init_lora_(A, B, True)
    bound = 1 / math.sqrt(256)  # kaiming-uniform with a=sqrt(5) on fan_in=256
    assert torch.all(B == 0) and A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    init_lora_(A, B, "gaussian")
    assert torch.all(B == 0) and abs(A.std().item() - 1 / 8) < 0.01
    init_lora_(A, B, "orthogonal")  # peft's: both factors non-zero, their product zero
    # B @ A is 0 exactly; what is left is rounding (of Q's orthogonality and of the products), relative to
    # the terms summed: ROUNDINGS eps of |B| @ |A|
    assert A.abs().min() > 0 and B.abs().min() > 0
    assert (B @ A).abs().max().item() <= ROUNDINGS * eps() * (B.abs() @ A.abs()).max().item()
    init_lora_(A, B, False)
    assert B.abs().sum() > 0


def test_make_and_unmake_keep_the_same_parameters():
    base = nn.Linear(4, 3)
    weight = base.weight
    layer = make_lora_layer(base)
    assert type(layer) is LoRALinear and layer.weight is weight and make_lora_layer(layer) is layer
    layer.add_adapter("a", r=2, scaling=1.0, dropout=0.0)
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A.a", "lora_B.a"}
    plain = unmake_lora_layer(layer)
    assert (
        type(plain) is nn.Linear
        and plain.weight is weight
        and set(dict(plain.named_parameters())) == {"weight", "bias"}
    )
    assert type(make_lora_layer(Conv1D(3, 4))) is LoRAConv1D


# ---- embeddings -------------------------------------------------------------------------------------


class Lookup(nn.Module):
    """A model that is one embedding table (plain or Gemma3's scaled one), so that the layer is compared
    with peft's `lora.Embedding` on its own."""

    def __init__(self, scaled: bool = False):
        super().__init__()
        self.emb = (
            Gemma3TextScaledWordEmbedding(50, 16, padding_idx=0, embed_scale=4.0)
            if scaled
            else nn.Embedding(50, 16, padding_idx=0)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


EMBEDDING_CASES = {
    "plain": dict(scaled=False, use_dora=False),
    "dora": dict(scaled=False, use_dora=True),
    "gemma3-scaled": dict(scaled=True, use_dora=False),
    "gemma3-scaled-dora": dict(scaled=True, use_dora=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EMBEDDING_CASES)
def test_embedding_layer_matches_peft(case, dtype):
    """Output, gradients (A, B, DoRA magnitude), merged weight and unmerge, against peft's lora.Embedding,
    with random A and B (peft's init leaves A at zero) and a padding row in the batch."""
    from peft import LoraConfig, get_peft_model

    from hf_lora import LoRAConfig, get_lora_model
    from tests.reference import copy_lora_weights

    scaled, use_dora = EMBEDDING_CASES[case]["scaled"], EMBEDDING_CASES[case]["use_dora"]
    torch.manual_seed(0)
    base = Lookup(scaled).to(dtype)
    fields = dict(r=4, lora_alpha=8, target_modules=["emb"], use_dora=use_dora)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    layer = ours.emb
    with torch.no_grad():
        layer.lora_A["default"].normal_()
        layer.lora_B["default"].normal_(std=0.1)
    copy_lora_weights(ours, ref)
    if use_dora:  # the magnitude depends on A and B: take peft's, computed from the same factors
        ref.base_model.model.emb.lora_magnitude_vector["default"].weight.data.mul_(1.5)
        layer.lora_magnitude["default"].data.copy_(
            ref.base_model.model.emb.lora_magnitude_vector["default"].weight
        )
    ids = torch.tensor([[0, 3, 7, 3], [49, 0, 1, 2]])
    # one layer's roundings: in float32 LAYER_ROUNDINGS; in bf16 a handful of bf16 roundings of the output
    roundings = LAYER_ROUNDINGS if dtype == torch.float32 else BF16_LAYER_ROUNDINGS
    grad = torch.linspace(-1, 1, 2 * 4 * 16).view(2, 4, 16)

    out_ref, out = ref(ids), ours(ids)
    assert out.dtype == out_ref.dtype == dtype
    assert_close(out.float(), out_ref.float(), dtype=dtype, roundings=roundings, what="output")
    assert (out.float() - base_output(ours, ids).float()).abs().max() > 0.1, "the adapter changes the output"
    out_ref.backward(grad.to(dtype)), out.backward(grad.to(dtype))
    twin = ref.base_model.model.emb
    pairs = [
        (layer.lora_A["default"], twin.lora_embedding_A["default"]),
        (layer.lora_B["default"], twin.lora_embedding_B["default"]),
    ]
    if use_dora:
        pairs.append((layer.lora_magnitude["default"], twin.lora_magnitude_vector["default"].weight))
    for mine, theirs in pairs:
        assert mine.grad is not None
        assert_close(mine.grad, theirs.grad, dtype=dtype, roundings=roundings, what="gradient")
    assert torch.all(layer.lora_A["default"].grad[:, 0] == 0), "no gradient for the padding row"

    w0 = layer.weight.detach().clone()
    ours.merge_adapter(), ref.merge_adapter()
    if dtype == torch.float32:
        assert torch.equal(layer.weight, twin.base_layer.weight)
    else:  # peft rounds an embedding's delta to bf16 before adding it; we round once, as peft's Linear does
        # the two merged weights differ by that extra rounding of the delta (and of its sum): MERGE_ROUNDINGS
        assert_close(
            layer.weight.float(), twin.base_layer.weight.float(), dtype=dtype, roundings=MERGE_ROUNDINGS
        )
        if not use_dora:
            assert torch.equal(layer.weight, (w0.float() + layer.delta_weight("default")).to(dtype))
    ours.merge_adapter()  # idempotent
    # a lookup of the merged weight (rounded to `dtype` once) against the lookup plus s * B A (each rounded)
    assert_close(ours(ids).float(), out.float(), dtype=dtype, roundings=roundings, what="merged output")
    ours.unmerge_adapter()
    assert_close(
        layer.weight.float(), w0.float(), dtype=dtype, roundings=MERGE_ROUNDINGS, what="unmerged weight"
    )


def base_output(model, ids):
    with model.disable_adapter():
        return model(ids)


@pytest.mark.parametrize(
    ("init", "a_zero"), [(True, True), ("gaussian", True), ("pissa", True), (False, False)]
)
def test_embedding_init_is_peft_s(init, a_zero):
    """A zeros and B standard normal for any init but False (peft's rule: PiSSA/OLoRA leave embeddings and
    their weights alone); False: both standard normal."""
    layer = make_lora_layer(nn.Embedding(2000, 256))
    w0 = layer.weight.detach().clone()
    layer.add_adapter("default", r=8, scaling=1.0, dropout=0.1, init=init)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (8, 2000) and B.shape == (256, 8) and torch.equal(layer.weight, w0)
    assert bool(torch.all(A == 0)) is a_zero
    for t in (B,) if a_zero else (A, B):
        assert abs(t.std().item() - 1) < 0.1 and abs(t.mean().item()) < 0.1


def test_embedding_layer_has_no_dropout_and_pickles():
    """peft applies no dropout to embeddings (there is no input to drop), whatever lora_dropout says."""
    layer = make_lora_layer(nn.Embedding(30, 8))
    layer.add_adapter("default", r=2, scaling=1.0, dropout=0.9, init=False)
    layer.set_active(["default"])
    layer.train()
    ids = torch.arange(30)
    assert torch.equal(layer(ids), layer(ids))
    expected = layer.weight + (layer.lora_A["default"].T @ layer.lora_B["default"].T)
    assert_close(layer(ids), expected, roundings=MERGE_ROUNDINGS)  # a sum of r = 2 products, and an add
    again = pickle.loads(pickle.dumps(layer))
    assert type(again) is LoRAEmbedding and torch.equal(again(ids), layer(ids))
    assert type(unmake_lora_layer(layer)) is nn.Embedding
