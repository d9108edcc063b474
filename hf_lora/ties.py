"""Weights that several modules share (tied input and output embeddings): what adapters must not move, and
the copies merging gives a module so that the modules tied to it stay as they were."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from .config import LoRAConfig, moves_base_weights
from .errors import AdapterStateError
from .kinds import kind_of
from .targets import shared_parameters
from .tokens import TokenRowsLayer

logger = logging.getLogger(__name__)


def check_tied_targets(model: nn.Module, config: LoRAConfig, targets: list[str], warn: bool = True) -> None:
    """A target whose weight another module shares (an output head tied to the input embeddings): PiSSA
    and OLoRA would move part of the shared weight into the adapter, changing the other module too, so
    they are refused; merging unties it first (`untie_merge_targets`)."""
    shared = shared_parameters(model)
    tied = [path for path in targets if id(getattr(model.get_submodule(path), "weight", None)) in shared]
    if not tied:
        return
    moved = [
        path for path in tied if kind_of(model.get_submodule(path)).moves_base_weights
    ]  # (else left alone)
    if moved and moves_base_weights(config):
        raise AdapterStateError(
            f"init_lora_weights={config.init_lora_weights!r} moves part of each targeted weight into the "
            f"adapter, but {moved} share their weight with another module (tied input/output embeddings), which "
            "would change too. Leave them out (exclude_modules), or untie them first."
        )
    if warn:
        logger.info(
            "LoRA on %s, whose weight another module shares (tied input/output embeddings): merging will give "
            "it its own copy of the weight.",
            tied,
        )


def untie_if_replaced(model: nn.Module, untied: bool = False) -> None:
    """Modules that shared one weight no longer do (`untied`: a merge gave one its own copy; or a trained
    copy of a tied output head replaced it): record that in the config, which transformers ties by on
    save, load and tie_weights(), or the merged update would be dropped. With the flag off, no module may
    share a weight any more: save_pretrained would keep one of them and the reload fill the others from a
    weight they no longer equal (T5's encoder/decoder embed_tokens from `shared`), so each gets a copy."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    if not untied:
        get_in, get_out = (
            getattr(model, "get_input_embeddings", None),
            getattr(model, "get_output_embeddings", None),
        )
        emb_in = get_in() if callable(get_in) else None
        emb_out = get_out() if callable(get_out) else None
        untied = emb_in is not None and emb_out is not None and emb_in.weight is not emb_out.weight
    if not untied:
        return
    config.tie_word_embeddings = False
    for names in shared_parameters(model).values():
        for name in names[1:]:
            path, _, leaf = name.rpartition(".")
            module = model.get_submodule(path)
            p = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    logger.info("tied weights now differ: tie_word_embeddings=False, and each module has its own weights")


def untie_merge_targets(model: Any, names: Sequence[str]) -> None:
    """Give each LoRA layer about to merge an adapter, whose weight another module shares, a copy of its
    own: merging into the shared weight would change the modules tied to it too (an output head and the
    input embeddings)."""
    shared = shared_parameters(model)
    untied = False
    for path, layer in model.lora_layers():
        if id(getattr(layer, "weight", None)) in shared and any(n in layer.lora_A for n in names):
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            untied = True
            logger.warning(
                "%s shared its weight with another module (tied embeddings); it now has its own copy, so that "
                "merging leaves the other module as it was.",
                path,
            )
    untie_if_replaced(model, untied)


def untie_token_rows(model: Any, names: Sequence[str]) -> None:
    """A module with token rows of its own whose weight other modules share without showing those rows (a
    tied head given rows apart from the embedding, as peft allows) gets a copy of the weight before merging,
    with the modules that show its rows: merging into the shared weight would change the others too. As
    for LoRA on a tied head (`untie_merge_targets`) the copy stays after unmerging, and the config says the
    weights are no longer tied (re-tying on unmerge has too many orders to get right: other ids on the
    embedding, several adapters, a merge failing half way)."""
    for path, layer in model.token_layers():
        if not any(n in layer.trainable_tokens_delta for n in names):
            continue
        shows = [m for m in model.modules() if isinstance(m, TokenRowsLayer) and m.source is layer]
        sharing = [m for m in model.modules() if getattr(m, "weight", None) is layer.weight]
        if len(sharing) > len(shows):
            weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            for module in shows:
                module.weight = weight
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            logger.warning(
                "%s shared its weight with modules that do not show its token rows; it now has its own copy, so "
                "that merging leaves them as they were.",
                path,
            )
