"""What a user checks before saving or merging: each adapter layer's state (`get_layer_status`), the model's
in one summary (`get_model_status`), with peft's fields and peft's "irregular" where layers disagree; and
`set_requires_grad`, peft's switch for the gradients of named adapters."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import AdapterStateError
from .layers import LoRALayer, ModulesToSave
from .model import LoRAModel, base_class
from .tokens import TokenRowsLayer

Irregular = Literal["irregular"]


@dataclass
class LayerStatus:
    """peft's `TunerLayerStatus`: `name` is the module's path in the model (peft's has its wrapper's `model.`
    in front), `module_type` our class (`LoRALinear`, `ModulesToSave`, `TokenRowsLayer`)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class ModelStatus:
    """peft's `TunerModelStatus`: a field is "irregular" where the layers disagree (the model is then in an
    inconsistent state)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _adapter_tensors(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """adapter -> its trained tensors in this module."""
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    if isinstance(module, LoRALayer):
        for store in (module.lora_A, module.lora_B, module.lora_magnitude):
            for name, p in store.items():
                found[name].append(p)
    elif isinstance(module, ModulesToSave):
        for name, copy in module.modules_to_save.items():
            found[name].extend(copy.parameters())
    else:  # token rows, of their own or of the embedding a head is tied to
        for name, rows in module.source.trainable_tokens_delta.items():
            found[name].append(rows)
    return found


def _status_layers(model: LoRAModel) -> list[tuple[str, nn.Module]]:
    """LoRA layers, modules saved in full and token-row layers (a head tied to the embeddings too, as peft)."""
    return [
        (p, m) for p, m in model.named_modules() if isinstance(m, (LoRALayer, ModulesToSave, TokenRowsLayer))
    ]


def _all_or_none(values: list[bool | Irregular]) -> bool | Irregular:
    return (
        True if all(v is True for v in values) else False if all(v is False for v in values) else "irregular"
    )


def get_layer_status(model: LoRAModel) -> list[LayerStatus]:
    """The state of every adapter layer (LoRA layers, modules saved in full, token rows), as peft's
    `get_layer_status`: enabled, active and merged adapters, requires_grad and devices per adapter."""
    if not isinstance(model, LoRAModel):
        raise TypeError(
            f"get_layer_status needs a LoRA model (hf_lora.get_lora_model), got {type(model).__name__}."
        )
    out = []
    for path, module in _status_layers(model):
        tensors = _adapter_tensors(module)
        held = module.source if isinstance(module, TokenRowsLayer) else module  # (a tied head: the embedding)
        if isinstance(module, ModulesToSave):  # the model's active adapters, as peft's wrappers keep them
            active, merged = list(model.active_adapters), []
        else:
            active, merged = list(held.active_adapters), list(held.merged_adapters)
        out.append(
            LayerStatus(
                name=path,
                module_type=type(module).__qualname__,
                enabled=not held.adapters_disabled,
                active_adapters=active,
                merged_adapters=merged,
                requires_grad={n: _all_or_none([p.requires_grad for p in ps]) for n, ps in tensors.items()},
                available_adapters=sorted(tensors),
                devices={n: sorted({p.device.type for p in ps}) for n, ps in tensors.items()},
                quantization_backend=None,
            )
        )
    return out


def get_model_status(model: LoRAModel) -> ModelStatus:
    """The model's adapters in one summary, as peft's `get_model_status`."""
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    irregular_merge = any(
        (set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers
    )
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for name, flag in s.requires_grad.items():
            grads[name].append(flag)
        for name, kinds in s.devices.items():
            devices[name].update(kinds)
    trainable, total = model.get_nb_trainable_parameters()
    return ModelStatus(
        base_model_type=base_class(model).__name__,
        adapter_model_type="LoRAModel",
        peft_types={name: "LORA" for name in model.peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters="irregular" if irregular_merge else sorted(merged_somewhere),
        requires_grad={name: _all_or_none(flags) for name, flags in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={name: sorted(kinds) for name, kinds in devices.items()},
        quantization_backend=None,
    )


def set_requires_grad(
    model: LoRAModel, adapter_names: str | Sequence[str], requires_grad: bool = True
) -> None:
    """Switch the gradients of the named adapters' tensors (LoRA factors, modules saved in full, token rows)
    on or off, as peft's `set_requires_grad`; nothing else changes. (The next `set_adapter`, or adding,
    loading or deleting an adapter, sets every adapter's flags again from its activity and inference_mode.)"""
    names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
    if unknown := sorted(names - set(model.peft_config)):
        raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {model.adapters}.")
    for _, module in _status_layers(model):
        for name, tensors in _adapter_tensors(module).items():
            if name in names:
                for p in tensors:
                    p.requires_grad_(requires_grad)
