"""Where unmerged LoRA inference spends its extra time, per projection of a Llama decoder layer.

Micro-benchmark behind the "unmerged inference on Llama" commentary in BENCHMARKS.md (not part of
run.py): for SmolLM2-135M's projection shapes and 512 tokens, under no_grad, interleaved medians of

- base:  x @ W.T
- lora:  what hf_lora runs, y = x @ W.T; y += s * (x @ A.T) @ B.T   (in place, addmm_)
- fold:  x @ [W; A].T in one GEMM, then y += s * h @ B.T on its first columns (needs W and A in one
         storage, and the base output then comes from a wider GEMM: not bit-identical)
- the skinny GEMM alone, x @ A.T and A @ x.T, on the usual threads and on one.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/unmerged_gemms.py
"""

from __future__ import annotations

import statistics
import time

import torch

TOKENS, RANK, SCALING = 512, 8, 2.0
SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
          "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}  # fmt: skip


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def variants_for(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> dict:
    n_out = W.shape[0]
    WA = torch.cat([W, A]).contiguous()  # (out + r, in)

    def lora():
        y = x @ W.T
        return y.addmm_(x @ A.T, B.T, alpha=SCALING)

    def fold():
        out = x @ WA.T
        return out[:, :n_out].addmm_(out[:, n_out:], B.T, alpha=SCALING)

    return {
        "base": lambda: x @ W.T,
        "lora": lora,
        "fold": fold,
        "x@A.T": lambda: x @ A.T,
        "A@x.T": lambda: A @ x.T,
    }


def main() -> None:
    torch.manual_seed(0)
    totals = {"base": 0.0, "lora": 0.0, "fold": 0.0}
    with torch.no_grad():
        for name, (n_in, n_out) in SHAPES.items():
            x = torch.randn(TOKENS, n_in)
            W, A, B = (
                torch.randn(n_out, n_in) / n_in**0.5,
                torch.randn(RANK, n_in) / n_in**0.5,
                torch.randn(n_out, RANK),
            )

            variants = variants_for(x, W, A, B)
            samples = {k: [] for k in variants}
            for _ in range(5):  # interleaved rounds
                for k, fn in variants.items():
                    samples[k].append(median_ms(fn))
            ms = {k: statistics.median(v) for k, v in samples.items()}
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            one_thread = median_ms(variants["A@x.T"])
            torch.set_num_threads(threads)
            for k in totals:
                totals[k] += ms[k]
            print(
                f"{name:5s} base {ms['base']:.3f} ms | lora {ms['lora'] / ms['base']:.3f}x | fold {ms['fold'] / ms['base']:.3f}x"
                f" | x@A.T {ms['x@A.T']:.3f} ms, A@x.T {ms['A@x.T']:.3f} ms, on 1 thread {one_thread:.3f} ms"
            )
    print(
        f"all seven: base {totals['base']:.2f} ms, lora +{100 * (totals['lora'] / totals['base'] - 1):.1f} %, "
        f"fold +{100 * (totals['fold'] / totals['base'] - 1):.1f} %"
    )


if __name__ == "__main__":
    main()
