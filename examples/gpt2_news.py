"""Fine-tune a causal language model on news text with LoRA, and compare with full fine-tuning.

The GPT-2 news tutorial, with hf_lora: read a CSV of news articles (or headlines), clean and tokenise
it, cut it into blocks, train with `hf_lora.LoRATrainer`, and report perplexity before and after,
a few generations, the time, the memory and the size of what you have to keep.

    python examples/gpt2_news.py                                   # GPT-2 + Guardian headlines
    python examples/gpt2_news.py --dataset Articles.csv --encoding latin-1   # Kaggle news articles
    python examples/gpt2_news.py --model smollm2 --compare --quick # offline: SmolLM2-135M, LoRA vs full
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/gpt2_news.py ...

`--model` takes a Hub id, a local directory, `smollm2` or `tiny`; `--dataset` a CSV path, a Hub dataset
id or `guardian` (see examples/common.py). `--batch-size` is the GLOBAL batch: with N processes each one
gets batch/N, so 1 and N processes train on the same batches and give the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Timer,
    check_range,
    clean_text,
    count_params,
    dataset_file,
    disk_size,
    fast_bf16,
    human_bytes,
    human_seconds,
    is_main_process,
    load_causal_lm,
    no_accelerator,
    params_cell,
    parse_with_presets,
    peak_memory_bytes,
    perplexity,
    pick_column,
    plot_loss_curves,
    print_table,
    read_csv_rows,
    reset_peak_memory,
    seed_everything,
    setup_logging,
    target_modules,
    world_size,
)

log = logging.getLogger("gpt2_news")

# Presets fill in whatever you do not set yourself: `--quick --max-steps 50` keeps the 50.
PRESETS: dict[str, dict[str, Any]] = {
    # smoke tests: a random 2-layer GPT-2 and a handful of rows, seconds end to end
    "tiny": dict(model="tiny", max_rows=48, block_size=32, batch_size=4, max_steps=6, eval_blocks=8, evals=2,
                 logging_steps=1, lora_lr=1e-2, full_lr=1e-3, max_new_tokens=8),
    # the README's main job: LoRA and full fine-tuning of SmolLM2 on 2 CPU cores in well under 15 minutes
    "quick": dict(block_size=64, batch_size=8, max_steps=60, eval_blocks=64, evals=4, logging_steps=5),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="gpt2", help="Hub id, local directory, or smollm2 / tiny (default: gpt2)"
    )
    p.add_argument("--dataset", default="guardian", help="CSV file, Hub dataset id, or guardian (default)")
    p.add_argument("--text-column", help="column with the text (default: the first of Article, Text, text)")
    p.add_argument("--encoding", default="utf-8", help="CSV encoding; falls back to latin-1 if it fails")
    p.add_argument("--mode", choices=["lora", "full"], default="lora", help="what to train (default: lora)")
    p.add_argument("--compare", action="store_true", help="train both LoRA and full, same data/seed/steps")
    p.add_argument("--output-dir", type=Path,
                   help="default: runs/<model>_<dataset>/ (runs/smollm2_guardian/ for scripts/demo)")  # fmt: skip
    g = p.add_argument_group("data")
    g.add_argument("--max-rows", type=int, help="use only the first N rows of the dataset")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="documents held out for evaluation")
    g.add_argument("--eval-blocks", type=int, help="evaluate on at most N blocks (default: all held out)")
    g.add_argument("--block-size", type=int, default=128, help="tokens per training example")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=8, help="global batch size (split over processes)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (overrides --epochs)")
    g.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate for LoRA")
    g.add_argument("--full-lr", type=float, default=5e-5, help="learning rate for full fine-tuning")
    g.add_argument("--evals", type=int, default=4, help="evaluations during training (plus one before)")
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: where bf16 matmuls are fast: CPUs with AVX512-BF16/AMX, "
                        "recent GPUs; elsewhere they are emulated and slower than float32)")  # fmt: skip
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target-modules", nargs="+", default=["all-linear"],
                   help="module names, all-linear (default: attention + MLP, the tutorial's choice for GPT-2), "
                        "or default (the architecture's defaults, see hf_lora.targets; q_proj v_proj for Llama)")  # fmt: skip
    g = p.add_argument_group("output")
    g.add_argument("--samples", type=int, default=3, help="prompts to generate from before/after")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the LoRA adapter (token from HF_TOKEN)")
    g.add_argument("--quick", action="store_true", help=f"small, fast settings: {PRESETS['quick']}")
    g.add_argument("--tiny", action="store_true", help="random tiny model, a few rows: smoke tests")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_with_presets(p, argv, PRESETS)
    # out-of-range values would otherwise fail deep inside the data preparation or the Trainer
    check_range(p, args, "--eval-fraction", 0, 1, low_open=True, high_open=True)
    for flag in ("--max-rows", "--eval-blocks", "--block-size", "--batch-size", "--evals", "--logging-steps",
                 "--rank", "--max-new-tokens"):  # fmt: skip
        check_range(p, args, flag, 1)
    check_range(p, args, "--samples", 0)
    check_range(p, args, "--epochs", 0, low_open=True)
    if args.push_to_hub and not (args.compare or args.mode == "lora"):
        p.error("--push-to-hub uploads the LoRA adapter: use it with --mode lora or --compare")
    if args.bf16 is None:
        args.bf16 = fast_bf16()
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{_short_name(args.model)}_{_short_name(args.dataset)}"
    return args


def _short_name(name: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M` -> `smollm2-135m`, `data/Articles.csv` -> `articles`: for folder names."""
    return re.sub(r"[^a-z0-9]+", "-", Path(name).stem.lower()).strip("-") or "run"


# ---- data ---------------------------------------------------------------------------------------


def read_documents(args: argparse.Namespace) -> list[str]:
    """The dataset's texts, cleaned: whitespace collapsed, empty and duplicate documents dropped."""
    path = dataset_file(args.dataset)
    if path is not None:
        rows = read_csv_rows(path, args.encoding)
        columns = rows[0].keys() if rows else []
    else:  # a Hub dataset: its train split
        from datasets import load_dataset

        rows = load_dataset(args.dataset, split="train")
        columns = rows.column_names
    column = pick_column(columns, args.text_column, ["Article", "Text", "text", "content"], "text")
    texts = [clean_text(row[column] or "") for row in rows]
    docs = list(dict.fromkeys(t for t in texts if t))  # dict keeps the order, drops duplicates
    log.info(
        "%s: %d rows, %d non-empty distinct documents in column %r",
        args.dataset,
        len(texts),
        len(docs),
        column,
    )
    return docs[: args.max_rows] if args.max_rows else docs


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A fixed, seeded split of whole documents, so no article is both trained and evaluated on."""
    docs = docs.copy()
    random.Random(seed).shuffle(docs)
    n_eval = max(1, round(len(docs) * eval_fraction))
    return docs[n_eval:], docs[:n_eval]


def to_blocks(docs: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """Tokenise, join the documents into one stream and cut it into equal blocks (the tail is dropped).

    Documents end with a newline: cleaning made it the one character that never occurs inside a document.
    We do not use the eos token as separator because GPT-2's pad token IS its eos, and the collator
    masks pad tokens out of the labels: the model would never learn where a document ends.
    """
    if not docs:
        return []
    ids = tokenizer([d + "\n" for d in docs], add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def build_datasets(args: argparse.Namespace, tokenizer):
    from datasets import Dataset

    docs = read_documents(args)
    train_docs, eval_docs = split_documents(docs, args.eval_fraction, args.seed)
    train_blocks = to_blocks(train_docs, tokenizer, args.block_size)
    eval_blocks = to_blocks(eval_docs, tokenizer, args.block_size)[: args.eval_blocks]
    if not train_blocks or not eval_blocks:
        raise SystemExit(f"error: too little text for --block-size {args.block_size}; lower it or add rows")
    log.info(
        "%d train documents -> %d blocks of %d tokens; %d eval documents -> %d blocks",
        len(train_docs), len(train_blocks), args.block_size, len(eval_docs), len(eval_blocks),
    )  # fmt: skip
    train = Dataset.from_dict({"input_ids": train_blocks})
    evaluation = Dataset.from_dict({"input_ids": eval_blocks})
    return train, evaluation, eval_docs


# ---- training -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one training run measured; `results.json` holds these, the summary table shows them."""

    mode: str
    trainable_params: int
    total_params: int
    train_seconds: float  # training steps only: the evaluations on the way are in eval_seconds
    eval_seconds: float
    evaluations: int
    train_tokens: int
    eval_loss_before: float
    eval_loss_after: float
    peak_rss_bytes: int
    saved_bytes: int
    saved_to: str
    world_size: int
    samples: list[tuple[str, str]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput: tokens trained on per second of training, evaluation not counted."""
        return self.train_tokens / self.train_seconds


def lora_config(args: argparse.Namespace):
    import hf_lora

    return hf_lora.LoRAConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # all-linear: every Linear/Conv1D but the output head. For GPT-2 that is exactly its default
        # (c_attn, c_proj, c_fc); for SmolLM2 it measured best (see examples/README.md)
        target_modules=target_modules(args.target_modules),
        task_type="CAUSAL_LM",
    )


def training_args(args: argparse.Namespace, mode: str, steps: int):
    from transformers import TrainingArguments

    per_device = args.batch_size // world_size()  # same global batch however many processes
    return TrainingArguments(
        output_dir=str(args.output_dir / "trainer" / mode),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        max_steps=steps,
        learning_rate=args.lora_lr if mode == "lora" else args.full_lr,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a fraction of the steps
        eval_strategy="steps",
        eval_steps=max(1, steps // args.evals),  # the Trainer evaluates after the last step too
        eval_on_start=True,  # the "before" number, and the first point of the curves
        logging_steps=args.logging_steps,
        save_strategy="no",  # we save the result ourselves; no multi-GB full checkpoints on the way
        bf16=args.bf16,
        use_cpu=no_accelerator(),  # on CPU: DDP over gloo under torchrun, and bf16 allowed
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        dataloader_num_workers=0,
    )


def train_one(mode: str, base_model, tokenizer, train, evaluation, args: argparse.Namespace, steps: int):
    """Train a copy of the base model with LoRA or in full; return it, the trainer that trained it and
    how long `trainer.train()` took (the evaluations it runs on the way included)."""
    from transformers import DataCollatorForLanguageModeling

    import hf_lora

    seed_everything(args.seed)  # LoRA's A matrices start the same in every run and on every process
    model = copy.deepcopy(base_model)  # the base stays untouched for the next run and the generations
    if mode == "lora":
        model = hf_lora.get_lora_model(model, lora_config(args))
    trainer = hf_lora.LoRATrainer(
        model=model,
        args=training_args(args, mode, steps),
        train_dataset=train,
        eval_dataset=evaluation,
        # mlm=False: causal LM, labels = input_ids (the model shifts them by one itself)
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    reset_peak_memory()
    with Timer() as timer:
        trainer.train()
    return model, trainer, timer.seconds


def save(mode: str, model, trainer, args: argparse.Namespace) -> Path:
    """LoRA: the adapter (+ its model card and loss curve) in adapter/. Full: the whole model in full_model/."""
    if mode == "lora":
        # every process calls it, only the main one writes (safe under accelerate launch / torchrun)
        model.save_pretrained(
            args.output_dir / "adapter",
            log_history=trainer.state.log_history,
            is_main_process=is_main_process(),
        )
        return args.output_dir / "adapter" / "adapter_model.safetensors"
    trainer.save_model(str(args.output_dir / "full_model"))  # the Trainer writes on the main process only
    return args.output_dir / "full_model"


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, cut at the end of the document (a newline, see `to_blocks`)."""
    import torch

    model.eval()
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs.append(text.split("\n")[0])
    return outputs


def prompts_from(eval_docs: list[str], n: int) -> list[str]:
    """The first few words of held-out documents: the model has not seen how they go on."""
    return [" ".join(doc.split()[:4]) for doc in eval_docs[:n]]


def run(mode, base_model, tokenizer, train, evaluation, prompts, args, steps) -> RunResult:
    log.info("==== %s: %d steps x %d blocks x %d tokens ====", mode, steps, args.batch_size, args.block_size)
    model, trainer, seconds = train_one(mode, base_model, tokenizer, train, evaluation, args, steps)
    peak = peak_memory_bytes()
    # trainer.train() also evaluated (before the first step and every eval_steps): take that time out,
    # so the train time and tokens/s measure training alone
    eval_runtimes = [e["eval_runtime"] for e in trainer.state.log_history if "eval_runtime" in e]
    trainable, total = count_params(model)
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    saved = save(mode, model, trainer, args)
    result = RunResult(
        mode=mode,
        trainable_params=trainable,
        total_params=total,
        train_seconds=seconds - sum(eval_runtimes),
        eval_seconds=sum(eval_runtimes),
        evaluations=len(eval_runtimes),
        train_tokens=steps * args.batch_size * args.block_size,
        eval_loss_before=evals[0],
        eval_loss_after=evals[-1],
        peak_rss_bytes=peak,
        saved_bytes=disk_size(saved) if is_main_process() else 0,
        saved_to=str(saved),
        world_size=trainer.args.world_size,  # processes that trained together (DDP), as the Trainer saw it
        log_history=trainer.state.log_history,
    )
    if is_main_process() and prompts:
        result.samples = list(zip(prompts, generate(model, tokenizer, prompts, args.max_new_tokens)))
    if mode == "lora" and args.push_to_hub and is_main_process():
        import hf_lora

        commit = hf_lora.push_adapter_to_hub(
            model, args.push_to_hub, token=os.environ.get("HF_TOKEN"), log_history=trainer.state.log_history
        )
        log.info("pushed the adapter to %s", commit.commit_url)
    del model, trainer
    gc.collect()
    return result


# ---- report -------------------------------------------------------------------------------------


def run_names(args: argparse.Namespace) -> dict[str, str]:
    targets = " ".join(args.target_modules) if args.target_modules else "default"
    return {"lora": f"LoRA (r={args.rank}, {targets})", "full": "full fine-tuning"}


def summarize(
    results: list[RunResult], before_samples: list[tuple[str, str]], args: argparse.Namespace
) -> None:
    names = run_names(args)
    rows = [
        ["trainable params", *(params_cell(r.trainable_params, r.total_params) for r in results)],
        ["train time (without evaluation)", *(human_seconds(r.train_seconds) for r in results)],
        ["training tokens/s (all processes)", *(f"{r.tokens_per_second:,.0f}" for r in results)],
        ["evaluation time", *(f"{human_seconds(r.eval_seconds)} ({r.evaluations} evaluations)" for r in results)],
        ["eval loss before -> after", *(f"{r.eval_loss_before:.4f} -> {r.eval_loss_after:.4f}" for r in results)],
        ["perplexity before -> after",
         *(f"{perplexity(r.eval_loss_before):.2f} -> {perplexity(r.eval_loss_after):.2f}" for r in results)],
        ["peak RSS (main process)", *(human_bytes(r.peak_rss_bytes) for r in results)],
        ["saved to disk", *(f"{human_bytes(r.saved_bytes)} ({'adapter' if r.mode == 'lora' else 'full model'})"
                            for r in results)],
    ]  # fmt: skip
    first = results[0]
    steps = first.log_history[-1].get("step", "?") if first.log_history else "?"
    print_table(
        f"{args.model} on {args.dataset}: {steps} steps x {args.batch_size} blocks x {args.block_size} tokens, "
        f"{first.world_size} process(es)",
        ["", *(names[r.mode] for r in results)],
        rows,
    )
    if before_samples:
        header = ["prompt", "before", *(f"after {names[r.mode]}" for r in results)]
        sample_rows = [
            [prompt, before, *(r.samples[i][1] for r in results)]
            for i, (prompt, before) in enumerate(before_samples)
        ]
        print_table("greedy generations (held-out prompts)", header, sample_rows)


def write_results(results: list[RunResult], before_samples, args: argparse.Namespace) -> None:
    """results.json (numbers for scripts and tests) and loss_curves.png (all runs in one plot)."""
    report = {
        "model": args.model,
        "dataset": args.dataset,
        "world_size": results[0].world_size,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples_before": before_samples,
        "runs": {r.mode: asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in results},
    }
    (args.output_dir / "results.json").write_text(json.dumps(report, indent=2))
    names, modes = run_names(args), {r.mode for r in results}
    plot = plot_loss_curves(
        {names[r.mode]: r.log_history for r in results},
        args.output_dir / "loss_curves.png",
        f"{args.model} on {args.dataset}, {args.batch_size} x {args.block_size} tokens per step",
    )
    print(f"in {args.output_dir}/: results.json, the loss curves ({plot.name})"
          + (", the LoRA adapter in adapter/" if "lora" in modes else "")
          + (", the fine-tuned model in full_model/" if "full" in modes else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    log.info("bf16 autocast: %s", "on" if args.bf16 else "off, float32 (--bf16 to force it)")
    base_model, tokenizer = load_causal_lm(args.model)
    positions = getattr(base_model.config, "max_position_embeddings", None)
    if positions and args.block_size > positions:
        build_parser().error(f"argument --block-size: must be <= {positions} for {args.model} (its "
                             f"max_position_embeddings), got {args.block_size}")  # fmt: skip
    train, evaluation, eval_docs = build_datasets(args, tokenizer)
    steps = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * len(train) // args.batch_size))

    prompts = prompts_from(eval_docs, args.samples) if is_main_process() else []
    before = list(zip(prompts, generate(base_model, tokenizer, prompts, args.max_new_tokens)))
    modes = ["lora", "full"] if args.compare else [args.mode]
    results = [run(mode, base_model, tokenizer, train, evaluation, prompts, args, steps) for mode in modes]

    if is_main_process():
        summarize(results, before, args)
        write_results(results, before, args)


if __name__ == "__main__":
    sys.exit(main())
