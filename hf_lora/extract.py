"""LoRA extraction: turn a full fine-tune into an adapter, by a truncated SVD of each weight update.

For every targeted Linear/Conv1D, `W_ft - W_base` is factorised as B @ A at rank r (the best rank-r
approximation, by Eckart-Young), with the singular values split evenly between the factors so that the
adapter trains on well. The share of each update's energy (squared Frobenius norm) the adapter keeps is
reported per layer.

Base and fine-tune are compared at the lower of their two precisions (a bf16 fine-tune of an fp32 base): the
rounding between dtypes is not an update, and would otherwise make every weight count as changed and every
update full rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .errors import TargetModulesError, few
from .kinds import kind_of
from .model import DEFAULT_ADAPTER, LoRAModel, get_lora_model
from .targets import (
    in_modules_to_save,
    linear_modules,
    lora_modules,
    resolve_targets,
    shared_parameters,
)

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    path: str
    rank: int  # numerical rank of the update: singular values above the weights' rounding noise
    energy_kept: float  # fraction of ||delta||_F^2 the rank-r factors hold
    error: float  # ||delta - B @ A||_F


def extract_lora(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    r: int,
    *,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    return_report: bool = False,
) -> LoRAModel | tuple[LoRAModel, list[LayerReport]]:
    """Make `base_model` (in place) a LoRAModel whose adapter reproduces `finetuned_model`'s weight updates.

    `target_modules=None` takes every Linear/Conv1D whose weight changed. Modules in `modules_to_save` are
    copied whole from the fine-tune (e.g. a retrained head). Changed parameters the adapter does not hold
    (norms, embeddings that are not targets, ...) are named in a warning, with the target_modules or
    modules_to_save that would keep them; that includes an output head tied to a changed input embedding
    (GPT-2's lm_head and wte).
    """
    ft_params = dict(finetuned_model.named_parameters())
    base_params = dict(base_model.named_parameters())
    if ft_params.keys() != base_params.keys() or any(
        ft_params[k].shape != p.shape for k, p in base_params.items()
    ):
        raise TargetModulesError(
            "the fine-tuned model's parameters do not match the base model's (names or shapes): extraction "
            "needs the same architecture and size."
        )
    changed = {k for k, p in base_params.items() if not torch.equal(*_common_precision(p, ft_params[k]))}
    # A parameter shared by several modules (GPT-2's lm_head.weight is transformer.wte.weight) is listed
    # once by named_parameters(); every module that uses it must carry the change.
    aliases = shared_parameters(base_model)
    shared = {k: aliases[id(p)] for k, p in base_params.items() if id(p) in aliases}
    linear_paths = {path for path, _ in linear_modules(base_model)}
    if target_modules is None:
        target_modules = _changed_linears(linear_paths, changed, modules_to_save)
    wrappable = {path for path, _ in lora_modules(base_model)}
    config = LoRAConfig(r=r, lora_alpha=r, target_modules=target_modules, modules_to_save=modules_to_save)
    targets = resolve_targets(base_model, config)
    _check_rank_fits(base_model, targets, r)

    factors, report = {}, []
    for path in targets:
        module = base_model.get_submodule(path)
        kind = kind_of(module)
        ft_weight, base_weight = _common_precision(
            finetuned_model.get_parameter(f"{path}.weight").detach(), module.weight.detach()
        )
        delta = ft_weight.double() - base_weight.double()  # (exact: the difference of two stored values)
        delta = kind.as_oi(module, delta)  # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        # Below this a singular value is rounding noise of the stored weights, not part of the update: the
        # spectral norm of a matrix of independent errors of up to eps * |W| (matrix_rank's S.max * max(m, n)
        # * eps would exceed S.max itself for wide bf16 layers, reporting rank 0).
        scale = max(ft_weight.abs().max().item(), base_weight.abs().max().item())
        tol = torch.finfo(ft_weight.dtype).eps * sum(n**0.5 for n in delta.shape) * scale
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)
        B = nn.functional.pad(B, (0, r - B.shape[1]))
        A = nn.functional.pad(A, (0, 0, 0, r - A.shape[0]))
        total = float((S**2).sum())
        kept = float((S[:r] ** 2).sum())
        report.append(
            LayerReport(
                path=path,
                rank=int((tol < S).sum()),
                energy_kept=kept / total if total else 1.0,
                error=max(total - kept, 0.0) ** 0.5,
            )
        )
        a_shape, b_shape = kind.factor_shapes(module, r)
        if A.numel() != math.prod(a_shape) or B.numel() != math.prod(b_shape):
            raise ValueError(
                f"cannot extract an adapter for {path} ({kind.name}): LoRA on it has factors {a_shape} and "
                f"{b_shape}, which a dense update of shape {tuple(delta.shape)} does not factor into (a grouped "
                "convolution); leave it out of target_modules."
            )
        factors[path] = (A.reshape(a_shape), B.reshape(b_shape))  # (a convolution's kernel unflattened)

    covered = {f"{p}.weight" for p in targets}
    model = get_lora_model(base_model, config, adapter_name)
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layer = model.get_submodule(path)
            layer.lora_A[adapter_name].copy_(A.to(layer.lora_A[adapter_name].dtype))
            layer.lora_B[adapter_name].copy_(B.to(layer.lora_B[adapter_name].dtype))
        for path, wrapper in model.saved_modules():
            copy = wrapper.modules_to_save[adapter_name]
            trained = finetuned_model.get_submodule(path)  # (a tied lm_head is not in ft_params)
            for name, p in copy.named_parameters():
                p.copy_(trained.get_parameter(name))
                covered.add(f"{path}.{name}")
    if missed := sorted({name for k in changed for name in shared.get(k, [k])} - covered):
        _warn_missed(missed, wrappable, shared)
    for row in report:
        logger.info(
            "%s: rank %d update, %.2f%% of its energy kept at r=%d",
            row.path,
            row.rank,
            100 * row.energy_kept,
            r,
        )
    return (model, report) if return_report else model


def _changed_linears(
    linear_paths: set[str], changed: set[str], modules_to_save: list[str] | None
) -> list[str]:
    """The default targets: every Linear/Conv1D whose weight changed, but those saved in full (a module is
    either a LoRA layer or a copy, and `modules_to_save` says which)."""
    updated = sorted(path for path in linear_paths if f"{path}.weight" in changed)
    if not updated:
        raise TargetModulesError(
            "no Linear/Conv1D weight differs between the two models: nothing to extract."
        )
    targets = [path for path in updated if not in_modules_to_save(path, modules_to_save)]
    if not targets:
        raise TargetModulesError(
            f"every Linear/Conv1D whose weight changed ({few(updated)}) is in modules_to_save={modules_to_save!r}, "
            "which copies it whole: none is left for LoRA to extract. Leave some of them out of modules_to_save."
        )
    return targets


def _common_precision(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors in the less precise of their two floating dtypes (bf16 beside fp32: bf16), so that
    comparing them sees updates, not the rounding between dtypes."""
    if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return a, b
    low = max(a.dtype, b.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    return a.to(low), b.to(low)


def _warn_missed(missed: list[str], wrappable: set[str], shared: dict[str, list[str]]) -> None:
    """Name the changed parameters the adapter leaves out, and what would keep them. LoRA holds the weights
    of Linear/Conv1D/Embedding modules: an untargeted one can be targeted; anything else (biases, norms) is
    kept only by saving its whole module (modules_to_save). So is a weight that another module shares (a
    tied output head): a LoRA update of one module would leave the other at the base."""
    tied = {name for names in shared.values() for name in names}
    owners = {name: name.rsplit(".", 1)[0] for name in missed}
    tied_owners = {owners[name] for name in missed if name in tied}
    whole = {m for name, m in owners.items() if m not in wrappable or not name.endswith(".weight")}
    whole = sorted(whole | tied_owners, key=lambda m: (m not in tied_owners, m))  # a cut list keeps them
    targetable = sorted({m for m in owners.values() if m not in whole})
    advice = []
    if targetable:
        advice.append(f"add {few(targetable)} to target_modules")
    if whole:
        advice.append(f"save {few(whole)} in full with modules_to_save (LoRA holds no biases or norms)")
    notes = [
        f" {' and '.join(names)} are one tied parameter: save every module that uses it, or those left out "
        "keep the base model's values."
        for names in shared.values()
        if any(name in missed for name in names)
    ]
    logger.warning(
        "the fine-tune also changed %d parameters the adapter does not hold (e.g. %s): they keep the base "
        "model's values. To carry them, %s.%s",
        len(missed),
        ", ".join(missed[:4]),
        " and ".join(advice),
        "".join(notes),
    )


def _check_rank_fits(model: nn.Module, targets: list[str], r: int) -> None:
    """An update of an (out, in) layer has rank at most min(out, in); a larger r only pads the adapter with
    zeros. Where no target can use r (a file many times the size, for nothing) it is refused before the
    model is touched; where some cannot (one r for layers of several sizes) they are logged."""
    ranks = {}
    for path in targets:
        module = model.get_submodule(path)
        ranks[path] = min(kind_of(module).as_oi(module, module.weight.detach()).shape)
    if ranks and r > max(ranks.values()):
        raise ValueError(
            f"r={r} is larger than the rank an update of any target layer can have (at most "
            f"{max(ranks.values())}: the smaller of a layer's dimensions); the adapter would only be padded "
            f"with zeros. Give r <= {max(ranks.values())}."
        )
    if padded := sorted(p for p, n in ranks.items() if n < r):
        logger.info(
            "r=%d exceeds the rank %d layers can have (%s: %d); their factors are padded with zeros",
            r,
            len(padded),
            padded[0],
            ranks[padded[0]],
        )
