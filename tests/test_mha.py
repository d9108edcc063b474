"""LoRA on nn.MultiheadAttention against peft's `lora.MultiheadAttention`: an adapter on the packed
in_proj_weight and one on out_proj, acting through the weights; outputs, gradients, merging, several
adapters, files both ways, and what both refuse.

peft 0.21.2 adds out_proj's update twice, in its forward and its merge (W + 2 s B A: `merge()` writes W + dW
into out_proj and then calls `out_proj.merge()`, which adds dW again; huggingface/peft#3774, open). We add it
once, as LoRA defines it. So peft's twin gets half our out_proj B, and computes exactly what we compute."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B
from safetensors.torch import load_file
from tolerance import MERGE_ROUNDINGS, assert_close, assert_close_states
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_lora import LoRAConfig, LoRAModel, get_lora_model
from hf_lora.errors import AdapterStateError, TargetModulesError


class TinyAttention(nn.Module):
    """Token embeddings, one torch-native attention block (batch_first, with biases), a classifier head."""

    def __init__(self, kdim: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> SequenceClassifierOutput:
        h = self.embed(input_ids)
        out, _ = self.attn(h, h, h, need_weights=False)
        return SequenceClassifierOutput(logits=self.head((h + out).mean(1)))


def make(seed: int = 0, **kwargs) -> TinyAttention:
    torch.manual_seed(seed)
    return TinyAttention(**kwargs).eval()


def tokens(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 32, (3, 7), generator=g),
        "labels": torch.randint(0, 3, (3,), generator=g),
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()["input_ids"]).logits


def pair(**fields):
    base = make()
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["attn"], **fields)
    )
    ours = get_lora_model(base, LoRAConfig(r=4, lora_alpha=8, target_modules=["attn"], **fields))
    randomise_B(ours)
    copy_lora_weights(ours, ref)  # (out_proj's into peft's attn.base_layer.out_proj)
    with torch.no_grad():
        peft_out_proj(ref).lora_B["default"].weight.mul_(0.5)  # peft adds out_proj's update twice
    return ours, ref


def peft_out_proj(ref):
    return ref.base_model.model.attn.base_layer.out_proj


def test_mha_adapters_forward_and_gradients_equal_peft():
    ours, ref = pair()
    assert sorted(p for p, _ in ours.lora_layers()) == ["attn", "attn.out_proj"]
    assert ours.get_submodule("attn").lora_B["default"].shape == (48, 4)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    expected = logits(ref)
    assert (expected - logits(make())).abs().max() > 1e-3, "the adapters change the outputs"
    assert_close(logits(ours), expected, what="logits")
    for model in (ours, ref):
        model.train()
        model(input_ids=tokens()["input_ids"]).logits.pow(2).sum().backward()
    peft_layers = {"attn": ref.base_model.model.attn, "attn.out_proj": peft_out_proj(ref)}
    for path, layer in ours.lora_layers():
        twin = peft_layers[path]
        # peft's second out_proj update goes in through `.data`, outside autograd: its gradients are those
        # of W + s B_p A with B_p half our B, i.e. A's is half ours and B's equals ours
        half = 0.5 if path == "attn.out_proj" else 1.0
        for name, mine, theirs in (("A", layer.lora_A, twin.lora_A), ("B", layer.lora_B, twin.lora_B)):
            grad = mine["default"].grad
            assert grad.abs().max() > 0
            expected = theirs["default"].weight.grad / (half if name == "A" else 1.0)
            assert_close(grad, expected, what=f"{path} grad {name}")
    base_params = dict(make().named_parameters())
    assert [n for n, _ in ours.named_parameters() if "lora" not in n] == list(base_params), "same order"


def test_mha_merge_unmerge_unload_equal_peft():
    ours, ref = pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = logits(ours)
    ours.merge_adapter()
    assert_close(logits(ours), expected, what="merged logits")
    ours.unmerge_adapter()
    assert_close_states(ours.state_dict(), before, roundings=MERGE_ROUNDINGS, what="unmerged")
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention
    assert_close_states(
        merged.state_dict(), ref_merged.state_dict(), roundings=MERGE_ROUNDINGS, what="merged"
    )


def test_mha_files_travel_both_ways(tmp_path):
    """The same keys, shapes and tensors as peft's (out_proj's B set back to ours: see the module docstring);
    each library reads the other's file into the same factors, and ours reloads to the same outputs."""
    ours, ref = pair()
    with torch.no_grad():
        peft_out_proj(ref).lora_B["default"].weight.mul_(2)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(peft_file)
    assert_close_states(ours_file, peft_file, what="file")
    loaded = LoRAModel.from_pretrained(make(), tmp_path / "peft")
    assert_close_states(loaded.state_dict(), ours.state_dict(), what="loaded from peft's file")
    assert_close(logits(loaded), logits(ours), what="reloaded logits")
    in_peft = PeftModel.from_pretrained(make(), tmp_path / "ours")
    lora = {k: v for k, v in ref.state_dict().items() if "lora" in k}
    assert_close_states(lora, in_peft.state_dict(), what="peft loads ours")


def test_mha_several_adapters_and_disable():
    ours, _ = pair()
    ours.add_adapter("other", LoRAConfig(r=2, target_modules=["attn"]))
    randomise_B(ours, seed=5)
    first = logits(ours)
    ours.set_adapter("other")
    assert (logits(ours) - first).abs().max() > 1e-3
    with ours.disable_adapter():
        assert torch.equal(logits(ours), logits(make()))
    with pytest.raises(AdapterStateError, match="mixed batches"):
        ours(input_ids=tokens()["input_ids"], adapter_names=["other", "default", "__base__"])
    ours.set_adapter("default")
    assert_close(logits(ours), first, what="default again")


def test_mha_refusals():
    with pytest.raises(TargetModulesError, match="DoRA does not apply"):
        get_lora_model(make(), LoRAConfig(r=4, target_modules=["attn"], use_dora=True))
    with pytest.raises(TargetModulesError, match="separate weights"):
        get_lora_model(make(kdim=8), LoRAConfig(r=4, target_modules=["attn"]))
    model = make()
    with pytest.raises(
        TargetModulesError, match=r"attn\.out_proj is the out_proj of attn.*Target attn instead"
    ):
        get_lora_model(model, LoRAConfig(r=4, target_modules=["out_proj"]))
    assert not any("lora" in n for n, _ in model.named_parameters()), "the model is as before"
    linear = get_lora_model(make(), LoRAConfig(r=4, target_modules="all-linear"))
    assert [p for p, _ in linear.lora_layers()] == ["head"], "all-linear leaves the attention's out_proj"


def test_a_failing_forward_leaves_the_attention_s_parameters_in_place():
    """The updated weights stand in for the Parameters during a call only: after a forward that raises (here
    a wrong embedding width), the module holds the very same Parameter objects, in the same order."""
    ours, _ = pair()
    attn = ours.get_submodule("attn")
    before = [(n, id(p)) for n, p in ours.named_parameters()]
    with pytest.raises(AssertionError):
        attn(torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.randn(2, 5, 12))
    assert [(n, id(p)) for n, p in ours.named_parameters()] == before
    assert isinstance(attn.in_proj_weight, nn.Parameter) and isinstance(attn.out_proj.weight, nn.Parameter)
