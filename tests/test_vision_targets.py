"""Default targets for the vision, audio and multimodal encoders transformers ships (peft has no defaults for
them): each resolves, on the model as transformers builds it, to the modules peft adapts when given the same
names. The models are built on the meta device (shapes only, no memory, no compute)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel

from hf_lora import LoRAConfig, get_lora_model
from hf_lora.targets import TARGET_MODULES

ENCODERS = [
    "vit", "deit", "beit", "dinov2", "vit_mae", "swin", "swinv2", "yolos", "videomae", "convnext", "resnet",
    "clip", "clip_vision_model", "siglip", "wav2vec2", "hubert", "whisper",
]  # fmt: skip


def on_meta(model_type: str) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.for_model(model_type))


@pytest.mark.parametrize("model_type", ENCODERS)
def test_default_targets_of_encoders_resolve_as_peft_would(model_type):
    defaults = TARGET_MODULES[model_type]
    ours = get_lora_model(on_meta(model_type), LoRAConfig(r=4))
    paths = sorted(p for p, _ in ours.lora_layers())
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(defaults), "every default name is found"
    ref = get_peft_model(on_meta(model_type), LoraConfig(r=4, target_modules=defaults))
    assert paths == sorted(ref.targeted_module_names)
