"""`BaseKind`: everything LoRA needs to know about one kind of base module (see docs/ARCHITECTURE.md).

A kind is a small stateless object. The LoRA layer (`hf_lora.layers.LoRALayer`), the target rules, the
file keys and the load checks ask it, never the module's class, so a new kind of base (a quantised
Linear, a convolution, ...) is one new file here plus one line in `KINDS` (`hf_lora/kinds/__init__.py`).

Layouts: A is (r, in) and B (out, r) unless `factor_shapes` says otherwise; "oi" is a dense weight
laid out (out, in); "the weight's layout" is how the module stores it (Conv1D and Embedding: (in, out)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..weights import delta_weight


class BaseKind:
    """Subclass this (or a kind close to yours: `LinearKind`) and override what differs."""

    name: str = "base"  # for messages: "nn.Linear"
    listed: bool = True  # named in messages among the modules LoRA can wrap
    types: tuple[type[nn.Module], ...] = ()  # base classes it wraps (subclasses too, unless `fused`)
    all_linear: bool = False  # taken by target_modules="all-linear"
    fan_in_fan_out: bool = False  # the module stores its weight (in, out)
    saved_fan_in_fan_out: bool = False  # an adapter on it is written with "fan_in_fan_out": true (peft's)
    fused: bool = False  # `hf_lora.fused` may run the forward of exactly `types` (x @ W.T + b)
    fused_around: bool = False  # `hf_lora.fused` may run the base's own forward with an adapter around it
    moves_base_weights: bool = True  # PiSSA/OLoRA apply (else they init as init_factors says, as peft)
    requantises: bool = False  # write_weight rounds (a quantised base): merges are measured, see layers
    lookup: bool = False  # the factors are looked up, not multiplied (LoRA+ gives them their own lr)
    file_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")  # peft's names of A and B under `<path>.`

    # -- which modules, and their shapes --

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    def matches_class(self, cls: type) -> bool:
        """For classes rebuilt without an instance (unpickling)."""
        return issubclass(cls, self.types)

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the update."""
        raise NotImplementedError

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B (also in the adapter file)."""
        n_in, n_out = self.shapes(module)
        return (r, n_in), (n_out, r)

    def attach(self, module: nn.Module, model: nn.Module) -> None:
        """Called once a module of this kind becomes a LoRA layer of `model`: keep what the kind needs from
        the model (a quantisation config to requantise merged weights with)."""

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        """Shape of a DoRA magnitude (also in the adapter file): (out,), peft's for this kind."""
        return (self.shapes(module)[1],)

    def problem(self, module: nn.Module, r: int, config: Any) -> str | None:
        """Why an adapter of rank `r` (and the rest of `config`, a LoRAConfig) cannot go on this module, or
        None."""
        return None

    companions: tuple[str, ...] = ()  # child modules adapted with it (nn.MultiheadAttention's out_proj)
    wraps_forward: bool = False  # the adapters act through `lora_forward`, not base output + `lora_branch`

    def file_path(self, path: str, module: nn.Module | None = None) -> str:
        """The module's path in peft's file keys (`<file_path>.<file_keys>`): its own, unless peft nests it."""
        return path

    def reduce_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """What a LoRA layer of this kind pickles (and deep-copies) of its `__dict__`."""
        return state

    def detach(self, module: nn.Module) -> None:
        """Called once a module of this kind has given its class back (its last adapter is gone)."""

    def lora_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The whole forward with the live adapters, for a kind that `wraps_forward`."""
        raise NotImplementedError

    def merge_problem(self, module: nn.Module) -> str | None:
        """Why an adapter on this module cannot be merged into its weight, or None."""
        return None

    # -- its weight --

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense base weight in the module's layout (dequantised where the base is quantised)."""
        return module.weight

    def write_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Store a dense weight in the module's layout (merging, unmerging, PiSSA's residual)."""
        module.weight.copy_(weight)

    def as_oi(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor laid out (out, in) (a view where it can be)."""
        return weight.T if self.fan_in_fan_out else weight

    def to_layout(self, module: nn.Module, weight_oi: torch.Tensor) -> torch.Tensor:
        """An (out, in) tensor in the module's weight layout: the inverse of `as_oi`."""
        return weight_oi.T if self.fan_in_fan_out else weight_oi

    def weight_oi(self, module: nn.Module) -> torch.Tensor:
        """The dense base weight laid out (out, in), a view where the layout allows."""
        return self.as_oi(module, self.weight(module))

    # -- the adapter --

    def rank(self, module: nn.Module, A: torch.Tensor) -> int:
        """The rank of an adapter whose A is `A`."""
        return A.shape[0]

    def delta(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """The dense update s B A in the module's weight layout, in at least fp32."""
        return self.to_layout(module, delta_weight(A, B, scaling, False))

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        """Initialise A and B (in place) for `init_lora_weights` (PiSSA/OLoRA are done by the layer when
        `moves_base_weights`)."""
        raise NotImplementedError

    def lora_branch(self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` of `layer` adds to the base output `result` on the plain path (the reference
        computation, op for op as peft does it), in the adapter's dtype. The fused path, where `fused`
        allows, replaces base + branch for one adapter."""
        raise NotImplementedError

    def fuses_around(self, layer: Any, x: torch.Tensor) -> bool:
        """For a kind that is `fused_around`: whether this call may take `hf_lora.fused.fused_around` (the
        base's own forward, then the adapter's update added into its output) rather than the plain path
        (`fused.fusable_around` has checked the tensors' types and dtypes)."""
        return False

    def input_grad(self, layer: Any, grad_out: torch.Tensor) -> torch.Tensor:
        """For a kind that is `fused_around`: the base's gradient w.r.t. its input, grad_out (N, out) @ W,
        computed as the base module's own backward computes it. (N, in)."""
        raise NotImplementedError
