"""add_weighted_adapter's combination types (TIES, DARE, magnitude pruning and their SVD forms) against peft's."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.model import LoraModel as PeftLoraModel
from peft.utils import merge_utils
from reference import copy_lora_weights, randomise_B
from tiny_models import make_model
from tolerance import assert_close

from hf_lora import LoRAConfig, get_lora_model, task_merge
from hf_lora.task_merge import COMBINATION_TYPES, PRUNING_TYPES

TARGETS = ["c_attn", "c_proj", "c_fc"]


def pair(targets=TARGETS):
    """Our GPT-2 with adapters "default" (r=4, alpha 8) and "b" (r=4, alpha 16), and peft's twin."""
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ref.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    model = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, target_modules=targets))
    model.add_adapter("b", LoRAConfig(r=4, lora_alpha=16, target_modules=targets))
    randomise_B(model)
    with torch.no_grad():  # A of the same scale as B, so that pruning picks entries of both adapters
        for _, layer in model.lora_layers():
            for A in layer.lora_A.values():
                A.mul_(0.1 / A.abs().max())
    copy_lora_weights(model, ref, "default")
    copy_lora_weights(model, ref, "b")
    return model, ref


@pytest.fixture
def peft_draws_from(monkeypatch):
    """peft draws DARE's masks from the global RNG, but first initialises the new adapter from it too: seed
    it right after that, so that peft's drops start where a generator seeded with `seed` starts."""

    def arrange(seed: int) -> None:
        inject = PeftLoraModel.inject_adapter

        def inject_then_seed(self, *args, **kwargs):
            out = inject(self, *args, **kwargs)
            torch.manual_seed(seed)
            return out

        monkeypatch.setattr(PeftLoraModel, "inject_adapter", inject_then_seed)

    return arrange


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("targets", [TARGETS, ["wte", *TARGETS]], ids=["linear", "embedding"])
@pytest.mark.parametrize("how", [t for t in COMBINATION_TYPES if t not in ("cat", "svd", "linear")])
def test_combination_types_equal_peft(how, targets, sign, peft_draws_from):
    if sign == "frequency" and "ties" not in how:
        pytest.skip("the majority sign only applies to TIES")
    model, ref = pair(targets)
    weights, density = [0.7, -0.4], 0.5  # a negative weight: subtracting a task
    peft_draws_from(7)
    options = dict(combination_type=how, density=density, majority_sign_method=sign)
    model.add_weighted_adapter(["default", "b"], weights, "mix", seed=7, **options)
    ref.add_weighted_adapter(["default", "b"], weights, "mix", **options)
    assert model.peft_config["mix"].r == ref.peft_config["mix"].r
    pruned_somewhere = False
    for path, layer in model.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        ours, theirs = layer.delta_weight("mix"), twin.get_delta_weight("mix")
        # The same masks on the same tensors: only the products round differently (and for the SVD forms,
        # the same torch.linalg.svd call on the same matrix). A single entry pruned by one and kept by the
        # other, or another DARE draw, moves the update by ~1e-3, 100x above the bound (~1e-5).
        assert_close(ours, theirs, what=f"{how} {path}")
        exact = sum(w * layer.delta_weight(n) for n, w in zip(["default", "b"], weights))
        pruned_somewhere |= (ours - exact).abs().max().item() > 1e-4
    assert pruned_somewhere, "the combination is the plain weighted sum: nothing was pruned"


@pytest.mark.parametrize("clamp", [None, 0.9])
@pytest.mark.parametrize("full", [True, False])
def test_svd_arguments_equal_peft(clamp, full):
    model, ref = pair()
    options = dict(combination_type="svd", svd_rank=3, svd_clamp=clamp, svd_full_matrices=full)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", **options)
    ref.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", **options)
    for path, layer in model.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        # (clamping cuts the factors' signs alike: the same SVD gives the same factors, not just products)
        assert_close(layer.lora_A["mix"], twin.lora_A["mix"].weight, what=f"A {path}")
        assert_close(layer.lora_B["mix"], twin.lora_B["mix"].weight, what=f"B {path}")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "linear"])
def test_merge_tensors_equals_peft_merge_utils(method):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 10, generator=g) for _ in range(3)]
    weights = [0.5, -1.0, 2.0]
    ours = task_merge.merge_tensors(
        method, tensors, weights, density=0.3, generator=torch.Generator().manual_seed(3)
    )
    torch.manual_seed(3)
    w = torch.tensor(weights)
    theirs = {
        "ties": lambda: merge_utils.ties(tensors, w, 0.3),
        "dare_linear": lambda: merge_utils.dare_linear(tensors, w, 0.3),
        "dare_ties": lambda: merge_utils.dare_ties(tensors, w, 0.3),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(tensors, w, 0.3),
        "linear": lambda: merge_utils.task_arithmetic(tensors, w),
    }[method]()
    assert torch.equal(ours, theirs)  # the same operations in the same order on the same tensors


def test_dare_with_a_seed_is_reproducible_and_seeds_differ():
    deltas = {}
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        model, _ = pair()
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], name, "dare_ties", density=0.5, seed=seed)
        deltas[name] = model.transformer.h[0].attn.c_attn.delta_weight(name)
    assert torch.equal(deltas["one"], deltas["again"])
    assert not torch.equal(deltas["one"], deltas["other"])


@pytest.mark.parametrize("how", PRUNING_TYPES)
def test_pruning_types_need_a_density(how):
    model, _ = pair()
    with pytest.raises(ValueError, match="give density"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", how)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", how, density=1.5)
    assert model.adapters == ["default", "b"]


def test_bad_options_are_named():
    model, _ = pair()
    with pytest.raises(ValueError, match="combination_type must be one of"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", "average")
    with pytest.raises(ValueError, match="svd_rank must be a positive int"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", "svd", svd_rank=0)
    with pytest.raises(ValueError, match="majority_sign_method"):
        model.add_weighted_adapter(
            ["default", "b"], [1.0, 1.0], "mix", "ties", density=0.5, majority_sign_method="x"
        )


def test_a_failure_half_way_leaves_the_model_as_it_was(monkeypatch):
    model, _ = pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return task_merge.svd_factors(*args, **kwargs)

    monkeypatch.setattr("hf_lora.weighted.svd_factors", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", "ties_svd", density=0.5)
    assert model.adapters == ["default", "b"] and model.active_adapters == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
