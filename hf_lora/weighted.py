"""`add_weighted_adapter`: a new adapter combining existing ones, by every combination type of peft's (cat,
svd, linear, TIES, DARE, magnitude pruning and their SVD forms). Bound as a `LoRAModel` method in
`hf_lora/__init__.py`; the maths is in `hf_lora.task_merge`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import AdapterStateError
from .layers import check_adapter_name
from .model import LoRAModel, inject
from .task_merge import (
    DELTA_TYPES,
    FACTOR_TYPES,
    cat_factors,
    check_merge_options,
    merge_factors,
    merge_tensors,
    svd_factors,
)


def add_weighted_adapter(
    model: LoRAModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """A new adapter (inactive, frozen) that combines existing ones, with peft's arguments and semantics.

    "cat" is exact, `sum_i weights[i] * delta_i` at the sum of the ranks; "svd" its best approximation at
    `svd_rank` (default: the largest rank), and "ties_svd", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune_svd" that of the updates merged so; "linear", "ties", "dare_linear", "dare_ties",
    "magnitude_prune" merge the factors themselves (same ranks only; approximate). `density` is the fraction
    of entries each adapter keeps (pruning types); `majority_sign_method` elects TIES's sign ("total" or
    "frequency"); `svd_clamp` a quantile to clip the factors at. Weights may be negative. DARE drops at
    random: from the global RNG as peft, or reproducibly from generators seeded with `seed`. Modules saved
    in full are taken from the one adapter that has them. All or nothing: on any error no adapter is added.
    """
    check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise AdapterStateError(f"an adapter named {adapter_name!r} exists already.")
    if unknown := [n for n in adapters if n not in model.peft_config]:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {model.adapters}.")
    check_merge_options(combination_type, density, majority_sign_method)
    check_combinable(model, adapters)
    if len(weights) != len(adapters) or not adapters:
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    layers = [(p, layer) for p, layer in model.lora_layers() if any(a in layer.lora_A for a in adapters)]
    ranks = {a: max(layer.rank(a) for _, layer in layers if a in layer.lora_A) for a in adapters}
    how = "linear" if len(adapters) == 1 else combination_type  # as peft
    if how in FACTOR_TYPES and len(set(ranks.values())) > 1:
        raise ValueError(
            f"combination_type={how!r} merges the factors and needs adapters of one rank, got {ranks}; use 'cat' "
            "or one of the SVD types ('svd', 'ties_svd', ...)."
        )
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int (the combined adapter's rank), got {svd_rank!r}.")
    rank = sum(ranks.values()) if how == "cat" else max(ranks.values())
    if how in DELTA_TYPES and svd_rank is not None:
        rank = svd_rank
    saved = saved_module_owners(model, adapters)

    first = model.peft_config[adapters[0]]
    config = first.replace(
        r=rank,
        lora_alpha=rank,  # scaling 1: the weights and scalings are folded into the factors
        use_rslora=False,  # (which rsLoRA's rank / sqrt(rank) would not be)
        init_lora_weights=True,  # A and B are set below; PiSSA/OLoRA would move base weights again
        target_modules=sorted(p for p, _ in layers),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=sorted({m for a in adapters for m in model.peft_config[a].modules_to_save or []})
        or None,
    )
    inject(model, adapter_name, config, [p for p, _ in layers], list(saved), initialise=False)
    options = dict(density=density, majority_sign_method=majority_sign_method)
    generators: dict[torch.device, torch.Generator] = {}
    try:
        with torch.no_grad():
            for _, layer in layers:
                present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
                if how.startswith("dare") and seed is not None:
                    device = layer.lora_A[present[0][0]].device
                    if device not in generators:
                        generators[device] = torch.Generator(device=device).manual_seed(seed)
                    options["generator"] = generators[device]
                # (a convolution's factors are combined flattened, (r, in * k) and (out, r), and reshaped back)
                parts = [
                    (layer.lora_A[a].flatten(1), layer.lora_B[a].flatten(1), layer.lora_scaling[a])
                    for a, _ in present
                ]
                ws = [w for _, w in present]
                if how == "cat":
                    A, B = cat_factors(parts, ws, rank)
                elif how in FACTOR_TYPES:
                    A, B = merge_factors(how, parts, ws, rank, **options)
                else:  # merged in the module's layout (where DARE draws, as peft), factorised (out, in)
                    delta = merge_tensors(how, [layer.delta_weight(a) for a, _ in present], ws, **options)
                    delta = layer.lora_kind.as_oi(layer, delta)
                    A, B = svd_factors(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
                layer.lora_A[adapter_name].copy_(A.reshape(layer.lora_A[adapter_name].shape))
                layer.lora_B[adapter_name].copy_(B.reshape(layer.lora_B[adapter_name].shape))
            for path, owner in saved.items():
                wrapper = model.get_submodule(path)
                wrapper.modules_to_save[adapter_name].load_state_dict(
                    wrapper.modules_to_save[owner].state_dict()
                )
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    model.refresh_adapters()


def check_combinable(model: LoRAModel, adapters: Sequence[str]) -> None:
    """Adapters whose parts do not add up (DoRA's magnitudes, base biases, token rows) are refused."""
    if dora := [a for a in adapters if model.peft_config[a].use_dora]:
        raise ValueError(f"DoRA adapters {dora} cannot be combined: their magnitudes do not add up.")
    if biased := [a for a in adapters if model.peft_config[a].bias != "none"]:
        raise ValueError(
            f"adapter(s) {biased} train the base model's biases (bias != 'none'), which a combination cannot "
            "hold (only one adapter may train them, and they are not LoRA factors); combine adapters with "
            "bias='none'."
        )
    if tokens := [a for a in adapters if model.peft_config[a].trainable_token_indices is not None]:
        raise ValueError(
            f"adapter(s) {tokens} train token rows (trainable_token_indices), which are the rows themselves, "
            "not updates that add up; combine adapters without them."
        )


def saved_module_owners(model: LoRAModel, adapters: Sequence[str]) -> dict[str, str]:
    """Each module saved in full by one of `adapters` -> that adapter (two owning one are refused)."""
    saved = {}
    for path, wrapper in model.saved_modules():
        owners = [a for a in adapters if a in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(
                f"adapters {owners} each train their own {path!r}; such copies cannot be combined."
            )
        if owners:
            saved[path] = owners[0]
    return saved
