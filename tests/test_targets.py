"""Target selection: the per-architecture defaults, peft's matching rules, and errors that help."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import MLP, make_model
from transformers import AutoConfig, AutoModel

import hf_lora
from hf_lora import LoRAConfig, TargetModulesError, get_lora_model
from hf_lora.targets import TARGET_MODULES, resolve_targets


@pytest.mark.parametrize("model_type", sorted(TARGET_MODULES))
def test_every_architecture_in_the_map_resolves(model_type):
    """Each entry names modules that exist in that architecture (default-size config on the meta device)."""
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(model_type))
    targets = resolve_targets(model, LoRAConfig())
    assert {t.rsplit(".", 1)[-1] for t in targets} == set(TARGET_MODULES[model_type])


SELECTIONS = [
    ("gpt2", dict(target_modules=["c_proj"])),
    ("gpt2", dict(target_modules=["attn.c_proj"])),
    ("gpt2", dict(target_modules=r".*\.h\.1\.mlp\.c_(fc|proj)")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], exclude_modules=["mlp.c_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], exclude_modules=r".*\.h\.0\..*")),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=1)),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h")),
    ("gpt2", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    # a full path is taken as is, the layer filter applies to the suffix only (peft)
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
    ("bert", dict(target_modules="all-linear", modules_to_save=["classifier"])),
    ("bert", dict(target_modules=["query", "key", "dense"])),
]


@pytest.mark.parametrize(
    ("kind", "fields"), SELECTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SELECTIONS)]
)
def test_same_modules_as_peft(kind, fields):
    base = make_model(kind)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, **fields))
    ours = get_lora_model(base, LoRAConfig(r=2, **fields))
    assert sorted(p for p, _ in ours.lora_layers()) == sorted(ref.targeted_module_names)


def test_rank_and_alpha_patterns_per_module_as_peft():
    fields = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
                  alpha_pattern={"v_proj": 4})  # fmt: skip
    base = make_model("llama")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        assert layer.rank("default") == twin.r["default"], path
        assert layer.lora_scaling["default"] == twin.scaling["default"], path


def test_modules_to_save_matches_on_a_dot_boundary():
    model = get_lora_model(
        make_model("distilbert"), LoRAConfig(r=2, target_modules=["q_lin"], modules_to_save=["classifier"])
    )
    assert [p for p, _ in model.saved_modules()] == ["classifier"]


def test_a_target_peft_would_take_for_a_module_to_save_is_flagged(tmp_path, caplog):
    # DistilBERT with task_type SEQ_CLS and all-linear: LoRA on pre_classifier, which peft's plain suffix
    # match of "classifier" wraps as a module to save: peft cannot load the file. Following the advice can.
    fields = dict(r=2, task_type="SEQ_CLS", target_modules="all-linear")
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        get_lora_model(make_model("distilbert"), LoRAConfig(**fields))
    assert "exclude_modules=['pre_classifier']" in caplog.text
    caplog.clear()
    model = get_lora_model(make_model("distilbert"), LoRAConfig(**fields, exclude_modules=["pre_classifier"]))
    assert "plain suffix" not in caplog.text
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(make_model("distilbert"), tmp_path)  # loads


ERRORS = [
    (lambda: MLP(), dict(), "No default target_modules for model class MLP", "fc1, fc2, head"),
    (lambda: make_model("gpt2"), dict(target_modules=["q_proj"]), "matches no module", "c_attn (x2)"),
    (lambda: make_model("gpt2"), dict(target_modules=["attn"]), "LoRA cannot wrap", "GPT2Attention"),
    (lambda: make_model("gpt2"), dict(target_modules=r".*h\.\d\.attn"), "LoRA cannot wrap", "h.0.attn"),
    (lambda: make_model("gpt2"), dict(target_modules=["c_attn"], layers_to_transform=[5]), "matches no module in layers [5]", "all-linear"),
    (lambda: make_model("gpt2"), dict(target_modules=["c_attn"], layers_to_transform=[0, 7]), "names layers [7]", "0..1"),
    (lambda: make_model("gpt2"), dict(target_modules=["c_attn"], rank_pattern={"c_fc": 2}), "rank_pattern key 'c_fc' matches none", ""),
    (lambda: make_model("gpt2"), dict(modules_to_save=["classifier"]), "has no module of that name", "transformer, lm_head"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "fields", "message", "hint"), ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_errors_name_the_problem_and_the_choices(make, fields, message, hint):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetModulesError) as err:
        get_lora_model(model, LoRAConfig(**fields))
    assert message in str(err.value) and hint in str(err.value)
    assert not isinstance(model, hf_lora.LoRAModel), "a failed call leaves the model untouched"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_embeddings_are_targets_when_named_but_not_in_all_linear():
    """As in peft: an nn.Embedding named in target_modules gets LoRA; "all-linear" leaves embeddings out."""
    model = get_lora_model(make_model("llama"), LoRAConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert sorted(p for p, _ in model.lora_layers())[0] == "model.embed_tokens"
    assert isinstance(model.get_submodule("model.embed_tokens"), torch.nn.Embedding)
    linear = get_lora_model(make_model("llama"), LoRAConfig(r=2, target_modules="all-linear"))
    assert not any(isinstance(layer, torch.nn.Embedding) for _, layer in linear.lora_layers())
    with pytest.raises(
        TargetModulesError,
        match=r"Only nn\.Linear, Conv1D, nn\.ConvNd, nn\.Embedding and nn\.MultiheadAttention are supported",
    ):
        get_lora_model(make_model("llama"), LoRAConfig(r=2, target_modules=["input_layernorm"]))
