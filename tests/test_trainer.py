"""transformers.Trainer and accelerate: adapter-only checkpoints, exact resume, DDP and FSDP on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import make_model
from tolerance import adamw_atol
from transformers import Trainer, TrainingArguments

import hf_lora
from hf_lora import LoRAConfig, LoRATrainer, get_lora_model

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ROOT = Path(__file__).parents[1]


def dataset(n: int = 32, seq: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (n, seq), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["x"] * n, "idx": list(range(n))}
    )


def lora_gpt2(**fields):
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, lora_alpha=8, **fields))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B["default"].normal_(std=0.02)
    return model


def args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, seed=0, save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return TrainingArguments(**(base | overrides))


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_checkpoints_hold_the_adapter_only(tmp_path):
    model = lora_gpt2(target_modules=["c_attn", "c_proj", "c_fc"])
    trainer = Trainer(
        model=model, args=args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=dataset()
    )
    trainer.train()
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base_keys = {f"base_model.model.{k}" for k in make_model("gpt2").state_dict()}
    for ckpt in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"):
        files = {p.name for p in ckpt.iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
        } <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
        size = (ckpt / "adapter_model.safetensors").stat().st_size
        assert lora_bytes <= size <= lora_bytes + 8192, "the weights file is the LoRA weights plus a header"
        with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
            assert not set(f.keys()) & base_keys
        # Adam keeps two moments per trained weight; nothing in the folder is base-model sized
        assert (ckpt / "optimizer.pt").stat().st_size <= 2 * lora_bytes + 65536
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} <= {"adapter_config.json", "adapter_model.safetensors",
                                                                 "README.md", "loss_curve.svg", "training_args.bin"}  # fmt: skip
    assert max_diff(adapter(tmp_path / "final"), hf_lora.adapter_state_dict(model)) == 0


def test_unused_columns_are_pruned_by_the_forward_signature(tmp_path):
    trainer = Trainer(model=lora_gpt2(), args=args(tmp_path, max_steps=1), train_dataset=dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    trainer.train()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_in_the_trainer_changes_nothing(tmp_path, reentrant):
    results = []
    for gc in (False, True):
        model = lora_gpt2(target_modules=["c_attn", "c_fc"])
        targs = args(
            tmp_path / str(gc),
            gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        Trainer(model=model, args=targs, train_dataset=dataset()).train()
        results.append(hf_lora.adapter_state_dict(model))
    # the recomputed forward is the same computation in the same order: the same steps, bit for bit
    assert max_diff(*results) == 0
    # and training did happen: 4 AdamW steps of lr 1e-2 move the weights by O(1e-2), far above 1e-4
    assert (
        max_diff(results[0], hf_lora.adapter_state_dict(lora_gpt2(target_modules=["c_attn", "c_fc"]))) > 1e-4
    )


def test_modules_to_save_head_is_trained_and_checkpointed(tmp_path):
    model = lora_gpt2(modules_to_save=["lm_head"])
    head0 = model.lm_head.modules_to_save["default"].weight.detach().clone()
    Trainer(
        model=model, args=args(tmp_path, save_strategy="steps", save_steps=4), train_dataset=dataset()
    ).train()
    saved = adapter(tmp_path / "checkpoint-4")
    assert torch.equal(
        saved["base_model.model.lm_head.weight"], model.lm_head.modules_to_save["default"].weight
    )
    assert not torch.equal(saved["base_model.model.lm_head.weight"], head0)


def test_bf16_mixed_precision_keeps_adapters_fp32(tmp_path):
    model = lora_gpt2(target_modules=["c_attn"])
    before = {k: v.clone() for k, v in hf_lora.adapter_state_dict(model).items()}
    trainer = Trainer(model=model, args=args(tmp_path, bf16=True), train_dataset=dataset())
    trainer.train()
    after = hf_lora.adapter_state_dict(model)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert max_diff(before, after) > 1e-4  # AdamW steps of lr 1e-2 move weights by O(1e-2): far above 1e-4
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = lora_gpt2(target_modules=["c_attn", "c_proj", "c_fc"])
    targs = args(tmp_path, max_steps=6, learning_rate=0.3, lr_scheduler_type="constant", eval_strategy="steps",
                 eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", per_device_eval_batch_size=8)  # fmt: skip
    trainer = LoRATrainer(model=model, args=targs, train_dataset=dataset(), eval_dataset=dataset(8, seed=1))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-6", "this run's best checkpoint is not its last"
    assert max_diff(hf_lora.adapter_state_dict(model), adapter(best)) == 0


def test_lora_trainer_checkpoint_cards_show_the_run(tmp_path):
    """transformers writes trainer_state.json after the model: LoRATrainer hands the log over itself."""
    trainer = LoRATrainer(
        model=lora_gpt2(), args=args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-4", tmp_path / "final"):
        card = (folder / "README.md").read_text()
        assert "![training loss](loss_curve.svg)" in card and (folder / "loss_curve.svg").is_file(), folder
        assert "\n| 4 | 4." in card, "the metrics table has the last step"
    early = (tmp_path / "checkpoint-2" / "README.md").read_text()
    assert "\n| 2 | 4." in early and "\n| 4 | 4." not in early, "each card has the run so far"
    assert not hasattr(trainer.model, "_card_log_history")


def test_label_smoothing_shifts_a_causal_lms_labels_as_for_the_base_model(tmp_path):
    # The Trainer shifts labels for label smoothing only for model classes it knows by name.
    batch = {k: torch.tensor(v) for k, v in dataset(4)[:4].items() if k in ("input_ids", "labels")}
    losses = []
    for model in (make_model("gpt2"), get_lora_model(make_model("gpt2"), LoRAConfig(r=4))):  # B = 0
        trainer = Trainer(model=model, args=args(tmp_path, label_smoothing_factor=0.1))
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, dict(batch)).item())
    assert losses[0] == losses[1]  # B = 0: the LoRA layers add exactly 0, so the same loss bit for bit
    assert repr(model).startswith("LoRAGPT2LMHeadModel(\n  (transformer)")


@pytest.mark.parametrize("trainer_class", [Trainer, LoRATrainer])
def test_trainer_model_card_keeps_the_adapter_card_and_the_summary(tmp_path, trainer_class):
    trainer = trainer_class(model=lora_gpt2(), args=args(tmp_path), train_dataset=dataset())
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(license="mit", tags=["news"])  # what Trainer.push_to_hub calls
    card = (tmp_path / "README.md").read_text()
    assert "hf_lora model card" in card and "PeftModel.from_pretrained" in card  # the adapter's card
    assert "## Training summary (transformers.Trainer)" in card and "learning_rate: 0.01" in card
    assert "license: mit" in card and "- news" in card and "- hf_lora" in card
    assert ("| step | loss |" in card) is (trainer_class is LoRATrainer)  # the run's metrics


def test_trainer_summaries_become_peft_cards_before_a_save_and_without_a_root_adapter(tmp_path):
    # transformers calls the model back only where README.md already was a peft card: before the first
    # save, or with adapters in subfolders only, the repo's card said library_name: transformers.
    trainer = LoRATrainer(model=lora_gpt2(), args=args(tmp_path / "a"), train_dataset=dataset())
    trainer.create_model_card()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: peft" in card and "hf_lora model card" in card and "Training summary" in card

    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4), adapter_name="news")
    trainer = LoRATrainer(model=model, args=args(tmp_path / "b"), train_dataset=dataset())
    trainer.save_model()
    trainer.create_model_card()
    assert "library_name: peft" in (tmp_path / "b" / "README.md").read_text()
    assert "hf_lora model card" in (tmp_path / "b" / "news" / "README.md").read_text()


def test_a_save_keeps_a_trainer_summary_it_finds_but_not_a_hand_written_readme(tmp_path):
    trainer = Trainer(model=lora_gpt2(), args=args(tmp_path), train_dataset=dataset())
    trainer.create_model_card()  # before any save: the plain Trainer's summary alone
    assert "library_name: transformers" in (tmp_path / "README.md").read_text()
    trainer.save_model()  # the summary is not a hand-written README: the adapter card takes it in
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "hf_lora model card" in card and "Training summary" in card
    (tmp_path / "README.md").write_text("# my notes\n")
    trainer.save_model()
    assert (tmp_path / "README.md").read_text() == "# my notes\n"


def test_gradient_checkpointing_switched_on_before_wrapping_trains_a_vision_model():
    # peft's idiom: checkpointing first, then the adapter. A model whose input is not input_ids needs
    # its (frozen) embedding output to require grad for reentrant checkpointing.
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)  # fmt: skip
    base = ViTForImageClassification(config)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_lora_model(base, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.train()
    model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2])).loss.backward()
    grads = [layer.lora_B["default"].grad for _, layer in model.lora_layers()]  # (A has none: B = 0)
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_plain_trainer_refuses_to_resume_without_the_adapter(tmp_path):
    """A plain Trainer cannot read adapter checkpoints: it must stop, never train on without them."""
    targs = args(tmp_path, save_strategy="steps", save_steps=2)
    Trainer(model=lora_gpt2(), args=targs, train_dataset=dataset()).train()
    with pytest.raises(ValueError, match="checkpoint"):
        Trainer(model=lora_gpt2(), args=args(tmp_path, max_steps=6), train_dataset=dataset()).train(
            resume_from_checkpoint=True
        )


def test_lora_trainer_turns_off_find_unused_parameters_without_touching_the_callers_args(tmp_path):
    targs = args(tmp_path)
    trainer = LoRATrainer(model=lora_gpt2(), args=targs, train_dataset=dataset())
    assert trainer.args.ddp_find_unused_parameters is False and targs.ddp_find_unused_parameters is None


# ---- subprocesses: SIGKILL + resume, and two processes (gloo) --------------------------------------


def run(cmd: list[str], out: Path, extra_env: dict | None = None, expect_kill: bool = False) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | (extra_env or {})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, proc.stderr[-5000:]


def script(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--out", str(out), *flags]


def torchrun(out: Path, *flags: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), str(SCRIPT), "--out", str(out), *flags]  # fmt: skip


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def rank_adapters(out: Path) -> list[dict]:
    return [load_file(p) for p in sorted(out.glob("rank*.safetensors"))]


def test_resume_after_sigkill_gives_the_uninterrupted_adapter(tmp_path):
    flags = ["--steps", "8", "--save-steps", "3", "--dropout", "0.1", "--modules-to-save", "lm_head"]
    run(script(tmp_path / "straight", *flags), tmp_path)
    run(script(tmp_path / "crash", *flags, "--kill-after-save", "6"), tmp_path, expect_kill=True)
    assert (tmp_path / "crash" / "checkpoint-6").is_dir() and not (tmp_path / "crash" / "final").exists()
    run(script(tmp_path / "crash", *flags, "--resume"), tmp_path)
    straight, resumed = adapter(tmp_path / "straight" / "final"), adapter(tmp_path / "crash" / "final")
    assert "base_model.model.lm_head.weight" in resumed
    # the resumed run restores weights, optimizer, scheduler and RNG, and runs the same steps on the same
    # code path as the uninterrupted one: bit for bit
    assert max_diff(straight, resumed) == 0
    losses = reports(tmp_path / "straight")[0]["losses"]
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    """The adapter after 6 steps of global batch 8 in one process, via the Trainer and via a plain loop."""
    out = tmp_path_factory.mktemp("one")
    run(script(out / "trainer", "--steps", "6", "--batch", "8", "--save-steps", "100"), out)
    run(script(out / "loop", "--setup", "accelerate", "--steps", "6", "--batch", "8"), out)
    return {"trainer": adapter(out / "trainer" / "final"), "loop": adapter(out / "loop" / "final")}


def check_two_ranks(
    out: Path, reference: dict, find_unused: bool | None = False, sharded: bool = False
) -> None:
    facts = reports(out)
    assert [f["world_size"] for f in facts] == [2, 2], "two processes, each seeing world size 2"
    assert all(f.get("find_unused_parameters") in (find_unused, None) for f in facts)
    if sharded:
        assert all(f["sharded"] for f in facts), "LoRA weights were DTensors sharded over the ranks"
    a, b = rank_adapters(out)
    assert max_diff(a, b) == 0, "both ranks hold the same adapter"
    # 6 AdamW steps of lr <= 1e-2 on gradients averaged over two ranks instead of one batch: another
    # order of the same sums, so the gap is bounded as tolerance.adamw_atol derives
    assert max_diff(adapter(out / "final"), reference) <= adamw_atol(6, 1e-2, *reference.values()), (
        "equal to one process with the same global batch"
    )
    writers = (out / "writes.log").read_text().split()
    assert writers and set(writers) == {"0"}, "only the main process writes files"


@pytest.mark.parametrize("trainer", ["lora", "plain"])
def test_ddp_trainer_with_torchrun(tmp_path, one_process_reference, trainer):
    """LoRATrainer runs DDP without the unused-parameter graph walk; a plain Trainer keeps it (it turns it
    on for PreTrainedModels without gradient checkpointing) and trains the same adapter."""
    run(
        torchrun(tmp_path, "--trainer", trainer, "--steps", "6", "--batch", "4", "--save-steps", "3"),
        tmp_path,
    )
    check_two_ranks(tmp_path, one_process_reference["trainer"], find_unused=trainer == "plain")
    assert (tmp_path / "checkpoint-6" / "adapter_model.safetensors").is_file()


def test_ddp_trainer_with_accelerate_launch(tmp_path, one_process_reference):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(SCRIPT), "--out", str(tmp_path), "--steps", "6", "--batch", "4"]  # fmt: skip
    run(cmd, tmp_path, extra_env={"ACCELERATE_USE_CPU": "true"})
    check_two_ranks(tmp_path, one_process_reference["trainer"])


def test_accelerate_loop_with_accelerate_launch(tmp_path, one_process_reference):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(SCRIPT), "--out", str(tmp_path), "--setup", "accelerate",
           "--steps", "6", "--batch", "4"]  # fmt: skip
    run(cmd, tmp_path, extra_env={"ACCELERATE_USE_CPU": "true"})
    check_two_ranks(tmp_path, one_process_reference["loop"])


@pytest.mark.parametrize("setup", ["fsdp2", "fsdp1"])
def test_fsdp_saves_the_whole_adapter(tmp_path, one_process_reference, setup):
    run(torchrun(tmp_path, "--setup", setup, "--steps", "6", "--batch", "4"), tmp_path)
    check_two_ranks(tmp_path, one_process_reference["loop"], find_unused=None, sharded=setup == "fsdp2")
    saved = adapter(tmp_path / "final")
    assert all(t.numel() > 0 for t in saved.values()), "gathered tensors, not empty shards (peft#2892)"


def test_fsdp2_trains_embedding_adapters_as_one_process_does(tmp_path):
    """LoRA on the token and position embeddings too (wte is tied to lm_head), sharded by FSDP2."""
    targets = ["--targets", "wte", "wpe", "c_attn"]
    run(script(tmp_path / "one", "--setup", "accelerate", "--steps", "6", "--batch", "8", *targets), tmp_path)
    run(torchrun(tmp_path / "two", "--setup", "fsdp2", "--steps", "6", "--batch", "4", *targets), tmp_path)
    reference = adapter(tmp_path / "one" / "final")
    assert reference["base_model.model.transformer.wte.lora_embedding_A"].abs().max() > 0, (
        "A (from 0) trained"
    )
    check_two_ranks(tmp_path / "two", reference, find_unused=None, sharded=True)


@pytest.mark.parametrize("setup", ["fsdp2", "ddp-trainer"])
def test_token_rows_train_over_two_processes_as_in_one(tmp_path, setup):
    """Trainable token rows (wte's, shown by the tied lm_head too) with LoRA: FSDP2 shards the rows with
    the embedding; DDP (LoRATrainer: no unused-parameter walk) sees them used in every step."""
    flags = ["--steps", "6", "--targets", "c_attn", "--tokens", "3", "7", "11"]
    one = ["--setup", "accelerate"] if setup == "fsdp2" else ["--save-steps", "100"]
    two = ["--setup", "fsdp2"] if setup == "fsdp2" else ["--save-steps", "100"]
    run(script(tmp_path / "one", *one, "--batch", "8", *flags), tmp_path)
    run(torchrun(tmp_path / "two", *two, "--batch", "4", *flags), tmp_path)
    reference = adapter(tmp_path / "one" / "final")
    rows = reference["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]
    # 6 AdamW steps of lr 1e-2 move the rows by O(1e-2): 1e-3 is far above rounding
    assert rows.shape == (3, 32) and (rows - build_base_rows([3, 7, 11])).abs().max() > 1e-3, (
        "the rows trained"
    )
    check_two_ranks(
        tmp_path / "two", reference, find_unused=None if setup == "fsdp2" else False, sharded=setup == "fsdp2"
    )


def build_base_rows(ids: list[int]) -> torch.Tensor:
    sys.path.insert(0, str(SCRIPT.parent))
    from train_tiny import build_model_base

    return build_model_base().transformer.wte.weight.detach()[ids]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
