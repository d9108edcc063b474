"""What trainable token rows (`trainable_token_indices`) cost in a training step, hf_lora vs peft.

Micro-benchmark behind the "trainable tokens" lines in BENCHMARKS.md (not part of run.py): GPT-2-small
shape (vocabulary 50,257, tied head), batch 4 x 128, LoRA r=8 on c_attn/c_proj/c_fc, dropout 0, AdamW;
the same model with 16 trainable token rows in each library, and hf_lora's LoRA without rows as the
reference. Interleaved rounds (one step of each configuration per round), medians [min-max]; then the
peak RSS of a process that trains each configuration for 3 steps (one process each, run one after another):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trainable_tokens.py [--rounds 8]
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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--peak-rss-of", help="(internal) train this configuration 3 steps, print VmHWM")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, 50_257, (4, 128), generator=torch.Generator().manual_seed(0))
    ids[:, ::8] = TOKENS[0]  # the new tokens occur in the batch
    kinds = ["hf_lora LoRA only", "hf_lora + tokens", "peft + tokens"]
    if args.peak_rss_of:
        model = build(args.peak_rss_of, base)
        del base
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        status = Path("/proc/self/status").read_text()
        print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        return
    models = {k: build(k, base) for k in kinds}
    optims = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(args.rounds + 2):
        for k in kinds:
            t = time.perf_counter()
            models[k](ids, labels=ids).loss.backward()
            optims[k].step()
            optims[k].zero_grad()
            if round_ >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t)
    ref = statistics.median(times[kinds[0]])
    print(
        f"GPT-2-small, batch 4 x 128, r=8, {len(TOKENS)} trainable tokens, torch threads {torch.get_num_threads()}"
    )
    for k in kinds:
        med = statistics.median(times[k])
        print(
            f"{k:20s} {med * 1e3:7.0f} ms [{min(times[k]) * 1e3:.0f}-{max(times[k]) * 1e3:.0f}]  x{med / ref:.3f}"
        )
    ours, theirs = statistics.median(times[kinds[1]]), statistics.median(times[kinds[2]])
    print(f"hf_lora/peft with tokens: {ours / theirs:.3f}")
    del models, optims
    peak = {}
    for k in kinds:
        cmd = [sys.executable, __file__, "--peak-rss-of", k]
        peak[k] = (
            int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024
        )
        print(f"peak RSS {k:20s} {peak[k]:7.0f} MB")
    print(f"peak RSS hf_lora/peft with tokens: {peak[kinds[1]] / peak[kinds[2]]:.3f}")


if __name__ == "__main__":
    main()
