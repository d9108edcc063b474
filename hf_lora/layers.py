"""LoRA layers: `y = base(x) + (dropout(x) @ A.T @ B.T) * scaling`, with A (r, in) and B (out, r).

A LoRA layer is the original module (an `nn.Linear`, GPT-2 `Conv1D`, `nn.Embedding`: any base kind in
`hf_lora.kinds`) with its class swapped for a subclass that adds the adapter (loralib's approach): the
base `weight`/`bias` stay the same Parameter objects under the same names, nothing is copied, and
`unload()` swaps the class back. Adapters are keyed by name (`lora_A["default"]`), so several can live
side by side. What differs between kinds (shapes, the weight's layout, the plain LoRA branch, the file
keys) the layer asks its kind, `lora_kind`; adapters, merging and the forward's dispatch are here.

Training and inference of a single adapter go through the fused path (`hf_lora.fused`) where the kind
allows it. Anything it does not cover (several active adapters, mixed dtypes without autocast, DoRA,
trainable base weights, unknown Linear subclasses, tensor subclasses) takes the plain path, the kind's
`lora_branch`, which computes exactly what peft computes.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import AdapterStateError
from .fused import fusable, fusable_around, fused_around, fused_lora
from .kinds import BaseKind, kind_of, kind_of_class
from .weights import (
    delta_weight,
    factor_product,
    merged_weight,
    qr_init,
    rounding_share,
    svd_init,
    weight_norm,
)

logger = logging.getLogger(__name__)

BASE_ROWS = "__base__"  # name of "no adapter" in mixed batches, as in peft
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


# ---- the layer --------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """Mixin for a base module class; instances are made by `make_lora_layer`, never constructed."""

    lora_kind: BaseKind  # (a class attribute) what the base module is: hf_lora.kinds

    lora_A: nn.ParameterDict  # adapter -> (r, in)
    lora_B: nn.ParameterDict  # adapter -> (out, r)
    lora_magnitude: nn.ParameterDict  # DoRA adapter -> (out,)
    _dora_norms: dict[str, torch.Tensor]  # ||W + delta|| of merged DoRA adapters, to unmerge them
    # adapter -> s (alpha / r): a float, or a 0-d tensor once prepared for hotswapping (hf_lora.hotswap)
    lora_scaling: dict[str, float | torch.Tensor]
    lora_dropout: dict[str, float]
    active_adapters: tuple[str, ...]  # what the user selected
    merged_adapters: list[str]  # folded into `weight`, in merge order
    adapters_disabled: bool
    fan_in_fan_out: bool  # base weight stored (in, out), as GPT-2's Conv1D does
    _live: tuple[str, ...]  # active, not merged, not disabled: what forward adds
    _fusable_adapter: str | None  # the only live adapter, if not DoRA: the one the fused path may run
    _row_adapters: Sequence[str] | None  # one adapter name per batch row (mixed batches), or None
    _fused: bool  # the base class is exactly its kind's (fused kinds), so hf_lora.fused may run its forward
    merge_rounding: dict[str, float]  # quantised bases: share of a merged update lost to requantising

    @property
    def in_features_(self) -> int:
        return self.lora_kind.shapes(self)[0]

    @property
    def out_features_(self) -> int:
        return self.lora_kind.shapes(self)[1]

    # -- adapters --

    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float,
        init: bool | str | None = True,
        use_dora: bool = False,
        device: torch.device | str | None = None,
        autocast: bool = True,
    ) -> None:
        """Create adapter `name`. `init=None` leaves A and B uninitialised (they are loaded next); "pissa",
        "pissa_niter_<n>" and "olora" move the adapter's share of W out of the base weight. `device`: where
        to create them ("meta": to be assigned from a file); `autocast=False` keeps a half-precision base's
        dtype (peft's autocast_adapter_dtype)."""
        kind = self.lora_kind
        w = kind.weight(self)
        # Adapters train in fp32 on a half-precision base (peft's default): tiny tensors, stable updates.
        half = w.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if (half and autocast) or not w.is_floating_point() else w.dtype
        device = w.device if device is None else device
        a_shape, b_shape = kind.factor_shapes(self, r)
        A = torch.empty(a_shape, dtype=dtype, device=device)
        B = torch.empty(b_shape, dtype=dtype, device=device)
        if kind.moves_base_weights and isinstance(init, str) and init.startswith(("pissa", "olora")):
            niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
            with torch.no_grad():
                a, b, residual = (
                    qr_init(self._weight_oi(), r, scaling)
                    if init == "olora"
                    else svd_init(self._weight_oi(), r, scaling, niter)
                )
                A.copy_(a), B.copy_(b)
                kind.write_weight(self, kind.to_layout(self, residual).to(w.dtype))
        elif init is not None:
            kind.init_factors(A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_scaling[name] = scaling
        self.lora_dropout[name] = dropout
        if use_dora:  # the magnitude starts as ||W + s B A|| per output: the adapter starts as the identity
            with torch.no_grad():
                magnitude = (
                    torch.empty(self.out_features_, dtype=dtype, device=device)
                    if init is None
                    else weight_norm(self._weight_oi().float(), factor_product(A, B).float() * scaling)
                )
            self.lora_magnitude[name] = nn.Parameter(magnitude.to(dtype).reshape(kind.magnitude_shape(self)))
        self._refresh()

    def _weight_oi(self) -> torch.Tensor:
        """The base weight laid out (out, in), a view where the layout allows."""
        return self.lora_kind.weight_oi(self)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_B, self.lora_magnitude):
            if name in store:
                del store[name]
        self.lora_scaling.pop(name, None)
        self.lora_dropout.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)
        self._refresh()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = tuple(names)
        self._refresh()

    def rank(self, name: str) -> int:
        return self.lora_kind.rank(self, self.lora_A[name])

    def _refresh(self) -> None:
        """Recompute the adapters forward must add, once per state change instead of once per call."""
        if self.adapters_disabled:
            self._live = ()
        else:
            self._live = tuple(
                a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters
            )
        live = self._live
        # (a scaling held as a tensor, for hotswapping into a compiled model, takes the plain path: the fused
        # one scales by a Python number)
        one = live[0] if len(live) == 1 else None
        plain = one is None or one in self.lora_magnitude or isinstance(self.lora_scaling[one], torch.Tensor)
        self._fusable_adapter = None if plain else one

    # -- merging --

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update of adapter `name`, in at least fp32, laid out like the base weight."""
        return self.lora_kind.delta(self, self.lora_A[name], self.lora_B[name], self.lora_scaling[name])

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the base weight. Idempotent: an adapter already merged is skipped. `safe`
        checks the merged weight for NaN/inf before writing it."""
        for name in self.active_adapters if names is None else names:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            if problem := self.lora_kind.merge_problem(self):
                raise AdapterStateError(f"cannot merge adapter {name!r}: {problem}.")
            kind = self.lora_kind
            with torch.no_grad():
                before = kind.weight(self)  # (dequantised, for a quantised base)
                if name in self.lora_magnitude:
                    weight = self._merged_dora(name)
                else:
                    weight = merged_weight(before, self.delta_weight(name))
                if safe and not torch.isfinite(weight).all():
                    self._dora_norms.pop(name, None)
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN/inf into the weights; the adapter is broken "
                        "(check its training: learning rate, loss scaling)."
                    )
                kind.write_weight(self, weight)
                if kind.requantises:  # what the base stores is `weight` rounded: measure what that loses
                    self.merge_rounding[name] = rounding_share(kind.weight(self), weight, before)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Subtract merged adapters again, last merged first. A DoRA merge scales what was merged before
        it, so where one follows an adapter to unmerge, the adapters merged after that one are unmerged
        too and merged again (deleting a merged adapter must leave the others exactly as if merged alone)."""
        merged = self.merged_adapters
        todo = [n for n in merged if names is None or n in names]
        if todo:
            later = merged[merged.index(todo[0]) :]
            keep = [n for n in later if n not in todo]
            undo = later if keep and any(n in self.lora_magnitude for n in later) else todo
            for name in reversed(undo):
                self._unmerge_one(name)
            self.merge(keep if undo is later else [])
        self._refresh()

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            if name in self.lora_magnitude:
                self._unmerge_dora(name)
            else:
                kind = self.lora_kind
                kind.write_weight(self, merged_weight(kind.weight(self), self.delta_weight(name), sign=-1))
        self.merged_adapters.remove(name)

    def _unmerged_weight_oi(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in) with the merged adapters taken out again (a copy in `dtype`): the
        weight forward sees, which a DoRA norm must be taken from."""
        W = self._weight_oi().to(dtype, copy=True)
        for name in reversed(self.merged_adapters):
            delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False).to(
                dtype
            )
            if name in self.lora_magnitude:
                W.mul_(
                    (self._dora_norms[name].to(dtype) / self.lora_magnitude[name].to(dtype).reshape(-1)).view(
                        -1, 1
                    )
                )
            W.sub_(delta)
        return W

    def base_weight(self) -> torch.Tensor:
        """The base weight as the model has it without the merged adapters (itself if none are merged)."""
        kind = self.lora_kind
        weight = kind.weight(self)
        if not self.merged_adapters:
            return weight
        W = self._unmerged_weight_oi(torch.promote_types(weight.dtype, torch.float32))
        return kind.to_layout(self, W).to(weight.dtype)

    def _merged_dora(self, name: str) -> torch.Tensor:
        """m / ||W0 + delta|| * (W + delta), row-wise in (out, in) layout, with W0 the base weight without
        earlier merged adapters (as forward and peft take the norm), in the weight's layout; the norm is
        kept so that unmerging can divide it out again (it cannot be recomputed from the merged weight)."""
        W = self._weight_oi()
        delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False)
        wide = torch.promote_types(W.dtype, delta.dtype)
        base = self._unmerged_weight_oi(wide) if self.merged_adapters else W.to(wide)
        norm = weight_norm(base, delta.to(wide))
        self._dora_norms[name] = norm
        factor = (self.lora_magnitude[name].to(wide).reshape(-1) / norm).view(-1, 1)
        merged = (factor * (W.to(wide) + delta.to(wide))).to(W.dtype)
        return self.lora_kind.to_layout(self, merged)

    def _unmerge_dora(self, name: str) -> None:
        W = self._weight_oi()
        delta = delta_weight(self.lora_A[name], self.lora_B[name], self.lora_scaling[name], False)
        wide = torch.promote_types(W.dtype, delta.dtype)
        factor = (self.lora_magnitude[name].to(wide).reshape(-1) / self._dora_norms.pop(name)).view(-1, 1)
        kind = self.lora_kind
        kind.write_weight(self, kind.to_layout(self, (W.to(wide) / factor - delta.to(wide)).to(W.dtype)))

    # -- forward --

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._row_adapters is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        live = self._live
        if not live:
            return self._base_forward(x, *args, **kwargs)
        if self.lora_kind.wraps_forward:
            return self.lora_kind.lora_forward(self, x, *args, **kwargs)
        name = self._fusable_adapter
        if name is not None and self._fused:
            # getattr, as ParameterDict's [] does (FSDP may put plain tensors there), minus a call layer.
            w, b, A, B = self.weight, self.bias, getattr(self.lora_A, name), getattr(self.lora_B, name)
            autocast = torch.is_autocast_enabled(x.device.type)
            if fusable(autocast, x, w, b, A, B):
                return self._fused_forward(x, w, b, A, B, name, autocast)
        elif name is not None and self.lora_kind.fused_around and not args and not kwargs:
            A, B = getattr(self.lora_A, name), getattr(self.lora_B, name)
            if fusable_around(x, A, B) and self.lora_kind.fuses_around(self, x):
                p = self.lora_dropout[name] if self.training else 0.0
                grad = functools.partial(self.lora_kind.input_grad, self)
                return fused_around(x, A, B, self._base_forward, grad, self.lora_scaling[name], p)
        result = self._base_forward(x, *args, **kwargs)
        dtype = result.dtype
        for name in live:  # as peft: summed in the adapters' dtype (fp32), rounded once
            result = result + self._lora_update(result, x, name)
        return result.to(dtype)

    def _fused_forward(self, x, w, b, A, B, name: str, autocast: bool) -> torch.Tensor:
        s = self.lora_scaling[name]
        p = self.lora_dropout[name] if self.training else 0.0
        if autocast:
            device_type = x.device.type
            # What autocast does for F.linear, once for the base and the adapter together: cast the inputs
            # to the compute dtype (A and B through autograd, so their gradients come back in fp32), then
            # run with autocast off. peft instead upcasts x for dropout and lets autocast cast it back.
            dtype = torch.get_autocast_dtype(device_type)
            x, w, A, B = x.to(dtype), w.to(dtype), A.to(dtype), B.to(dtype)
            b = b.to(dtype) if b is not None else None
            with torch.autocast(device_type, enabled=False):
                return fused_lora(x, w, b, A, B, s, p, self.fan_in_fan_out)
        return fused_lora(x, w, b, A, B, s, p, self.fan_in_fan_out)

    def _lora_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` adds to `result` on the plain path (its kind's `lora_branch`: the reference
        computation, op for op as peft does it), in the adapter's dtype."""
        return self.lora_kind.lora_branch(self, result, x, name)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each batch row gets the adapter named for it (or none, for "__base__")."""
        if self.lora_kind.wraps_forward:
            raise AdapterStateError(
                f"{self.lora_kind.name} layers do not take mixed batches (adapter_names=...), as in peft: their "
                "adapters act on the weights for the whole batch; run one adapter per batch instead."
            )
        if self.merged_adapters:  # a merged adapter would be in every row, "__base__" ones included
            raise AdapterStateError(
                f"adapter(s) {self.merged_adapters} are merged into the weights; unmerge_adapter() before a "
                "mixed-batch forward (adapter_names=...)."
            )
        rows = rows_for_batch(self._row_adapters, x.shape[0])
        result = self._base_forward(x, *args, **kwargs)
        if self.adapters_disabled:
            return result
        for name in dict.fromkeys(rows):
            if name == BASE_ROWS or name not in self.lora_A:
                continue
            idx = [i for i, n in enumerate(rows) if n == name]
            result[idx] += self._lora_update(result[idx], x[idx], name).to(result.dtype)  # as peft
        return result

    def __reduce_ex__(self, protocol: int):
        if type(self) in _NAMED_CLASSES:
            return super().__reduce_ex__(protocol)
        # A class lora_layer_class generated for a Linear subclass cannot be found by name: rebuild it.
        class_for = functools.partial(lora_layer_class, kind=self.lora_kind)
        return (
            rebuild_swapped,
            (class_for, self._lora_base_class, self.lora_kind.reduce_state(self.__dict__.copy())),
        )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.rank(n)}" for n in self.lora_A)
        return f"{super().extra_repr()}, lora=[{adapters}]"


# The classes of the first three kinds, by name: pickles refer to them so. Other base classes get a
# class generated by `lora_layer_class`, which pickles through `rebuild_swapped`.
class LoRALinear(LoRALayer, nn.Linear):
    """An `nn.Linear` with LoRA adapters."""

    lora_kind = kind_of_class(nn.Linear)


class LoRAConv1D(LoRALayer, Conv1D):
    """GPT-2's `Conv1D` (a Linear with its weight stored (in, out)) with LoRA adapters."""

    lora_kind = kind_of_class(Conv1D)


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """An `nn.Embedding` with LoRA adapters (peft's `lora_embedding_A`/`_B`): A (r, num_embeddings),
    B (dim, r), the weight (num_embeddings, dim) laid out (in, out)."""

    lora_kind = kind_of_class(nn.Embedding)


_NAMED_CLASSES = (LoRALinear, LoRAConv1D, LoRAEmbedding)
_LAYER_CLASSES: dict[type | tuple[type, str], type[LoRALayer]] = {
    nn.Linear: LoRALinear,
    Conv1D: LoRAConv1D,
    nn.Embedding: LoRAEmbedding,
}


def lora_layer_class(base_cls: type[nn.Module], kind: BaseKind | None = None) -> type[LoRALayer]:
    """The LoRA class for a base class (of `kind`, by default the first kind its class matches); other
    subclasses of a kind's types (quantised layers and the like) get a generated subclass that keeps
    their own forward for the base projection."""
    kind = kind or kind_of_class(base_cls)
    if kind is None:
        raise TypeError(f"LoRA cannot wrap {base_cls.__name__}: no base kind (hf_lora.kinds) matches it.")
    # (a plain class whose instances are of another kind, e.g. an nn.Linear holding a torchao weight,
    # gets a class of its own for that kind)
    known = getattr(_LAYER_CLASSES.get(base_cls), "lora_kind", None)
    key = base_cls if known is None or type(known) is type(kind) else (base_cls, kind.name)
    if key not in _LAYER_CLASSES:
        _LAYER_CLASSES[key] = type(f"LoRA{base_cls.__name__}", (LoRALayer, base_cls), {"lora_kind": kind})
    return _LAYER_CLASSES[key]


def _rebuild_lora_layer(base_cls: type[nn.Module], state: dict[str, Any]) -> LoRALayer:
    """(What pickles made before rebuild_swapped() call.)"""
    return rebuild_swapped(lora_layer_class, base_cls, state)


def rebuild_swapped(class_for: Any, base_cls: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    """Unpickle (or deep-copy) a module whose class was swapped for one generated at run time, which
    cannot be found by name: `class_for(base_cls)` makes the class again (`lora_layer_class`, ...)."""
    obj = nn.Module.__new__(class_for(base_cls))
    obj.__dict__.update(state)
    return obj


class ModulesToSave(nn.Module):
    """A module trained and saved in full (e.g. a classification head): keeps the original and one
    trainable copy per adapter, and calls the active adapter's copy. Attribute names match peft's."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self._row_adapters: Sequence[str] | None = None

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def current(self) -> nn.Module:
        if self.adapters_disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self._row_adapters
        if rows is None or self.adapters_disabled:
            return self.current()(x, *args, **kwargs)
        rows = rows_for_batch(rows, x.shape[0])
        out = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name != BASE_ROWS and name in self.modules_to_save:
                idx = [i for i, n in enumerate(rows) if n == name]
                out[idx] = self.modules_to_save[name](x[idx], *args, **kwargs)
        return out

    def __getattr__(self, name: str) -> Any:
        # `weight`, `in_features`, ... of the module it stands for, so code that inspects heads still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "original_module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.current(), name)


def rows_for_batch(rows: Sequence[str], batch: int) -> Sequence[str]:
    """Adapter names per row; `generate` repeats each row k times for beams / several sequences."""
    if len(rows) == batch:
        return rows
    if rows and batch % len(rows) == 0:
        k = batch // len(rows)
        return [name for name in rows for _ in range(k)]
    raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows.")


def report_requantising(layers: Sequence[nn.Module], names: Sequence[str] | None) -> None:
    """After merging `names` (None: after unmerging) into layers whose base is quantised, say once what
    rounding the merged weights to the base's precision cost."""
    kinds = sorted(
        {
            layer.lora_kind.name
            for layer in layers
            if getattr(layer, "lora_kind", None) and layer.lora_kind.requantises
        }
    )
    if not kinds:
        return
    if names is None:
        logger.warning(
            "unmerged adapters from quantised weights (%s): the weights are requantised, so they are not exactly "
            "the original ones; reload the base model for those.",
            ", ".join(kinds),
        )
        return
    shares = [
        layer.merge_rounding[n]
        for layer in layers
        for n in names
        if n in getattr(layer, "merge_rounding", {})
    ]
    if shares:
        logger.warning(
            "merged adapter(s) %s into quantised weights (%s): requantising the merged weights loses %.0f%% of an "
            "adapter's update in the worst layer (%.0f%% in the median one; ||rounding|| / ||update||), so the "
            "merged model's outputs differ from the unmerged one's. For inference keep the adapter unmerged; for "
            "an exact merged model in full precision, call model.dequantize() first, then merge_and_unload().",
            list(names),
            ", ".join(kinds),
            100 * max(shares),
            100 * sorted(shares)[len(shares) // 2],
        )


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ROWS:
        raise ValueError(
            f"invalid adapter name {name!r}: use letters, digits, '_' or '-', starting with a letter or '_' "
            f"(no dots; {BASE_ROWS!r} is reserved)."
        )
    # Instances, not classes: `training`, `_parameters`, `_buffers`, ... are set in __init__.
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"invalid adapter name {name!r}: torch's ParameterDict/ModuleDict, which hold the adapters, have "
            f"an attribute of that name; choose another (e.g. {name.strip('_') + '_adapter'!r})."
        )


def make_lora_layer(module: nn.Module) -> LoRALayer:
    """Turn a module of a base kind (`hf_lora.kinds`) into a LoRA layer in place (no adapters yet).
    Idempotent."""
    if isinstance(module, LoRALayer):
        return module
    base_cls = type(module)
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"LoRA cannot wrap {base_cls.__name__}: no base kind (hf_lora.kinds) matches it.")
    module.__class__ = lora_layer_class(base_cls, kind)
    module.lora_A = nn.ParameterDict()
    module.lora_B = nn.ParameterDict()
    module.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
    module._dora_norms, module.merge_rounding = {}, {}
    module.lora_scaling, module.lora_dropout = {}, {}
    module.active_adapters, module.merged_adapters = (), []
    module.adapters_disabled = False
    module.fan_in_fan_out = kind.fan_in_fan_out
    module._row_adapters = None
    module._fused = kind.fused and base_cls in kind.types
    module._lora_base_class = base_cls
    module._refresh()
    return module


def unmake_lora_layer(module: LoRALayer) -> nn.Module:
    """Remove every adapter (without merging) and give the module its original class back."""
    kind = module.lora_kind
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        delattr(module, name)
    for name in (
        "lora_scaling",
        "lora_dropout",
        "active_adapters",
        "merged_adapters",
        "adapters_disabled",
        "fan_in_fan_out",
        "_row_adapters",
        "_fused",
        "_live",
        "_fusable_adapter",
        "_dora_norms",
        "merge_rounding",
        "lora_requantize_config",
    ):
        module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_lora_base_class")
    kind.detach(module)
    return module
