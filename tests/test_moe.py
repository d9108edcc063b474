"""LoRA on parameters (`target_parameters`) of MoE models against peft's `ParamWrapper`: the fused 3-D
experts of transformers 5 (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert, gpt-oss with biases and
the (E, in, out) layout) and a router's 2-D weight. Outputs, gradients, merging, files both ways, several
adapters, disabling, and what both refuse. Tiny models from configs, in float32.

Tolerances: one model evaluation computed in two orders (peft: the weights W + s B A for the call; ours,
per routed token, x W^T + s (x A^T) B^T) differs by rounding only: `ROUNDINGS` eps of the largest
magnitude (tests/tolerance.py). A merge differs from peft's by the rounding of W + delta: MERGE_ROUNDINGS.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B, training_curve
from safetensors.torch import load_file
from tolerance import MERGE_ROUNDINGS, assert_as_accurate, assert_close, assert_same_training
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import hf_lora.kinds.experts as experts_kind
from hf_lora import LoRAConfig, LoRAModel, get_lora_model
from hf_lora.errors import AdapterStateError, TargetModulesError

VOCAB = 128
COMMON = dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
    num_experts_per_tok=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8, **COMMON
        )
        model = Qwen3MoeForCausalLM(cfg)
    elif arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=16, num_local_experts=4, **COMMON))
    elif arch == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
            **COMMON,
        )  # fmt: skip
        model = Qwen2MoeForCausalLM(cfg)
    elif arch == "deepseek_v3":  # (shared experts; its first layer dense)
        cfg = DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, n_group=1,
            topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, **COMMON,
        )  # fmt: skip
        model = DeepseekV3ForCausalLM(cfg)
    else:
        model = GptOssForCausalLM(
            GptOssConfig(intermediate_size=16, num_local_experts=4, head_dim=8, **COMMON)
        )
        with torch.no_grad():  # (its biases and router start at zero: give them values)
            for name, p in model.named_parameters():
                if "bias" in name or "router" in name:
                    p.normal_(0, 0.2)
    return model.eval()


ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def pair(arch: str, eager: bool = False, **fields):
    """Our model and peft's with the same adapter weights (B random). `eager`: transformers' experts loop
    instead of its default grouped_mm, which has no float64 kernel."""
    fields = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": EXPERTS, **fields}
    base = tiny(arch)
    if eager:
        base.set_experts_implementation("eager")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    randomise_B(ours)
    copy_lora_weights(ours, ref)
    return ours, ref


def grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def peft_state(ref) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_adapters_forward_gradients_and_keys_equal_peft(arch):
    ours, ref = pair(arch)
    from hf_lora.adapter_files import adapter_state_dict

    assert sorted(adapter_state_dict(ours)) == sorted(peft_state(ref))  # (peft's nested keys)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    x = batch()
    expected, actual = ref(input_ids=x).logits, ours(input_ids=x).logits
    assert (expected - tiny(arch)(input_ids=x).logits).abs().max() > 1e-3  # the experts' adapters act
    assert_close(actual, expected, what="logits")
    (expected**2).mean().backward()
    (actual**2).mean().backward()
    ref_grads = {k.removeprefix("base_model.model."): g for k, g in grads(ref).items()}
    for path, layer in ours.lora_layers():
        where = layer.lora_kind.file_path(path, layer)
        for f in ("A", "B"):
            g = getattr(layer, f"lora_{f}")["default"].grad
            assert_close(g, ref_grads[f"{where}.lora_{f}.weight"], what=f"{where} lora_{f} grad")


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_routed_path_equals_weights_path(arch, implementation, monkeypatch):
    """Per routed token (the fast path: grouped matmuls, or the loop over experts) and W + delta for the call
    (the reference): same outputs, gradients."""
    ours, _ = pair(arch, target_modules=None)
    ours.set_experts_implementation(implementation)
    x = batch()
    out = {}
    for routed in (True, False):
        monkeypatch.setattr(experts_kind, "routable", lambda owner, r=routed: r)
        ours.zero_grad()
        logits = ours(input_ids=x).logits
        (logits**2).mean().backward()
        out[routed] = (logits, {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad})
    assert_close(out[True][0], out[False][0], what="logits")
    for n, g in out[False][1].items():
        assert_close(out[True][1][n], g, what=n)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_and_merge_and_unload_equal_peft(arch):
    ours, ref = pair(arch)
    x = batch()
    unmerged = ours(input_ids=x).logits.detach()
    ours.merge_adapter()
    ref.merge_adapter()
    for name, p in ref.base_model.model.named_parameters():
        if "experts" in name and "lora" not in name:
            own = ours.get_parameter(name.replace(".base_layer", ""))
            assert_close(own, p, roundings=MERGE_ROUNDINGS, what=name)
    assert_close(ours(input_ids=x).logits, unmerged, what="merged logits")
    ours.unmerge_adapter()
    base = tiny(arch)
    for name, p in base.named_parameters():
        assert_close(ours.get_parameter(name), p, roundings=MERGE_ROUNDINGS, what=name)
    plain = ours.merge_and_unload()
    assert type(plain) is type(base)
    assert not any("lora" in n for n, _ in plain.named_modules())
    assert type(plain.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert_close(plain(input_ids=x).logits, unmerged, what="merge_and_unload logits")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_files_load_both_ways(arch, tmp_path):
    ours, ref = pair(arch)
    x = batch()
    expected = ref(input_ids=x).logits.detach()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert_close(mine[k], theirs[k], what=k)
    loaded = LoRAModel.from_pretrained(tiny(arch), tmp_path / "peft")
    assert_close(loaded(input_ids=x).logits, expected, what="ours from peft's files")
    in_peft = PeftModel.from_pretrained(tiny(arch), tmp_path / "ours")
    assert_close(in_peft(input_ids=x).logits, expected, what="peft from our files")


def test_router_weight_rank_pattern_and_several_adapters():
    fields = dict(
        target_parameters=["gate.weight", *EXPERTS],
        target_modules=None,
        rank_pattern={"experts.down_proj": 3},
    )
    ours, ref = pair("qwen3_moe", **fields)
    slot = ours.get_submodule("model.layers.0.mlp.experts.lora_params.down_proj")
    assert slot.rank("default") == 3 and slot.lora_A["default"].shape == (12, 16)
    x = batch()
    assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, what="logits")
    # a second adapter, both active, then disabled
    second = dict(r=2, lora_alpha=4, target_parameters=[*EXPERTS, "gate.weight"])
    ours.add_adapter("other", LoRAConfig(**second))
    ref.add_adapter("other", LoraConfig(**second))
    randomise_B(ours, seed=5)  # (every adapter's B)
    for name in ("default", "other"):
        copy_lora_weights(ours, ref, adapter=name)
    ours.set_adapter(["default", "other"])
    ref.base_model.set_adapter(["default", "other"])
    assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, what="two adapters")
    with ours.disable_adapter(), ref.disable_adapter():
        assert_close(ours(input_ids=x).logits, tiny("qwen3_moe")(input_ids=x).logits, what="disabled")
    with pytest.raises(AdapterStateError, match="mixed batches"):
        ours(input_ids=x, adapter_names=["default", "other"])


def test_refused_as_in_peft():
    for fields, match in (
        (dict(lora_dropout=0.1), "lora_dropout"),
        (dict(use_dora=True), "use_dora"),
        (dict(init_lora_weights="pissa"), "pissa"),
    ):
        model = tiny("qwen3_moe")
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(TargetModulesError, match=match):
            get_lora_model(model, LoRAConfig(target_parameters=EXPERTS, **fields))
        assert {n: type(m) for n, m in model.named_modules()} == before  # untouched
    with pytest.raises(TargetModulesError, match="matches no parameter"):
        get_lora_model(tiny("qwen3_moe"), LoRAConfig(target_parameters=["experts.nothing"]))
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        LoRAConfig(target_parameters="experts.down_proj")


def test_peft_config_with_target_parameters_round_trips():
    config = LoRAConfig(target_parameters=EXPERTS, target_modules=None)
    again = LoRAConfig.from_dict(config.to_dict())
    assert again.target_parameters == EXPERTS and again.target_modules is None
    assert LoraConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}).target_parameters


@pytest.mark.parametrize("arch", [*ARCHS, "deepseek_v3"])
def test_all_linear_covers_what_peft_covers(arch, tmp_path):
    """peft's "all-linear" on Mixtral, Qwen3-MoE and DeepSeek-V3 (transformers 5) also takes the router and
    the experts, the fused gate_up_proj with twice the rank and alpha (and no longer DeepSeek's shared
    experts and dense MLPs, whose gate_proj/up_proj/down_proj names it maps to the experts); on Qwen2-MoE
    and gpt-oss, the Linears only."""
    ours, ref = pair(arch, target_modules="all-linear", target_parameters=None)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    from hf_lora.adapter_files import adapter_state_dict

    assert sorted(adapter_state_dict(ours)) == sorted(peft_state(ref))
    fused = arch in ("qwen3_moe", "mixtral", "deepseek_v3")
    assert any("mlp.gate" in k for k in adapter_state_dict(ours)) == fused
    x = batch()
    assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, what="logits")
    ours.save_pretrained(tmp_path)
    saved = LoRAConfig.from_dict(__import__("json").loads((tmp_path / "adapter_config.json").read_text()))
    assert set(saved.target_parameters or []) == set(ref.peft_config["default"].target_parameters or [])
    if fused:  # (elsewhere peft writes the Linears' full paths, ours "all-linear")
        assert set(saved.target_modules) == set(ref.peft_config["default"].target_modules)
    assert saved.rank_pattern == ref.peft_config["default"].rank_pattern
    assert saved.alpha_pattern == ref.peft_config["default"].alpha_pattern
    in_peft = PeftModel.from_pretrained(tiny(arch), tmp_path)
    assert_close(in_peft(input_ids=x).logits, ours(input_ids=x).logits, what="peft from our files")


V4_NAMES = {  # transformers-4 module names: MoE block, the expert projections, their (out, in) shapes
    "mixtral": ("block_sparse_moe", {"w1": (16, 32), "w3": (16, 32), "w2": (32, 16)}),
    "qwen3_moe": ("mlp", {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}),
}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_transformers4_per_expert_files_convert_as_peft(arch, tmp_path):
    """An adapter trained on transformers 4 (a Linear per expert, and the router a Linear `gate`): peft
    converts it on load (the fused gate_up_proj gets rank 2r, B block-diagonal); so do we, same logits."""
    block, projections = V4_NAMES[arch]
    r = 2
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(2):
        pre = f"base_model.model.model.layers.{layer}"
        for name, (n_out, n_in) in {"self_attn.q_proj": (32, 32), f"{block}.gate": (4, 32)}.items():
            tensors[f"{pre}.{name}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.3
            tensors[f"{pre}.{name}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.3
        for e in range(4):
            for proj, (n_out, n_in) in projections.items():
                key = f"{pre}.{block}.experts.{e}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.3
    LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "gate", *projections]).save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    x = batch()
    ref = PeftModel.from_pretrained(tiny(arch), tmp_path)
    expected = ref(input_ids=x).logits
    assert (expected - tiny(arch)(input_ids=x).logits).abs().max() > 1e-2  # (the converted adapter acts)
    ours = LoRAModel.from_pretrained(tiny(arch), tmp_path)
    assert_close(ours(input_ids=x).logits, expected, what="logits")
    assert ours.peft_config["default"].rank_pattern == ref.peft_config["default"].rank_pattern
    # half of a fused pair: refused, as peft refuses it
    half = {k: v for k, v in tensors.items() if f".{next(iter(projections))}." not in k}
    save_file(half, tmp_path / "adapter_model.safetensors")
    LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", *list(projections)[1:]]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fused"):
        LoRAModel.from_pretrained(tiny(arch), tmp_path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_training_curves_equal_peft(arch):
    """AdamW steps on the experts (the routed path) against peft's weights path, float64 and float32."""
    ids = [batch(seed) for seed in range(3)]
    batches = [{"input_ids": x, "labels": x} for x in ids]
    curves: tuple[dict, dict] = ({}, {})
    for dtype in (torch.float64, torch.float32):
        for model, curve in zip(pair(arch, eager=True), curves):
            curve[dtype] = training_curve(model.to(dtype), batches, steps=6, seed=0)
    assert_same_training(*curves)


def test_deepcopy_and_pickle_keep_each_slot_on_its_owner():
    ours, _ = pair("qwen3_moe")
    x = batch()
    expected = ours(input_ids=x).logits.detach()
    twin = copy.deepcopy(ours)
    experts = twin.model.layers[0].mlp.experts
    assert experts.lora_params["gate_up_proj"].owner is experts
    twin.merge_adapter()  # (into the copy's weights only)
    original = ours.model.layers[0].mlp.experts.gate_up_proj
    assert_close(
        original, tiny("qwen3_moe").model.layers[0].mlp.experts.gate_up_proj, what="original weights"
    )
    assert_close(twin(input_ids=x).logits, expected, what="merged copy")
    buffer = __import__("io").BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert (
        again.model.layers[1].mlp.experts.lora_params["down_proj"].owner is again.model.layers[1].mlp.experts
    )
    assert_close(again(input_ids=x).logits, expected, what="unpickled")


def test_adapters_must_target_the_same_parameters_as_in_peft():
    ours, _ = pair("qwen3_moe")
    with pytest.raises(TargetModulesError, match="same"):
        ours.add_adapter("other", LoRAConfig(target_parameters=["experts.down_proj"]))
    assert sorted(ours.peft_config) == ["default"]
    ours.add_adapter("modules_only", LoRAConfig(target_modules=["k_proj"]))  # (no parameters: allowed)


def test_trainer_checkpoints_the_expert_adapters_and_resumes_exactly(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_lora import LoRATrainer
    from hf_lora.adapter_files import adapter_state_dict

    ids = torch.randint(1, VOCAB, (16, 9), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def train(out, resume=None):
        model = get_lora_model(tiny("qwen3_moe"), LoRAConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
        randomise_B(model)
        args = TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
            use_cpu=True, seed=0, save_strategy="steps", save_steps=2, disable_tqdm=True,
        )  # fmt: skip
        LoRATrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return adapter_state_dict(model)

    straight = train(tmp_path / "straight")
    saved = load_file(tmp_path / "straight" / "checkpoint-2" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(straight)  # (the adapter only, under peft's keys)
    assert any(k.endswith("experts.base_layer.lora_A.weight") for k in saved)
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    for k in straight:  # (same steps on the same data from the restored state: the same arithmetic)
        assert torch.equal(resumed[k], straight[k]), k


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bf16_is_as_accurate_as_peft(arch):
    """A bf16 model (adapters cast with it): our logits and gradients are as close to the float32 ones as
    peft's bf16 ones are (tolerance.assert_as_accurate: rounding grows along a whole model in bf16)."""
    x = batch()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = (m.to(dtype) for m in pair(arch))
        for name, model in (("ours", ours), ("peft", ref)):
            logits = model(input_ids=x).logits
            logits.float().square().mean().backward()
            layer = model.get_submodule(
                "model.layers.0.mlp.experts.lora_params.down_proj"
                if name == "ours"
                else "base_model.model.model.layers.0.mlp.experts"
            )
            grad = (layer.lora_A["default"] if name == "ours" else layer.lora_A["default"].weight).grad
            results[name, dtype] = logits.float(), grad.float()
    for i, what in enumerate(("logits", "down_proj lora_A grad")):
        exact = results["peft", torch.float32][i]
        assert_close(results["ours", torch.float32][i], exact, what=what)
        assert_as_accurate(
            results["ours", torch.bfloat16][i], results["peft", torch.bfloat16][i], exact,
            floor_dtype=torch.bfloat16, what=what,
        )  # fmt: skip


def test_a_failed_load_adapter_leaves_the_model_as_before(tmp_path, monkeypatch):
    import hf_lora.loading

    ours, _ = pair("qwen3_moe")
    ours.save_pretrained(tmp_path)
    x = batch()
    before = ours(input_ids=x).logits.detach()

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(hf_lora.loading, "_copy_tensors", fail)
    with pytest.raises(RuntimeError, match="injected"):
        ours.load_adapter(tmp_path, adapter_name="other")
    assert sorted(ours.peft_config) == ["default"]
    assert all(list(layer.lora_A) == ["default"] for _, layer in ours.lora_layers())
    assert_close(ours(input_ids=x).logits, before, what="logits")
    plain = ours.unload()  # (and without adapters: the original classes, no slots)
    assert not any("lora" in n for n, _ in plain.named_modules())
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
