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

import torch
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


_EXPERT_KEY = re.compile(r"^(?P<owner>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<f>lora_[AB])\.weight$")


def fused_expert_tensors(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """An adapter file of transformers 4 (one Linear per expert: `experts.<e>.w1.lora_A.weight`, ...) as
    peft converts it for the fused experts of transformers 5; the tensors unchanged for any other file.

    Per expert e, the two halves of gate_up_proj (w1 and w3, or gate_proj and up_proj) fuse into A_e =
    [A1_e; A3_e] and B_e = diag(B1_e, B3_e) (rank 2r, the same update for each half); A is stacked (E * r,
    in), B interleaved (out, r * E), peft's layout (`hf_lora.kinds.experts`)."""
    name = family(model)
    if name is None:
        return tensors
    if name == "mixtral":  # (transformers renamed Mixtral's block_sparse_moe to mlp)
        tensors = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
    per_expert: dict[tuple[str, str, str], dict[int, Any]] = {}
    out = {}
    for key, value in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None or m["proj"] not in FAMILIES[name]:
            out[key] = value
        else:
            per_expert.setdefault((m["owner"], m["proj"], m["f"]), {})[int(m["e"])] = value
    if not per_expert:
        return tensors
    mapping = FAMILIES[name]
    halves = FUSED[name]["gate_up_proj"]
    down = next(old for old, new in mapping.items() if new == "down_proj")
    for owner in sorted({o for o, _, _ in per_expert}):
        have = {p for o, p, _ in per_expert if o == owner}
        if set(halves) & have and not set(halves) <= have:
            raise ValueError(
                f"{owner}: the adapter has {sorted(set(halves) & have)} but not {sorted(set(halves) - have)}, which "
                "transformers 5 fused with it into gate_up_proj; it cannot be converted (nor can peft)."
            )
        nested = (
            ".base_layer" if down in have else ""
        )  # (peft nests gate_up_proj's wrapper inside down_proj's)
        for f in ("lora_A", "lora_B"):
            if set(halves) <= have:
                parts = [_by_expert(per_expert[(owner, h, f)], owner) for h in halves]
                if f == "lora_A":
                    fused = [torch.cat(ts, 0) for ts in zip(*parts)]
                else:
                    fused = [torch.block_diag(*ts) for ts in zip(*parts)]
                out[f"{owner}{nested}.{f}.weight"] = _stacked(fused, f)
            if down in have:
                out[f"{owner}.{f}.weight"] = _stacked(_by_expert(per_expert[(owner, down, f)], owner), f)
    return out


def _by_expert(tensors: dict[int, Any], owner: str) -> list[Any]:
    if sorted(tensors) != list(range(len(tensors))):
        raise ValueError(
            f"{owner}: the adapter has tensors for experts {sorted(tensors)}, not for each expert."
        )
    return [tensors[e] for e in range(len(tensors))]


def _stacked(per_expert: list[Any], f: str) -> Any:
    """A: (E * r, in), expert-major; B: (out, r * E), expert-minor (peft's ParamWrapper layout)."""
    if f == "lora_A":
        return torch.cat(per_expert, 0)
    return torch.stack(per_expert, -1).flatten(1)
