"""Sentiment classification three ways: LoRA, the last layers only, and full fine-tuning, compared fairly.

The DistilBERT/IMDb tutorial, with hf_lora. The same pretrained encoder, the same data and the same
classification head initialisation are fine-tuned with

* LoRA (+ the new classification head, trained in full as `modules_to_save`: BERT's classifier,
  DistilBERT's pre_classifier and classifier),
* only the last 2 transformer layers (+ the head), everything else frozen,
* every weight (full fine-tuning),

and the script prints a table of trainable parameters, training time and test accuracy.

A fair comparison gives each method its own learning rate (and LoRA its targets and rank), chosen on a
validation split carved from the training data, never on the test split. `--sweep` does that: it trains
each candidate of `SWEEP` on the training data minus the validation split, picks each method's best by
validation accuracy, then trains the chosen configurations on the whole training split with `--seeds`
seeds and scores each once on the test split (mean +- std). Every finished run is recorded in
OUTPUT_DIR/runs.jsonl; with `--resume` the recorded ones are reused, so an interrupted sweep goes on where it
stopped and two processes (say `--methods lora` and `--methods last-layers full`) can share the work.

    python examples/sentiment_classification.py                     # offline: MiniLM on Rotten Tomatoes
    python examples/sentiment_classification.py --dataset rotten_tomatoes_full --sweep --seeds 3 --epochs 1
    python examples/sentiment_classification.py --model distilbert-base-uncased --dataset imdb
    python examples/sentiment_classification.py --methods lora --target-modules query key value dense

`--model` takes a Hub id, a local directory, `minilm` or `tiny`; `--dataset` a Hub dataset id with
train/test splits and text/label columns (imdb), a CSV file with text and label columns (split here,
seeded), `rotten_tomatoes` (4,866 fresh or rotten review snippets; the plot summaries are dropped) or
`rotten_tomatoes_full` (the asset's whole corpus: 12,808).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    Timer,
    check_range,
    count_params,
    dataset_file,
    disk_size,
    human_bytes,
    human_seconds,
    is_main_process,
    load_sequence_classifier,
    no_accelerator,
    params_cell,
    parse_with_presets,
    pick_column,
    print_table,
    read_csv_rows,
    seed_everything,
    setup_logging,
    target_modules,
    world_size,
)

log = logging.getLogger("sentiment_classification")

METHODS = ("lora", "last-layers", "full")
# The candidates --sweep tries: learning rates around each method's usual one and, for LoRA, two target
# sets that both train under 1 % of MiniLM's weights (q, v at r=8: 0.33 %; every linear layer at r=4: 0.74 %).
SWEEP: dict[str, list[dict[str, Any]]] = {
    "lora": [dict(target_modules=None, rank=8, lr=lr) for lr in (1e-3, 2e-3, 4e-3)]
    + [dict(target_modules=["all-linear"], rank=4, lr=lr) for lr in (5e-4, 1e-3, 2e-3)],
    "last-layers": [dict(lr=lr) for lr in (2e-4, 5e-4, 1e-3)],
    "full": [dict(lr=lr) for lr in (2e-5, 5e-5, 1e-4)],
}
EXTEND_MAX = 2  # how far past its grid a sweep follows a line's best learning rate (see `sweep`)
LR_FLAG = {"lora": "lora_lr", "last-layers": "last_layers_lr", "full": "full_lr"}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model="tiny", train_size=48, test_size=32, epochs=1, batch_size=8, max_length=32,
                 lora_lr=1e-2, last_layers_lr=1e-3, full_lr=1e-3),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="minilm", help="Hub id, local directory, or minilm / tiny (default: minilm)"
    )
    p.add_argument(
        "--dataset",
        default="rotten_tomatoes",
        help="Hub id (imdb), CSV file, rotten_tomatoes or rotten_tomatoes_full",
    )
    p.add_argument("--text-column", help="CSV column with the text (default: text, review or sentence)")
    p.add_argument("--label-column", help="CSV column with the label (default: label, category or sentiment)")
    p.add_argument("--labels", nargs="+",
                   help="CSV label values to keep, in class-id order (default: all, sorted; "
                        "rotten_tomatoes: rotten fresh)")  # fmt: skip
    p.add_argument("--encoding", default="utf-8", help="CSV encoding; falls back to latin-1 if it fails")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--output-dir", type=Path, default=Path("runs/sentiment_classification"))
    p.add_argument("--sweep", action="store_true",
                   help="choose each method's settings on a validation split first (see above)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs recorded in OUTPUT_DIR/runs.jsonl with the same settings and data "
                        "(an interrupted sweep goes on where it stopped; processes with different "
                        "--methods can share the directory)")  # fmt: skip
    g = p.add_argument_group("data")
    g.add_argument("--test-fraction", type=float, default=0.2, help="for a CSV: share held out for testing")
    g.add_argument("--validation-fraction", type=float, default=0.1,
                   help="--sweep: share of the training split it chooses on")  # fmt: skip
    g.add_argument("--split-seed", type=int, default=42, help="the fixed seeded split (and samples)")
    g.add_argument("--train-size", type=int, help="train on a seeded sample of N examples (default: all)")
    g.add_argument("--test-size", type=int, help="test on a seeded sample of N examples (default: all)")
    g.add_argument("--max-length", type=int, default=256, help="truncate texts to N tokens")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1)
    g.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    # the defaults: what --sweep chose on the whole corpus (examples/README.md)
    g.add_argument("--lora-lr", type=float, default=1e-3)
    g.add_argument("--last-layers-lr", type=float, default=1e-3)
    g.add_argument("--full-lr", type=float, default=2e-4)
    g.add_argument("--last-layers", type=int, default=2, help="how many layers the last-layers method trains")
    g.add_argument("--seed", type=int, default=42, help="training seed (the first of --seeds)")
    g.add_argument("--seeds", type=int, default=1, help="train each final configuration with N seeds")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.1)
    g.add_argument("--target-modules", nargs="+", default=["all-linear"],
                   help="default: all-linear; 'default' for the architecture's (BERT: query value)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="random tiny model, a few rows: smoke tests")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_with_presets(p, argv, PRESETS)
    check_range(p, args, "--test-fraction", 0, 1, low_open=True, high_open=True)
    check_range(p, args, "--validation-fraction", 0, 1, low_open=True, high_open=True)
    check_range(p, args, "--seeds", 1)
    for flag in ("--train-size", "--test-size", "--max-length", "--batch-size", "--last-layers", "--rank"):
        check_range(p, args, flag, 1)  # --last-layers' upper bound (the model's layers) is checked in main
    check_range(p, args, "--epochs", 0, low_open=True)
    if args.labels is None and args.dataset in ("rotten_tomatoes", "rotten_tomatoes_full"):
        args.labels = ["rotten", "fresh"]  # negative = 0, positive = 1, as in IMDb
    return args


# ---- data ---------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace):
    """``(train, test, label_names)``: datasets with a ``text`` and an integer ``label`` column."""
    from datasets import Dataset, load_dataset

    path = dataset_file(args.dataset)
    if path is None:  # a Hub dataset with train and test splits, like imdb
        splits = load_dataset(args.dataset)
        train, test = splits["train"], splits["test"]
        names = train.features["label"].names
    else:
        rows = read_csv_rows(path, args.encoding)
        columns = list(rows[0]) if rows else []
        text_col = pick_column(columns, args.text_column, ["text", "review", "sentence"], "text")
        label_col = pick_column(columns, args.label_column, ["label", "category", "sentiment"], "label")
        found = sorted({r[label_col] for r in rows})
        missing = [name for name in args.labels or [] if name not in found]
        if missing:
            build_parser().error(
                f"argument --labels: {', '.join(map(repr, missing))} not in column {label_col!r} of "
                f"{path.name}; its values are {', '.join(map(repr, found[:20]))}{' ...' if len(found) > 20 else ''}"
            )
        names = args.labels or found
        ids = {name: i for i, name in enumerate(names)}
        examples = [{"text": r[text_col], "label": ids[r[label_col]]} for r in rows if r[label_col] in ids]
        log.info("%s: %d rows, %d with labels %s", path.name, len(rows), len(examples), names)
        random.Random(args.split_seed).shuffle(examples)  # a fixed split: the same test set every run
        n_test = round(len(examples) * args.test_fraction)
        if not 0 < n_test < len(examples):
            build_parser().error(
                f"argument --test-fraction: {args.test_fraction} of {len(examples)} examples leaves no "
                f"{'test' if n_test == 0 else 'training'} examples"
            )
        test, train = Dataset.from_list(examples[:n_test]), Dataset.from_list(examples[n_test:])
    train = sample(train, args.train_size, args.split_seed)
    test = sample(test, args.test_size, args.split_seed)
    log.info("train: %d examples, test: %d examples, labels %s", len(train), len(test), names)
    return train, test, list(names)


def sample(dataset, n: int | None, seed: int):
    return dataset.shuffle(seed=seed).select(range(n)) if n and n < len(dataset) else dataset


def tokenize(dataset, tokenizer, max_length: int):
    # No padding here: the collator pads each batch to its longest text, far less work than max_length
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


# ---- the three methods ----------------------------------------------------------------------------


def with_lora(model, args: argparse.Namespace):
    """LoRA on --target-modules (every linear layer by default), and the new head trained in full."""
    import hf_lora

    config = hf_lora.LoRAConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args.target_modules),  # None: the architecture's defaults
        task_type="SEQ_CLS",
        # The head starts random, so it must learn. SEQ_CLS alone adds only modules named `classifier` or
        # `score` (matched on dot boundaries): DistilBERT's new `pre_classifier` would stay random and
        # frozen. So name every module of the head.
        modules_to_save=head_module_names(model),
    )
    return hf_lora.get_lora_model(model, config)


def with_last_layers(model, n: int):
    """Freeze everything, then unfreeze the last `n` transformer layers and the classification head."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = transformer_layers(model)
    trainable = [*layers[-n:], *head_modules(model)]
    for module in trainable:
        module.requires_grad_(True)
    return model


def transformer_layers(model):
    """The list of transformer blocks: `encoder.layer` in BERT, `transformer.layer` in DistilBERT, ..."""
    for path in ("encoder.layer", "transformer.layer", "layers", "h", "layer"):
        try:
            return model.base_model.get_submodule(path)
        except AttributeError:
            continue
    raise SystemExit(f"error: cannot find the transformer layers of {type(model).__name__}")


def head_module_names(model) -> list[str]:
    """The modules on top of the encoder that have weights: ['classifier'] for BERT, ['pre_classifier',
    'classifier'] for DistilBERT. All newly initialised by from_pretrained."""
    return [
        name
        for name, module in model.named_children()
        if module is not model.base_model and any(True for _ in module.parameters())
    ]


def head_modules(model):
    """What sits on top of the encoder: the classifier (and DistilBERT's pre_classifier, BERT's pooler)."""
    heads = [module for module in model.children() if module is not model.base_model]
    pooler = getattr(model.base_model, "pooler", None)
    return heads + ([pooler] if pooler is not None else [])


def prepare(method: str, base_model, args: argparse.Namespace):
    model = copy.deepcopy(base_model)  # every method starts from the same weights, head included
    if method == "lora":
        return with_lora(model, args)
    if method == "last-layers":
        return with_last_layers(model, args.last_layers)
    return model


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def train_and_test(
    method: str, base_model, tokenizer, train, test, args: argparse.Namespace, save: bool = True
) -> dict:
    """Train `method` on `train` with the settings in `args`, then score it once on `test` (the test split,
    or --sweep's validation split). `save`: keep the LoRA adapter in --output-dir."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    import hf_lora

    seed_everything(args.seed)
    model = prepare(method, base_model, args)
    trainable, total = count_params(model)
    log.info("==== %s: %s trainable parameters ====", method, params_cell(trainable, total))
    lr = {"lora": args.lora_lr, "last-layers": args.last_layers_lr, "full": args.full_lr}[method]
    per_device = args.batch_size // world_size()
    targs = TrainingArguments(
        output_dir=str(args.output_dir / "trainer" / method),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=2 * per_device,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a fraction of the steps
        # batches of similar lengths: review snippets are 5 to 70 tokens, so random batches of 32 are half
        # padding; grouped, a step does about half the work and learns the same
        train_sampling_strategy="group_by_length",
        weight_decay=0.01,
        logging_steps=max(1, len(train) // args.batch_size // 10),  # ~10 lines per epoch
        eval_strategy="no",  # one test at the end; the test set is not for choosing anything
        save_strategy="no",
        use_cpu=no_accelerator(),  # on CPU: DDP over gloo under torchrun
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
    )
    trainer = hf_lora.LoRATrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    with Timer() as timer:
        trainer.train()
    metrics = trainer.evaluate()
    result = {
        "method": method,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": timer.seconds,
        "test_accuracy": metrics["eval_accuracy"],
        "test_loss": metrics["eval_loss"],
    }
    if method == "lora" and save:  # the adapter is the one thing worth keeping: a few hundred KB
        model.save_pretrained(
            args.output_dir, log_history=trainer.state.log_history, is_main_process=is_main_process()
        )
        result["adapter_bytes"] = (
            disk_size(args.output_dir / "adapter_model.safetensors") if is_main_process() else 0
        )
    return result


# ---- the comparison: a sweep on the validation split, then the final runs -----------------------


# What a run's result depends on besides its method, settings and seed: a recorded run is reused only where
# all of these are the same.
RECORDED_FLAGS = ("model", "dataset", "labels", "text_column", "label_column", "split_seed", "test_fraction",
                  "validation_fraction", "train_size", "test_size", "max_length", "epochs", "batch_size",
                  "last_layers", "lora_alpha", "lora_dropout")  # fmt: skip


class RunRecords:
    """OUTPUT_DIR/runs.jsonl: a line per finished run (sweep or final) with what defines it and its result.
    With --resume a run already recorded is read back instead of trained again, so an interrupted sweep goes
    on where it stopped, and processes that train different --methods into one directory add up."""

    def __init__(self, args: argparse.Namespace):
        self.path = args.output_dir / "runs.jsonl"
        self.resume = args.resume
        self.common = {flag: getattr(args, flag) for flag in RECORDED_FLAGS}

    def key(self, phase: str, method: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
        key = {"phase": phase, "method": method, "settings": settings, "seed": seed, **self.common}
        return json.loads(json.dumps(key, default=str))  # as it reads back: tuples as lists, paths as str

    def find(self, key: dict[str, Any]) -> dict | None:
        """The latest recorded result of the run `key` describes (None without --resume)."""
        if not self.resume or not self.path.exists():
            return None
        found = None
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when a process was killed mid-write
                continue
            if isinstance(record, dict) and record.get("key") == key:
                found = record["result"]
        if found is not None:
            log.info("%s %s seed %d: recorded in %s, not trained again", key["phase"], key["method"],
                     key["seed"], self.path)  # fmt: skip
        return found

    def add(self, key: dict[str, Any], result: dict) -> dict:
        if is_main_process():  # one line, appended whole: other processes may be appending too
            line = json.dumps({"key": key, "result": result}, default=str) + "\n"
            with open(self.path, "ab+") as f:
                end = f.seek(0, os.SEEK_END)
                cut = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"  # a killed writer's half line
                f.write((("\n" if cut else "") + line).encode("utf-8"))
        return result

    def reuse_or_run(self, key: dict[str, Any], train: Callable[..., dict], *args, **kwargs) -> dict:
        """The recorded result of `key` (with --resume), else `train(*args, **kwargs)`'s, recorded."""
        return self.find(key) or self.add(key, train(*args, **kwargs))


def settings_of(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """A method's settings in `args`, in SWEEP's terms."""
    if method != "lora":
        return {"lr": getattr(args, LR_FLAG[method])}
    return {"target_modules": args.target_modules, "rank": args.rank, "lr": args.lora_lr}


def with_settings(args: argparse.Namespace, method: str, settings: dict[str, Any], seed: int | None = None):
    """A copy of `args` that runs `method` with `settings` (and `seed`)."""
    run = argparse.Namespace(**vars(args))
    setattr(run, LR_FLAG[method], settings["lr"])
    if method == "lora":
        run.target_modules, run.rank = settings["target_modules"], settings["rank"]
    if seed is not None:
        run.seed = seed
    return run


def describe(method: str, settings: dict[str, Any], args: argparse.Namespace) -> str:
    """`LoRA (all-linear, r=4) + head, lr 1e-03`, `last 2 layers + head, lr 5e-04`, ..."""
    if method == "lora":
        names = settings["target_modules"]
        targets = "q, v" if names in (None, ["default"]) else ", ".join(names)
        name = f"LoRA ({targets}, r={settings['rank']}) + head"
    else:
        name = {"last-layers": f"last {args.last_layers} layers + head", "full": "full fine-tuning"}[method]
    return f"{name}, lr {settings['lr']:.0e}"


def split_validation(train, args: argparse.Namespace):
    """(fit, validation): the validation split carved from the training split, seeded and fixed."""
    parts = train.train_test_split(test_size=args.validation_fraction, seed=args.split_seed)
    return parts["train"], parts["test"]


def line_of(settings: dict[str, Any]) -> str:
    """What candidates on one line of the sweep share: their settings but the learning rate."""
    return json.dumps({k: v for k, v in settings.items() if k != "lr"}, sort_keys=True)


def lr_beyond(line_runs: list[dict]) -> float | None:
    """The learning rate to try next on a line of runs that differ only in it: twice the largest where the
    largest scored best, half the smallest where the smallest did (the first best, in run order, on a tie),
    None where the best lies inside."""
    best = max(line_runs, key=lambda r: r["validation_accuracy"])["settings"]["lr"]
    lrs = sorted(r["settings"]["lr"] for r in line_runs)
    if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
        return None
    return 2 * lrs[-1] if best == lrs[-1] else lrs[0] / 2


def sweep(base_model, tokenizer, train, args, records: RunRecords) -> tuple[list[dict], dict[str, dict]]:
    """Every candidate of SWEEP for each method, trained on the training split minus the validation split
    and scored on that: (runs, each method's best settings). The test split is not touched.

    Where a line of candidates (a method's settings but the learning rate) scores best at the end of its
    grid, the optimum may lie beyond it: the learning rate is doubled (or halved) past that end, up to
    EXTEND_MAX times, until the best is inside."""
    fit, validation = split_validation(train, args)
    log.info("sweep: %d examples to fit, %d to choose on", len(fit), len(validation))

    def score(method: str, settings: dict[str, Any]) -> dict:
        key = records.key("sweep", method, settings, args.seed)
        run_args = with_settings(args, method, settings)
        run = records.reuse_or_run(
            key, train_and_test, method, base_model, tokenizer, fit, validation, run_args, save=False
        )
        run = {"settings": settings, "validation_accuracy": run.pop("test_accuracy"),
               "validation_loss": run.pop("test_loss"), **run}  # fmt: skip
        log.info(
            "%s: validation accuracy %.2f%%",
            describe(method, settings, args),
            100 * run["validation_accuracy"],
        )
        return run

    runs, chosen = [], {}
    for method in args.methods:
        lines: dict[str, list[dict]] = {}  # the candidates that differ only in learning rate
        for settings in SWEEP[method]:
            lines.setdefault(line_of(settings), []).append(settings)
        for line in lines.values():
            line_runs = [score(method, settings) for settings in line]
            for _ in range(EXTEND_MAX):
                if (lr := lr_beyond(line_runs)) is None:
                    break
                best = max(line_runs, key=lambda r: r["validation_accuracy"])["settings"]
                log.info("%s: best at the end of its grid, trying lr %.0e", describe(method, best, args), lr)
                line_runs.append(score(method, {**best, "lr": lr}))
            runs += sorted(line_runs, key=lambda r: r["settings"]["lr"])
        best = max((r for r in runs if r["method"] == method), key=lambda r: r["validation_accuracy"])
        chosen[method] = best["settings"]
    return runs, chosen


def final_runs(
    base_model, tokenizer, train, test, args, chosen: dict[str, dict], records: RunRecords
) -> list[dict]:
    """Each method's settings trained on the whole training split with --seeds seeds, each scored once on
    the test split."""
    results = []
    for method in args.methods:
        for seed in range(args.seed, args.seed + args.seeds):
            key = records.key("final", method, chosen[method], seed)
            run_args = with_settings(args, method, chosen[method], seed)
            result = records.reuse_or_run(
                key,
                train_and_test,
                method,
                base_model,
                tokenizer,
                train,
                test,
                run_args,
                save=seed == args.seed,
            )
            results.append({"settings": chosen[method], "seed": seed, **result})
    return results


def summarize(results: list[dict], args: argparse.Namespace, n_train: int, n_test: int) -> list[dict]:
    """Print the table (mean +- std over the seeds) and return its rows."""
    import statistics

    rows, summary = [], []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        accuracy = [100 * r["test_accuracy"] for r in runs]
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        spread = f" ± {statistics.stdev(accuracy):.2f}" if len(runs) > 1 else ""
        name = describe(method, runs[0]["settings"], args)
        cell = params_cell(runs[0]["trainable_params"], runs[0]["total_params"])
        rows.append([name, cell, human_seconds(seconds), f"{statistics.mean(accuracy):.2f}%{spread}"])
        summary.append({"method": method, "configuration": name, "trainable_params": runs[0]["trainable_params"],
                        "train_seconds": seconds, "test_accuracy_mean": statistics.mean(accuracy) / 100,
                        "test_accuracy_std": statistics.stdev(accuracy) / 100 if len(runs) > 1 else 0.0,
                        "seeds": len(runs)})  # fmt: skip
    seeds = f", {args.seeds} seeds each (mean ± std)" if args.seeds > 1 else ""
    print_table(
        f"{args.model} on {args.dataset}: {n_train} train / {n_test} test examples, {args.epochs:g} epochs{seeds}",
        ["method", "trainable params", "train time", "test accuracy"],
        rows,
    )
    lora = next((r for r in results if r["method"] == "lora" and "adapter_bytes" in r), None)
    if lora:
        print(f"LoRA adapter: {human_bytes(lora['adapter_bytes'])} in {args.output_dir}/")
    return summary


def print_sweep(runs: list[dict], chosen: dict[str, dict], args: argparse.Namespace) -> None:
    rows = [
        [describe(r["method"], r["settings"], args), human_seconds(r["train_seconds"]),
         f"{100 * r['validation_accuracy']:.2f}%", "chosen" if r["settings"] == chosen[r["method"]] else ""]
        for r in runs
    ]  # fmt: skip
    print_table(
        "sweep: validation accuracy", ["configuration", "train time", "validation accuracy", ""], rows
    )


def plot_sweep(runs: list[dict], chosen: dict[str, dict], args: argparse.Namespace, path: Path) -> Path:
    """Validation accuracy against learning rate, a line per method (and LoRA target set); the chosen
    settings ringed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for r in runs:
        label = describe(r["method"], r["settings"], args).rpartition(", lr")[0]
        lines.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, points) in enumerate(lines.items()):
        points = sorted(points, key=lambda p: p["settings"]["lr"])
        lrs = [p["settings"]["lr"] for p in points]
        acc = [100 * p["validation_accuracy"] for p in points]
        ax.plot(lrs, acc, "o-", color=f"C{i}", label=label)
        for p in points:
            if p["settings"] == chosen[p["method"]]:
                ax.plot(p["settings"]["lr"], 100 * p["validation_accuracy"], "o", markersize=14,
                        markerfacecolor="none", markeredgecolor=f"C{i}")  # fmt: skip
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation accuracy (%)",
           title=f"{args.model} on {args.dataset}: the sweep (ringed: chosen)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    train, test, label_names = load_data(args)
    base_model, tokenizer = load_sequence_classifier(args.model, num_labels=len(label_names))
    base_model.config.id2label = dict(enumerate(label_names))
    base_model.config.label2id = {name: i for i, name in enumerate(label_names)}
    n_layers = len(transformer_layers(base_model))
    if "last-layers" in args.methods and args.last_layers > n_layers:
        build_parser().error(
            f"argument --last-layers: must be >= 1 and <= {n_layers} ({args.model} has {n_layers} layers), "
            f"got {args.last_layers}"
        )
    train, test = tokenize(train, tokenizer, args.max_length), tokenize(test, tokenizer, args.max_length)

    report: dict[str, Any] = {"model": args.model, "dataset": args.dataset, "labels": label_names}
    records = RunRecords(args)
    if args.sweep:
        runs, chosen = sweep(base_model, tokenizer, train, args, records)
        report |= {"sweep": runs, "chosen": chosen}
        if is_main_process():
            print_sweep(runs, chosen, args)
            plot = plot_sweep(runs, chosen, args, args.output_dir / "sweep.png")
            print(f"sweep plot: {plot}")
    else:
        chosen = {method: settings_of(method, args) for method in args.methods}
    results = final_runs(base_model, tokenizer, train, test, args, chosen, records)
    if is_main_process():
        report |= {"results": results, "summary": summarize(results, args, len(train), len(test))}
        (args.output_dir / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
