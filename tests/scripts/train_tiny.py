"""Train a tiny GPT-2 with LoRA in one of several setups; the tests launch this as a subprocess.

    python tests/scripts/train_tiny.py --out DIR --setup trainer [--resume] [--kill-after-save 4]
    torchrun --nproc_per_node 2 tests/scripts/train_tiny.py --out DIR --setup fsdp2

Every setup sees the same global batches, so their final adapters can be compared across setups.
Each rank writes `rank<r>.json` (world size, find_unused_parameters, ...) and `rank<r>.safetensors`
(its copy of the adapter); the main process alone writes the adapter to `DIR/final`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import hf_lora

VOCAB, SEQ, N_SAMPLES = 96, 16, 64


def build_model(args) -> hf_lora.LoRAModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    lora = hf_lora.LoRAConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=args.dropout,
        modules_to_save=args.modules_to_save,
        target_modules=args.targets,
        trainable_token_indices=args.tokens,
    )
    model = hf_lora.get_lora_model(model, lora)
    torch.manual_seed(1)  # B != 0 from the start, so every step moves the logits
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B["default"].normal_(std=0.02)
    return model


def samples() -> list[dict]:
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(1, VOCAB, (N_SAMPLES, SEQ), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist(), "text": "unused column"} for row in ids]


def global_batches(global_batch: int, steps: int):
    data = torch.tensor([s["input_ids"] for s in samples()])
    for step in range(steps):
        idx = torch.arange(step * global_batch, (step + 1) * global_batch) % N_SAMPLES
        yield data[idx]


def write_rank_report(out: Path, model, **facts) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = hf_lora.adapter_state_dict(model)
    save_file(tensors, out / f"rank{rank}.safetensors")
    facts |= {"world_size": dist.get_world_size() if dist.is_initialized() else 1, "rank": rank}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


class FailOnRank(TrainerCallback):
    """Raise on one rank at one step: the other rank must not wait for it forever."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


class KillAfterSave(TrainerCallback):
    """SIGKILL the process right after checkpoint `step` is on disk: a crash, with no cleanup."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_trainer(args, out: Path) -> None:
    from datasets import Dataset

    model = build_model(args)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps", save_steps=args.save_steps,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, bf16=args.bf16, gradient_checkpointing=args.gc, remove_unused_columns=True,
    )  # fmt: skip
    trainer_cls = hf_lora.LoRATrainer if args.trainer == "lora" else __import__("transformers").Trainer
    callbacks = [KillAfterSave(args.kill_after_save)] if args.kill_after_save else []
    if args.fail_rank is not None:
        callbacks.append(FailOnRank(args.fail_rank, step=2))
    trainer = trainer_cls(
        model=model, args=targs, train_dataset=Dataset.from_list(samples()), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    ddp = trainer.model_wrapped if trainer.model_wrapped is not trainer.model else None
    write_rank_report(out, model, find_unused_parameters=getattr(ddp, "find_unused_parameters", None),
                      losses=[e["loss"] for e in trainer.state.log_history if "loss" in e])  # fmt: skip
    trainer.save_model(str(out / "final"))


def run_loop(args, out: Path) -> None:
    """A hand-written loop: accelerate (DDP) or torch FSDP2 / FSDP1, all with the same global batches."""
    model = build_model(args)
    rank, world = 0, 1
    if args.setup == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        wrapped, opt = accelerator.prepare(model, opt)
        backward = accelerator.backward
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.setup == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            wrapped = fully_shard(model)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)

        def backward(loss):
            loss.backward()

    per_rank = args.batch
    for batch in global_batches(per_rank * world, args.steps):
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        loss = wrapped(input_ids=mine, labels=mine).loss
        backward(loss)
        opt.step()
        opt.zero_grad()
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    state_dict = None
    if args.setup == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
        ):
            state_dict = wrapped.state_dict()
    # every rank takes part in gathering; only the main process writes
    model.save_pretrained(out / "final", state_dict=state_dict, is_main_process=rank == 0)
    report_model = model
    if sharded or state_dict is not None:  # compare what was saved, gathered
        if dist.is_initialized():
            dist.barrier()
        report_model = hf_lora.LoRAModel.from_pretrained(build_model_base(), out / "final")
    write_rank_report(out, report_model, find_unused_parameters=getattr(wrapped, "find_unused_parameters", None),
                      sharded=sharded)  # fmt: skip


def build_model_base():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0))  # fmt: skip


def record_writes(out: Path) -> None:
    """Log the rank of every process that writes adapter files, so a test can check only rank 0 did."""
    import hf_lora.serialization as ser

    write = ser.atomic_write_files  # (save_pretrained writes every adapter's files through it, at once)

    def logged(*args, **kwargs):
        rank = os.environ.get("RANK", "0")
        with open(out / "writes.log", "a") as f:
            f.write(f"{rank}\n")
        return write(*args, **kwargs)

    ser.atomic_write_files = logged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--setup", choices=["trainer", "accelerate", "fsdp2", "fsdp1"], default="trainer")
    p.add_argument("--trainer", choices=["plain", "lora"], default="lora")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--modules-to-save", nargs="*", default=None)
    p.add_argument("--targets", nargs="*", default=None, help="target_modules (default: GPT-2's)")
    p.add_argument("--tokens", nargs="*", type=int, default=None, help="trainable_token_indices")
    p.add_argument("--kill-after-save", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail-rank", type=int, default=None, help="raise on this rank at step 2")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gc", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record_writes(args.out)
    (run_trainer if args.setup == "trainer" else run_loop)(args, args.out)
    if dist.is_available() and dist.is_initialized():
        # Every rank done before the group goes, and the group gone before the interpreter exits: a gloo
        # group torn down at exit once aborted a rank ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
