"""peft's integration surface, as transformers and diffusers call it: the loading keywords (low_cpu_mem_usage,
key_mapping, autocast_adapter_dtype), adapter_state_dict / set_adapter_state_dict, get_layer_status /
get_model_status and set_requires_grad, each against peft's own on the same model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import get_layer_status as peft_layer_status
from peft import get_model_status as peft_model_status
from reference import copy_lora_weights, randomise_B
from tiny_models import batch_for, make_model
from tolerance import assert_close

import hf_lora
from hf_lora import AdapterFormatError, AdapterStateError, LoRAConfig, LoRAModel, get_lora_model

FIELDS = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])


def saved(tmp_path, fields=FIELDS, kind="gpt2"):
    model = get_lora_model(make_model(kind), LoRAConfig(**fields))
    randomise_B(model)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**batch_for(kind)).logits
    return tmp_path, logits


# ---- loading keywords ------------------------------------------------------------------------------


@pytest.mark.parametrize("all_adapters", [False, True])
def test_low_cpu_mem_usage_assigns_the_files_tensors(tmp_path, all_adapters):
    path, logits = saved(tmp_path)
    model = LoRAModel.from_pretrained(
        make_model("gpt2"), path, low_cpu_mem_usage=True, all_adapters=all_adapters
    )
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch_for("gpt2")).logits, logits)  # the very tensors: bit-equal
    model.load_adapter(path, "again", low_cpu_mem_usage=True)
    layer = model.transformer.h[0].attn.c_attn
    assert torch.equal(layer.lora_B["again"], layer.lora_B["default"])
    assert not layer.lora_A["again"].requires_grad and layer.lora_A["again"].device.type == "cpu"


def test_low_cpu_mem_usage_creates_the_adapter_on_meta(tmp_path, monkeypatch):
    """The adapter is created on the meta device (no memory, no init), then the file's tensors are assigned."""
    path, _ = saved(tmp_path)
    devices = []
    add = hf_lora.LoRALayer.add_adapter

    def spy(self, *args, **kwargs):
        add(self, *args, **kwargs)
        devices.append(self.lora_A[args[0]].device.type)

    monkeypatch.setattr(hf_lora.LoRALayer, "add_adapter", spy)
    LoRAModel.from_pretrained(make_model("gpt2"), path, low_cpu_mem_usage=True)
    assert devices and set(devices) == {"meta"}


def test_a_low_cpu_mem_usage_load_that_fails_leaves_no_adapter(tmp_path, monkeypatch):
    path, _ = saved(tmp_path)
    model = get_lora_model(make_model("gpt2"), LoRAConfig(**FIELDS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr("hf_lora.loading._assign", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        model.load_adapter(path, "other", low_cpu_mem_usage=True)
    assert model.adapters == ["default"]
    assert (
        all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        and before.keys() == model.state_dict().keys()
    )


def test_key_mapping_renames_the_files_keys_as_peft(tmp_path):
    """A checkpoint whose modules were renamed: peft's key_mapping (first matching pattern wins) maps the
    file's keys onto the model's. Saved from a model whose block list is called `blocks`."""
    path, logits = saved(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(
        {k.replace(".h.", ".blocks."): v for k, v in tensors.items()}, path / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterFormatError, match="does not fit"):
        LoRAModel.from_pretrained(make_model("gpt2"), path)
    mapping = {r"^transformer\.blocks\.": "transformer.h.", r"^transformer\.": "unused."}
    ours = LoRAModel.from_pretrained(make_model("gpt2"), path, key_mapping=mapping)
    ref = PeftModel.from_pretrained(make_model("gpt2"), path, key_mapping=mapping)
    with torch.no_grad():
        assert torch.equal(ours(**batch_for("gpt2")).logits, logits)
        assert_close(ref(**batch_for("gpt2")).logits, logits, what="peft maps the same keys")
    ours.load_adapter(path, "b", key_mapping=mapping)
    assert "b" in ours.adapters


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft(tmp_path, autocast):
    path, _ = saved(tmp_path)
    ours = LoRAModel.from_pretrained(
        make_model("gpt2").to(torch.bfloat16), path, autocast_adapter_dtype=autocast
    )
    ref = PeftModel.from_pretrained(
        make_model("gpt2").to(torch.bfloat16), path, autocast_adapter_dtype=autocast
    )
    theirs = ref.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    ours_A = ours.transformer.h[0].attn.c_attn.lora_A["default"]
    assert ours_A.dtype == theirs.dtype == (torch.float32 if autocast else torch.bfloat16)
    assert torch.equal(ours_A, theirs)
    ours.load_adapter(path, "b", autocast_adapter_dtype=autocast)
    assert ours.transformer.h[0].attn.c_attn.lora_B["b"].dtype == theirs.dtype


# ---- the state-dict pair -------------------------------------------------------------------------


def test_set_adapter_state_dict_takes_peft_state_dicts():
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**FIELDS))
    ours = get_lora_model(base, LoRAConfig(**FIELDS))
    randomise_B(ours)
    copy_lora_weights(ours, ref)
    ours.add_adapter("b", LoRAConfig(**FIELDS))
    theirs = get_peft_model_state_dict(ref)
    assert hf_lora.adapter_state_dict(ours).keys() == theirs.keys()
    hf_lora.set_adapter_state_dict(ours, theirs, "b")
    for _, layer in ours.lora_layers():
        assert torch.equal(layer.lora_B["b"], layer.lora_B["default"])
    unprefixed = {k.removeprefix("base_model.model."): v * 2 for k, v in theirs.items()}
    hf_lora.set_adapter_state_dict(ours, unprefixed, "b")  # keys without peft's prefix are accepted too
    layer = ours.transformer.h[0].attn.c_attn
    assert torch.equal(layer.lora_B["b"], 2 * layer.lora_B["default"])


def test_set_adapter_state_dict_checks_everything_first():
    ours = get_lora_model(make_model("gpt2"), LoRAConfig(**FIELDS))
    randomise_B(ours)
    good = hf_lora.adapter_state_dict(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    broken = {k: torch.zeros_like(v) for k, v in good.items()}
    broken.pop(next(iter(broken)))  # a missing key (the zeros would be copied if anything were)
    with pytest.raises(AdapterFormatError, match="missing"):
        hf_lora.set_adapter_state_dict(ours, broken)
    wrong_shape = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in good.items()}
    with pytest.raises(AdapterFormatError, match="shape"):
        hf_lora.set_adapter_state_dict(ours, wrong_shape)
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        hf_lora.set_adapter_state_dict(ours, good, "nope")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# ---- status ----------------------------------------------------------------------------------------


def twins(saved: bool = True):
    """Our GPT-2 and peft's with the same adapters and states: "default" (LoRA on c_attn, c_proj), "b" (c_attn,
    own ln_f), "b" active and merged; "default" made trainable by set_requires_grad."""
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**FIELDS))
    ours = get_lora_model(base, LoRAConfig(**FIELDS))
    b = dict(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"] if saved else None)
    ref.add_adapter("b", LoraConfig(**b))
    ours.add_adapter("b", LoRAConfig(**b))
    for m in (ours, ref):
        m.set_adapter("b")
        m.set_requires_grad("default")
        m.merge_adapter()
    return ours, ref


def peft_name(name: str) -> str:
    return name.removeprefix("model.")


def test_layer_status_equals_peft():
    ours, ref = twins()
    theirs = {peft_name(s.name): s for s in peft_layer_status(ref)}
    mine = {s.name: s for s in hf_lora.get_layer_status(ours)}
    assert mine.keys() == theirs.keys()
    for name, s in mine.items():
        t = dataclasses.asdict(theirs[name])
        assert {k: v for k, v in dataclasses.asdict(s).items() if k not in ("name", "module_type")} == {
            k: v for k, v in t.items() if k not in ("name", "module_type")
        }, name


def test_model_status_equals_peft_and_says_irregular():
    ours, ref = twins()
    mine, theirs = (
        dataclasses.asdict(hf_lora.get_model_status(ours)),
        dataclasses.asdict(peft_model_status(ref)),
    )
    assert mine.pop("adapter_model_type") == "LoRAModel" and theirs.pop("adapter_model_type") == "LoraModel"
    assert mine == theirs
    # (peft counts the copy of ln_f that "b" saves in full as a layer where "b" is not merged)
    assert mine["merged_adapters"] == "irregular" and mine["requires_grad"] == {"default": True, "b": True}
    ours, ref = twins(saved=False)
    assert hf_lora.get_model_status(ours).merged_adapters == peft_model_status(ref).merged_adapters == ["b"]
    # one layer unmerged by hand: the model is inconsistent, and the status says so as peft's does
    for m in (ours.transformer.h[0].attn.c_attn, ref.base_model.model.transformer.h[0].attn.c_attn):
        m.unmerge()
    assert (
        hf_lora.get_model_status(ours).merged_adapters
        == peft_model_status(ref).merged_adapters
        == "irregular"
    )


def test_status_with_token_rows_and_a_tied_head_equals_peft():
    """Token rows on GPT-2's embedding, which the output head shares: peft lists the head as a layer too."""
    fields = dict(r=4, target_modules=["c_attn"], trainable_token_indices={"wte": [1, 2]})
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    ref.add_adapter("b", LoraConfig(**fields))
    ours.add_adapter("b", LoRAConfig(**fields))
    for m in (ours, ref):
        m.set_adapter("b")
        m.merge_adapter()
    theirs = {
        peft_name(s.name).removesuffix(".token_adapter"): dataclasses.asdict(s)
        for s in peft_layer_status(ref)
    }
    mine = {s.name: dataclasses.asdict(s) for s in hf_lora.get_layer_status(ours)}
    assert mine.keys() == theirs.keys() and "lm_head" in mine
    for name, s in mine.items():
        for field in ("name", "module_type"):
            s.pop(field), theirs[name].pop(field)
        assert s == theirs[name], name
    mine, theirs = (
        dataclasses.asdict(hf_lora.get_model_status(ours)),
        dataclasses.asdict(peft_model_status(ref)),
    )
    mine.pop("adapter_model_type"), theirs.pop("adapter_model_type")
    assert mine == theirs


def test_set_requires_grad_equals_peft():
    ours, ref = twins()
    for m in (ours, ref):
        m.set_requires_grad(["b"], requires_grad=False)
    mine = {s.name: s.requires_grad for s in hf_lora.get_layer_status(ours)}
    theirs = {peft_name(s.name): s.requires_grad for s in peft_layer_status(ref)}
    assert mine == theirs and all(flags.get("b", False) is False for flags in mine.values())
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0  # "default" still trains
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        ours.set_requires_grad("nope")
