"""LoRAModel against peft as the reference: parameter counts, logits, training curves, merging."""

from __future__ import annotations

import copy
import inspect
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import copy_lora_weights, peft_twin, randomise_B, training_curve
from tiny_models import MLP, batch_for, make_model, word_tokenizer
from tolerance import (
    LAYER_ROUNDINGS,
    MERGE_ROUNDINGS,
    assert_close,
    assert_close_states,
    assert_same_training,
    atol,
)
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, pipeline
from transformers.pytorch_utils import Conv1D

import hf_lora
from hf_lora import LoRAConfig, get_lora_model

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]

# (model kind, LoRA settings shared by hf_lora and peft)
PARITY_CASES = [
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_ALL)),
    ("gpt2", dict(r=8, lora_alpha=16, target_modules=["c_attn"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_ALL, bias="all")),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", use_rslora=True)),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_ALL, modules_to_save=["lm_head"])),
    ("distilbert", dict(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"])),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LLAMA)),
    ("llama", dict(r=4, lora_alpha=16, target_modules=ALL_LLAMA, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 4})),
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")),
    ("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v"], bias="all")),  # relative_attention_bias stays frozen
]  # fmt: skip
CASE_IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(PARITY_CASES)]


def both(kind: str, settings: dict, seed: int = 0):
    base = make_model(kind, seed)
    ref_base = copy.deepcopy(base)
    ours = get_lora_model(base, LoRAConfig(**settings))
    randomise_B(ours, seed)
    return ours, peft_twin(ours, ref_base, **settings)


@pytest.mark.parametrize(("kind", "settings"), PARITY_CASES, ids=CASE_IDS)
def test_parameter_counts_and_logits_match_peft(kind, settings):
    ours, ref = both(kind, settings)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    batch = batch_for(kind)
    with torch.no_grad():
        assert_close(ours(**batch).logits, ref(**batch).logits, what="logits")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(
    ("kind", "settings"),
    [PARITY_CASES[0], PARITY_CASES[4], PARITY_CASES[5], PARITY_CASES[7], PARITY_CASES[8]],
    ids=["gpt2", "gpt2-head", "distilbert", "llama", "llama-patterns"],
)
def test_training_curve_matches_peft(kind, settings, dropout):
    """20 AdamW steps from the same weights and batches, in float64 and float32 (tolerance.py says why
    both); with dropout the masks match too, because `peft_dropout_masks()` makes the fused path draw
    them exactly as F.dropout does."""
    settings = dict(settings, lora_dropout=dropout)
    batches = [batch_for(kind, seed=s) for s in range(4)]
    curves: tuple[dict, dict] = ({}, {})
    for dtype in (torch.float64, torch.float32):
        for model, curve in zip(both(kind, settings), curves):
            curve[dtype] = training_curve(model.to(dtype), batches, steps=20)
    assert curves[0][torch.float32][-4:].mean() < curves[0][torch.float32][:4].mean(), "loss goes down"
    assert_same_training(*curves)


def test_gpt2_small_counts_as_in_the_readme(capsys):
    """The numbers users see for real GPT-2 small (built on the meta device: no memory, no download)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    get_lora_model(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05)).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 1,179,648 || all params: 125,619,456 || trainable%: 0.9391"
    )
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    lm = get_lora_model(model, LoRAConfig(r=8, target_modules=["c_attn"]))
    assert lm.get_nb_trainable_parameters()[0] == 294_912


def test_seq_cls_saves_the_head_but_not_pre_classifier():
    """task_type=SEQ_CLS trains `classifier`; peft's suffix match also grabs `pre_classifier`, we don't."""
    base = make_model("distilbert")
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    )
    ours = get_lora_model(base, LoRAConfig(r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"))
    assert [p for p, _ in ours.saved_modules()] == ["classifier"]
    pre = (
        base.pre_classifier.original_module
        if hasattr(base.pre_classifier, "original_module")
        else base.pre_classifier
    )
    assert not isinstance(base.pre_classifier, hf_lora.ModulesToSave)
    pre_params = sum(p.numel() for p in pre.parameters())
    assert ours.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0] - pre_params
    assert ours.peft_config["default"].modules_to_save == ["classifier", "score"]


@pytest.mark.parametrize(
    ("kind", "settings"),
    [PARITY_CASES[0], PARITY_CASES[4], PARITY_CASES[7]],
    ids=["gpt2", "gpt2-head", "llama"],
)
def test_merge_and_unload_gives_the_plain_model_with_peft_weights(kind, settings):
    ours, ref = both(kind, settings)
    batch = batch_for(kind)
    with torch.no_grad():
        before = ours(**batch).logits
        merged = ours.merge_and_unload()
        after = merged(**batch).logits
    ref_merged = ref.merge_and_unload()
    assert type(merged) is type(ref_merged)
    assert not any(isinstance(m, (hf_lora.LoRALayer, hf_lora.ModulesToSave)) for m in merged.modules())
    assert_close(after, before, what="merged logits")
    ours_sd, ref_sd = merged.state_dict(), ref_merged.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    # a merged weight is W + s * B A: r products summed in another order, scaled and added (as one layer)
    assert_close_states(ours_sd, ref_sd, roundings=LAYER_ROUNDINGS, what="merged weight")
    if kind == "gpt2":
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    if "modules_to_save" in settings:  # a trained lm_head copy is no longer the tied embedding
        assert merged.config.tie_word_embeddings is False
        assert merged.lm_head.weight is not merged.transformer.wte.weight


@pytest.mark.parametrize(
    ("target", "other"), [("lm_head", "transformer.wte"), ("transformer.wte", "lm_head")]
)
def test_merging_into_one_of_tied_embeddings_leaves_the_other_alone(tmp_path, target, other):
    """The output head or the input embedding that shares its weight: merged, each gets its own copy
    (peft merges into the shared weight, so its merged model differs from its unmerged one)."""
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn", target]))
    assert model.lm_head.weight is model.transformer.wte.weight
    randomise_B(model)
    untouched = model.get_submodule(other).weight.detach().clone()
    batch = batch_for("gpt2")
    with torch.no_grad():
        expected = model(**batch).logits
        merged = model.merge_and_unload()
        assert_close(merged(**batch).logits, expected, what="merged logits")
    assert torch.equal(merged.get_submodule(other).weight, untouched)
    assert merged.config.tie_word_embeddings is False  # saved and reloaded, it is not tied again
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)(**batch).logits
    assert_close(reloaded, expected, what="reloaded logits")


@pytest.mark.parametrize("targets", [["embed_tokens", "q"], ["shared", "q"]])
def test_merging_into_t5s_tied_embeddings_survives_saving_and_tie_weights(tmp_path, targets):
    """T5 shares one weight among shared, encoder/decoder.embed_tokens and lm_head. After a merge unties
    some of them, transformers must not tie them again (tie_weights(), save_pretrained + from_pretrained)."""
    model = get_lora_model(make_model("t5"), LoRAConfig(r=4, target_modules=targets))
    randomise_B(model)
    batch = batch_for("t5")
    with torch.no_grad():
        expected = model(**batch).logits
        merged = model.merge_and_unload()
        assert merged.config.tie_word_embeddings is False
        merged.save_pretrained(tmp_path)
        merged.tie_weights()
        assert_close(merged(**batch).logits, expected, what="merged logits")
        reloaded = type(merged).from_pretrained(tmp_path)
        assert_close(reloaded(**batch).logits, expected, what="reloaded logits")


def test_pissa_on_a_tied_head_is_refused_before_the_model_is_touched():
    base = make_model("gpt2")
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(hf_lora.AdapterStateError, match=r"\['lm_head'\] share their weight"):
        get_lora_model(base, LoRAConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights="pissa"))
    assert type(base) is GPT2LMHeadModel and all(
        torch.equal(base.state_dict()[k], v) for k, v in before.items()
    )
    # PiSSA leaves embeddings alone (plain init there, as in peft): a tied input embedding is no problem
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights="pissa"))
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_safe_merge_refuses_non_finite_weights_and_merges_nothing():
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_ALL))
    randomise_B(model)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.lora_B["default"][0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)  # peft's argument, by keyword
    assert not any(layer.merged_adapters for _, layer in model.lora_layers())
    for n, p in model.named_parameters():  # layers merged before the broken one are unmerged again
        if p.requires_grad:  # A and B (one of them inf) are read, never written
            assert torch.equal(p, before[n]), n
        else:
            assert_close(p, before[n], roundings=MERGE_ROUNDINGS, what=n)
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    plain = model.merge_and_unload(True)  # peft's first positional argument is progressbar
    assert type(plain) is GPT2LMHeadModel


def test_adapter_starts_as_the_identity_and_disable_gives_the_base():
    base = make_model("gpt2")
    plain = copy.deepcopy(base)
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=GPT2_ALL))
    batch = batch_for("gpt2")
    with torch.no_grad():
        expected = plain(**batch).logits
        assert torch.equal(model(**batch).logits, expected), "B = 0 at init: output is the base's"
        randomise_B(model)
        adapted = model(**batch).logits
        # B ~ 0.1 N(0, 1) moves the logits by far more than 1e-3, itself far above rounding (atol ~1e-5)
        assert (adapted - expected).abs().max() > 1e-3
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(model(**batch).logits, adapted)
        model.merge_adapter()
        with model.disable_adapter():
            assert_close(model(**batch).logits, expected, what="disabled merged logits")
        assert model.transformer.h[0].attn.c_attn.merged_adapters == ["default"], (
            "merged again after the block"
        )
        assert_close(model(**batch).logits, adapted, what="merged logits")


def test_nested_disable_blocks_restore_the_state_they_found():
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_ALL))
    randomise_B(model)
    batch = batch_for("gpt2")
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
            with model.disable_adapter():
                pass
            assert torch.equal(model(**batch).logits, base), "the inner block must not enable the adapters"
        assert torch.equal(model(**batch).logits, adapted)
        model.disable_adapters()
        with model.disable_adapter():
            pass
        assert torch.equal(model(**batch).logits, base), (
            "disabled by disable_adapters() until enable_adapters()"
        )
        model.enable_adapters()
        assert torch.equal(model(**batch).logits, adapted)


def test_merge_is_idempotent_and_unmerge_restores(caplog):
    base = make_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=ALL_LLAMA))
    randomise_B(model)
    model.unmerge_adapter()  # nothing merged: a no-op
    model.merge_adapter()
    once = {k: v.clone() for k, v in model.state_dict().items()}
    model.merge_adapter()
    assert "already merged" in caplog.text
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    assert_close_states(restored, original, roundings=MERGE_ROUNDINGS, what="unmerged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters(dtype):
    base = make_model("llama").to(dtype)
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_B(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == dtype and layer.lora_A["default"].dtype == torch.float32
    batch = batch_for("llama")
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert loss.dtype == torch.float32 or loss.dtype == dtype
    assert layer.lora_B["default"].grad is not None and layer.lora_B["default"].grad.dtype == torch.float32
    w = layer.weight.detach().clone()
    expected = (w.float() + layer.delta_weight("default")).to(dtype)
    model.merge_adapter()
    assert torch.equal(layer.weight, expected), "delta added in fp32, rounded once"


def test_plain_pytorch_module():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(8, 16)
    expected = mlp(x)
    model = get_lora_model(mlp, LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    assert isinstance(model, MLP) and isinstance(model, hf_lora.LoRAModel)
    assert torch.equal(model(x), expected)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    # 5 SGD steps of lr 0.1 on a loss of O(1) move the output by O(0.1): 1e-3 is far above rounding
    assert (model(x) - expected).abs().max() > 1e-3
    with model.disable_adapter():  # the base modules themselves: the same computation, bit for bit
        assert torch.equal(model(x), expected)
    merged = model.merge_and_unload()
    assert type(merged) is MLP and isinstance(merged.head, torch.nn.Linear)


def test_all_linear_on_a_plain_module_and_on_an_lm():
    model = get_lora_model(MLP(), LoRAConfig(target_modules="all-linear"))
    assert [p for p, _ in model.lora_layers()] == ["fc1", "fc2", "head"]
    lm = get_lora_model(make_model("gpt2"), LoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in dict(lm.lora_layers())


def test_forward_signature_generate_and_attributes_are_the_models():
    base = make_model("gpt2")
    sig = inspect.signature(type(base).forward)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=GPT2_ALL))
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=GPT2_ALL))
    randomise_B(model)
    copy_lora_weights(model, ref)
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    assert list(inspect.signature(type(model).forward).parameters) == list(sig.parameters)
    assert model.config.n_layer == 2 and model.transformer.h[1].attn.c_attn.lora_A["default"].shape == (4, 64)
    prompt = torch.tensor([[5, 6, 7]])
    ours = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = ref.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("task", "kind", "settings"),
    [
        ("text-generation", "gpt2", dict(target_modules=GPT2_ALL, task_type="CAUSAL_LM")),
        ("text-classification", "bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    ],
)
def test_pipelines_take_the_model_without_an_error_and_give_peft_outputs(task, kind, settings):
    """A pipeline checks `model.__class__.__name__` against its task's model classes, and logs "The model
    'LoRAGPT2LMHeadModel' is not supported for text-generation" for other names (peft's wrappers are
    listed by name): the class's __name__ is the model's own, its repr still says LoRA."""
    base = make_model(kind)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **settings))
    model = get_lora_model(base, LoRAConfig(r=4, **settings))
    randomise_B(model)
    copy_lora_weights(model, ref)
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())
    pipeline_logger = logging.getLogger("transformers.pipelines.base")
    pipeline_logger.addHandler(handler)
    try:
        pipes = [pipeline(task, model=m, tokenizer=word_tokenizer()) for m in (model, ref)]
    finally:
        pipeline_logger.removeHandler(handler)
    assert not errors
    if task == "text-generation":
        ours, theirs = (p("w5 w6 w7 w8", max_new_tokens=6, do_sample=False) for p in pipes)
        assert ours == theirs
    else:
        ours, theirs = (p("w5 w6 w7 w8") for p in pipes)
        assert ours[0]["label"] == theirs[0]["label"]
        assert abs(ours[0]["score"] - theirs[0]["score"]) <= atol(theirs[0]["score"])  # one evaluation
    name = type(base).__name__
    assert type(model).__name__ == name and repr(model).startswith(f"LoRA{name}(\n")
    assert type(model).__qualname__ == f"LoRA{name}" and repr(type(model)).endswith(f".LoRA{name}'>")


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(reentrant, dropout):
    """Also with dropout: reentrant checkpointing runs the first forward under no_grad, which must drop
    what the recomputation drops (the loss is from that first forward, the gradients from the second)."""
    grads, losses = [], []
    for checkpointing in (False, True):
        config = LoRAConfig(r=4, target_modules=ALL_LLAMA, lora_dropout=dropout)
        model = get_lora_model(make_model("llama"), config)
        randomise_B(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(3)
        loss = model(**batch_for("llama")).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    # the recomputed forward is the same computation in the same order (and the same dropout masks)
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    assert all(g.abs().sum() > 0 for g in grads[1].values()), "every LoRA weight gets a gradient"
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0]), "bit-identical gradients"


def test_modules_to_save_trains_a_copy_and_keeps_the_original():
    base = make_model("bert")
    head = copy.deepcopy(base.classifier)
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    wrapper = model.classifier
    assert (
        isinstance(wrapper, hf_lora.ModulesToSave)
        and wrapper.weight is wrapper.modules_to_save["default"].weight
    )
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch_for("bert")).loss.backward()
    opt.step()
    assert torch.equal(wrapper.original_module.weight, head.weight)
    assert not torch.equal(wrapper.modules_to_save["default"].weight, head.weight)
    with model.disable_adapter():
        assert model.classifier.current() is wrapper.original_module


def test_wrapping_twice_and_bad_arguments_are_refused():
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4))
    with pytest.raises(hf_lora.AdapterStateError, match="already has LoRA adapters"):
        get_lora_model(model, LoRAConfig(r=4))
    with pytest.raises(TypeError, match="LoRAConfig"):
        get_lora_model(make_model("gpt2"), {"r": 4})
    # methods of the dicts that hold the adapters, and attributes their __init__ sets
    for name in ("a.b", "copy", "keys", "training", "_parameters", "_buffers", "_modules"):
        base = make_model("gpt2")
        with pytest.raises(ValueError, match="invalid adapter name"):
            get_lora_model(base, LoRAConfig(), adapter_name=name)
        assert type(base) is GPT2LMHeadModel and all(p.requires_grad for p in base.parameters())
    with pytest.raises(TypeError, match="get_lora_model"):
        hf_lora.LoRAModel()


def test_deepcopy_and_pickle_keep_the_lora_model():
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_ALL))
    randomise_B(model)
    batch = batch_for("gpt2")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model)
        with torch.no_grad():
            assert torch.equal(clone(**batch).logits, model(**batch).logits)
        assert clone.merge_and_unload().__class__ is GPT2LMHeadModel


class ScaledLinear(nn.Linear):
    """A Linear subclass (as quantised layers are): its LoRA class is generated at run time."""

    def forward(self, x):
        return super().forward(x) * 2


def test_pickle_keeps_lora_layers_of_linear_subclasses():
    torch.manual_seed(0)
    model = get_lora_model(
        nn.Sequential(ScaledLinear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
        LoRAConfig(r=2, target_modules=["0", "2"]),
    )
    randomise_B(model)
    x = torch.randn(4, 6)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[0]) is type(model[0]) and type(clone[0]).__name__ == "LoRAScaledLinear"
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    assert type(clone.unload()[0]) is ScaledLinear


def test_unload_gives_back_the_untouched_base():
    base = make_model("gpt2")
    original = copy.deepcopy(base.state_dict())
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=GPT2_ALL, modules_to_save=["lm_head"]))
    randomise_B(model)
    plain = model.unload()
    assert type(plain) is GPT2LMHeadModel and plain.state_dict().keys() == original.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())


def test_hf_lora_never_imports_peft():
    code = "import sys, hf_lora, hf_lora.hub, hf_lora.serialization; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    sources = (Path(hf_lora.__file__).parent).rglob("*.py")
    assert not [p for p in sources if "import peft" in p.read_text() or "from peft" in p.read_text()]
