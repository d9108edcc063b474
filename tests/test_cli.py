"""The `hf-lora` command line, run as a user would: subprocesses on tiny models saved to disk."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from reference import randomise_B
from tiny_models import batch_for, make_model
from tolerance import assert_close
from transformers import GPT2LMHeadModel

import hf_lora
from hf_lora import LoRAConfig, LoRAModel, get_lora_model
from hf_lora.targets import lora_modules

HF_LORA = str(Path(sys.executable).with_name("hf-lora"))


def hf_lora_cli(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [HF_LORA, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy() | env
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_exits_2_with_one_line(proc: subprocess.CompletedProcess, command: str, reason: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"hf-lora {command}: error:") and reason in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0], "the reason is the last thing printed"


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """A saved tiny GPT-2 base, a fully fine-tuned copy, and an adapter for the base."""
    root = tmp_path_factory.mktemp("cli")
    make_model("gpt2").save_pretrained(root / "base")
    tuned = make_model("gpt2")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p.add_(torch.randn_like(p) * 0.01)
    tuned.save_pretrained(root / "tuned")
    model = get_lora_model(
        make_model("gpt2"), LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    )
    randomise_B(model)
    model.save_pretrained(root / "adapter")
    return root


def test_help_for_every_command():
    out = hf_lora_cli("--help").stdout
    for command in ("inspect", "info", "merge", "extract", "push", "pull"):
        assert command in out


def test_inspect(on_disk):
    out = hf_lora_cli("inspect", str(on_disk / "base"), "--r", "4").stdout
    assert "GPT2LMHeadModel" in out and "['c_attn', 'c_proj', 'c_fc']" in out
    assert "c_attn" in out and "(64, 192)" in out
    expected = get_lora_model(make_model("gpt2"), LoRAConfig(r=4)).get_nb_trainable_parameters()[0]
    assert f"trainable params: {expected:,}" in out


@pytest.mark.parametrize("all_layers", [False, True], ids=["by-name", "all-layers"])
def test_inspect_shows_each_layer_s_own_shape(on_disk, all_layers):
    """GPT-2's attn.c_proj (64, 64) and mlp.c_proj (256, 64) share a name, not a shape."""
    out = hf_lora_cli("inspect", str(on_disk / "base"), *(["--all-layers"] if all_layers else [])).stdout
    rows = Counter()
    for name, kind, shape, count in re.findall(r"^(\S+) +(\w+) +(\([\d, ]+\)) +(\d+)$", out, re.MULTILINE):
        rows[name, kind, shape] += int(count)
    expected = Counter(
        (path if all_layers else path.rsplit(".", 1)[-1], type(m).__name__, str(tuple(m.weight.shape)))
        for path, m in lora_modules(make_model("gpt2"))
    )
    assert rows == expected
    if not all_layers:
        assert rows["c_proj", "Conv1D", "(64, 64)"] == 2 and rows["c_proj", "Conv1D", "(256, 64)"] == 2
        assert rows["wte", "Embedding", "(128, 64)"] == 1, "embeddings are candidates too"


def test_info(on_disk):
    out = hf_lora_cli("info", str(on_disk / "adapter")).stdout
    assert "r / alpha:    4 / 8" in out and "-> 4 layers" in out and "peft format:  yes" in out


def test_info_counts_embedding_adapters(tmp_path):
    model = get_lora_model(
        make_model("gpt2"), LoRAConfig(r=2, target_modules=["wte", "c_attn"], use_dora=True)
    )
    model.save_pretrained(tmp_path)
    out = hf_lora_cli("info", str(tmp_path)).stdout
    assert "-> 3 layers" in out and "(3 A, 3 B, 3 DoRA magnitudes, 0 other)" in out


def test_info_shows_trainable_token_rows(tmp_path):
    model = get_lora_model(
        make_model("gpt2"), LoRAConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[3, 4])
    )
    model.save_pretrained(tmp_path)
    out = hf_lora_cli("info", str(tmp_path)).stdout
    assert (
        "token rows:   input embeddings: 2 tokens (3, 4)" in out
        and "(2 A, 2 B, 0 DoRA magnitudes, 1 other)" in out
    )


def test_merge_gives_a_plain_model_with_the_adapter_folded_in(on_disk, tmp_path):
    hf_lora_cli("merge", str(on_disk / "base"), str(on_disk / "adapter"), str(tmp_path / "merged"))
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    adapted = LoRAModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(on_disk / "base"), on_disk / "adapter"
    )
    batch = batch_for("gpt2")
    with torch.no_grad():
        assert_close(merged(**batch).logits, adapted(**batch).logits)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "merged").glob("tokenizer*")), "the base has no tokenizer: none is made up"


@pytest.mark.parametrize("tokens", [None, [130, 135]], ids=["lora", "trainable-tokens"])
def test_merge_resizes_the_base_for_an_adapter_saved_with_new_tokens(on_disk, tmp_path, tokens):
    """The adapter carries the embeddings of a resized vocabulary (save_embedding_layers), also as peft
    writes them beside trainable token rows; the CLI user cannot call resize_token_embeddings, so merge
    does."""
    base = GPT2LMHeadModel.from_pretrained(on_disk / "base")
    base.resize_token_embeddings(136)
    config = LoRAConfig(
        r=4,
        target_modules=["c_attn"],
        base_model_name_or_path=str(on_disk / "base"),
        trainable_token_indices=tokens,
    )
    model = get_lora_model(base, config)
    randomise_B(model)
    for _, layer in model.token_layers():
        torch.nn.init.normal_(layer.trainable_tokens_delta["default"])
    ids = torch.tensor([[1, 130, 135, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    out = hf_lora_cli(
        "merge", str(on_disk / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")
    ).stdout
    assert "holds embeddings for 136 tokens (the base model has 128)" in out
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():  # (the head's replaced logits come from their own matmul unmerged: rounding)
        assert_close(merged(input_ids=ids).logits, expected)


def test_extract(on_disk, tmp_path):
    out = hf_lora_cli(
        "extract", str(on_disk / "base"), str(on_disk / "tuned"), str(tmp_path / "x"), "--r", "64"
    ).stdout
    assert "from 4 layers" in out and "mean energy kept 100.00%" in out
    model = LoRAModel.from_pretrained(GPT2LMHeadModel.from_pretrained(on_disk / "base"), tmp_path / "x")
    tuned = GPT2LMHeadModel.from_pretrained(on_disk / "tuned")
    with torch.no_grad():  # full rank: B A is the SVD's reconstruction of the delta, exact to rounding
        assert_close(model(**batch_for("gpt2")).logits, tuned(**batch_for("gpt2")).logits)


def test_extract_with_modules_to_save_follows_the_warning(on_disk, tmp_path):
    """A changed input embedding: the warning names modules_to_save (and GPT-2's tied lm_head), which the
    command had no flag for."""
    tuned = GPT2LMHeadModel.from_pretrained(on_disk / "tuned")
    with torch.no_grad():
        tuned.transformer.wte.weight.add_(0.05 * torch.randn_like(tuned.transformer.wte.weight))
    tuned.save_pretrained(tmp_path / "tuned_wte")
    args = ["extract", str(on_disk / "base"), str(tmp_path / "tuned_wte")]
    warned = hf_lora_cli(*args, str(tmp_path / "x"), "--r", "64").stderr
    assert "save lm_head, transformer.wte in full with modules_to_save" in warned
    proc = hf_lora_cli(
        *args, str(tmp_path / "y"), "--r", "64", "--modules-to-save", "transformer.wte", "lm_head"
    )
    assert "modules_to_save" not in proc.stderr
    model = LoRAModel.from_pretrained(GPT2LMHeadModel.from_pretrained(on_disk / "base"), tmp_path / "y")
    with torch.no_grad():
        assert_close(model(**batch_for("gpt2")).logits, tuned(**batch_for("gpt2")).logits)


@pytest.fixture(scope="module")
def subfolder_only(on_disk):
    """A folder whose only adapter, "news", is saved in news/ (a model saves all but "default" so)."""
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4))
    model.add_adapter("news", LoRAConfig(r=2, target_modules=["c_attn"]))
    randomise_B(model)
    model.save_pretrained(on_disk / "subfolder_only", selected_adapters=["news"])
    return on_disk / "subfolder_only"


def test_an_adapter_in_a_subfolder_is_read_with_subfolder(
    on_disk, subfolder_only, tmp_path, hub_server, hub_repo_id
):
    """The advice was "pass subfolder=<name> or all_adapters=True", options of the Python API only."""
    proc = hf_lora_cli("info", str(subfolder_only), ok=False)
    assert_exits_2_with_one_line(proc, "info", "adapters in subfolders: news; pass --subfolder <name>.")
    assert "all_adapters" not in proc.stderr
    assert "-> 2 layers" in hf_lora_cli("info", str(subfolder_only), "--subfolder", "news").stdout
    hf_lora_cli(
        "merge", str(on_disk / "base"), str(subfolder_only), str(tmp_path / "m"), "--subfolder", "news"
    )
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    adapted = LoRAModel.from_pretrained(make_model("gpt2"), subfolder_only, subfolder="news")
    with torch.no_grad():
        assert_close(merged(**batch_for("gpt2")).logits, adapted(**batch_for("gpt2")).logits)
    # on the Hub too; push takes such a folder (it checked only a root adapter, and refused it)
    hf_lora_cli("push", str(subfolder_only), hub_repo_id, "--token", hub_server.tokens["alice"])
    assert "-> 2 layers" in hf_lora_cli("info", hub_repo_id, "--subfolder", "news").stdout
    proc = hf_lora_cli("merge", str(on_disk / "base"), hub_repo_id, str(tmp_path / "n"), ok=False)
    assert_exits_2_with_one_line(proc, "merge", "pass --subfolder <name>.")


def test_a_pickled_adapter_gets_advice_the_command_can_follow(on_disk, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((on_disk / "adapter" / "adapter_config.json").read_bytes())
    torch.save(hf_lora.read_adapter(on_disk / "adapter").tensors, folder / "adapter_model.bin")
    proc = hf_lora_cli("info", str(folder), ok=False)
    assert_exits_2_with_one_line(proc, "info", "or load it in Python with allow_pickle=True")
    assert "pass allow_pickle" not in proc.stderr


def test_push_and_pull(on_disk, tmp_path, hub_server, hub_repo_id):
    out = hf_lora_cli(
        "push", str(on_disk / "adapter"), hub_repo_id, "--token", hub_server.tokens["alice"]
    ).stdout
    assert hub_repo_id in out and hub_server.tokens["alice"] not in out
    hf_lora_cli("pull", hub_repo_id, str(tmp_path / "pulled"))
    assert (
        hf_lora.read_adapter(tmp_path / "pulled").tensors.keys()
        == hf_lora.read_adapter(on_disk / "adapter").tensors.keys()
    )


def test_push_keeps_a_card_the_owner_wrote(on_disk, hub_server, hub_repo_id):
    from huggingface_hub import HfApi, hf_hub_download

    token = hub_server.tokens["alice"]
    api = HfApi(token=token)
    api.create_repo(hub_repo_id)
    api.upload_file(path_or_fileobj=b"# my card\n", path_in_repo="README.md", repo_id=hub_repo_id)
    hf_lora_cli("push", str(on_disk / "adapter"), hub_repo_id, "--token", token)
    assert Path(hf_hub_download(hub_repo_id, "README.md", token=token)).read_text() == "# my card\n"
    assert "adapter_model.safetensors" in api.list_repo_files(hub_repo_id)


def test_push_uploads_an_edited_card_the_user_wrote(on_disk, tmp_path, hub_server, hub_repo_id):
    """Only a card hf_lora generated gives way to the owner's card on the Hub; the user's own local card, once
    edited, was never uploaded again ("No files have been modified")."""
    from huggingface_hub import hf_hub_download

    token = hub_server.tokens["alice"]
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((on_disk / "adapter" / name).read_bytes())
    for version in ("v1", "v2"):
        (folder / "README.md").write_text(f"# My adapter {version}\n")
        hf_lora_cli("push", str(folder), hub_repo_id, "--token", token)
        card = Path(hf_hub_download(hub_repo_id, "README.md", token=token)).read_text()
        assert card == f"# My adapter {version}\n"


def test_push_of_a_trainer_output_dir_leaves_its_checkpoints_out(on_disk, tmp_path, hub_server, hub_repo_id):
    """allow_patterns=["*adapter_config.json", ...] matched at any depth: every checkpoint-*/ adapter (and any
    README.md) was uploaded too."""
    from huggingface_hub import HfApi

    out = tmp_path / "output_dir"
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=["c_attn"]))
    model.add_adapter("other", LoRAConfig(r=2, target_modules=["c_attn"]))
    randomise_B(model)
    for folder in (out, out / "checkpoint-2", out / "checkpoint-10"):
        model.save_pretrained(folder)
    (out / "notes").mkdir()
    (out / "notes" / "README.md").write_text("# scratch\n")
    token = hub_server.tokens["alice"]
    hf_lora_cli("push", str(out), hub_repo_id, "--token", token)
    uploaded = sorted(HfApi(token=token).list_repo_files(hub_repo_id))
    assert uploaded == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                        "other/README.md", "other/adapter_config.json", "other/adapter_model.safetensors"]  # fmt: skip

    only = tmp_path / "only_checkpoints"
    for step in (2, 10):
        model.save_pretrained(only / f"checkpoint-{step}", selected_adapters=["default"])
    proc = hf_lora_cli("push", str(only), hub_repo_id, "--token", token, ok=False)
    assert_exits_2_with_one_line(
        proc, "push", f"push the checkpoint you mean, e.g. `hf-lora push {only}/checkpoint-10"
    )


@pytest.mark.parametrize("source", ["/no/such/adapter/folder", "HUB_REPO"])
def test_push_takes_a_local_folder_only(on_disk, hub_server, hub_repo_id, source):
    """A missing folder was taken for a Hub id: `push alice/src alice/dst` downloaded alice/src, created an
    empty alice/dst on the Hub, then failed."""
    from huggingface_hub import HfApi

    token = hub_server.tokens["alice"]
    if source == "HUB_REPO":
        source = f"{hub_repo_id}-src"
        hf_lora_cli("push", str(on_disk / "adapter"), source, "--token", token)
    proc = hf_lora_cli("push", source, hub_repo_id, "--token", token, ok=False)
    assert_exits_2_with_one_line(proc, "push", f"{source} is not a local folder")
    assert not HfApi(token=token).repo_exists(hub_repo_id), (
        "no repo is created for a push that cannot be done"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["info", "/no/such/adapter"], "not a local directory"),
        (["merge", "BASE", "/no/such/adapter", "OUT"], "not a local directory"),
        (["push", "BASE", "alice/x"], "no adapter_config.json"),
        (["push", "ADAPTER", "alice/x", "--token", "hf_bad"], "HTTP 401"),
        (["inspect", "/no/such/model"], "/no/such/model"),
        (["merge", "BASE", "ADAPTER", "FILE"], "exists and is not a folder"),
        (["extract", "BASE", "TUNED", "OUT", "--r", "0"], "Invalid LoRAConfig: r must be a positive integer"),
    ],
    ids=[
        "info-missing",
        "merge-missing-adapter",
        "push-not-an-adapter",
        "push-bad-token",
        "inspect-missing",
        "merge-onto-a-file",
        "extract-bad-rank",
    ],
)
def test_bad_input_exits_2_with_one_line(on_disk, tmp_path, hub_server, args, reason):
    (tmp_path / "a_file").write_text("x")
    names = {"BASE": on_disk / "base", "TUNED": on_disk / "tuned", "ADAPTER": on_disk / "adapter"}
    names |= {"OUT": tmp_path / "o", "FILE": tmp_path / "a_file"}
    args = [str(names.get(a, a)) for a in args]
    proc = hf_lora_cli(*args, ok=False)
    assert_exits_2_with_one_line(proc, args[0], reason)
    assert "hf_bad" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "ADAPTER", "alice/x", "--token", "hf_x"], "cannot reach the Hub at {endpoint}"),
        # (a pull falls back to the cache first)
        (["pull", "alice/x", "OUT"], "not in the local cache and the Hub cannot be reached ({endpoint}"),
    ],
    ids=["push", "pull"],
)
def test_an_unreachable_hub_exits_2_with_one_line(on_disk, tmp_path, args, message):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    names = {"ADAPTER": on_disk / "adapter", "OUT": tmp_path / "pulled"}
    proc = hf_lora_cli(*[str(names.get(a, a)) for a in args], ok=False, HF_ENDPOINT=endpoint)
    assert_exits_2_with_one_line(proc, args[0], message.format(endpoint=endpoint))
    assert "Traceback" not in proc.stderr
    if args[0] == "push":  # files downloaded before are no help for an upload
        assert "HF_HUB_OFFLINE" not in proc.stderr


def test_pull_of_a_repo_without_an_adapter_fails(tmp_path, hub_server, hub_repo_id):
    api = hub_server.api("alice")
    api.create_repo(hub_repo_id)
    api.upload_file(
        path_or_fileobj=b'{"model_type": "gpt2"}', path_in_repo="config.json", repo_id=hub_repo_id
    )
    proc = hf_lora_cli("pull", hub_repo_id, str(tmp_path / "pulled"), ok=False)
    assert_exits_2_with_one_line(proc, "pull", "has no adapter_config.json")
    assert not (tmp_path / "pulled").exists(), "no empty folder is left behind"


def test_huggingface_hub_messages_are_printed_once():
    """huggingface_hub prints through a handler of its own; passed on to the CLI's too, each of its
    "Retrying..." lines showed twice."""
    code = (
        "import logging\n"
        "from huggingface_hub.utils import logging as hub_logging\n"
        "from hf_lora import cli\n"
        "assert cli.main(['info', '/no/such/adapter/folder']) == 2\n"
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Retrying in 1s") == 1, proc.stderr


def test_every_argument_of_every_command_says_what_it_is():
    """`hf-lora inspect --help` once showed `--r R` with nothing after it."""
    import argparse

    from hf_lora.cli import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [
        f"{name} {action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert len(commands) == 6 and not bare
