"""LoRAConfig: validation that reports every problem at once, and peft-compatible JSON both ways."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from peft import LoraConfig

from hf_lora import LoRAConfig

BAD_FIELDS = [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be a positive number"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a positive number"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
    (dict(lora_dropout=-0.1), "lora_dropout must be in [0, 1)"),
    (dict(bias="some"), "bias must be one of"),
    (dict(task_type="CLASSIFY"), "task_type must be None or one of"),
    (dict(target_modules="q_proj("), "target_modules 'q_proj(' is not a valid regular expression"),
    (dict(target_modules=[]), "target_modules is an empty list"),
    (dict(target_modules=["q", 3]), "target_modules must be a list of module names"),
    (dict(init_lora_weights="uniform"), "init_lora_weights must be"),
    (dict(init_lora_weights="orthogonal", r=3), "r and rank_pattern's ranks must be even"),
    (dict(init_lora_weights="orthogonal", rank_pattern={"q": 5}), "r and rank_pattern's ranks must be even"),
    (dict(rank_pattern={"q": 0}), "rank_pattern['q'] must be a positive integer"),
    (dict(alpha_pattern={"q": -1}), "alpha_pattern['q'] must be a positive number"),
    (dict(rank_pattern={"(": 2}), "rank_pattern key '(' is not a valid regular expression"),
    (dict(layers_to_transform=[-1]), "layers_to_transform must be a non-negative int"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "cannot be combined with a regex"),
    (dict(layers_pattern="h"), "layers_pattern only has an effect together with layers_to_transform"),
    (dict(modules_to_save="classifier"), "modules_to_save must be a list"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_each_bad_field_is_named(fields, message):
    with pytest.raises(ValueError, match="Invalid LoRAConfig") as err:
        LoRAConfig(**fields)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        LoRAConfig(r=-1, lora_alpha=0, lora_dropout=2, bias="x")
    lines = [line for line in str(err.value).splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 4


def test_an_empty_exclude_list_excludes_nothing():  # peft writes exclude_modules=[] in some configs
    assert LoRAConfig(exclude_modules=[]).exclude_modules == []


def test_peft_reads_our_json_and_we_read_peft_json(caplog):
    ours = LoRAConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q", "v"], bias="lora_only",
                      rank_pattern={"v": 2}, alpha_pattern={"q": 8}, layers_to_transform=[0, 1],
                      layers_pattern="layer", modules_to_save=["classifier"], task_type="SEQ_CLS", use_rslora=True)  # fmt: skip
    data = json.loads(ours.to_json_string())
    peft_keys = set(LoraConfig().to_dict()) - {"peft_version"}
    assert peft_keys <= set(data), f"missing peft keys: {peft_keys - set(data)}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft must not find anything odd in our file
        theirs = LoraConfig.from_peft_type(**data)
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.bias) == (4, 32, 0.1, "lora_only")
    assert set(theirs.target_modules) == {"q", "v"} and theirs.rank_pattern == {"v": 2}
    assert theirs.use_rslora and theirs.layers_to_transform == [0, 1]

    back = LoRAConfig.from_dict(json.loads(json.dumps(theirs.to_dict(), default=sorted)))
    assert back == ours
    assert "ignoring unknown keys" not in caplog.text


def test_unknown_keys_warn_and_unsupported_features_refuse(caplog):
    data = LoRAConfig(r=4).to_dict() | {"shiny_new_option": 1}
    with caplog.at_level(logging.WARNING):
        assert LoRAConfig.from_dict(data, source="x.json").r == 4
    assert "shiny_new_option" in caplog.text and "x.json" in caplog.text
    with pytest.raises(ValueError, match="lora_bias=True"):
        LoRAConfig.from_dict(LoRAConfig().to_dict() | {"lora_bias": True})
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        LoRAConfig.from_dict({"peft_type": "IA3", "r": 4})
    with pytest.raises(ValueError, match="expected a JSON object"):
        LoRAConfig.from_dict([1, 2])


def test_scaling_follows_patterns_and_rslora():
    cfg = LoRAConfig(
        r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2}
    )
    assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == 2.0
    assert cfg.scaling_for("model.layers.1.self_attn.v_proj") == 4.0
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 0.25
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("x") == 2.0


def test_an_eva_adapter_loads_as_the_plain_lora_it_is(tmp_path):
    # EVA picks the initial A from activations; saved, it is a plain LoRA whose ranks are in rank_pattern.
    import torch
    from peft import EvaConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
    from tiny_models import batch_for, make_model
    from tolerance import assert_close

    from hf_lora import LoRAModel

    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)
    )
    ref = get_peft_model(make_model("llama"), config, low_cpu_mem_usage=True)
    g = torch.Generator().manual_seed(0)
    initialize_lora_eva_weights(
        ref, dataloader=[{"input_ids": torch.randint(1, 128, (4, 16), generator=g)} for _ in range(4)]
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=g)
    ref.save_pretrained(tmp_path)
    batch = batch_for("llama")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(make_model("llama"), tmp_path)(**batch).logits
        ours = LoRAModel.from_pretrained(make_model("llama"), tmp_path)
        assert_close(ours(**batch).logits, expected)
    assert ours.peft_config["default"].init_lora_weights is True
