"""What trainable token rows (`trainable_token_indices`) cost in a training step, hf_lora vs peft.

Micro-benchmark behind the "trainable tokens" lines in BENCHMARKS.md (not part of run.py): GPT-2-small
shape (vocabulary 50,257, tied head), batch 4 x 128, LoRA r=8 on c_attn/c_proj/c_fc, dropout 0, AdamW;
the same model with 16 trainable token rows in each library, and hf_lora's LoRA without rows as the
reference. Interleaved rounds (one step of each configuration per round), medians [min-max]; then the
peak memory of a process that trains each configuration for 3 steps (one process each, one after
another): RSS on CPU, allocated memory on CUDA (where the step runs under bf16 autocast):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trainable_tokens.py [--rounds 8]
    python benchmarks/trainable_tokens.py --device cuda --batch 8 --seq 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def step(model, opt, ids, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # (bf16 on a GPU)
        loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--peak-of", help="(internal) train this configuration 3 steps, print its peak memory"
    )
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
        opt = torch.optim.AdamW(trainable(model), lr=1e-4)
        for _ in range(3):
            step(model, opt, ids, args.device)
        if cuda:
            print(torch.cuda.max_memory_allocated() // 1024)
        else:
            status = Path("/proc/self/status").read_text()
            print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        return
    models = {k: build(k, base) for k in kinds}
    optims = {k: torch.optim.AdamW(trainable(m), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(args.rounds + 2):
        for k in kinds:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(models[k], optims[k], ids, args.device)
            if cuda:
                torch.cuda.synchronize()
            if round_ >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t)
    ref = statistics.median(times[kinds[0]])
    where = (
        torch.cuda.get_device_name() + ", bf16 autocast"
        if cuda
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"GPT-2-small, batch {args.batch} x {args.seq}, r=8, {len(TOKENS)} trainable tokens; {where}")
    for k in kinds:
        med = statistics.median(times[k])
        spread = f"[{min(times[k]) * 1e3:.0f}-{max(times[k]) * 1e3:.0f}]"
        tokens_per_s = args.batch * args.seq / med
        print(f"{k:20s} {med * 1e3:7.0f} ms {spread}  x{med / ref:.3f}  {tokens_per_s:,.0f} tokens/s")
    ours, theirs = statistics.median(times[kinds[1]]), statistics.median(times[kinds[2]])
    print(f"hf_lora/peft with tokens: {ours / theirs:.3f}")
    del models, optims
    peak = {}
    for k in kinds:
        cmd = [sys.executable, __file__, "--peak-of", k, "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq)]  # fmt: skip
        peak[k] = (
            int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024
        )
        print(f"peak {'memory' if cuda else 'RSS'} {k:20s} {peak[k]:7.0f} MB")
    print(
        f"peak {'memory' if cuda else 'RSS'} hf_lora/peft with tokens: {peak[kinds[1]] / peak[kinds[2]]:.3f}"
    )


if __name__ == "__main__":
    main()
