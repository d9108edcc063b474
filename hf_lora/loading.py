"""Loading an adapter into a model: read the files (`reading`), plan and check the load (`load_plan`), then
attach or inject the adapter (`model`) and copy the tensors in. On any error the model is as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .adapter_files import (
    CONFIG_NAME,
    PREFIX,
    adapter_key_map,
    base_layer_key,
    embedding_paths,
    normalise_key,
    remap_keys,
)
from .config import moves_base_weights
from .errors import AdapterFormatError, AdapterNotFoundError, AdapterStateError, few
from .kinds import kind_of
from .layers import LoRALayer, check_adapter_name
from .load_plan import base_layer_paths, is_base_weight, plan_load, unchanged_base_tensors
from .model import DEFAULT_ADAPTER, LoRAModel, attach, inject
from .moe_targets import fused_expert_tensors
from .reading import FROM_PRETRAINED_ADVICE, AdapterFiles, list_adapters, read_adapter
from .rollback import restored_on_error
from .targets import base_modules, prepare_config
from .tokens import TOKENS_KEY, TokenRowsLayer

logger = logging.getLogger(__name__)


def from_pretrained(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    all_adapters: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    autocast_adapter_dtype: bool = True,
) -> LoRAModel:
    """Load an adapter (ours or peft's) from a directory or Hub repo onto a base model.

    As in peft, the adapter is frozen and the model in eval mode (dropout off) unless `is_trainable=True`,
    and only the root adapter is read; `all_adapters=True` also loads every `<name>/` subfolder as adapter
    `<name>` (the first one read is active). On any error the model is unchanged. peft's keywords:
    `low_cpu_mem_usage` creates A and B on the meta device and takes the file's tensors as they are (no
    copy where device and dtype agree); `key_mapping` rewrites the file's keys (regex -> replacement, the
    first that matches; default: the model's `_checkpoint_conversion_mapping`, as peft);
    `autocast_adapter_dtype=False` keeps the adapter in a half-precision base's dtype instead of float32.
    """
    if key_mapping is None:
        key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
    loading = dict(key_mapping=key_mapping, factors=_factors(low_cpu_mem_usage, autocast_adapter_dtype))
    if isinstance(model, LoRAModel):
        raise AdapterStateError(
            "this model already has LoRA adapters; use model.load_adapter(path, adapter_name=...) instead."
        )
    _check_materialised(model)
    if all_adapters:
        if given := [
            f"{k}={v!r}"
            for k, v in (("adapter_name", adapter_name), ("subfolder", subfolder))
            if v not in (DEFAULT_ADAPTER, None)
        ]:
            raise ValueError(
                f"all_adapters=True loads every adapter of {model_id}, each named after its subfolder (the root's "
                f"is {DEFAULT_ADAPTER!r}), so {' and '.join(given)} would be ignored: pass either, not both."
            )
        lora_model = _from_pretrained_all(
            model,
            model_id,
            is_trainable=is_trainable,
            revision=revision,
            token=token,
            allow_pickle=allow_pickle,
            **loading,
        )
        return lora_model if is_trainable else lora_model.eval()
    check_adapter_name(adapter_name)
    files = read_adapter(
        model_id,
        subfolder=subfolder,
        revision=revision,
        token=token,
        allow_pickle=allow_pickle,
        advice=FROM_PRETRAINED_ADVICE,
    )
    files = dataclasses.replace(files, tensors=remap_keys(files.tensors, key_mapping))
    with _all_or_nothing(model, [files]):
        lora_model = _attach_from_files(model, adapter_name, files, is_trainable, loading["factors"])
    return lora_model if is_trainable else lora_model.eval()


def _factors(low_cpu_mem_usage: bool, autocast_adapter_dtype: bool) -> dict[str, Any]:
    """How the loaded adapter's A and B are created (`LoRALayer.add_adapter`)."""
    return {"autocast": autocast_adapter_dtype} | ({"device": "meta"} if low_cpu_mem_usage else {})


def _attach_from_files(
    model: nn.Module, adapter_name: str, files: AdapterFiles, is_trainable: bool, factors: dict[str, Any]
) -> LoRAModel:
    files = replace(files, tensors=fused_expert_tensors(model, files.tensors))  # (transformers-4 MoE files)
    config = prepare_config(model, files.config.replace(inference_mode=not is_trainable))
    plan = plan_load(model, config, files)
    lora_model = attach(model, adapter_name, plan.config, plan.targets, plan.saved, False, factors)
    _copy_tensors(lora_model, adapter_name, files)
    return lora_model


def _from_pretrained_all(
    model: nn.Module,
    model_id: str | os.PathLike,
    *,
    is_trainable: bool,
    key_mapping: dict[str, str] | None,
    factors: dict[str, Any],
    **read_kwargs: Any,
) -> LoRAModel:
    """Every adapter of a folder or repo. All files are read before the model is touched, and base weights
    that PiSSA/OLoRA adapters move are restored if a later adapter does not fit."""
    found = list_adapters(model_id, revision=read_kwargs.get("revision"), token=read_kwargs.get("token"))
    if not found:
        raise AdapterNotFoundError(f"no adapters ({CONFIG_NAME}) found in {model_id}.")
    for name, _ in found:
        check_adapter_name(name)
    files = [read_adapter(model_id, subfolder=sub, **read_kwargs) for _, sub in found]
    files = [dataclasses.replace(f, tensors=remap_keys(f.tensors, key_mapping)) for f in files]
    (first, _), rest = found[0], found[1:]
    with _all_or_nothing(model, files):
        lora_model = _attach_from_files(model, first, files[0], is_trainable, factors)
        for (name, _), adapter_files in zip(rest, files[1:]):
            _load_new_adapter(lora_model, name, adapter_files, is_trainable, factors)
    return lora_model


@contextlib.contextmanager
def _all_or_nothing(
    model: nn.Module, files: list[AdapterFiles], keep: list[torch.Tensor] = ()
) -> Iterator[None]:
    """If loading fails part way, give `model` back exactly as it was: its modules, classes and trainable
    flags (`rollback.restored_on_error`), and the tensors a load writes into in place: the base tensors
    the files carry (`<path>.base_layer.weight`, embeddings: save_embedding_layers), the base weights that
    PiSSA/OLoRA adapters move, and `keep` (an adapter reloaded in place)."""
    modules = dict(base_modules(model))
    embeddings = embedding_paths(model)
    tensors = set()  # (module path, tensor name): only what the files carry, or PiSSA/OLoRA may move
    for f in files:
        if moves_base_weights(f.config):
            tensors |= {
                (path, "weight") for path, m in modules.items() if kind_of(m) and hasattr(m, "weight")
            }
        for key in f.tensors:
            key = normalise_key(key).removeprefix(PREFIX)
            path, sep, leaf = key.rpartition(".base_layer.")
            if not sep:
                path, _, leaf = key.rpartition(".")
            if sep or path in embeddings:
                tensors.add((path, leaf))
    written = [
        t for path, leaf in tensors if isinstance(t := getattr(modules.get(path), leaf, None), torch.Tensor)
    ]
    with restored_on_error(model, keep=[*written, *keep]):
        yield


def load_adapter(
    model: LoRAModel,
    model_id: str | os.PathLike,
    adapter_name: str,
    *,
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    autocast_adapter_dtype: bool = True,
) -> None:
    """Load another adapter into a LoRA model (inactive until `set_adapter`), or reload an existing one
    in place (what Trainer does when it resumes or restores the best checkpoint). As in peft, the model is
    put in eval mode unless `is_trainable=True` (Trainer switches it back to train mode at each step).
    `low_cpu_mem_usage`, `key_mapping`, `autocast_adapter_dtype`: as in `from_pretrained` (a reload in place
    copies into the adapter as it is)."""
    _check_materialised(model)
    files = read_adapter(
        model_id, subfolder=subfolder, revision=revision, token=token, allow_pickle=allow_pickle
    )
    files = dataclasses.replace(files, tensors=remap_keys(files.tensors, key_mapping))
    if adapter_name in model.peft_config:
        _reload_in_place(model, adapter_name, files, is_trainable)
    else:
        factors = _factors(low_cpu_mem_usage, autocast_adapter_dtype)
        with _all_or_nothing(model, [files]):
            _load_new_adapter(model, adapter_name, files, is_trainable, factors)
    if not is_trainable:
        model.eval()


def _load_new_adapter(
    model: LoRAModel, adapter_name: str, files: AdapterFiles, is_trainable: bool, factors: dict[str, Any]
) -> None:
    check_adapter_name(adapter_name)
    files = replace(files, tensors=fused_expert_tensors(model, files.tensors))  # (transformers-4 MoE files)
    config = prepare_config(model, files.config.replace(inference_mode=not is_trainable))
    plan = plan_load(model, config, files)
    inject(model, adapter_name, plan.config, plan.targets, plan.saved, False, factors)
    _copy_tensors(model, adapter_name, files)  # (a failure: the caller's _all_or_nothing undoes it all)
    model.refresh_adapters()


def _check_materialised(model: nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise AdapterStateError(
            "the model has parameters on the meta device (created without weights); load or materialise the "
            "base weights first (e.g. model.to_empty(device=...) and load_state_dict), then the adapter."
        )


def _copy_tensors(model: LoRAModel, adapter_name: str, files: AdapterFiles) -> None:
    keymap = adapter_key_map(model, adapter_name)
    own = model.state_dict(keep_vars=True)
    lora = base_layer_paths(dict(base_modules(model)), [p for p, _ in model.lora_layers()])
    embeddings = embedding_paths(model) - lora
    with torch.no_grad():
        for key, tensor in files.tensors.items():
            own_key = keymap.get(normalise_key(key))
            name = key.removeprefix(PREFIX)  # for a base tensor
            if own_key is not None and own[own_key].is_meta:  # low_cpu_mem_usage: the file's tensor itself
                _assign(model, own_key, tensor)
            elif own_key is not None:
                target = own[own_key]
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            elif name.rpartition(".")[0] in embeddings and name in own:  # save_embedding_layers
                _copy_base_tensor(own[name], tensor, name, files.source)
            elif (split := base_layer_key(normalise_key(key))) and split[0] in lora:
                layer = model.get_submodule(split[0]) if split[1] == "weight" else None
                _copy_base_tensor(
                    own[f"{split[0]}.{split[1]}"], tensor, f"{split[0]}.{split[1]}", files.source, layer
                )
    if left := [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]:
        raise AdapterFormatError(f"adapter {files.source} has no tensors for {few(left, 4)}.")


def _assign(model: LoRAModel, own_key: str, tensor: torch.Tensor) -> None:
    """Make `tensor` (on the base weight's device, in the dtype the adapter was created with) the adapter
    parameter `own_key` (`<path>.lora_A.<name>`): no copy where device and dtype agree."""
    store_path, _, name = own_key.rpartition(".")
    store = model.get_submodule(store_path)
    old = store[name]
    device = model.get_submodule(store_path.rpartition(".")[0]).weight.device
    store[name] = nn.Parameter(tensor.to(device=device, dtype=old.dtype), requires_grad=old.requires_grad)


def _copy_base_tensor(
    target: torch.Tensor, tensor: torch.Tensor, name: str, source: str, layer: LoRALayer | None = None
) -> None:
    """A base tensor from the file (peft's `<path>.base_layer.<name>`, or an embedding's): peft loads it, so
    a different one (a resized vocabulary) replaces the model's; a weight tied to the input embeddings
    changes them too, as in peft. `layer`: the LoRA layer whose weight `target` is, which is compared
    without its merged adapters (`load_plan.plan_load` has refused a different one)."""
    same = is_base_weight(layer, tensor) if layer is not None else torch.equal(target, tensor.to(target))
    tensor = tensor.to(device=target.device, dtype=target.dtype)
    if not same:
        logger.info("%s: loading %s from the adapter file (it differs from the model's)", source, name)
        target.copy_(tensor)


def set_adapter_state_dict(
    model: LoRAModel, tensors: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Put an adapter's tensors, under peft's file keys (as `adapter_state_dict` gives them, or peft's
    `get_peft_model_state_dict`), into the model's adapter `adapter_name` (peft's `set_peft_model_state_dict`).
    Every key and shape is checked before anything is copied: on an error the model is unchanged."""
    if adapter_name not in model.peft_config:
        raise AdapterStateError(
            f"unknown adapter {adapter_name!r}; this model has {model.adapters}. Add it first "
            "(model.add_adapter(name, config)), then set its tensors."
        )
    if tensors and not any(k.startswith("base_model.") for k in tensors):
        tensors = {f"{PREFIX}{k}": t for k, t in tensors.items()}  # keys given without peft's prefix
    config = model.peft_config[adapter_name]
    files = AdapterFiles(config=config, raw_config={}, tensors=dict(tensors), source="(state dict)")
    _reload_in_place(model, adapter_name, files, is_trainable=not config.inference_mode)


# Fields that change what the same A and B compute: a reload in place must agree on them.
_RELOAD_MUST_MATCH = ("lora_alpha", "use_rslora", "use_dora", "alpha_pattern", "trainable_token_indices")


def _reload_in_place(model: LoRAModel, adapter_name: str, files: AdapterFiles, is_trainable: bool) -> None:
    """New weights for an existing adapter (the Trainer's resume and best-model paths): the file must be
    that adapter's, and a merged adapter is unmerged around the copy so the base weights stay right."""
    keymap = adapter_key_map(model, adapter_name)
    own = model.state_dict(keep_vars=True)
    given = {normalise_key(k): k for k in files.tensors}
    current = model.peft_config[adapter_name]
    must_match = _RELOAD_MUST_MATCH
    if moves_base_weights(files.config) or moves_base_weights(current):
        must_match += ("init_lora_weights",)  # PiSSA/OLoRA factors go with the base residual their init left
    problems = [
        f"{field}={getattr(files.config, field)!r} (the loaded adapter has {getattr(current, field)!r})"
        for field in must_match
        if getattr(files.config, field) != getattr(current, field)
    ]
    problems += [f"missing {k}" for k in keymap if k not in given and not k.endswith(".bias")]
    problems += [
        f"{k} has shape {tuple(files.tensors[given[k]].shape)}, the model needs {tuple(own[v].shape)}"
        for k, v in keymap.items()
        if k in given and files.tensors[given[k]].shape != own[v].shape
    ]
    shown = {  # peft's save_embedding_layers=True writes the rows under a tied head's name too: ignored
        f"{PREFIX}{path}.{TOKENS_KEY}"
        for path, m in base_modules(model)
        if isinstance(m, TokenRowsLayer) and m.source is not m
    }
    problems += [
        f"unexpected {k}"
        for k in given
        if k not in keymap
        and k not in shown
        and not unchanged_base_tensors(own, files, [given[k]])
        and not base_layer_key(k)
    ]
    problems += _base_layer_problems(model, files, given)
    if problems:
        replace = (
            f"or delete_adapter({adapter_name!r}) first"
            if len(model.peft_config) > 1
            else "or, to replace the model's only adapter, LoRAModel.from_pretrained(model.unload(), path)"
        )
        raise AdapterFormatError(
            f"adapter {files.source} does not match the loaded adapter {adapter_name!r}: {few(problems, 4)}. "
            f"Load it under another name, {replace}."
        )
    merged = [layer for layer in model.adapter_layers() if adapter_name in layer.merged_adapters]
    # Written in place, so kept to be put back on a failure: the adapter's tensors, the base weights it is
    # merged into (unmerged and merged again around the copy)
    keep = [own[k] for k in keymap.values()] + [layer.weight for layer in merged]
    with _all_or_nothing(model, [files], keep):
        for layer in merged:
            layer.unmerge([adapter_name])
        _copy_tensors(model, adapter_name, files)
        for layer in merged:
            layer.merge([adapter_name])
        model.peft_config[adapter_name] = model.peft_config[adapter_name].replace(
            inference_mode=not is_trainable
        )
        model.refresh_adapters()


def _base_layer_problems(model: LoRAModel, files: AdapterFiles, given: dict[str, str]) -> list[str]:
    """Reloading in place: peft's `<path>.base_layer.*` tensors must fit the model's base tensors
    (`_copy_tensors` here loads those of LoRA layers; those of other modules are ignored, as in peft)."""
    modules = dict(base_modules(model))
    problems = []
    for key in given:
        split = base_layer_key(key)
        if split is None or split[0] not in modules:
            problems += [f"unexpected {key}"] if split else []
            continue
        mine = getattr(modules[split[0]], split[1], None)
        if not isinstance(mine, torch.Tensor):
            problems.append(f"unexpected {key}")
        elif (got := tuple(files.tensors[given[key]].shape)) != tuple(mine.shape):
            problems.append(f"{key} has shape {got}, the model needs {tuple(mine.shape)}")
    return problems
