"""`transformers.Trainer` integration.

A LoRA model is a `PreTrainedModel` of its own class, so a plain `Trainer` already trains it, sees its
forward signature, and saves checkpoints and `save_model()` through its `save_pretrained`, which writes
the adapter only. What a plain Trainer cannot do is read such a checkpoint back: it only knows full
weights and peft's own class. It then stops with an error on resume (`Can't find a checkpoint index`)
and for `load_best_model_at_end` (a missing `pytorch_model.bin`), except that for an adapter not named
"default" (saved in a subfolder) it only logs "Could not locate the best model" and keeps the last weights.

`LoRATrainerMixin` closes that gap for any Trainer subclass (TRL's `SFTTrainer`, `DPOTrainer`, ...: put
it first, `class SFT(hf_lora.LoRATrainerMixin, trl.SFTTrainer): pass`), and `LoRATrainer` is the mixin
over `transformers.Trainer`: resume and best-model restore load the adapter, and DDP runs without
`find_unused_parameters` (every trainable LoRA weight is used in every step, so the graph walk
transformers turns on by default is pure cost). For trainers that compare against a reference model
(TRL's DPO, KTO, GRPO with a KL term), the reference is the policy itself with its adapters disabled, or
with one frozen adapter of it active (`ref_adapter_name`): nothing of the base model is loaded twice.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_files import CONFIG_NAME, adapter_dir
from .errors import AdapterStateError
from .model import LoRAModel
from .model_card import LOG_HISTORY_ATTR, is_generated_card

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class LoRATrainerMixin:
    """Put in front of any `transformers.Trainer` subclass to train an hf_lora model with it:
    `class SFT(hf_lora.LoRATrainerMixin, trl.SFTTrainer): pass`.

    `ref_adapter_name`: for trainers that take a reference model (TRL's `ref_model`), the adapter of the
    model that serves as the reference, frozen (e.g. the SFT adapter, loaded a second time under another
    name as the trainable policy); by default the reference is the model with its adapters disabled."""

    def __init__(self, *args: Any, ref_adapter_name: str | None = None, **kwargs: Any):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        given = bound.arguments
        model, targs = given.get("model"), given.get("args")
        if not isinstance(model, LoRAModel):
            if ref_adapter_name is not None:
                raise TypeError(f"ref_adapter_name needs an hf_lora model, got {type(model).__name__}.")
            super().__init__(*bound.args, **bound.kwargs)
            return
        if targs is not None:
            given["args"] = targs = copy.copy(targs)  # the caller's arguments stay as they were
            if getattr(targs, "ddp_find_unused_parameters", 0) is None:
                targs.ddp_find_unused_parameters = False
        takes = _reference_param(self)
        if takes is None and ref_adapter_name is not None:
            raise TypeError(f"ref_adapter_name: {type(self).__name__} takes no reference model.")
        reference = ReferenceModel(model, ref_adapter_name) if takes else None
        beta = 0.0
        if takes == "ref_model":
            if given.get("ref_model") is None:
                given["ref_model"] = reference
            elif ref_adapter_name is not None:
                raise TypeError("pass either ref_model or ref_adapter_name, not both.")
        elif takes == "beta" and targs is not None:
            # GRPO loads a second copy of the base as its reference when its KL weight is non-zero: build it
            # with the weight at zero, then give it the weight back and the model itself as the reference.
            beta, targs.beta = targs.beta, 0.0
        with _adapters_shown(model):
            super().__init__(*bound.args, **bound.kwargs)
        if beta:
            self.args.beta = self.beta = beta
            self.ref_model = reference
        if getattr(self.args, "disable_dropout", False):
            _disable_lora_dropout(self.model)  # TRL's disable_dropout reaches peft's nn.Dropout modules too

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # transformers resumes from the highest-numbered checkpoint folder, even one a crash left half
        # written; resume from the last complete one instead.
        if resume_from_checkpoint is True and isinstance(self.model, LoRAModel):
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The adapter's card shows the run's metrics and loss curve, but transformers writes
        # trainer_state.json only after the model: hand the log to save_pretrained for this save.
        with self._card_log():
            return super()._save(output_dir, state_dict)

    def create_model_card(self, *args, **kwargs) -> None:
        # Its summary replaces README.md, and the model's create_or_update_model_card writes the adapter's
        # card again around it: with the run's metrics, as at save time. transformers calls that only
        # where README.md was a peft card already (not before the first save, nor without a root adapter).
        with self._card_log():
            super().create_model_card(*args, **kwargs)
            target = self.accelerator.unwrap_model(self.model)
            card = Path(self.args.output_dir) / "README.md"
            if isinstance(target, LoRAModel) and self.is_world_process_zero() and not is_generated_card(card):
                target.create_or_update_model_card(self.args.output_dir)

    @contextlib.contextmanager
    def _card_log(self) -> Iterator[None]:
        target = self.accelerator.unwrap_model(self.model)
        if not isinstance(target, LoRAModel):
            yield
            return
        setattr(target, LOG_HISTORY_ATTR, list(self.state.log_history))
        try:
            yield
        finally:
            target.__dict__.pop(LOG_HISTORY_ATTR, None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if isinstance(target, LoRAModel) and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            load_checkpoint_adapters(target, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        target = self.accelerator.unwrap_model(self.model)
        if isinstance(target, LoRAModel) and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            logger.info("loading the best adapter from %s", self.state.best_model_checkpoint)
            load_checkpoint_adapters(target, self.state.best_model_checkpoint)
        else:
            super()._load_best_model()


class LoRATrainer(LoRATrainerMixin, transformers.Trainer):
    """`transformers.Trainer` that can resume from, and restore the best of, adapter-only checkpoints."""


class ReferenceModel(nn.Module):
    """A LoRA model seen as the frozen reference of preference training: calls run the model itself with
    its adapters disabled (`adapter=None`) or with only `adapter` active, without gradients. It holds no
    parameters (the model is not a submodule, so `.to()` and optimizers leave it alone): no second copy.
    Attribute lookups it does not answer itself (config, backbone, output embeddings, generation config)
    go to the model, so trainers that patch or inspect their reference (TRL's fused LM head) see the
    model's own pieces."""

    def __init__(self, model: LoRAModel, adapter: str | None = None):
        super().__init__()
        if adapter is not None and adapter not in model.peft_config:
            raise AdapterStateError(
                f"reference adapter {adapter!r} is not in the model; it has {model.adapters}."
            )
        if adapter is not None and adapter in model.active_adapters:
            raise AdapterStateError(
                f"the reference adapter {adapter!r} is also the active (trained) one: load the starting adapter a "
                f"second time under another name for the policy, e.g. model.load_adapter(path, 'policy', "
                f"is_trainable=True); model.set_adapter('policy')."
            )
        object.__setattr__(self, "policy", model)
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "policy":  # not set yet (unpickling, copying): no model to ask
                raise
            return getattr(self.policy, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), self.reference_context(_batch_size(args, kwargs)):
            return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def reference_context(self, batch: int) -> Iterator[None]:
        """The model as the reference, inside the block."""
        if self.adapter is None:
            with self.policy.disable_adapter():
                yield
        else:
            with self.policy.adapter_rows([self.adapter] * batch):
                yield


def _reference_param(trainer: Any) -> str | None:
    """How this trainer class takes a reference model: "ref_model" (an argument: DPO, KTO), "beta" (made
    inside when its KL weight is non-zero: GRPO), or None."""
    params = inspect.signature(super(LoRATrainerMixin, trainer).__init__).parameters
    if "ref_model" in params:
        return "ref_model"
    return "beta" if "reward_funcs" in params else None


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("the reference model needs input_ids or inputs_embeds to know the batch size.")


@contextlib.contextmanager
def _adapters_shown(model: LoRAModel) -> Iterator[None]:
    """transformers' Trainer refuses a quantised model unless it sees adapters on it, which it knows only by
    peft's flag `_hf_peft_config_loaded`: raise the flag while the Trainer is built (only then: elsewhere
    it would make transformers call into peft)."""
    if not getattr(model, "is_quantized", False) or "_hf_peft_config_loaded" in vars(model):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded


def _disable_lora_dropout(model: LoRAModel) -> None:
    for _, layer in model.lora_layers():
        for name in layer.lora_dropout:
            layer.lora_dropout[name] = 0.0


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` whose trainer state (written last, after the adapter, optimizer and RNG
    state) is readable; newer folders a crash left incomplete are skipped, with a warning."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = sorted(
        (int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))
    )
    for _, path in reversed(steps):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            logger.warning("skipping %s: it is incomplete (the run stopped while writing it)", path)
            continue
        if (path / CONFIG_NAME).is_file() or any(path.glob(f"*/{CONFIG_NAME}")):
            return str(path)
    return None


def load_checkpoint_adapters(model: LoRAModel, checkpoint: str | os.PathLike) -> None:
    """Reload every adapter of `model` in place from a checkpoint written by its `save_pretrained`."""
    root = Path(checkpoint)
    if not (root / CONFIG_NAME).is_file() and not any(
        (root / n / CONFIG_NAME).is_file() for n in model.adapters
    ):
        raise FileNotFoundError(
            f"{root} holds no adapter ({CONFIG_NAME} missing); is it a {PREFIX_CHECKPOINT_DIR}-N folder of this run?"
        )
    for name in model.adapters:
        model.load_adapter(
            adapter_dir(root, name), name, is_trainable=not model.peft_config[name].inference_mode
        )
