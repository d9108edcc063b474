"""Which modules get LoRA: the per-architecture default targets (data) and the matching rules.

The matching rules are peft's, so the same config selects the same modules in both libraries, with one
deliberate difference: `modules_to_save` names match on a dot boundary only (peft's plain suffix match
makes `classifier` also grab DistilBERT's `pre_classifier`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from torch import nn

from .config import TASK_HEADS, LoRAConfig, moves_base_weights, pattern_key
from .errors import TargetModulesError
from .kinds import ParameterSlot, ParameterSlots, kind_names, kind_of, parameter_targets, prune_slots, refusal
from .layers import LoRALayer, ModulesToSave
from .moe_targets import convert_moe_config
from .tokens import TokenRowsLayer

logger = logging.getLogger(__name__)

# Default `target_modules` per `config.model_type`. GPT-2 adapts all three Conv1D kinds, as the GPT-2 news
# tutorial does (peft's default is `c_attn` only); the rest follow peft's defaults.
TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "whisper": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "codegen": ["qkv_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "mpt": ["Wqkv"],
    # Vision, audio and multimodal encoders (peft has no defaults for them): the attention's query and
    # value projections, as peft's image-classification and ASR guides target them; ConvNeXt, which has no
    # attention, its pointwise Linears; ResNet, which is convolutions only, every convolution.
    **{
        key: ["q_proj", "v_proj"]
        for key in ["vit", "deit", "beit", "dinov2", "dinov2_with_registers", "vit_mae", "vivit", "swin"]
    },
    **{
        key: ["q_proj", "v_proj"]
        for key in ["clip", "clip_vision_model", "clip_text_model", "siglip", "siglip_vision_model"]
    },
    **{
        key: ["q_proj", "v_proj"]
        for key in ["wav2vec2", "hubert", "wavlm", "data2vec-audio", "audio-spectrogram-transformer"]
    },
    **{key: ["query", "value"] for key in ["yolos", "mobilevit", "videomae", "swinv2"]},
    **{key: ["pwconv1", "pwconv2"] for key in ["convnext", "convnextv2"]},
    "resnet": ["convolution"],
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` of the model as it was before any adapter: a saved-module wrapper shows as the
    module it wraps, and the adapters' own parameter containers are not listed."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, ModulesToSave):
            child = child.original_module
        yield path, child
        if not isinstance(child, (LoRALayer, TokenRowsLayer)):
            yield from base_modules(child, path + ".")


def is_linear(module: nn.Module) -> bool:
    """Whether "all-linear" takes this module (its kind says so: Linear and Conv1D, not embeddings)."""
    kind = kind_of(module)
    return kind is not None and kind.all_linear


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (path, module) "all-linear" chooses from (Linear/Conv1D)."""
    for name, module in base_modules(model):
        if is_linear(module):
            yield name, module


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (path, module) that LoRA can wrap: a module of any base kind (`hf_lora.kinds`)."""
    for name, module in base_modules(model):
        if kind_of(module) is not None and not isinstance(module, ParameterSlot):
            yield name, module


def describe_candidates(model: nn.Module, limit: int = 12) -> str:
    """Short summary of the model's wrappable modules, by their last name, for error messages."""
    counts: dict[str, int] = {}
    for name, _ in lora_modules(model):
        leaf = name.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    if not counts:
        return f"the model has no {kind_names('or')} modules"
    names = [f"{leaf} (x{n})" if n > 1 else leaf for leaf, n in counts.items()]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "modules LoRA can wrap in this model: " + ", ".join(names[:limit]) + more


def default_target_modules(model: nn.Module) -> list[str]:
    mtype = model_type(model)
    if mtype in TARGET_MODULES:
        return list(TARGET_MODULES[mtype])
    what = f"architecture {mtype!r}" if mtype else f"model class {type(model).__name__}"
    raise TargetModulesError(
        f"No default target_modules for {what}. Pass target_modules=[...] (names matched as dotted "
        f"suffixes, or a regex string) or target_modules='all-linear'. {describe_candidates(model)}."
    )


def matches_name(path: str, names: str | Iterable[str]) -> bool:
    """peft's target rule: a regex string must fullmatch the path; list entries match exactly or as a suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    """The index of the repeated block a module lives in (`...h.3.attn` -> 3), peft's way: the first
    number in the path that follows `layers_pattern` (or any name, when no pattern is given)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        return int(m["idx"]) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        if m := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path):
            return int(m["idx"])
    return None


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all its names, for the parameters several modules share (tied input and output
    embeddings), which `named_parameters()` lists once."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {key: all_names for key, all_names in names.items() if len(all_names) > 1}


def in_modules_to_save(path: str, modules_to_save: Iterable[str] | None) -> bool:
    """True if `path` is, or lies inside, a module named in `modules_to_save` (dot boundary match)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save or ())


def output_head_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, ModulesToSave):
        head = head.original_module
    if head is None:
        return None
    return next((name for name, m in base_modules(model) if m is head), None)


def prepare_config(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """Fill what the model tells us: its name, the default targets, the classification heads to save.

    The default targets are written into the config, as peft does: the saved file then names what it
    adapts, so peft (whose defaults differ: GPT-2's is only c_attn) loads it right, and a later change of
    our defaults cannot change what an old adapter means."""
    changes: dict[str, Any] = {}
    if config.target_modules is None and not config.target_parameters:
        changes["target_modules"] = default_target_modules(model)
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
            model, "name_or_path", None
        )
        if name:
            changes["base_model_name_or_path"] = str(name)
    if config.task_type in TASK_HEADS:
        heads = list(config.modules_to_save or [])
        changes["modules_to_save"] = heads + [h for h in TASK_HEADS[config.task_type] if h not in heads]
    config = config.replace(**changes) if changes else config
    head = output_head_path(model)
    leaves = lambda: [p.rsplit(".", 1)[-1] for p, _ in linear_modules(model) if p != head]  # noqa: E731
    return convert_moe_config(model, config, leaves)


def resolve_targets(model: nn.Module, config: LoRAConfig, strict_patterns: bool = True) -> list[str]:
    """Paths of the modules `config` adapts (see `find_targets`); the slots of targeted parameters
    (`target_parameters`) are created here, and removed again if the targets are refused."""
    try:
        return find_targets(model, config, strict_patterns)
    except ValueError:
        prune_slots(model)
        raise


def find_targets(model: nn.Module, config: LoRAConfig, strict_patterns: bool = True) -> list[str]:
    """Paths of the modules `config` adapts in `model`; raises with the candidates if there are none.
    A rank/alpha pattern key that matches no target, or a layers_to_transform index the model lacks, is
    an error when creating an adapter (a typo), and a warning when loading one (peft saves such configs,
    and they have no effect)."""
    targets = config.target_modules
    if targets is None:  # (with target_parameters alone, as in peft, no modules)
        targets = [] if config.target_parameters else default_target_modules(model)
    layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]

    found, unsupported, saved_by_others = [], [], []
    head = output_head_path(model) if targets == "all-linear" else None
    wrapped = {path for path, m in model.named_modules() if isinstance(m, ModulesToSave)}
    for path, module in base_modules(model):
        if in_modules_to_save(path, config.modules_to_save) or isinstance(
            module, (ParameterSlot, ParameterSlots)
        ):
            continue
        if config.exclude_modules and matches_name(path, config.exclude_modules):
            continue
        if targets == "all-linear":
            # (token rows of another adapter are left alone)
            token_rows = isinstance(module, TokenRowsLayer)
            if is_linear(module) and not token_rows and path != head and path not in wrapped:
                found.append(path)
            elif isinstance(module, nn.Linear) and path != head and kind_of(module) is None:
                unsupported.append(f"{path} ({refusal(module)})")  # never skip a projection silently
            continue
        if not matches_name(path, targets):
            continue
        # As in peft, the layer filter applies to name suffixes only: a regex or a full path is taken as is.
        exact = not isinstance(targets, str) and path in targets
        if (
            layers
            and not isinstance(targets, str)
            and not exact
            and layer_index(path, config.layers_pattern) not in layers
        ):
            continue
        if path in wrapped:  # another adapter trains it in full: LoRA on top would be lost with that copy
            saved_by_others.append(path)
        elif isinstance(module, TokenRowsLayer):
            unsupported.append(f"{path} (trainable token rows of another adapter)")
        elif kind_of(module) is not None:
            found.append(path)
        else:
            unsupported.append(f"{path} ({refusal(module)})")

    if saved_by_others:
        raise TargetModulesError(
            f"target_modules={targets!r} matches {', '.join(saved_by_others)}, which another adapter trains and "
            f"saves in full (modules_to_save). Leave it out (exclude_modules=[...]), or save it in full for this "
            f"adapter too (modules_to_save=[...])."
        )
    if unsupported:
        raise TargetModulesError(
            f"target_modules={targets!r} matches modules LoRA cannot wrap: {', '.join(unsupported[:5])}"
            f"{' ...' if len(unsupported) > 5 else ''}. Only {kind_names()} are supported; "
            f"name the projections inside them instead. {describe_candidates(model)}."
        )
    if config.target_parameters:  # (after the modules: a parameter of an adapted module is refused)
        found += parameter_targets(
            model,
            config.target_parameters,
            lambda p, m: p in found or p in wrapped or isinstance(m, (LoRALayer, ModulesToSave)),
        )
    if not found:
        where = f" in layers {layers}" if layers else ""
        raise TargetModulesError(
            f"target_modules={targets!r} matches no module{where} of {type(model).__name__}. "
            f"{describe_candidates(model)}. Use some of these names, or target_modules='all-linear'."
        )
    if layers:
        present = {layer_index(p, config.layers_pattern) for p, _ in linear_modules(model)} - {None}
        if missing := sorted(set(layers) - present):
            message = (
                f"layers_to_transform={config.layers_to_transform!r} names layers {missing} that the model "
                f"does not have (it has layers {min(present)}..{max(present)})."
                if present
                else f"layers_to_transform is set, but no numbered layers were found in {type(model).__name__}."
            )
            if strict_patterns:
                raise TargetModulesError(message)
            logger.warning("%s They are skipped.", message)
    if unused := _unused_patterns(config, found):
        message = (
            f"{unused[0]} matches none of the {len(found)} targeted modules (e.g. {found[0]!r}). Keys are "
            "regexes matched against the end of a module path."
        )
        if strict_patterns:
            raise TargetModulesError(message)
        logger.warning("%s It has no effect.", message)
    found = _with_companions(model, found)
    _check_rank_fits_init(model, config, found)
    _check_kind_problems(model, config, found)
    if strict_patterns and (clashes := _peft_suffix_clashes(config, found)):
        logger.warning(
            "LoRA on %s, whose name ends with a modules_to_save name (%s) though not on a dot boundary: peft "
            "matches modules_to_save by plain suffix and fails to load this adapter (it would wrap the LoRA "
            "layer). hf_lora loads it; to keep the files loadable by peft, leave them out "
            "(exclude_modules=%r).",
            ", ".join(p for p, _ in clashes),
            ", ".join(sorted({m for _, m in clashes})),
            [p.rsplit(".", 1)[-1] for p, _ in clashes],
        )
    return found


def _peft_suffix_clashes(config: LoRAConfig, targets: list[str]) -> list[tuple[str, str]]:
    """(target, modules_to_save name) pairs where peft's plain suffix match would take the LoRA target
    for a module to save in full (DistilBERT's pre_classifier for "classifier")."""
    return [(p, m) for p in targets for m in config.modules_to_save or () if p.endswith(m)]


def _with_companions(model: nn.Module, found: list[str]) -> list[str]:
    """The targets and the children their kind adapts with them (nn.MultiheadAttention's out_proj, as peft
    does). A companion targeted without its parent is refused: the parent never calls its forward."""
    out = list(found)
    for path in found:
        out += [
            f"{path}.{leaf}"
            for leaf in kind_of(model.get_submodule(path)).companions
            if f"{path}.{leaf}" not in out
        ]
    for path in found:
        parent, _, leaf = path.rpartition(".")
        owner = kind_of(model.get_submodule(parent)) if parent else None
        if owner is not None and leaf in owner.companions and parent not in found:
            raise TargetModulesError(
                f"{path} is the {leaf} of {parent} ({owner.name}), which never calls its forward: LoRA on it alone "
                f"would do nothing. Target {parent} instead (its {leaf} is adapted with it, as in peft)."
            )
    return out


def _check_kind_problems(model: nn.Module, config: LoRAConfig, targets: list[str]) -> None:
    """What a target's kind refuses (a convolution: a rank not divisible by its groups, an init that does not
    apply to it), before the model is touched."""
    problems = [
        f"{path}: {problem}"
        for path in targets
        if (problem := kind_of(m := model.get_submodule(path)).problem(m, config.rank_for(path), config))
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TargetModulesError(
            f"LoRA cannot go on {len(problems)} targeted module(s): {'; '.join(problems[:3])}{more}. Change the "
            "config as said, or leave them out (exclude_modules=[...])."
        )


def _check_rank_fits_init(model: nn.Module, config: LoRAConfig, targets: list[str]) -> None:
    """PiSSA and OLoRA take the adapter's r directions out of each weight (its top singular vectors, or its
    QR factors), so r cannot exceed min(in_features, out_features) there. Checked before the model is
    touched: the init itself would fail half way through the layers, with some weights already moved."""
    init = config.init_lora_weights
    if not moves_base_weights(config):
        return
    quantised = [p for p in targets if getattr(kind_of(model.get_submodule(p)), "requantises", False)]
    if quantised and str(init).startswith("pissa"):  # as peft
        raise TargetModulesError(
            f"init_lora_weights={init!r} (PiSSA) on a quantised base ({quantised[0]}, ...): its residual would be "
            "requantised, losing what PiSSA keeps. Initialise PiSSA on the model in float32/16/bf16, then quantise "
            "the residual model and load the adapter onto it; or use init_lora_weights='olora' or True here."
        )
    too_big = [
        (path, config.rank_for(path), min(kind.shapes(module)))
        for path in targets
        if (
            kind := kind_of(module := model.get_submodule(path))
        ).moves_base_weights  # (else plain init, as peft)
        and config.rank_for(path) > min(kind.shapes(module))
    ]
    if too_big:
        examples = ", ".join(f"{path} (r={r}, min(in, out)={n})" for path, r, n in too_big[:3])
        more = f" and {len(too_big) - 3} more" if len(too_big) > 3 else ""
        raise TargetModulesError(
            f"init_lora_weights={init!r} needs r <= min(in_features, out_features) of each targeted layer; "
            f"{len(too_big)} layer(s) are too small: {examples}{more}. Lower r (or give those layers a "
            "smaller rank with rank_pattern), leave them out with exclude_modules, or use another "
            "init_lora_weights."
        )


def _unused_patterns(config: LoRAConfig, targets: list[str]) -> list[str]:
    """Rank/alpha pattern keys that match no targeted module (almost surely typos)."""
    return [
        f"{kind} key {key!r}"
        for kind, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern))
        for key in patterns
        if not any(pattern_key({key: None}, t) for t in targets)
    ]


def resolve_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Paths of the modules to train and save in full. A name the user gave must exist; the task's default
    heads (`TASK_HEADS`: `classifier`, `score`, `qa_outputs`) are optional, since a model has one or the other."""
    names = list(config.modules_to_save or [])
    optional = set(TASK_HEADS.get(config.task_type or "", ()))
    found: list[str] = []
    for name in names:
        hits = [path for path, _ in base_modules(model) if path == name or path.endswith("." + name)]
        if rows := [p for p in hits if isinstance(model.get_submodule(p), TokenRowsLayer)]:
            raise TargetModulesError(
                f"modules_to_save names {name!r}, but {', '.join(rows)} holds or shows another adapter's trainable "
                "token rows, which a full copy would take along; leave it out of modules_to_save."
            )
        if not hits and name not in optional:
            raise TargetModulesError(
                f"modules_to_save names {name!r}, but {type(model).__name__} has no module of that name. "
                f"Its top-level modules: {', '.join(n for n, _ in model.named_children())}."
            )
        found.extend(hits)
    return found


class TokenTarget(NamedTuple):
    """A module that holds an adapter's token rows: their ids, and the modules tied to it that show them."""

    ids: list[int]
    tied: list[str]


def resolve_token_targets(
    model: nn.Module, config: LoRAConfig, lora_targets: Iterable[str] = ()
) -> dict[str, TokenTarget]:
    """{path of a module that holds rows: its TokenTarget} for `trainable_token_indices`, by peft's rules. A
    list names rows of the input embedding; a dict names modules as `modules_to_save` does (dot boundary).
    The modules that share an input embedding's weight (a tied output head, T5's per-stack embeddings) show
    its rows, unless they are named with other ids: then each module has rows of its own, as does a tied
    head named without its embedding (merging then unties it). Every problem is raised at once."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    modules = dict(base_modules(model))
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    emb = emb.original_module if isinstance(emb, ModulesToSave) else emb
    input_path = next((p for p, m in modules.items() if m is emb), None) if emb is not None else None
    named = spec if isinstance(spec, dict) else {input_path or "embed_tokens": spec}  # (peft's fallback name)
    lora_targets = set(lora_targets)
    wrapped = {path for path, m in model.named_modules() if isinstance(m, ModulesToSave)}
    problems: list[str] = []
    chosen: dict[str, list[int]] = {}
    for name, ids in named.items():
        hits = [p for p in modules if p == name or p.endswith("." + name)]
        if not hits:
            embeddings = [p for p, m in modules.items() if isinstance(m, nn.Embedding)]
            problems.append(f"{name!r} matches no module (embeddings: {', '.join(embeddings) or 'none'})")
        for path in hits:
            module = modules[path]
            if not isinstance(module, (nn.Embedding, nn.Linear)) or isinstance(module, LoRALayer):
                what = "a LoRA layer" if isinstance(module, LoRALayer) else type(module).__name__
                problems.append(
                    f"{path} is {what}; token rows need an nn.Embedding (or a Linear output head)"
                )
                continue
            if path in lora_targets:
                problems.append(f"{path} is in target_modules too; LoRA and token rows cannot share a module")
            if path in wrapped or in_modules_to_save(path, config.modules_to_save):
                problems.append(
                    f"{path} is trained in full (modules_to_save); name it in modules_to_save or in "
                    "trainable_token_indices, not both"
                )
            rows = module.weight.shape[0]
            if too_big := [i for i in ids if i >= rows]:
                problems.append(f"{path} has {rows} rows (tokens), so token ids {too_big[:5]} do not exist")
            if chosen.get(path, ids) != ids:
                problems.append(f"{path} is named twice with different token ids")
            chosen[path] = list(ids)

    out: dict[str, TokenTarget] = {}
    by_weight: dict[int, list[str]] = {}
    for path in chosen:
        by_weight.setdefault(id(modules[path].weight), []).append(path)
    for paths in by_weight.values():
        paths.sort(key=lambda p: not isinstance(modules[p], nn.Embedding))  # (stable) embeddings first
        source = paths[0]
        if len({tuple(chosen[p]) for p in paths}) > 1 or not isinstance(modules[source], nn.Embedding):
            out.update((p, TokenTarget(chosen[p], [])) for p in paths)  # rows of their own, untied (peft's)
            if input_path in paths:  # (T5's: the model may look tokens up through other modules sharing it)
                p = input_path
                unseen = [t for t in tied_token_modules(model, p) if isinstance(modules[t], nn.Embedding)]
                if unseen := [t for t in unseen if t not in paths]:
                    logger.warning(
                        "token rows on %s are not shown by %s, which share its weight: with different ids for the "
                        "tied modules (%s) each holds rows of its own, as in peft. If the model looks tokens up "
                        "through those modules the rows have no effect; give the tied modules the same ids to share "
                        "one set of rows.",
                        p,
                        ", ".join(unseen),
                        ", ".join(paths),
                    )
        else:
            out[source] = TokenTarget(chosen[source], tied_token_modules(model, source))
    for path, target in out.items():
        module = modules[path]
        if isinstance(module, TokenRowsLayer) and module.source is not module:
            problems.append(
                f"{path} shows the token rows of another module (tied embeddings, from an earlier adapter), so "
                "it cannot hold rows of its own; name the module it is tied to, with the same ids"
            )
        for tied in target.tied:
            member = modules[tied]
            if tied in lora_targets or isinstance(member, LoRALayer) or tied in wrapped:
                problems.append(
                    f"{tied} shares its weight with {path} (tied embeddings) and would show its token rows, "
                    "but it carries LoRA or is trained in full; leave it out of target_modules/modules_to_save"
                )
            elif isinstance(member, TokenRowsLayer) and member.source is not module:
                problems.append(
                    f"{tied} shares its weight with {path} (tied embeddings) and would show its token rows, but it "
                    "holds rows of its own (an earlier adapter named it with other ids)"
                )
        if isinstance(module, TokenRowsLayer) and module.source is module:
            shown = sorted(
                p
                for p, m in modules.items()
                if isinstance(m, TokenRowsLayer) and m.source is module and p != path
            )
            if shown != sorted(target.tied):
                problems.append(
                    f"{path} has token rows (an earlier adapter) shown by {shown or 'no other module'}, this adapter's "
                    f"would be shown by {target.tied or 'no other module'}; tied modules need the same layout"
                )
    if problems:
        raise TargetModulesError(
            f"trainable_token_indices={spec!r} does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + "."
        )
    return out


def tied_token_modules(model: nn.Module, path: str) -> list[str]:
    """Other Embedding/Linear modules that share the weight of the module at `path` (an output head tied
    to the input embeddings, T5's per-stack embeddings)."""
    weight = model.get_submodule(path).weight
    return [
        p
        for p, m in base_modules(model)
        if p != path and isinstance(m, (nn.Embedding, nn.Linear)) and getattr(m, "weight", None) is weight
    ]
