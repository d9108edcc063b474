"""Reliability and security: a bad-input matrix, crash safety under SIGKILL, untrusted files, secrets,
property tests, and a failing rank in a distributed run."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import randomise_B
from safetensors.torch import load_file
from tiny_models import MLP, batch_for, make_model
from transformers.pytorch_utils import Conv1D

import hf_lora
from hf_lora import (
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterStateError,
    HubAccessError,
    LoRAConfig,
    LoRAModel,
    TargetModulesError,
    get_lora_model,
)
from hf_lora.hub import check_repo_path
from hf_lora.layers import make_lora_layer
from hf_lora.trainer import last_complete_checkpoint

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# ---- 1. the bad-input matrix ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A good GPT-2 adapter on disk; cases copy and damage it."""
    out = tmp_path_factory.mktemp("good")
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_TARGETS))
    randomise_B(model)
    model.save_pretrained(out)
    return out


def damaged(saved: Path, tmp: Path, how) -> Path:
    import shutil

    target = tmp / "adapter"
    shutil.copytree(saved, target)
    how(target)
    return target


def _write(name: str, data: bytes | str):
    return lambda d: (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def _edit_config(**changes):
    def apply(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return apply


def _reshape_tensor(d: Path) -> None:
    from safetensors.torch import save_file

    t = load_file(d / "adapter_model.safetensors")
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = torch.zeros(7, 4)
    save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})


def lora_gpt2() -> LoRAModel:
    return get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_TARGETS))


def load_onto(model_factory, how=None, **kwargs):
    """A case that loads the (possibly damaged) adapter onto a fresh model from `model_factory`."""

    def case(saved: Path, tmp: Path, hub) -> tuple:
        model = model_factory()
        path = damaged(saved, tmp, how) if how else saved
        return model, lambda: LoRAModel.from_pretrained(model, path, **kwargs)

    return case


def call(fn):
    """A case that just calls `fn()` (no model to compare afterwards)."""
    return lambda saved, tmp, hub: (None, fn)


def on_lora_model(fn):
    """A case that calls `fn(model)` on a LoRA GPT-2."""

    def case(saved: Path, tmp: Path, hub):
        model = lora_gpt2()
        return model, lambda: fn(model)

    return case


def on_hub(fn):
    return lambda saved, tmp, hub: (None, lambda: fn(saved, hub))


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=96, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _wider_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=96, n_head=4, vocab_size=128, n_positions=64))


def _meta_gpt2():
    with torch.device("meta"):
        return make_model("gpt2")


def _malicious_pickle(d: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    torch.save({"x": Evil()}, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()


BAD_INPUTS = [
    # config values
    ("r=0", call(lambda: LoRAConfig(r=0)), ValueError, "r must be a positive integer"),
    ("r='8'", call(lambda: LoRAConfig(r="8")), ValueError, "r must be a positive integer"),
    ("alpha<0", call(lambda: LoRAConfig(lora_alpha=-2)), ValueError, "lora_alpha must be a positive number"),
    ("dropout=1", call(lambda: LoRAConfig(lora_dropout=1)), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("bias", call(lambda: LoRAConfig(bias="yes")), ValueError, "bias must be one of"),
    ("bad regex", call(lambda: LoRAConfig(target_modules="(q")), ValueError, "not a valid regular expression"),
    ("init", call(lambda: LoRAConfig(init_lora_weights="zeros")), ValueError, "init_lora_weights must be"),
    ("not a config", call(lambda: get_lora_model(MLP(), {"r": 4})), TypeError, "hf_lora.LoRAConfig"),
    # targets and layers
    ("targets match nothing", load_onto(lambda: None) if False else call(
        lambda: get_lora_model(make_model("gpt2"), LoRAConfig(target_modules=["q_proj"]))),
     TargetModulesError, "matches no module.*all-linear"),
    ("regex matches nothing", call(lambda: get_lora_model(MLP(), LoRAConfig(target_modules=r"enc\..*"))),
     TargetModulesError, "matches no module"),
    ("non-linear target", call(lambda: get_lora_model(make_model("gpt2"), LoRAConfig(target_modules=["ln_1"]))),
     TargetModulesError, "LoRA cannot wrap"),
    ("no default targets", call(lambda: get_lora_model(MLP(), LoRAConfig())), TargetModulesError,
     "No default target_modules.*fc1"),
    ("modules_to_save missing", call(lambda: get_lora_model(MLP(), LoRAConfig(target_modules=["fc1"],
                                                                              modules_to_save=["classifier"]))),
     TargetModulesError, "has no module of that name"),
    ("layers out of range", call(lambda: get_lora_model(make_model("llama"), LoRAConfig(
        target_modules=["q_proj"], layers_to_transform=[0, 9]))), TargetModulesError, r"names layers \[9\]"),
    ("rank_pattern matches nothing", call(lambda: get_lora_model(make_model("llama"), LoRAConfig(
        target_modules=["q_proj"], rank_pattern={"k_proj": 2}))), TargetModulesError, "rank_pattern key 'k_proj'"),
    # state
    ("wrap twice", on_lora_model(lambda m: get_lora_model(m, LoRAConfig())), AdapterStateError,
     "already has LoRA adapters.*add_adapter"),
    ("unknown adapter", on_lora_model(lambda m: m.set_adapter("other")), AdapterStateError, "unknown adapter"),
    ("duplicate adapter", on_lora_model(lambda m: m.add_adapter("default", LoRAConfig())), AdapterStateError,
     "exists already"),
    ("bad adapter name", on_lora_model(lambda m: m.add_adapter("../x", LoRAConfig())), ValueError,
     "invalid adapter name"),
    ("delete the only adapter", on_lora_model(lambda m: m.delete_adapter("default")), AdapterStateError,
     "use unload"),
    ("merge unknown", on_lora_model(lambda m: m.merge_adapter(["nope"])), AdapterStateError, "unknown adapter"),
    ("mixed rows of unknown adapter", on_lora_model(lambda m: m(**batch_for("gpt2"), adapter_names=["x", "y"])),
     AdapterStateError, "unknown adapters"),
    ("mixed rows wrong count", on_lora_model(lambda m: m(**batch_for("gpt2"), adapter_names=["default"] * 3)),
     ValueError, "adapter_names has 3 entries but the batch has 2 rows"),
    ("load onto a LoRA model", on_lora_model(lambda m: LoRAModel.from_pretrained(m, ".")), AdapterStateError,
     "load_adapter"),
    # adapter directories
    ("no such dir", call(lambda: LoRAModel.from_pretrained(make_model("gpt2"), "/nonexistent/adapter/dir")),
     AdapterNotFoundError, "not a local directory"),
    ("empty dir", load_onto(lambda: make_model("gpt2"), lambda d: [p.unlink() for p in d.iterdir()]),
     AdapterNotFoundError, r"no adapter_config\.json"),
    ("weights missing", load_onto(lambda: make_model("gpt2"), lambda d: (d / "adapter_model.safetensors").unlink()),
     AdapterNotFoundError, r"no adapter_model\.safetensors"),
    ("truncated weights", load_onto(lambda: make_model("gpt2"), lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:4000])), AdapterFormatError, "truncated or corrupted"),
    ("corrupted header", load_onto(lambda: make_model("gpt2"), _write("adapter_model.safetensors", b"\x08" + b"\0" * 7 + b"garbage!")),
     AdapterFormatError, "not valid JSON"),
    ("header claims 1 EB", load_onto(lambda: make_model("gpt2"), _write("adapter_model.safetensors", (2**60).to_bytes(8, "little") + b"{}")),
     AdapterFormatError, "header claims"),
    ("tensor of wrong shape", load_onto(lambda: make_model("gpt2"), _reshape_tensor), AdapterFormatError,
     r"has shape \(7, 4\), the model needs \(192, 4\)"),
    ("config from a newer version", load_onto(lambda: make_model("gpt2"), _edit_config(lora_super_mode=True)),
     None, "ignoring unknown keys lora_super_mode"),
    ("config not an object", load_onto(lambda: make_model("gpt2"), _write("adapter_config.json", "[4, 8]")),
     ValueError, "expected a JSON object"),
    ("config not JSON", load_onto(lambda: make_model("gpt2"), _write("adapter_config.json", "r: 4")),
     AdapterFormatError, "not valid JSON"),
    ("not a LoRA adapter", load_onto(lambda: make_model("gpt2"), _edit_config(peft_type="IA3")), ValueError,
     "peft_type is 'IA3'"),
    ("feature we lack", load_onto(lambda: make_model("gpt2"), _edit_config(layer_replication=[[0, 2]])),
     ValueError, "does not implement: layer_replication"),
    ("wrong architecture", load_onto(lambda: make_model("llama")), AdapterFormatError,
     "does not fit this model.*c_attn"),
    ("wrong hidden size", load_onto(_wider_gpt2), AdapterFormatError, r"the model needs \(4, 96\)"),
    ("meta-device model", load_onto(_meta_gpt2), AdapterStateError, "meta device"),
    ("pickle refused", load_onto(lambda: make_model("gpt2"), _malicious_pickle), AdapterFormatError,
     "pickle file.*allow_pickle=True"),
    ("pickle with consent is still weights-only", load_onto(lambda: make_model("gpt2"), _malicious_pickle,
                                                           allow_pickle=True),
     AdapterFormatError, "weights-only"),
    # the Hub
    ("repo does not exist", on_hub(lambda saved, hub: LoRAModel.from_pretrained(make_model("gpt2"), "alice/does-not-exist")),
     AdapterNotFoundError, "no Hub repo of that name at http://127.0.0.1"),
    ("invalid repo id", call(lambda: LoRAModel.from_pretrained(make_model("gpt2"), "a/b/c/d")), AdapterNotFoundError,
     "nor a Hub repo id"),
    ("bad token", on_hub(lambda saved, hub: hf_lora.push_adapter_to_hub(
        LoRAModel.from_pretrained(make_model("gpt2"), saved), "alice/x", token="hf_not_a_real_token")),
     HubAccessError, "HTTP 401.*check the token"),
    ("revision does not exist", on_hub(lambda saved, hub: _pushed_then_load(saved, hub, revision="v9")),
     AdapterNotFoundError, "revision 'v9' not found"),
]  # fmt: skip


def _pushed_then_load(saved: Path, hub, revision: str):
    import uuid

    repo = f"alice/bad-rev-{uuid.uuid4().hex[:6]}"
    hf_lora.push_adapter_to_hub(
        LoRAModel.from_pretrained(make_model("gpt2"), saved), repo, token=hub.tokens["alice"]
    )
    return LoRAModel.from_pretrained(make_model("gpt2"), repo, revision=revision)


def test_the_matrix_is_big_enough():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize(
    ("case", "error", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(case, error, message, saved, tmp_path, hub_server, caplog):
    model, act = case(saved, tmp_path, hub_server)
    before = None if model is None or _on_meta(model) else _snapshot(model)
    kind = type(model)
    if error is None:  # a warning, and the call works
        with caplog.at_level(logging.WARNING):
            act()
        assert message in caplog.text
        return
    with pytest.raises(error, match=message):
        act()
    assert not (tmp_path / "adapter" / "PWNED").exists(), "no code from a pickle ran"
    if before is not None:
        assert type(model) is kind, "a failed call leaves the model's class as it was"
        after = _snapshot(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()} | {
        f"{n}.requires_grad": torch.tensor(p.requires_grad) for n, p in model.named_parameters()
    }


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def test_merging_twice_and_unmerging_without_merge_warn_and_change_nothing(caplog):
    model = lora_gpt2()
    randomise_B(model)
    model.merge_adapter()
    once = _snapshot(model)
    with caplog.at_level(logging.WARNING):
        model.merge_adapter()
    assert "already merged" in caplog.text and _snapshot(model).keys() == once.keys()
    assert all(torch.equal(_snapshot(model)[k], v) for k, v in once.items())
    model.unmerge_adapter()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.unmerge_adapter()
    assert "nothing to do" in caplog.text


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "/abs/adapter_config.json", "a/../../b", "C:/x", "a\\b", "a//b", "./x"]
)
def test_hostile_repo_file_names_are_refused(name):
    with pytest.raises(AdapterFormatError, match="not a safe relative path"):
        check_repo_path(name, "mallory/adapter")
    check_repo_path("task_b/adapter_config.json", "ok/repo")


# ---- 2. crash safety ---------------------------------------------------------------------------------


def _save_forever(directory: str, seed: int) -> None:
    """Child process: save new adapter values to the same directory, as fast as possible, until killed."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = get_lora_model(MLP(), LoRAConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    while True:
        randomise_B(model, seed=random.randrange(1 << 30))
        model.save_pretrained(directory)


def _check_adapter_dir(directory: Path) -> None:
    model = LoRAModel.from_pretrained(MLP(), directory)
    assert model.get_nb_trainable_parameters()[1] > 0
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    uploaded = list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    stray = [f for f in uploaded if f.endswith(".tmp") or f.startswith(".")]
    assert not stray, f"temporary files an upload of the adapter folder would take: {stray}"


@pytest.mark.parametrize(
    "kills", [pytest.param(6, id="6-kills"), pytest.param(25, id="25-kills", marks=pytest.mark.slow)]
)
def test_sigkill_during_save_pretrained_never_damages_the_adapter(tmp_path, kills):
    directory = tmp_path / "adapter"
    get_lora_model(
        MLP(), LoRAConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    ).save_pretrained(directory)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for i in range(kills):
        child = ctx.Process(target=_save_forever, args=(str(directory), i))
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))  # the child is in the middle of some save by now
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        _check_adapter_dir(directory)
    leftovers = list(tmp_path.rglob(".hf_lora-*.tmp"))
    get_lora_model(
        MLP(), LoRAConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    ).save_pretrained(directory)
    assert len(list(tmp_path.rglob(".hf_lora-*.tmp"))) == 0, (
        f"stale temp files of killed writers removed ({len(leftovers)} were left)"
    )


def _save_in_rounds(r: int, directory: str, barrier, rounds: int) -> None:
    torch.set_num_threads(1)
    model = get_lora_model(MLP(), LoRAConfig(r=r, target_modules=["fc1", "fc2"]))
    for _ in range(rounds):
        barrier.wait()
        model.save_pretrained(directory)
        barrier.wait()
        barrier.wait()


def test_two_processes_saving_into_one_folder_leave_one_of_their_adapters_whole(tmp_path):
    """Two writers at once (e.g. every rank of a job saving): weights, config and card must all be one
    writer's (a mix, r=4 config beside r=8 weights, came out in about one round in six)."""
    directory = tmp_path / "adapter"
    rounds = 25
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    workers = [ctx.Process(target=_save_in_rounds, args=(r, str(directory), barrier, rounds)) for r in (4, 8)]
    for w in workers:
        w.start()
    try:
        for _ in range(rounds):
            barrier.wait()
            barrier.wait()  # both saves done
            config_r = json.loads((directory / "adapter_config.json").read_text())["r"]
            weights_r = load_file(directory / "adapter_model.safetensors")[
                "base_model.model.fc1.lora_A.weight"
            ].shape[0]
            card_r = int((directory / "README.md").read_text().split("| rank `r` | ")[1].split()[0])
            assert config_r == weights_r == card_r, (config_r, weights_r, card_r)
            for f in directory.iterdir():
                if f.is_file():
                    f.unlink()
            barrier.wait()
    finally:
        barrier.abort()
        for w in workers:
            w.join(timeout=30)


def _run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize(
    "kills", [pytest.param(1, id="1-kill"), pytest.param(20, id="20-kills", marks=pytest.mark.slow)]
)
def test_sigkill_during_trainer_checkpointing_then_resume_equals_uninterrupted(tmp_path, kills):
    flags = ["--steps", "10", "--save-steps", "1", "--dropout", "0.1"]
    straight = _run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "straight"), *flags])
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    rng = random.Random(1)
    for i in range(kills):
        out = tmp_path / f"crash{i}"
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *flags], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while not list(out.glob("checkpoint-*")) and proc.poll() is None:  # wait for training to start
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if last_complete_checkpoint(out) is None:
            continue  # killed before the first checkpoint was whole: nothing to resume from
        resumed = _run([sys.executable, str(SCRIPT), "--out", str(out), *flags, "--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = load_file(out / "final" / "adapter_model.safetensors")
        # the same steps on the same code path, weights, optimizer and RNG restored: bit for bit
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


PUSH_FOREVER = """
import sys, random
sys.path.insert(0, sys.argv[3])
from tiny_models import make_model
from reference import randomise_B
import hf_lora
model = hf_lora.get_lora_model(make_model("gpt2"), hf_lora.LoRAConfig(r=32, target_modules=["c_attn", "c_fc"]))
while True:
    randomise_B(model, seed=random.randrange(1 << 30))
    hf_lora.push_adapter_to_hub(model, sys.argv[1], token=sys.argv[2])
"""


@pytest.mark.slow
def test_sigkill_during_hub_pushes_keeps_the_remote_whole(hub_server, hub_repo_id, tmp_path):
    """20 pushes killed at random moments: the repo always holds one whole adapter from one commit."""
    api = hub_server.api("alice")
    env = os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    rng = random.Random(2)
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", PUSH_FOREVER, hub_repo_id, hub_server.tokens["alice"],
                                 str(ROOT / "tests")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(3.5, 6.0))  # past the imports, somewhere in a push
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            head = api.repo_info(hub_repo_id).sha
        except Exception:  # killed before the repo was first created
            continue
        if "adapter_config.json" in api.list_repo_files(hub_repo_id):
            model = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, revision=head)
            assert model.get_nb_trainable_parameters()[1] > 0


# ---- 3/4. secrets ------------------------------------------------------------------------------------


def test_the_token_is_never_written_logged_or_shown(hub_server, hub_repo_id, tmp_path, caplog):
    token = hub_server.tokens["alice"]
    model = lora_gpt2()
    with caplog.at_level(logging.DEBUG):
        hf_lora.push_adapter_to_hub(model, hub_repo_id, token=token, private=True)
        model.save_pretrained(tmp_path / "local")
        pulled = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, token=token)
        pulled.save_pretrained(tmp_path / "again")
        hf_lora.download_adapter(hub_repo_id, tmp_path / "dl", token=token)
        errors = []
        for bad in (lambda: hf_lora.push_adapter_to_hub(model, "bob/x", token=token),
                    lambda: LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, revision="nope", token=token)):  # fmt: skip
            try:
                bad()
            except Exception as e:
                errors.append(f"{e!r} {e}")
    assert len(errors) == 2 and not any(token in e for e in errors)
    assert token not in caplog.text
    hf_home = Path(os.environ["HF_HOME"])
    for root in (tmp_path, hf_home):
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"token found in {path}"
    for name in hub_server.api("alice").list_repo_files(hub_repo_id):
        content = Path(hub_server.api("alice").hf_hub_download(hub_repo_id, name)).read_bytes()
        assert token.encode() not in content, f"token in the pushed {name}"


# ---- 5. properties -----------------------------------------------------------------------------------

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["linear", "conv1d"]))
    n_in, n_out, r = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(list(TOL)))
    alpha = draw(st.floats(0.1, 64))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    base = torch.nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)
    torch.nn.init.normal_(base.weight)
    base = base.to(dtype).requires_grad_(False)
    layer = make_lora_layer(base)
    layer.add_adapter("default", r=r, scaling=alpha / r, dropout=0.0)
    layer.set_active(["default"])
    return layer, seed


@settings(max_examples=60, deadline=None)
@given(layers(), st.booleans())
def test_property_b_zero_is_the_base_and_merge_unmerge_restores(layer_seed, random_b):
    layer, seed = layer_seed
    dtype = layer.weight.dtype
    x = torch.randn(3, layer.in_features_, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert torch.equal(layer(x), layer._base_forward(x)), "B = 0: exactly the base output"
    if random_b:
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    scale = (w0.float().abs() + layer.delta_weight("default").abs()).max().item() + 1
    assert (layer.weight.float() - w0.float()).abs().max().item() <= 2 * TOL[dtype] * scale


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 6),
    st.floats(0.5, 32),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 999),
)
def test_property_save_then_load_is_the_identity(tmp_path_factory, r, alpha, dtype, seed):
    torch.manual_seed(seed)
    model = get_lora_model(MLP().to(dtype), LoRAConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "head"]))
    randomise_B(model, seed)
    out = tmp_path_factory.mktemp("prop")
    model.save_pretrained(out)
    torch.manual_seed(seed)
    back = LoRAModel.from_pretrained(MLP().to(dtype), out)
    ours, theirs = hf_lora.adapter_state_dict(model), hf_lora.adapter_state_dict(back)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back.peft_config["default"].lora_alpha == alpha and back.peft_config["default"].r == r


# ---- 6. a failing rank -------------------------------------------------------------------------------


def test_a_failing_rank_stops_the_whole_run_with_its_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(SCRIPT), "--out", str(tmp_path), "--steps", "6", "--fail-rank", "1"]  # fmt: skip
    start = time.monotonic()
    proc = _run(cmd, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120, "no hang: the run ends"
    assert "injected failure on rank 1" in proc.stderr
    assert not (tmp_path / "final").exists() and not (tmp_path / "writes.log").exists(), (
        "nobody wrote an adapter"
    )
