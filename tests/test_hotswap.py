"""Hotswapping adapters of other ranks and alphas into a torch.compile'd model: no recompilation, and the
outputs of a fresh load of each adapter."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from reference import randomise_B
from tiny_models import MLP, batch_for, make_model
from tolerance import LAYER_ROUNDINGS, assert_close

import hf_lora
from hf_lora import AdapterFormatError, AdapterStateError, LoRAConfig, LoRAModel, get_lora_model

MLP_TARGETS = ["fc1", "fc2"]


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def saved_adapter(path, base, seed: int, **fields):
    model = get_lora_model(base, LoRAConfig(**fields))
    randomise_B(model, seed)
    model.save_pretrained(path)
    return path


def fresh(base, path):
    return LoRAModel.from_pretrained(base, path).eval()


@pytest.fixture
def mlp_adapters(tmp_path):
    """Adapters for the MLP with other ranks and alphas (and one with a rank_pattern, one on fc1 only)."""
    specs = [
        dict(r=2, lora_alpha=4),
        dict(r=8, lora_alpha=3),
        dict(r=4, lora_alpha=16, rank_pattern={"fc2": 6}, alpha_pattern={"fc2": 5}),
        dict(r=4, lora_alpha=8, use_rslora=True),
    ]
    return [
        saved_adapter(tmp_path / f"a{i}", mlp(), i, target_modules=MLP_TARGETS, **spec)
        for i, spec in enumerate(specs)
    ]


def test_hotswapping_into_a_compiled_model_never_recompiles(mlp_adapters):
    graphs = []

    def counting_backend(gm, example_inputs):  # called once per graph dynamo compiles (recompiles included)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fresh(mlp(), mlp_adapters[0])
    hf_lora.prepare_for_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # (the fused path against the plain one: one layer's roundings, through three layers)
        assert_close(compiled(x), fresh(mlp(), mlp_adapters[0])(x), roundings=3 * LAYER_ROUNDINGS)
        first = len(graphs)
        assert first >= 1
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises
            for path in [*mlp_adapters[1:], mlp_adapters[0]]:
                hf_lora.hotswap_adapter(model, path)
                ours, expected = compiled(x), fresh(mlp(), path)(x)
                assert_close(ours, expected, roundings=3 * LAYER_ROUNDINGS, what=str(path))
    assert len(graphs) == first, "hotswapping recompiled"


def test_without_preparing_a_new_scaling_recompiles():
    """The control: the counting backend does see the recompilation a new float scaling causes, so the test
    above could fail."""
    graphs = []
    torch._dynamo.reset()
    model = get_lora_model(mlp(), LoRAConfig(r=2, target_modules=MLP_TARGETS))
    compiled = torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    x = torch.randn(5, 16)
    with torch.no_grad():
        compiled(x)
        n = len(graphs)
        model.fc1.lora_scaling["default"] = 3.0
        compiled(x)
    assert len(graphs) > n


def test_hotswap_refuses_what_does_not_fit_and_leaves_the_model_alone(tmp_path, mlp_adapters):
    model = fresh(mlp(), mlp_adapters[0])
    with pytest.raises(AdapterStateError, match="prepare_for_hotswap"):
        hf_lora.hotswap_adapter(model, mlp_adapters[1])
    hf_lora.prepare_for_hotswap(model, target_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="above the prepared rank 4"):
        hf_lora.hotswap_adapter(model, mlp_adapters[1])  # rank 8
    wider = saved_adapter(tmp_path / "wider", mlp(), 9, r=2, target_modules=["fc1", "fc2", "head"])
    with pytest.raises(AdapterFormatError, match="adapts modules that 'default' does not"):
        hf_lora.hotswap_adapter(model, wider)
    with pytest.raises(ValueError, match="target_rank must be"):
        hf_lora.prepare_for_hotswap(model, target_rank=1)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert_close(model(x), fresh(mlp(), mlp_adapters[0])(x), roundings=3 * LAYER_ROUNDINGS)


def test_an_adapter_on_fewer_modules_zeroes_the_others(tmp_path, mlp_adapters):
    model = fresh(mlp(), mlp_adapters[1])
    hf_lora.prepare_for_hotswap(model)
    narrow = saved_adapter(tmp_path / "narrow", mlp(), 5, r=3, lora_alpha=6, target_modules=["fc1"])
    hf_lora.hotswap_adapter(model, narrow)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert_close(model(x), fresh(mlp(), narrow)(x), roundings=3 * LAYER_ROUNDINGS)
    assert not model.fc2.lora_B["default"].any()


def test_hotswapped_gpt2_equals_a_fresh_load_and_saves_what_it_runs(tmp_path):
    """Conv1D and embedding layers too; the padded model saves an adapter (rank 8, alphas keeping each
    layer's scaling) that loads elsewhere, peft-format, to the same outputs."""
    targets = ["wte", "c_attn", "c_proj"]
    a = saved_adapter(tmp_path / "a", make_model("gpt2"), 1, r=2, lora_alpha=4, target_modules=targets)
    b = saved_adapter(
        tmp_path / "b",
        make_model("gpt2"),
        2,
        r=8,
        lora_alpha=3,
        target_modules=targets,
        alpha_pattern={"c_proj": 7},
    )
    model = fresh(make_model("gpt2"), a)
    hf_lora.prepare_for_hotswap(model, target_rank=8)
    hf_lora.hotswap_adapter(model, b)
    batch = batch_for("gpt2")
    with torch.no_grad():
        expected = fresh(make_model("gpt2"), b)(**batch).logits
        assert_close(model(**batch).logits, expected, what="hotswapped against a fresh load")
        model.save_pretrained(tmp_path / "again")
        reloaded = fresh(make_model("gpt2"), tmp_path / "again")
        assert_close(reloaded(**batch).logits, expected, what="saved after hotswapping, reloaded")
