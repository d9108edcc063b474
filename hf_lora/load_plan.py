"""Planning a load: which modules an adapter's config adapts in this model, and whether the file's
tensors fit them (keys, shapes, base weights under merged adapters), all before the model is touched.
peft's files may hold more than its config names (modules matched by plain suffix, wrapper tensors,
base-layer tensors): what peft loads is loaded, what it ignores is ignored."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_files import (
    PREFIX,
    base_layer_key,
    embedding_paths,
    normalise_key,
    wrapper_bias_keys,
)
from .config import LoRAConfig
from .errors import AdapterFormatError, TargetModulesError, few
from .kinds import kind_of
from .layers import LoRALayer
from .model import DEFAULT_ADAPTER
from .reading import AdapterFiles
from .targets import (
    TokenTarget,
    base_modules,
    resolve_modules_to_save,
    resolve_targets,
    resolve_token_targets,
)
from .tokens import TOKENS_KEY, TokenRowsLayer

logger = logging.getLogger(__name__)


# Tensors that are floating point in any model (a saved module's buffers may be integers).
_FLOAT_LEAVES = (
    "weight",
    "bias",
    "lora_magnitude_vector",
    "lora_embedding_A",
    "lora_embedding_B",
    TOKENS_KEY,
)


@dataclass
class LoadPlan:
    config: LoRAConfig
    targets: list[str]
    saved: list[str]


def plan_load(model: nn.Module, config: LoRAConfig, files: AdapterFiles) -> LoadPlan:
    """Check the file's tensors against what `config` would create in `model`, before touching it."""
    keys = {normalise_key(k): k for k in files.tensors}
    try:
        targets = resolve_targets(model, config, strict_patterns=False)
    except ValueError as e:
        raise AdapterFormatError(f"adapter {files.source} does not fit this model: {e}") from None
    saved = _resolve_saved_leniently(model, config, files.source)
    try:
        tokens = resolve_token_targets(model, config, targets)
    except ValueError as e:
        raise AdapterFormatError(f"adapter {files.source} does not fit this model: {e}") from None
    modules = dict(base_modules(model))
    embeddings = embedding_paths(model)
    keys = _without_foreign_base_layer_keys(keys, modules, targets, tokens, files.source)
    keys = _without_other_wrappers_keys(model, keys, saved, files.source, config.bias == "all")

    # peft matches modules_to_save by plain suffix and may have saved more modules than the config's
    # names select on a dot boundary (DistilBERT's pre_classifier for "classifier"): load what was saved.
    # Such tensors equal to the model's own are the copies we write for peft (`peft_only_saved_modules`).
    expected = _expected_shapes(modules, config, targets, saved, embeddings, tokens)
    copies: set[str] = set()
    extra = sorted(set(keys) - set(expected))
    own = model.state_dict() if extra else {}
    for key in extra:
        path = key.removeprefix(PREFIX).rpartition(".")[0]
        if key in copies:
            continue
        if path in modules and path not in targets and not _inside(path, saved) and not key.endswith(".bias"):
            of_path = [k for k in keys if k.rpartition(".")[0] == f"{PREFIX}{path}"]
            if unchanged_base_tensors(own, files, [keys[k] for k in of_path]):
                copies.update(of_path)
                continue
            saved.append(path)
            logger.info(
                "%s: loading %s as a module saved in full (it is in the adapter file)", files.source, path
            )
    keys = {k: v for k, v in keys.items() if k not in copies}
    expected = _expected_shapes(modules, config, targets, saved, embeddings, tokens)

    problems = []
    missing = [k for k, (_, required) in expected.items() if required and k not in keys]
    unexpected = sorted(set(keys) - set(expected))
    if missing:
        problems.append(f"missing tensors: {few(missing, 4)}")
    if unexpected:
        made_for = files.raw_config.get("base_model_name_or_path") or (
            (files.raw_config.get("auto_mapping") or {}).get("base_model_class")
        )
        hint = f" (the adapter was made for {made_for!r})" if made_for else ""
        problems.append(f"tensors for modules this model does not have{hint}: {few(unexpected, 4)}")
    vocabularies = set()
    for key, (shape, _) in expected.items():
        if key in keys and key.endswith(_FLOAT_LEAVES) and not files.is_floating(keys[key]):
            problems.append(f"{key} is not a floating-point tensor (integer or bool), which no weight is")
        if key in keys and (got := files.shape(keys[key])) != shape:
            problems.append(f"{key} has shape {got}, the model needs {shape}")
            path = key.removeprefix(PREFIX).rpartition(".")[0].removesuffix(".base_layer")
            if path in embeddings and got[1:] == shape[1:]:
                vocabularies.add((got[0], shape[0]))
    if not problems:
        problems += _base_weights_under_merged_adapters(modules, files, keys)
    if problems:
        advice = "Is it an adapter for a different base model (architecture or size)?"
        if len(vocabularies) == 1 and len(problems) == sum(" has shape " in p for p in problems):
            ((saved_with, has),) = vocabularies
            advice = (
                f"The adapter was saved with a vocabulary of {saved_with} tokens (resized embeddings), the model "
                f"has {has}: call model.resize_token_embeddings({saved_with}) first, then load it."
            )
        raise AdapterFormatError(
            f"adapter {files.source} does not fit {type(model).__name__}: "
            + "; ".join(problems[:6])
            + ". "
            + advice
        )
    return LoadPlan(
        config=config.replace(modules_to_save=_saved_names(config, saved)), targets=targets, saved=saved
    )


def _resolve_saved_leniently(model: nn.Module, config: LoRAConfig, source: str) -> list[str]:
    """`resolve_modules_to_save`, ignoring names that match no module on a dot boundary: peft matches them
    as plain suffixes ("layernorm" takes `input_layernorm`) or ignores them (its add_adapter writes
    ["classifier", "score"] for any classifier), and saves what it wrapped; `plan_load` then loads the
    file's tensors of such modules as modules saved in full. Creating an adapter stays strict (typos)."""
    saved: list[str] = []
    for name in config.modules_to_save or []:
        try:
            saved += resolve_modules_to_save(model, config.replace(modules_to_save=[name]))
        except TargetModulesError:
            logger.info(
                "%s: modules_to_save name %r matches no module by name; the adapter file's tensors decide "
                "what is loaded in full (peft matches such names as plain suffixes, or ignores them)",
                source,
                name,
            )
    return saved


def base_layer_paths(
    modules: dict[str, nn.Module], targets: list[str], tokens: dict[str, TokenTarget] | None = None
) -> set[str]:
    """Modules whose own tensors peft's files name `<path>.base_layer.*` (`<path>.token_adapter.base_layer.*`
    with token rows, which `normalise_key` maps to the former) once the adapter is attached: its targets,
    its token-row modules and the modules tied to them, and other adapters' layers."""
    return (
        set(targets)
        | {p for p, m in modules.items() if isinstance(m, (LoRALayer, TokenRowsLayer))}
        | {p for path, target in (tokens or {}).items() for p in (path, *target.tied)}
    )


def saved_vocabulary(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int | None:
    """The vocabulary size an adapter's embedding weights were saved with (save_embedding_layers), where
    it differs from the model's: the model it was trained on had been resized for new tokens."""
    for path in sorted(embedding_paths(model)):
        rows = model.get_submodule(path).weight.shape[0]
        base = (f"{PREFIX}{path}.{where}weight" for where in ("", "base_layer.", "token_adapter.base_layer."))
        for key in base:
            if key in tensors and tensors[key].shape[0] != rows:
                return int(tensors[key].shape[0])
    return None


def _without_foreign_base_layer_keys(
    keys: dict[str, str],
    modules: dict[str, nn.Module],
    targets: list[str],
    tokens: dict[str, TokenTarget],
    source: str,
) -> dict[str, str]:
    """Drop `<path>.base_layer.*` tensors of modules that will not be LoRA layers. peft's bias="lora_only"
    trains the biases of every LoRA layer, so an adapter saved beside others holds theirs too; on a model
    without LoRA on those modules peft has no base_layer to load them into and ignores them, as we do."""
    lora = base_layer_paths(modules, targets, tokens)
    foreign = sorted(
        k for k in keys if (split := base_layer_key(k)) and split[0] in modules and split[0] not in lora
    )
    if foreign:
        logger.info(
            "%s: ignoring tensors of modules without LoRA layers (as peft does; an adapter saved beside "
            "others with bias='lora_only' has their biases): %s",
            source,
            few(foreign, 4),
        )
    return {k: v for k, v in keys.items() if k not in foreign}


def _without_other_wrappers_keys(
    model: nn.Module, keys: dict[str, str], saved: list[str], source: str, bias_all: bool
) -> dict[str, str]:
    """Drop the tensors of saved-module wrappers that peft writes and ignores on load: `<path>.original_module.*`
    of modules this adapter does not save in full (peft's bias="all" writes every bias, also the unused
    original head of a module another adapter saved), and, for the modules it saves, the wrapper's own
    `original_module.*` / `modules_to_save.*` (save_embedding_layers takes everything under an embedding's
    wrapper). Under bias="all" a saved module's wrapper biases are this adapter's (`wrapper_bias_keys`)."""
    modules = {path for path, _ in model.named_modules()}
    ignored = []
    for k in keys:
        name = k.removeprefix(PREFIX)
        path, sep, rest = name.partition(".original_module.")
        if sep and path in modules and path not in saved:
            ignored.append(k)
            continue
        for wrapper in (".original_module.", ".modules_to_save."):
            path, sep, rest = name.partition(wrapper)
            if sep and path in saved and "." not in rest and not (bias_all and rest == "bias"):
                ignored.append(k)
    if ignored:
        logger.info(
            "%s: ignoring tensors of saved-module wrappers (peft writes them and ignores them too): %s",
            source,
            few(ignored, 4),
        )
    return {k: v for k, v in keys.items() if k not in ignored}


def _base_weights_under_merged_adapters(
    modules: dict[str, nn.Module], files: AdapterFiles, keys: dict[str, str]
) -> list[str]:
    """A different base weight would be copied over a weight that other adapters are merged into, and
    unmerging them would then leave a wrong weight."""
    problems = []
    for key, file_key in keys.items():
        split = base_layer_key(key)
        module = modules.get(split[0]) if split and split[1] == "weight" else None
        merged = isinstance(module, (LoRALayer, TokenRowsLayer)) and module.merged_adapters
        if merged and not is_base_weight(module, files.tensors[file_key]):
            problems.append(
                f"{key} differs from {split[0]}.weight, into which adapters {module.merged_adapters} are "
                "merged; unmerge_adapter() first, then load it"
            )
    return problems


def _saved_names(config: LoRAConfig, saved: list[str]) -> list[str] | None:
    names = list(config.modules_to_save or [])
    for path in saved:
        if not any(path == n or path.endswith("." + n) for n in names):
            names.append(path)
    return names or None


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _expected_shapes(
    modules: dict[str, nn.Module],
    config: LoRAConfig,
    targets: list[str],
    saved: list[str],
    embeddings: set[str] = frozenset(),
    tokens: dict[str, TokenTarget] | None = None,
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """file key -> (shape, required) for the adapter `config` creates.

    peft's files may also hold a LoRA layer's base tensors as `<path>.base_layer.weight` (an adapted output
    head, by save_embedding_layers="auto") and `.bias` (bias="lora_only"/"all"); peft loads them into the
    base layer, and so does `loading` where they differ from the model's (a resized vocabulary)."""
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for path in targets:
        m = modules[path]
        kind = kind_of(m)
        a_shape, b_shape = kind.factor_shapes(m, config.rank_for(path))
        a_key, b_key = kind.file_keys
        out[f"{PREFIX}{kind.file_path(path, m)}.{a_key}"] = (a_shape, True)
        out[f"{PREFIX}{kind.file_path(path, m)}.{b_key}"] = (b_shape, True)
        if config.use_dora:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = (kind.magnitude_shape(m), True)
    for path, target in (tokens or {}).items():
        shape = (len(target.ids), modules[path].weight.shape[1])
        out[f"{PREFIX}{path}.{TOKENS_KEY}"] = (shape, True)
        # peft's save_embedding_layers=True writes the rows under a tied head's name too
        for tied in target.tied:
            out[f"{PREFIX}{tied}.{TOKENS_KEY}"] = (shape, False)
    layer_paths = base_layer_paths(modules, targets, tokens)
    for path in sorted(layer_paths):
        for leaf in ("weight", "bias"):
            t = getattr(modules[path], leaf, None)
            if isinstance(t, nn.Parameter):
                out[f"{PREFIX}{path}.base_layer.{leaf}"] = (tuple(t.shape), False)
    for path in sorted(embeddings - layer_paths):  # save_embedding_layers: base weights, loaded into the base
        if not _inside(path, saved):
            for leaf in ("weight", "bias"):
                t = getattr(modules[path], leaf, None)
                if isinstance(t, nn.Parameter):
                    out[f"{PREFIX}{path}.{leaf}"] = (tuple(t.shape), False)
    for path in saved:
        for k, v in modules[path].state_dict().items():
            out[f"{PREFIX}{path}.{k}"] = (tuple(v.shape), True)
        b = getattr(modules[path], "bias", None)
        if config.bias == "all" and isinstance(b, nn.Parameter):
            for file_key in wrapper_bias_keys(path, DEFAULT_ADAPTER):
                out[f"{PREFIX}{file_key}"] = (tuple(b.shape), False)
    if config.bias == "all":
        for path, m in modules.items():
            b = getattr(m, "bias", None)
            if isinstance(b, nn.Parameter) and path not in targets and not _inside(path, saved):
                out[f"{PREFIX}{path}.bias"] = (tuple(b.shape), False)
    return out


def unchanged_base_tensors(own: dict[str, torch.Tensor], files: AdapterFiles, keys: list[str]) -> bool:
    """Whether these file tensors equal the model's own base tensors (`own`: its state dict), as the
    copies written for peft's sake do."""
    for key in keys:
        mine = own.get(key.removeprefix(PREFIX))
        if mine is None or tuple(mine.shape) != files.shape(key):  # (from the header: no data read)
            return False
        if not torch.equal(mine.detach().cpu(), files.tensors[key].to(mine.dtype)):
            return False
    return True


def is_base_weight(layer: LoRALayer, tensor: torch.Tensor) -> bool:
    """Whether a file's base weight is this layer's. With adapters merged into it, the layer's base is its
    weight minus their updates, which rounding leaves a few ulps off the original weight the file may
    hold: compared up to that."""
    base = layer.base_weight().detach()
    tensor = tensor.to(device=base.device, dtype=base.dtype)
    if not layer.merged_adapters or base.shape != tensor.shape:
        return torch.equal(base, tensor)
    # merging and unmerging round twice, each by at most half an ulp of what they round: elementwise bound
    merged, tensor = layer.weight.detach().float(), tensor.float()
    bound = 2 * torch.finfo(base.dtype).eps * (merged.abs() + tensor.abs())
    return bool(((base.float() - tensor).abs() <= bound).all())
