"""TRL's SFTTrainer with hf_lora's mixin on a tiny Llama, for one process or under torchrun (DDP over gloo).
Writes rank<N>.safetensors (the adapter each rank ends with) and rank<N>.json (world size, losses)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import trl
from datasets import Dataset
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the tiny models
from tiny_models import make_model, word_tokenizer

import hf_lora


class SFT(hf_lora.LoRATrainerMixin, trl.SFTTrainer):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{i}" for i in torch.randint(2, 128, (10,), generator=g).tolist()) for _ in range(32)]
    model = hf_lora.get_lora_model(
        make_model("llama"),
        hf_lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    config = trl.SFTConfig(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=16,
        learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
        save_strategy="no", bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFT(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                  processing_class=word_tokenizer())  # fmt: skip
    trainer.train()
    rank = trainer.args.process_index
    save_file(hf_lora.adapter_state_dict(model), args.out / f"rank{rank}.safetensors")
    facts = {"world_size": trainer.args.world_size, "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
             "find_unused_parameters": trainer.args.ddp_find_unused_parameters}  # fmt: skip
    (args.out / f"rank{rank}.json").write_text(json.dumps(facts))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
