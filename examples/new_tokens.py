"""Teach a model new special tokens: LoRA plus trainable rows for just those tokens.

A chat template, a task tag, a tool-call marker: new special tokens need embeddings of their own. Training
the whole embedding (`modules_to_save=["embed_tokens"]`) stores a copy of every row; peft's
`trainable_token_indices` (here too) trains only the new rows. We add two tags, `<|news|>` and
`<|review|>`, put one in front of each text (Guardian headlines, Rotten Tomatoes snippets), and train LoRA
with the two rows. Then

1. the tags mean something: held-out text is more likely after its own tag than after the other one,
2. they steer generation: the same start continues as news or as a review,
3. the adapter file holds the two rows (no embedding copy), and loads onto a freshly resized base model
   with the same logits, bit for bit: the rows replace whatever the resize put there.

    python examples/new_tokens.py                 # SmolLM2-135M (offline asset), a few minutes on CPU
    python examples/new_tokens.py --model gpt2    # with Hub access
    python examples/new_tokens.py --tiny          # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import random
import sys
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

TAGS = {"news": "<|news|>", "review": "<|review|>"}
PROMPTS = ("", "The")  # the tag alone, and a start both kinds of text share
PRESETS = {"tiny": dict(model="tiny", steps=10, batch_size=4)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="Hub id, local path, or asset name (smollm2, tiny)")
    p.add_argument("--news", default="guardian", help="CSV of news (a Text/text column), or an asset name")
    p.add_argument("--reviews", default="rotten_tomatoes", help="CSV of reviews, or an asset name")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32, help="tokens per text, the tag included")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--output-dir", type=Path, default=Path("runs/new_tokens"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tiny", action="store_true", help=f"tiny random model, few steps: a smoke test {PRESETS['tiny']}"
    )
    args = parse_with_presets(p, argv, PRESETS)
    for flag in ("--steps", "--batch-size", "--max-length", "--r"):
        check_range(p, args, flag, 1)
    return args


def add_tags(model, tokenizer) -> list[int]:
    """The new tokens, and room for them in the embedding (and the tied head)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS.values())})
    model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(TAGS.values()))


@torch.no_grad()
def continue_text(model, tokenizer, prompt: str) -> str:
    enc = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    seed_everything(args.seed)
    model, tokenizer = load_causal_lm(args.model)
    new_ids = add_tags(model, tokenizer)
    data = {"news": load_texts(args.news, 48), "review": load_texts(args.reviews, 48)}
    tagged = [TAGS[kind] + text for kind in TAGS for text in data[kind][0]]
    random.Random(args.seed).shuffle(tagged)

    # LoRA on every Linear, plus the rows of the two new tokens (the tied output head shows them too).
    cfg = hf_lora.LoRAConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", trainable_token_indices=new_ids
    )
    model = hf_lora.get_lora_model(model, cfg)
    model.print_trainable_parameters()
    embed = model.get_input_embeddings()
    before = {
        kind: text_perplexity(model, tokenizer, [TAGS[kind] + t for t in data[kind][1]], args.max_length)
        for kind in TAGS
    }

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(args.steps):
        batch = tagged[(step * args.batch_size) % len(tagged) :][: args.batch_size]
        lm_loss(model, tokenizer, batch, args.max_length).backward()
        opt.step()
        opt.zero_grad()
    model.eval()

    # 1. Held-out text after its own tag and after the other one.
    rows = []
    for kind, tag in TAGS.items():
        other = next(t for k, t in TAGS.items() if k != kind)
        own = text_perplexity(model, tokenizer, [tag + t for t in data[kind][1]], args.max_length)
        wrong = text_perplexity(model, tokenizer, [other + t for t in data[kind][1]], args.max_length)
        rows.append([kind, f"{before[kind]:.1f}", f"{own:.1f}", f"{wrong:.1f}"])
    print_table(
        "Held-out perplexity (lower is better)",
        ["text", "own tag, before training", "own tag, after", "the other tag, after"],
        rows,
    )

    # 2. The same prompt behind each tag.
    print_table(
        "Generations: the tag steers the style",
        ["prompt", "continuation"],
        [[tag + p, continue_text(model, tokenizer, tag + p)] for p in PROMPTS for tag in TAGS.values()],
    )

    # 3. Save the adapter: LoRA and two rows. save_embedding_layers=False: the vocabulary was resized, so
    # "auto" would also write the whole embedding, but every new token has a trained row in the file, and
    # the rows replace whatever resize_token_embeddings puts in a fresh base.
    model.save_pretrained(args.output_dir, save_embedding_layers=False)
    tokenizer.save_pretrained(args.output_dir)
    probe = tokenizer([TAGS["news"] + PROMPTS[1]], return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
    fresh, fresh_tokenizer = load_causal_lm(args.model)
    add_tags(fresh, fresh_tokenizer)
    reloaded = hf_lora.LoRAModel.from_pretrained(fresh, args.output_dir)
    with torch.no_grad():
        same = torch.equal(reloaded(**probe).logits, expected)
    row_bytes = sum(p.numel() * p.element_size() for p in embed.trainable_tokens_delta.values())
    print_table(
        "What the new tokens cost",
        ["what", "size"],
        [["the two trained rows (in the adapter file)", human_bytes(row_bytes)],
         ["the whole embedding (modules_to_save=['embed_tokens'] would save it)",
          human_bytes(embed.weight.numel() * embed.weight.element_size())],
         ["adapter file (LoRA + rows)", human_bytes(disk_size(args.output_dir / "adapter_model.safetensors"))],
         ["reloaded on a freshly resized base: same logits", "yes" if same else "NO"]],
    )  # fmt: skip
    print(f"\nadapter and tokenizer saved to {args.output_dir}/")
    if not same:
        raise SystemExit("the reloaded adapter gives other logits")


if __name__ == "__main__":
    main()
