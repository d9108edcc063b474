"""Every public operation that changes a model is all or nothing: made to fail at every step it takes
(tests/fault_injection.py), it leaves the model exactly as it was, and a retry then works.

test_reliability2.py does this for get_lora_model and add_adapter; here the loading path (from_pretrained,
load_adapter, set_adapter_state_dict: files read and checked, then a plan applied) and the operations on a
built model (merging, unmerging, deleting, switching, weighted combinations, merge_and_unload).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fault_injection import every_step
from reference import randomise_B
from tiny_models import make_model
from tolerance import MERGE_ROUNDINGS

import hf_lora
from hf_lora import LoRAConfig, LoRAModel, get_lora_model

CONFIGS = {
    "lora": LoRAConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], lora_alpha=8),
    "dora+saved": LoRAConfig(r=4, target_modules=["c_attn"], use_dora=True, modules_to_save=["ln_f"]),
    "tokens+patterns": LoRAConfig(
        r=2, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 4}, trainable_token_indices=[1, 5]
    ),
}


def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_model("gpt2")


def one_adapter() -> LoRAModel:
    """A LoRA model with a trained-looking adapter "default" (B not zero: merging changes the weights)."""
    model = get_lora_model(base(), LoRAConfig(r=2, target_modules=["c_attn", "c_fc"]))
    torch.manual_seed(1)
    randomise_B(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each config's adapter on disk, B randomised."""
    out = {}
    for name, config in CONFIGS.items():
        model = get_lora_model(base(), config)
        torch.manual_seed(2)
        randomise_B(model)
        out[name] = tmp_path_factory.mktemp(name.replace("+", "-"))
        model.save_pretrained(out[name])
    return out


# ---- loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_from_pretrained_failing_at_any_step_leaves_the_base_exactly_as_before(name, saved):
    steps = every_step(lambda m: LoRAModel.from_pretrained(m, saved[name]), base)
    assert steps > 20


def test_from_pretrained_all_adapters_failing_at_any_step_leaves_the_base_exactly_as_before(tmp_path):
    folder = tmp_path / "all"
    model = get_lora_model(base(), CONFIGS["lora"])
    model.add_adapter("second", CONFIGS["tokens+patterns"])
    torch.manual_seed(4)
    randomise_B(model)
    model.save_pretrained(folder)
    every_step(lambda m: LoRAModel.from_pretrained(m, folder, all_adapters=True), base)


@pytest.mark.parametrize("name", CONFIGS)
def test_load_adapter_failing_at_any_step_leaves_the_model_exactly_as_before(name, saved):
    every_step(lambda m: m.load_adapter(saved[name], "other"), one_adapter)


def test_set_adapter_state_dict_failing_at_any_step_leaves_the_model_exactly_as_before(saved):
    model = LoRAModel.from_pretrained(base(), saved["lora"])
    tensors = hf_lora.adapter_state_dict(model)

    every_step(
        lambda m: hf_lora.set_adapter_state_dict(m, tensors), lambda: get_lora_model(base(), CONFIGS["lora"])
    )


# ---- operations on a built model ---------------------------------------------------------------------


def two_adapters() -> LoRAModel:
    model = one_adapter()
    model.add_adapter("other", LoRAConfig(r=4, target_modules=["c_attn"], lora_alpha=4))
    torch.manual_seed(3)
    randomise_B(model)
    return model


OPERATIONS = {
    "merge_adapter": lambda m: m.merge_adapter(),
    "merge_adapter(safe)": lambda m: m.merge_adapter(safe_merge=True),
    "merge_adapter(both)": lambda m: m.merge_adapter(["default", "other"]),
    "delete_adapter": lambda m: m.delete_adapter("other"),
    "set_adapter": lambda m: m.set_adapter("other"),
    "weighted(cat)": lambda m: m.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", "cat"),
    "weighted(svd)": lambda m: m.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", "svd"),
}


@pytest.mark.parametrize("op", OPERATIONS)
def test_operations_failing_at_any_step_leave_the_model_exactly_as_before(op):
    every_step(OPERATIONS[op], two_adapters)


def test_unmerge_failing_at_any_step_leaves_the_model_as_before():
    """The layers unmerged before the failure are merged again: their weights are back up to rounding (W
    - d + d; copying every merged weight first would cost a copy of every adapted weight), as merge_adapter
    promises for its own failures."""

    def merged():
        model = two_adapters()
        model.merge_adapter(["default", "other"])
        return model

    every_step(lambda m: m.unmerge_adapter(), merged, rounding=MERGE_ROUNDINGS)


@pytest.mark.parametrize("op", ["merge_and_unload", "unload"])
def test_unloading_failing_at_any_step_leaves_the_model_exactly_as_before(op):
    every_step(lambda m: getattr(m, op)(), two_adapters)


def test_hotswapping_failing_at_any_step_leaves_the_model_exactly_as_before(saved):
    def loaded():
        return LoRAModel.from_pretrained(base(), saved["lora"])

    def prepared():
        model = loaded()
        hf_lora.prepare_for_hotswap(model, target_rank=8)
        return model

    every_step(lambda m: hf_lora.prepare_for_hotswap(m, target_rank=8), loaded)
    every_step(lambda m: hf_lora.hotswap_adapter(m, saved["lora"], "default"), prepared)
