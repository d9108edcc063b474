"""LoRA on a diffusers UNet (a tiny UNet2DConditionModel from a config): its attention projections (Linear)
and its ResNet and transformer convolutions (Conv2d), against peft on the same model; the file loads into
peft and through diffusers' own `load_lora_adapter` (which goes through peft)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B
from safetensors.torch import load_file
from tolerance import LAYER_ROUNDINGS, assert_close, assert_close_states

from hf_lora import LoRAConfig, LoRAModel, get_lora_model

diffusers = pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"]


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([3, 700]),
        "encoder_hidden_states": torch.randn(2, 5, 8, generator=g),
    }


def denoise(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).sample


def pair(r: int = 4, alpha: int = 8):
    base = tiny_unet()
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    ours = get_lora_model(base, LoRAConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    randomise_B(ours)
    copy_lora_weights(ours, ref)
    return ours, ref


def test_unet_lora_equals_peft_forward_gradients_and_merge():
    ours, ref = pair()
    assert sorted(p for p, _ in ours.lora_layers()) == sorted(ref.targeted_module_names)
    kinds = {type(layer).__name__ for _, layer in ours.lora_layers()}
    assert kinds == {"LoRALinear", "LoRAConv2d"}
    expected = denoise(ref)
    assert (expected - denoise(tiny_unet())).abs().max() > 1e-3, "the adapter changes the outputs"
    assert_close(denoise(ours), expected, what="UNet outputs")
    for model in (ours, ref):
        model(**inputs()).sample.pow(2).mean().backward()
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        assert_close(layer.lora_A["default"].grad, twin.lora_A["default"].weight.grad, what=f"{path} grad A")
        assert_close(layer.lora_B["default"].grad, twin.lora_B["default"].weight.grad, what=f"{path} grad B")
    # the dense updates: peft's a convolution of the factors, ours a matmul, the same sums in another order
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    assert type(merged) is diffusers.UNet2DConditionModel
    assert_close_states(
        merged.state_dict(), ref_merged.state_dict(), roundings=LAYER_ROUNDINGS, what="merged"
    )
    assert_close(denoise(merged), expected, what="merged UNet outputs")


def test_unet_files_load_into_peft_diffusers_and_back(tmp_path):
    ours, ref = pair()
    expected = denoise(ours)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )
    assert_close(
        denoise(PeftModel.from_pretrained(tiny_unet(), tmp_path / "ours")), expected, what="peft loads ours"
    )
    assert_close(
        denoise(LoRAModel.from_pretrained(tiny_unet(), tmp_path / "peft")), expected, what="we load peft's"
    )
    # diffusers' loader: peft-format keys under a prefix, the LoRA config from metadata (under the same prefix)
    unet = tiny_unet()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    metadata = {f"base_model.model.{k}": config[k] for k in ("r", "lora_alpha", "target_modules")}
    unet.load_lora_adapter(
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        prefix="base_model.model",
        metadata=metadata,
    )
    assert_close(denoise(unet), expected, what="diffusers' load_lora_adapter")
