"""`get_lora_model` and `LoRAModel`: a model with LoRA adapters, which is still the model it was.

`get_lora_model(model, cfg)` turns the targeted Linear/Conv1D/Embedding modules into LoRA layers in place
and then gives the model object the class `LoRA<ModelClass>`, a subclass of both `LoRAModel` and its own
class (`LoRA<ModelClass>` is its `__qualname__` and `repr`; its `__name__` is the model's own, see
`_lora_model_class`).
So a LoRA GPT-2 *is* a `GPT2LMHeadModel` (and a `PreTrainedModel`): its forward signature, `generate()`,
`config`, gradient checkpointing and every attribute are the model's own, with no wrapper in between,
and `transformers.Trainer` sees a model it knows, whose `save_pretrained` writes the adapter only.
`merge_and_unload()` / `unload()` hand back the original class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .biases import set_bias_trainable, set_owned_biases_trainable
from .config import TASK_HEADS, LoRAConfig, moves_base_weights
from .errors import AdapterStateError
from .kinds import weights_in
from .layers import (
    BASE_ROWS,
    LoRALayer,
    ModulesToSave,
    check_adapter_name,
    make_lora_layer,
    report_requantising,
    unmake_lora_layer,
)
from .loss import forward_with_chunked_loss
from .rollback import restored_on_error
from .targets import prepare_config, resolve_modules_to_save, resolve_targets, resolve_token_targets
from .ties import check_tied_targets, untie_if_replaced, untie_merge_targets, untie_token_rows
from .tokens import TokenRowsLayer, check_disjoint, make_token_layer, unmake_token_layer

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"


class LoRAModel(nn.Module):
    """A model with LoRA adapters. Instances come from `get_lora_model` or `LoRAModel.from_pretrained`;
    each is also an instance of the model's own class (see the module docstring)."""

    peft_config: dict[str, LoRAConfig]  # adapter name -> config (peft's attribute name)
    _active: tuple[str, ...]
    _lora_base_class: type[nn.Module]

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError("Create LoRA models with hf_lora.get_lora_model or LoRAModel.from_pretrained.")

    def __reduce_ex__(self, protocol: int):
        # The class is generated at run time, so pickle/deepcopy rebuild it from the original class.
        state = self.__dict__.copy()
        return (_rebuild_lora_model, (self._lora_base_class, state))

    # ---- adapters ------------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def adapters(self) -> list[str]:
        return list(self.peft_config)

    def lora_layers(self) -> Iterator[tuple[str, LoRALayer]]:
        for name, module in self.named_modules():
            if isinstance(module, LoRALayer):
                yield name, module

    def token_layers(self) -> Iterator[tuple[str, TokenRowsLayer]]:
        """Embeddings (or heads) with trainable token rows, without the modules tied to them."""
        for name, module in self.named_modules():
            if isinstance(module, TokenRowsLayer) and module.source is module:
                yield name, module

    def adapter_layers(self) -> list[LoRALayer | TokenRowsLayer]:
        """Every layer that merges, unmerges and disables adapters: LoRA layers and token rows."""
        return [
            m
            for m in self.modules()
            if isinstance(m, LoRALayer) or (isinstance(m, TokenRowsLayer) and m.source is m)
        ]

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    def add_adapter(self, adapter_name: str, config: LoRAConfig) -> None:
        """Add another adapter (not active: call `set_adapter`). The model is unchanged if this fails."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterStateError(
                f"an adapter named {adapter_name!r} exists already; delete_adapter() it or choose another name."
            )
        if config.task_type is None and (task := self._task_type()):
            config = config.replace(task_type=task)  # as peft's task models: each new adapter gets the head
        config = prepare_config(self, config)
        targets = resolve_targets(self, config)
        saved = resolve_modules_to_save(self, config)
        with restored_on_error(self, config, targets):
            inject(self, adapter_name, config, targets, saved)
            self._activate(self._active)  # new adapter inactive; trainable flags follow the active ones

    def _task_type(self) -> str | None:
        """The task of a model whose adapters train a task head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS)."""
        return next((c.task_type for c in self.peft_config.values() if c.task_type in TASK_HEADS), None)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones, and the only trainable ones: as in peft, their LoRA weights
        and saved-module copies train from now on (`inference_mode=True` freezes them instead), also those
        of an adapter loaded frozen (`is_trainable=False`) or created with `inference_mode=True`, and every
        other adapter is frozen. Their configs' `inference_mode` records that (it is what keeps them
        trainable, or frozen, when adapters are added, loaded or deleted later). The base biases an adapter
        with bias="lora_only"/"all" trains follow it (peft leaves them trainable under inference_mode=True).
        Merged adapters are unmerged first, as in peft: one that stays merged whatever is active would stay
        in the weights, and a merged one does not train. All or nothing (while adapters are merged, their
        weights are copied first, so that a failure can put them back)."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        if unknown := [n for n in names if n not in self.peft_config]:
            raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {self.adapters}.")
        for _, layer in self.token_layers():
            check_disjoint(layer, names)
        merged = [layer for layer in self.adapter_layers() if layer.merged_adapters]
        with restored_on_error(self, keep=[layer.weight for layer in merged]):  # all or nothing
            if merged:
                logger.warning(
                    "set_adapter(%s) while adapters are merged: unmerging them first.", list(names)
                )
                self.unmerge_adapter()
            self._set_inference_mode(names, inference_mode)
            self._activate(names)

    def _set_inference_mode(self, names: Sequence[str], inference_mode: bool) -> None:
        for name in names:
            if self.peft_config[name].inference_mode != inference_mode:
                self.peft_config[name] = self.peft_config[name].replace(inference_mode=inference_mode)

    def _activate(self, names: Sequence[str]) -> None:
        """Active adapters and trainable flags, merged weights left as they are (callers that keep the
        active set, or keep merged adapters active). An active adapter trains unless its config is in
        inference mode, so refreshes keep each adapter's trainability as it was (peft's add_adapter and
        load_adapter restore it too); `set_adapter` changes it, and deleting the active adapter."""
        names = tuple(names)
        self._active = names
        for _, layer in self.lora_layers():
            layer.set_active(names)
            for name in layer.lora_A:
                trainable = name in names and not self.peft_config[name].inference_mode
                for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                    if name in store:
                        store[name].requires_grad_(trainable)
        for _, layer in self.token_layers():
            layer.set_active(names)
            for name, rows in layer.trainable_tokens_delta.items():
                rows.requires_grad_(name in names and not self.peft_config[name].inference_mode)
        for _, wrapper in self.saved_modules():
            wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
            for name, clone in wrapper.modules_to_save.items():
                clone.requires_grad_(name in names and not self.peft_config[name].inference_mode)
        set_bias_trainable(self)

    def refresh_adapters(self) -> None:
        """Active adapters and trainable flags again, for the adapters as they are now (after one was added
        or loaded): the active ones train unless their configs are in inference mode."""
        self._activate(self._active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` (merged: unmerged first). All or nothing, as `set_adapter`."""
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"unknown adapter {adapter_name!r}; this model has {self.adapters}.")
        if len(self.peft_config) == 1:
            raise AdapterStateError(
                "cannot delete the only adapter; use unload() to get the base model back."
            )
        # all or nothing; of the weights, only those an unmerge below may write are kept
        with restored_on_error(self, keep=[la.weight for la in self.adapter_layers() if la.merged_adapters]):
            self._delete_adapter(adapter_name)

    def _delete_adapter(self, adapter_name: str) -> None:
        if self.peft_config[adapter_name].bias != "none":  # the base biases it trained are frozen again
            set_owned_biases_trainable(self, adapter_name, False)
        was_active = adapter_name in self._active
        for _, layer in list(self.lora_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.lora_A:
                unmake_lora_layer(layer)
        for _, layer in list(self.token_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.trainable_tokens_delta:
                _unmake_token_layers(self, layer)
        for path, wrapper in list(self.saved_modules()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not wrapper.modules_to_save:
                _set_submodule(self, path, wrapper.original_module)
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name] or [
            sorted(self.peft_config)[0]
        ]  # peft's pick
        if any(set(layer.merged_adapters) - set(remaining) for layer in self.adapter_layers()):
            logger.warning(
                "adapters are merged, and %s will be the active ones: unmerging them first.", remaining
            )
            self.unmerge_adapter()  # else adapters merged and still active stay merged
        if was_active:  # peft switches to the remaining ones with set_adapter: they train, even if frozen
            self._set_inference_mode(remaining, False)
        self._activate(remaining)

    # ---- enabling, merging, unloading ---------------------------------------------------------

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block: outputs equal the model without adapters (after a PiSSA/OLoRA
        init: the residual weights that init left, as in peft). Nested blocks, or a block inside
        disable_adapters(), leave the adapters disabled as they found them."""
        layers = self.adapter_layers()
        if any(layer.adapters_disabled for layer in layers):
            yield  # already disabled (and unmerged): whoever disabled them enables them
            return
        merged = [(layer, list(layer.merged_adapters)) for layer in layers]
        report_requantising([la for la in layers if la.merged_adapters], None)
        for layer in layers:
            layer.unmerge()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            for layer, names in merged:
                layer.merge(names)

    def disable_adapters(self) -> None:
        """Switch adapters off until `enable_adapters()` (transformers' method names)."""
        for layer in self.adapter_layers():
            layer.unmerge()
        self._set_disabled(True)

    def enable_adapters(self) -> None:
        self._set_disabled(False)

    def _set_disabled(self, disabled: bool) -> None:
        for _, layer in self.lora_layers():
            layer.adapters_disabled = disabled
            layer._refresh()
        for _, layer in self.token_layers():
            layer.adapters_disabled = disabled
        for _, wrapper in self.saved_modules():
            wrapper.adapters_disabled = disabled

    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False, progressbar: bool = False
    ) -> None:
        """Fold the active adapters into the base weights (idempotent; `unmerge_adapter` undoes it).
        `safe_merge=True` checks every merged weight for NaN/inf before writing it; on such an error the
        adapters this call merged are unmerged again (the weights are back, up to rounding). A target whose
        weight another module shares (a tied output head) gets its own copy first, so the other module
        stays as it was."""
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        if unknown := [n for n in names if n not in self.peft_config]:
            raise AdapterStateError(f"unknown adapter(s) {unknown}; this model has {self.adapters}.")
        layers = self.adapter_layers()
        if any(layer.adapters_disabled for layer in layers):
            raise AdapterStateError(
                "adapters are disabled (disable_adapters(), or inside `with model.disable_adapter():`), and "
                "merged weights would change the base model they stand for; enable_adapters() first."
            )
        if already := [n for n in names if any(n in layer.merged_adapters for layer in layers)]:
            logger.warning(
                "adapter(s) %s are already merged; merging is idempotent, nothing to do for them.", already
            )
        untie_merge_targets(self, names)
        untie_token_rows(self, names)
        started: list[tuple[LoRALayer | TokenRowsLayer, list[str]]] = []
        try:
            for layer in tqdm(layers, desc="merging", unit="layer", disable=not progressbar):
                todo = [n for n in names if _holds(layer, n) and n not in layer.merged_adapters]
                started.append((layer, todo))
                layer.merge(todo, safe=safe_merge)
        except Exception:
            for layer, todo in started:
                layer.unmerge([n for n in todo if n in layer.merged_adapters])
            raise
        report_requantising(layers, names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights (a no-op, with a warning, if none is). On a
        failure the layers already unmerged are merged again (the weights are back, up to rounding)."""
        layers = self.adapter_layers()
        if not any(layer.merged_adapters for layer in layers):
            logger.warning("no adapter is merged; unmerge_adapter() has nothing to do.")
        report_requantising([la for la in layers if la.merged_adapters], None)
        done: list[tuple[LoRALayer | TokenRowsLayer, list[str]]] = []
        try:
            for layer in layers:
                done.append((layer, list(layer.merged_adapters)))
                layer.unmerge()
        except BaseException:  # merged again, as merge_adapter unmerges on a failure (up to rounding)
            for layer, names in done:
                layer.unmerge()  # (a layer the failure left half-unmerged)
                layer.merge(names)
            raise

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters into the weights and return the plain base model (its original class,
        no LoRA layers, trained `modules_to_save` copies in place): zero inference overhead. The arguments
        are peft's, in peft's order."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, progressbar=progressbar)
        return self._unload(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model (its original class and modules).
        After a PiSSA/OLoRA init its weights are the residual that init left, as in peft; save_pretrained(...,
        path_initial_model_for_weight_conversion=...) gives an adapter against the original weights."""
        for layer in self.adapter_layers():
            layer.unmerge()
        return self._unload(keep_trained_copies=False)

    def _unload(self, keep_trained_copies: bool) -> nn.Module:
        for _, layer in list(self.lora_layers()):
            unmake_lora_layer(layer)
        for _, layer in list(self.token_layers()):
            _unmake_token_layers(self, layer)
        for path, wrapper in list(self.saved_modules()):
            module = wrapper.current() if keep_trained_copies else wrapper.original_module
            _set_submodule(self, path, module)
        for name in ("peft_config", "_active"):
            self.__dict__.pop(name, None)
        self.__class__ = self.__dict__.pop("_lora_base_class")
        untie_if_replaced(self)
        return self

    # ---- mixed batches --------------------------------------------------------------------------

    @contextlib.contextmanager
    def adapter_rows(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Inside the block each batch row uses its own adapter (`"__base__"` for none)."""
        names = list(adapter_names)
        if unknown := sorted(set(names) - set(self.peft_config) - {BASE_ROWS}):
            raise AdapterStateError(
                f"adapter_names has unknown adapters {unknown}; this model has {self.adapters}."
            )
        modules = [m for _, m in (*self.lora_layers(), *self.token_layers(), *self.saved_modules())]
        for m in modules:
            m._row_adapters = names
        try:
            yield
        finally:
            for m in modules:
                m._row_adapters = None

    # ---- memory ---------------------------------------------------------------------------------

    _loss_chunk_size: int | None = None

    def enable_chunked_loss(self, chunk_size: int = 1024) -> None:
        """Compute a causal LM's training loss `chunk_size` tokens at a time, without the full
        (tokens x vocabulary) logits (see `hf_lora.loss`). While on, a forward with `labels` returns the
        loss and the logits of the last position only."""
        head = self.get_output_embeddings() if hasattr(self, "get_output_embeddings") else None
        problems = []
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            problems.append("it has no output embeddings (get_output_embeddings())")
        elif isinstance(head, LoRALayer):
            problems.append("its output head carries a LoRA adapter")
        elif isinstance(head, TokenRowsLayer):
            problems.append("its output head has trainable token rows (tied to the input embeddings)")
        if "logits_to_keep" not in inspect.signature(self._lora_base_class.forward).parameters:
            problems.append("its forward has no logits_to_keep argument")
        config = getattr(self, "config", None)
        if getattr(config, "final_logit_softcapping", None):
            problems.append("it soft-caps its logits")
        for scale in ("logits_scaling", "logit_scale"):  # Granite divides its logits, Cohere multiplies
            if getattr(config, scale, None) not in (None, 1, 1.0):
                problems.append(f"it scales its logits ({scale}={getattr(config, scale)})")
        if problems:
            raise AdapterStateError(f"chunked loss needs a plain causal LM head, but {'; '.join(problems)}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
        self._loss_chunk_size = chunk_size

    def disable_chunked_loss(self) -> None:
        self._loss_chunk_size = None

    # ---- parameters -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        counts = [(weights_in(p), p.requires_grad) for p in self.parameters()]
        return sum(n for n, grad in counts if grad), sum(n for n, _ in counts)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def get_base_model(self) -> nn.Module:
        """The model itself (it is the base model, with LoRA layers inside)."""
        return self

    # ---- transformers integration ---------------------------------------------------------------

    def _get_name(self) -> str:
        # transformers.Trainer shifts the labels for label smoothing only when this names a causal LM
        # class (it asks a peft model's inner model): LoRAGPT2LMHeadModel would train on unshifted labels.
        return self._lora_base_class.__name__

    def __repr__(self) -> str:
        return "LoRA" + super().__repr__()  # nn.Module's repr starts with _get_name(), the model's name

    # Adapter I/O (save_pretrained, load_adapter, from_pretrained, push_to_hub, create_or_update_model_card),
    # add_weighted_adapter and the status/state-dict helpers live a layer above; hf_lora/__init__.py binds them.

    def _set_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        super()._set_gradient_checkpointing(*args, **kwargs)
        enable = args[0] if args else kwargs.get("enable", True)
        # With the embeddings frozen, checkpointed blocks get inputs that need no grad, and reentrant
        # checkpointing then drops the LoRA gradients: the embedding output must require grad.
        # transformers does this itself for models whose main input is input_ids.
        if enable and getattr(self, "main_input_name", None) != "input_ids":
            self.enable_input_require_grads()


def get_lora_model(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoRAModel:
    """Add a LoRA adapter to `model` in place, freeze everything else, and return it as a `LoRAModel`.

    Any `torch.nn.Module` with layers of a base kind (transformers models also get their architecture's
    default targets). All or nothing: after any error the model is exactly as before.
    """
    if isinstance(model, LoRAModel):
        raise AdapterStateError(
            "this model already has LoRA adapters; add another with model.add_adapter(name, config), or "
            "start from a fresh base model."
        )
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be an hf_lora.LoRAConfig, got {type(config).__name__}.")
    check_adapter_name(adapter_name)
    config = prepare_config(model, config)
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    with restored_on_error(model, config, targets):  # all or nothing
        return attach(model, adapter_name, config, targets, saved)


def attach(
    model: nn.Module,
    name: str,
    config: LoRAConfig,
    targets: list[str],
    saved: list[str],
    initialise: bool = True,
    factors: dict[str, Any] | None = None,
) -> LoRAModel:
    """Freeze the model, make it a LoRAModel and add its first adapter (targets already resolved)."""
    check_tied_targets(model, config, targets, warn=False)  # before the model is touched
    # Checkpointing switched on before wrapping (peft's idiom): the frozen embeddings' output must require
    # grad, as _set_gradient_checkpointing arranges when it is switched on after.
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # the name in transformers 5
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and getattr(model, "main_input_name", None) != "input_ids":
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    base_cls = type(model)
    model.__class__ = _lora_model_class(base_cls)
    model._lora_base_class = base_cls
    model.peft_config = {}
    model._active = (name,)
    inject(model, name, config, targets, saved, initialise, factors)
    model._activate((name,))  # not set_adapter: it would make an adapter created or loaded frozen trainable
    return model


def inject(
    model: LoRAModel,
    name: str,
    config: LoRAConfig,
    targets: list[str],
    saved: list[str],
    initialise: bool = True,
    factors: dict[str, Any] | None = None,
) -> None:
    """Add adapter `name` to the resolved modules. `initialise=False` leaves the new tensors empty, for
    callers that fill them from a file next; `factors`: how LoRALayer.add_adapter creates A and B."""
    if config.bias != "none" and (other := [n for n, c in model.peft_config.items() if c.bias != "none"]):
        # Biases are the base model's, one set for all adapters: two adapters would train the same ones.
        raise AdapterStateError(
            f"adapter {other[0]!r} already trains the base model's biases (bias={model.peft_config[other[0]].bias!r}); "
            f"only one adapter may, as in peft. Give {name!r} bias='none'."
        )
    check_tied_targets(model, config, targets)
    tokens = resolve_token_targets(model, config, targets)  # (raises before the model is touched)
    disabled = any(layer.adapters_disabled for layer in model.adapter_layers())  # new layers follow suit
    for path in targets:
        layer = make_lora_layer(model.get_submodule(path))
        layer.lora_kind.attach(layer, model)
        layer.adapters_disabled = disabled
        layer.add_adapter(
            name,
            r=config.rank_for(path),
            scaling=config.scaling_for(path),
            dropout=config.lora_dropout,
            init=config.init_lora_weights if initialise or moves_base_weights(config) else None,
            use_dora=config.use_dora,
            **(factors or {}),
        )
        layer.set_active(model._active)
    for path, target in tokens.items():
        layer = make_token_layer(model.get_submodule(path))
        layer.adapters_disabled = disabled
        layer.add_token_adapter(name, target.ids)
        for tied in target.tied:
            make_token_layer(model.get_submodule(tied), source=layer)
        layer.set_active(model._active)
    for path in saved:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            wrapper.adapters_disabled = disabled
            _set_submodule(model, path, wrapper)
        wrapper.add(name)
    model.peft_config[name] = config
    logger.info(
        "adapter %r: LoRA on %d modules, %d modules saved in full, token rows in %d",
        name,
        len(targets),
        len(saved),
        len(tokens),
    )


def _holds(layer: LoRALayer | TokenRowsLayer, name: str) -> bool:
    return name in (layer.lora_A if isinstance(layer, LoRALayer) else layer.trainable_tokens_delta)


def _unmake_token_layers(model: nn.Module, source: TokenRowsLayer) -> None:
    """`source` and the modules tied to it get their own classes back."""
    for module in [m for m in model.modules() if isinstance(m, TokenRowsLayer) and m.source is source]:
        unmake_token_layer(module)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


_MODEL_CLASSES: dict[type, type] = {}


def _forward_with_chunked_loss(base_forward, self: LoRAModel, *args: Any, **kwargs: Any) -> Any:
    """The model's forward for the hidden states and last-position logits only, then the loss by chunks."""
    head = self.get_output_embeddings()
    if isinstance(head, (LoRALayer, TokenRowsLayer)):  # an adapter added after enable_chunked_loss()
        raise AdapterStateError(
            "the chunked loss multiplies by the output head's weight, but the head now carries an adapter (LoRA "
            "or token rows) it would leave out; call model.disable_chunked_loss()."
        )
    return forward_with_chunked_loss(base_forward, self, head, self._loss_chunk_size, *args, **kwargs)


def _lora_model_class(base_cls: type[nn.Module]) -> type[LoRAModel]:
    """`LoRA<Base>`: LoRAModel's methods first, then the model's own. Its forward is the model's, with
    one extra keyword, `adapter_names` (mixed batches); the visible signature stays the model's.

    `LoRA<Base>` is the class's `__qualname__` (so `type(model)` shows it) while its `__name__` stays the
    model's: transformers checks models by `__class__.__name__` against its class names (a pipeline logs
    "The model 'LoRAGPT2LMHeadModel' is not supported for text-generation" otherwise; it lets peft's
    wrappers through by their names, PeftModelForCausalLM and the like)."""
    if base_cls not in _MODEL_CLASSES:
        base_forward = base_cls.forward

        @functools.wraps(base_forward)
        def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
            run = base_forward
            if self._loss_chunk_size and kwargs.get("labels") is not None and kwargs.get("return_dict", True):
                run = functools.partial(_forward_with_chunked_loss, base_forward)
            if adapter_names is None:
                return run(self, *args, **kwargs)
            with self.adapter_rows(adapter_names):
                return run(self, *args, **kwargs)

        attrs: dict[str, Any] = {
            "forward": forward,
            "__module__": base_cls.__module__,
            "__qualname__": f"LoRA{base_cls.__name__}",
        }
        if callable(getattr(base_cls, "generate", None)):
            base_generate = base_cls.generate

            @functools.wraps(base_generate)
            def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
                if adapter_names is None:
                    return base_generate(self, *args, **kwargs)
                with self.adapter_rows(adapter_names):
                    return base_generate(self, *args, **kwargs)

            attrs["generate"] = generate
        _MODEL_CLASSES[base_cls] = type(base_cls.__name__, (LoRAModel, base_cls), attrs)
    return _MODEL_CLASSES[base_cls]


def _rebuild_lora_model(base_cls: type[nn.Module], state: dict[str, Any]) -> LoRAModel:
    obj = base_cls.__new__(base_cls)
    obj.__dict__.update(state)
    obj.__class__ = _lora_model_class(base_cls)
    return obj


def base_class(model: LoRAModel) -> type[nn.Module]:
    """The model's own class, which `LoRA<Model>` subclasses (and `unload()` gives back)."""
    return model._lora_base_class
