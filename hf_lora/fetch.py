"""Fetching an adapter's files: from a local folder or a Hub repo (any server speaking its protocol, via
`HF_ENDPOINT`), through `hf_hub_download` and its cache (so `HF_HUB_OFFLINE=1` works for anything
downloaded before); the Hub's errors in our words. Tokens are handed to `huggingface_hub` and never
written or logged here."""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import AdapterFormatError, AdapterNotFoundError, HubAccessError, HubError
from .secrets import scrub_secrets


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def resolve_adapter_file(
    model_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Local path of `filename` of an adapter in a directory or Hub repo; None if the adapter has no such
    file. Raises AdapterNotFoundError / HubAccessError with the repo and endpoint when it cannot tell."""
    if subfolder and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder {subfolder!r} must be a relative path inside the adapter repo.")
    path = Path(model_id).expanduser()
    if path.is_dir():
        file = path / (subfolder or "") / filename
        return file if file.is_file() else None
    if path.exists():
        raise AdapterNotFoundError(f"{model_id} is a file; pass the directory that holds the adapter files.")
    repo_id = str(model_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise AdapterNotFoundError(
            f"no adapter at {repo_id!r}: it is not a local directory, nor a Hub repo id like 'user/name'."
        ) from None
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, token=token))
    except RevisionNotFoundError:
        raise AdapterNotFoundError(
            f"revision {revision!r} not found in Hub repo {repo_id!r} at {endpoint()}."
        ) from None
    except RepositoryNotFoundError:
        raise AdapterNotFoundError(
            f"no adapter at {repo_id!r}: not a local directory, and no Hub repo of that name at {endpoint()} "
            "(or it is private and your token cannot read it)."
        ) from None
    except LocalEntryNotFoundError as e:
        if answer := _http_answer(e):  # the Hub did answer, with an error: say so, not "cannot be reached"
            raise http_error(answer, repo_id, token) from None
        raise not_cached(f"{filename} of {repo_id!r}") from None
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        raise http_error(e, repo_id, token) from None


def missing_repo(
    error: RepositoryNotFoundError | RevisionNotFoundError, repo_id: str, revision: str | None
) -> AdapterNotFoundError:
    """The error to raise when listing or downloading a repo finds no such repo, or no such revision."""
    if isinstance(error, RepositoryNotFoundError):
        return AdapterNotFoundError(f"no Hub repo {repo_id!r} at {endpoint()} (or it is private).")
    return AdapterNotFoundError(f"revision {revision!r} not found in {repo_id!r} at {endpoint()}.")


def list_repo_files(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> list[str]:
    """The repo's file names, refusing any that would escape a local folder (a hostile repo). Offline
    (HF_HUB_OFFLINE=1) or when the Hub cannot be reached: the files of the cached snapshot."""
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except OfflineModeIsEnabled:
        files = _cached_repo_files(repo_id, revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise missing_repo(e, repo_id, revision) from None
    except HfHubHTTPError as e:
        raise http_error(e, repo_id, token) from None
    except Exception as e:
        if network_cause(e) is None:
            raise
        # the Hub does not answer: the cached snapshot, as hf_hub_download falls back to the cache
        files = _cached_repo_files(repo_id, revision)
    for name in files:
        check_repo_path(name, repo_id)
    return files


def _cached_repo_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise not_cached(repr(repo_id)) from None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def not_cached(what: str) -> AdapterNotFoundError:
    return AdapterNotFoundError(
        f"{what} is not in the local cache and the Hub cannot be reached ({endpoint()}, "
        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it once online."
    )


def check_repo_path(name: str, repo_id: str) -> None:
    parts = name.split("/")
    unsafe = (
        name.startswith("/") or "\\" in name or ":" in parts[0] or any(p in ("", ".", "..") for p in parts)
    )
    if unsafe:
        raise AdapterFormatError(
            f"Hub repo {repo_id!r} lists a file {name!r}, which is not a safe relative path."
        )


def http_error(e: HfHubHTTPError, repo_id: str, token: str | bool | None = None) -> Exception:
    """The error to raise for an HTTP error answer of the Hub, in our words, and with no token in it (a
    server may echo the request's Authorization header in its error body)."""
    status = e.response.status_code if e.response is not None else None
    if status in (401, 403):
        return HubAccessError(
            f"the Hub at {endpoint()} refused access to {repo_id!r} (HTTP {status}): check the token "
            "(token=..., HF_TOKEN or `hf auth login`) and that it may write to this namespace."
        )
    said = scrub_secrets(" ".join(str(e).split()), token)[:500]
    if status is not None and status >= 500:
        return HubError(
            f"the Hub at {endpoint()} answered HTTP {status} (a server error) for {repo_id!r}: try again "
            f"later. It said: {said}"
        )
    return HubError(f"the Hub at {endpoint()} answered HTTP {status} for {repo_id!r}: {said}")


def _http_answer(e: BaseException | None) -> HfHubHTTPError | None:
    """The Hub's HTTP error answer in `e` or its causes (hf_hub_download wraps it in LocalEntryNotFoundError
    when nothing is cached); None if no answer came."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# Errors meaning no answer came: huggingface_hub talks through httpx2, httpx or requests, by version.
_TRANSPORT_ERRORS = (
    ("httpx2", "TransportError"),
    ("httpx", "TransportError"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
)


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    errors = []
    for module, name in _TRANSPORT_ERRORS:
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def network_cause(e: BaseException | None) -> BaseException | None:
    """The HTTP client's connection/timeout error in `e` or its causes (huggingface_hub passes some on as
    they are and wraps others, e.g. in LocalEntryNotFoundError); None if the Hub did answer."""
    errors = _transport_errors()
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, errors):
            return e
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None
