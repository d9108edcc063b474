"""Sharing adapters through a real Hub-protocol server (tests/hub_server.py) and the real client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hub_fixtures import StallingProxy
from peft import PeftModel
from reference import randomise_B
from safetensors.torch import load_file
from tiny_models import batch_for, make_model
from tolerance import assert_close

import hf_lora
from hf_lora import AdapterNotFoundError, HubAccessError, LoRAConfig, LoRAModel, get_lora_model

ROOT = Path(__file__).parents[1]


def adapter_model(seed: int = 0, **fields) -> LoRAModel:
    model = get_lora_model(
        make_model("gpt2"), LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], **fields)
    )
    model.peft_config["default"].base_model_name_or_path = "openai-community/gpt2"
    randomise_B(model, seed)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch_for("gpt2")).logits


def test_push_then_pull_gives_identical_tensors_and_logits(hub_server, hub_repo_id, tmp_path):
    model = adapter_model()
    info = hf_lora.push_adapter_to_hub(
        model, hub_repo_id, token=hub_server.tokens["alice"], commit_message="first"
    )
    api = hub_server.api("alice")
    commits = api.list_repo_commits(hub_repo_id)
    assert (
        commits[0].commit_id == info.oid and commits[0].title == "first" and len(commits) == 2
    )  # + the initial one
    assert sorted(api.list_repo_files(hub_repo_id)) == [".gitattributes", "README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]  # fmt: skip

    pulled = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id)
    assert torch.equal(logits(pulled), logits(model))
    peft_pulled = PeftModel.from_pretrained(make_model("gpt2"), hub_repo_id)  # an independent client
    assert_close(logits(peft_pulled), logits(model))

    local = hf_lora.download_adapter(hub_repo_id, tmp_path / "dl")
    assert load_file(local / "adapter_model.safetensors").keys() == hf_lora.adapter_state_dict(model).keys()


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
def test_push_passes_save_embedding_layers_on(hub_server, hub_repo_id, tmp_path, save_embedding_layers):
    """An adapter on the tied wte and lm_head: "auto" (peft's) pushes lm_head's base weight with it, False
    an adapter-only file."""
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn", "lm_head"]))
    hf_lora.push_adapter_to_hub(
        model, hub_repo_id, token=hub_server.tokens["alice"], save_embedding_layers=save_embedding_layers
    )
    keys = load_file(
        hf_lora.download_adapter(hub_repo_id, tmp_path / "dl") / "adapter_model.safetensors"
    ).keys()
    assert ("base_model.model.lm_head.base_layer.weight" in keys) is (save_embedding_layers == "auto")


def test_model_card_front_matter_and_snippets(hub_server, hub_repo_id):
    model = adapter_model()
    hf_lora.push_adapter_to_hub(model, hub_repo_id, token=hub_server.tokens["alice"], card_data={"license": "mit"},
                                log_history=[{"step": 1, "loss": 2.0}, {"step": 5, "loss": 1.0}])  # fmt: skip
    card = Path(hub_server.api("alice").hf_hub_download(hub_repo_id, "README.md")).read_text()
    front = card.split("---")[1]
    for line in ("base_model: openai-community/gpt2", "library_name: peft", "license: mit",
                 "- base_model:adapter:openai-community/gpt2", "- hf_lora", "pipeline_tag: text-generation"):  # fmt: skip
        assert line in front, line
    assert f'LoRAModel.from_pretrained(base, "{hub_repo_id}")' in card
    assert f'PeftModel.from_pretrained(base, "{hub_repo_id}")' in card
    assert "| 5 | 1 |" in card and "![training loss](loss_curve.svg)" in card


def test_second_push_is_a_new_commit_and_old_revisions_stay_loadable(hub_server, hub_repo_id):
    api = hub_server.api("alice")
    first_model, second_model = adapter_model(seed=1), adapter_model(seed=2)
    first = hf_lora.push_adapter_to_hub(first_model, hub_repo_id, token=hub_server.tokens["alice"])
    api.create_tag(hub_repo_id, tag="v1")
    second = hf_lora.push_adapter_to_hub(second_model, hub_repo_id, token=hub_server.tokens["alice"])
    assert second.oid != first.oid
    latest = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id)
    assert torch.equal(logits(latest), logits(second_model))
    for revision in (first.oid, "v1"):
        old = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, revision=revision)
        assert torch.equal(logits(old), logits(first_model))
    again = hf_lora.push_adapter_to_hub(second_model, hub_repo_id, token=hub_server.tokens["alice"])
    assert again.oid == second.oid, "pushing unchanged files makes no commit"
    branch = hf_lora.push_adapter_to_hub(
        first_model, hub_repo_id, token=hub_server.tokens["alice"], revision="exp"
    )
    assert api.list_repo_commits(hub_repo_id, revision="exp")[0].commit_id == branch.oid
    assert api.repo_info(hub_repo_id).sha == second.oid, "main did not move"


def test_private_repo(hub_server, hub_repo_id):
    model = adapter_model()
    hf_lora.push_adapter_to_hub(model, hub_repo_id, private=True, token=hub_server.tokens["alice"])
    with pytest.raises(AdapterNotFoundError, match="private"):
        LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id)
    with pytest.raises(AdapterNotFoundError):
        LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, token=hub_server.tokens["bob"])
    owner = LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, token=hub_server.tokens["alice"])
    assert torch.equal(logits(owner), logits(model))


def test_auth_errors_are_clear_and_never_show_the_token(hub_server, hub_repo_id, caplog):
    model = adapter_model()
    bad = "hf_wrong_token_value_123"
    with pytest.raises(HubAccessError, match="HTTP 401") as err:
        hf_lora.push_adapter_to_hub(model, hub_repo_id, token=bad)
    assert bad not in str(err.value) and hub_repo_id in str(err.value)
    bob_target = hub_repo_id  # alice's namespace
    with pytest.raises(HubAccessError, match="HTTP 403") as err:
        hf_lora.push_adapter_to_hub(model, bob_target, token=hub_server.tokens["bob"])
    assert hub_server.tokens["bob"] not in str(err.value)
    assert bad not in caplog.text and hub_server.tokens["bob"] not in caplog.text


def test_missing_repo_file_and_revision(hub_server, hub_repo_id):
    for every in (False, True):
        with pytest.raises(AdapterNotFoundError, match=rf"{hub_repo_id}.*{hub_server.endpoint}"):
            LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, all_adapters=every)
    hub_server.api("alice").create_repo(hub_repo_id)
    with pytest.raises(AdapterNotFoundError, match=r"no adapter_config\.json"):
        LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id)
    hf_lora.push_adapter_to_hub(adapter_model(), hub_repo_id, token=hub_server.tokens["alice"])
    with pytest.raises(AdapterNotFoundError, match="revision 'nope' not found"):
        LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, revision="nope")


@pytest.mark.parametrize("card", ["README.md", "other/README.md"])
def test_a_readme_the_user_wrote_is_kept(hub_server, hub_repo_id, card):
    """The root's card and each adapter subfolder's: a hand-written one stays, the others are ours."""
    api = hub_server.api("alice")
    api.create_repo(hub_repo_id)
    api.upload_file(path_or_fileobj=b"# Our adapter\nHand-written.\n", path_in_repo=card, repo_id=hub_repo_id)
    model = adapter_model()
    model.add_adapter("other", LoRAConfig(r=2, target_modules=["c_attn"]))
    hf_lora.push_adapter_to_hub(model, hub_repo_id, token=hub_server.tokens["alice"])
    for name in ("README.md", "other/README.md"):
        text = Path(api.hf_hub_download(hub_repo_id, name)).read_text()
        assert (text == "# Our adapter\nHand-written.\n") == (name == card), name
    assert "adapter_model.safetensors" in api.list_repo_files(hub_repo_id)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "hub",
    ["offline", pytest.param("unreachable", marks=pytest.mark.slow)],  # (huggingface_hub retries: ~1 min)
)
def test_offline_mode_loads_from_the_cache(hub_server, hub_repo_id, tmp_path, hub):
    """HF_HUB_OFFLINE=1, or a Hub that does not answer: loads and pulls come from the cache."""
    model = adapter_model()
    hf_lora.push_adapter_to_hub(model, hub_repo_id, token=hub_server.tokens["alice"])
    LoRAModel.from_pretrained(make_model("gpt2"), hub_repo_id, all_adapters=True)  # fills the cache
    torch.save(logits(model), tmp_path / "expected.pt")
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
from tiny_models import make_model, batch_for
import hf_lora
for every in (False, True):  # all_adapters lists the repo's files: from the cached snapshot
    model = hf_lora.LoRAModel.from_pretrained(make_model("gpt2"), {hub_repo_id!r}, all_adapters=every)
    with torch.no_grad():
        assert torch.equal(model(**batch_for("gpt2")).logits, torch.load({str(tmp_path / "expected.pt")!r}))
pulled = hf_lora.download_adapter({hub_repo_id!r}, {str(tmp_path / "pulled")!r})
assert (pulled / "adapter_model.safetensors").is_file(), sorted(pulled.iterdir())
try:
    hf_lora.LoRAModel.from_pretrained(make_model("gpt2"), "alice/never-downloaded")
except hf_lora.AdapterNotFoundError as e:
    assert "not in the local cache" in str(e), e
else:
    raise SystemExit("expected an error")
"""
    unavailable = (
        {"HF_HUB_OFFLINE": "1"} if hub == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    )
    env = os.environ | unavailable | {"PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


PUSH_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from tiny_models import make_model
import hf_lora
model = hf_lora.get_lora_model(make_model("gpt2"), hf_lora.LoRAConfig(r=64, target_modules=["c_attn", "c_fc"],
                               modules_to_save=["lm_head"]))
hf_lora.push_adapter_to_hub(model, sys.argv[1], token=sys.argv[2])
print("pushed")
"""


def test_push_killed_mid_commit_leaves_the_remote_at_its_previous_commit(hub_server, hub_repo_id, tmp_path):
    before = hf_lora.push_adapter_to_hub(adapter_model(), hub_repo_id, token=hub_server.tokens["alice"])
    proxy = StallingProxy(urlsplit(hub_server.endpoint).port or 0, stall_after=20_000)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {"HF_ENDPOINT": proxy.endpoint, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    pusher = subprocess.Popen(
        [sys.executable, "-c", PUSH_SCRIPT, hub_repo_id, hub_server.tokens["alice"], str(ROOT / "tests")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proxy.stalled.wait(timeout=120), "the push never reached its commit"
        pusher.send_signal(signal.SIGKILL)
        pusher.wait(timeout=10)
    finally:
        pusher.kill()
        proxy.close()
    assert pusher.returncode == -signal.SIGKILL and pusher.stdout.read() == b""
    api = hub_server.api("alice")
    assert api.repo_info(hub_repo_id).sha == before.oid, "the remote is at the previous commit"
    assert list(tmp.glob("hf_lora-push-*")), "the killed push left its temporary folder"
    env["HF_ENDPOINT"] = hub_server.endpoint
    subprocess.run([sys.executable, "-c", PUSH_SCRIPT, hub_repo_id, hub_server.tokens["alice"], str(ROOT / "tests")],
                   env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
    assert not list(tmp.glob("hf_lora-push-*")), "the next push cleaned it up"
    assert api.repo_info(hub_repo_id).sha != before.oid


def test_a_push_removes_only_the_temporary_folders_it_can_tell_are_stale(
    hub_server, hub_repo_id, tmp_path, monkeypatch
):
    """Another container sharing /tmp has pids of its own: its push in progress was removed when the same pid
    was not alive here. A pid is judged only for this host and pid namespace; others' folders by age."""
    from hf_lora.atomic import _writer_id

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(exited.stdout)
    here, elsewhere = _writer_id(), "0123abcd"
    folders = {
        f"hf_lora-push-{dead}-{here}-killed": False,
        f"hf_lora-push-{os.getpid()}-{here}-running": True,
        f"hf_lora-push-{dead}-{elsewhere}-running": True,
        f"hf_lora-push-{dead}-{elsewhere}-old": False,
    }
    for name in folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    os.utime(tmp_path / f"hf_lora-push-{dead}-{elsewhere}-old", (day_ago, day_ago))
    hf_lora.push_adapter_to_hub(adapter_model(), hub_repo_id, token=hub_server.tokens["alice"])
    assert {name: (tmp_path / name).exists() for name in folders} == folders


def test_pull_fetches_an_older_peft_adapters_pickled_weights(hub_server, hub_repo_id, tmp_path):
    model = adapter_model()
    model.save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "adapter_model.safetensors")
    (tmp_path / "src" / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "src" / "adapter_model.bin")  # as peft wrote before safetensors
    api = hub_server.api("alice")
    api.create_repo(hub_repo_id)
    api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "src")
    local = hf_lora.download_adapter(hub_repo_id, tmp_path / "dl")
    assert (local / "adapter_model.bin").is_file()
    loaded = LoRAModel.from_pretrained(make_model("gpt2"), local, allow_pickle=True)
    assert torch.equal(logits(loaded), logits(model))
