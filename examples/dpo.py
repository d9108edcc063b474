"""Preference training with TRL on one copy of the model: SFT, then DPO against the SFT adapter.

DPO compares the model being trained (the policy) with a frozen reference, usually the SFT model it
starts from. TRL loads that reference as a second full model unless it can switch an adapter off; with
`hf_lora.LoRATrainerMixin` the reference is the same model with the SFT adapter active, so the base
model's weights are held once. The data is real and offline: Rotten Tomatoes reviews, paired per movie.

1. SFT: LoRA learns to write a review after "A review of <movie>:" (fresh and rotten ones alike).
2. DPO: for held-in movies, a fresh review is chosen and a rotten one of the same movie rejected; the
   policy (a trainable copy of the SFT adapter) learns to prefer the fresh kind.
3. On held-out movies: how often each model gives the fresh review the higher log-probability per token
   (base, SFT, DPO), DPO's reward accuracy and margin, and the peak memory of the DPO phase, which
   `--reference copy` measures against the usual second full copy of the model as the reference.

    python examples/dpo.py                      # SmolLM2-135M (offline asset), a few minutes on CPU
    python examples/dpo.py --reference copy     # the same, with a second full model as the reference
    python examples/dpo.py --tiny               # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    Timer,
    check_range,
    fast_bf16,
    human_bytes,
    human_seconds,
    load_causal_lm,
    parse_with_presets,
    peak_memory_bytes,
    print_table,
    read_csv_rows,
    reset_peak_memory,
    seed_everything,
    setup_logging,
)

import hf_lora

PRESETS = {
    "tiny": dict(
        model="tiny", sft_steps=4, dpo_steps=4, eval_pairs=8, batch_size=2, max_length=48, bf16=False
    )
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="Hub id, local path, or asset name (smollm2, tiny)")
    p.add_argument("--reviews", default="rotten_tomatoes", help="CSV with category (fresh/rotten), text and "
                   "movie_name columns, or rotten_tomatoes (the full 13,905-row asset)")  # fmt: skip
    p.add_argument("--reference", choices=["adapter", "copy"], default="adapter",
                   help="DPO's reference: the SFT adapter in the same model (default), or a second full model")  # fmt: skip
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--dpo-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4, help="reviews (SFT) or pairs (DPO) per step")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48, help="tokens per prompt + review")
    p.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: where bf16 matmuls are fast: CPUs with AVX512-BF16/AMX, recent GPUs)")  # fmt: skip
    p.add_argument("--output-dir", type=Path, help="default: runs/dpo_<model>/")
    p.add_argument("--sft-adapter", type=Path, help="skip SFT: start DPO from this earlier run's sft/ folder")
    p.add_argument("--tiny", action="store_true", help="random tiny model, a few steps: a smoke test")
    p.add_argument("-v", "--verbose", action="store_true")
    args = parse_with_presets(p, argv, PRESETS)
    for flag in ("--sft-steps", "--dpo-steps", "--batch-size", "--r", "--max-length", "--eval-pairs"):
        check_range(p, args, flag, 1)
    check_range(p, args, "--beta", 0, low_open=True)
    args.output_dir = args.output_dir or Path("runs") / f"dpo_{args.model}"
    args.bf16 = fast_bf16() if args.bf16 is None else args.bf16
    return args


# ---- data ------------------------------------------------------------------------------------------


def prompt_for(movie: str) -> str:
    return f"A review of {movie}:"


def load_pairs(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(SFT examples, DPO train pairs, held-out pairs). Movies are split, not reviews: no held-out movie's
    reviews are seen in training. Each pair is one fresh and one rotten review of the same movie."""
    if args.reviews == "rotten_tomatoes":
        from assets import rotten_tomatoes_csv

        path = rotten_tomatoes_csv(full=True)
    elif not (path := Path(args.reviews).expanduser()).is_file():
        raise SystemExit(f"--reviews: no file {path}")
    reviews: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"fresh": [], "rotten": []})
    for row in read_csv_rows(path):
        if row.get("category") in ("fresh", "rotten") and row.get("movie_name") and row.get("text"):
            reviews[row["movie_name"]][row["category"]].append(" ".join(row["text"].split()))
    movies = sorted(m for m, r in reviews.items() if r["fresh"] and r["rotten"])
    random.Random(args.seed).shuffle(movies)
    rng = random.Random(args.seed + 1)

    def pairs(names: list[str]) -> list[dict]:
        out = []
        for movie in names:
            fresh, rotten = list(reviews[movie]["fresh"]), list(reviews[movie]["rotten"])
            rng.shuffle(fresh)
            rng.shuffle(rotten)
            out += [
                {"prompt": prompt_for(movie), "chosen": " " + f, "rejected": " " + r}
                for f, r in zip(fresh, rotten)
            ]
        return out

    n_eval = max(1, len(movies) // 5)
    held_out, train = pairs(movies[:n_eval])[: args.eval_pairs], pairs(movies[n_eval:])
    sft = [{"prompt": prompt_for(m), "completion": " " + t} for m in movies[n_eval:] for k in ("fresh", "rotten")
           for t in reviews[m][k]]  # fmt: skip
    rng.shuffle(sft)
    return sft, train, held_out


# ---- scoring ---------------------------------------------------------------------------------------


@torch.no_grad()
def completion_logps(
    model, tokenizer, prompts: list[str], completions: list[str], max_length: int
) -> torch.Tensor:
    """Mean log-probability per token of each completion after its prompt, in one right-padded batch."""
    starts = [len(tokenizer(p)["input_ids"]) for p in prompts]
    batch = tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                      truncation=True, max_length=max_length, padding_side="right")  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1): log p(token t+1 | tokens <= t)
    positions = torch.arange(ids.shape[1] - 1)[None]
    scored = (positions >= torch.tensor(starts)[:, None] - 1) & mask[:, 1:].bool()  # the completion's tokens
    return (picked * scored).sum(1) / scored.sum(1).clamp(min=1)


def preference_accuracy(model, tokenizer, pairs: list[dict], max_length: int, batch: int = 16) -> float:
    """How often the fresh review gets the higher log-probability per token."""
    model.eval()
    wins = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        prompts = [p["prompt"] for p in chunk]
        chosen = completion_logps(model, tokenizer, prompts, [p["chosen"] for p in chunk], max_length)
        rejected = completion_logps(model, tokenizer, prompts, [p["rejected"] for p in chunk], max_length)
        wins += (chosen > rejected).sum().item()
    return wins / len(pairs)


# ---- training --------------------------------------------------------------------------------------


def trl_args(config_cls, args, steps: int, out: Path, **extra):
    return config_cls(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_length=args.max_length, logging_steps=max(1, steps // 10), save_strategy="no", report_to=[],
        seed=args.seed, use_cpu=True, bf16=args.bf16, dataloader_num_workers=0, **extra,
    )  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(args.seed)
    import trl
    from datasets import Dataset

    class SFT(hf_lora.LoRATrainerMixin, trl.SFTTrainer):
        pass

    class DPO(hf_lora.LoRATrainerMixin, trl.DPOTrainer):
        pass

    args.output_dir.mkdir(parents=True, exist_ok=True)
    sft_data, train_pairs, held_out = load_pairs(args)
    base, tokenizer = load_causal_lm(args.model)
    print(
        f"{len(sft_data):,} reviews for SFT, {len(train_pairs):,} training pairs, {len(held_out)} held-out pairs"
    )

    lora = hf_lora.LoRAConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear")
    if args.sft_adapter:  # an earlier run's SFT adapter: skip straight to DPO
        model = hf_lora.LoRAModel.from_pretrained(base, args.sft_adapter, adapter_name="sft", subfolder="sft")
    else:
        model = hf_lora.get_lora_model(base, lora, adapter_name="sft")
    with model.disable_adapter():
        acc_base = preference_accuracy(model, tokenizer, held_out, args.max_length)
    with Timer() as sft_time:
        if not args.sft_adapter:
            SFT(model=model, args=trl_args(trl.SFTConfig, args, args.sft_steps, args.output_dir / "trainer_sft"),
                train_dataset=Dataset.from_list(sft_data), processing_class=tokenizer).train()  # fmt: skip
    model.save_pretrained(args.output_dir / "sft")
    acc_sft = preference_accuracy(model, tokenizer, held_out, args.max_length)

    # The policy: a trainable copy of the SFT adapter; the SFT adapter itself stays frozen as the reference.
    model.load_adapter(args.output_dir / "sft", adapter_name="policy", subfolder="sft", is_trainable=True)
    model.set_adapter("policy")
    reference: dict = {"ref_adapter_name": "sft"}
    reset_peak_memory()
    if args.reference == "copy":  # what TRL does without the mixin: a second full model
        copy_base, _ = load_causal_lm(args.model)
        reference = {
            "ref_model": hf_lora.LoRAModel.from_pretrained(
                copy_base, args.output_dir / "sft", subfolder="sft"
            ).merge_and_unload()
        }
    dpo = DPO(model=model, args=trl_args(trl.DPOConfig, args, args.dpo_steps, args.output_dir / "trainer_dpo", beta=args.beta),
              train_dataset=Dataset.from_list(train_pairs), eval_dataset=Dataset.from_list(held_out),
              processing_class=tokenizer, **reference)  # fmt: skip
    with Timer() as dpo_time:
        dpo.train()
    peak = peak_memory_bytes()
    metrics = dpo.evaluate()
    acc_dpo = preference_accuracy(model, tokenizer, held_out, args.max_length)
    model.save_pretrained(args.output_dir / "dpo", selected_adapters=["policy"])  # in dpo/policy/

    first_loss = next(e["loss"] for e in dpo.state.log_history if "loss" in e)
    results = {
        "model": args.model, "reference": args.reference, "held_out_pairs": len(held_out),
        "preference_accuracy": {"base": acc_base, "sft": acc_sft, "dpo": acc_dpo},
        "dpo_reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "dpo_reward_margin": metrics.get("eval_rewards/margins"),
        "dpo_first_logged_loss": first_loss, "dpo_peak_rss_bytes": peak,
        "sft_seconds": sft_time.seconds, "dpo_seconds": dpo_time.seconds,
    }  # fmt: skip
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_table(
        f"held-out movies ({len(held_out)} pairs of a fresh and a rotten review)",
        ["", "base model", "after SFT", "after DPO"],
        [
            [
                "fresh review more likely (per token)",
                *(f"{100 * a:.1f} %" for a in (acc_base, acc_sft, acc_dpo)),
            ]
        ],
    )
    print_table(
        f"DPO ({args.dpo_steps} steps, beta {args.beta}, reference: "
        f"{'the SFT adapter, same model' if args.reference == 'adapter' else 'a second full model'})",
        ["reward accuracy", "reward margin", f"first logged loss (steps 1-{max(1, args.dpo_steps // 10)}; "
         "ln 2 = 0.6931 at step 1)", "peak RSS", "SFT time", "DPO time"],
        [[f"{100 * results['dpo_reward_accuracy']:.1f} %", f"{results['dpo_reward_margin']:.3f}", f"{first_loss:.4f}",
          human_bytes(peak), "reused" if args.sft_adapter else human_seconds(sft_time.seconds),
          human_seconds(dpo_time.seconds)]],
    )  # fmt: skip
    print(f"adapters (sft/sft/, dpo/policy/) and results.json in {args.output_dir}/")


if __name__ == "__main__":
    main()
