"""Extracting an adapter from a full fine-tune: exact at full rank, Eckart-Young-bounded below it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import batch_for, make_model

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
    assert all(abs(row.energy_kept - 1) < 1e-9 for row in report)
    with torch.no_grad():
        assert (model(**batch_for(kind)).logits - expected).abs().max().item() <= 1e-4
    model.save_pretrained(tmp_path)
    again = LoRAModel.from_pretrained(make_model(kind), tmp_path)
    with torch.no_grad():
        assert (again(**batch_for(kind)).logits - expected).abs().max().item() <= 1e-4


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
        assert abs(err - S[2:].norm().item()) <= 1e-5, row.path
        assert abs(row.error - S[2:].norm().item()) <= 1e-6
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
