"""Extracting an adapter from a full fine-tune: exact at full rank, Eckart-Young-bounded below it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import batch_for, make_model
from tolerance import ROUNDINGS, assert_close, eps

import hf_lora
from hf_lora import LoRAModel, TargetModulesError

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fine_tuned(kind: str = "llama", steps: int = 5):
    """The base, and a copy fully fine-tuned on its Linear weights (norms and embeddings frozen)."""
    base = make_model(kind)
    tuned = copy.deepcopy(base).train()
    for name, p in tuned.named_parameters():
        p.requires_grad_(any(f"{t}.weight" in name for t in [*LINEARS, "c_attn", "c_proj", "c_fc"]))
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        tuned(**batch_for(kind, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, tuned.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_extraction_reproduces_the_fine_tune(kind, tmp_path):
    base, tuned = fine_tuned(kind)
    expected = tuned(**batch_for(kind)).logits.detach()
    model, report = hf_lora.extract_lora(base, tuned, r=64, return_report=True)
    # at full rank the kept energy is sum(S**2) / sum(S**2), two float64 sums of <= 64 terms: 1 to rounding
    assert all(abs(row.energy_kept - 1) <= ROUNDINGS * eps(torch.float64) for row in report)
    # (and at full rank B A is the SVD's reconstruction of the delta: rounding, so the logits are tuned's)
    with torch.no_grad():
        assert_close(model(**batch_for(kind)).logits, expected)
    model.save_pretrained(tmp_path)
    again = LoRAModel.from_pretrained(make_model(kind), tmp_path)
    with torch.no_grad():
        assert_close(again(**batch_for(kind)).logits, expected)


def test_low_rank_error_is_the_dropped_singular_values():
    base, tuned = fine_tuned()
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model, report = hf_lora.extract_lora(base, tuned, r=2, return_report=True)
    tuned_params = dict(tuned.named_parameters())
    for row in report:
        layer = model.get_submodule(row.path)
        delta = tuned_params[f"{row.path}.weight"].detach() - originals[f"{row.path}.weight"]
        S = torch.linalg.svdvals(delta.double())
        err = torch.linalg.matrix_norm(layer.delta_weight("default").double() - delta.double()).item()
        # Eckart-Young holds exactly; what is left is the float32 SVD and the float32 factors, each within
        # rounding of the delta's norm (a backward-stable SVD), not the dropped values themselves
        bound = ROUNDINGS * eps() * torch.linalg.matrix_norm(delta).item()
        assert abs(err - S[2:].norm().item()) <= bound, row.path
        assert abs(row.error - S[2:].norm().item()) <= bound, row.path
        assert 0 < row.energy_kept < 1


def test_changes_the_adapter_cannot_hold_are_named(caplog):
    base, tuned = fine_tuned()
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.1)
    with caplog.at_level(logging.WARNING):
        hf_lora.extract_lora(base, tuned, r=4)
    assert "model.norm.weight" in caplog.text


def test_mismatched_models_are_refused():
    with pytest.raises(TargetModulesError, match="same architecture"):
        hf_lora.extract_lora(make_model("llama"), make_model("gpt2"), r=4)
    with pytest.raises(TargetModulesError, match="nothing to extract"):
        hf_lora.extract_lora(make_model("llama"), make_model("llama"), r=4)


def test_a_tied_output_head_can_be_saved_in_full():
    """GPT-2's lm_head shares its weight with wte, so named_parameters() lists it only as wte.weight."""
    base = make_model("gpt2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn_like(tuned.lm_head.weight))  # (and so wte, tied)
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.05)
    model = hf_lora.extract_lora(base, tuned, r=64, target_modules=["c_attn"], modules_to_save=["lm_head"])
    assert torch.equal(model.lm_head.modules_to_save["default"].weight, tuned.lm_head.weight)


def low_rank(out_features: int, in_features: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A rank-`rank` matrix with all its singular values equal to 1 (nothing near the rank tolerance)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_features, rank, generator=g))[0]
    V = torch.linalg.qr(torch.randn(in_features, rank, generator=g))[0]
    return U @ V.T


@pytest.mark.parametrize(
    ("kind", "path", "rank"),
    [
        ("gpt2", "transformer.h.0.attn.c_attn", 1),  # Conv1D, weight (in, out) = (64, 192)
        ("gpt2", "transformer.h.0.attn.c_attn", 2),
        ("llama", "model.layers.1.mlp.down_proj", 3),  # Linear, (64, 128)
    ],
)
def test_reported_rank_is_the_rank_of_the_update(kind, path, rank):
    """float32 rounding of W_base + delta must not count: only singular values above rounding noise."""
    base = make_model(kind)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        weight = tuned.get_submodule(path).weight
        weight.add_(0.05 * low_rank(*weight.shape, rank))
    _, report = hf_lora.extract_lora(base, tuned, r=4, return_report=True)
    assert [(row.path, row.rank) for row in report] == [(path, rank)]
    assert report[0].energy_kept > 1 - 1e-9


def test_reported_rank_of_a_wide_bf16_layer():
    """matrix_rank's tolerance (S.max * max(m, n) * eps) exceeds S.max itself for a 1024-wide bf16 layer:
    it reported rank 0. The noise of the stored weights is far smaller."""
    base = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    tuned = copy.deepcopy(base).to(torch.bfloat16)
    with torch.no_grad():
        tuned[0].weight.add_((0.05 * low_rank(1024, 1024, 3)).to(torch.bfloat16))
    _, report = hf_lora.extract_lora(base, tuned, r=4, return_report=True)
    assert [(row.path, row.rank) for row in report] == [("0", 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lower_precision_fine_tune_is_compared_at_its_precision(dtype, caplog):
    """A bf16/fp16 fine-tune of an fp32 base: only the weights the fine-tune changed are updates, and the
    update's rank is not raised by the rounding between the dtypes."""
    base = make_model("llama")
    tuned = copy.deepcopy(base)
    path = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        tuned.get_submodule(path).weight.add_(0.5 * low_rank(64, 64, 2))
    tuned = tuned.to(dtype)
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        model, report = hf_lora.extract_lora(base, tuned, r=4, return_report=True)
    assert [(row.path, row.rank) for row in report] == [(path, 2)]
    assert not caplog.records, "the rounding of untouched weights is no change"
    # the adapter holds the update, off by no more than the fine-tune's own rounding (one ulp of its weights)
    ulp = torch.finfo(dtype).eps * tuned.get_submodule(path).weight.abs().max().item()
    error = model.get_submodule(path).delta_weight("default") - 0.5 * low_rank(64, 64, 2)
    assert error.abs().max().item() <= ulp


@pytest.mark.parametrize(
    ("kind", "changed", "kwargs", "advice", "following_it"),
    [
        (  # a norm: only modules_to_save keeps it
            "llama",
            "model.norm.weight",
            {},
            "save model.norm in full with modules_to_save",
            {"modules_to_save": ["model.norm"]},
        ),
        (  # the bias of a Linear: LoRA holds no bias, target_modules cannot keep it
            "gpt2",
            "transformer.h.1.mlp.c_fc.bias",
            {},
            "save transformer.h.1.mlp.c_fc in full with modules_to_save",
            {"modules_to_save": ["transformer.h.1.mlp.c_fc"]},
        ),
        (  # the weight of a Linear left out of target_modules: targeting it keeps it
            "llama",
            "model.layers.1.self_attn.v_proj.weight",
            {"target_modules": ["model.layers.0.self_attn.q_proj"]},
            "add model.layers.1.self_attn.v_proj to target_modules",
            {"target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]},
        ),
        (  # an input embedding the output head shares (GPT-2 ties lm_head.weight to wte.weight): both
            "gpt2",
            "transformer.wte.weight",
            {},
            "save lm_head, transformer.wte in full with modules_to_save",
            {"modules_to_save": ["transformer.wte", "lm_head"]},
        ),
        (  # the embedding saved, the head that shares its weight not: lm_head would keep the base weight
            "gpt2",
            "transformer.wte.weight",
            {"modules_to_save": ["transformer.wte"]},
            "save lm_head in full with modules_to_save",
            {"modules_to_save": ["transformer.wte", "lm_head"]},
        ),
        (  # an embedding of its own (Llama's): LoRA can hold it too, when targeted
            "llama",
            "model.embed_tokens.weight",
            {},
            "add model.embed_tokens to target_modules",
            {"target_modules": ["model.layers.0.self_attn.q_proj", "model.embed_tokens"]},
        ),
    ],
    ids=["norm", "bias", "untargeted-linear", "tied-embedding", "tied-head-left-out", "untied-embedding"],
)
def test_the_warning_about_left_out_changes_gives_advice_that_works(
    kind, changed, kwargs, advice, following_it, caplog
):
    base = make_model(kind)
    tuned = copy.deepcopy(base)
    first_linear = "transformer.h.0.attn.c_attn" if kind == "gpt2" else "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        tuned.get_submodule(first_linear).weight.add_(0.01)  # something to extract
        tuned.get_parameter(changed).add_(0.1)
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        hf_lora.extract_lora(copy.deepcopy(base), tuned, r=4, **kwargs)
    [record] = caplog.records
    assert changed in record.getMessage() and advice in record.getMessage()
    if "modules_to_save" in advice:
        assert "target_modules" not in record.getMessage(), "LoRA cannot hold these: targeting them is no fix"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        model = hf_lora.extract_lora(copy.deepcopy(base), tuned, r=64, **following_it)
    assert not caplog.records
    batch = batch_for(kind)
    with torch.no_grad():
        assert_close(model(**batch).logits, tuned(**batch).logits)


def test_a_tied_output_head_can_be_targeted():
    """lm_head.weight is not in GPT-2's named_parameters() (it is wte.weight): extraction read it from there."""
    base = make_model("gpt2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * low_rank(*tuned.lm_head.weight.shape, 2))  # (and so wte, tied)
    model = hf_lora.extract_lora(
        base, tuned, r=4, target_modules=["lm_head"], modules_to_save=["transformer.wte"]
    )
    batch = batch_for("gpt2")
    with torch.no_grad():
        assert_close(model(**batch).logits, tuned(**batch).logits)


def test_modules_saved_in_full_are_left_out_of_the_default_targets(caplog):
    """The warning advises saving Linears whose bias changed in full; following it failed with
    "target_modules=[...] matches no module": the default targets still named those Linears."""
    base = make_model("gpt2")
    tuned = copy.deepcopy(base)
    linears = [f"transformer.h.{i}.{name}" for i in (0, 1) for name in ("attn.c_attn", "mlp.c_fc")]
    with torch.no_grad():
        for path in linears:
            tuned.get_submodule(path).weight.add_(0.01 * torch.randn_like(tuned.get_submodule(path).weight))
        tuned.get_submodule(linears[0]).bias.add_(0.1)
        tuned.transformer.ln_f.weight.add_(0.1)
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        hf_lora.extract_lora(copy.deepcopy(base), tuned, r=4)
    assert f"save {linears[0]}, transformer.ln_f in full with modules_to_save" in caplog.text
    caplog.clear()
    saved = [linears[0], "transformer.ln_f"]
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        model = hf_lora.extract_lora(copy.deepcopy(base), tuned, r=64, modules_to_save=saved)
    assert not caplog.records
    assert sorted(path for path, _ in model.lora_layers()) == sorted(linears[1:])
    batch = batch_for("gpt2")
    with torch.no_grad():
        assert_close(model(**batch).logits, tuned(**batch).logits)
    with pytest.raises(
        TargetModulesError, match=r"none is left for LoRA to extract\. Leave some of them out"
    ):
        hf_lora.extract_lora(copy.deepcopy(base), tuned, r=4, modules_to_save=[*linears, "transformer.ln_f"])
