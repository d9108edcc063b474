"""Workloads (as data) and the few functions that turn one into models, batches and training steps.

Every model is built from a config (no downloads), with `torch.manual_seed(SEED)` before construction,
so every process builds the same base weights. Within one process the variants of a workload are
deep copies of one base model, and the peft model gets hf_lora's LoRA A/B (and head) weights copied in,
so hf_lora, peft and full fine-tuning start from identical weights and see identical batches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/reference.py: the peft twin

SEED = 0
BATCH_SEED = 1234
LORA_R, LORA_ALPHA = 8, 16

# Variant names. A LoRA variant carries its dropout: "hf_lora@0.05".
FULL, BASE = "full", "base"
LIBS = ("hf_lora", "peft")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model_class: str  # transformers class name
    config_class: str
    config: dict[str, Any]
    target_modules: list[str]
    task: str  # "causal_lm" or "seq_cls"
    modules_to_save: list[str] | None = None
    # peft needs fan_in_fan_out=True for GPT-2's Conv1D (it would warn and set it itself); hf_lora
    # reads the layout from the module class.
    peft_fan_in_fan_out: bool = False
    # What --quick changes in the model config (fewer layers), documented in the report.
    quick_config: dict[str, Any] = field(default_factory=dict)

    def with_config(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, config={**self.config, **changes})


GPT2 = Workload(
    name="gpt2",
    description="GPT-2-small shape (GPT2Config()), causal LM; LoRA on c_attn, c_proj, c_fc",
    model_class="GPT2LMHeadModel",
    config_class="GPT2Config",
    config={},
    target_modules=["c_attn", "c_proj", "c_fc"],
    task="causal_lm",
    peft_fan_in_fan_out=True,
)

DISTILBERT = Workload(
    name="distilbert",
    description=(
        "DistilBERT-base shape (DistilBertConfig()), sequence classification (2 labels); LoRA on q_lin, "
        "v_lin; heads pre_classifier + classifier trained in full (modules_to_save)"
    ),
    model_class="DistilBertForSequenceClassification",
    config_class="DistilBertConfig",
    config={"num_labels": 2},
    target_modules=["q_lin", "v_lin"],
    task="seq_cls",
    # peft matches modules_to_save by plain suffix, so ["classifier"] also trains `pre_classifier`
    # (hf_lora matches whole dotted names). Naming both heads gives both libraries the same
    # trainable parameters; `build_variants` checks the counts agree.
    modules_to_save=["pre_classifier", "classifier"],
)

LLAMA = Workload(
    name="llama",
    description=(
        "Llama shape = SmolLM2-135M's config (30 layers, d=576, GQA 9/3 heads, vocab 49152, tied "
        "embeddings), causal LM; LoRA on q/k/v/o/gate/up/down_proj"
    ),
    model_class="LlamaForCausalLM",
    config_class="LlamaConfig",
    config={
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
    },
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task="causal_lm",
    quick_config={"num_hidden_layers": 4},
)

# GPT-2-medium shape: only for injection / adapter loading, where model size is what matters.
GPT2_MEDIUM = dataclasses.replace(
    GPT2,
    name="gpt2-medium",
    description="GPT-2-medium shape (n_embd=1024, n_layer=24, n_head=16); LoRA on c_attn, c_proj, c_fc",
    config={"n_embd": 1024, "n_layer": 24, "n_head": 16},
)

WORKLOADS = {w.name: w for w in (GPT2, DISTILBERT, LLAMA, GPT2_MEDIUM)}
TRAIN_WORKLOADS = ("gpt2", "distilbert", "llama")


# ---- building ------------------------------------------------------------------------------------------


def model_config(w: Workload):
    import transformers

    return getattr(transformers, w.config_class)(**w.config)


def max_positions(w: Workload) -> int:
    cfg = model_config(w)
    return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings


def build_base(w: Workload, device: str = "cpu") -> nn.Module:
    """The base model with seeded random weights, in train mode."""
    import transformers

    config = model_config(w)
    torch.manual_seed(SEED)
    model = getattr(transformers, w.model_class)(config)
    return model.to(device).train()


def lora_config(w: Workload, dropout: float, **extra: Any):
    """hf_lora's config for a workload; `extra` for variants (use_dora=True, init_lora_weights=...)."""
    import hf_lora

    return hf_lora.LoRAConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules=list(w.target_modules),
        modules_to_save=list(w.modules_to_save) if w.modules_to_save else None,
        **extra,
    )


def peft_config(w: Workload, dropout: float, **extra: Any):
    import peft

    # No task_type: peft would add its own heads to modules_to_save for SEQ_CLS.
    return peft.LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules=list(w.target_modules),
        modules_to_save=list(w.modules_to_save) if w.modules_to_save else None,
        fan_in_fan_out=w.peft_fan_in_fan_out,
        **extra,
    )


def make_hf_lora(w: Workload, base: nn.Module, dropout: float) -> nn.Module:
    """hf_lora on `base` (in place). Seeds the RNG first, so A is the same in every process."""
    import hf_lora

    torch.manual_seed(SEED + 1)
    return hf_lora.get_lora_model(base, lora_config(w, dropout))


def make_variant(w: Workload, variant: str, base: nn.Module) -> nn.Module:
    """The model for one variant name, built on `base` in place (no weight copying between variants).
    `hf_lora+chunked@p` is hf_lora with its opt-in chunked causal-LM loss (`enable_chunked_loss()`);
    `hf_lora+peft_masks@p` is plain hf_lora (`make_step(peft_masks=True)` sets how it draws masks)."""
    lib, p = parse_variant(variant)
    if lib == FULL:
        return make_full(base)
    if lib == BASE:
        return base
    if lib == "peft":
        return make_peft(w, base, p)
    model = make_hf_lora(w, base, p)
    if lib == "hf_lora+chunked":
        model.enable_chunked_loss()
    return model


def make_peft(w: Workload, base: nn.Module, dropout: float) -> nn.Module:
    import peft

    torch.manual_seed(SEED + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft_config(w, dropout))


def make_full(base: nn.Module) -> nn.Module:
    return base.requires_grad_(True)


def copy_lora_weights(ours: nn.Module, ref: nn.Module) -> None:
    """Copy hf_lora's A/B and fully trained heads into the peft model: the test suite's helper, imported
    here and not at the top because it imports peft, which hf_lora-only worker processes must not load."""
    from reference import copy_lora_weights as copy_into_peft

    copy_into_peft(ours, ref)


def randomise_B(model: nn.Module, seed: int = SEED + 2) -> None:
    """B starts at zero; inference benchmarks give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for B in layer.lora_B.values():
                B.copy_((torch.randn(B.shape, generator=g) * 0.02).to(B.device, B.dtype))


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parse_variant(variant: str) -> tuple[str, float]:
    """`hf_lora@0.05` -> ("hf_lora", 0.05); `full` -> ("full", 0.0)."""
    lib, _, p = variant.partition("@")
    return lib, float(p) if p else 0.0


def build_variants(
    w: Workload, variants: list[str], device: str = "cpu", base: nn.Module | None = None
) -> dict[str, nn.Module]:
    """One model per variant name ("full", "base", "hf_lora@p", "peft@p"), from deep copies of one base.

    Each peft model gets the weights of the hf_lora model of the same dropout (built here if it was not
    asked for), and the trainable-parameter counts of the two libraries are checked to agree."""
    base = build_base(w, device) if base is None else base
    models: dict[str, nn.Module] = {}
    ours: dict[float, nn.Module] = {}
    for v in variants:
        lib, p = parse_variant(v)
        if lib != "peft":
            models[v] = make_variant(w, v, copy.deepcopy(base))
        if lib == "hf_lora":
            ours[p] = models[v]
    for v in variants:
        lib, p = parse_variant(v)
        if lib != "peft":
            continue
        if p not in ours:
            ours[p] = make_hf_lora(w, copy.deepcopy(base), p)
        models[v] = make_peft(w, copy.deepcopy(base), p)
        copy_lora_weights(ours[p], models[v])
        a, b = n_trainable(ours[p]), n_trainable(models[v])
        if a != b:
            raise RuntimeError(f"{w.name}: hf_lora trains {a:,} parameters but peft trains {b:,}")
    return {v: models[v] for v in variants}  # in the order asked for: the interleaved rounds run it


# ---- batches and steps ---------------------------------------------------------------------------------


def make_batch(w: Workload, batch: int, seq: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Fixed random token ids (and labels), the same in every process."""
    g = torch.Generator().manual_seed(BATCH_SEED)
    ids = torch.randint(model_config(w).vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if w.task == "causal_lm":
        out["labels"] = ids.clone()
    else:
        out["labels"] = torch.randint(model_config(w).num_labels, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with torch's defaults for the device (the for-loop implementation on CPU)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def make_step(
    model: nn.Module, batch: dict[str, torch.Tensor], amp: str = "none", peft_masks: bool = False
) -> Callable[[], torch.Tensor]:
    """A closure doing one training step: forward, backward, AdamW step, zero_grad. Returns the loss.
    `peft_masks`: an hf_lora model draws F.dropout's exact masks (`hf_lora.peft_dropout_masks()`)."""
    opt = make_optimizer(model)
    device_type = batch["input_ids"].device.type
    model.train()
    if peft_masks:
        import hf_lora

        masks = hf_lora.peft_dropout_masks
    else:
        masks = contextlib.nullcontext

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp == "bf16"), masks():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---- FLOPs (for MFU on GPU) ----------------------------------------------------------------------------


def matmul_params(base: nn.Module) -> int:
    """Weights used in matmuls per token, counted on the base model (before LoRA): every Linear/Conv1D
    weight, the output head included (tied to the input embedding or not). Embedding lookups are free."""
    from transformers.pytorch_utils import Conv1D

    weights = {id(m.weight): m.weight.numel() for m in base.modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sum(weights.values())


def flops_per_token(base: nn.Module, seq: int, lora: bool) -> float:
    """Model FLOPs per trained token (PaLM-style estimate, causal masking ignored):

    full fine-tuning: 6·N + 12·L·d·seq   (forward 2N; backward 4N: input grads 2N + weight grads 2N)
    LoRA:             4·N + 12·L·d·seq   (frozen weights get no weight gradient; the adapters' own
                                          FLOPs, ~6·N_lora, are under 1% and left out)
    N = weights used in matmuls (Linear/Conv1D, output head included); 12·L·d·seq is attention's
    QK^T and AV (forward 4·L·d·seq, backward twice that), needed in both cases."""
    cfg = base.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or cfg.n_layers
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or cfg.dim
    n = matmul_params(base)
    return (4 if lora else 6) * n + 12 * layers * d * seq
