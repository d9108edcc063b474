"""LoRA variants against peft's implementations: DoRA, PiSSA, OLoRA, gaussian init, LoRA+."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from reference import copy_lora_weights, randomise_B, training_curve
from safetensors.torch import load_file
from tiny_models import batch_for, make_model
from tolerance import (
    LAYER_ROUNDINGS,
    MERGE_ROUNDINGS,
    assert_close,
    assert_close_states,
    assert_same_training,
)

import hf_lora
from hf_lora import LoRAConfig, LoRAModel, get_lora_model

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def dora_pair(kind: str, **fields):
    base = make_model(kind)
    ref = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, **fields),
    )
    ours = get_lora_model(
        base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, **fields)
    )
    randomise_B(ours)
    copy_lora_weights(ours, ref)
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            twin = ref.base_model.model.get_submodule(path)
            assert_close(layer.lora_magnitude["default"], twin.lora_magnitude_vector["default"].weight)
            layer.lora_magnitude["default"].mul_(1.1)
            twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude["default"])
    return ours, ref


def logits(model, kind):
    with torch.no_grad():
        return model(**batch_for(kind)).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dora_forward_training_and_counts_equal_peft(kind):
    ours, ref = dora_pair(kind)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert_close(logits(ours, kind), logits(ref, kind), what="logits")
    batches = [batch_for(kind, seed=s) for s in range(3)]
    curves: tuple[dict, dict] = ({}, {})
    for dtype in (torch.float64, torch.float32):
        for model, curve in zip(dora_pair(kind), curves):
            curve[dtype] = training_curve(model.to(dtype), batches, steps=10, seed=0)
    assert_same_training(*curves)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dora_merge_unmerge_including_conv1d(kind):
    """peft#3531 is a DoRA unmerge bug on fan_in_fan_out (Conv1D) layers: merge and unmerge round-trip here."""
    ours, ref = dora_pair(kind)
    before_w = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = logits(ours, kind)
    ours.merge_adapter()
    assert_close(logits(ours, kind), expected, what="merged logits")
    ours.unmerge_adapter()
    # DoRA's merge rescales W + d by m / ||W + d|| and its unmerge undoes both: a few roundings more than
    # LoRA's add and subtract, as many as one layer's evaluation
    assert_close_states(ours.state_dict(), before_w, roundings=LAYER_ROUNDINGS, what="unmerged")
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    ours_sd, ref_sd = merged.state_dict(), ref_merged.state_dict()
    assert_close_states(ours_sd, ref_sd, roundings=LAYER_ROUNDINGS, what="merged")


def test_dora_files_travel_both_ways(tmp_path):
    ours, ref = dora_pair("llama")
    ours.add_adapter("other", LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any("lora_magnitude.default" in n for n in trainable) and not any(".other" in n for n in trainable)
    ours.delete_adapter("other")
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )
    expected = logits(ours, "llama")
    for model in (PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours"),
                  LoRAModel.from_pretrained(make_model("llama"), tmp_path / "peft")):  # fmt: skip
        assert_close(logits(model, "llama"), expected)
    frozen = LoRAModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    assert frozen.get_nb_trainable_parameters()[0] == 0, "a loaded adapter is frozen, magnitudes included"


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_pissa_olora_gaussian_inits_equal_peft(init):
    base = make_model("llama")
    torch.manual_seed(5)
    ref = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init),
    )
    torch.manual_seed(5)
    ours = get_lora_model(
        base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init)
    )
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        if init == "gaussian":  # random A: compare the law, not the draw
            assert (
                torch.all(layer.lora_B["default"] == 0)
                and abs(layer.lora_A["default"].std().item() - 1 / 4) < 0.05
            )
            continue
        # the same decomposition (SVD or QR) of the same weight, by the same LAPACK call as peft's
        assert_close(layer.lora_A["default"], twin.lora_A["default"].weight, what=f"{path} A")
        assert_close(layer.lora_B["default"], twin.lora_B["default"].weight, what=f"{path} B")
        assert_close(layer.weight, twin.base_layer.weight, what="the same residual base")
    if init != "gaussian":
        plain = make_model("llama")
        assert_close(logits(ours, "llama"), logits(plain, "llama"), what="starts at the base model")


def test_orthogonal_init_starts_at_the_base_and_peft_adapters_load(tmp_path):
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="orthogonal")
    ours = get_lora_model(make_model("llama"), LoRAConfig(**fields))
    assert_close(logits(ours, "llama"), logits(make_model("llama"), "llama"))
    assert all(layer.lora_B["default"].abs().sum() > 0 for _, layer in ours.lora_layers())
    ref = get_peft_model(make_model("llama"), LoraConfig(**fields))
    with torch.no_grad():  # as if trained: B A no longer zero
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    loaded = LoRAModel.from_pretrained(make_model("llama"), tmp_path)
    expected = logits(ref, "llama")
    # B moved by 0.1 N(0, 1): the logits move far more than 1e-4, itself far above rounding (~1e-5)
    assert (expected - logits(make_model("llama"), "llama")).abs().max() > 1e-4
    assert_close(logits(loaded, "llama"), expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pissa_residual_plus_adapter_is_the_original_weight(kind):
    base = make_model(kind)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_lora_model(
        base, LoRAConfig(r=3, lora_alpha=6, target_modules=TARGETS[kind], init_lora_weights="pissa_niter_4")
    )
    model.merge_adapter()
    merged = model.state_dict()
    # the residual is W - s B A, computed: merging adds s B A back, whatever the SVD's accuracy (a merge
    # round trip)
    assert_close_states({k: merged[k] for k in original}, original, roundings=MERGE_ROUNDINGS, what="W")


def test_a_pissa_niter_adapter_reloads_exactly_whatever_the_rng_state(tmp_path):
    # Loading repeats the randomised SVD on the base: it must draw what the init drew, or the residual
    # left in the base differs from the one the adapter was trained against.
    fields = dict(r=3, lora_alpha=6, target_modules=TARGETS["llama"], init_lora_weights="pissa_niter_2")
    torch.manual_seed(1)
    model = get_lora_model(make_model("llama"), LoRAConfig(**fields))
    randomise_B(model)
    model.save_pretrained(tmp_path)
    base = make_model("llama")
    torch.manual_seed(2)
    state = torch.get_rng_state()
    loaded = LoRAModel.from_pretrained(base, tmp_path)
    assert torch.equal(torch.get_rng_state(), state), "the init does not draw from the global generator"
    # the same seeded randomised SVD of the same weight, the same tensors from the file: bit for bit
    assert torch.equal(logits(loaded, "llama"), logits(model, "llama"))


def snapshot(model):
    return type(model), {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_same(before, after):
    assert before[0] is after[0] and before[1].keys() == after[1].keys()
    for name, (value, grad) in before[1].items():
        assert torch.equal(value, after[1][name][0]) and grad == after[1][name][1], name


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize(
    "fields", [{"r": 100}, {"r": 8, "rank_pattern": {"c_fc": 100}}], ids=["r", "rank_pattern"]
)
def test_pissa_olora_rank_above_a_layers_size_is_refused_before_the_model_is_touched(init, fields):
    """They take r directions out of each weight: GPT-2's tiny layers (min(in, out) = 64) have 64. The
    init failed half way through the layers, with the model's class changed and its parameters frozen."""
    config = LoRAConfig(**fields, target_modules=TARGETS["gpt2"], init_lora_weights=init)
    base = make_model("gpt2")
    before = snapshot(base)
    with pytest.raises(hf_lora.TargetModulesError, match=r"r <= min\(in_features, out_features\).*c_fc"):
        get_lora_model(base, config)
    assert_same(before, snapshot(base))
    model = get_lora_model(base, LoRAConfig(r=4, target_modules=TARGETS["gpt2"]))
    before = snapshot(model)
    with pytest.raises(hf_lora.TargetModulesError, match="exclude_modules"):
        model.add_adapter("big", config)
    assert_same(before, snapshot(model))
    assert model.adapters == ["default"]
    get_lora_model(make_model("gpt2"), config.replace(r=64, rank_pattern={}))  # min(in, out) itself fits


def test_pissa_with_a_small_embedding_target_is_accepted():
    """PiSSA/OLoRA leave embeddings alone (plain init, as in peft), so their size puts no bound on r:
    BERT's token_type_embeddings (2, 64) takes r=8 as peft does."""
    fields = dict(r=8, target_modules=["token_type_embeddings", "query"], init_lora_weights="pissa")
    ours = get_lora_model(make_model("bert"), LoRAConfig(**fields))
    ref = get_peft_model(make_model("bert"), LoraConfig(**fields))
    assert ours.bert.embeddings.token_type_embeddings.lora_A["default"].shape == (8, 2)
    assert ref.base_model.model.bert.embeddings.token_type_embeddings.lora_embedding_A["default"].shape == (
        8,
        2,
    )


def test_pissa_converted_to_plain_lora_matches_peft_and_loads_on_the_stock_model(tmp_path):
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="pissa")
    _check_pissa_conversion(tmp_path, fields)


def test_pissa_conversion_keeps_an_embedding_target_right(tmp_path):
    """PiSSA leaves an embedding's weight alone (peft too) and its A starts at zero, so [B, -B0] @ [A; A0]
    is its trained update at rank 2r as well. (peft's conversion leaves the embedding's tensors out of the
    file: loaded, its embedding adapter is lost.)"""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")
    base = make_model("llama")
    ours = get_lora_model(base, LoRAConfig(**fields))
    assert torch.equal(ours.model.embed_tokens.weight, make_model("llama").model.embed_tokens.weight)
    ours.save_pretrained(tmp_path / "init")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained = logits(ours, "llama")
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    for load in (LoRAModel.from_pretrained, PeftModel.from_pretrained):
        stock = load(make_model("llama"), tmp_path / "plain")
        assert_close(logits(stock, "llama"), trained)


def _check_pissa_conversion(tmp_path, fields):
    base = make_model("llama")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    ours.save_pretrained(tmp_path / "ours-init")
    ref.save_pretrained(tmp_path / "peft-init")
    for model in (ours, ref):  # "train": the same change to both
        torch.manual_seed(1)
        with torch.no_grad():
            for _name, p in sorted(
                model.named_parameters()
            ):  # same order in both: A before B, layer by layer
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    trained = logits(ours, "llama")
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-init")
    ref.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init")
    )
    a, b = (
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert_close_states(a, b, what="converted")
    stock = LoRAModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    assert stock.peft_config["default"].r == 8 and stock.peft_config["default"].init_lora_weights is True
    assert_close(logits(stock, "llama"), trained)
    reloaded = LoRAModel.from_pretrained(
        make_model("llama"), tmp_path / "ours-init"
    )  # unconverted: redoes the SVD
    assert_close(logits(reloaded, "llama"), logits(make_model("llama"), "llama"))


@pytest.mark.parametrize("targets", [TARGETS["gpt2"], ["wte", *TARGETS["gpt2"]]], ids=["linear", "embedding"])
def test_loraplus_param_groups_equal_peft(targets):
    """An embedding's A and B go to their own group (loraplus_lr_embedding), as in peft."""
    fields = dict(r=4, target_modules=targets, use_dora=True, bias="lora_only", modules_to_save=["ln_f"])
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    opt = hf_lora.create_loraplus_optimizer(
        ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1
    )
    theirs = peft_loraplus(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)

    def summary(optimizer):
        return sorted(
            (g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"]))
            for g in optimizer.param_groups
            if g["params"]
        )

    assert summary(opt) == summary(theirs)
    names = {id(p): n for n, p in ours.named_parameters()}
    fast = [names[id(p)] for g in opt.param_groups if g["lr"] == 16e-3 for p in g["params"]]
    assert fast and all("lora_B" in n or "magnitude" in n or "bias" in n or "ln_f" in n for n in fast)
    slow = sorted(names[id(p)] for g in opt.param_groups if g["lr"] == 1e-6 for p in g["params"])
    assert slow == (
        ["transformer.wte.lora_A.default", "transformer.wte.lora_B.default"] if "wte" in targets else []
    )
    with pytest.raises(ValueError, match="ratio"):
        hf_lora.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0.5)
