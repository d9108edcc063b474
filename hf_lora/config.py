"""`LoRAConfig`: the hyper-parameters of one adapter, and their peft-compatible JSON form.

The JSON written by `to_dict()` carries every key peft's `LoraConfig` writes, so `peft` (and anything else
that reads `adapter_config.json`) loads our adapters unchanged; `from_dict()` reads peft's files back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterFormatError, few
from .regex_guard import backtracking_problem

logger = logging.getLogger(__name__)

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
BIAS_MODES = ("none", "all", "lora_only")
# Heads that an adapter of these task types trains and saves in full, as peft adds them to modules_to_save
# (a model has one or the other name, so each is optional).
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

_INIT_STRINGS = ("gaussian", "pissa", "olora", "orthogonal")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# Keys peft writes for features hf_lora does not implement, with the value that means "feature off".
# A file that turns one of them on cannot be loaded faithfully, so it is refused rather than half-applied.
_PEFT_FEATURES_OFF: dict[str, Any] = {
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# A parameter targeted by `target_parameters` is adapted through a slot module at `<owner>.lora_params.<param>`
# (hf_lora.kinds.experts); rank/alpha patterns match `<owner>.<param>`, as peft's.
PARAMETER_SLOTS = "lora_params"
# Keys peft writes that carry no meaning for loading (bookkeeping); read and dropped silently.
_PEFT_BOOKKEEPING = ("peft_type", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size")


@dataclass
class LoRAConfig:
    """Hyper-parameters of one LoRA adapter; field names and meanings follow peft's `LoraConfig`.

    `target_modules`: module names matched exactly or as a dotted suffix (a list), a regex matched with
    `re.fullmatch` against the full module path (a string), ``"all-linear"`` (every Linear/Conv1D except
    the output head), or None for the architecture's default from `hf_lora.targets.TARGET_MODULES`.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Rows of the input embedding to train (a list of token ids), or {module name: token ids} for other
    # embeddings or an untied output head: see `hf_lora.tokens`.
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    # Parameters adapted directly (peft's): MoE experts' 3-D `gate_up_proj`/`down_proj`, a router's weight
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        # Types and sizes first: the normalising below would fail on them with Python's words, not ours.
        if problems := list(_schema_problems(self)):
            raise ValueError("Invalid LoRAConfig:\n" + "\n".join(f"  - {p}" for p in problems))
        # Lists arrive as tuples/sets from user code and as lists from JSON; keep one canonical form.
        for name in ("target_modules", "exclude_modules", "target_parameters"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, _unique_list(value))
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, str):
            self.modules_to_save = _unique_list(self.modules_to_save)
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            self.trainable_token_indices = {k: _token_list(v) for k, v in tokens.items()}
        elif tokens is not None:
            self.trainable_token_indices = _token_list(tokens)
        if isinstance(self.layers_to_transform, (tuple, set)):
            self.layers_to_transform = sorted(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError listing every problem, so a user fixes them all in one go."""
        problems = list(_problems(self))
        if problems:
            raise ValueError("Invalid LoRAConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    # ---- derived values -------------------------------------------------------------------------

    def rank_for(self, module_path: str) -> int:
        return int(self.rank_pattern[key]) if (key := pattern_key(self.rank_pattern, module_path)) else self.r

    def alpha_for(self, module_path: str) -> float:
        return (
            self.alpha_pattern[key]
            if (key := pattern_key(self.alpha_pattern, module_path))
            else self.lora_alpha
        )

    def scaling_for(self, module_path: str) -> float:
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> LoRAConfig:
        return dataclasses.replace(self, **changes)

    # ---- peft-compatible JSON -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content: every key peft's LoraConfig writes, in its sorted order."""
        d: dict[str, Any] = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(_PEFT_FEATURES_OFF)
        d.update(peft_type="LORA", megatron_core="megatron.core", qalora_group_size=16, auto_mapping=None)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "adapter config") -> LoRAConfig:
        """Read a peft or hf_lora `adapter_config.json`; unknown keys warn (files from newer versions)."""
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterFormatError(
                f"{source}: peft_type is {shown(peft_type)}; hf_lora loads only LoRA adapters (peft_type 'LORA')."
            )
        if data.get("init_lora_weights") == "eva":
            # EVA only chooses the initial A (from activations) and leaves the base weights alone, and the
            # ranks it settled on are in rank_pattern: the saved A and B are a plain LoRA.
            data = {**data, "init_lora_weights": True, "eva_config": None}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_FEATURES_OFF:
                if value not in (_PEFT_FEATURES_OFF[key], None, False, {}, []):
                    unsupported.append(f"{key}={shown(value)}")
            elif key not in _PEFT_BOOKKEEPING:
                unknown.append(key)
        if unsupported:
            raise AdapterFormatError(
                f"{source}: the adapter uses peft features hf_lora does not implement: "
                f"{', '.join(unsupported)}. Load it with peft, or retrain without them."
            )
        if unknown:
            logger.warning(
                "%s: ignoring unknown keys %s (written by a newer version?).",
                source,
                few(sorted(unknown)),
            )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise AdapterFormatError(f"{source}: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"  # not sort_keys: pattern order is meaning


def moves_base_weights(config: LoRAConfig) -> bool:
    """PiSSA and OLoRA take the adapter's share out of the base weight, also when the adapter is loaded:
    the trained A and B are only right together with that residual."""
    init = config.init_lora_weights
    return isinstance(init, str) and init.startswith(("pissa", "olora"))


def pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """The first key of `rank_pattern`/`alpha_pattern` that matches `module_path` as peft matches it:
    the key, read as a regex, must match a dotted suffix of the path."""
    module_path = module_path.replace(f".{PARAMETER_SLOTS}.", ".")
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


# The JSON types each field takes (code may also pass tuples and sets for lists), and the longest list or
# dict: far above any real config (a vocabulary of token ids), far below what floods memory or a log line.
MAX_NAMES = 10_000
MAX_TOKEN_IDS = 2**20
_BOOL_FIELDS = ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode")
_NAME_LIST_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern")
_LIST_TYPES = (list, tuple, set, frozenset)
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 6
_SHORT_REPR.maxdict, _SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 4, 3, 70, 70


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` for a message, cut to `limit` characters (a value from a file may be any size)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_problems(c: LoRAConfig):
    """Wrong JSON types and oversized lists, each named with its field and the type it takes."""
    for name in _BOOL_FIELDS:
        value = getattr(c, name)
        if not isinstance(value, bool):
            yield f"{name} must be true or false (a boolean, not a string or number), got {_typed(value)}."
    for name in ("base_model_name_or_path", "revision", "task_type"):
        value = getattr(c, name)
        if value is not None and not isinstance(value, str):
            yield f"{name} must be a string or null, got {_typed(value)}."
    for name in _NAME_LIST_FIELDS:
        value = getattr(c, name)
        takes = "a list of module names" + ("" if name == "modules_to_save" else " or a regex string")
        if value is None or (isinstance(value, str) and name != "modules_to_save"):
            continue
        if not isinstance(value, _LIST_TYPES):
            yield f"{name} must be {takes} (or null), got {_typed(value)}."
        elif len(value) > MAX_NAMES:
            yield f"{name} has {len(value)} items; at most {MAX_NAMES} are accepted (use a regex string)."
        elif not all(isinstance(v, str) for v in value):
            yield f"{name} must be {takes}, got {shown(value)} (an item is no string)."
    for name, number in (("rank_pattern", "ranks"), ("alpha_pattern", "alphas")):
        value = getattr(c, name)
        if value is None:
            continue
        if not isinstance(value, dict):
            yield f"{name} must be a dict of {{regex: {number}}} (or null), got {_typed(value)}."
        elif len(value) > MAX_NAMES:
            yield f"{name} has {len(value)} keys; at most {MAX_NAMES} are accepted."
        elif not all(isinstance(k, str) for k in value):
            yield f"{name} must be a dict of {{regex: {number}}}; its keys must be strings."
    tokens = c.trainable_token_indices
    if tokens is not None and not isinstance(tokens, (*_LIST_TYPES, range, dict)):
        yield (
            "trainable_token_indices must be a list of token ids or a {module name: token ids} dict (or "
            f"null), got {_typed(tokens)}."
        )
    elif tokens is not None:
        groups = tokens.values() if isinstance(tokens, dict) else [tokens]
        if sum(len(g) if hasattr(g, "__len__") else 1 for g in groups) > MAX_TOKEN_IDS:
            yield f"trainable_token_indices names more than {MAX_TOKEN_IDS} tokens."


def _typed(value: Any) -> str:
    return f"{shown(value)} ({type(value).__name__})"


def _problems(c: LoRAConfig):
    if not _is_int(c.r) or c.r <= 0:
        yield f"r must be a positive integer, got {shown(c.r)}."
    if not _is_number(c.lora_alpha) or c.lora_alpha <= 0:
        yield f"lora_alpha must be a positive number, got {shown(c.lora_alpha)}."
    if not _is_number(c.lora_dropout) or not 0 <= c.lora_dropout < 1:
        yield f"lora_dropout must be in [0, 1), got {shown(c.lora_dropout)}."
    if c.bias not in BIAS_MODES:
        yield f"bias must be one of {BIAS_MODES}, got {shown(c.bias)}."
    if c.task_type is not None and c.task_type not in TASK_TYPES:
        yield f"task_type must be None or one of {TASK_TYPES}, got {shown(c.task_type)}."
    yield from _target_problems("target_modules", c.target_modules)
    tp = c.target_parameters
    if tp is not None and (isinstance(tp, str) or not all(isinstance(v, str) and v for v in tp)):
        yield f"target_parameters must be a list of parameter names, got {c.target_parameters!r}."
    yield from _target_problems("exclude_modules", c.exclude_modules)
    if c.modules_to_save is not None and (
        isinstance(c.modules_to_save, str) or not all(isinstance(m, str) and m for m in c.modules_to_save)
    ):
        yield f"modules_to_save must be a list of module names, got {shown(c.modules_to_save)}."
    init = c.init_lora_weights
    if not isinstance(init, bool) and not (
        isinstance(init, str) and (init in _INIT_STRINGS or _PISSA_NITER.fullmatch(init))
    ):
        yield (
            f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or "
            f"'orthogonal', got {shown(init)}."
        )
    if init == "orthogonal" and any(_is_int(v) and v % 2 for v in [c.r, *c.rank_pattern.values()]):
        yield "init_lora_weights='orthogonal' splits each rank in two halves: r and rank_pattern's ranks must be even."
    for key, value in c.rank_pattern.items():
        if not _is_int(value) or value <= 0:
            yield f"rank_pattern[{shown(key)}] must be a positive integer, got {shown(value)}."
        yield from _regex_problem(f"rank_pattern key {shown(key)}", key)
    for key, value in c.alpha_pattern.items():
        if not _is_number(value) or value <= 0:
            yield f"alpha_pattern[{shown(key)}] must be a positive number, got {shown(value)}."
        yield from _regex_problem(f"alpha_pattern key {shown(key)}", key)
    layers = c.layers_to_transform
    if layers is not None:
        items = [layers] if _is_int(layers) else layers
        if not isinstance(items, list) or not all(_is_int(i) and i >= 0 for i in items):
            yield f"layers_to_transform must be a non-negative int or a list of them, got {shown(layers)}."
        if isinstance(c.target_modules, str):
            yield "layers_to_transform cannot be combined with a regex target_modules; put the layers in the regex."
    for pattern in [c.layers_pattern] if isinstance(c.layers_pattern, str) else c.layers_pattern or []:
        yield from _regex_problem(f"layers_pattern {shown(pattern)}", pattern)
    if c.layers_pattern is not None and layers is None:
        yield "layers_pattern only has an effect together with layers_to_transform; set both or neither."
    yield from _token_problems(c.trainable_token_indices)
    if c.use_dora and c.init_lora_weights not in (True, False, "gaussian"):
        yield f"use_dora=True cannot be combined with init_lora_weights={shown(c.init_lora_weights)}."


def _token_problems(value: Any):
    if value is None:
        return
    what = "trainable_token_indices must be a list of token ids or a {module name: token ids} dict"
    groups = value.items() if isinstance(value, dict) else [(None, value)]
    for name, ids in groups:
        where = "" if name is None else f"[{shown(name)}]"
        if name is not None and not (isinstance(name, str) and name):
            yield f"{what}; got the key {shown(name)}."
        elif not isinstance(ids, list) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
            yield f"{what}; trainable_token_indices{where} is {shown(ids)} (a non-empty list of ids >= 0 is needed)."
        elif len(set(ids)) != len(ids):
            twice = sorted(i for i, n in Counter(ids).items() if n > 1)
            yield f"trainable_token_indices{where} names tokens {twice} more than once."


def _target_problems(name: str, value: Any):
    if value is None:
        return
    if isinstance(value, str):
        if value != "all-linear":
            yield from _regex_problem(f"{name} {shown(value)}", value)
    elif not all(isinstance(v, str) and v for v in value):
        yield f"{name} must be a list of module names or a regex string, got {shown(value)}."
    elif not value and name == "target_modules":  # (an empty exclude_modules excludes nothing, as in peft)
        yield f"{name} is an empty list; give module names, a regex, 'all-linear', or None for the default."


def _regex_problem(what: str, pattern: str):
    try:
        re.compile(pattern)
    except re.error as e:
        yield f"{what} is not a valid regular expression: {e}."
        return
    if reason := backtracking_problem(pattern):
        yield (
            f"{what} {reason}: such a regex can backtrack for minutes on a module path, so hf_lora refuses "
            "it. Name the modules in a list, or write a simpler regex."
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _token_list(ids: Any) -> Any:
    """Token ids as a list (from a tuple, range, set or tensor's tolist()); anything else is left for
    validation to name."""
    if isinstance(ids, (set, frozenset)):
        return sorted(ids)
    return list(ids) if isinstance(ids, (tuple, range)) else ids


def _unique_list(values: Any) -> list:
    return list(dict.fromkeys(values))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return value
