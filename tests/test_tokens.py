"""Trainable token rows (peft's `trainable_token_indices`), against peft's TrainableTokens wrapper."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from hf_lora import LoRAConfig, LoRAModel, get_lora_model
from hf_lora.errors import AdapterStateError, TargetModulesError
from hf_lora.tokens import TokenRowsLayer
from tests.reference import copy_lora_weights, randomise_B
from tests.tiny_models import VOCAB, tiny_gpt2, tiny_llama
from tests.tolerance import LAYER_ROUNDINGS, assert_as_accurate, assert_close


def tied_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


class Lookup(nn.Module):
    """An embedding (plain, Gemma3's scaled one, or one that renormalises rows) and a projection."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "gemma3-scaled":
            self.emb = Gemma3TextScaledWordEmbedding(50, 16, padding_idx=0, embed_scale=4.0)
        else:
            self.emb = nn.Embedding(50, 16, padding_idx=0, max_norm=1.0 if kind == "max-norm" else None)
        self.proj = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


# name: (base model, trainable_token_indices, LoRA target, the tensors whose token rows peft holds)
CASES = {
    "gpt2-tied-list": (tiny_gpt2, [1, 5, 7], ["c_attn"]),
    "llama-tied-list": (tied_llama, [0, 5, 7], ["q_proj"]),  # 0 is the padding token
    "llama-untied-dict": (tiny_llama, {"embed_tokens": [0, 5, 7], "lm_head": [3, 9]}, ["q_proj"]),
    "plain-embedding": (lambda: Lookup("plain"), {"emb": [0, 2, 3]}, ["proj"]),
    "gemma3-scaled": (lambda: Lookup("gemma3-scaled"), {"emb": [0, 2, 3]}, ["proj"]),
    "max-norm": (lambda: Lookup("max-norm"), {"emb": [0, 2, 3]}, ["proj"]),
    # peft's rows apart from a tied embedding: on the head alone, or other ids on each
    "gpt2-tied-head-only": (tiny_gpt2, {"lm_head": [3, 9]}, ["c_attn"]),
    "gpt2-tied-other-ids": (tiny_gpt2, {"wte": [1, 5], "lm_head": [3, 9]}, ["c_attn"]),
}
UNTIED_ON_MERGE = ("gpt2-tied-head-only", "gpt2-tied-other-ids")
IDS = torch.tensor([[1, 5, 0, 7, 3, 2, 9], [7, 7, 2, 0, 4, 3, 1]])


def _pair(case: str, **extra):
    """(ours, peft's twin, base copy) with the same random token rows and LoRA factors."""
    make, tokens, targets = CASES[case]
    torch.manual_seed(0)
    base = make()
    fields = dict(r=4, lora_alpha=8, target_modules=targets, trainable_token_indices=tokens, **extra)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(copy.deepcopy(base), LoRAConfig(**fields))
    randomise_B(ours)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in ours.token_layers():
            for rows in layer.trainable_tokens_delta.values():
                rows.copy_(torch.randn(rows.shape, generator=g))
    copy_lora_weights(ours, ref)
    return ours, ref, base


def _out(model, ids=IDS):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _rows(model, adapter="default"):
    """Token rows by module path, for ours or peft's."""
    if isinstance(model, PeftModel):
        return {
            n.removeprefix("base_model.model.").removesuffix(
                f".token_adapter.trainable_tokens_delta.{adapter}"
            ): p
            for n, p in model.named_parameters()
            if n.endswith(f"trainable_tokens_delta.{adapter}")
        }
    return {path: layer.trainable_tokens_delta[adapter] for path, layer in model.token_layers()}


@pytest.mark.parametrize("case", CASES)
def test_outputs_gradients_and_merge_match_peft(case):
    """Outputs, gradients of the rows and of LoRA's factors, and merged weights, with random rows. The
    embedding's rows are exact; a head's replaced logit columns come from their own small GEMM (peft's
    from the whole weight's), so they agree to rounding."""
    ours, ref, base = _pair(case)

    out, out_ref = _out(ours), _out(ref)
    # random rows (N(0, 1)) change the output by O(1): 0.1 is far above any rounding
    assert (out - _out(base)).abs().max() > 0.1, "the rows change the output"
    assert_close(out, out_ref)

    grad = torch.linspace(-1, 1, out.numel()).view_as(out)
    out.backward(grad), out_ref.backward(grad)
    mine, theirs = _rows(ours), _rows(ref)
    assert mine.keys() == theirs.keys() and mine
    for path in mine:
        assert mine[path].grad.abs().max() > 0
        assert_close(mine[path].grad, theirs[path].grad)
    for path, layer in ours.lora_layers():
        twin = ref.base_model.model.get_submodule(path)
        assert_close(layer.lora_B["default"].grad, twin.lora_B["default"].weight.grad, what="B's gradient")
    if case.startswith(("llama-untied", "plain", "gemma3")):  # the padding row: no gradient, as F.embedding
        emb = next(layer for _, layer in ours.token_layers() if isinstance(layer, nn.Embedding))
        assert emb.padding_idx == 0 and emb.token_indices["default"][0] == 0
        assert torch.equal(emb.trainable_tokens_delta["default"].grad[0], torch.zeros(emb.embedding_dim))

    merged, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
    assert not any(isinstance(m, TokenRowsLayer) for m in merged.modules())
    if case in UNTIED_ON_MERGE:
        # peft merges the head's rows into the weight it shares with the embedding, which changes the input
        # embedding too (its merged model differs from its own unmerged one); hf_lora unties the head first.
        assert merged.lm_head.weight is not merged.transformer.wte.weight
        assert not merged.config.tie_word_embeddings
        assert_close(_out(merged), out_ref)
        assert (_out(merged_ref) - out_ref).abs().max() > 0.1, "(peft's merge changed its model)"
        return
    for (name, p), (name_ref, p_ref) in zip(merged.state_dict().items(), merged_ref.state_dict().items()):
        assert name == name_ref
        # token rows: exact; LoRA: W + s B A, r products summed in another order and added (one layer's)
        assert_close(p, p_ref, roundings=LAYER_ROUNDINGS, what=name)
    assert_close(_out(merged), out_ref)


@pytest.mark.parametrize(
    "case", ["gpt2-tied-list", "llama-untied-dict", "gpt2-tied-head-only", "gpt2-tied-other-ids"]
)
def test_files_match_peft_both_ways(case, tmp_path):
    ours, ref, base = _pair(case)
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(mine) == sorted(theirs)
    assert any(k.endswith(".token_adapter.trainable_tokens_delta") for k in mine)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k

    loaded = LoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert_close(_out(loaded), _out(ref))
    assert not any(p.requires_grad for p in loaded.parameters()), "frozen unless is_trainable=True"
    trainable = LoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    assert all(rows.requires_grad for rows in _rows(trainable).values())
    ref_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(_out(ref_loaded), _out(ours))


@pytest.mark.parametrize("case", ["llama-tied-list", "llama-untied-dict"])
def test_save_embedding_layers_load_both_ways(case, tmp_path):
    """With save_embedding_layers=True peft writes the base weights as `<path>.token_adapter.base_layer.weight`
    (and the rows once more under a tied head's name): both libraries load each other's files."""
    ours, ref, base = _pair(case)
    ref.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in mine
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(mine) <= set(theirs) and set(theirs) - set(mine) <= {
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta"  # the tied head's copy of the rows
    }
    loaded = LoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert_close(_out(loaded), _out(ref))
    ref_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(_out(ref_loaded), _out(ours))
    loaded.load_adapter(tmp_path / "peft", adapter_name="default")  # in place (a Trainer resume) takes it too
    assert_close(_out(loaded), _out(ref))
    # "auto" leaves them out when the adapter has token rows, as peft (the rows are there to save space)
    ours.save_pretrained(tmp_path / "auto")
    assert not any("base_layer" in k for k in load_file(tmp_path / "auto" / "adapter_model.safetensors"))


def test_resized_vocabulary_round_trip(tmp_path):
    """The use case: new tokens, their rows trained, the base weights of the resized embedding saved."""
    torch.manual_seed(0)
    base = tiny_llama()
    base.resize_token_embeddings(VOCAB + 2)
    new = [VOCAB, VOCAB + 1]
    model = get_lora_model(
        copy.deepcopy(base), LoRAConfig(target_modules=["q_proj"], trainable_token_indices=new)
    )
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].normal_()
    ids = torch.tensor([[1, VOCAB, 3, VOCAB + 1]])
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    fresh = tiny_llama()  # other random weights: the file's base weights must replace them
    fresh.resize_token_embeddings(VOCAB + 2)
    loaded = LoRAModel.from_pretrained(fresh, tmp_path)
    # the other layers are fresh random ones; the embedding (base rows from the file, new rows trained) is the same
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(loaded.model.embed_tokens(ids), model.model.embed_tokens(ids))


def test_merge_unmerge_disable_and_unload_restore_the_base():
    ours, _, base = _pair("gpt2-tied-list")
    wte = ours.transformer.wte
    original = base.transformer.wte.weight.detach().clone()
    before = _out(ours)
    ours.merge_adapter()
    assert torch.equal(wte.weight[[1, 5, 7]], wte.trainable_tokens_delta["default"].detach())
    assert ours.lm_head.weight is wte.weight, "a merge keeps the head tied: it shows the same rows"
    assert_close(_out(ours), before)
    with ours.disable_adapter():
        assert torch.equal(wte.weight, original)
        assert_close(_out(ours), _out(base))  # (LoRA's merge and unmerge round)
    assert torch.equal(wte.weight[[1, 5, 7]], wte.trainable_tokens_delta["default"].detach())
    ours.unmerge_adapter()
    assert torch.equal(wte.weight, original)
    plain = ours.unload()
    assert type(plain.transformer.wte) is nn.Embedding and type(plain.lm_head) is nn.Linear
    assert (
        torch.equal(plain.transformer.wte.weight, original)
        and plain.lm_head.weight is plain.transformer.wte.weight
    )


def test_several_adapters_switch_mix_and_delete():
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = get_lora_model(copy.deepcopy(base), LoRAConfig(target_modules=["c_attn"]))  # LoRA only
    for name, tokens in (("a", [1, 2]), ("b", [3, 4]), ("c", [2, 9])):
        model.add_adapter(name, LoRAConfig(target_modules=["c_attn"], trainable_token_indices=tokens))
        with torch.no_grad():
            model.transformer.wte.trainable_tokens_delta[name].normal_()
    wte, rows = model.transformer.wte, model.transformer.wte.trainable_tokens_delta
    ids = torch.tensor([[1, 3, 2, 9, 4]])

    model.set_adapter(["a", "b"])  # disjoint rows: both apply
    emb = wte(ids)[0]
    assert torch.equal(emb[0], rows["a"][0]) and torch.equal(emb[1], rows["b"][0])
    assert torch.equal(emb[3], base.transformer.wte.weight[9])
    assert rows["a"].requires_grad and rows["b"].requires_grad and not rows["c"].requires_grad
    with pytest.raises(AdapterStateError, match="both train token 2"):
        model.set_adapter(["a", "c"])
    assert model.active_adapters == ["a", "b"], "a refused set_adapter changes nothing"

    batch = torch.tensor([[1, 2, 9], [1, 2, 9], [1, 2, 9]])
    mixed = model(batch, adapter_names=["a", "c", "__base__"]).logits
    for row, name in enumerate(["a", "c", "default"]):
        model.set_adapter(name)
        assert_close(mixed[row], model(batch[row : row + 1]).logits[0])

    for name in ("a", "b", "c"):
        model.delete_adapter(name)
    assert type(model.transformer.wte) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)


def test_training_moves_only_the_rows():
    """Only the chosen rows learn; every other row of the (tied) embedding stays the base model's."""
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = get_lora_model(
        copy.deepcopy(base), LoRAConfig(target_modules=["c_attn"], trainable_token_indices=[1, 5])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 5, 3, 8, 1, 5, 2]])
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward(), opt.step(), opt.zero_grad()
    rows = model.transformer.wte.trainable_tokens_delta["default"]
    assert not torch.equal(rows.detach(), base.transformer.wte.weight[[1, 5]])
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)
    out = model.transformer.wte(torch.tensor([3, 1]))
    assert torch.equal(out[0], base.transformer.wte.weight[3]) and torch.equal(out[1], rows[0].detach())


def test_copies_keep_the_tie():
    ours, _, _ = _pair("gpt2-tied-list")
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert twin.lm_head.source is twin.transformer.wte
        torch.testing.assert_close(_out(twin), _out(ours), rtol=0, atol=0)


@pytest.mark.parametrize(
    "tokens, match",
    [
        ([1, 1, 2], "names tokens \\[1\\] more than once"),
        ([], "non-empty list"),
        ([-1], "non-empty list of ids >= 0"),
        ({"wte": "1"}, "non-empty list"),
    ],
)
def test_config_problems(tokens, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(trainable_token_indices=tokens)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(trainable_token_indices=[VOCAB]), f"has {VOCAB} rows"),
        (dict(trainable_token_indices={"nope": [1]}), "'nope' matches no module"),
        (dict(trainable_token_indices={"wte": [1]}, target_modules=["wte"]), "in target_modules too"),
        (dict(trainable_token_indices=[1], target_modules=["c_attn", "lm_head"]), "shares its weight"),
        (dict(trainable_token_indices={"wte": [1]}, modules_to_save=["wte"]), "trained in full"),
        (dict(trainable_token_indices={"h": [1]}), "transformer.h is ModuleList"),
    ],
)
def test_refused_before_the_model_is_touched(fields, match):
    model = tiny_gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fields.setdefault("target_modules", ["c_attn"])
    with pytest.raises(TargetModulesError, match=match):
        get_lora_model(model, LoRAConfig(**fields))
    assert type(model.transformer.wte) is nn.Embedding
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_combinations_that_cannot_hold_token_rows():
    ours, _, _ = _pair("gpt2-tied-list")
    ours.add_adapter("other", LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="train token rows"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")
    with pytest.raises(AdapterStateError, match="token rows"):
        ours.enable_chunked_loss()
    with pytest.raises(TargetModulesError, match="trainable token rows of another adapter"):
        ours.add_adapter("lora-on-wte", LoRAConfig(target_modules=["wte"]))
    with pytest.raises(TargetModulesError, match="holds or shows another adapter's trainable token rows"):
        ours.add_adapter("copy-head", LoRAConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    with pytest.raises(TargetModulesError, match="shows the token rows of another module"):
        ours.add_adapter(
            "head-rows", LoRAConfig(target_modules=["c_attn"], trainable_token_indices={"lm_head": [4]})
        )


def test_chunked_loss_refuses_a_head_adapter_added_after_it():
    model = get_lora_model(tiny_gpt2(), LoRAConfig(target_modules=["c_attn"]))
    model.enable_chunked_loss(chunk_size=4)
    model.add_adapter("rows", LoRAConfig(target_modules=["c_attn"], trainable_token_indices=[1, 5]))
    model.set_adapter("rows")
    with pytest.raises(AdapterStateError, match="disable_chunked_loss"):
        model(IDS, labels=IDS)
    model.disable_chunked_loss()
    assert torch.isfinite(model(IDS, labels=IDS).loss)


def test_trainer_trains_checkpoints_and_resumes_the_rows(tmp_path):
    """A LoRATrainer run: the rows learn, checkpoints hold them (and no base weights), and resuming from a
    checkpoint (load_adapter in place) gives the uninterrupted run's rows."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_lora import LoRATrainer

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = get_lora_model(
            tiny_gpt2(), LoRAConfig(target_modules=["c_attn"], trainable_token_indices=[1, 5])
        )
        ids = torch.randint(1, VOCAB, (16, 10), generator=torch.Generator().manual_seed(0))
        ids[:, ::3] = 5  # the trained tokens occur
        data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
        targs = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, seed=0, save_strategy="steps", save_steps=2, disable_tqdm=True,
            lr_scheduler_type="constant",  # (the cut run stops at step 2: the schedules must agree)
        )  # fmt: skip
        LoRATrainer(model=model, args=targs, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 4)
    start = full.transformer.wte.weight[[1, 5]]
    rows = full.transformer.wte.trainable_tokens_delta["default"].detach()
    assert (rows - start).abs().max() > 1e-3  # 4 AdamW steps of lr 1e-2 move the rows by O(1e-2)
    saved = load_file(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"], rows)
    assert not any("base_layer" in k or k.endswith("wte.weight") for k in saved)

    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    # the resumed run restores weights, optimizer and RNG and runs the same steps on the same code path
    assert torch.equal(resumed.transformer.wte.trainable_tokens_delta["default"].detach(), rows)


def test_load_adapter_beside_others_and_in_place(tmp_path):
    ours, _, base = _pair("llama-untied-dict")
    ours.save_pretrained(tmp_path / "a")
    model = get_lora_model(copy.deepcopy(base), LoRAConfig(target_modules=["q_proj"]))
    model.load_adapter(tmp_path / "a", adapter_name="tokens")
    model.set_adapter("tokens")
    torch.testing.assert_close(_out(model), _out(ours), rtol=0, atol=0)

    # in place (what Trainer does on resume), with the rows merged: unmerged around the copy
    model.merge_adapter()
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["tokens"].zero_()
    model.load_adapter(tmp_path / "a", adapter_name="tokens")
    model.unmerge_adapter()
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert_close(_out(model), _out(ours))  # (LoRA's merge and unmerge round)

    # other token ids under the same name: refused, nothing changed
    other = get_lora_model(
        copy.deepcopy(base),
        LoRAConfig(
            target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2, 3], "lm_head": [3, 9]}
        ),
    )
    other.save_pretrained(tmp_path / "b")
    with pytest.raises(Exception, match="trainable_token_indices"):
        model.load_adapter(tmp_path / "b", adapter_name="tokens")
    assert_close(_out(model), _out(ours))  # (merged and unmerged: rounding)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    """Every adapter of a folder: the first loads the embedding's base weight from its file (with the rows),
    the second does not fit; the base weight the first replaced is restored."""
    from safetensors.torch import save_file

    ours, _, base = _pair("llama-tied-list")
    ours.save_pretrained(tmp_path, save_embedding_layers=True)
    ours.save_pretrained(tmp_path / "second", save_embedding_layers=False)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    keys = [
        f"base_model.model.{m}.token_adapter.base_layer.weight" for m in ("model.embed_tokens", "lm_head")
    ]
    save_file(
        tensors | {k: tensors[k] + 1 for k in keys}, path
    )  # a (tied) base weight the first adapter loads
    second = load_file(tmp_path / "second" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file(second | {q: torch.zeros(3, 3)}, tmp_path / "second" / "adapter_model.safetensors")

    model = copy.deepcopy(base)
    loaded = LoRAModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.model.embed_tokens.weight, base.model.embed_tokens.weight + 1), "it does load"
    with pytest.raises(Exception, match="shape"):
        LoRAModel.from_pretrained(model, tmp_path, all_adapters=True)
    assert type(model.model.embed_tokens) is nn.Embedding and not isinstance(model, LoRAModel)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_model_card_names_the_token_rows(tmp_path):
    ours, _, _ = _pair("llama-untied-dict")
    ours.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| trainable token rows | embed_tokens: 3 tokens (0, 5, 7); lm_head: 2 tokens (3, 9) |" in card


@pytest.mark.parametrize("case", ["gpt2-tied-list", "llama-untied-dict", "gemma3-scaled"])
def test_a_new_adapter_leaves_the_model_unchanged(case):
    """The rows start as the weight's own: the embedding's outputs are the base model's, bit for bit, and
    so are the logits up to the rounding of a head's columns, which come from their own small matmul."""
    make, tokens, targets = CASES[case]
    torch.manual_seed(0)
    base = make()
    model = get_lora_model(
        copy.deepcopy(base), LoRAConfig(target_modules=targets, trainable_token_indices=tokens)
    )
    for path, layer in model.token_layers():
        if isinstance(layer, nn.Embedding):
            assert torch.equal(layer(IDS), base.get_submodule(path)(IDS))
    # the head's replaced columns: one small matmul of the same numbers in another order (one layer's)
    assert_close(_out(model), _out(base), roundings=LAYER_ROUNDINGS)


def test_compiles_without_graph_breaks():
    """No data-dependent shapes (no boolean indexing): one graph, and no device sync on CUDA."""
    ours, _, _ = _pair("gpt2-tied-list")
    ours.eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(ours)(IDS)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        # the eager backend runs the captured graph's ops as they are: the same computation
        assert torch.equal(torch.compile(ours, backend="eager")(IDS).logits, ours(IDS).logits)


def test_half_precision_base_trains_fp32_rows_as_peft():
    """On a bf16 base the rows are fp32, as peft's (its default autocast_adapter_dtype) and as LoRA's
    factors: an update far below a bf16 ulp still moves them."""
    ours, ref, base = _pair("llama-untied-dict")
    exact = _out(ref).detach()  # float32
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    for _, layer in ours.token_layers():
        for rows in layer.trainable_tokens_delta.values():
            rows.data = rows.data.float()  # (what a fresh adapter on a bf16 model gets, below)
    fresh = get_lora_model(
        copy.deepcopy(base).to(torch.bfloat16),
        LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]),
    )
    assert fresh.model.embed_tokens.trainable_tokens_delta["default"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in _rows(get_peft_model(
        copy.deepcopy(base).to(torch.bfloat16), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )).values())  # fmt: skip
    out, out_ref = _out(ours), _out(ref)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert_as_accurate(out, out_ref, exact, floor_dtype=torch.bfloat16, what="bf16 logits")
    before = fresh.model.embed_tokens.trainable_tokens_delta["default"].detach().clone()
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=1e-6)
    fresh(IDS, labels=IDS).loss.backward()
    opt.step()
    assert (fresh.model.embed_tokens.trainable_tokens_delta["default"] != before).any()


def test_rows_start_as_the_base_rows_whatever_init_lora_weights_says():
    """peft's LoRA copies the base rows also with init_lora_weights=False (which randomises B)."""
    model = get_lora_model(
        tiny_gpt2(),
        LoRAConfig(target_modules=["c_attn"], trainable_token_indices=[1, 5], init_lora_weights=False),
    )
    assert torch.equal(
        model.transformer.wte.trainable_tokens_delta["default"], model.transformer.wte.weight[[1, 5]]
    )


def test_resizing_the_vocabulary_after_a_forward():
    """resize_token_embeddings keeps the module and swaps its weight: the token ids' lookup follows."""
    model = get_lora_model(tiny_gpt2(), LoRAConfig(target_modules=["c_attn"], trainable_token_indices=[1, 5]))
    model(IDS)
    model.resize_token_embeddings(VOCAB + 4)
    ids = torch.tensor([[1, VOCAB + 3, 5]])
    out = model.transformer.wte(ids)[0]
    rows = model.transformer.wte.trainable_tokens_delta["default"]
    assert torch.equal(out[0], rows[0]) and torch.equal(out[2], rows[1])
    assert model(ids).logits.shape[-1] == VOCAB + 4


def test_pissa_conversion_keeps_the_embedding_base_weights():
    """Converting a PiSSA adapter drops the residual base weights of its Linear layers, and keeps the
    embeddings' (untouched by PiSSA; written for a resized vocabulary)."""
    from hf_lora.serialization import as_plain_lora

    p = "base_model.model."
    tensors = {
        f"{p}q.lora_A.weight": torch.ones(2, 4), f"{p}q.lora_B.weight": torch.ones(4, 2),
        f"{p}q.base_layer.weight": torch.ones(4, 4), f"{p}e.token_adapter.base_layer.weight": torch.ones(9, 4),
        f"{p}e.token_adapter.trainable_tokens_delta": torch.ones(1, 4), f"{p}h.weight": torch.ones(9, 4),
    }  # fmt: skip
    initial = {k: v for k, v in tensors.items() if "lora_" in k}
    config = {"r": 2, "lora_alpha": 2, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    out, _ = as_plain_lora(tensors, config, initial)
    assert set(out) == set(tensors) - {f"{p}q.base_layer.weight"}


@pytest.mark.parametrize("case", ["gpt2-tied-head-only", "gpt2-tied-other-ids"])
def test_rows_of_a_tied_head_merge_into_a_copy_of_the_weight(case, tmp_path):
    """A tied head with rows of its own: merging gives it a copy of the weight, so the input embedding stays
    as it was (peft's merge changes it). As for LoRA on a tied head, the copy stays after unmerging and
    the config says the weights are untied; outputs are right throughout, also around disable_adapter()
    and a reload in place while merged."""
    ours, ref, base = _pair(case)
    wte, head = ours.transformer.wte, ours.lm_head
    expected = _out(ref)
    emb_before = wte(IDS)
    ours.merge_adapter()
    assert head.weight is not wte.weight and not ours.config.tie_word_embeddings
    assert torch.equal(wte(IDS), emb_before), "the input embedding is unchanged"
    assert_close(_out(ours), expected)
    with ours.disable_adapter():
        assert_close(_out(ours), _out(base))  # (LoRA's merge and unmerge round)
    ours.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, adapter_name="default")  # in place, merged
    assert_close(_out(ours), expected)
    ours.unmerge_adapter()
    assert head.weight is not wte.weight and torch.equal(head.weight, base.lm_head.weight)
    assert torch.equal(wte.weight, base.transformer.wte.weight)
    assert_close(_out(ours), expected)
    plain = ours.unload()
    assert not plain.config.tie_word_embeddings and torch.equal(plain.lm_head.weight, base.lm_head.weight)
    reloaded = type(base).from_pretrained(_saved(plain, tmp_path / "plain"))
    assert_close(_out(reloaded), _out(base))  # (the LoRA layers' weights: merged and unmerged)


def _saved(model, path):
    model.save_pretrained(path)
    return path


def test_a_failed_merge_leaves_outputs_right():
    """safe_merge=True refusing a LoRA layer part way: nothing stays merged, and the outputs are the
    adapter's (a tied head with rows of its own keeps the copy it was given, still correct)."""
    ours, ref, _ = _pair("gpt2-tied-head-only")
    with torch.no_grad():
        ours.transformer.h[0].attn.c_attn.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert not any(layer.merged_adapters for layer in ours.adapter_layers())
    with torch.no_grad():
        ours.transformer.h[0].attn.c_attn.lora_B["default"][0, 0] = 0.0
        ref.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight[0, 0] = 0.0
    assert_close(_out(ours), _out(ref))


def test_bf16_gemma_rows_round_before_scaling_as_peft():
    """A bf16 base rounds the looked-up row to bf16 and then scales it (Gemma3): so do the rows, which keeps
    the unmerged output equal to peft's and to the merged model's."""
    ours, ref, _ = _pair("gemma3-scaled")
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    with torch.no_grad():
        for layer in (
            ours.emb.trainable_tokens_delta,
            ref.base_model.model.emb.token_adapter.trainable_tokens_delta,
        ):
            layer["default"].data = layer["default"].data.float() * 1.37  # fp32 rows that bf16 must round
        ref.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].data.copy_(
            ours.emb.trainable_tokens_delta["default"]
        )
        for emb in (ours.emb, ref.base_model.model.emb.token_adapter.base_layer):
            emb.embed_scale.fill_(3.3)  # (4.0 would scale exactly, before or after rounding)
        out = ours.emb(IDS)
        assert torch.equal(out, ref.base_model.model.emb(IDS))
        ours.merge_adapter()
        assert torch.equal(out, ours.emb(IDS))


def test_rows_that_tied_embeddings_do_not_show_are_warned_about(caplog):
    """T5 looks tokens up through encoder/decoder.embed_tokens, which share `shared`'s weight: rows of its own
    on `shared` (other ids than the tied head's) would have no effect there."""
    from tests.tiny_models import tiny_t5

    with caplog.at_level("WARNING", logger="hf_lora.targets"):
        get_lora_model(
            tiny_t5(),
            LoRAConfig(target_modules=["q"], trainable_token_indices={"shared": [1], "lm_head": [2]}),
        )
    assert "token rows on shared are not shown by encoder.embed_tokens, decoder.embed_tokens" in caplog.text
    caplog.clear()  # rows on the modules the stacks look up through: nothing to warn about
    with caplog.at_level("WARNING", logger="hf_lora.targets"):
        get_lora_model(
            tiny_t5(),
            LoRAConfig(target_modules=["q"], trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}),
        )
    assert "not shown by" not in caplog.text
