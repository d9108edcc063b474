"""Chunked cross-entropy: the causal-LM loss and its gradients without holding the full logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from reference import randomise_B
from tiny_models import MLP, batch_for, make_model
from tolerance import adamw_atol, assert_close, assert_close_states
from transformers import Trainer, TrainingArguments

import hf_lora
from hf_lora import AdapterStateError, LoRAConfig, get_lora_model
from hf_lora.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_equals_cross_entropy_and_its_gradients(chunk, with_bias, num_items):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 30, (50,), generator=g)
    labels[::4] = -100
    ours = chunked_cross_entropy(h, w, labels, bias=b, chunk_size=chunk, num_items_in_batch=num_items)
    logits = h @ w.T + (b if b is not None else 0)
    if num_items is None:
        ref = F.cross_entropy(logits, labels, ignore_index=-100)
    else:
        ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items
    inputs = [t for t in (h, w, b) if t is not None]
    ours_grads = torch.autograd.grad(ours, inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    # float64 (the inputs'): one evaluation in another order, 64 eps of float64 (1.4e-14) of the magnitude
    assert_close(ours, ref, what="loss")
    for a, r in zip(ours_grads, ref_grads):
        assert_close(a, r, what="gradient")


def saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward pass of one step (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize(("kind", "head"), [("gpt2", False), ("llama", False), ("llama", True)])
def test_model_loss_and_grads_unchanged_but_logits_never_kept(kind, head):
    model = get_lora_model(make_model(kind), LoRAConfig(r=4, target_modules="all-linear",
                                                        modules_to_save=["lm_head"] if head else None))  # fmt: skip
    randomise_B(model)
    model.train()
    chunked = copy.deepcopy(model)
    chunked.enable_chunked_loss(chunk_size=5)
    batch = batch_for(kind, batch=3, seq=40)  # more tokens than hidden units: logits are the biggest tensors
    batch["labels"][0, :5] = -100
    losses, grads = [], []
    for m in (model, chunked):
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    # one evaluation in float32, the log-softmax in chunks instead of at once: equal up to rounding
    assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), what="loss")
    assert_close_states(grads[1], grads[0], what="gradient")
    tokens = batch["input_ids"].numel()
    # the log-softmax (tokens x vocab) is no longer kept; the final hidden states (tokens x hidden) are
    saved = saved_bytes(model, batch) - saved_bytes(chunked, batch)
    assert saved >= 0.95 * (tokens * 128 * 4 - tokens * 64 * 4)
    out = chunked(**batch)
    assert out.logits.shape == (3, 1, 128), "only the last position's logits"


def test_shift_labels_are_used_as_given():
    """transformers' shift_labels= (labels already aligned with positions, as sequence parallelism passes
    them) must give the model's own loss, not be dropped in favour of shifting labels."""
    model = get_lora_model(make_model("llama"), LoRAConfig(r=4, target_modules=["q_proj"]))
    chunked = copy.deepcopy(model)
    chunked.enable_chunked_loss(chunk_size=5)
    batch = batch_for("llama", batch=2, seq=12)
    shift = torch.roll(batch["labels"], -2, dims=1)  # deliberately not labels[:, 1:]
    shift[:, -2:] = -100
    with torch.no_grad():
        want = model(**batch, shift_labels=shift).loss
        got = chunked(**batch, shift_labels=shift).loss
        plain = chunked(**batch).loss
    assert_close(got, want, what="loss with shift_labels")
    # labels shifted by 2 instead of 1 are other targets: the loss moves by O(1), far above rounding
    assert abs(got.item() - plain.item()) > 1e-3


def test_trainer_with_chunked_loss_trains_the_same_adapter(tmp_path):
    ids = torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    adapters = []
    for chunked in (False, True):
        model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4))
        randomise_B(model)
        if chunked:
            model.enable_chunked_loss(chunk_size=16)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, gradient_accumulation_steps=2, logging_steps=1, disable_tqdm=True,
                                 learning_rate=5e-5)  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data).train()
        adapters.append(hf_lora.adapter_state_dict(model))
    # 3 AdamW steps (lr 5e-5) on the same gradients, up to the rounding of a loss in
    # chunks: bounded as tolerance.adamw_atol derives
    gap = max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0])
    assert gap <= adamw_atol(3, 5e-5, *adapters[0].values())


def test_refused_where_it_cannot_apply():
    with pytest.raises(AdapterStateError, match="no output embeddings"):
        get_lora_model(MLP(), LoRAConfig(target_modules=["fc1"])).enable_chunked_loss()
    lm = get_lora_model(make_model("llama"), LoRAConfig(target_modules=["lm_head", "q_proj"]))
    with pytest.raises(AdapterStateError, match="carries a LoRA adapter"):
        lm.enable_chunked_loss()
    with pytest.raises(ValueError, match="positive"):
        get_lora_model(make_model("gpt2"), LoRAConfig()).enable_chunked_loss(chunk_size=0)
    from transformers import GraniteConfig, GraniteForCausalLM

    def granite(scaling):
        cfg = GraniteConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, logits_scaling=scaling)  # fmt: skip
        return get_lora_model(GraniteForCausalLM(cfg), LoRAConfig(r=4, target_modules=["q_proj"]))

    with pytest.raises(AdapterStateError, match=r"scales its logits \(logits_scaling=8.0\)"):
        granite(8.0).enable_chunked_loss()  # (the chunked loss would be of unscaled logits)
    granite(1.0).enable_chunked_loss()
