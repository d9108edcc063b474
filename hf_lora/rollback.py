"""All or nothing for operations that change a model's structure: `restored_on_error` records every
module's class and attributes (its dicts of children, parameters, buffers and hooks, and its lists and
sets, copied) and the parameters' trainable flags, and on an exception puts them back, so the model is
the very same objects as before, not a rebuilt copy."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import LoRAConfig, moves_base_weights


@contextlib.contextmanager
def restored_on_error(
    model: nn.Module,
    config: LoRAConfig | None = None,
    targets: list[str] = (),
    keep: Iterable[torch.Tensor] = (),
) -> Iterator[None]:
    """On an exception inside the block, give `model` back exactly as it was: its modules (classes,
    children, parameters, buffers, hooks, attributes), trainable flags, the base weights that adding
    an adapter of `config` on `targets` changes in place (PiSSA, OLoRA), and the tensors in `keep` (what
    else the block writes in place; other tensors are not copied, to save memory)."""
    modules = [
        (
            m,
            type(m),
            {k: (v, copy.copy(v) if isinstance(v, _CONTAINERS) else None) for k, v in vars(m).items()},
        )
        for m in model.modules()
    ]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    values = [(t, t.detach().clone()) for t in [*_weights_moved_by(model, config, targets), *keep]]
    try:
        yield
    except BaseException:
        for module, cls, attributes in modules:
            module.__class__ = cls
            for key, (value, contents) in attributes.items():
                vars(module)[key] = value
                if isinstance(value, list):  # the same object, with its entries of before
                    value[:] = contents
                elif contents is not None:
                    value.clear()
                    value.update(contents)
            for key in set(vars(module)) - set(attributes):
                del vars(module)[key]
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for t, value in values:
                t.copy_(value)
        raise


_CONTAINERS = (dict, list, set)  # attributes changed in place (children, merged_adapters, ...): copied


def _weights_moved_by(model: nn.Module, config: LoRAConfig | None, targets: list[str]) -> list[torch.Tensor]:
    if config is None or not moves_base_weights(config):
        return []
    return [
        w for p in targets if isinstance(w := getattr(model.get_submodule(p), "weight", None), torch.Tensor)
    ]
