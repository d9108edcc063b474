"""Several named adapters in one model: switching, saving, mixed batches, combining (peft as reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B
from tiny_models import batch_for, make_model
from tolerance import LAYER_ROUNDINGS, ROUNDINGS, assert_close, eps

import hf_lora
from hf_lora import AdapterStateError, LoRAConfig, LoRAModel, get_lora_model

TARGETS = ["c_attn", "c_proj", "c_fc"]


def three_adapters(seed: int = 0) -> LoRAModel:
    """GPT-2 with adapters "default" (r=4), "b" (r=4, alpha 16) and "c" (r=2, c_attn only, own lm_head)."""
    model = get_lora_model(make_model("gpt2", seed), LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.add_adapter("b", LoRAConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    model.add_adapter(
        "c", LoRAConfig(r=2, lora_alpha=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    )
    randomise_B(model, seed)
    with torch.no_grad():
        model.lm_head.modules_to_save["c"].weight.add_(0.05)
    return model


def logits_with(model, adapter: str | None, batch=None):
    batch = batch or batch_for("gpt2")
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(**batch).logits
        model.set_adapter(adapter)
        return model(**batch).logits


def test_add_set_delete_and_listing():
    model = three_adapters()
    assert model.adapters == ["default", "b", "c"] and model.active_adapter == "default"
    outs = {name: logits_with(model, name) for name in model.adapters}
    # adapters with other random B (~0.1 N(0, 1)) move the logits apart by far more than 1e-3, itself far
    # above rounding (~1e-5): each adapter really is another one
    assert all(
        (outs[a] - outs[b]).abs().max() > 1e-3 for a, b in [("default", "b"), ("b", "c"), ("default", "c")]
    )
    model.set_adapter("c")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".c" in n or n.endswith("modules_to_save.c.weight") for n in trainable)
    model.delete_adapter("b")
    assert model.adapters == ["default", "c"]
    assert torch.equal(logits_with(model, "default"), outs["default"])
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        model.set_adapter("b")
    with pytest.raises(AdapterStateError, match="exists already"):
        model.add_adapter("c", LoRAConfig(r=2))


def test_switching_keeps_base_weights_in_place():
    model = three_adapters()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    for name in ("b", "c", "default", "b"):
        model.set_adapter(name)
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}


def test_training_one_adapter_leaves_the_others_bit_identical():
    model = three_adapters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_adapter("b")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter handed over
    for _ in range(3):
        model(**batch_for("gpt2")).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".b") for n in changed)


def test_saved_in_peft_layout_and_loaded_back_all_at_once(tmp_path):
    model = three_adapters()
    expected = {name: logits_with(model, name) for name in model.adapters}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "b" / "adapter_model.safetensors"
    ).is_file()
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file() and not (tmp_path / "default").exists()

    back = LoRAModel.from_pretrained(make_model("gpt2"), tmp_path, all_adapters=True)
    assert back.adapters == ["default", "b", "c"] and back.active_adapter == "default"
    for name, out in expected.items():  # the same tensors through the same code: bit for bit
        assert torch.equal(logits_with(back, name), out)

    ref = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    for name in ("b", "c"):
        ref.load_adapter(tmp_path / name, adapter_name=name)
    for name, out in expected.items():
        ref.set_adapter(name)
        with torch.no_grad():
            assert_close(ref(**batch_for("gpt2")).logits, out)

    with pytest.raises(hf_lora.AdapterNotFoundError, match="subfolders: b, c"):
        only_subdirs = tmp_path / "subdirs"
        model.save_pretrained(only_subdirs, selected_adapters=["b", "c"])
        LoRAModel.from_pretrained(make_model("gpt2"), only_subdirs)


def test_load_adapter_adds_an_inactive_adapter(tmp_path):
    model = three_adapters()
    expected = logits_with(model, "b")
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    other = get_lora_model(make_model("gpt2"), LoRAConfig(r=8, target_modules=["c_attn"]))
    base_out = logits_with(other, "default")
    other.load_adapter(tmp_path / "b", adapter_name="task_b")
    assert other.active_adapter == "default" and torch.equal(logits_with(other, "default"), base_out)
    assert torch.equal(logits_with(other, "task_b"), expected)  # the same tensors, the same code


def test_mixed_batch_rows_match_single_adapter_runs():
    model = three_adapters()
    batch = batch_for("gpt2", batch=5)
    rows = ["b", "__base__", "default", "c", "b"]
    alone = {name: logits_with(model, None if name == "__base__" else name, batch) for name in set(rows)}
    model.set_adapter("default")
    with torch.no_grad():
        mixed = model(**batch, adapter_names=rows).logits
    for i, name in enumerate(rows):
        assert_close(mixed[i], alone[name][i], what=str((i, name)))
    assert model.transformer.h[0].attn.c_attn._row_adapters is None, "the row assignment does not leak"
    with pytest.raises(AdapterStateError, match="unknown adapters"):
        model(**batch, adapter_names=["nope"] * 5)
    model.merge_adapter()  # "default" would then be in every row: refused, for rows of any adapter
    for rows in (["__base__"] * 5, ["b"] * 5):
        with pytest.raises(AdapterStateError, match=r"\['default'\] are merged"):
            model(**batch, adapter_names=rows)
    model.unmerge_adapter()  # W + BA - BA: equal up to rounding
    with torch.no_grad():
        again = model(**batch, adapter_names=["b", "__base__", "default", "c", "b"]).logits
    assert_close(again, mixed)


def test_merging_while_disabled_is_refused():
    """Merged weights under disabled adapters would no longer be the base model the block promises."""
    model = three_adapters()
    base = logits_with(model, None)
    model.disable_adapters()
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(AdapterStateError, match="enable_adapters"):
            merge()
    with torch.no_grad():
        assert torch.equal(model(**batch_for("gpt2")).logits, base)
    model.enable_adapters()
    model.merge_adapter()
    assert (logits_with(model, "default") - base).abs().max() > 1e-3  # B ~ 0.1 N(0, 1): far above rounding


def test_mixed_batch_generate_matches_peft():
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ref.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    model = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.add_adapter("b", LoRAConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    randomise_B(model)
    with torch.no_grad():
        for path, layer in model.lora_layers():
            twin = ref.base_model.model.get_submodule(path)
            for name in ("default", "b"):
                twin.lora_A[name].weight.copy_(layer.lora_A[name])
                twin.lora_B[name].weight.copy_(layer.lora_B[name])
    ref.eval()
    prompt = torch.tensor([[5, 6, 7], [9, 10, 11], [5, 6, 7]])
    rows = ["default", "b", "__base__"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ours = model.generate(prompt, adapter_names=rows, **kwargs)
    theirs = ref.generate(input_ids=prompt, adapter_names=rows, **kwargs)
    assert torch.equal(ours, theirs)
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(prompt[i : i + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(prompt[i : i + 1], **kwargs)
        assert torch.equal(ours[i : i + 1], alone)


@pytest.mark.parametrize("targets", [TARGETS, ["wte", "wpe", *TARGETS]], ids=["linear", "embeddings"])
@pytest.mark.parametrize(("how", "rank"), [("cat", None), ("linear", None), ("svd", 3), ("svd", None)])
def test_weighted_adapters_equal_peft(how, rank, targets):
    fields = dict(target_modules=targets)
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **fields))
    ref.add_adapter("b", LoraConfig(r=4, lora_alpha=16, **fields))
    model = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, **fields))
    model.add_adapter("b", LoRAConfig(r=4, lora_alpha=16, **fields))
    randomise_B(model)
    copy_lora_weights(model, ref, "default")
    copy_lora_weights(model, ref, "b")
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=how, svd_rank=rank)
    ref.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=how, svd_rank=rank)
    assert model.peft_config["mix"].r == ref.peft_config["mix"].r
    for path, layer in model.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        ours, theirs = layer.delta_weight("mix"), twin.get_delta_weight("mix")
        # (svd: the same torch.linalg.svd call on the same matrix as peft's, so only the products round
        # differently; another factorisation would differ by eps / (the singular value gap) instead)
        assert_close(ours, theirs, what=str(path))
        if how == "cat":  # exact: the weighted sum of the deltas
            exact = sum(w * layer.delta_weight(n) for n, w in zip(["default", "b"], weights))
            assert_close(ours, exact)
    assert model.active_adapter == "default" and not any(
        p.requires_grad for n, p in model.named_parameters() if n.endswith(".mix")
    )


def test_mixed_batches_with_embedding_adapters_match_peft():
    """Each row gets its adapter's embedding update too (or none, for "__base__")."""
    fields = dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"])
    base = make_model("gpt2")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ref.add_adapter("b", LoraConfig(**fields))
    model = get_lora_model(base, LoRAConfig(**fields))
    model.add_adapter("b", LoRAConfig(**fields))
    randomise_B(model)
    copy_lora_weights(model, ref, "default")
    copy_lora_weights(model, ref, "b")
    model.eval(), ref.eval()
    ids = batch_for("gpt2")["input_ids"]
    ids = torch.cat([ids, ids.flip(0)])  # (4, T)
    rows = ["default", "b", "__base__", "default"]
    with torch.no_grad():
        ours = model(input_ids=ids, adapter_names=rows).logits
        assert_close(ours, ref(input_ids=ids, adapter_names=rows).logits, what="mixed-batch logits")
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1]).logits
            assert_close(ours[i : i + 1], alone, what=f"row {i} ({name})")


@pytest.mark.parametrize("extra", [dict(use_rslora=True), dict(init_lora_weights="pissa")])
@pytest.mark.parametrize("how", ["cat", "svd"])
def test_weighted_copy_of_one_adapter_is_that_adapter(extra, how):
    """Weight 1 on one adapter gives that adapter back, whatever its config: the combination's scaling is 1
    (not rsLoRA's), and it is not initialised again (PiSSA would move more of the base weights into it)."""
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, **extra))
    randomise_B(model)
    before = logits_with(model, "default")
    model.add_weighted_adapter(["default"], [1.0], "copy_of_it", combination_type=how)
    assert_close(logits_with(model, "default"), before, what="the base is untouched")
    assert_close(logits_with(model, "copy_of_it"), before)
    assert (
        model.peft_config["copy_of_it"].use_rslora is False
        and model.peft_config["copy_of_it"].init_lora_weights is True
    )


def test_svd_combination_is_the_best_low_rank_approximation():
    model = three_adapters()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "full", combination_type="svd", svd_rank=8)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=2)
    layer = model.transformer.h[0].attn.c_attn
    exact = layer.delta_weight("default") + layer.delta_weight("b")
    assert_close(layer.delta_weight("full"), exact, what="rank 8 holds the whole sum")
    S = torch.linalg.svdvals(exact.T)
    err = torch.linalg.matrix_norm(layer.delta_weight("low") - exact)
    # float32 SVDs are backward stable: each side is within a few dozen eps of ||exact|| of the exact value
    bound = ROUNDINGS * eps() * torch.linalg.matrix_norm(exact).item()
    assert abs(err.item() - S[2:].norm().item()) <= bound, (
        "error equals the dropped singular values (Eckart-Young)"
    )


def test_weighted_adapter_takes_the_saved_head_of_its_owner():
    model = three_adapters()
    model.add_weighted_adapter(["default", "c"], [1.0, 1.0], "mix", combination_type="cat")
    head = model.lm_head.modules_to_save
    assert torch.equal(head["mix"].weight, head["c"].weight)


def test_a_head_another_adapter_saves_in_full_is_not_a_lora_target():
    """LoRA on a module another adapter trains in full would go when that copy goes (delete_adapter).
    (Without task_type: on a task model, a new adapter gets the task head itself, as in peft.)"""
    model = get_lora_model(
        make_model("bert"), LoRAConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    )
    with pytest.raises(hf_lora.TargetModulesError, match="classifier, which another adapter trains"):
        model.add_adapter("c", LoRAConfig(r=4, target_modules=["value", "classifier"]))
    model.add_adapter("b", LoRAConfig(r=4, target_modules="all-linear"))
    assert isinstance(model.classifier, hf_lora.ModulesToSave) and "b" not in model.classifier.modules_to_save
    randomise_B(model, 3)
    model.set_adapter("b")
    before = model(**batch_for("bert")).logits.detach()
    model.delete_adapter("default")
    assert torch.equal(model(**batch_for("bert")).logits.detach(), before)


def test_an_adapter_added_while_disabled_stays_disabled():
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn"]))
    base = logits_with(model, None)
    model.disable_adapters()
    model.add_adapter(
        "d", LoRAConfig(r=4, target_modules=["c_fc"], modules_to_save=["lm_head"])
    )  # new layers
    randomise_B(model, 4)
    with torch.no_grad():
        model.lm_head.modules_to_save["d"].weight.add_(0.1)
    model.set_adapter("d")
    with torch.no_grad():
        assert torch.equal(model(**batch_for("gpt2")).logits, base)
    model.enable_adapters()
    assert (logits_with(model, "d") - base).abs().max() > 1e-3  # B ~ 0.1 N(0, 1): far above rounding


def test_switching_adapters_while_one_is_merged_unmerges_it_first(caplog):
    """A merged adapter is in the weights whatever is active: peft unmerges before switching, and so do we."""
    model = three_adapters()
    want_b = logits_with(model, "b")
    model.set_adapter("default")
    model.merge_adapter()
    with caplog.at_level("WARNING", logger="hf_lora"):
        model.set_adapter("b")
    assert "unmerging them first" in caplog.text
    assert not any(layer.merged_adapters for _, layer in model.lora_layers())
    with torch.no_grad():
        assert_close(model(**batch_for("gpt2")).logits, want_b)


def test_setting_the_merged_adapter_active_again_unmerges_it_so_it_trains():
    # peft unmerges on every set_adapter; a merged adapter computes nothing in forward, so it cannot train
    model = three_adapters()
    model.merge_adapter()
    model.set_adapter("default")
    assert not any(layer.merged_adapters for _, layer in model.lora_layers())
    model.train()
    model(**batch_for("gpt2")).loss.backward()
    assert all(layer.lora_A["default"].grad is not None for _, layer in model.lora_layers())
    model.eval()
    model.merge_adapter()
    model.add_adapter("d", LoRAConfig(r=2, target_modules=["c_attn"]))  # adding one leaves the merge alone
    assert model.transformer.h[0].attn.c_attn.merged_adapters == ["default"]


def test_base_biases_train_only_with_the_one_adapter_that_owns_them():
    """Biases are the base model's, shared by every adapter: one adapter may train them (as in peft), only
    while it is active, and training another adapter leaves them, and that adapter's outputs, alone."""
    bias_adapter = LoRAConfig(r=4, target_modules=["c_attn"], bias="all")
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn"]))
    model.add_adapter("with_bias", bias_adapter)  # inactive: nothing of it trains yet
    assert all(".default" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(AdapterStateError, match="only one adapter may"):
        model.add_adapter("second_bias", bias_adapter)
    assert model.adapters == ["default", "with_bias"]

    model.set_adapter("with_bias")
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert "transformer.h.0.ln_1.bias" in biases and "transformer.h.1.attn.c_attn.bias" in biases
    randomise_B(model, 3)
    before = logits_with(model, "with_bias")
    with pytest.raises(ValueError, match=r"\['with_bias'\] train the base model's biases"):
        model.add_weighted_adapter(["default", "with_bias"], [0.5, 0.5], "mix")
    model.set_adapter("default")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch_for("gpt2")).loss.backward()
    opt.step()
    model.eval()
    assert torch.equal(logits_with(model, "with_bias"), before)

    model.set_adapter("with_bias")  # deleting the active owner of the biases freezes them again
    model.delete_adapter("with_bias")
    assert all(".default" in n for n, p in model.named_parameters() if p.requires_grad)


def test_loading_all_adapters_that_do_not_all_fit_leaves_the_model_as_it_was(tmp_path):
    """A PiSSA root adapter moves base weights when it loads; if a later adapter does not fit, the model
    must be the base again, weights included (unload() alone left the PiSSA residual)."""
    get_lora_model(
        make_model("llama"), LoRAConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    ).save_pretrained(tmp_path)
    other = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn"]))
    other.save_pretrained(tmp_path / "other")  # an adapter for another architecture
    base = make_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(hf_lora.AdapterFormatError, match="does not fit"):
        LoRAModel.from_pretrained(base, tmp_path, all_adapters=True)
    assert type(base).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_several_active_adapters_and_mixed_batches_on_a_half_base_match_peft_bit_for_bit(dtype):
    """peft sums active adapters in their fp32 and rounds once (it rounded after each adapter here), and
    in a mixed batch rounds each row's update before adding it."""
    base = make_model("llama").to(dtype)
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **fields))
    ref.add_adapter("b", LoraConfig(init_lora_weights=False, **fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    ours.add_adapter("b", LoRAConfig(**fields))
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            twin = ref.base_model.model.get_submodule(path)
            for name in ("default", "b"):
                layer.lora_A[name].copy_(twin.lora_A[name].weight)
                layer.lora_B[name].copy_(twin.lora_B[name].weight)
    ids = batch_for("llama")["input_ids"]
    ours.eval(), ref.eval()
    ours.set_adapter(["default", "b"])
    ref.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
        rows = ["b", "default"]
        assert torch.equal(
            ours(input_ids=ids, adapter_names=rows).logits, ref(input_ids=ids, adapter_names=rows).logits
        )


def plain_and_dora(seed: int = 0):
    """Tiny GPT-2 with a plain adapter "default" and a DoRA adapter "dora" (trained-looking magnitudes),
    and peft's twin with the same weights."""
    base = make_model("gpt2", seed)
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    model = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    model.add_adapter("dora", LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True))
    ref.add_adapter(
        "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)
    )
    randomise_B(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in model.lora_layers():
            layer.lora_magnitude["dora"].mul_(
                1 + 0.2 * torch.randn(layer.lora_magnitude["dora"].shape, generator=g)
            )
            twin = ref.base_model.model.get_submodule(path)
            twin.lora_magnitude_vector["dora"].weight.copy_(layer.lora_magnitude["dora"])
    copy_lora_weights(model, ref, "default")
    copy_lora_weights(model, ref, "dora")
    return model, ref


def c_attn_weights(model) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("attn.c_attn")]


def test_merging_dora_after_another_adapter_takes_the_norm_from_the_base_weight_as_peft():
    model, ref = plain_and_dora()
    model.set_adapter(["default", "dora"])
    ref.base_model.set_adapter(["default", "dora"])
    model.merge_adapter(["default", "dora"])  # "dora" is merged into a weight that holds "default"
    ref.merge_adapter(["default", "dora"])
    # merged weights of two libraries: W + d, then DoRA's rescaling by m / ||W + d||, in another order
    for ours, theirs in zip(c_attn_weights(model), c_attn_weights(ref), strict=True):
        assert_close(ours, theirs, roundings=LAYER_ROUNDINGS, what="merged weight")
    model.unmerge_adapter()
    ref.unmerge_adapter()
    for ours, theirs in zip(c_attn_weights(model), c_attn_weights(ref), strict=True):
        assert_close(ours, theirs, roundings=LAYER_ROUNDINGS, what="unmerged weight")


@pytest.mark.parametrize("order", [["dora", "default"], ["default", "dora"]])
def test_deleting_a_merged_adapter_leaves_the_others_merged_as_if_alone(order):
    # peft refuses; we unmerge it, and the adapter merged after it must come out right (a DoRA merge
    # scales what was merged before it).
    first, second = order
    original = c_attn_weights(plain_and_dora()[0])
    alone, _ = plain_and_dora()
    alone.set_adapter(second)
    alone.merge_adapter()
    model, _ = plain_and_dora()
    model.set_adapter(order)
    model.merge_adapter()
    model.delete_adapter(first)  # the other stays active, so it stays merged
    assert model.transformer.h[0].attn.c_attn.merged_adapters == [second]
    # merges and unmerges (with DoRA's rescaling) in another order: a few roundings, as many as one layer's
    for ours, expected in zip(c_attn_weights(model), c_attn_weights(alone), strict=True):
        assert_close(ours, expected, roundings=LAYER_ROUNDINGS, what="merged weight")
    model.unmerge_adapter()
    for ours, expected in zip(c_attn_weights(model), original, strict=True):
        assert_close(ours, expected, roundings=LAYER_ROUNDINGS, what="unmerged weight")


def test_a_task_models_new_adapter_gets_the_head_and_deleting_the_active_one_picks_as_peft():
    # peft's task models give every added adapter the task head; after deleting the active adapter both
    # libraries activate the first remaining name in sorted order.
    base = make_model("bert")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model = get_lora_model(base, LoRAConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    for m, config in (
        (model, LoRAConfig(r=2, target_modules=["value"])),
        (ref, LoraConfig(r=2, target_modules=["value"])),
    ):
        m.add_adapter("zz", config)
        m.add_adapter("aa", config)
    assert model.peft_config["zz"].modules_to_save == ["classifier", "score"]
    assert "zz" in model.classifier.modules_to_save
    model.delete_adapter("default")
    ref.delete_adapter("default")
    assert model.active_adapters == ["aa"] == sorted(ref.peft_config)[:1]  # peft's rule (tuners_utils)


def trainable_parts(model) -> set[tuple[str, str]]:
    """(adapter, "lora" or "copy") for each trainable adapter tensor, of an hf_lora or a peft model; no base
    weight may train."""
    parts = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keys = name.split(".")
        at = next((i for i, k in enumerate(keys) if k in ("lora_A", "lora_B", "modules_to_save")), None)
        assert at is not None, f"base weight {name} trains"
        parts.add((keys[at + 1], "copy" if keys[at] == "modules_to_save" else "lora"))
    return parts


def ours_and_peft_from(path, adapter, is_trainable):
    ours = LoRAModel.from_pretrained(make_model("gpt2"), path, adapter, is_trainable=is_trainable)
    ref = PeftModel.from_pretrained(make_model("gpt2"), path, adapter, is_trainable=is_trainable)
    return ours, ref


def test_set_adapter_makes_an_adapter_loaded_or_created_frozen_trainable_as_peft(tmp_path):
    """peft's set_adapter(name, inference_mode=False) sets requires_grad on the active adapter's LoRA weights
    and saved-module copy, however it was loaded (is_trainable=False) or created (inference_mode=True), and
    freezes the others; adding or loading adapters afterwards leaves that as it is."""
    saved = dict(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
    get_lora_model(make_model("gpt2"), LoRAConfig(**saved)).save_pretrained(tmp_path)
    both = ours_and_peft_from(tmp_path, "a", is_trainable=True)
    for m in both:
        m.load_adapter(tmp_path, "b")  # is_trainable=False: frozen
    assert all(trainable_parts(m) == {("a", "lora"), ("a", "copy")} for m in both)
    for m in both:
        m.set_adapter("b")
    assert all(trainable_parts(m) == {("b", "lora"), ("b", "copy")} for m in both)
    for m, config in zip(both, (LoRAConfig(**saved), LoraConfig(**saved))):
        m.add_adapter("c", config)  # a refresh: b keeps training, a and c stay frozen
    assert all(trainable_parts(m) == {("b", "lora"), ("b", "copy")} for m in both)
    for m in both:
        m.set_adapter("b", inference_mode=True)
    assert all(trainable_parts(m) == set() for m in both)

    for m in ours_and_peft_from(tmp_path, "a", is_trainable=False):
        assert trainable_parts(m) == set()
        m.set_adapter("a")
        assert trainable_parts(m) == {("a", "lora"), ("a", "copy")}
        m.train()
        m(**batch_for("gpt2")).loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)

    frozen = dict(saved, inference_mode=True)
    for m in (
        get_lora_model(make_model("gpt2"), LoRAConfig(**frozen)),
        get_peft_model(make_model("gpt2"), LoraConfig(**frozen)),
    ):
        assert trainable_parts(m) == set()
        m.set_adapter("default")
        assert trainable_parts(m) == {("default", "lora"), ("default", "copy")}


def test_deleting_the_active_adapter_makes_the_next_one_trainable_as_peft(tmp_path):
    """peft switches to the remaining adapters with set_adapter, so they train even if loaded frozen;
    deleting an inactive adapter changes no one's trainability."""
    get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    both = ours_and_peft_from(tmp_path, "a", is_trainable=False)
    for m in both:
        m.load_adapter(tmp_path, "b")
        m.load_adapter(tmp_path, "c")
        m.delete_adapter("c")
    assert all(trainable_parts(m) == set() for m in both)
    for m in both:
        m.delete_adapter("a")
    assert all(m.active_adapters == ["b"] and trainable_parts(m) == {("b", "lora")} for m in both)


def test_linear_combination_of_adapters_with_other_ranks_per_layer_equals_peft():
    """A weighted adapter is zero-padded to one rank in every layer; combined again by "linear" beside an
    adapter of lower rank in some layer (rank_pattern), the factors are padded, not broadcast, as peft's
    (which keeps each layer's rank) gets."""
    fields = dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 6})
    base = make_model("llama")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields, init_lora_weights=False))
    model = get_lora_model(base, LoRAConfig(**fields, init_lora_weights=False))
    copy_lora_weights(model, ref)
    for m in (model, ref):
        m.add_weighted_adapter(["default"], [2.0], "w1", combination_type="linear")
        m.add_weighted_adapter(["w1", "default"], [0.5, 2.0], "w2", combination_type="linear")
    for path, layer in model.lora_layers():
        theirs = ref.base_model.model.get_submodule(path).get_delta_weight("w2")
        assert_close(layer.delta_weight("w2"), theirs, what=str(path))
