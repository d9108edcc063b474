"""Adapter files in peft's format: `adapter_config.json` + `adapter_model.safetensors` (+ a README.md card).

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (an embedding's:
`.lora_embedding_A` / `.lora_embedding_B`), modules saved in full under their plain path, trainable token
rows under `<path>.token_adapter.trainable_tokens_delta`, biases of LoRA layers under
`<path>.base_layer.bias`: exactly what peft writes
and reads, so adapters move freely between the two libraries.

Saving never damages what is on disk: each file is written to a temporary file in the target
directory's `.cache/huggingface/` and renamed over the old one (atomic on POSIX), and an unchanged config is not rewritten, so
re-saving a training adapter is a single atomic rename. Loading checks everything (file integrity,
keys, shapes) before the model is touched, and refuses pickle files unless asked explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .atomic import atomic_write_files, folder_lock
from .config import LoRAConfig
from .errors import AdapterFormatError, AdapterNotFoundError, AdapterStateError, TargetModulesError, few
from .kinds import KINDS, kind_of
from .layers import LoRALayer, ModulesToSave
from .model import (
    DEFAULT_ADAPTER,
    LoRAModel,
    _attach,
    _check_adapter_name,
    _inject,
    _moves_base_weights,
    _prepare_config,
)
from .model_card import write_model_card
from .targets import (
    TokenTarget,
    base_modules,
    resolve_modules_to_save,
    resolve_targets,
    resolve_token_targets,
)
from .tokens import TOKENS_KEY, TokenRowsLayer

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CARD_NAME = "README.md"
PREFIX = "base_model.model."
SAFETENSORS_METADATA = {"format": "pt"}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


# ---- key maps ---------------------------------------------------------------------------------------


def adapter_key_map(model: LoRAModel, adapter_name: str) -> dict[str, str]:
    """file key -> the model's own state-dict key, for every tensor of one adapter."""
    config = model.peft_config[adapter_name]
    keys: dict[str, str] = {}
    lora_paths = set()
    for path, layer in model.lora_layers():
        if adapter_name in layer.lora_A:
            lora_paths.add(path)
            a_key, b_key = lora_file_keys(layer)
            keys[f"{PREFIX}{path}.{a_key}"] = f"{path}.lora_A.{adapter_name}"
            keys[f"{PREFIX}{path}.{b_key}"] = f"{path}.lora_B.{adapter_name}"
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
                for file_key, own_key in _wrapper_bias_keys(path, adapter_name).items():
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
    return kind_of(module).file_keys


def _wrapper_bias_keys(path: str, adapter_name: str) -> dict[str, str]:
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
    return _without_shared_memory(out)  # one tensor may be written under two keys


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
    for path in sorted(_embedding_paths(model)):
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


def _without_shared_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    outputs. Loading ignores such tensors when they equal the model's own (see `_unchanged_base_tensors`).
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


def _unchanged_base_tensors(own: dict[str, torch.Tensor], files: AdapterFiles, keys: list[str]) -> bool:
    """Whether these file tensors equal the model's own base tensors (`own`: its state dict), as the
    copies written for peft's sake do."""
    for key in keys:
        mine = own.get(key.removeprefix(PREFIX))
        theirs = files.tensors[key]
        if (
            mine is None
            or mine.shape != theirs.shape
            or not torch.equal(mine.detach().cpu(), theirs.to(mine.dtype))
        ):
            return False
    return True


def _strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix) or f".{prefix}" in key:
                key = key.removeprefix(prefix).replace(f".{prefix}", ".")
                changed = True
    return key


# ---- saving -----------------------------------------------------------------------------------------


def save_pretrained(
    model: LoRAModel,
    save_directory: str | os.PathLike,
    *,
    selected_adapters: list[str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    model_card: bool = True,
    log_history: list[dict[str, Any]] | None = None,
    card_data: dict[str, Any] | None = None,
    repo_id: str | None = None,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    save_embedding_layers: bool | str = "auto",
    **kwargs: Any,
) -> None:
    """Write each adapter in peft's layout: the adapter named "default" at the root, any other in
    `save_directory/<name>/`. Every rank must call this under FSDP2 (gathering is collective); only the
    main process writes.

    `save_embedding_layers` (peft's): also write the base model's input and output embedding weights, which
    a resized vocabulary needs (new tokens have no base weights elsewhere). "auto" does it, as peft does,
    when the adapter targets `embed_tokens` or `lm_head`, or when the vocabulary size differs from the base
    model's config (read from its folder or the Hub cache; nothing is downloaded).

    `path_initial_model_for_weight_conversion` (peft's name): for a PiSSA/OLoRA adapter, the folder where
    it was saved before training; the adapter is then written as a plain LoRA of twice the rank whose
    update is relative to the original, unmodified base weights, so it loads onto the stock model.
    """
    if not safe_serialization:
        raise ValueError("hf_lora writes safetensors only (pickle files can run code when loaded).")
    if kwargs:
        logger.debug("save_pretrained: ignoring arguments meant for full-model saving: %s", sorted(kwargs))
    names = selected_adapters or model.adapters
    if unknown := [n for n in names if n not in model.peft_config]:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {model.adapters}.")
    # Gather first (collective under FSDP2: every rank takes part), then only the main process writes.
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(
            f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}."
        )
    tensors = {
        name: _without_shared_memory(
            adapter_state_dict(model, name, state_dict)
            | embedding_layer_tensors(model, name, save_embedding_layers, state_dict)
        )
        for name in names
    }
    if not is_main_process:
        return
    configs = {name: adapter_config(model, name) for name in names}
    if path_initial_model_for_weight_conversion is not None:
        if len(names) != 1:
            raise ValueError(
                "converting a PiSSA/OLoRA adapter works on one adapter: pass selected_adapters=[name]."
            )
        initial = read_adapter(path_initial_model_for_weight_conversion)
        tensors[names[0]], configs[names[0]] = as_plain_lora(
            tensors[names[0]], configs[names[0]], initial.tensors
        )
    root = Path(save_directory)
    if log_history is None:  # set by LoRATrainer while it saves
        log_history = getattr(model, "_card_log_history", None)
    for name in names:
        directory = adapter_dir(root, name)
        with folder_lock(directory):  # another process saving here at the same time: one set, not a mix
            write_adapter(directory, configs[name], tensors[name])
            if model_card:
                write_model_card(
                    model,
                    directory,
                    name,
                    repo_id=repo_id,
                    log_history=log_history,
                    card_data=card_data,
                    tensors=tensors[name],
                )
    logger.info("saved adapter(s) %s to %s", names, root)


def as_plain_lora(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], initial: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PiSSA/OLoRA adapter as a plain LoRA against the original weights: with W = W_res + s B0 A0 at the
    start, the trained model is W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0], a LoRA of rank 2r. (The
    same holds for embeddings, which PiSSA/OLoRA leave alone: their A0 is zero.)"""
    # the converted adapter applies to the original weights: no residual base weights go with it (those of
    # Linear/Conv1D layers; embeddings' and token-row modules', written for a resized vocabulary, stay)
    moved_a_keys = tuple(f".{kind.file_keys[0]}" for kind in KINDS if kind.moves_base_weights)
    residual = {
        k.removesuffix(a_key) + ".base_layer.weight"
        for k in tensors
        for a_key in moved_a_keys
        if k.endswith(a_key)
    }
    a_keys = tuple({kind.file_keys[0] for kind in KINDS})
    b_keys = tuple({kind.file_keys[1] for kind in KINDS})
    out = {k: t for k, t in tensors.items() if k not in residual}
    for key, t in tensors.items():
        if key.endswith(a_keys):
            out[key] = torch.cat([t, initial[key]], dim=0)
        elif key.endswith(b_keys):
            out[key] = torch.cat([t, -initial[key]], dim=1)
    grow = 2**0.5 if config["use_rslora"] else 2  # keep alpha / r (or alpha / sqrt(r)) unchanged at rank 2r
    config = config | {
        "r": 2 * config["r"],
        "lora_alpha": grow * config["lora_alpha"],
        "rank_pattern": {k: 2 * v for k, v in config["rank_pattern"].items()},
        "alpha_pattern": {k: grow * v for k, v in config["alpha_pattern"].items()},
        "init_lora_weights": True,
    }
    return out, config


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
        base = model._lora_base_class
        d["auto_mapping"] = {"base_model_class": base.__name__, "parent_library": base.__module__}
    return d


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's two files; each lands whole or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors_bytes(tensors, metadata=SAFETENSORS_METADATA)
    # Not sort_keys: the first rank_pattern/alpha_pattern key that matches a module wins, so their order is
    # meaning (to_dict already orders the top-level keys as peft does).
    config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write_files({directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: config_bytes})


# ---- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advice:
    """How read_adapter's errors tell the user to pass the options they suggest: the caller's keywords
    (from_pretrained also has all_adapters), or the hf-lora command's flags."""

    pick_subfolder: str = "pass subfolder=<name>"
    allow_pickle: str = (
        "pass allow_pickle=True if you trust its author (it is then read with torch.load(weights_only=True))"
    )


FROM_PRETRAINED_ADVICE = Advice(pick_subfolder="pass subfolder=<name>, or all_adapters=True for all of them")


@dataclass
class AdapterFiles:
    """An adapter read from disk or the Hub, checked for integrity but not yet against a model."""

    config: LoRAConfig
    raw_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str  # where it came from, for messages


def read_adapter(
    model_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    advice: Advice = Advice(),
) -> AdapterFiles:
    """Read `adapter_config.json` and the weights from a local directory or a Hub repo. `advice` words the
    options the errors suggest in the caller's terms."""
    from .hub import resolve_adapter_file

    def resolve(filename: str) -> Path | None:
        return resolve_adapter_file(model_id, filename, subfolder=subfolder, revision=revision, token=token)

    config_path = resolve(CONFIG_NAME)
    where = str(model_id) + (f"/{subfolder}" if subfolder else "")
    if config_path is None:
        named = (
            [n for n, _ in list_adapters(model_id, revision=revision, token=token)] if not subfolder else []
        )
        hint = (
            f" It holds adapters in subfolders: {', '.join(named)}; {advice.pick_subfolder}."
            if named
            else " Is this an adapter directory or repo?"
        )
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in {where}.{hint}")
    raw = _read_json(config_path)
    config = LoRAConfig.from_dict(raw, source=str(config_path))

    weights_path = resolve(WEIGHTS_NAME)
    if weights_path is not None:
        tensors = read_safetensors(weights_path)
    else:
        pickled = next((p for name in PICKLE_WEIGHTS_NAMES if (p := resolve(name)) is not None), None)
        if pickled is None:
            raise AdapterNotFoundError(f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
        if not allow_pickle:
            raise AdapterFormatError(
                f"{pickled} is a pickle file, and loading pickle can run arbitrary code, so hf_lora refuses "
                f"it. Convert it to {WEIGHTS_NAME} where you trust it, or {advice.allow_pickle}."
            )
        tensors = _read_pickle(pickled)
    return AdapterFiles(config=config, raw_config=raw, tensors=tensors, source=where)


def list_adapters(
    model_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> list[tuple[str, str | None]]:
    """(adapter name, subfolder) of every adapter saved in a directory or repo, the root one first."""
    from .hub import list_repo_files

    path = Path(model_id).expanduser()
    if path.is_dir():
        files = [str(p.relative_to(path)) for p in path.rglob(CONFIG_NAME)]
    else:
        files = list_repo_files(str(model_id), revision=revision, token=token)
    found = []
    for f in files:
        parts = Path(f).parts
        if parts == (CONFIG_NAME,):
            found.insert(0, (DEFAULT_ADAPTER, None))
        elif len(parts) == 2 and parts[1] == CONFIG_NAME:
            found.append((parts[0], parts[0]))
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({e}); the file is damaged or not a config."
        ) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header against the file size, so a truncated,
    corrupted or hostile file (a header claiming huge tensors) fails with a clear error, not an
    allocation."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{path} is truncated ({size} bytes): not a safetensors file.")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFormatError(
                f"{path}: header claims {n:,} bytes but the file has {size:,}: truncated or corrupted."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdapterFormatError(
                f"{path}: the safetensors header is not valid JSON (corrupted file)."
            ) from None
        _check_header(path, header, data_bytes=size - 8 - n)
        f.seek(0)
        data = f.read()
    try:
        return load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterFormatError(f"{path}: cannot read tensors ({e}).") from None


def _check_header(path: Path, header: Any, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: the safetensors header is not a JSON object (corrupted file).")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end <= data_bytes
        except (KeyError, TypeError, ValueError):
            ok, nbytes, begin, end = False, -1, 0, 0
        if not ok or end - begin != nbytes:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} does not fit the file (truncated or corrupted); save the adapter again."
            )


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch file ({e}).") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors.")
    return obj


# ---- loading into a model ---------------------------------------------------------------------------


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
) -> LoRAModel:
    """Load an adapter (ours or peft's) from a directory or Hub repo onto a base model.

    As in peft, the adapter is frozen and the model in eval mode (dropout off) unless `is_trainable=True`,
    and only the root adapter is read; `all_adapters=True` also loads every `<name>/` subfolder as adapter
    `<name>` (the first one read is active). On any error the model is unchanged.
    """
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
        )
        return lora_model if is_trainable else lora_model.eval()
    _check_adapter_name(adapter_name)
    files = read_adapter(
        model_id,
        subfolder=subfolder,
        revision=revision,
        token=token,
        allow_pickle=allow_pickle,
        advice=FROM_PRETRAINED_ADVICE,
    )
    lora_model = _attach_from_files(model, adapter_name, files, is_trainable)
    return lora_model if is_trainable else lora_model.eval()


def _attach_from_files(
    model: nn.Module, adapter_name: str, files: AdapterFiles, is_trainable: bool
) -> LoRAModel:
    config = _prepare_config(model, files.config.replace(inference_mode=not is_trainable))
    plan = _plan_load(model, config, files)
    lora_model = _attach(model, adapter_name, plan.config, plan.targets, plan.saved, initialise=False)
    _copy_tensors(lora_model, adapter_name, files)
    return lora_model


def _from_pretrained_all(
    model: nn.Module, model_id: str | os.PathLike, *, is_trainable: bool, **read_kwargs: Any
) -> LoRAModel:
    """Every adapter of a folder or repo. All files are read before the model is touched, and base weights
    that PiSSA/OLoRA adapters move are restored if a later adapter does not fit."""
    found = list_adapters(model_id, revision=read_kwargs.get("revision"), token=read_kwargs.get("token"))
    if not found:
        raise AdapterNotFoundError(f"no adapters ({CONFIG_NAME}) found in {model_id}.")
    for name, _ in found:
        _check_adapter_name(name)
    files = [read_adapter(model_id, subfolder=sub, **read_kwargs) for _, sub in found]
    (first, _), rest = found[0], found[1:]
    with _restored_on_error(model, files):
        lora_model = _attach_from_files(model, first, files[0], is_trainable)
        for (name, _), adapter_files in zip(rest, files[1:]):
            _load_new_adapter(lora_model, name, adapter_files, is_trainable)
    return lora_model


@contextlib.contextmanager
def _restored_on_error(model: nn.Module, files: list[AdapterFiles]) -> Iterator[None]:
    """Give a plain model back as it was if attaching adapters to it fails part way: its class, modules,
    requires_grad flags (attaching freezes them all) and the base weights that PiSSA/OLoRA adapters move
    or the files carry (`<path>.base_layer.weight`, embeddings: save_embedding_layers)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modules = dict(base_modules(model))
    embeddings = _embedding_paths(model)
    tensors = set()  # (module path, tensor name): only what the files carry, or PiSSA/OLoRA may move
    for f in files:
        if _moves_base_weights(f.config):
            tensors |= {(path, "weight") for path, m in modules.items() if kind_of(m) is not None}
        for key in f.tensors:
            key = _normalise_key(key).removeprefix(PREFIX)
            path, sep, leaf = key.rpartition(".base_layer.")
            if not sep:
                path, _, leaf = key.rpartition(".")
            if sep or path in embeddings:
                tensors.add((path, leaf))
    moved = {
        (path, leaf): t.detach().clone()
        for path, leaf in tensors
        if isinstance(t := getattr(modules.get(path), leaf, None), torch.Tensor)
    }
    try:
        yield
    except Exception:
        if isinstance(model, LoRAModel):
            model.unload()
        with torch.no_grad():
            for (path, leaf), value in moved.items():
                getattr(model.get_submodule(path), leaf).copy_(value)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


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
) -> None:
    """Load another adapter into a LoRA model (inactive until `set_adapter`), or reload an existing one
    in place (what Trainer does when it resumes or restores the best checkpoint). As in peft, the model is
    put in eval mode unless `is_trainable=True` (Trainer switches it back to train mode at each step)."""
    _check_materialised(model)
    files = read_adapter(
        model_id, subfolder=subfolder, revision=revision, token=token, allow_pickle=allow_pickle
    )
    if adapter_name in model.peft_config:
        _reload_in_place(model, adapter_name, files, is_trainable)
    else:
        _load_new_adapter(model, adapter_name, files, is_trainable)
    if not is_trainable:
        model.eval()


def _load_new_adapter(model: LoRAModel, adapter_name: str, files: AdapterFiles, is_trainable: bool) -> None:
    _check_adapter_name(adapter_name)
    config = _prepare_config(model, files.config.replace(inference_mode=not is_trainable))
    plan = _plan_load(model, config, files)
    _inject(model, adapter_name, plan.config, plan.targets, plan.saved, initialise=False)
    try:
        _copy_tensors(model, adapter_name, files)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    model._activate(model.active_adapters)


def _check_materialised(model: nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise AdapterStateError(
            "the model has parameters on the meta device (created without weights); load or materialise the "
            "base weights first (e.g. model.to_empty(device=...) and load_state_dict), then the adapter."
        )


@dataclass
class LoadPlan:
    config: LoRAConfig
    targets: list[str]
    saved: list[str]


def _plan_load(model: nn.Module, config: LoRAConfig, files: AdapterFiles) -> LoadPlan:
    """Check the file's tensors against what `config` would create in `model`, before touching it."""
    keys = {_normalise_key(k): k for k in files.tensors}
    try:
        targets = resolve_targets(model, config, strict_patterns=False)
    except ValueError as e:
        raise AdapterFormatError(f"adapter {files.source} does not fit this model: {e}") from None
    saved = _resolve_saved_leniently(model, config, files.source)
    try:
        tokens = resolve_token_targets(model, config, targets)
    except ValueError as e:
        raise AdapterFormatError(f"adapter {files.source} does not fit this model: {e}") from None
    modules = dict(base_modules(model))
    embeddings = _embedding_paths(model)
    keys = _without_foreign_base_layer_keys(keys, modules, targets, tokens, files.source)
    keys = _without_other_wrappers_keys(model, keys, saved, files.source, config.bias == "all")

    # peft matches modules_to_save by plain suffix and may have saved more modules than the config's
    # names select on a dot boundary (DistilBERT's pre_classifier for "classifier"): load what was saved.
    # Such tensors equal to the model's own are the copies we write for peft (`peft_only_saved_modules`).
    expected = _expected_shapes(modules, config, targets, saved, embeddings, tokens)
    copies: set[str] = set()
    extra = sorted(set(keys) - set(expected))
    own = model.state_dict() if extra else {}
    for key in extra:
        path = key.removeprefix(PREFIX).rpartition(".")[0]
        if key in copies:
            continue
        if path in modules and path not in targets and not _inside(path, saved) and not key.endswith(".bias"):
            of_path = [k for k in keys if k.rpartition(".")[0] == f"{PREFIX}{path}"]
            if _unchanged_base_tensors(own, files, [keys[k] for k in of_path]):
                copies.update(of_path)
                continue
            saved.append(path)
            logger.info(
                "%s: loading %s as a module saved in full (it is in the adapter file)", files.source, path
            )
    keys = {k: v for k, v in keys.items() if k not in copies}
    expected = _expected_shapes(modules, config, targets, saved, embeddings, tokens)

    problems = []
    missing = [k for k, (_, required) in expected.items() if required and k not in keys]
    unexpected = sorted(set(keys) - set(expected))
    if missing:
        problems.append(f"missing tensors: {few(missing, 4)}")
    if unexpected:
        made_for = files.raw_config.get("base_model_name_or_path") or (
            (files.raw_config.get("auto_mapping") or {}).get("base_model_class")
        )
        hint = f" (the adapter was made for {made_for!r})" if made_for else ""
        problems.append(f"tensors for modules this model does not have{hint}: {few(unexpected, 4)}")
    vocabularies = set()
    for key, (shape, _) in expected.items():
        if key in keys and tuple(files.tensors[keys[key]].shape) != shape:
            got = tuple(files.tensors[keys[key]].shape)
            problems.append(f"{key} has shape {got}, the model needs {shape}")
            path = key.removeprefix(PREFIX).rpartition(".")[0].removesuffix(".base_layer")
            if path in embeddings and got[1:] == shape[1:]:
                vocabularies.add((got[0], shape[0]))
    if not problems:
        problems += _base_weights_under_merged_adapters(modules, files, keys)
    if problems:
        advice = "Is it an adapter for a different base model (architecture or size)?"
        if len(vocabularies) == 1 and len(problems) == sum(" has shape " in p for p in problems):
            ((saved_with, has),) = vocabularies
            advice = (
                f"The adapter was saved with a vocabulary of {saved_with} tokens (resized embeddings), the model "
                f"has {has}: call model.resize_token_embeddings({saved_with}) first, then load it."
            )
        raise AdapterFormatError(
            f"adapter {files.source} does not fit {type(model).__name__}: "
            + "; ".join(problems[:6])
            + ". "
            + advice
        )
    return LoadPlan(
        config=config.replace(modules_to_save=_saved_names(config, saved)), targets=targets, saved=saved
    )


def _resolve_saved_leniently(model: nn.Module, config: LoRAConfig, source: str) -> list[str]:
    """`resolve_modules_to_save`, ignoring names that match no module on a dot boundary: peft matches them
    as plain suffixes ("layernorm" takes `input_layernorm`) or ignores them (its add_adapter writes
    ["classifier", "score"] for any classifier), and saves what it wrapped; `_plan_load` then loads the
    file's tensors of such modules as modules saved in full. Creating an adapter stays strict (typos)."""
    saved: list[str] = []
    for name in config.modules_to_save or []:
        try:
            saved += resolve_modules_to_save(model, config.replace(modules_to_save=[name]))
        except TargetModulesError:
            logger.info(
                "%s: modules_to_save name %r matches no module by name; the adapter file's tensors decide "
                "what is loaded in full (peft matches such names as plain suffixes, or ignores them)",
                source,
                name,
            )
    return saved


def _base_layer_key(key: str) -> tuple[str, str] | None:
    """(module path, tensor name) of a file key for a tensor of peft's `<path>.base_layer`, the module a
    LoRA layer wraps; here a LoRA layer is that module itself, so the tensor is its `<path>.<name>`."""
    path, sep, leaf = key.removeprefix(PREFIX).rpartition(".base_layer.")
    return (path, leaf) if key.startswith(PREFIX) and sep and "." not in leaf else None


def _base_layer_paths(
    modules: dict[str, nn.Module], targets: list[str], tokens: dict[str, TokenTarget] | None = None
) -> set[str]:
    """Modules whose own tensors peft's files name `<path>.base_layer.*` (`<path>.token_adapter.base_layer.*`
    with token rows, which `_normalise_key` maps to the former) once the adapter is attached: its targets,
    its token-row modules and the modules tied to them, and other adapters' layers."""
    return (
        set(targets)
        | {p for p, m in modules.items() if isinstance(m, (LoRALayer, TokenRowsLayer))}
        | {p for path, target in (tokens or {}).items() for p in (path, *target.tied)}
    )


def _embedding_paths(model: nn.Module) -> set[str]:
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


def saved_vocabulary(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int | None:
    """The vocabulary size an adapter's embedding weights were saved with (save_embedding_layers), where
    it differs from the model's: the model it was trained on had been resized for new tokens."""
    for path in sorted(_embedding_paths(model)):
        rows = model.get_submodule(path).weight.shape[0]
        base = (f"{PREFIX}{path}.{where}weight" for where in ("", "base_layer.", "token_adapter.base_layer."))
        for key in base:
            if key in tensors and tensors[key].shape[0] != rows:
                return int(tensors[key].shape[0])
    return None


def _without_foreign_base_layer_keys(
    keys: dict[str, str],
    modules: dict[str, nn.Module],
    targets: list[str],
    tokens: dict[str, TokenTarget],
    source: str,
) -> dict[str, str]:
    """Drop `<path>.base_layer.*` tensors of modules that will not be LoRA layers. peft's bias="lora_only"
    trains the biases of every LoRA layer, so an adapter saved beside others holds theirs too; on a model
    without LoRA on those modules peft has no base_layer to load them into and ignores them, as we do."""
    lora = _base_layer_paths(modules, targets, tokens)
    foreign = sorted(
        k for k in keys if (split := _base_layer_key(k)) and split[0] in modules and split[0] not in lora
    )
    if foreign:
        logger.info(
            "%s: ignoring tensors of modules without LoRA layers (as peft does; an adapter saved beside "
            "others with bias='lora_only' has their biases): %s",
            source,
            few(foreign, 4),
        )
    return {k: v for k, v in keys.items() if k not in foreign}


def _without_other_wrappers_keys(
    model: nn.Module, keys: dict[str, str], saved: list[str], source: str, bias_all: bool
) -> dict[str, str]:
    """Drop the tensors of saved-module wrappers that peft writes and ignores on load: `<path>.original_module.*`
    of modules this adapter does not save in full (peft's bias="all" writes every bias, also the unused
    original head of a module another adapter saved), and, for the modules it saves, the wrapper's own
    `original_module.*` / `modules_to_save.*` (save_embedding_layers takes everything under an embedding's
    wrapper). Under bias="all" a saved module's wrapper biases are this adapter's (`_wrapper_bias_keys`)."""
    modules = {path for path, _ in model.named_modules()}
    ignored = []
    for k in keys:
        name = k.removeprefix(PREFIX)
        path, sep, rest = name.partition(".original_module.")
        if sep and path in modules and path not in saved:
            ignored.append(k)
            continue
        for wrapper in (".original_module.", ".modules_to_save."):
            path, sep, rest = name.partition(wrapper)
            if sep and path in saved and "." not in rest and not (bias_all and rest == "bias"):
                ignored.append(k)
    if ignored:
        logger.info(
            "%s: ignoring tensors of saved-module wrappers (peft writes them and ignores them too): %s",
            source,
            few(ignored, 4),
        )
    return {k: v for k, v in keys.items() if k not in ignored}


def _base_weights_under_merged_adapters(
    modules: dict[str, nn.Module], files: AdapterFiles, keys: dict[str, str]
) -> list[str]:
    """A different base weight would be copied over a weight that other adapters are merged into, and
    unmerging them would then leave a wrong weight."""
    problems = []
    for key, file_key in keys.items():
        split = _base_layer_key(key)
        module = modules.get(split[0]) if split and split[1] == "weight" else None
        merged = isinstance(module, (LoRALayer, TokenRowsLayer)) and module.merged_adapters
        if merged and not _is_base_weight(module, files.tensors[file_key]):
            problems.append(
                f"{key} differs from {split[0]}.weight, into which adapters {module.merged_adapters} are "
                "merged; unmerge_adapter() first, then load it"
            )
    return problems


def _saved_names(config: LoRAConfig, saved: list[str]) -> list[str] | None:
    names = list(config.modules_to_save or [])
    for path in saved:
        if not any(path == n or path.endswith("." + n) for n in names):
            names.append(path)
    return names or None


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _expected_shapes(
    modules: dict[str, nn.Module],
    config: LoRAConfig,
    targets: list[str],
    saved: list[str],
    embeddings: set[str] = frozenset(),
    tokens: dict[str, TokenTarget] | None = None,
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """file key -> (shape, required) for the adapter `config` creates.

    peft's files may also hold a LoRA layer's base tensors as `<path>.base_layer.weight` (an adapted output
    head, by save_embedding_layers="auto") and `.bias` (bias="lora_only"/"all"); peft loads them into the
    base layer, and so does `_copy_tensors` where they differ from the model's (a resized vocabulary)."""
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for path in targets:
        m = modules[path]
        kind = kind_of(m)
        a_shape, b_shape = kind.factor_shapes(m, config.rank_for(path))
        a_key, b_key = kind.file_keys
        out[f"{PREFIX}{path}.{a_key}"] = (a_shape, True)
        out[f"{PREFIX}{path}.{b_key}"] = (b_shape, True)
        if config.use_dora:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = ((kind.shapes(m)[1],), True)
    for path, target in (tokens or {}).items():
        shape = (len(target.ids), modules[path].weight.shape[1])
        out[f"{PREFIX}{path}.{TOKENS_KEY}"] = (shape, True)
        # peft's save_embedding_layers=True writes the rows under a tied head's name too
        for tied in target.tied:
            out[f"{PREFIX}{tied}.{TOKENS_KEY}"] = (shape, False)
    base_layer_paths = _base_layer_paths(modules, targets, tokens)
    for path in sorted(base_layer_paths):
        for leaf in ("weight", "bias"):
            t = getattr(modules[path], leaf, None)
            if isinstance(t, nn.Parameter):
                out[f"{PREFIX}{path}.base_layer.{leaf}"] = (tuple(t.shape), False)
    for path in sorted(
        embeddings - base_layer_paths
    ):  # save_embedding_layers: base weights, loaded into the base
        if not _inside(path, saved):
            for leaf in ("weight", "bias"):
                t = getattr(modules[path], leaf, None)
                if isinstance(t, nn.Parameter):
                    out[f"{PREFIX}{path}.{leaf}"] = (tuple(t.shape), False)
    for path in saved:
        for k, v in modules[path].state_dict().items():
            out[f"{PREFIX}{path}.{k}"] = (tuple(v.shape), True)
        b = getattr(modules[path], "bias", None)
        if config.bias == "all" and isinstance(b, nn.Parameter):
            for file_key in _wrapper_bias_keys(path, DEFAULT_ADAPTER):
                out[f"{PREFIX}{file_key}"] = (tuple(b.shape), False)
    if config.bias == "all":
        for path, m in modules.items():
            b = getattr(m, "bias", None)
            if isinstance(b, nn.Parameter) and path not in targets and not _inside(path, saved):
                out[f"{PREFIX}{path}.bias"] = (tuple(b.shape), False)
    return out


def _normalise_key(key: str) -> str:
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


def _copy_tensors(model: LoRAModel, adapter_name: str, files: AdapterFiles) -> None:
    keymap = adapter_key_map(model, adapter_name)
    own = model.state_dict(keep_vars=True)
    lora = _base_layer_paths(dict(base_modules(model)), [p for p, _ in model.lora_layers()])
    embeddings = _embedding_paths(model) - lora
    with torch.no_grad():
        for key, tensor in files.tensors.items():
            own_key = keymap.get(_normalise_key(key))
            name = key.removeprefix(PREFIX)  # for a base tensor
            if own_key is not None:
                target = own[own_key]
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            elif name.rpartition(".")[0] in embeddings and name in own:  # save_embedding_layers
                _copy_base_tensor(own[name], tensor, name, files.source)
            elif (split := _base_layer_key(_normalise_key(key))) and split[0] in lora:
                layer = model.get_submodule(split[0]) if split[1] == "weight" else None
                _copy_base_tensor(
                    own[f"{split[0]}.{split[1]}"], tensor, f"{split[0]}.{split[1]}", files.source, layer
                )


def _is_base_weight(layer: LoRALayer, tensor: torch.Tensor) -> bool:
    """Whether a file's base weight is this layer's. With adapters merged into it, the layer's base is its
    weight minus their updates, which rounding leaves a few ulps off the original weight the file may
    hold: compared up to that."""
    base = layer.base_weight().detach()
    tensor = tensor.to(device=base.device, dtype=base.dtype)
    if not layer.merged_adapters or base.shape != tensor.shape:
        return torch.equal(base, tensor)
    # merging and unmerging round twice, each by at most half an ulp of what they round: elementwise bound
    merged, tensor = layer.weight.detach().float(), tensor.float()
    bound = 2 * torch.finfo(base.dtype).eps * (merged.abs() + tensor.abs())
    return bool(((base.float() - tensor).abs() <= bound).all())


def _copy_base_tensor(
    target: torch.Tensor, tensor: torch.Tensor, name: str, source: str, layer: LoRALayer | None = None
) -> None:
    """A base tensor from the file (peft's `<path>.base_layer.<name>`, or an embedding's): peft loads it, so
    a different one (a resized vocabulary) replaces the model's; a weight tied to the input embeddings
    changes them too, as in peft. `layer`: the LoRA layer whose weight `target` is, which is compared
    without its merged adapters (`_base_weights_under_merged_adapters` has refused a different one)."""
    same = _is_base_weight(layer, tensor) if layer is not None else torch.equal(target, tensor.to(target))
    tensor = tensor.to(device=target.device, dtype=target.dtype)
    if not same:
        logger.info("%s: loading %s from the adapter file (it differs from the model's)", source, name)
        target.copy_(tensor)


# Fields that change what the same A and B compute: a reload in place must agree on them.
_RELOAD_MUST_MATCH = ("lora_alpha", "use_rslora", "use_dora", "alpha_pattern", "trainable_token_indices")


def _reload_in_place(model: LoRAModel, adapter_name: str, files: AdapterFiles, is_trainable: bool) -> None:
    """New weights for an existing adapter (the Trainer's resume and best-model paths): the file must be
    that adapter's, and a merged adapter is unmerged around the copy so the base weights stay right."""
    keymap = adapter_key_map(model, adapter_name)
    own = model.state_dict(keep_vars=True)
    given = {_normalise_key(k): k for k in files.tensors}
    current = model.peft_config[adapter_name]
    must_match = _RELOAD_MUST_MATCH
    if _moves_base_weights(files.config) or _moves_base_weights(current):
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
        and not _unchanged_base_tensors(own, files, [given[k]])
        and not _base_layer_key(k)
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
    merged = [layer for layer in model._adapter_layers() if adapter_name in layer.merged_adapters]
    for layer in merged:
        layer.unmerge([adapter_name])
    _copy_tensors(model, adapter_name, files)
    for layer in merged:
        layer.merge([adapter_name])
    model.peft_config[adapter_name] = model.peft_config[adapter_name].replace(inference_mode=not is_trainable)
    model._activate(model.active_adapters)


def _base_layer_problems(model: LoRAModel, files: AdapterFiles, given: dict[str, str]) -> list[str]:
    """Reloading in place: peft's `<path>.base_layer.*` tensors must fit the model's base tensors
    (`_copy_tensors` loads those of LoRA layers; those of other modules are ignored, as in peft)."""
    modules = dict(base_modules(model))
    problems = []
    for key in given:
        split = _base_layer_key(key)
        if split is None or split[0] not in modules:
            problems += [f"unexpected {key}"] if split else []
            continue
        mine = getattr(modules[split[0]], split[1], None)
        if not isinstance(mine, torch.Tensor):
            problems.append(f"unexpected {key}")
        elif (got := tuple(files.tensors[given[key]].shape)) != tuple(mine.shape):
            problems.append(f"{key} has shape {got}, the model needs {tuple(mine.shape)}")
    return problems


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFiles",
    "LoRALayer",
    "adapter_key_map",
    "adapter_state_dict",
    "from_pretrained",
    "load_adapter",
    "read_adapter",
    "read_safetensors",
    "save_pretrained",
]
