"""Parameters as LoRA targets (peft's `target_parameters`): the fused 3-D expert weights of MoE models
(transformers 5: `experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I); gpt-oss stores them
(E, in, out), `is_transposed`), or any 2-D weight (a router's `gate.weight`).

Each targeted parameter gets a `ParameterSlot`, a module without weights of its own that stands for it
(its LoRA layer), at `<owner>.lora_params.<parameter>`; rank/alpha patterns match `<owner>.<parameter>`, as
peft's. As in peft's `ParamWrapper`, A is (r * E, in) and B (out, r * E): expert e's update is
`s B[:, :, e] A[e]` with A viewed (E, r, in) and B (out, r, E). The owner's class is swapped for one whose
forward adds the updates: for the experts of transformers' MoE blocks, per routed token (x A_e^T) B_e^T,
low-rank matmuls grouped by expert (`routed_forward`); for any other owner, the weights W + delta for the
call (`swapped`), what peft computes. peft nests one wrapper per parameter, in the owner's parameter
order, so the last targeted parameter's keys are `<owner>.lora_A.weight`, the one before it's
`<owner>.base_layer.lora_A.weight`, and so on (`file_path`). As in peft, lora_dropout, DoRA, lora_bias,
fan_in_fan_out, PiSSA/OLoRA and mixed-adapter batches are refused.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PARAMETER_SLOTS
from ..errors import AdapterStateError, TargetModulesError
from ..weights import init_lora_
from .base import BaseKind
from .mha import swapped

try:  # transformers' grouped matmul over experts, with its fallbacks (what its grouped_mm experts use)
    from transformers.integrations.moe import _grouped_linear as grouped_linear
except ImportError:  # (older transformers: no fused experts either)
    grouped_linear = None


class ParameterSlot(nn.Module):
    """Stands for parameter `param_name` of its owner (not a child: the owner's tensors stay its own)."""

    def __init__(self, owner: nn.Module, param_name: str):
        super().__init__()
        self.__dict__["owner"] = owner
        self.param_name = param_name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.param_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.param_name} stands for a parameter of its owner, whose forward uses it.")

    def extra_repr(self) -> str:
        return f"parameter={self.param_name!r}, shape={tuple(self.weight.shape)}"


class ParameterSlots(nn.ModuleDict):
    """An owner's slots, by parameter name (`<owner>.lora_params`)."""


def layout(slot: nn.Module) -> tuple[int, int, int, bool]:
    """(experts, in, out, transposed) of the slot's parameter, as peft's ParamWrapper reads them: a 3-D
    parameter is (E, out, in), or (E, in, out) where its owner `is_transposed`; a 2-D one (out, in)."""
    shape = slot.weight.shape
    if len(shape) == 2:
        return 1, shape[1], shape[0], False
    transposed = bool(getattr(slot.owner, "is_transposed", False))
    return (shape[0], shape[1], shape[2], True) if transposed else (shape[0], shape[2], shape[1], False)


class ExpertsKind(BaseKind):
    name = "target_parameters"
    listed = False  # (targeted by target_parameters, never by module name)
    types = (ParameterSlot,)
    moves_base_weights = False

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        _, n_in, n_out, _ = layout(module)
        return n_in, n_out

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        experts, n_in, n_out, _ = layout(module)
        return (r * experts, n_in), (n_out, r * experts)

    def rank(self, module: nn.Module, A: torch.Tensor) -> int:
        return A.shape[0] // layout(module)[0]

    def attach(self, module: nn.Module, model: nn.Module) -> None:
        host(module.owner)

    def reduce_state(self, state: dict[str, Any]) -> dict[str, Any]:
        state.pop("owner", None)  # (its owner, rebuilt around it, points it back: `rebuild_host`)
        return state

    def detach(self, module: nn.Module) -> None:
        """The slot's last adapter is gone: remove it, and give the owner its class back after its last."""
        owner = module.owner
        slots = owner._modules[PARAMETER_SLOTS]
        del slots[module.param_name]
        if not slots:
            del owner._modules[PARAMETER_SLOTS]
            if isinstance(owner, ParameterHost):
                owner.__class__ = owner.__dict__.pop("_lora_host_base")

    def problem(self, module: nn.Module, r: int, config: Any) -> str | None:
        off = {
            "lora_dropout": config.lora_dropout,
            "use_dora": config.use_dora,
            "fan_in_fan_out": config.fan_in_fan_out,
        }
        if on := [f"{k}={v!r}" for k, v in off.items() if v]:
            return (
                f"{', '.join(on)} does not apply to a targeted parameter (peft's ParamWrapper refuses it too)"
            )
        if config.init_lora_weights not in (True, False, "gaussian"):
            return (
                f"init_lora_weights={config.init_lora_weights!r} does not apply to a targeted parameter here"
            )
        if module.weight.ndim not in (2, 3):
            return (
                f"its parameter is {module.weight.ndim}-D; only 2-D and 3-D (experts) parameters are adapted"
            )
        return None

    def file_path(self, path: str, module: nn.Module | None = None) -> str:
        owner_path = path.rsplit(".", 2)[0]
        if module is None:
            return owner_path
        order = [n for n, _ in module.owner.named_parameters(recurse=False)]
        later = [
            n
            for n in module.owner._modules[PARAMETER_SLOTS]
            if order.index(n) > order.index(module.param_name)
        ]
        return owner_path + ".base_layer" * len(later)

    def delta(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        experts, n_in, n_out, transposed = layout(module)
        wide = torch.promote_types(A.dtype, torch.float32)
        A, B = A.to(wide), B.to(wide)
        if module.weight.ndim == 2:
            return (B @ A) * scaling
        a = A.reshape(experts, -1, n_in)
        b = B.reshape(n_out, -1, experts)
        return torch.einsum("ore,eri->eio" if transposed else "ore,eri->eoi", b, a) * scaling

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        init_lora_(A, B, init)

    def lora_branch(self, layer: Any, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        raise RuntimeError("a targeted parameter's update is added by its owner's forward")


class ParameterHost(nn.Module):
    """Mixin for the class of a module owning targeted parameters: its forward adds their live adapters."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        slots = list(self._modules[PARAMETER_SLOTS].values())
        if any(getattr(s, "_row_adapters", None) is not None for s in slots):
            raise AdapterStateError(
                "parameters targeted with target_parameters do not take mixed batches (adapter_names=...), as in "
                "peft: their adapters act on the weights; run one adapter per batch instead."
            )
        live = {s.param_name: s for s in slots if getattr(s, "_live", ())}
        if not live:
            return super().forward(*args, **kwargs)
        if routable(self) and (len(args) + len(kwargs)) == 3:
            implementation = getattr(getattr(self, "config", None), "_experts_implementation", None)
            if implementation == "grouped_mm" and grouped_linear is not None:
                return grouped_forward(self, live, *args, **kwargs)
            if implementation in (None, "eager"):
                return routed_forward(self, live, *args, **kwargs)
        with ExitStack() as stack:
            for pname, slot in live.items():
                stack.enter_context(swapped(self, pname, updated(slot)))
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol: int):
        return (rebuild_host, (self._lora_host_base, self.__dict__.copy()))


_HOST_CLASSES: dict[type, type] = {}


def host_class(base_cls: type[nn.Module]) -> type[nn.Module]:
    if base_cls not in _HOST_CLASSES:
        _HOST_CLASSES[base_cls] = type(f"LoRAParams{base_cls.__name__}", (ParameterHost, base_cls), {})
    return _HOST_CLASSES[base_cls]


def host(owner: nn.Module) -> None:
    """Swap the owner's class for one whose forward adds its slots' adapters (idempotent)."""
    if not isinstance(owner, ParameterHost):
        base_cls = type(owner)
        owner.__class__ = host_class(base_cls)
        owner._lora_host_base = base_cls


def rebuild_host(base_cls: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    obj = nn.Module.__new__(host_class(base_cls))
    obj.__dict__.update(state)
    for slot in obj._modules[PARAMETER_SLOTS].values():
        slot.__dict__["owner"] = obj
    return obj


def updated(slot: Any) -> torch.Tensor:
    """The slot's parameter plus the updates of its live adapters, in the parameter's dtype (peft's)."""
    weight = slot.weight
    kind = slot.lora_kind
    for name in slot._live:
        delta = kind.delta(slot, slot.lora_A[name], slot.lora_B[name], slot.lora_scaling[name])
        weight = weight + delta.to(weight.dtype)
    return weight


def routable(owner: nn.Module) -> bool:
    """Whether `routed_forward` computes exactly what the owner's forward does: transformers' experts
    (`use_experts_implementation`: gate_up_proj, the gate, down_proj, optional biases) without extras."""
    params = owner._parameters
    return (
        hasattr(owner, "is_transposed")
        and getattr(owner, "has_gate", False)
        and not getattr(owner, "has_post_expert_norm", False)
        and getattr(owner, "is_concatenated", True) in (True, False)
        and all(getattr(params.get(n), "ndim", 0) == 3 for n in ("gate_up_proj", "down_proj"))
    )


def routed_forward(
    owner: Any,
    live: dict[str, Any],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' eager experts forward, with each LoRA update computed per routed token, (x A_e^T) B_e^T,
    grouped by expert: no (E, out, in) delta is built, forward or backward."""
    experts = owner.gate_up_proj.shape[0]
    bias = getattr(owner, "has_bias", False)
    factors = {pname: lora_factors(slot) for pname, slot in live.items()}
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]
        h = project(owner, "gate_up_proj", x, e, factors)
        if bias:
            h = h + owner.gate_up_proj_bias[e]
        h = owner._apply_gate(h)
        out = project(owner, "down_proj", h, e, factors)
        if bias:
            out = out + owner.down_proj_bias[e]
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def grouped_forward(
    owner: Any,
    live: dict[str, Any],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' grouped_mm experts forward (tokens sorted by expert, one grouped matmul per projection),
    with each LoRA update as two more grouped matmuls through the low-rank factors, (x A_e^T) B_e^T."""
    experts, top_k = owner.gate_up_proj.shape[0], top_k_index.size(-1)
    tokens, hidden = hidden_states.shape
    bias = getattr(owner, "has_bias", False)
    factors = {pname: lora_factors(slot) for pname, slot in live.items()}
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // top_k]
    offsets = torch.cumsum(torch.bincount(expert_ids, minlength=experts), dim=0, dtype=torch.int32)

    def project(pname: str, x: torch.Tensor) -> torch.Tensor:
        b = getattr(owner, f"{pname}_bias")[expert_ids] if bias else None
        y = grouped_linear(x, getattr(owner, pname), offsets, bias=b, is_transposed=owner.is_transposed)
        for A, B, s in factors.get(pname, ()):
            # grouped_mm wants rows of 16 bytes: zero ranks pad r (they add exact zeros)
            pad = -A.shape[1] % (16 // A.element_size())
            A, B = (
                F.pad(A, (0, 0, 0, pad)).contiguous(),
                F.pad(B, (0, pad)).contiguous(),
            )  # (E, r', in), (E, out, r')
            low = grouped_linear(x.to(A.dtype), A, offsets)  # (S, r')
            y = y + (grouped_linear(low, B, offsets) * s).to(y.dtype)
        return y

    out = project("down_proj", owner._apply_gate(project("gate_up_proj", x)))
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return out[inverse].view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def lora_factors(slot: Any) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per live adapter: A viewed (E, r, in), B viewed (E, out, r), the scaling."""
    experts, n_in, n_out, _ = layout(slot)
    out = []
    for name in slot._live:
        A, B = slot.lora_A[name], slot.lora_B[name]
        out.append(
            (A.view(experts, -1, n_in), B.view(n_out, -1, experts).permute(2, 0, 1), slot.lora_scaling[name])
        )
    return out


def project(
    owner: Any, pname: str, x: torch.Tensor, e: torch.Tensor, factors: dict[str, Any]
) -> torch.Tensor:
    """Expert e's projection `pname` of its tokens x, plus the live adapters' s (x A_e^T) B_e^T."""
    w = getattr(owner, pname)[e]
    y = x @ w if owner.is_transposed else F.linear(x, w)
    for A, B, s in factors.get(pname, ()):
        a, b = A[e], B[e]
        y = y + (F.linear(F.linear(x.to(a.dtype), a), b) * s).to(y.dtype)
    return y


def parameter_targets(model: nn.Module, names: list[str], skip: Any) -> list[str]:
    """Slot paths for the parameters `names` match as peft matches them (`<module>.<param>` equal to a
    name or ending with `.<name>`), creating missing slots (which hold nothing and change nothing until
    they get an adapter); inert slots of earlier calls that nothing targets now are removed. `skip(path,
    module)` says which modules are not candidates (LoRA layers, modules saved in full)."""
    found: list[str] = []
    adapted = sorted(
        p for p, m in model.named_modules() if isinstance(m, ParameterSlot) and hasattr(m, "lora_A")
    )
    owners = [(p, m) for p, m in model.named_modules() if not isinstance(m, (ParameterSlot, ParameterSlots))]
    for path, module in owners:
        slots = module._modules.get(PARAMETER_SLOTS)
        hits = [
            pname
            for pname, _ in module.named_parameters(recurse=False)
            if any(f"{path}.{pname}" == n or f"{path}.{pname}".endswith(f".{n}") for n in names)
        ]
        if hits and skip(path, module):
            raise TargetModulesError(
                f"target_parameters matches {path}.{hits[0]}, a parameter of a module that is already adapted or "
                "saved in full; leave it out of target_modules/modules_to_save or of target_parameters."
            )
        if slots is not None:  # inert slots that nothing targets now: gone
            for pname in [n for n, s in slots.items() if n not in hits and not hasattr(s, "lora_A")]:
                del slots[pname]
        if not hits:
            if slots is not None and not slots:
                del module._modules[PARAMETER_SLOTS]
            continue
        if slots is None:
            slots = module._modules[PARAMETER_SLOTS] = ParameterSlots()
        for pname in hits:
            if pname not in slots:
                slots[pname] = ParameterSlot(module, pname)
            found.append(f"{path}.{PARAMETER_SLOTS}.{pname}")
    if adapted and sorted(found) != adapted:
        raise TargetModulesError(
            f"target_parameters={names!r} matches {len(found)} parameters, but the model's other adapters target "
            f"{len(adapted)} others (e.g. {adapted[0].replace('.' + PARAMETER_SLOTS, '')}): all adapters that use "
            "target_parameters must target the same parameters, as in peft. Use the same target_parameters."
        )
    if not found:
        raise TargetModulesError(
            f"target_parameters={names!r} matches no parameter of {type(model).__name__} (names are matched as "
            "'<module path>.<parameter>' or a dotted suffix of it, e.g. 'experts.gate_up_proj')."
        )
    return found


def prune_slots(model: nn.Module) -> None:
    """Remove the slots that carry no adapter (made for targets that were then refused)."""
    for module in list(model.modules()):
        slots = module._modules.get(PARAMETER_SLOTS)
        if isinstance(slots, ParameterSlots):
            for pname in [n for n, s in slots.items() if not hasattr(s, "lora_A")]:
                del slots[pname]
            if not slots:
                del module._modules[PARAMETER_SLOTS]
