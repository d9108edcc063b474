"""`transformers.Trainer` integration.

A LoRA model is a `PreTrainedModel` of its own class, so a plain `Trainer` already trains it, sees its
forward signature, and saves checkpoints and `save_model()` through its `save_pretrained`, which writes
the adapter only. What a plain Trainer cannot do is read such a checkpoint back: it only knows full
weights and peft's own class. It then stops with an error on resume (`Can't find a checkpoint index`)
and for `load_best_model_at_end` (a missing `pytorch_model.bin`), except that for an adapter not named
"default" (saved in a subfolder) it only logs "Could not locate the best model" and keeps the last weights.

`LoRATrainer` is the drop-in that closes that gap: resume and best-model restore load the adapter, and
DDP runs without `find_unused_parameters` (every trainable LoRA weight is used in every step, so the
graph walk transformers turns on by default is pure cost).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .model import LoRAModel
from .model_card import is_generated_card
from .serialization import CONFIG_NAME, adapter_dir

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class LoRATrainer(transformers.Trainer):
    """`transformers.Trainer` that can resume from, and restore the best of, adapter-only checkpoints."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if args is not None and isinstance(model, LoRAModel) and args.ddp_find_unused_parameters is None:
            args = copy.copy(args)  # the caller's arguments stay as they were
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *rest, **kwargs)

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
        target._card_log_history = list(self.state.log_history)
        try:
            yield
        finally:
            target.__dict__.pop("_card_log_history", None)

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
