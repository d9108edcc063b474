"""QLoRA: LoRA over bitsandbytes-quantised bases (4-bit NF4/FP4, 8-bit LLM.int8), on CPU, against peft.

Both libraries run the quantised module's own forward for the base, on bit-identical quantised weights
(the same saved model quantised twice, deterministically). peft adds `B(A(dropout(x))) * s` to its output;
hf_lora's fused path (`hf_lora.fused.fused_around`, taken when the base computes in the adapter's dtype)
adds the update into it with one addmm and computes the base's input gradient as bitsandbytes' own backward
does. So outputs and gradients equal peft's up to the rounding of that one layer's sums (tolerance.py),
and where the plain path runs (bf16 compute here), bit for bit; merged weights and files are compared for
exact equality: any difference there is a defect, not rounding.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import prepare_model_for_kbit_training as peft_prepare
from reference import copy_lora_weights, randomise_B, training_curve
from safetensors.torch import load_file
from tiny_models import batch_for, tiny_llama
from tolerance import ROUNDINGS, adamw_atol, eps
from torch import nn

import hf_lora
from hf_lora import TargetModulesError

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

MODES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double-bf16": dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}  # fmt: skip
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(path)
    return path


def quantised(path, mode: str, **kwargs):
    config = BitsAndBytesConfig(**MODES[mode])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", **kwargs)


def pair(path, mode: str, **lora):
    """Our LoRA model and peft's on two loads of the same quantised model, with the same adapter weights."""
    lora = dict(r=8, lora_alpha=16, target_modules=TARGETS) | lora
    ours = hf_lora.get_lora_model(quantised(path, mode), hf_lora.LoRAConfig(**lora))
    randomise_B(ours)
    ref = get_peft_model(quantised(path, mode), LoraConfig(**lora))
    copy_lora_weights(ours, ref)
    return ours, ref


def weight_of(model, path: str) -> torch.Tensor:
    """The dense weight a (LoRA or peft) module's quantised base stands for."""
    if isinstance(model, PeftModel):
        model = model.base_model.model
    module = model.get_submodule(path)
    module = getattr(module, "base_layer", module)
    kind = hf_lora.kinds.kind_of(module) if not isinstance(module, hf_lora.LoRALayer) else module.lora_kind
    return kind.weight(module)


Q_PATH = "model.layers.0.self_attn.q_proj"


def fused_paths(model) -> dict[str, bool]:
    """Which of the model's LoRA layers took the fused path in the next forward: their output's grad_fn."""
    taken: dict[str, bool] = {}

    def record(path: str, out: torch.Tensor) -> None:
        taken.setdefault(path, "AroundFunction" in type(out.grad_fn).__name__)

    for path, layer in model.lora_layers():
        layer.register_forward_hook(lambda _m, _i, out, path=path: record(path, out))
    return taken


def assert_equal_up_to_rounding(ours: torch.Tensor, theirs: torch.Tensor, exact: bool, what: str) -> None:
    """Bit for bit on the plain path; on the fused one, ROUNDINGS eps of the compared tensor's own largest
    magnitude (tolerance.py: the roundings of one evaluation; gradients of ~1e-5 are bounded relative to
    themselves, not to 1)."""
    if exact:
        assert torch.equal(ours, theirs), what
    else:
        bound = ROUNDINGS * eps() * theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=bound, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", list(MODES))
def test_outputs_gradients_and_counts_equal_peft(saved_llama, mode):
    ours, ref = pair(saved_llama, mode)
    assert type(ours.get_submodule(Q_PATH)).__name__ == (
        "LoRALinear8bitLt" if mode == "int8" else "LoRALinear4bit"
    )
    # peft counts a 4-bit parameter as two weights per byte; the update is (r, in) + (out, r) per target
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    batch = batch_for("llama")
    taken = fused_paths(ours)
    out, twin = ours(**batch).logits, ref(**batch).logits
    # fp32 compute: the fused path everywhere; bf16 compute (x is fp32): the plain path, peft's ops
    plain = mode == "nf4-double-bf16"
    assert set(taken.values()) == {not plain}, taken
    assert_equal_up_to_rounding(out, twin, plain, "logits")
    out.square().mean().backward()
    twin.square().mean().backward()
    inner = ref.base_model.model
    for path, layer in ours.lora_layers():
        for factor in ("lora_A", "lora_B"):
            theirs = getattr(inner.get_submodule(path), factor)["default"].weight.grad
            assert_equal_up_to_rounding(
                getattr(layer, factor)["default"].grad, theirs, plain, f"{path} {factor}"
            )


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_training_curve_equals_peft(saved_llama, mode):
    """20 AdamW steps with dropout (peft's masks: the same elements dropped): the same curve and adapter
    up to rounding, bounded as `tolerance.adamw_atol` derives for two runs whose gradients differ by
    rounding alone (there is no float64 run of a quantised model to compare with)."""
    ours, ref = pair(saved_llama, mode, lora_dropout=0.1)
    batches = [
        batch_for("llama", seed=s) | {"labels": batch_for("llama", seed=s)["input_ids"]} for s in range(3)
    ]
    curve = training_curve(ours, batches, steps=20)
    twin = training_curve(ref, batches, steps=20)
    assert curve[-1] < curve[0] - 0.1  # it learns (by ~0.5 nats here): the curve is not a constant
    ours_w = hf_lora.adapter_state_dict(ours)
    peft_w = get_peft_model_state_dict(ref)
    assert ours_w.keys() == peft_w.keys()
    bound = adamw_atol(20, 5e-3, *peft_w.values())
    gap = max((ours_w[k] - peft_w[k]).abs().max().item() for k in ours_w)
    assert gap <= bound, f"adapters differ by {gap:.3g} > {bound:.3g}"
    # and the losses, each a sum over the same weights: within the weights' gap times the loss's
    # sensitivity, far below what one wrong mask or scaling moves it by (~1e-2)
    assert (curve - twin).abs().max().item() <= 1e-4, (curve - twin).abs().max()


@pytest.mark.parametrize("mode", list(MODES))
def test_merge_requantises_as_peft_and_says_what_it_costs(saved_llama, mode, caplog):
    ours, ref = pair(saved_llama, mode)
    batch = batch_for("llama")
    with torch.no_grad():
        unmerged = ours(**batch).logits
        before = weight_of(ours, Q_PATH)
        intended = before + ours.get_submodule(Q_PATH).delta_weight("default")
        with caplog.at_level(logging.WARNING, logger="hf_lora"):
            ours.merge_adapter()
        ref.merge_adapter()
        assert torch.equal(weight_of(ours, Q_PATH), weight_of(ref, Q_PATH))
        assert torch.equal(ours(**batch).logits, ref(**batch).logits)
        # The warning states the measured loss: ||stored - intended|| / ||update||, worst layer.
        warning = next(r.getMessage() for r in caplog.records if "into quantised weights" in r.getMessage())
        share = ours.get_submodule(Q_PATH).merge_rounding["default"]
        stored = weight_of(ours, Q_PATH)
        assert share == pytest.approx(((stored - intended).norm() / (intended - before).norm()).item())
        assert f"{100 * max(la.merge_rounding['default'] for _, la in ours.lora_layers()):.0f}%" in warning
        if mode == "int8":
            # LLM.int8 stores each row of W + s B A, cast to float16 first, as round(w * 127 / absmax): every
            # merged weight is within half a step of that (float32 rounding of the scale aside). The bug this
            # replaces lost the update entirely: errors of the update's size (up to 1.9 in logits).
            target = intended.half().float()
            step = target.abs().amax(dim=1, keepdim=True) / 127
            assert ((stored - target).abs() <= step / 2 * (1 + 1e-5)).all()
        merged_out = ours(**batch).logits
        assert not torch.equal(merged_out, unmerged)  # rounding: why it warns
        ours.unmerge_adapter()
        ref.unmerge_adapter()
        assert torch.equal(weight_of(ours, Q_PATH), weight_of(ref, Q_PATH))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_safe_merge_refuses_nan_and_leaves_the_weights(saved_llama, mode):
    ours, _ = pair(saved_llama, mode)
    weights = {p: weight_of(ours, p).clone() for p, _ in ours.lora_layers()}
    with torch.no_grad():
        ours.get_submodule("model.layers.1.mlp.down_proj").lora_B["default"][0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        ours.merge_adapter(safe_merge=True)
    for _, layer in ours.lora_layers():
        assert not layer.merged_adapters
        # layers merged before the failure are unmerged again: requantised twice, the same up to rounding
        # of half a quantisation step; the failing layer was never written
    assert torch.equal(
        weight_of(ours, "model.layers.1.mlp.down_proj"), weights["model.layers.1.mlp.down_proj"]
    )


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_dequantize_then_merge_is_exact(saved_llama, mode):
    """model.dequantize() gives the LoRA layers dense bases holding exactly the dequantised weights; the
    merge that follows rounds only in float32."""
    ours, _ = pair(saved_llama, mode)
    ours.eval()
    batch = batch_for("llama")
    with torch.no_grad():
        quantised_out = ours(**batch).logits
        dense = {p: weight_of(ours, p) for p, _ in ours.lora_layers()}
        ours.dequantize()
        for path, layer in ours.lora_layers():
            assert type(layer).__name__ == "LoRALinear" and torch.equal(layer.weight, dense[path])
        dense_out = ours(**batch).logits
        if mode != "int8":  # 4-bit dequantises the weight and multiplies in float32: the same numbers
            assert torch.equal(dense_out, quantised_out)
        # (LLM.int8 also rounds the activations to 8 bits: the dense model differs by that, ~5e-3 here)
        merged = ours.merge_and_unload()
    assert not hasattr(merged.config, "quantization_config") and not getattr(
        merged, "is_loaded_in_4bit", False
    )
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        # a merged weight W + s B A against x @ W.T + s (x @ A.T) @ B.T: a few float32 roundings of the logits
        torch.testing.assert_close(merged(**batch).logits, dense_out, rtol=0, atol=64 * 2**-23 * 10)


def test_files_load_both_ways_with_peft(saved_llama, tmp_path):
    ours, ref = pair(saved_llama, "nf4")
    batch = batch_for("llama")
    ours.eval(), ref.eval()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    a, b = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        expected = ours(**batch).logits
        into_peft = PeftModel.from_pretrained(quantised(saved_llama, "nf4"), tmp_path / "ours")
        assert torch.equal(into_peft(**batch).logits, expected)
        into_ours = hf_lora.LoRAModel.from_pretrained(quantised(saved_llama, "nf4"), tmp_path / "peft")
        assert isinstance(into_ours.get_submodule(Q_PATH), bnb.nn.Linear4bit)
        assert torch.equal(into_ours(**batch).logits, expected)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_dora_on_quantised_equals_peft(saved_llama, mode):
    ours, ref = pair(saved_llama, mode, use_dora=True)
    with torch.no_grad():  # a magnitude that is not the identity's, so DoRA's scaling shows
        for _, layer in ours.lora_layers():
            layer.lora_magnitude["default"].mul_(1.5)
    copy_lora_weights(ours, ref)
    batch = batch_for("llama")
    out, twin = ours(**batch).logits, ref(**batch).logits
    # the same ops but for the norm ||W + s B A||, which peft takes through its own dequantise-and-add:
    # a few float32 roundings of magnitudes ~10
    torch.testing.assert_close(out, twin, rtol=0, atol=64 * 2**-23 * 10)
    out.sum().backward(), twin.sum().backward()
    inner = ref.base_model.model
    for path, layer in ours.lora_layers():
        torch.testing.assert_close(
            layer.lora_magnitude["default"].grad, inner.get_submodule(path).lora_magnitude_vector["default"].weight.grad,
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip


class PackedLinear(nn.Linear):
    """A quantised Linear no base kind knows (GPTQ-like: an int8 weight only its own forward reads)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.zeros(n_out // 4, n_in, dtype=torch.int8), requires_grad=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = PackedLinear(16, 16)
        self.head = nn.Linear(16, 4)


@pytest.mark.parametrize("targets", [["proj"], "all-linear"])
def test_unknown_quantised_linear_is_refused_naming_its_class(targets):
    with pytest.raises(TargetModulesError, match=r"proj \(PackedLinear, an nn\.Linear whose weight is a Parameter of "
                       r"torch\.int8 \(4, 16\), not a dense \(out, in\) float tensor"):  # fmt: skip
        hf_lora.get_lora_model(Net(), hf_lora.LoRAConfig(target_modules=targets))


def test_pissa_is_refused_on_quantised_bases(saved_llama):
    model = quantised(saved_llama, "nf4")
    with pytest.raises(ValueError, match="PiSSA"):
        hf_lora.get_lora_model(model, hf_lora.LoRAConfig(target_modules=TARGETS, init_lora_weights="pissa"))
    assert not any(isinstance(m, hf_lora.LoRALayer) for m in model.modules())


def test_prepare_model_for_kbit_training_as_peft(saved_llama):
    ours = hf_lora.prepare_model_for_kbit_training(quantised(saved_llama, "nf4", dtype=torch.bfloat16))
    ref = peft_prepare(quantised(saved_llama, "nf4", dtype=torch.bfloat16))
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert ours_params.keys() == ref_params.keys()
    for name, p in ours_params.items():
        assert (type(p), p.dtype, p.requires_grad) == (
            type(ref_params[name]),
            ref_params[name].dtype,
            False,
        ), name
    assert any(p.dtype == torch.float32 for p in ours_params.values())  # the norms were bf16: now fp32
    assert ours.is_gradient_checkpointing and ref.is_gradient_checkpointing
    embeds = ours.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeds.requires_grad  # reentrant checkpointing needs it with the embeddings frozen


def qlora_model(path):
    """The usual path: a 4-bit base, prepared as peft prepares it, LoRA on every linear layer."""
    model = hf_lora.prepare_model_for_kbit_training(quantised(path, "nf4"))
    model = hf_lora.get_lora_model(model, hf_lora.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B["default"].normal_(std=0.02)
    return model


def test_qlora_trains_resumes_exactly_and_reloads_on_a_quantised_base(saved_llama, tmp_path):
    """from_pretrained(quantization_config) -> prepare -> get_lora_model -> LoRATrainer with checkpoints
    (a plain Trainer refuses a quantised model it sees no peft adapter on) -> an interrupted run resumed
    ends on the uninterrupted run's adapter bit for bit -> the saved adapter reloads onto a fresh quantised
    base with the same outputs."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (24, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def args(out, **extra):
        return TrainingArguments(
            output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
            use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True, **extra,
        )  # fmt: skip

    with pytest.raises(ValueError, match="purely quantized"):  # why LoRATrainer raises peft's flag
        Trainer(model=qlora_model(saved_llama), args=args(tmp_path / "plain"), train_dataset=data)
    straight = hf_lora.LoRATrainer(
        model=qlora_model(saved_llama), args=args(tmp_path / "a", save_strategy="steps", save_steps=3),
        train_dataset=data,
    )  # fmt: skip
    straight.train()
    assert "_hf_peft_config_loaded" not in vars(straight.model)
    assert not (tmp_path / "a/checkpoint-3/model.safetensors").exists(), "adapter-only checkpoints"
    resumed = hf_lora.LoRATrainer(
        model=qlora_model(saved_llama), args=args(tmp_path / "b"), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-3"))
    ours, theirs = hf_lora.adapter_state_dict(resumed.model), hf_lora.adapter_state_dict(straight.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    straight.model.save_pretrained(tmp_path / "adapter")
    batch = batch_for("llama")
    straight.model.eval()
    reloaded = hf_lora.LoRAModel.from_pretrained(quantised(saved_llama, "nf4"), tmp_path / "adapter")
    with torch.no_grad():
        # prepare_model_for_kbit_training left the (already float32) norms as they were: the same model
        assert torch.equal(reloaded(**batch).logits, straight.model(**batch).logits)


# ---- torchao (int8 weight-only through transformers' TorchAoConfig): a second backend that runs on CPU ----


def torchao_int8(path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def test_torchao_int8_equals_peft_outputs_training_and_merge(saved_llama, caplog):
    lora = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.1)
    ours = hf_lora.get_lora_model(torchao_int8(saved_llama), hf_lora.LoRAConfig(**lora))
    randomise_B(ours)
    ref = get_peft_model(torchao_int8(saved_llama), LoraConfig(**lora))
    copy_lora_weights(ours, ref)
    assert type(ours.get_submodule(Q_PATH).lora_kind).__name__ == "TorchaoKind"
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    batches = [
        batch_for("llama", seed=s) | {"labels": batch_for("llama", seed=s)["input_ids"]} for s in range(3)
    ]
    curve = training_curve(ours, batches, steps=10)
    assert torch.equal(curve, training_curve(ref, batches, steps=10))  # same ops on the same int8 weights
    ours.eval(), ref.eval()
    batch = batch_for("llama")
    with torch.no_grad():
        unmerged = ours(**batch).logits
        with caplog.at_level(logging.WARNING, logger="hf_lora"):
            ours.merge_adapter()
        ref.merge_adapter()
        assert "into quantised weights (torchao-quantised nn.Linear)" in caplog.text
        ours_w = ours.get_submodule(Q_PATH).weight
        assert type(ours_w).__name__ == "Int8Tensor"  # requantised with the model's config
        assert torch.equal(
            ours_w.dequantize(), ref.base_model.model.get_submodule(Q_PATH).base_layer.weight.dequantize()
        )
        assert torch.equal(ours(**batch).logits, ref(**batch).logits)
        ours.unmerge_adapter()
        ours.dequantize()
        assert type(ours.get_submodule(Q_PATH).weight) is nn.Parameter
        assert not any(
            hf_lora.kinds.kind_of(m).requantises for m in ours.modules() if hf_lora.kinds.kind_of(m)
        )
        # int8 weight-only multiplies the dequantised weight in float32: dense gives the same logits,
        # but for the weights requantised by the merge and unmerge above (half a step each)
        dense = ours(**batch).logits
        assert (dense - unmerged).abs().max() < 0.05


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_and_unload_gives_a_quantised_model_as_peft(saved_llama, mode):
    ours, ref = pair(saved_llama, mode)
    ours.eval(), ref.eval()
    batch = batch_for("llama")
    with torch.no_grad():
        merged, twin = ours.merge_and_unload(), ref.merge_and_unload()
        cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
        assert type(merged.get_submodule(Q_PATH)) is cls and not any(
            isinstance(m, hf_lora.LoRALayer) for m in merged.modules()
        )
        assert torch.equal(merged(**batch).logits, twin(**batch).logits)
