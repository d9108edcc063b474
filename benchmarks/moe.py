"""A MoE LoRA training step (LoRA on the fused experts, `target_parameters`), hf_lora vs peft.

Micro-benchmark behind the "MoE" section of BENCHMARKS.md (not part of run.py): a Qwen3-MoE built from
a config, hidden 512, 8 experts of intermediate 1024, 2 routed per token, `--layers` blocks, vocabulary
1024; LoRA r=16 on `experts.gate_up_proj` and `experts.down_proj` only, AdamW. peft folds W + s B A into
the whole (E, out, in) expert stack on every forward (and its gradient on every backward); hf_lora adds
s (x A_e^T) B_e^T per routed token (two more grouped matmuls per projection through the low-rank
factors, or the loop over experts with `--experts eager`). Interleaved rounds (one step of each per round, two warm-up rounds),
medians [min-max]; then the peak memory of a process that trains each for 3 steps (RSS on CPU, allocated
memory on CUDA):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/moe.py [--rounds 6]
    python benchmarks/moe.py --device cuda --batch 8 --seq 512 --layers 8      # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def step(model, opt, ids) -> None:
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--experts", default="grouped_mm", help="transformers' experts implementation (or eager)"
    )
    parser.add_argument(
        "--peak-of", help="(internal) train this configuration 3 steps, print its peak memory"
    )
    args = parser.parse_args()
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    cuda = args.device == "cuda"
    if args.peak_of:
        model = build(args.peak_of, args.layers, args.device, args.experts)
        opt = torch.optim.AdamW(trainable(model), lr=1e-4)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(model, opt, ids)
        if cuda:
            print(torch.cuda.max_memory_allocated() // 1024)
        else:
            status = Path("/proc/self/status").read_text()
            print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        return
    models = {k: build(k, args.layers, args.device, args.experts) for k in KINDS}
    optims = {k: torch.optim.AdamW(trainable(m), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for round_ in range(args.rounds + 2):
        for k in KINDS:
            torch.manual_seed(round_)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(models[k], optims[k], ids)
            if cuda:
                torch.cuda.synchronize()
            if round_ >= 2:
                times[k].append(time.perf_counter() - t)
    where = (
        torch.cuda.get_device_name() + ", bf16" if cuda else f"CPU, {torch.get_num_threads()} threads, fp32"
    )
    print(
        f"Qwen3-MoE hidden 512, 8 experts x 1024, top-2, {args.layers} layers, batch {args.batch} x {args.seq}, "
        f"LoRA r=16 on the experts, {args.experts} experts; {where}"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in KINDS:
        spread = f"[{min(times[k]) * 1e3:.0f}-{max(times[k]) * 1e3:.0f}]"
        print(f"{k:10s} {med[k] * 1e3:8.0f} ms {spread}  {args.batch * args.seq / med[k]:8,.0f} tokens/s")
    print(f"hf_lora/peft step: {med['hf_lora'] / med['peft']:.3f}")
    del models, optims
    peak = {}
    for k in KINDS:
        cmd = [sys.executable, __file__, "--peak-of", k, "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq), "--layers", str(args.layers), "--experts", args.experts]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
        peak[k] = int(out) / 1024
        print(f"peak {'memory' if cuda else 'RSS'} {k:10s} {peak[k]:7.0f} MB")
    print(f"peak hf_lora/peft: {peak['hf_lora'] / peak['peft']:.3f}")


if __name__ == "__main__":
    main()
