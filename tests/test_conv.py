"""LoRA on nn.Conv1d/2d/3d against peft's `lora.Conv1d/2d/3d`: outputs, gradients, training, merging, DoRA,
several adapters, files both ways, and what both refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B, training_curve
from safetensors.torch import load_file
from tolerance import (
    LAYER_ROUNDINGS,
    MERGE_ROUNDINGS,
    adamw_atol,
    assert_close,
    assert_close_states,
    assert_same_training,
)
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_lora import LoRAConfig, LoRAModel, get_lora_model
from hf_lora.errors import AdapterStateError, TargetModulesError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (16,), 2: (8, 8), 3: (4, 6, 6)}
TARGETS = ["conv1", "conv2", "conv3"]


class TinyCNN(nn.Module):
    """A 3x3 convolution with a bias, a strided one without, a 1x1 one (peft's merge has a path of its
    own for 1x1 kernels), optionally a depthwise one (groups=8), pooled into a Linear head."""

    def __init__(self, dim: int = 2, depthwise: bool = False):
        super().__init__()
        conv = CONV[dim]
        self.conv1 = conv(3, 8, 3, padding=1)
        self.conv2 = conv(8, 8, 3, stride=2, padding=1, bias=False)
        self.conv3 = conv(8, 8, 1)
        self.dw = conv(8, 8, 3, padding=1, groups=8) if depthwise else nn.Identity()
        self.head = nn.Linear(8, 4)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        h = torch.relu(self.conv1(pixel_values))
        h = self.dw(torch.relu(self.conv3(torch.relu(self.conv2(h)))))
        logits = self.head(h.flatten(2).mean(-1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def make_cnn(dim: int = 2, seed: int = 0, **kwargs) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(dim, **kwargs).eval()


def images(dim: int = 2, batch: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, *SIZE[dim], generator=g),
        "labels": torch.randint(0, 4, (batch,), generator=g),
    }


def pair(dim: int = 2, targets=TARGETS, depthwise: bool = False, **fields):
    """Ours and peft's on copies of one CNN, with our (randomised) factors copied into peft's."""
    base = make_cnn(dim, depthwise=depthwise)
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets, **fields)
    )
    ours = get_lora_model(base, LoRAConfig(r=8, lora_alpha=16, target_modules=targets, **fields))
    randomise_B(ours)
    if fields.get("use_dora"):  # a magnitude away from its initial norm, so that DoRA's scale is not 1
        with torch.no_grad():
            for _, layer in ours.lora_layers():
                layer.lora_magnitude["default"].mul_(1.1)
    copy_lora_weights(ours, ref)
    return ours, ref


def logits(model, dim: int = 2, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images(dim)["pixel_values"], **kwargs).logits


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_layers_factors_forward_and_gradients_equal_peft(dim):
    ours, ref = pair(dim)
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        assert layer.lora_A["default"].shape == twin.lora_A["default"].weight.shape
        assert layer.lora_B["default"].shape == twin.lora_B["default"].weight.shape
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert_close(logits(ours, dim), logits(ref, dim), what="logits")
    batch = images(dim)
    for model in (ours, ref):
        model(pixel_values=batch["pixel_values"]).logits.pow(2).sum().backward()
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        assert_close(layer.lora_A["default"].grad, twin.lora_A["default"].weight.grad, what=f"{path} grad A")
        assert_close(layer.lora_B["default"].grad, twin.lora_B["default"].weight.grad, what=f"{path} grad B")


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_training_with_dropout_follows_peft(use_dora):
    """Ten AdamW steps with dropout (masks drawn as peft draws them), in float64 and float32."""
    curves: tuple[dict, dict] = ({}, {})
    for dtype in (torch.float64, torch.float32):
        batches = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in images(2, seed=s).items()}
                   for s in range(3)]  # fmt: skip
        for model, curve in zip(pair(2, lora_dropout=0.1, use_dora=use_dora), curves):
            curve[dtype] = training_curve(model.to(dtype), batches, steps=10, seed=0)
    assert_same_training(*curves)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_merge_unmerge_and_unload_equal_peft(dim, use_dora):
    # peft cannot merge a 1x1x1 Conv3d: its 1x1 shortcut tests `weight.size()[2:4] == (1, 1)`, true for a
    # 1x1x1 kernel too, and squeezes the factors to 3-D tensors that do not multiply (peft 0.21.2)
    ours, ref = pair(dim, targets=TARGETS[:2] if dim == 3 else TARGETS, use_dora=use_dora)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = logits(ours, dim)
    assert_close(expected, logits(ref, dim), what="logits")
    ours.merge_adapter()
    assert_close(logits(ours, dim), expected, what="merged logits")
    ours.unmerge_adapter()
    # LoRA: add and subtract the same delta (MERGE_ROUNDINGS); DoRA also scales by m / ||W + d|| and back,
    # a few roundings more, as many as one layer's evaluation (LAYER_ROUNDINGS)
    roundings = LAYER_ROUNDINGS if use_dora else MERGE_ROUNDINGS
    assert_close_states(ours.state_dict(), before, roundings=roundings, what="unmerged")
    # peft computes the dense update as a convolution of A with B, we as a matmul of the flattened factors:
    # the same r products per element summed in another order, then scaled and added to W (LAYER_ROUNDINGS)
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    assert type(merged.conv1) is CONV[dim]
    assert_close_states(
        merged.state_dict(), ref_merged.state_dict(), roundings=LAYER_ROUNDINGS, what="merged"
    )


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_files_travel_both_ways(tmp_path, use_dora):
    ours, ref = pair(2, use_dora=use_dora)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    assert_close_states(ours_file, peft_file, what="file")
    expected = logits(ours)
    for model in (PeftModel.from_pretrained(make_cnn(), tmp_path / "ours"),
                  LoRAModel.from_pretrained(make_cnn(), tmp_path / "peft")):  # fmt: skip
        assert_close(logits(model), expected, what="reloaded logits")


def test_conv_several_adapters_disable_and_mixed_batches_equal_peft():
    ours, ref = pair(2)
    ours.add_adapter("other", LoRAConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv3"]))
    ref.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv3"]))
    randomise_B(ours, seed=3)
    copy_lora_weights(ours, ref, "default")
    copy_lora_weights(ours, ref, "other")
    base = logits(make_cnn())
    for name in ("other", "default"):
        ours.set_adapter(name)
        ref.set_adapter(name)
        assert_close(logits(ours), logits(ref), what=f"{name} logits")
        assert (logits(ours) - base).abs().max() > 1e-3, "the adapter changes the outputs"
    with ours.disable_adapter():
        assert torch.equal(logits(ours), base)
    ours.eval(), ref.eval()  # (peft refuses adapter_names in training mode)
    rows = ["other", "__base__", "default", "other"]
    mixed = logits(ours, adapter_names=rows)
    assert_close(mixed, logits(ref, adapter_names=rows), what="mixed-batch logits")
    assert_close(mixed[1], base[1], what="base row")


def test_depthwise_conv_groups_as_peft():
    """B is grouped like the base: forward and gradients as peft's; a rank not divisible by the groups is
    refused before the model is touched; merging a grouped convolution is refused, all or nothing."""
    ours, ref = pair(2, targets=["conv1", "dw"], depthwise=True)
    assert ours.get_submodule("dw").lora_B["default"].shape == (8, 1, 1, 1)
    assert_close(logits(ours), logits(ref), what="logits")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(AdapterStateError, match="groups=8"):
        ours.merge_adapter()
    assert ours.get_submodule("conv1").merged_adapters == []
    assert_close_states(ours.state_dict(), before, roundings=MERGE_ROUNDINGS, what="after a failed merge")
    untouched = make_cnn(depthwise=True)
    with pytest.raises(TargetModulesError, match=r"r=4 is not divisible by its groups=8.*multiple of 8"):
        get_lora_model(untouched, LoRAConfig(r=4, target_modules=["conv1", "dw"]))
    with pytest.raises(TargetModulesError, match=r"dw: DoRA needs the update as a kernel.*groups=8"):
        get_lora_model(untouched, LoRAConfig(r=8, target_modules=["conv1", "dw"], use_dora=True))
    with pytest.raises(ValueError, match="divisible by groups"):
        get_peft_model(make_cnn(depthwise=True), LoraConfig(r=4, target_modules=["conv1", "dw"]))
    assert not any("lora" in n for n, _ in untouched.named_parameters()), "the model is as before"


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_inits_that_move_base_weights_are_refused_on_convs_as_peft(init):
    with pytest.raises(
        TargetModulesError, match=f"init_lora_weights='{init}' does not apply to convolutions"
    ):
        get_lora_model(make_cnn(), LoRAConfig(r=4, target_modules=["conv1"], init_lora_weights=init))
    with pytest.raises(ValueError):
        get_peft_model(make_cnn(), LoraConfig(r=4, target_modules=["conv1"], init_lora_weights=init))


def test_all_linear_leaves_convs_as_peft():
    ours = get_lora_model(make_cnn(), LoRAConfig(r=4, target_modules="all-linear"))
    ref = get_peft_model(make_cnn(), LoraConfig(r=4, target_modules="all-linear"))
    assert sorted(p for p, _ in ours.lora_layers()) == sorted(ref.targeted_module_names) == ["head"]


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_dilated_and_padded_convs_merge_to_what_the_adapter_computed(padding_mode):
    """peft's A leaves out the base's dilation and padding mode (its forward fails on a dilated conv, its
    merge changes a circular one's outputs); ours keeps both, so merging changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2, padding_mode=padding_mode), nn.ReLU())
    ours = get_lora_model(model, LoRAConfig(r=4, target_modules=["0"]))
    randomise_B(ours)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = ours(x)
        assert expected.shape == (2, 8, 9, 9)
        with ours.disable_adapter():
            assert (ours(x) - expected).abs().max() > 1e-3
        ours.merge_adapter()
        assert_close(ours(x), expected, what="merged outputs")


def test_unwrappable_modules_are_named_with_the_kinds():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(TargetModulesError, match=r"1 \(BatchNorm2d\).*nn\.ConvNd"):
        get_lora_model(model, LoRAConfig(target_modules=["1"]))


def test_conv_weighted_adapters_equal_peft():
    """ "cat" is exact in both libraries; "svd" at the full combined rank is exact too (up to rounding)."""
    ours, ref = pair(2)
    ours.add_adapter("other", LoRAConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    ref.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    randomise_B(ours, seed=3)
    copy_lora_weights(ours, ref, "default")
    copy_lora_weights(ours, ref, "other")
    for model in (ours, ref):
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "cat", combination_type="cat")
        model.set_adapter("cat")
    assert ours.get_submodule("conv1").lora_A["cat"].shape == (12, 3, 3, 3)
    expected = logits(ref)
    assert_close(logits(ours), expected, what="cat logits")
    ours.add_weighted_adapter(["default", "other"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=12)
    ours.set_adapter("svd")
    assert_close(logits(ours), expected, what="full-rank svd logits")


def test_extracting_a_conv_adapter_reproduces_a_low_rank_fine_tune():
    """A fine-tune that moved conv1 by a rank-2 kernel update: extract_lora at r=2 gives it back (as LoRA
    factors in peft's conv shapes); a grouped convolution, whose update cannot factor so, is refused."""
    import hf_lora

    base, tuned = make_cnn(), make_cnn()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        tuned.conv1.weight += (torch.randn(8, 2, generator=g) @ torch.randn(2, 27, generator=g)).view(
            8, 3, 3, 3
        ) / 10
    model = hf_lora.extract_lora(base, tuned, r=2, target_modules=["conv1"])
    assert model.get_submodule("conv1").lora_A["default"].shape == (2, 3, 3, 3)
    # float64 SVD of the float32 difference, rounded to float32 factors: a few roundings of the weights
    assert_close(logits(model), logits(tuned), roundings=LAYER_ROUNDINGS, what="extracted logits")
    grouped, grouped_tuned = make_cnn(depthwise=True), make_cnn(depthwise=True)
    with torch.no_grad():
        grouped_tuned.dw.weight += 0.1
    with pytest.raises(ValueError, match=r"cannot extract an adapter for dw.*grouped convolution"):
        hf_lora.extract_lora(grouped, grouped_tuned, r=8, target_modules=["dw"])


def test_lora_trainer_trains_conv_adapters_as_peft_with_the_trainer(tmp_path):
    """Four AdamW steps of LoRATrainer against transformers' Trainer on the peft twin: the same adapter,
    checkpointed in peft's format."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import hf_lora

    batch = images(2, batch=16, seed=7)
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    ours, ref = pair(2)
    initial = {k: v.clone() for k, v in ours.state_dict().items() if "lora" in k}
    runs = {}
    for name, model, trainer_class in (("ours", ours, hf_lora.LoRATrainer), ("peft", ref, Trainer)):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer_class(model=model, args=args, train_dataset=data).train()
        model.save_pretrained(tmp_path / name / "adapter")
        runs[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    trained = max((v - initial[k]).abs().max().item() for k, v in ours.state_dict().items() if k in initial)
    assert trained > 1e-3, "the adapter trained"
    moved = max((runs["ours"][k] - runs["peft"][k]).abs().max().item() for k in runs["peft"])
    bound = adamw_atol(4, 1e-2, *runs["peft"].values())
    assert moved <= bound, f"adapters differ by {moved:.3g} > {bound:.3g} after 4 steps"
