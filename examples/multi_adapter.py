"""One base model, one small adapter per task, switched per request or mixed in one batch.

The promise of LoRA: instead of storing a full fine-tuned model per task, train a few LoRA matrices per
task and switch them at inference. Here the two "tasks" are two styles of text: news headlines (the
Guardian, 2020) and film reviews (Rotten Tomatoes). We train one adapter on each, then

1. measure each adapter on each kind of text (each should be best on its own),
2. answer requests with the adapter each one asks for, switching between requests,
3. answer all of them in ONE batch, one adapter per row (`adapter_names=[...]`), with the same outputs,
4. save both adapters and compare their size with one full model per task,
5. merge the two into ONE adapter by each of peft's recipes (`add_weighted_adapter`: cat, svd, linear,
   TIES, DARE, magnitude pruning) and measure what each merged adapter keeps of each task.

    python examples/multi_adapter.py                 # SmolLM2-135M (offline asset), a few minutes on CPU
    python examples/multi_adapter.py --model gpt2    # with Hub access
    python examples/multi_adapter.py --tiny          # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    check_range,
    disk_size,
    human_bytes,
    lm_loss,
    load_causal_lm,
    load_texts,
    parse_with_presets,
    print_table,
    seed_everything,
    setup_logging,
    text_perplexity,
)

import hf_lora

TASKS = {"news": "guardian", "reviews": "rotten_tomatoes"}
PROMPTS = {"news": "Government announces", "reviews": "The film is"}
# --tiny fills in whatever you do not set yourself: `--tiny --steps 20` keeps the 20
PRESETS = {"tiny": dict(model="tiny", steps=8, batch_size=4)}
# every combination type of add_weighted_adapter; the pruning ones keep half of each adapter's entries
RECIPES = ["cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="Hub id, local path, or asset name (smollm2, tiny)")
    p.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32, help="tokens per text")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--output-dir", type=Path, default=Path("runs/multi_adapter"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tiny", action="store_true", help=f"tiny random model, few steps: a smoke test {PRESETS['tiny']}"
    )
    args = parse_with_presets(p, argv, PRESETS)
    for flag in ("--steps", "--batch-size", "--max-length", "--r"):
        check_range(p, args, flag, 1)
    return args


def train_adapter(model, tokenizer, name: str, texts: list[str], args) -> float:
    """Plain PyTorch loop: only adapter `name` is active, so only its weights train."""
    model.set_adapter(name)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = texts[(step * args.batch_size) % len(texts) :][: args.batch_size]
        loss = lm_loss(model, tokenizer, batch, args.max_length)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], adapter_names: list[str] | None = None) -> list[str]:
    tokenizer.padding_side = "left"  # generation continues on the right
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    out = model.generate(
        **enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    seed_everything(args.seed)
    model, tokenizer = load_causal_lm(args.model)
    # what one fully fine-tuned copy keeps: every weight of the base model (measured before LoRA is added)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    data = {task: load_texts(name, 64) for task, name in TASKS.items()}

    # One adapter per task on the same base. The first call makes the model a LoRAModel.
    cfg = hf_lora.LoRAConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = hf_lora.get_lora_model(model, cfg, adapter_name="news")
    model.add_adapter("reviews", cfg)
    model.print_trainable_parameters()
    times = {task: train_adapter(model, tokenizer, task, data[task][0], args) for task in TASKS}

    # 1. Each adapter on each kind of text.
    rows = []
    for adapter in [None, *TASKS]:
        ppl = []
        for task in TASKS:
            if adapter is None:
                with model.disable_adapter():
                    ppl.append(text_perplexity(model, tokenizer, data[task][1], args.max_length))
            else:
                model.set_adapter(adapter)
                ppl.append(text_perplexity(model, tokenizer, data[task][1], args.max_length))
        train_time = f"{times[adapter]:.1f} s" if adapter else "-"
        rows.append([adapter or "base model", *(f"{p:.1f}" for p in ppl), train_time])
    print_table(
        "Held-out perplexity (lower is better)", ["adapter", *(f"on {t}" for t in TASKS), "train time"], rows
    )

    # 2. Requests, each with the adapter it asks for: switch between them.
    requests = [("news", PROMPTS["news"]), ("reviews", PROMPTS["reviews"]), ("__base__", PROMPTS["reviews"])]
    one_by_one = []
    for adapter, prompt in requests:
        if adapter == "__base__":
            with model.disable_adapter():
                one_by_one += generate(model, tokenizer, [prompt])
        else:
            model.set_adapter(adapter)
            one_by_one += generate(model, tokenizer, [prompt])
    # 3. The same requests in one batch, one adapter per row.
    mixed = generate(model, tokenizer, [p for _, p in requests], adapter_names=[a for a, _ in requests])
    print_table(
        "Generations: switched per request == one mixed batch",
        ["adapter", "prompt", "continuation", "same in mixed batch"],
        [[a, p, c, "yes" if c == m else "NO"] for (a, p), c, m in zip(requests, one_by_one, mixed)],
    )

    # 4. What it costs on disk: two adapters vs two full models.
    model.save_pretrained(args.output_dir)
    # just the files this run wrote (the folder may hold older ones)
    adapters = sum(disk_size(args.output_dir / task / "adapter_model.safetensors") for task in TASKS)
    print_table(
        "Storage for two tasks",
        ["what", "size"],
        [["two adapters (news/ and reviews/: one subfolder each)", human_bytes(adapters)],
         ["two full fine-tuned models", human_bytes(2 * full)],
         ["ratio", f"{2 * full / adapters:.0f}x smaller"]],
    )  # fmt: skip
    print(
        f"\nadapters saved to {args.output_dir}/ (load both: LoRAModel.from_pretrained(base, dir, all_adapters=True))"
    )
    merge_recipes(model, tokenizer, data, rows[1:], args)
    if one_by_one != mixed:
        raise SystemExit("mixed-batch generations differ from per-request ones")


def merge_recipes(model, tokenizer, data, separate: list[list[str]], args) -> None:
    """5. Both adapters merged into one by each recipe (weights 1 and 1: the sum of the two updates, which
    "cat" holds exactly; density 0.5 for the pruning recipes, DARE's drops seeded), each task's perplexity.
    (svd_full_matrices=False: the same leading singular vectors as peft's default full SVD, much faster.)"""
    rows = [[f"{name} alone", *ppl] for name, *ppl, _ in separate]
    for recipe in RECIPES:
        density = 0.5 if recipe.startswith(("ties", "dare", "magnitude")) else None
        start = time.perf_counter()
        model.add_weighted_adapter(
            list(TASKS),
            [1.0, 1.0],
            "merged",
            recipe,
            density=density,
            seed=args.seed,
            svd_full_matrices=False,
        )
        took = time.perf_counter() - start
        model.set_adapter("merged")
        ppl = [text_perplexity(model, tokenizer, data[task][1], args.max_length) for task in TASKS]
        rows.append([recipe, *(f"{p:.1f}" for p in ppl), f"{took:.2f} s"])
        model.set_adapter(next(iter(TASKS)))
        model.delete_adapter("merged")
    for row in rows[: len(separate)]:
        row.append("-")
    print_table(
        "One adapter for both tasks: held-out perplexity per merge recipe (lower is better)",
        ["recipe", *(f"on {t}" for t in TASKS), "merge time"],
        rows,
    )


if __name__ == "__main__":
    main()
