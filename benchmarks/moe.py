"""A MoE LoRA training step (LoRA on the fused experts, `target_parameters`), hf_lora vs peft.

Micro-benchmark behind the "MoE" section of BENCHMARKS.md (not part of run.py): a Qwen3-MoE built from
a config, hidden 512, 8 experts of intermediate 1024, 2 routed per token, `--layers` blocks, vocabulary
1024; LoRA r=16 on `experts.gate_up_proj` and `experts.down_proj` only, AdamW. peft folds W + s B A into
the whole (E, out, in) expert stack on every forward (and its gradient on every backward); hf_lora adds
s (x A_e^T) B_e^T per routed token (two more grouped matmuls per projection through the low-rank
factors, or the loop over experts with `--experts eager`). Interleaved rounds (one step of each per round, two warm-up rounds),
medians [min-max]; then the peak memory of a process that trains each for 3 steps (`micro.py`: RSS on
CPU from after building the model, allocated memory on CUDA):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/moe.py [--rounds 6]
    python benchmarks/moe.py --device cuda --batch 8 --seq 512 --layers 8      # on a GPU
"""

from __future__ import annotations

import argparse

import micro
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

KINDS = ["hf_lora", "peft"]
LORA = dict(r=16, lora_alpha=32, target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def build(kind: str, layers: int, device: str, experts: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=1024, num_experts=8, num_experts_per_tok=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_hidden_layers=layers, vocab_size=1024,
    )  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen3MoeForCausalLM(config).to(device, dtype)
    model.set_experts_implementation(experts)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**LORA))
    import hf_lora

    return hf_lora.get_lora_model(model, hf_lora.LoRAConfig(**LORA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    micro.common_arguments(parser, rounds=6)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--experts", default="grouped_mm", help="transformers' experts implementation (or eager)"
    )
    args = parser.parse_args()
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    if args.peak_of:
        return micro.train_and_print_peak(build(args.peak_of, args.layers, args.device, args.experts), ids)
    models = {k: build(k, args.layers, args.device, args.experts) for k in KINDS}
    print(
        f"Qwen3-MoE hidden 512, 8 experts x 1024, top-2, {args.layers} layers, batch {args.batch} x {args.seq}, "
        f"LoRA r=16 on the experts, {args.experts} experts; {micro.where(args.device)}"
    )
    med = micro.time_steps(models, ids, args.rounds)
    print(f"hf_lora/peft step: {med['hf_lora'] / med['peft']:.3f}")
    del models
    flags = ["--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
             "--layers", str(args.layers), "--experts", args.experts]  # fmt: skip
    peak = micro.peak_memory(__file__, KINDS, args, flags)
    print(f"peak hf_lora/peft: {peak['hf_lora'] / peak['peft']:.3f}")


if __name__ == "__main__":
    main()
