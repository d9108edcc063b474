"""Reading an adapter's files from a folder or a Hub repo and checking their integrity (JSON, the
safetensors header against the file size, no pickle unless asked), before anything is checked against a
model (`load_plan`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors_bytes

from .adapter_files import CONFIG_NAME, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME, normalise_key
from .atomic import folder_lock
from .config import LoRAConfig
from .errors import AdapterFormatError, AdapterNotFoundError, few
from .fetch import list_repo_files, resolve_adapter_file
from .model import DEFAULT_ADAPTER

_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# An adapter_config.json is a few kB; one listing a whole vocabulary of trainable token ids is a few MB.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32  # peft's configs nest 3 deep (loftq_config, a {module: ids} dict)
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Advice:
    """How read_adapter's errors tell the user to pass the options they suggest: the caller's keywords
    (from_pretrained also has all_adapters), or the hf-lora command's flags."""

    pick_subfolder: str = "pass subfolder=<name>"
    allow_pickle: str = (
        "pass allow_pickle=True if you trust its author (it is then read with torch.load(weights_only=True))"
    )


FROM_PRETRAINED_ADVICE = Advice(pick_subfolder="pass subfolder=<name>, or all_adapters=True for all of them")


@dataclass
class AdapterFiles:
    """An adapter read from disk or the Hub, checked for integrity but not yet against a model."""

    config: LoRAConfig
    raw_config: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]  # a safetensors file's are read on first access
    source: str  # where it came from, for messages

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header where it has one (no data read)."""
        shapes = getattr(self.tensors, "shapes", None)
        return shapes[key] if shapes is not None else tuple(self.tensors[key].shape)

    def is_floating(self, key: str) -> bool:
        dtypes = getattr(self.tensors, "dtypes", None)
        if dtypes is not None:
            return dtypes[key].startswith(("F", "BF"))
        return self.tensors[key].is_floating_point()


def read_adapter(
    model_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    advice: Advice = Advice(),
) -> AdapterFiles:
    """Read `adapter_config.json` and the weights from a local directory or a Hub repo. `advice` words the
    options the errors suggest in the caller's terms."""

    def resolve(filename: str) -> Path | None:
        return resolve_adapter_file(model_id, filename, subfolder=subfolder, revision=revision, token=token)

    folder = Path(model_id).expanduser() / (subfolder or "")
    with folder_lock(folder, shared=True) if folder.is_dir() else contextlib.nullcontext():
        # (a local folder: a save into it waits, so the config and the opened weights are of one save)
        return _read_adapter(model_id, resolve, subfolder, revision, token, allow_pickle, advice)


def _read_adapter(
    model_id: str | os.PathLike,
    resolve: Callable[[str], Path | None],
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    allow_pickle: bool,
    advice: Advice,
) -> AdapterFiles:
    config_path = resolve(CONFIG_NAME)
    where = str(model_id) + (f"/{subfolder}" if subfolder else "")
    if config_path is None:
        named = (
            [n for n, _ in list_adapters(model_id, revision=revision, token=token)] if not subfolder else []
        )
        hint = (
            f" It holds adapters in subfolders: {', '.join(named)}; {advice.pick_subfolder}."
            if named
            else " Is this an adapter directory or repo?"
        )
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in {where}.{hint}")
    raw = _read_json(config_path)
    config = LoRAConfig.from_dict(raw, source=str(config_path))

    weights_path = resolve(WEIGHTS_NAME)
    if weights_path is not None:
        tensors = open_safetensors(weights_path)
    else:
        pickled = next((p for name in PICKLE_WEIGHTS_NAMES if (p := resolve(name)) is not None), None)
        if pickled is None:
            raise AdapterNotFoundError(f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
        if not allow_pickle:
            raise AdapterFormatError(
                f"{pickled} is a pickle file, and loading pickle can run arbitrary code, so hf_lora refuses "
                f"it. Convert it to {WEIGHTS_NAME} where you trust it, or {advice.allow_pickle}."
            )
        tensors = _read_pickle(pickled)
    _refuse_ambiguous_keys(tensors, where)
    return AdapterFiles(config=config, raw_config=raw, tensors=tensors, source=where)


def list_adapters(
    model_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> list[tuple[str, str | None]]:
    """(adapter name, subfolder) of every adapter saved in a directory or repo, the root one first."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        files = [str(p.relative_to(path)) for p in path.rglob(CONFIG_NAME)]
    else:
        files = list_repo_files(str(model_id), revision=revision, token=token)
    found = []
    for f in files:
        parts = Path(f).parts
        if parts == (CONFIG_NAME,):
            found.insert(0, (DEFAULT_ADAPTER, None))
        elif len(parts) == 2 and parts[1] == CONFIG_NAME:
            found.append((parts[0], parts[0]))
    return found


def _read_json(path: Path) -> Any:
    """A config file, refused before it is read if it is oversized, and after if it nests too deep."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"{path} is {size / 2**20:.1f} MiB; an adapter config is at most {MAX_CONFIG_BYTES // 2**20} MiB. "
            "The file is damaged or not an adapter config."
        )
    too_deep = AdapterFormatError(
        f"{path} is nested deeper than {MAX_JSON_DEPTH} levels; an adapter config is not. "
        "The file is damaged or not an adapter config."
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({e}); the file is damaged or not a config."
        ) from None
    except RecursionError:
        raise too_deep from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def _depth(data: Any) -> int:
    """How deep JSON lists and objects nest (iteratively: a hostile file must not exhaust the stack)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header against the file size, so a truncated,
    corrupted or hostile file (a header claiming huge tensors) fails with a clear error, not an
    allocation."""
    return dict(open_safetensors(path))


class SafetensorsFile(Mapping):
    """A safetensors file whose header is checked and whose tensors are read on first access, so the
    shapes can be checked against a model (`shapes`, `dtypes`) before any data is read. The file stays
    open until then: a save that replaces it meanwhile does not mix into what is read."""

    def __init__(self, path: Path, file: BinaryIO, header: dict[str, Any]) -> None:
        self.path = path
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
        self.dtypes = {k: v["dtype"] for k, v in entries.items()}
        self._file: BinaryIO | None = file
        self._tensors: dict[str, torch.Tensor] | None = None
        weakref.finalize(self, file.close)

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            assert self._file is not None
            self._file.seek(0)
            data = self._file.read()
            self._file.close()
            try:
                self._tensors = load_safetensors_bytes(data)
            except Exception as e:  # safetensors raises its own SafetensorError
                raise AdapterFormatError(f"{self.path}: cannot read tensors ({e}).") from None
        return self._tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __reduce__(self):  # pickled or copied as the plain dict of tensors it stands for
        return (dict, (dict(self),))


def open_safetensors(path: Path) -> SafetensorsFile:
    """A safetensors file, its header checked against the file size (a truncated, corrupted or hostile
    file fails with a clear error, not an allocation) and its tensors not yet read."""
    size = path.stat().st_size
    f = open(path, "rb")  # noqa: SIM115 - SafetensorsFile keeps it open until the tensors are read
    try:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{path} is truncated ({size} bytes): not a safetensors file.")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFormatError(
                f"{path}: header claims {n:,} bytes but the file has {size:,}: truncated or corrupted."
            )
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys(path))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise AdapterFormatError(
                f"{path}: the safetensors header is not valid JSON (corrupted file)."
            ) from None
        _check_header(path, header, data_bytes=size - 8 - n)
    except BaseException:
        f.close()
        raise
    return SafetensorsFile(path, f, header)


def _unique_keys(path: Path):
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        twice = [k for k, n in Counter(k for k, _ in items).items() if n > 1]
        if twice:
            raise AdapterFormatError(
                f"{path}: the safetensors header names {few(twice, 4)} more than once, so which tensor is "
                "meant is ambiguous (a damaged or hand-edited file); save the adapter again."
            )
        return dict(items)

    return pairs


def _refuse_ambiguous_keys(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """peft's older files name tensors with the adapter name (`lora_A.default.weight`); a file holding one
    tensor under two spellings leaves which to load to chance."""
    spellings: dict[str, list[str]] = {}
    for key in tensors:
        spellings.setdefault(normalise_key(key), []).append(key)
    clashes = [" and ".join(keys) for keys in spellings.values() if len(keys) > 1]
    if clashes:
        raise AdapterFormatError(
            f"adapter {where} holds the same tensor under two names ({few(clashes, 2)}), so which one is "
            "meant is ambiguous; keep one of them (save the adapter again)."
        )


def _check_header(path: Path, header: Any, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: the safetensors header is not a JSON object (corrupted file).")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end <= data_bytes
        except (KeyError, TypeError, ValueError):
            ok, nbytes, begin, end = False, -1, 0, 0
        if not ok or end - begin != nbytes:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} does not fit the file (truncated or corrupted); save the adapter again."
            )


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch file ({e}).") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors.")
    return obj
