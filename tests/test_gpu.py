"""CUDA-only checks, run on a GPU machine (`scripts/test -m gpu`); skipped everywhere else (CI has no GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import copy_lora_weights, randomise_B
from tiny_models import batch_for, make_model
from tolerance import assert_as_accurate, assert_close, assert_close_states

import hf_lora
from hf_lora import LoRAConfig, get_lora_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
TARGETS = ["c_attn", "c_proj", "c_fc"]


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def check_logits(ours, batch: dict, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Our logits `a` against peft's `b`: in float32 equal up to rounding; in a 16-bit type, where a whole
    model's forward may be dozens of that type's roundings off, as close to the float32 logits (of the
    same, rounded, weights) as peft's are (tolerance.assert_as_accurate)."""
    if dtype == torch.float32:
        assert_close(a, b, what="logits")
    else:
        exact = copy.deepcopy(ours).float()(**batch).logits
        assert_as_accurate(a, b, exact, floor_dtype=dtype, what=f"{dtype} logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_match_peft_on_cuda(dtype):
    base = make_model("gpt2").cuda().to(dtype)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ours = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomise_B(ours)
    copy_lora_weights(ours, ref)
    assert ours.transformer.h[0].attn.c_attn.lora_A["default"].dtype == torch.float32
    with torch.no_grad():
        a, b = ours(**on_cuda(batch_for("gpt2"))).logits, ref(**on_cuda(batch_for("gpt2"))).logits
        check_logits(ours, on_cuda(batch_for("gpt2")), a, b, dtype)


def test_fused_path_equals_plain_path_on_cuda():
    model = get_lora_model(make_model("llama").cuda(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_B(model)
    model.train()
    grads = []
    for fused in (True, False):
        for _, layer in model.lora_layers():
            layer._fused = fused
        model(**on_cuda(batch_for("llama"))).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    assert_close_states(grads[0], grads[1], what="gradient")  # one evaluation in another order


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision_keeps_fp32_adapters(tmp_path, precision):
    from datasets import Dataset
    from transformers import TrainingArguments

    ids = torch.randint(1, 128, (16, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=TARGETS))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             **{precision: True})  # fmt: skip
    hf_lora.LoRATrainer(model=model, args=args, train_dataset=data).train()
    assert all(t.dtype == torch.float32 for t in hf_lora.adapter_state_dict(model).values())


def test_deepspeed_zero3_saves_the_whole_adapter(tmp_path):
    pytest.importorskip("deepspeed")
    from datasets import Dataset
    from transformers import TrainingArguments

    ids = torch.randint(1, 128, (16, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=TARGETS))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             bf16=True, deepspeed="examples/deepspeed_zero3.json", save_strategy="steps", save_steps=2)  # fmt: skip
    hf_lora.LoRATrainer(model=model, args=args, train_dataset=data).train()
    saved = hf_lora.read_adapter(tmp_path / "checkpoint-2").tensors
    assert saved and all(t.numel() > 0 for t in saved.values()), "gathered, not empty ZeRO-3 shards"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_rows_match_peft_on_cuda_without_host_syncs(dtype):
    """Trainable token rows on CUDA: peft's logits, and the embedding and tied head run without a
    device-to-host sync (no data-dependent shapes)."""
    base = make_model("gpt2").cuda().to(dtype)
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, trainable_token_indices=[1, 5, 7])
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    randomise_B(ours)
    with torch.no_grad():
        ours.transformer.wte.trainable_tokens_delta["default"].normal_()
    copy_lora_weights(ours, ref)
    assert ours.transformer.wte.trainable_tokens_delta["default"].dtype == torch.float32
    batch = on_cuda(batch_for("gpt2"))
    with torch.no_grad():
        a, b = ours(**batch).logits, ref(**batch).logits
        check_logits(ours, batch, a, b, dtype)
    ids = batch["input_ids"]
    ours.transformer.wte(ids)  # (the token ids' index is made once per device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = ours.transformer.wte(ids)
        ours.lm_head(hidden).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ours.transformer.wte.trainable_tokens_delta["default"].grad.abs().max() > 0


@pytest.mark.parametrize("mode", ["nf4-bf16", "nf4-fp32", "int8"])
def test_qlora_outputs_and_gradients_match_peft_on_cuda(tmp_path, mode):
    """QLoRA on CUDA as tests/test_qlora.py checks it on CPU: the same saved model quantised twice (bit-
    identical weights), our LoRA and peft's with the same factors. bf16 compute with fp32 activations takes
    the plain path (peft's ops); fp32 compute the fused path (up to rounding); 8-bit on CUDA the plain path."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    make_model("llama").save_pretrained(tmp_path)
    compute = torch.bfloat16 if mode == "nf4-bf16" else torch.float32
    settings = (
        dict(load_in_8bit=True)
        if mode == "int8"
        else dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    )

    def load():
        config = BitsAndBytesConfig(**settings)
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cuda")

    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = get_lora_model(load(), LoRAConfig(**lora))
    randomise_B(ours)
    ref = get_peft_model(load(), LoraConfig(**lora))
    copy_lora_weights(ours, ref)
    batch = on_cuda(batch_for("llama"))
    a, b = ours(**batch).logits, ref(**batch).logits
    assert_close(a, b, what="logits")
    a.square().mean().backward()
    b.square().mean().backward()
    inner = ref.base_model.model
    for path, layer in ours.lora_layers():
        theirs = inner.get_submodule(path).lora_A["default"].weight.grad
        ours_grad = layer.lora_A["default"].grad
        bound = 64 * torch.finfo(torch.float32).eps * theirs.abs().max().item()  # relative to the gradient
        torch.testing.assert_close(ours_grad, theirs, rtol=0, atol=bound)
