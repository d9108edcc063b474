"""Targets on MoE models whose experts transformers 5 fused (Mixtral, Qwen3-MoE, DeepSeek-V3, ... : the
model types transformers converts from their transformers-4 checkpoints), as peft 0.21 reads a config for
them: "all-linear" also takes the router (`gate.weight`) and the experts (`gate_up_proj`, `down_proj`) as
`target_parameters`; the transformers-4 names of those projections in `target_modules` (Mixtral's `w1`,
`w3`, `w2`, `gate`; the others' `gate_proj`, `up_proj`, `down_proj`, `gate`) become the same parameters,
and where two projections were fused into `gate_up_proj`, its rank and alpha double (`rank_pattern` and
`alpha_pattern` key `.*\\.gate_up_proj`), which keeps each half's update and scaling. (As in peft, these
names then leave `target_modules`: a DeepSeek-V3 shared expert's `gate_proj` is no longer adapted.)
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .config import LoRAConfig

# transformers-4 name -> transformers-5 parameter, per family (peft's _MOE_TARGET_MODULE_MAPPING)
FAMILIES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
FUSED: dict[str, dict[str, list[str]]] = {  # peft's _MOE_FUSED_TARGETS
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def family(model: nn.Module) -> str | None:
    """The conversion family of the model's type (transformers' table, Mixtral's own as peft sets it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # (transformers 4: nothing was fused)
        return None
    name = "mixtral" if model_type == "mixtral" else patterns.get(model_type)
    if name not in FAMILIES or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return name


def convert_moe_config(model: nn.Module, config: LoRAConfig, linear_leaves: Any) -> LoRAConfig:
    """`config` as peft reads it for this model (see the module docstring); itself where nothing changes.
    `linear_leaves()` gives the last names of the modules "all-linear" takes."""
    name = family(model)
    if name is None or config.target_modules is None:
        return config
    mapping = FAMILIES[name]
    targets = config.target_modules
    if targets == "all-linear":
        targets = sorted(set(linear_leaves()) | mapping.keys())
    elif isinstance(targets, str):
        return config  # (a regex: left as it is; peft probes it against reconstructed v4 names)
    parameters = list(config.target_parameters or [])
    modules, present = [], set()
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            modules.append(target)
            continue
        present.add(old)
        if mapping[old] not in parameters:
            parameters.append(mapping[old])
    if not present:
        return config
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for fused, parts in FUSED[name].items():
        have = present & set(parts)
        if have and len(have) < len(parts):
            raise ValueError(
                f"target_modules names {', '.join(sorted(have))} but not {', '.join(sorted(set(parts) - have))}, "
                f"which transformers 5 fused with it into {fused}: name all of them (as peft requires)."
            )
        if have:
            key = rf".*\.{re.escape(fused)}"
            rank_pattern[key] = config.r * len(parts)
            alpha_pattern[key] = config.lora_alpha * len(parts)
    return config.replace(
        target_modules=modules or None,  # (None with target_parameters: no modules)
        target_parameters=parameters,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
