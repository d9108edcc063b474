"""What the micro-benchmarks (qlora.py, moe.py, trainable_tokens.py) share: one training step, interleaved
timing rounds with medians, and the peak memory of a process that trains one configuration.

Each script builds its configurations and calls `time_steps` (one step of each per round, two warm-up
rounds, so every configuration sees the same machine state), then `peak_memory`, which runs the script
again once per configuration with `--peak-of KIND` (a fresh process each, one after another); that child
calls `train_and_print_peak`.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WARMUP = 2  # rounds not timed


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, autocast: bool = False
) -> None:
    """One AdamW training step of a causal LM on `ids` (bf16 autocast on the ids' device if asked)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def time_steps(
    models: dict[str, torch.nn.Module],
    ids: torch.Tensor,
    rounds: int,
    autocast: bool = False,
    seed: bool = True,
) -> dict[str, float]:
    """Interleaved rounds of one step of each model; prints and returns each one's median seconds.
    `seed`: reseed torch before each step (the same dropout masks for every model in a round)."""
    cuda = ids.device.type == "cuda"
    optims = {k: torch.optim.AdamW(trainable(m), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for round_ in range(rounds + WARMUP):
        for k, model in models.items():
            if seed:
                torch.manual_seed(round_)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, optims[k], ids, autocast)
            if cuda:
                torch.cuda.synchronize()
            if round_ >= WARMUP:
                times[k].append(time.perf_counter() - t)
    tokens = ids.numel()
    width = max(map(len, models))
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        spread = f"[{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}]"
        print(f"{k:{width}s} {median[k] * 1e3:8.0f} ms {spread}  {tokens / median[k]:8,.0f} tokens/s")
    return median


def where(device: str, autocast: str = "bf16") -> str:
    """The device line: the GPU's name, or the CPU's thread count."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {autocast}"
    return f"CPU, {torch.get_num_threads()} threads, fp32"


def train_and_print_peak(model: torch.nn.Module, ids: torch.Tensor, autocast: bool = False) -> None:
    """The child's side of `peak_memory`: train 3 steps, print the peak in KiB. On CPU the peak RSS from
    after building the model (what building freed goes back to the OS, then the high-water mark is
    reset: the resident model plus training); on CUDA the peak allocated memory, the model included."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    cuda = ids.device.type == "cuda"
    if not cuda:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # (Linux: resets VmHWM to the current RSS)
    for _ in range(3):
        step(model, opt, ids, autocast)
    if cuda:
        print(torch.cuda.max_memory_allocated() // 1024)
    else:
        status = Path("/proc/self/status").read_text()
        print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def peak_memory(
    script: str, kinds: list[str], args: argparse.Namespace, flags: list[str]
) -> dict[str, float]:
    """Run `script --peak-of KIND *flags` for each kind, one process after another; prints and returns
    each one's peak in MB."""
    cuda = args.device == "cuda"
    width = max(map(len, kinds))
    peak = {}
    for k in kinds:
        cmd = [sys.executable, script, "--peak-of", k, *flags]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
        peak[k] = int(out) / 1024
        print(f"peak {'memory' if cuda else 'RSS'} {k:{width}s} {peak[k]:7.0f} MB")
    return peak


def common_arguments(parser: argparse.ArgumentParser, rounds: int, batch: int = 4, seq: int = 128) -> None:
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument(
        "--peak-of", help="(internal) train this configuration 3 steps, print its peak memory"
    )
