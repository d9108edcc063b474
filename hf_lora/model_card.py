"""The README.md that goes with a saved adapter, rendered from `model_cards/adapter_card.md`.

The card has the Hub's YAML front matter (base model, library, tags, pipeline tag), the LoRA settings,
training metrics and a loss curve (an SVG drawn here, no plotting library needed) when a Trainer's log
is at hand, and usage snippets for hf_lora and peft. A README the user wrote is never overwritten:
only one that carries hf_lora's marker line is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .adapter_files import adapter_state_dict
from .atomic import atomic_write
from .model import base_class

if TYPE_CHECKING:
    import torch

    from .model import LoRAModel

logger = logging.getLogger(__name__)

MARKER = "<!-- hf_lora model card"
CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss_curve.svg"
# The attribute LoRATrainer sets on the model while it saves: the Trainer's log, for the card's metrics.
LOG_HISTORY_ATTR = "_card_log_history"
_TEMPLATE_NAME = "adapter_card.md"
_TASKS = {  # task_type -> (Auto class, pipeline tag)
    "CAUSAL_LM": ("AutoModelForCausalLM", "text-generation"),
    "SEQ_CLS": ("AutoModelForSequenceClassification", "text-classification"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "text2text-generation"),
    "TOKEN_CLS": ("AutoModelForTokenClassification", "token-classification"),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "question-answering"),
    "FEATURE_EXTRACTION": ("AutoModel", "feature-extraction"),
}
_CLASS_SUFFIXES = {  # model class name suffix -> task_type, when the config does not say
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def is_generated_card(path: Path) -> bool:
    """Whether the README at `path` is one hf_lora wrote (it carries the marker line); False if absent."""
    return path.is_file() and MARKER in path.read_text(encoding="utf-8", errors="replace")


def template_path() -> Path:
    """`model_cards/adapter_card.md`: shipped inside the wheel as `hf_lora.model_cards`, read from the
    source tree otherwise."""
    try:
        path = Path(str(resources.files("hf_lora.model_cards") / _TEMPLATE_NAME))
        if path.is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "model_cards" / _TEMPLATE_NAME


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).expanduser().exists() and bool(_HUB_ID.fullmatch(name))


_HUB_CACHE_FOLDER = re.compile(r"models--([\w.\-]+?)--([\w.\-]+)")  # huggingface_hub's cache layout


def hub_base_model(name: str | None) -> str | None:
    """The base model's Hub id, for a card that goes to the Hub: `name` when it is one, the id a Hub-cache
    snapshot folder (`.../models--org--name/snapshots/<revision>`) stands for, else None. A local path
    never reaches a card: it means nothing to a reader and may name the user's home."""
    if not name:
        return None
    if is_hub_id(name):
        return name
    for part in reversed(Path(name).parts):
        if match := _HUB_CACHE_FOLDER.fullmatch(part):
            return f"{match.group(1)}/{match.group(2)}"
    return None


def task_of(model: LoRAModel, adapter_name: str) -> str | None:
    task = model.peft_config[adapter_name].task_type
    if task:
        return task
    cls_name = base_class(model).__name__
    return next((t for suffix, t in _CLASS_SUFFIXES.items() if cls_name.endswith(suffix)), None)


def render_model_card(
    model: LoRAModel,
    adapter_name: str,
    *,
    repo_id: str | None = None,
    log_history: list[dict[str, Any]] | None = None,
    card_data: dict[str, Any] | None = None,
    loss_curve: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> str:
    """The card of one adapter. Its sizes count `tensors`, what its file holds, when given (else the
    adapter's parameters): not what happens to be trainable in the model when it is saved."""
    config = model.peft_config[adapter_name]
    hub_base = hub_base_model(config.base_model_name_or_path)
    task = task_of(model, adapter_name)
    auto_class, pipeline_tag = _TASKS.get(task, ("AutoModel", None))
    tags = ["lora", "hf_lora", "peft"] + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    data = ModelCardData(base_model=hub_base, library_name="peft", tags=tags, pipeline_tag=pipeline_tag)
    for key, value in (card_data or {}).items():
        setattr(data, key, value)

    layers = [layer for _, layer in model.lora_layers() if adapter_name in layer.lora_A]
    if tensors is None:  # the adapter's own tensors: LoRA factors, DoRA magnitudes, copies saved in full
        tensors = {name: p for name, p in model.named_parameters() if _adapter_param_of(name) == adapter_name}
    adapter_params = sum(t.numel() for t in tensors.values())
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    base_params = sum(p.numel() for name, p in model.named_parameters() if _adapter_param_of(name) is None)
    metrics, metric_names, metrics_note = _metrics_table(log_history or [])
    targets = config.target_modules
    card = ModelCard.from_template(
        data,
        template_path=str(template_path()),
        title=f"LoRA adapter for {hub_base}" if hub_base else "LoRA adapter",
        base_model=hub_base,
        base_model_url=f"https://huggingface.co/{hub_base}" if hub_base else None,
        adapter_size=_human_bytes(adapter_bytes),
        r=config.r,
        lora_alpha=config.lora_alpha,
        scaling=f"{config.scaling_for(''):g}",
        use_rslora=config.use_rslora,
        rank_pattern=config.rank_pattern,
        alpha_pattern=config.alpha_pattern,
        lora_dropout=config.lora_dropout,
        target_modules=f"`{targets}`"
        if isinstance(targets, str)
        else ", ".join(f"`{t}`" for t in targets or []),
        n_lora_layers=len(layers),
        modules_to_save=", ".join(f"`{m}`" for m in config.modules_to_save or []),
        trainable_tokens=token_rows_summary(config.trainable_token_indices),
        bias=config.bias,
        task_type=task,
        trainable=f"{adapter_params:,}",
        total=f"{base_params:,}",
        trainable_pct=f"{100 * adapter_params / max(base_params, 1):.4f}%",
        metrics=metrics,
        metric_names=metric_names,
        metrics_note=metrics_note,
        loss_curve=loss_curve,
        auto_class=auto_class,
        repo_id=repo_id or "<path or repo id of this adapter>",
        # adapters other than "default" live in a subfolder of their own (peft's layout)
        subfolder=None if adapter_name == "default" else adapter_name,
    )
    return str(card)


def _adapter_param_of(name: str) -> str | None:
    """The adapter a parameter of a LoRA model belongs to (None for the base model's own)."""
    match = re.search(r"\.(?:lora_A|lora_B|lora_magnitude|modules_to_save)\.([^.]+)", f".{name}")
    return match.group(1) if match else None


def write_model_card(
    model: LoRAModel,
    directory: Path,
    adapter_name: str,
    *,
    repo_id: str | None = None,
    log_history: list[dict[str, Any]] | None = None,
    card_data: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> bool:
    """Write README.md (and the loss curve) unless the user wrote their own README. True if written.
    A training summary that transformers.Trainer wrote there is kept in the card (`_merge_summary`)."""
    card_path = directory / CARD_NAME
    summary = None
    if card_path.exists():
        text = card_path.read_text(encoding="utf-8", errors="replace")
        if MARKER not in text:
            if not _is_trainer_summary(text):
                logger.info("%s was written by hand; leaving it as it is", card_path)
                return False
            summary = ModelCard(text)
            card_data = {
                **{k: v for k, v in summary.data.to_dict().items() if k not in _OWN_KEYS},
                **(card_data or {}),
            }
    if log_history is None:
        log_history = _trainer_log(directory)
    curve = None
    points = [(e["step"], e["loss"]) for e in log_history or [] if "loss" in e and "step" in e]
    if len(points) >= 2:
        atomic_write(directory / LOSS_CURVE_NAME, loss_curve_svg(points).encode())
        curve = LOSS_CURVE_NAME
    text = render_model_card(
        model,
        adapter_name,
        repo_id=repo_id,
        log_history=log_history,
        card_data=card_data,
        loss_curve=curve,
        tensors=tensors,
    )
    if summary is not None:
        text = _merge_summary(text, summary)
    atomic_write(card_path, text.encode())
    return True


_OWN_KEYS = ("base_model", "library_name", "pipeline_tag", "tags")  # what the adapter card sets itself
# What transformers.Trainer.create_model_card writes (TrainingSummary): not a card the user wrote.
_TRAINER_SUMMARY_SIGNS = ("generated_from_trainer", "the information the Trainer had access to")


def _is_trainer_summary(text: str) -> bool:
    return any(sign in text for sign in _TRAINER_SUMMARY_SIGNS)


def token_rows_summary(spec: list[int] | dict[str, list[int]] | None, limit: int = 8) -> str:
    """`trainable_token_indices` in a line (a card, `hf-lora info`): where the rows are, how many, the first
    ids."""
    if spec is None:
        return ""
    groups = spec.items() if isinstance(spec, dict) else [("input embeddings", spec)]
    parts = []
    for where, ids in groups:
        shown = ", ".join(map(str, ids[:limit])) + (", ..." if len(ids) > limit else "")
        parts.append(f"{where}: {len(ids)} token{'s' if len(ids) != 1 else ''} ({shown})")
    return "; ".join(parts)


def _add_tags(card: ModelCard, tags: list[str]) -> None:
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))


def _merge_summary(card_text: str, summary: ModelCard) -> str:
    """The adapter card with a Trainer summary's tags added and its text as a section."""
    card = ModelCard(card_text)
    _add_tags(card, summary.data.tags or [])
    body = re.sub(r"^(#+) ", r"#\1 ", summary.text.strip(), flags=re.M)  # its headings one level down
    card.text = f"{card.text.rstrip()}\n\n## Training summary (transformers.Trainer)\n\n{body}\n"
    return str(card)


def update_trainer_card(model: LoRAModel, directory: Path) -> bool:
    """After `Trainer.create_model_card` (and so `Trainer.push_to_hub`) wrote its training summary over
    README.md: the root adapter's card again, with the summary kept (its metadata in the front matter, its
    text as a section). Without a root adapter ("default"; the others live in subfolders) the summary
    stays, marked as a peft-format adapter repo as peft marks it. True if the card was written."""
    card_path = directory / CARD_NAME
    if "default" not in model.peft_config:
        if card_path.is_file() and _is_trainer_summary(text := card_path.read_text(encoding="utf-8")):
            card = ModelCard(text)
            card.data.library_name = "peft"
            _add_tags(card, ["lora", "hf_lora", "peft"])
            atomic_write(card_path, str(card).encode())
        return False
    return write_model_card(
        model,
        directory,
        "default",
        log_history=getattr(model, LOG_HISTORY_ATTR, None),
        tensors=adapter_state_dict(model, "default"),
    )


def _trainer_log(directory: Path) -> list[dict[str, Any]] | None:
    """The Trainer's log when the directory is (or sits next to) a checkpoint with trainer_state.json."""
    state = directory / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        return json.loads(state.read_text()).get("log_history")
    except (OSError, ValueError, AttributeError):
        return None


def _metrics_table(
    log: list[dict[str, Any]], max_rows: int = 12
) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """(rows, column names, a note saying what was left out, or None). Every evaluation is kept; when the
    log has more steps than `max_rows`, training-loss-only steps are sampled (the first, the last, evenly
    spaced ones between) and the note says so."""
    wanted = ("loss", "eval_loss", "eval_accuracy", "learning_rate", "epoch")
    rows: dict[int, dict[str, Any]] = {}
    for entry in log:
        if "step" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        for key in wanted:
            if key in entry:
                row[key] = f"{entry[key]:.4g}" if isinstance(entry[key], float) else entry[key]
    names = [k for k in wanted if any(k in r for r in rows.values())]
    if not any(k in names for k in ("loss", "eval_loss")):
        return [], [], None
    ordered = [rows[s] for s in sorted(rows)]
    if len(ordered) <= max_rows:
        return ordered, names, None
    evaluated = {i for i, row in enumerate(ordered) if any(k.startswith("eval_") for k in row)}
    spare = max(max_rows - len(evaluated), 2)
    picks = evaluated | {round(i * (len(ordered) - 1) / (spare - 1)) for i in range(spare)}
    kept = [row for i, row in enumerate(ordered) if i in picks]
    note = (
        f"{len(kept)} of {len(ordered)} logged steps: every evaluation, and the training loss at the first, "
        "the last and evenly spaced steps between"
    )
    return kept, names, note


def loss_curve_svg(points: list[tuple[float, float]], width: int = 480, height: int = 240) -> str:
    """A small line chart of (step, loss) as standalone SVG."""
    pad = 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    path = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>\n'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>\n'
        f'<polyline fill="none" stroke="#d9480f" stroke-width="2" points="{path}"/>\n'
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>\n'
        f'<text x="{pad}" y="{pad - 8}" text-anchor="middle">loss</text>\n'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>\n'
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.3g}</text>\n'
        f'<text x="{pad}" y="{height - pad + 14}" text-anchor="middle">{x0:g}</text>\n'
        f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="middle">{x1:g}</text>\n'
        "</svg>\n"
    )


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def create_or_update_model_card(model: LoRAModel, output_dir: str | os.PathLike) -> None:
    """`LoRAModel.create_or_update_model_card`, called by `Trainer.create_model_card` / `Trainer.push_to_hub`
    (as for a peft model) after it wrote its training summary over README.md: the adapter's card is written
    again, summary kept."""
    update_trainer_card(model, Path(output_dir))
