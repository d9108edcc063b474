"""Sharing adapters on the Hugging Face Hub (or any server speaking its protocol, via `HF_ENDPOINT`); the
files come and go through `fetch`.

Pushing saves the adapter into a temporary directory and uploads it in ONE commit, so a repo never holds
half an adapter; pulling goes through `hf_hub_download` and its cache (so `HF_HUB_OFFLINE=1` works for
anything downloaded before). Tokens are handed to `huggingface_hub` and never written or logged here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .adapter_files import CONFIG_NAME, PICKLE_WEIGHTS_NAMES
from .atomic import left_by_dead_writer, writer_tag
from .errors import AdapterNotFoundError
from .fetch import (  # (fetching; offered here too, as they always were)
    check_repo_path,
    endpoint,
    http_error,
    list_repo_files,
    missing_repo,
    network_cause,
    not_cached,
    resolve_adapter_file,
)
from .model_card import CARD_NAME, is_generated_card

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .model import LoRAModel

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", CARD_NAME, "loss_curve.svg")
_PUSH_TMP_PREFIX = "hf_lora-push-"


def push_adapter_to_hub(
    model: LoRAModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    card_data: dict[str, Any] | None = None,
    log_history: list[dict[str, Any]] | None = None,
    selected_adapters: list[str] | None = None,
    create_pr: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> CommitInfo:
    """Create the repo if needed and upload the adapter files in one commit; returns the CommitInfo
    (`.oid`, `.commit_url`). A README.md already in the repo that hf_lora did not write is kept.
    `save_embedding_layers` is save_pretrained's."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision not in {b.name for b in api.list_repo_refs(repo_id).branches}:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except HfHubHTTPError as e:
        raise http_error(e, repo_id) from None

    _remove_stale_push_dirs()
    with tempfile.TemporaryDirectory(prefix=_push_dir_prefix()) as tmp:
        model.save_pretrained(
            tmp,
            selected_adapters=selected_adapters,
            repo_id=repo_id,
            card_data=card_data,
            log_history=log_history,
            save_embedding_layers=save_embedding_layers,
        )
        try:
            for card in owners_cards(Path(tmp), repo_id, revision, token):
                (Path(tmp) / card).unlink()
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message or "Upload LoRA adapter (hf_lora)",
                create_pr=create_pr,
            )
        except HfHubHTTPError as e:
            raise http_error(e, repo_id) from None
    logger.info("pushed adapter to %s/%s (commit %s)", endpoint(), repo_id, info.oid)
    return info


def download_adapter(
    repo_id: str, local_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> Path:
    """Download an adapter repo's files (with every adapter's subfolder) into `local_dir`; a repo without
    an adapter_config.json is an error (and a folder made for it is removed)."""
    from huggingface_hub import snapshot_download

    created = not Path(local_dir).exists()
    # (older peft adapters keep pickled weights: fetched too, loaded only with allow_pickle=True)
    patterns = [f"*{name}" for name in (*ADAPTER_FILES, *PICKLE_WEIGHTS_NAMES)]
    try:
        try:
            path = snapshot_download(
                repo_id, revision=revision, token=token, local_dir=local_dir, allow_patterns=patterns
            )
        except LocalEntryNotFoundError:  # offline or unreachable, and not in local_dir: from the cache
            cached = snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
            )
            path = shutil.copytree(cached, local_dir, dirs_exist_ok=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise missing_repo(e, repo_id, revision) from None
    except LocalEntryNotFoundError:
        raise not_cached(repr(repo_id)) from None
    except HfHubHTTPError as e:
        raise http_error(e, repo_id) from None
    path = Path(path)
    if not any(path.rglob(CONFIG_NAME)):
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise AdapterNotFoundError(
            f"Hub repo {repo_id!r} at {endpoint()} has no {CONFIG_NAME} (at its top or in a subfolder): it "
            "holds no adapter. Check the repo id and the revision."
        )
    return path


def owners_cards(folder: Path, repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    """The cards (README.md at the root or in an adapter's subfolder) of `folder` that hf_lora generated and
    whose counterpart in the repo its owner wrote: a push must leave those as they are. A card the user
    wrote locally is theirs to upload."""
    cards = [p.relative_to(folder).as_posix() for p in folder.rglob(CARD_NAME) if is_generated_card(p)]
    return [card for card in cards if _remote_readme_is_users(repo_id, card, revision, token)]


def _remote_readme_is_users(
    repo_id: str, filename: str, revision: str | None, token: str | bool | None
) -> bool:
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return False
    return not is_generated_card(Path(path))


def _push_dir_prefix() -> str:
    return f"{_PUSH_TMP_PREFIX}{writer_tag()}"


def _remove_stale_push_dirs() -> None:
    """Temporary push directories of processes killed mid-push (by atomic's rule: a pid is judged only on
    this host and pid namespace, others' folders by age)."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PUSH_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            if left_by_dead_writer(d, d.name.removeprefix(_PUSH_TMP_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)


__all__ = [
    "ADAPTER_FILES",
    "check_repo_path",
    "download_adapter",
    "endpoint",
    "http_error",
    "list_repo_files",
    "network_cause",
    "owners_cards",
    "push_adapter_to_hub",
    "resolve_adapter_file",
]
