"""What trainable token rows (`trainable_token_indices`) cost in a training step, hf_lora vs peft.

Micro-benchmark behind the "trainable tokens" lines in BENCHMARKS.md (not part of run.py): GPT-2-small
shape (vocabulary 50,257, tied head), batch 4 x 128, LoRA r=8 on c_attn/c_proj/c_fc, dropout 0, AdamW;
the same model with 16 trainable token rows in each library, and hf_lora's LoRA without rows as the
reference. Interleaved rounds (one step of each configuration per round), medians [min-max]; then the
peak memory of a process that trains each configuration for 3 steps (one process each, one after
another; `micro.py`): RSS on CPU from after building the model, allocated memory on CUDA (where the step
runs under bf16 autocast):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trainable_tokens.py [--rounds 8]
    python benchmarks/trainable_tokens.py --device cuda --batch 8 --seq 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import copy

import micro
import torch
from transformers import GPT2Config, GPT2LMHeadModel

TOKENS = list(range(50_241, 50_257))  # the last 16 ids, as new special tokens would be
TARGETS = ["c_attn", "c_proj", "c_fc"]


def build(kind: str, base: torch.nn.Module) -> torch.nn.Module:
    """A copy of `base` with LoRA, with or without the token rows, in hf_lora or peft."""
    model = copy.deepcopy(base)
    fields = dict(r=8, lora_alpha=16, target_modules=TARGETS)
    if kind.endswith("tokens"):
        fields["trainable_token_indices"] = TOKENS
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**fields))
    import hf_lora

    return hf_lora.get_lora_model(model, hf_lora.LoRAConfig(**fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    micro.common_arguments(parser, rounds=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(args.device)
    ids = torch.randint(0, 50_257, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids[:, ::8] = TOKENS[0]  # the new tokens occur in the batch
    ids = ids.to(args.device)
    kinds = ["hf_lora LoRA only", "hf_lora + tokens", "peft + tokens"]
    cuda = args.device == "cuda"
    if (
        args.peak_of
    ):  # peak RSS (CPU) or peak allocated memory (CUDA) of a process that trains one configuration
        model = build(args.peak_of, base)
        del base
        return micro.train_and_print_peak(model, ids, autocast=cuda)
    models = {k: build(k, base) for k in kinds}
    print(f"GPT-2-small, batch {args.batch} x {args.seq}, r=8, {len(TOKENS)} trainable tokens; "
          f"{micro.where(args.device, 'bf16 autocast')}")  # fmt: skip
    med = micro.time_steps(models, ids, args.rounds, autocast=cuda)
    for k in kinds[1:]:
        print(f"{k} / LoRA only: x{med[k] / med[kinds[0]]:.3f}")
    print(f"hf_lora/peft with tokens: {med[kinds[1]] / med[kinds[2]]:.3f}")
    del models
    flags = ["--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq)]
    peak = micro.peak_memory(__file__, kinds, args, flags)
    print(
        f"peak {'memory' if cuda else 'RSS'} hf_lora/peft with tokens: {peak[kinds[1]] / peak[kinds[2]]:.3f}"
    )


if __name__ == "__main__":
    main()
