"""Hotswapping adapters into a compiled model without recompiling (peft's `prepare_model_for_compiled_hotswap`
and `hotswap_adapter`): what serving many adapters on one `torch.compile`d model needs.

torch.compile specialises on tensor shapes and on Python numbers: a new rank changes A and B's shapes and a
new alpha the scaling, and either recompiles. `prepare_for_hotswap`, called before compiling, pads every
adapter's A and B with zeros to one `target_rank` (zero rows and columns add nothing to B @ A) and holds each
scaling as a 0-d tensor; `hotswap_adapter` then writes another adapter's factors and scalings into those very
tensors, in place, so the compiled code runs on unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import re

import torch
from torch import nn

from .adapter_files import PREFIX, lora_file_keys, normalise_key
from .config import LoRAConfig
from .errors import AdapterFormatError, AdapterStateError
from .layers import LoRALayer
from .load_plan import plan_load
from .model import DEFAULT_ADAPTER, LoRAModel
from .reading import read_adapter
from .targets import prepare_config

logger = logging.getLogger(__name__)

PREPARE_ADVICE = (
    "call hf_lora.prepare_for_hotswap(model, target_rank=<the largest rank to come>) before compiling"
)


def prepare_for_hotswap(model: LoRAModel, target_rank: int | None = None) -> None:
    """Make the model's adapters hot-swappable without recompiling: A and B zero-padded to `target_rank`
    (default: the largest rank loaded; give the largest rank of the adapters to come), scalings held as
    tensors. Call it before `torch.compile`. The outputs are the same; the configs say rank `target_rank`, with
    alphas that keep each layer's scaling, so the model still saves adapters that load elsewhere."""
    _check_lora_model(model)
    layers = list(model.lora_layers())
    ranks = [layer.rank(n) for _, layer in layers for n in layer.lora_A]
    target = target_rank or max(ranks)
    if not isinstance(target, int) or target < max(ranks):
        raise ValueError(
            f"target_rank must be an int at least the largest rank loaded ({max(ranks)}), got {target_rank!r}."
        )
    if dora := [n for n, c in model.peft_config.items() if c.use_dora]:
        raise ValueError(
            f"DoRA adapters {dora} cannot be hotswapped (their magnitudes follow the base weights)."
        )
    if merged := sorted({n for _, layer in layers for n in layer.merged_adapters}):
        raise AdapterStateError(f"adapters {merged} are merged into the weights; unmerge_adapter() first.")
    configs = {
        name: padded_config(
            config,
            target,
            {p: float(layer.lora_scaling[name]) for p, layer in layers if name in layer.lora_A},
        )
        for name, config in model.peft_config.items()
    }
    with torch.no_grad():
        for _, layer in layers:
            for name in list(layer.lora_A):
                A, B = layer.lora_A[name], layer.lora_B[name]
                r = A.shape[0]
                layer.lora_A[name] = nn.Parameter(
                    torch.cat([A, A.new_zeros(target - r, *A.shape[1:])]), requires_grad=A.requires_grad
                )
                layer.lora_B[name] = nn.Parameter(
                    torch.cat([B, B.new_zeros(B.shape[0], target - r, *B.shape[2:])], dim=1),
                    requires_grad=B.requires_grad,
                )
                layer.lora_scaling[name] = torch.tensor(float(layer.lora_scaling[name]), device=A.device)
            layer.set_active(layer.active_adapters)  # (recomputes what forward runs: the plain path now)
    model.peft_config.update(configs)
    logger.info(
        "adapters %s padded to rank %d, scalings held as tensors: ready for hotswapping",
        list(configs),
        target,
    )


def hotswap_adapter(
    model: LoRAModel,
    model_id: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> None:
    """Replace adapter `adapter_name`'s weights and scalings, in place, by those of the adapter at `model_id`
    (a folder or Hub repo), of any rank up to the prepared one and any alpha (`prepare_for_hotswap`): a compiled
    model runs on without recompiling. Modules it does not adapt get zero updates. Everything is checked before
    anything is written: on an error the model is unchanged."""
    _check_lora_model(model)
    files = read_adapter(
        model_id, subfolder=subfolder, revision=revision, token=token, allow_pickle=allow_pickle
    )
    if adapter_name not in model.peft_config:
        raise AdapterStateError(f"unknown adapter {adapter_name!r}; this model has {model.adapters}.")
    layers = {p: layer for p, layer in model.lora_layers() if adapter_name in layer.lora_A}
    if unprepared := [
        p for p, layer in layers.items() if not isinstance(layer.lora_scaling[adapter_name], torch.Tensor)
    ]:
        raise AdapterStateError(
            f"adapter {adapter_name!r} is not prepared for hotswapping ({unprepared[0]}): {PREPARE_ADVICE}."
        )
    if merged := [p for p, layer in layers.items() if adapter_name in layer.merged_adapters]:
        raise AdapterStateError(f"adapter {adapter_name!r} is merged ({merged[0]}); unmerge_adapter() first.")
    config = prepare_config(model, files.config)
    extras = [
        f"{field}={getattr(config, field)!r}"
        for field, off in (
            ("use_dora", False),
            ("modules_to_save", None),
            ("trainable_token_indices", None),
            ("bias", "none"),
        )
        if getattr(config, field) not in (off, [])
    ]
    if extras:
        raise AdapterFormatError(
            f"adapter {files.source} has {', '.join(extras)}: hotswapping replaces LoRA factors only; load it "
            "with load_adapter() instead."
        )
    plan = plan_load(model, config, files)  # every key and shape, as its own config states them
    if outside := sorted(set(plan.targets) - set(layers)):
        raise AdapterFormatError(
            f"adapter {files.source} adapts modules that {adapter_name!r} does not ({', '.join(outside[:4])}); "
            "hotswapping fills the modules the loaded adapter has. Load first an adapter that covers them all."
        )
    padded = {p: layer.rank(adapter_name) for p, layer in layers.items()}
    if too_big := [
        (p, config.rank_for(p), padded[p]) for p in plan.targets if config.rank_for(p) > padded[p]
    ]:
        p, r, have = too_big[0]
        raise ValueError(
            f"adapter {files.source} has rank {r} at {p}, above the prepared rank {have}: {PREPARE_ADVICE}."
        )
    tensors = {normalise_key(k): t for k, t in files.tensors.items()}
    with torch.no_grad():
        for path, layer in layers.items():
            _swap_into(layer, adapter_name, path, config, tensors if path in plan.targets else None)
    model.peft_config[adapter_name] = padded_config(
        config.replace(inference_mode=model.peft_config[adapter_name].inference_mode),
        max(padded.values()),
        {p: config.scaling_for(p) if p in plan.targets else 0.0 for p in layers},
    )


def _swap_into(
    layer: LoRALayer, name: str, path: str, config: LoRAConfig, tensors: dict[str, torch.Tensor] | None
) -> None:
    """The new factors into the first rows/columns of the padded A and B, zeros after; the new scaling."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    A.zero_(), B.zero_()
    if tensors is None:  # a module the new adapter leaves alone: no update
        return
    a_key, b_key = lora_file_keys(layer)
    new_A, new_B = tensors[f"{PREFIX}{path}.{a_key}"], tensors[f"{PREFIX}{path}.{b_key}"]
    r = new_A.shape[0]
    A[:r].copy_(new_A)
    B[:, :r].copy_(new_B)
    layer.lora_scaling[name].fill_(config.scaling_for(path))


def padded_config(config: LoRAConfig, rank: int, scalings: dict[str, float]) -> LoRAConfig:
    """`config` at rank `rank` everywhere, with alphas that give each module (path -> scaling) its scaling:
    the most common one as `lora_alpha`, the others by exact-path `alpha_pattern` entries."""
    root = math.sqrt(rank) if config.use_rslora else rank
    alphas = {path: s * root for path, s in scalings.items() if s}
    values = list(alphas.values())
    alpha = max(set(values), key=values.count) if values else config.lora_alpha
    pattern = {re.escape(path): a for path, a in alphas.items() if a != alpha}
    return config.replace(r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern=pattern)


def _check_lora_model(model: nn.Module) -> None:
    if not isinstance(model, LoRAModel):
        raise TypeError(
            f"hotswapping needs a LoRA model (hf_lora.get_lora_model), got {type(model).__name__}."
        )
