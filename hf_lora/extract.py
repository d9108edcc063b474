"""LoRA extraction: turn a full fine-tune into an adapter, by a truncated SVD of each weight update.

For every targeted Linear/Conv1D, `W_ft - W_base` is factorised as B @ A at rank r (the best rank-r
approximation, by Eckart-Young), with the singular values split evenly between the factors so that the
adapter trains on well. The share of each update's energy (squared Frobenius norm) the adapter keeps is
reported per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .errors import TargetModulesError
from .model import DEFAULT_ADAPTER, LoRAModel, get_lora_model
from .targets import linear_modules, resolve_targets

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    path: str
    rank: int  # numerical rank of the update
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
    copied whole from the fine-tune (e.g. a retrained head). Changed parameters the adapter cannot hold
    (norms, embeddings, ...) are named in a warning.
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
    changed = {k for k, p in base_params.items() if not torch.equal(p, ft_params[k])}
    if target_modules is None:
        target_modules = sorted(path for path, _ in linear_modules(base_model) if f"{path}.weight" in changed)
        if not target_modules:
            raise TargetModulesError(
                "no Linear/Conv1D weight differs between the two models: nothing to extract."
            )
    config = LoRAConfig(r=r, lora_alpha=r, target_modules=target_modules, modules_to_save=modules_to_save)
    targets = resolve_targets(base_model, config)

    factors, report = {}, []
    for path in targets:
        module = base_model.get_submodule(path)
        conv1d = not isinstance(module, nn.Linear)
        delta = (ft_params[f"{path}.weight"].detach() - module.weight.detach()).double()
        delta = delta.T if conv1d else delta  # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)
        B = nn.functional.pad(B, (0, r - B.shape[1]))
        A = nn.functional.pad(A, (0, 0, 0, r - A.shape[0]))
        total = float((S**2).sum())
        kept = float((S[:r] ** 2).sum())
        report.append(
            LayerReport(
                path=path,
                rank=int((S.max() * 1e-12 < S).sum()) if S.numel() else 0,
                energy_kept=kept / total if total else 1.0,
                error=max(total - kept, 0.0) ** 0.5,
            )
        )
        factors[path] = (A, B)

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
    if missed := sorted(changed - covered):
        logger.warning(
            "the fine-tune also changed %d parameters the adapter does not hold (e.g. %s); add their modules to "
            "target_modules or modules_to_save to keep them.",
            len(missed),
            ", ".join(missed[:4]),
        )
    for row in report:
        logger.info(
            "%s: rank %d update, %.2f%% of its energy kept at r=%d",
            row.path,
            row.rank,
            100 * row.energy_kept,
            r,
        )
    return (model, report) if return_report else model
