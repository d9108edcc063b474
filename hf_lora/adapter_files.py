"""peft's adapter file format, and what one adapter writes: the file names, the tensor keys
(`base_model.model.<module path>.<kind's file key>`, modules saved in full under their plain path, token rows
under `<path>.token_adapter.trainable_tokens_delta`, biases of LoRA layers under `<path>.base_layer.bias`)
mapped to the model's own state-dict keys, the tensors under those keys, and the config as written.
Exactly what peft writes and reads, so adapters move freely between the two libraries.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoRAConfig
from .errors import AdapterFormatError, AdapterStateError
from .kinds import kind_of
from .layers import LoRALayer, ModulesToSave
from .model import DEFAULT_ADAPTER, LoRAModel, base_class
from .targets import base_modules
from .tokens import TOKENS_KEY, TokenRowsLayer

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
SAFETENSORS_METADATA = {"format": "pt"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def adapter_key_map(model: LoRAModel, adapter_name: str) -> dict[str, str]:
    """file key -> the model's own state-dict key, for every tensor of one adapter."""
    config = model.peft_config[adapter_name]
    keys: dict[str, str] = {}
    lora_paths = set()
    for path, layer in model.lora_layers():
        if adapter_name in layer.lora_A:
            lora_paths.add(path)
            a_key, b_key = lora_file_keys(layer)
            where = layer.lora_kind.file_path(path, layer)
            keys[f"{PREFIX}{where}.{a_key}"] = f"{path}.lora_A.{adapter_name}"
            keys[f"{PREFIX}{where}.{b_key}"] = f"{path}.lora_B.{adapter_name}"
            if adapter_name in layer.lora_magnitude:
                keys[f"{PREFIX}{path}.lora_magnitude_vector"] = f"{path}.lora_magnitude.{adapter_name}"
    for path, layer in model.token_layers():
        if adapter_name in layer.trainable_tokens_delta:
            keys[f"{PREFIX}{path}.{TOKENS_KEY}"] = f"{path}.trainable_tokens_delta.{adapter_name}"
    for path, wrapper in model.saved_modules():
        if adapter_name in wrapper.modules_to_save:
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                keys[f"{PREFIX}{path}.{k}"] = f"{path}.modules_to_save.{adapter_name}.{k}"
            if config.bias == "all" and isinstance(
                getattr(wrapper.original_module, "bias", None), nn.Parameter
            ):
                for file_key, own_key in wrapper_bias_keys(path, adapter_name).items():
                    keys[f"{PREFIX}{file_key}"] = own_key
    if config.bias != "none":
        for path, module in base_modules(model):
            if isinstance(module, ModulesToSave) or getattr(module, "bias", None) is None:
                continue
            if not isinstance(module.bias, nn.Parameter):
                continue
            if path in lora_paths:
                keys[f"{PREFIX}{path}.base_layer.bias"] = f"{path}.bias"
            elif config.bias == "all" and not _inside_saved(model, path):
                keys[f"{PREFIX}{path}.bias"] = f"{path}.bias"
    return keys


def lora_file_keys(module: nn.Module) -> tuple[str, str]:
    """peft's names for a layer's A and B, as its kind says: a Linear's are the weights of two Linears, an
    Embedding's two bare Parameters."""
    return (getattr(module, "lora_kind", None) or kind_of(module)).file_keys


def wrapper_bias_keys(path: str, adapter_name: str) -> dict[str, str]:
    """peft's bias="all" takes every parameter named bias, so its files also hold a saved module's wrapper
    biases under their wrapper names: the trained copy's (also written as `<path>.bias`) and the unused
    original's. Ours carry them too, so the two libraries write the same keys."""
    return {
        f"{path}.modules_to_save.bias": f"{path}.modules_to_save.{adapter_name}.bias",
        f"{path}.original_module.bias": f"{path}.original_module.bias",
    }


def _inside_saved(model: LoRAModel, path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p, _ in model.saved_modules())


def adapter_state_dict(
    model: LoRAModel, adapter_name: str = DEFAULT_ADAPTER, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under their file keys, on CPU and contiguous (like `state_dict()`,
    they may share memory with the model's parameters).

    `state_dict` is the full model state dict when a trainer gathered it (FSDP, DeepSpeed); otherwise
    the model's own tensors are read (sharded DTensors are gathered, which is a collective call).
    """
    if adapter_name not in model.peft_config:
        raise AdapterStateError(f"unknown adapter {adapter_name!r}; this model has {model.adapters}.")
    keymap = adapter_key_map(model, adapter_name)
    if state_dict is not None:
        state_dict = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    else:
        state_dict = dict(model.state_dict(keep_vars=True))
    out = {}
    for file_key, own_key in keymap.items():
        if own_key not in state_dict:
            raise AdapterStateError(f"the state dict given to save has no tensor {own_key!r}.")
        t = state_dict[own_key]
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2 / tensor parallel): gather the whole tensor
            t = t.full_tensor()
        out[file_key] = t.detach().to("cpu").contiguous()
    for path in peft_only_saved_modules(model, adapter_name):
        module = model.get_submodule(path)
        module = module.original_module if isinstance(module, ModulesToSave) else module
        for k, t in module.state_dict().items():
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out.setdefault(f"{PREFIX}{path}.{k}", t.detach().to("cpu").contiguous())
    return without_shared_memory(out)  # one tensor may be written under two keys


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's: targets that make "auto" save the embeddings


def embedding_layer_tensors(
    model: LoRAModel,
    adapter_name: str,
    save_embedding_layers: bool | str = "auto",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """peft's `save_embedding_layers`: the base weights of the input and output embeddings, under peft's
    keys (`<path>.base_layer.weight` for a LoRA layer, `<path>.weight` otherwise). Where the adapter targets
    them, only LoRA layers' are written, as in peft; a module saved in full is in the file anyway. A LoRA
    layer's weight is written without the adapters merged into it (peft writes the merged one, and its
    reload adds them twice). `state_dict`: as for `adapter_state_dict` (gathered by a trainer)."""
    config = model.peft_config[adapter_name]
    # peft: trainable token rows are there to keep the file small, so naming embed_tokens does not count
    targeted = _embedding_is_targeted(model, config) and config.trainable_token_indices is None
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocabulary_resized(model, config)
        if save_embedding_layers:
            logger.info(
                "adapter %r: writing the base model's embedding weights too (save_embedding_layers='auto': %s); "
                "pass save_embedding_layers=False for an adapter-only file",
                adapter_name,
                "it targets embed_tokens/lm_head" if targeted else "the vocabulary was resized",
            )
    if not save_embedding_layers:
        return {}
    gathered = None if state_dict is None else {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for path in sorted(embedding_paths(model)):
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSave) or (targeted and not isinstance(module, LoRALayer)):
            continue
        prefix = f"{path}."
        if isinstance(module, LoRALayer):
            prefix = f"{path}.base_layer."
        elif isinstance(module, TokenRowsLayer):
            prefix = f"{path}.token_adapter.base_layer."
        for leaf in ("weight", "bias"):
            t = getattr(module, leaf, None)
            if not isinstance(t, torch.Tensor):
                continue
            if gathered is not None:
                t = gathered.get(f"{path}.{leaf}", t)
            elif leaf == "weight" and isinstance(module, (LoRALayer, TokenRowsLayer)):
                t = module.base_weight()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{PREFIX}{prefix}{leaf}"] = t.detach().to("cpu").contiguous()
    return out


def without_shared_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a tied weight written under two keys): copies."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _embedding_is_targeted(model: nn.Module, config: LoRAConfig) -> bool:
    """peft's rule: a target list naming "embed_tokens" or "lm_head", or a regex matching a module so named.
    A dotted path in the list counts by its last name (peft's weighted adapters keep their sources' names;
    ours record the exact paths they combine, which the plain rule would not see)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets != "all-linear" and any(
            re.fullmatch(targets, path)
            for path, _ in base_modules(model)
            if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", path)
        )
    return any(name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES for name in targets or ())


def _vocabulary_resized(model: nn.Module, config: LoRAConfig) -> bool:
    """The model's vocab_size differs from its base model's config, found in the base model's folder or in
    the Hub cache (peft asks the Hub; saving here never goes online)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    source = config.base_model_name_or_path
    if vocab is None or not source:
        return False
    found: Any = Path(source) / "config.json"
    if not found.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "config.json", revision=config.revision)
        except Exception:  # not a repo id
            return False
        if not isinstance(found, str):
            return False
    try:
        base_vocab = json.loads(Path(found).read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(base_vocab, int) and base_vocab != vocab


def peft_only_saved_modules(model: LoRAModel, adapter_name: str) -> list[str]:
    """Modules that peft saves for this adapter's modules_to_save and ours leave in the base model.

    peft matches those names as plain suffixes ("classifier" takes DistilBERT's `pre_classifier` too) and
    expects their tensors in the file, so we write them, unchanged: peft then loads the file, with the same
    outputs. Loading ignores such tensors when they equal the model's own (see `unchanged_base_tensors`).
    """
    names = model.peft_config[adapter_name].modules_to_save or []
    held = [p for p, layer in model.lora_layers() if adapter_name in layer.lora_A]
    held += [p for p, w in model.saved_modules() if adapter_name in w.modules_to_save]
    return [
        path
        for path, module in base_modules(model)
        if any(path.endswith(n) for n in names)
        and not isinstance(module, LoRALayer)  # (another adapter's LoRA layer: peft would refuse that too)
        and not any(path == h or path.startswith(h + ".") for h in held)
    ]


def _strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix) or f".{prefix}" in key:
                key = key.removeprefix(prefix).replace(f".{prefix}", ".")
                changed = True
    return key


def adapter_dir(root: Path, adapter_name: str) -> Path:
    """Where an adapter lives in a saved directory or repo (peft's layout)."""
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


def adapter_config(model: LoRAModel, adapter_name: str) -> dict[str, Any]:
    """The config as written to disk: inference_mode on and Conv1D's layout recorded, as peft does."""
    config = model.peft_config[adapter_name]
    d = config.to_dict()
    d["inference_mode"] = True
    if any(
        layer.lora_kind.saved_fan_in_fan_out and adapter_name in layer.lora_A
        for _, layer in model.lora_layers()
    ):
        d["fan_in_fan_out"] = True
    if config.task_type is None:
        base = base_class(model)
        d["auto_mapping"] = {"base_model_class": base.__name__, "parent_library": base.__module__}
    return d


def base_layer_key(key: str) -> tuple[str, str] | None:
    """(module path, tensor name) of a file key for a tensor of peft's `<path>.base_layer`, the module a
    LoRA layer wraps; here a LoRA layer is that module itself, so the tensor is its `<path>.<name>`."""
    path, sep, leaf = key.removeprefix(PREFIX).rpartition(".base_layer.")
    return (path, leaf) if key.startswith(PREFIX) and sep and "." not in leaf else None


def embedding_paths(model: nn.Module) -> set[str]:
    """The model's input and output embeddings (as base modules): peft's save_embedding_layers writes their
    weights under their plain keys (`<path>.weight`) where they are no LoRA layers, and loads them into the
    base model, as we do."""
    paths: dict[int, str] = {}
    for path, m in base_modules(model):
        paths.setdefault(id(m), path)  # a module under several names: the first, as peft names it
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except NotImplementedError:
            module = None
        module = module.original_module if isinstance(module, ModulesToSave) else module
        if module is not None and id(module) in paths:
            found.add(paths[id(module)])
    return found


def normalise_key(key: str) -> str:
    """Older peft files carry the adapter name in keys (`lora_A.default.weight`,
    `classifier.modules_to_save.default.weight`); map them to today's names."""
    key = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)
    key = re.sub(r"\.(lora_embedding_A|lora_embedding_B)\.[^.]+$", r".\1", key)
    key = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude_vector", key)
    key = re.sub(
        r"\.token_adapter\.trainable_tokens_delta\.[^.]+$", ".token_adapter.trainable_tokens_delta", key
    )
    key = key.replace(".token_adapter.base_layer.", ".base_layer.")  # a token-row module's own tensors
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def remap_keys(
    tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """peft's `key_mapping` (what transformers passes for checkpoints whose module names changed): each
    key without its `base_model.model.` (or `base_model.`) prefix is rewritten by the first regex pattern
    that matches it, then prefixed again."""
    if not key_mapping:
        return tensors
    out = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in (PREFIX, "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise AdapterFormatError(
                f"key_mapping applies to peft's keys, which start with {PREFIX!r}; the adapter has {key!r}. Map "
                "its keys yourself, or load it without key_mapping."
            )
        key = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        out[prefix + key] = tensor
    return out
