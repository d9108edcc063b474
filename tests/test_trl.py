"""TRL's trainers with an hf_lora model: LoRATrainerMixin in front of SFTTrainer (exact resume), and
preference trainers (DPO, GRPO) whose reference is the model itself with its adapters disabled, or one
frozen adapter of it: no second copy of the base model."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny_models import VOCAB, make_model, word_tokenizer
from tolerance import assert_close

import hf_lora
from hf_lora import LoRAConfig, LoRAModel, LoRATrainerMixin, get_lora_model
from hf_lora.trainer import ReferenceModel

trl = pytest.importorskip("trl")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(
    per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, logging_steps=1,
    disable_tqdm=True, dataloader_num_workers=0, save_strategy="no",
    bf16=False,  # TRL's configs default to bf16 autocast; float32 keeps the ln 2 checks at float32 rounding
)  # fmt: skip


class SFT(LoRATrainerMixin, trl.SFTTrainer):
    pass


class DPO(LoRATrainerMixin, trl.DPOTrainer):
    pass


class GRPO(LoRATrainerMixin, trl.GRPOTrainer):
    pass


def words(g: torch.Generator, n: int, low: int = 2, high: int = VOCAB) -> str:
    return " ".join(f"w{i}" for i in torch.randint(low, high, (n,), generator=g).tolist())


def lora_llama(dropout: float = 0.1) -> LoRAModel:
    return get_lora_model(
        make_model("llama"), LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    )


def adapter_of(model: LoRAModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hf_lora.adapter_state_dict(model, name).items()}


def preference_pairs(n: int = 8) -> Dataset:
    """Prompts of random words; the chosen completion repeats low word ids, the rejected one high ids."""
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "prompt": [words(g, 6) for _ in range(n)],
        "chosen": [words(g, 4, 2, 30) for _ in range(n)],
        "rejected": [words(g, 4, 90, VOCAB) for _ in range(n)],
    })  # fmt: skip


# ---- SFT: resume -----------------------------------------------------------------------------------


def test_sft_resume_equals_the_uninterrupted_run(tmp_path):
    """A plain SFTTrainer stops on resume ("Can't find a checkpoint index"); with the mixin it reloads the
    adapter-only checkpoint, and the resumed run ends on the uninterrupted run's adapter, bit for bit."""
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"text": [words(g, 10) for _ in range(24)]})

    def trainer(out, **extra):
        config = trl.SFTConfig(output_dir=str(out), max_steps=6, max_length=16, **(COMMON | extra))
        return SFT(model=lora_llama(), args=config, train_dataset=data, processing_class=word_tokenizer())

    straight = trainer(tmp_path / "a", save_strategy="steps", save_steps=3)
    straight.train()
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "a" / "checkpoint-3" / "model.safetensors").exists(), "adapter-only checkpoints"
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    ours, theirs = adapter_of(resumed.model), adapter_of(straight.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], adapter_of(lora_llama())[k]) for k in ours), "it trained"


def test_a_plain_sft_trainer_cannot_resume_from_adapter_checkpoints(tmp_path):
    """What the mixin is for (if TRL learns to read them, this test says the mixin's resume is redundant)."""
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"text": [words(g, 10) for _ in range(8)]})
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        max_length=16,
        **(COMMON | {"save_steps": 1, "save_strategy": "steps"}),
    )
    trl.SFTTrainer(
        model=lora_llama(), args=config, train_dataset=data, processing_class=word_tokenizer()
    ).train()
    plain = trl.SFTTrainer(
        model=lora_llama(), args=config, train_dataset=data, processing_class=word_tokenizer()
    )
    with pytest.raises(ValueError, match="checkpoint"):
        plain.train(resume_from_checkpoint=True)


# ---- DPO: the reference is the model itself ---------------------------------------------------------


def dpo(model: LoRAModel, out, **kwargs) -> trl.DPOTrainer:
    config = trl.DPOConfig(output_dir=str(out), max_steps=3, beta=0.1, max_length=32, **COMMON)
    return DPO(
        model=model,
        args=config,
        train_dataset=preference_pairs(),
        processing_class=word_tokenizer(),
        **kwargs,
    )


def first_loss(trainer: trl.DPOTrainer) -> float:
    """The loss of the first batch, before any step, computed as the trainer computes it."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_dpo_reference_is_the_model_with_adapters_disabled(tmp_path):
    """A model from a config has no name to load a reference from (TRL fails), and a named one would be
    loaded a second time; here the reference holds no parameters, and a fresh adapter (B = 0) gives the
    reference's outputs exactly: the first loss is ln 2 to the float32 rounding of the log-probabilities."""
    model = lora_llama()
    own = sum(p.numel() for p in model.parameters())
    trainer = dpo(model, tmp_path)
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.ref_model.adapter is None
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0, "no second copy"
    assert sum(p.numel() for p in trainer.model.parameters()) == own
    assert abs(first_loss(trainer) - math.log(2)) <= 1e-6
    before = adapter_of(model)
    trainer.train()
    assert abs(trainer.state.log_history[0]["loss"] - math.log(2)) <= 1e-6, (
        "the first step's loss, as trained"
    )
    after = adapter_of(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k), "the adapter trained"
    assert trainer.state.log_history[-2]["loss"] < math.log(2), "the policy moves toward the chosen answers"


def test_dpo_after_sft_uses_the_sft_adapter_as_the_reference(tmp_path):
    """peft's "reference adapter" flow: the SFT adapter, loaded twice (once frozen as the reference, once
    trainable as the policy), on one base model. The first loss is ln 2 (policy = reference), the
    reference adapter stays as it was, and with the adapters disabled instead the first loss is not ln 2
    (the SFT adapter really is what the policy is compared with)."""
    sft = lora_llama()
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in sft.lora_layers():
            layer.lora_B["default"].normal_(std=0.05)
    sft.save_pretrained(tmp_path / "sft")
    model = LoRAModel.from_pretrained(
        make_model("llama"), tmp_path / "sft", adapter_name="policy", is_trainable=True
    )
    model.load_adapter(tmp_path / "sft", adapter_name="sft")
    assert model.active_adapters == ["policy"]
    trainer = dpo(model, tmp_path / "dpo", ref_adapter_name="sft")
    assert abs(first_loss(trainer) - math.log(2)) <= 1e-6
    reference = adapter_of(model, "sft")
    trainer.train()
    assert all(torch.equal(v, adapter_of(model, "sft")[k]) for k, v in reference.items()), (
        "the reference is frozen"
    )
    assert any(not torch.equal(v, adapter_of(model, "policy")[k]) for k, v in reference.items()), (
        "the policy trained"
    )
    against_base = LoRAModel.from_pretrained(make_model("llama"), tmp_path / "sft", is_trainable=True)
    assert abs(first_loss(dpo(against_base, tmp_path / "base")) - math.log(2)) > 1e-4


def test_reference_adapter_mistakes_are_refused(tmp_path):
    model = lora_llama()
    with pytest.raises(hf_lora.AdapterStateError, match="not in the model"):
        dpo(model, tmp_path, ref_adapter_name="sft")
    with pytest.raises(hf_lora.AdapterStateError, match="also the active"):
        dpo(model, tmp_path, ref_adapter_name="default")
    with pytest.raises(TypeError, match="takes no reference"):
        hf_lora.LoRATrainer(
            model=model, args=trl.SFTConfig(output_dir=str(tmp_path), **COMMON), ref_adapter_name="x"
        )


# ---- GRPO ------------------------------------------------------------------------------------------


def test_grpo_generates_with_the_adapter_and_keeps_no_second_copy(tmp_path):
    """A tiny GRPO run with a KL term: generation with the adapter on, a reward that likes low word ids,
    the reference is the model itself (adapters disabled), and the adapter moves."""
    g = torch.Generator().manual_seed(2)
    prompts = Dataset.from_dict({"prompt": [words(g, 5) for _ in range(8)]})

    def low_ids(completions, **_):
        return [-sum(int(w[1:]) for w in c.split()) / 100 for c in completions]

    model = lora_llama(dropout=0.0)
    config = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, beta=0.04, num_generations=2,
                            max_completion_length=4, **COMMON)  # fmt: skip
    trainer = GRPO(
        model=model,
        reward_funcs=low_ids,
        args=config,
        train_dataset=prompts,
        processing_class=word_tokenizer(),
    )
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.beta == 0.04 and config.beta == 0.04
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    before = adapter_of(model)
    trainer.train()
    after = adapter_of(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert any("kl" in entry for entry in trainer.state.log_history), "the KL term was computed"


# ---- SFT over two processes ------------------------------------------------------------------------


def test_sft_over_two_processes_trains_as_one(tmp_path):
    """torchrun, 2 processes of batch 2 (DDP over gloo, no unused-parameter graph walk), against one
    process of batch 4: the same adapter, on both ranks."""
    script = Path(__file__).parent / "scripts" / "sft_tiny.py"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {
        "one": [sys.executable, str(script), "--out", str(tmp_path / "one"), "--batch", "4"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), str(script), "--out", str(tmp_path / "two"), "--batch", "2"],
    }  # fmt: skip
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-5000:]
    facts = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["world_size"] for f in facts] == [2, 2] and facts[0]["find_unused_parameters"] is False
    one, *two = (
        load_file(tmp_path / d / f"rank{r}.safetensors") for d, r in (("one", 0), ("two", 0), ("two", 1))
    )
    assert all(torch.equal(two[0][k], two[1][k]) for k in one), "both ranks hold the same adapter"
    # The two runs differ only in how each step's gradient is summed (two half-batch means averaged by DDP
    # against one mean of four rows): rounding, amplified by 4 AdamW steps of lr 1e-2 at most to the size
    # of a few float32 eps of each step's update per weight.
    for k in one:
        assert_close(two[0][k], one[k], roundings=4 * 64, what=k)


def test_kto_reference_is_the_model_itself(tmp_path):
    class KTO(LoRATrainerMixin, trl.KTOTrainer):
        pass

    pairs = preference_pairs().to_dict()
    data = Dataset.from_dict({
        "prompt": pairs["prompt"] * 2,
        "completion": pairs["chosen"] + pairs["rejected"],
        "label": [True] * len(pairs["prompt"]) + [False] * len(pairs["prompt"]),
    })  # fmt: skip
    model = lora_llama()
    config = trl.KTOConfig(
        output_dir=str(tmp_path), max_steps=2, max_length=32, **(COMMON | {"per_device_train_batch_size": 4})
    )
    trainer = KTO(model=model, args=config, train_dataset=data, processing_class=word_tokenizer())
    assert isinstance(trainer.ref_model, ReferenceModel) and not list(trainer.ref_model.parameters())
    before = adapter_of(model)
    trainer.train()
    assert any(not torch.equal(before[k], adapter_of(model)[k]) for k in before if "lora_B" in k)
