"""Writing adapters: `save_pretrained` writes each adapter's `adapter_config.json` and
`adapter_model.safetensors` (+ a README.md card) in peft's layout (`adapter_files` says what goes in them).

Saving never damages what is on disk: each file is written to a temporary file in the target directory's
`.cache/huggingface/` and renamed over the old one (atomic on POSIX), and an unchanged config is not
rewritten, so re-saving a training adapter is a single atomic rename. (Loading, which checks everything
before the model is touched and refuses pickle files unless asked, is `loading`; this module also offers
its names, as it always did.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from .adapter_files import (
    CONFIG_NAME,
    PREFIX,
    SAFETENSORS_METADATA,
    WEIGHTS_NAME,
    adapter_config,
    adapter_dir,
    adapter_key_map,
    adapter_state_dict,
    embedding_layer_tensors,
    without_shared_memory,
)
from .atomic import atomic_write_files, folder_lock
from .errors import AdapterStateError
from .kinds import KINDS
from .loading import from_pretrained, load_adapter
from .model import LoRAModel
from .model_card import LOG_HISTORY_ATTR, write_model_card
from .reading import AdapterFiles, read_adapter, read_safetensors

logger = logging.getLogger(__name__)


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
        name: without_shared_memory(
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
        log_history = getattr(model, LOG_HISTORY_ATTR, None)
    directories = {name: adapter_dir(root, name) for name in names}
    with contextlib.ExitStack() as locks:
        # another process saving here at the same time: one set, not a mix (locks in one order: no deadlock)
        for directory in sorted(set(directories.values())):
            locks.enter_context(folder_lock(directory))
        # all adapters' files in one go: every one is staged before the first replaces a file, so a folder
        # that cannot be written fails the save before the others (the root adapter) are touched
        atomic_write_files(
            {
                p: b
                for n in names
                for p, b in adapter_file_bytes(directories[n], configs[n], tensors[n]).items()
            }
        )
        for name in names if model_card else ():
            write_model_card(
                model,
                directories[name],
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


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's two files; each lands whole or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_files(adapter_file_bytes(directory, config, tensors))


def adapter_file_bytes(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[Path, bytes]:
    """One adapter's two files, as `atomic_write_files` takes them."""
    weights = save_safetensors_bytes(tensors, metadata=SAFETENSORS_METADATA)
    # Not sort_keys: the first rank_pattern/alpha_pattern key that matches a module wins, so their order is
    # meaning (to_dict already orders the top-level keys as peft does).
    config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    return {directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: config_bytes}


__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterFiles",
    "adapter_key_map",
    "adapter_state_dict",
    "as_plain_lora",
    "from_pretrained",
    "load_adapter",
    "read_adapter",
    "read_safetensors",
    "save_pretrained",
    "write_adapter",
]
