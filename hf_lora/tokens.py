"""Trainable token rows (peft's `trainable_token_indices`): train a few rows of an embedding, not all of it.

The usual case is a tokenizer with new special tokens (a chat template): their rows of the input
embedding must learn, the rest of the vocabulary stays frozen, and the adapter file holds those rows only
(peft's key `<path>.token_adapter.trainable_tokens_delta`, a (tokens, dim) tensor that holds the rows
themselves, not a difference, despite the name).

As with LoRA layers the module keeps its identity: its class is swapped for a subclass whose forward
puts the rows of the trained tokens into the base output. An output head that shares the embedding's
weight (tied embeddings) gets the same treatment, reading the rows the embedding holds, so the two stay
tied, as in peft. Where peft builds the whole (vocabulary, dim) weight with the rows replaced on every
call (and its dense gradient in backward), the lookup here is the base model's: the embedding's output
takes the rows at the positions of those tokens, and a head's logits get `x @ (rows - W[ids]).T` added
to those columns. Same outputs and gradients (a head's up to rounding), without a weight-sized copy per
step. Merging writes the rows into the weight (the rows they replace are kept, so unmerging restores
them exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterStateError
from .kinds.embedding import embed_scale
from .layers import BASE_ROWS, rebuild_swapped, rows_for_batch

# peft's state-dict names, under `<path>.token_adapter.`
TOKENS_KEY = "token_adapter.trainable_tokens_delta"


class TokenRowsLayer(nn.Module):
    """Mixin for nn.Embedding (and a tied or targeted nn.Linear head); instances come from
    `make_token_layer`. A layer tied to another one (`_token_source`) holds nothing of its own: it reads the
    rows, active adapters and merge state of the layer it is tied to."""

    trainable_tokens_delta: nn.ParameterDict  # adapter -> (tokens, dim): the trained rows (peft's name)
    token_indices: dict[str, list[int]]  # adapter -> the rows' token ids
    active_adapters: tuple[str, ...]
    adapters_disabled: bool
    _row_adapters: Sequence[str] | None  # mixed batches: one adapter name per batch row
    _token_saved: dict[str, torch.Tensor]  # merged adapter -> the weight rows it replaced, in merge order
    _token_index_cache: dict[str, tuple[tuple[torch.device, int], torch.Tensor, torch.Tensor]]

    @property
    def source(self) -> TokenRowsLayer:
        """The layer that holds the rows: this one, or the embedding this head is tied to."""
        return self.__dict__.get("_token_source") or self

    @property
    def merged_adapters(self) -> list[str]:
        return list(self.source._token_saved)

    # -- adapters --

    def add_token_adapter(self, name: str, indices: Sequence[int]) -> None:
        """Rows for adapter `name`, starting as the weight's own rows, so the model is unchanged (peft's LoRA
        does the same whatever init_lora_weights says). Kept in fp32 on a half-precision base, as LoRA's
        factors and peft's rows are: small updates to bf16 rows would round away."""
        w = self.base_weight().detach()
        indices = [int(i) for i in indices]
        rows = w[torch.tensor(indices, device=w.device)].clone()
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self.token_indices[name] = indices

    def delete_adapter(self, name: str) -> None:
        if name in self._token_saved:
            self.unmerge([name])
        if name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
        self.token_indices.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)
        self._token_index_cache.pop(name, None)

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = tuple(names)  # (LoRAModel.set_adapter has checked the rows are disjoint)

    def _index(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids (tokens,), slot of each vocabulary id in the rows or -1 (vocabulary,)) on `device`,
        made again when the device or the vocabulary (resize_token_embeddings) changes."""
        key = (device, self.weight.shape[0])
        cached = self._token_index_cache.get(name)
        if cached is None or cached[0] != key:
            ids = torch.tensor(self.token_indices[name], device=device)
            slot = torch.full((key[1],), -1, dtype=torch.long, device=device)
            slot[ids] = torch.arange(len(ids), device=device)
            cached = self._token_index_cache[name] = (key, ids, slot)
        return cached[1], cached[2]

    # -- merging --

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Write the rows into the weight (idempotent), keeping the rows they replace for `unmerge`."""
        names = [
            n
            for n in (self.active_adapters if names is None else names)
            if n in self.trainable_tokens_delta and n not in self._token_saved
        ]
        check_disjoint(self, list(self._token_saved) + names)
        w = self.weight
        if names and hasattr(w, "full_tensor"):
            raise AdapterStateError(
                "token rows cannot be merged into a sharded weight (FSDP2/DTensor); save the adapter and merge "
                "it into a plain model (LoRAModel.from_pretrained(...).merge_and_unload())."
            )
        for name in names:
            ids, _ = self._index(name, w.device)
            rows = self.trainable_tokens_delta[name].detach().to(w.dtype)
            if safe and not torch.isfinite(rows).all():
                raise ValueError(f"adapter {name!r} has NaN/inf token rows; they were not merged.")
            with torch.no_grad():
                self._token_saved[name] = w[ids].clone()
                w.index_copy_(0, ids, rows)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Put back the rows merged adapters replaced (exactly)."""
        w = self.weight
        for name in reversed(list(self._token_saved)):
            if names is None or name in names:
                ids, _ = self._index(name, w.device)
                with torch.no_grad():
                    w.index_copy_(0, ids, self._token_saved.pop(name).to(w))

    def base_weight(self) -> torch.Tensor:
        """The weight without merged rows."""
        src = self.source
        w = self.weight
        if not src._token_saved:
            return w
        w = w.detach().clone()
        for name, saved in reversed(list(src._token_saved.items())):
            w.index_copy_(0, src._index(name, w.device)[0], saved.to(w))
        return w

    # -- forward --

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        src = self.source
        if src.adapters_disabled:
            return super().forward(x, *args, **kwargs)
        if src._row_adapters is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        live = [
            n for n in src.active_adapters if n in src.trainable_tokens_delta and n not in src._token_saved
        ]
        if not live:
            return super().forward(x, *args, **kwargs)
        if self._whole_weight_lookup():
            return self._lookup_replaced(x, live)
        out = super().forward(x, *args, **kwargs)
        for name in live:
            out = self._put_rows(out, x, name, None)
        return out

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        src = self.source
        if src._token_saved:
            raise AdapterStateError(
                f"token rows of adapter(s) {list(src._token_saved)} are merged into the weights; "
                "unmerge_adapter() before a mixed-batch forward (adapter_names=...)."
            )
        rows = rows_for_batch(src._row_adapters, x.shape[0])
        out = super().forward(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name == BASE_ROWS or name not in src.trainable_tokens_delta:
                continue
            chosen = [i for i, n in enumerate(rows) if n == name]
            if self._whole_weight_lookup():
                at = torch.tensor(chosen, device=out.device)
                out = out.index_copy(0, at, self._lookup_replaced(x[chosen], [name]).to(out.dtype))
            else:
                out = self._put_rows(out, x, name, chosen)
        return out

    def _whole_weight_lookup(self) -> bool:
        """Lookups that renormalise rows (max_norm) or scale gradients by batch counts are done peft's way,
        on a copy of the whole weight with the rows replaced: they depend on the rows they look up."""
        return isinstance(self, nn.Embedding) and (
            self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        )

    def _lookup_replaced(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        src, w = self.source, self.weight
        for name in names:
            w = w.index_copy(0, src._index(name, w.device)[0], src.trainable_tokens_delta[name].to(w.dtype))
        out = F.embedding(
            x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        scale = embed_scale(self)
        return out if scale is None else out * scale.to(out.dtype)

    def _put_rows(self, out: torch.Tensor, x: torch.Tensor, name: str, batch_rows: list[int] | None):
        """`out` as if the weight held this adapter's rows (`batch_rows`: only for these rows of the batch):
        an embedding's positions of those tokens take the rows, a head's logit columns are recomputed."""
        src = self.source
        values = src.trainable_tokens_delta[name]  # (tokens, dim)
        ids, slot = src._index(name, out.device)
        if not isinstance(self, nn.Embedding):
            # A head: logits (..., vocabulary), whose columns `ids` become x @ rows.T (+ bias[ids]).
            part = out if batch_rows is None else out[batch_rows]
            part = _head_rows(part, x if batch_rows is None else x[batch_rows], values, self, ids)
            if batch_rows is None:
                return part
            return out.index_copy_(0, torch.tensor(batch_rows, device=out.device), part)
        # Every position's row is gathered and kept where the token has one: shapes do not depend on the
        # data, so there is no device sync (boolean indexing counts its hits on the host) and no graph break.
        at = slot[x]  # (B, T): each token's row, -1 for tokens without one
        if batch_rows is not None:
            chosen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            chosen[batch_rows] = True
            at = at.masked_fill(~chosen.view(-1, *[1] * (x.dim() - 1)), -1)
        picked = values[at.clamp(min=0)]  # (B, T, dim)
        if self.padding_idx in src.token_indices[name]:
            # F.embedding passes no gradient to the padding row: neither does peft's replaced weight.
            picked = torch.where((x == self.padding_idx).unsqueeze(-1), picked.detach(), picked)
        # Rows in the weight's dtype first, then Gemma3's lookup scale, as the base lookup (and peft, and the
        # merged weight) do it: a bf16 base rounds the row before scaling it.
        picked = picked.to(out.dtype)
        scale = embed_scale(self)
        if scale is not None:
            picked = picked * scale.to(out.dtype)
        return torch.where((at >= 0).unsqueeze(-1), picked, out)

    def extra_repr(self) -> str:
        src = self.source
        tied = " (tied)" if src is not self else ""
        tokens = ", ".join(f"{n}: {len(i)}" for n, i in src.token_indices.items())
        return f"{super().extra_repr()}, trainable_tokens{tied}=[{tokens}]"

    def __reduce_ex__(self, protocol: int):
        return (rebuild_swapped, (token_layer_class, self._token_base_class, self.__dict__.copy()))


def _head_rows(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, head: nn.Module, ids: torch.Tensor):
    """`out` (a head's logits) with the columns `ids` set to x @ rows.T (+ bias[ids]), in place: one
    rounding, as peft's whole-weight matmul. For the gradient, `c - c.detach()` (exactly zero) with
    c = x @ (rows - W[ids]).T is added to those columns: the base head's backward already sends their
    gradient through W[ids], and c's adds what rows - W[ids] contribute. The logits' gradient passes
    through untouched (an overwrite autograd saw would copy it, a tokens x vocabulary tensor, to zero
    those columns), and there is no custom autograd function for torch.compile to break on."""
    bias = None if head.bias is None else head.bias.detach()[ids].to(x.dtype)
    w_ids = head.weight.detach()[ids]  # (tokens, dim)
    with torch.no_grad():
        out.index_copy_(-1, ids, F.linear(x, rows.to(x.dtype), bias).to(out.dtype))
    if not (torch.is_grad_enabled() and (x.requires_grad or rows.requires_grad)):
        return out
    c = F.linear(x, rows.to(x.dtype) - w_ids.to(x.dtype))  # (..., tokens)
    return out.index_add_(-1, ids, (c - c.detach()).to(out.dtype))


def check_disjoint(layer: TokenRowsLayer, names: Sequence[str]) -> None:
    """Two adapters' rows for one token would overwrite each other (peft refuses that too)."""
    seen: dict[int, str] = {}
    for name in dict.fromkeys(names):
        for i in layer.source.token_indices.get(name, ()):
            if i in seen and seen[i] != name:
                raise AdapterStateError(
                    f"adapters {seen[i]!r} and {name!r} both train token {i} of this embedding; only adapters "
                    "with disjoint token indices can be active or merged together."
                )
            seen[i] = name


_TOKEN_CLASSES: dict[type, type[TokenRowsLayer]] = {}


def token_layer_class(base_cls: type[nn.Module]) -> type[TokenRowsLayer]:
    if base_cls not in _TOKEN_CLASSES:
        _TOKEN_CLASSES[base_cls] = type(f"TrainableTokens{base_cls.__name__}", (TokenRowsLayer, base_cls), {})
    return _TOKEN_CLASSES[base_cls]


def make_token_layer(module: nn.Module, source: TokenRowsLayer | None = None) -> TokenRowsLayer:
    """Turn an Embedding (or a Linear head) into a token-rows layer in place. Idempotent. With `source`,
    the module is tied to that layer and reads its rows."""
    if isinstance(module, TokenRowsLayer):
        return module
    base_cls = type(module)
    module.__class__ = token_layer_class(base_cls)
    module._token_base_class = base_cls
    if source is not None:
        module.__dict__["_token_source"] = source  # not a submodule: its rows are saved once, by the source
        return module
    module.trainable_tokens_delta = nn.ParameterDict()
    module.token_indices = {}
    module.active_adapters = ()
    module.adapters_disabled = False
    module._row_adapters = None
    module._token_saved = {}
    module._token_index_cache = {}
    return module


def unmake_token_layer(module: TokenRowsLayer) -> nn.Module:
    """Give the module its original class back (rows neither merged nor removed here: callers do that)."""
    if "_token_source" in module.__dict__:
        del module.__dict__["_token_source"]
    else:
        del module.trainable_tokens_delta
        for name in (
            "token_indices",
            "active_adapters",
            "adapters_disabled",
            "_row_adapters",
            "_token_saved",
            "_token_index_cache",
        ):
            module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_token_base_class")
    return module
