"""The local Hub (tests/hub_server.py) driven by the unmodified huggingface_hub client.

These tests pin down both the server and the client behaviours that push/pull code relies on: which exception
each failure raises, that re-uploading unchanged files makes no commit, that an interrupted commit changes nothing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:
    from hub_fixtures import HubServer

from hub_fixtures import StallingProxy


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def has_object(git_dir: Path, sha: str) -> bool:
    return subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "-e", sha]).returncode == 0


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def add(path: str, data: bytes) -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)


def status_of(call: Callable[[], object]) -> int:
    """The HTTP status of the HfHubHTTPError that `call()` raises."""
    with pytest.raises(HfHubHTTPError) as error:
        call()
    return error.value.response.status_code


def raw_request(
    hub: HubServer, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    """(status, body) of a request made outside the client, for what it never sends."""
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(hub.endpoint).port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def alice(hub_server: HubServer) -> HfApi:
    return hub_server.api("alice")


@pytest.fixture
def bob(hub_server: HubServer) -> HfApi:
    return hub_server.api("bob")


@pytest.fixture
def repo(alice: HfApi, hub_repo_id: str) -> str:
    """A fresh public repo of alice's, holding only the initial commit."""
    alice.create_repo(hub_repo_id)
    return hub_repo_id


def test_whoami_and_invalid_token(hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path) -> None:
    assert alice.whoami()["name"] == "alice"
    intruder = HfApi(endpoint=hub_server.endpoint, token="hf_not_a_token")
    assert status_of(intruder.whoami) == 401
    with pytest.raises(HfHubHTTPError) as error:
        intruder.repo_info(repo)
    assert error.value.response.status_code == 401
    assert not isinstance(error.value, RepositoryNotFoundError)  # the client keeps a bad token apart
    download = functools.partial(
        hf_hub_download,
        repo,
        ".gitattributes",
        endpoint=hub_server.endpoint,
        token="hf_bad",
        cache_dir=tmp_path,
    )
    assert status_of(download) == 401


def test_upload_folder_then_download_identical_bytes(
    hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path
) -> None:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(300_000),
        "nested/deep/notes.txt": "héllo\n".encode(),
    }
    info = alice.upload_folder(repo_id=repo, folder_path=write_folder(tmp_path / "src", files))

    commits = alice.list_repo_commits(repo)  # exactly one commit on top of the Hub's initial one
    assert [c.title for c in commits] == ["Upload folder using huggingface_hub", "initial commit"]
    assert commits[0].commit_id == info.oid == alice.repo_info(repo).sha
    assert sorted(alice.list_repo_files(repo)) == sorted([".gitattributes", *files])
    for name, data in files.items():
        path = hf_hub_download(repo, name, endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == data
    snapshot = snapshot_download(repo, endpoint=hub_server.endpoint, cache_dir=tmp_path / "snapshots")
    assert {k: v for k, v in read_folder(Path(snapshot)).items() if k != ".gitattributes"} == files

    metadata = get_hf_file_metadata(hf_hub_url(repo, "adapter_config.json", endpoint=hub_server.endpoint))
    assert (metadata.etag, metadata.commit_hash, metadata.size) == (git_blob_sha(b'{"r": 8}'), info.oid, 8)


def test_second_commit_keeps_old_revisions(
    hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path
) -> None:
    first = alice.create_commit(repo, [add("weights.bin", b"one")], commit_message="v1").oid
    alice.create_tag(repo, tag="v1", revision=first)
    second = alice.create_commit(repo, [add("weights.bin", b"two")], commit_message="v2").oid
    assert second != first

    for revision, expected in [(first, b"one"), ("v1", b"one"), ("main", b"two"), (second, b"two")]:
        path = hf_hub_download(
            repo, "weights.bin", revision=revision, endpoint=hub_server.endpoint, cache_dir=tmp_path
        )
        assert Path(path).read_bytes() == expected, revision
    refs = alice.list_repo_refs(repo)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]
    assert [c.commit_id for c in alice.list_repo_commits(repo)][:2] == [second, first]
    assert status_of(lambda: alice.create_tag(repo, tag="v1", revision=second)) == 409


def test_reupload_of_unchanged_files_makes_no_commit(alice: HfApi, repo: str, tmp_path: Path) -> None:
    folder = write_folder(tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    first = alice.upload_folder(repo_id=repo, folder_path=folder)
    again = alice.upload_folder(repo_id=repo, folder_path=folder)
    assert again.oid == first.oid  # files whose preupload oid matches are dropped; no empty commit
    assert len(alice.list_repo_commits(repo)) == 2

    (folder / "b.txt").write_bytes(b"changed")
    third = alice.upload_folder(repo_id=repo, folder_path=folder)
    assert third.oid != first.oid
    assert len(alice.list_repo_commits(repo)) == 3


def test_branch_with_a_slash(hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path) -> None:
    alice.create_branch(repo, branch="feature/x")
    alice.create_branch(repo, branch="feature/x", exist_ok=True)
    assert status_of(lambda: alice.create_branch(repo, branch="feature/x")) == 409
    alice.create_commit(repo, [add("only-here.txt", b"x")], commit_message="on branch", revision="feature/x")

    def fetch(revision: str) -> str:
        return hf_hub_download(
            repo, "only-here.txt", revision=revision, endpoint=hub_server.endpoint, cache_dir=tmp_path
        )

    assert Path(fetch("feature/x")).read_bytes() == b"x"
    with pytest.raises(EntryNotFoundError):
        fetch("main")
    alice.delete_branch(repo, branch="feature/x")
    with pytest.raises(RevisionNotFoundError):
        alice.repo_info(repo, revision="feature/x")


def test_private_repo_is_hidden_from_others(
    hub_server: HubServer, alice: HfApi, bob: HfApi, hub_repo_id: str, tmp_path: Path
) -> None:
    alice.create_repo(hub_repo_id, private=True)
    alice.create_commit(hub_repo_id, [add("secret.txt", b"s")], commit_message="secret")
    assert alice.repo_info(hub_repo_id).private is True
    path = hf_hub_download(
        hub_repo_id,
        "secret.txt",
        endpoint=hub_server.endpoint,
        token=hub_server.tokens["alice"],
        cache_dir=tmp_path,
    )
    assert Path(path).read_bytes() == b"s"

    for api, token in [(bob, hub_server.tokens["bob"]), (hub_server.api(None), False)]:
        with pytest.raises(RepositoryNotFoundError):
            api.repo_info(hub_repo_id)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(
                hub_repo_id,
                "secret.txt",
                endpoint=hub_server.endpoint,
                token=token,
                cache_dir=tmp_path / "other",
            )
    with pytest.raises(RepositoryNotFoundError):
        bob.delete_repo(hub_repo_id)


def test_others_cannot_write(hub_server: HubServer, alice: HfApi, bob: HfApi, repo: str) -> None:
    assert status_of(lambda: bob.create_commit(repo, [add("x.txt", b"x")], commit_message="x")) == 403
    assert status_of(lambda: bob.create_repo(f"alice/{repo.split('/')[1]}-bob")) == 403
    assert status_of(lambda: bob.create_tag(repo, tag="bob")) == 403
    assert status_of(lambda: bob.delete_repo(repo)) == 403
    anonymous = hub_server.api(None)
    assert status_of(lambda: anonymous.create_commit(repo, [add("x.txt", b"x")], commit_message="x")) == 401
    # Client quirk: create_repo(exist_ok=True) answers a 403 by checking that the repo is readable, so it
    # "succeeds" for someone else's public repo, without any write right.
    assert bob.create_repo(repo, exist_ok=True).repo_id == repo
    assert len(alice.list_repo_commits(repo)) == 1
    assert bob.repo_info(repo).id == repo  # public repos are readable by all


def test_missing_repo_file_and_revision_raise_the_client_errors(
    hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path
) -> None:
    def fetch(repo_id: str, filename: str, revision: str | None = None) -> str:
        return hf_hub_download(
            repo_id, filename, revision=revision, endpoint=hub_server.endpoint, cache_dir=tmp_path
        )

    with pytest.raises(RepositoryNotFoundError):
        alice.repo_info("alice/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        fetch("alice/does-not-exist", "config.json")
    with pytest.raises(EntryNotFoundError):
        fetch(repo, "config.json")
    for revision in ("no-such-branch", "0123456789abcdef0123456789abcdef01234567"):
        with pytest.raises(RevisionNotFoundError):
            fetch(repo, ".gitattributes", revision)
        with pytest.raises(RevisionNotFoundError):
            alice.repo_info(repo, revision=revision)
    assert not alice.file_exists(repo, "config.json")
    assert alice.file_exists(repo, ".gitattributes")
    assert not alice.repo_exists("alice/does-not-exist")


def test_commit_preconditions(alice: HfApi, repo: str) -> None:
    head = alice.repo_info(repo).sha
    assert head is not None
    ops = [add("dir/a.txt", b"a"), add("dir/b.txt", b"b")]
    new_head = alice.create_commit(repo, ops, commit_message="x", parent_commit=head[:7]).oid
    stale = functools.partial(
        alice.create_commit, repo, [add("c.txt", b"c")], commit_message="c", parent_commit=head
    )
    assert status_of(stale) == 412
    with pytest.raises(EntryNotFoundError):
        alice.create_commit(repo, [CommitOperationDelete("missing.txt")], commit_message="rm")
    with pytest.raises(RevisionNotFoundError):
        alice.create_commit(repo, [add("c.txt", b"c")], commit_message="c", revision="no-such-branch")
    assert alice.repo_info(repo).sha == new_head

    alice.create_commit(repo, [CommitOperationDelete("dir/", is_folder=True)], commit_message="rm dir")
    assert alice.list_repo_files(repo) == [".gitattributes"]


@pytest.mark.parametrize(
    "path", ["../evil.txt", "a/../../evil.txt", "/etc/evil", "a\\evil.txt", ".git/config", "a//b"]
)
def test_unsafe_paths_are_rejected(hub_server: HubServer, alice: HfApi, repo: str, path: str) -> None:
    head = alice.repo_info(repo).sha
    lines = [
        {"key": "header", "value": {"summary": "evil"}},
        {
            "key": "file",
            "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
        },
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    token = hub_server.tokens["alice"]
    status, _ = raw_request(
        hub_server, "POST", f"/api/models/{repo}/commit/main", body, authorization=f"Bearer {token}"
    )
    assert status == 400
    assert alice.repo_info(repo).sha == head


def test_range_requests(hub_server: HubServer, alice: HfApi, repo: str) -> None:
    alice.create_commit(repo, [add("digits.txt", b"0123456789")], commit_message="digits")
    url = f"/{repo}/resolve/main/digits.txt"
    assert raw_request(hub_server, "GET", url, Range="bytes=2-4") == (206, b"234")
    assert raw_request(hub_server, "GET", url, Range="bytes=7-") == (206, b"789")
    assert raw_request(hub_server, "GET", url, Range="bytes=-2") == (206, b"89")
    assert raw_request(hub_server, "GET", url) == (200, b"0123456789")
    assert raw_request(hub_server, "GET", url, Range="bytes=10-")[0] == 416


def test_create_exist_ok_datasets_and_delete(
    hub_server: HubServer, alice: HfApi, hub_repo_id: str, tmp_path: Path
) -> None:
    url = alice.create_repo(hub_repo_id)
    assert alice.create_repo(hub_repo_id, exist_ok=True) == url
    assert status_of(lambda: alice.create_repo(hub_repo_id)) == 409

    alice.create_repo(hub_repo_id, repo_type="dataset")
    alice.create_commit(hub_repo_id, [add("data.csv", b"a,b\n")], commit_message="data", repo_type="dataset")
    path = hf_hub_download(
        hub_repo_id, "data.csv", repo_type="dataset", endpoint=hub_server.endpoint, cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == b"a,b\n"
    assert alice.list_repo_files(hub_repo_id) == [".gitattributes"]  # the model repo is another repo

    alice.delete_repo(hub_repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.repo_info(hub_repo_id)
    assert not hub_server.git_dir(hub_repo_id).exists()
    alice.delete_repo(hub_repo_id, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo(hub_repo_id)
    assert alice.repo_info(hub_repo_id, repo_type="dataset").id == hub_repo_id


def test_concurrent_commits_all_land(alice: HfApi, repo: str) -> None:
    def commit(i: int) -> None:
        alice.create_commit(repo, [add(f"f{i}.txt", b"%d" % i)], commit_message=f"f{i}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(commit, range(8)))
    assert sorted(alice.list_repo_files(repo)) == sorted([".gitattributes", *(f"f{i}.txt" for i in range(8))])
    assert len(alice.list_repo_commits(repo)) == 9


DOWNLOAD_SCRIPT = """
import sys
from huggingface_hub import hf_hub_download
repo_id, filename, cache_dir = sys.argv[1:]
print(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
"""


def test_offline_mode_reads_the_cache(hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path) -> None:
    alice.create_commit(repo, [add("config.json", b"{}")], commit_message="config")
    hf_hub_download(repo, "config.json", endpoint=hub_server.endpoint, cache_dir=tmp_path)
    # A dead endpoint: offline, the client must not need the server at all.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, repo, "config.json", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == b"{}"


def test_download_falls_back_to_the_cache_when_the_hub_refuses(
    hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path
) -> None:
    """Client behaviour: if the HEAD call fails with anything but RevisionNotFound/EntryNotFound (repo deleted,
    bad token, server down) and the file is cached for that revision, hf_hub_download returns the cached copy."""
    alice.create_commit(repo, [add("config.json", b"{}")], commit_message="config")
    fetch = functools.partial(
        hf_hub_download, repo, "config.json", endpoint=hub_server.endpoint, cache_dir=tmp_path
    )
    cached = fetch()
    alice.delete_repo(repo)
    assert fetch() == cached
    assert fetch(token="hf_not_a_token") == cached
    with pytest.raises(RepositoryNotFoundError):
        fetch(cache_dir=tmp_path / "empty")


def test_default_endpoint_is_the_local_hub(hub_server: HubServer, alice: HfApi, repo: str) -> None:
    if os.environ.get("HF_ENDPOINT") != hub_server.endpoint:
        pytest.skip("reserve_hub_endpoint() is not wired into conftest.py")
    from huggingface_hub import constants

    assert hub_server.endpoint == constants.ENDPOINT
    assert Path(hf_hub_download(repo, ".gitattributes")).read_bytes().startswith(b"*.bin")


UPLOAD_SCRIPT = """
import sys
from huggingface_hub import HfApi
endpoint, token, repo_id, folder = sys.argv[1:]
HfApi(endpoint=endpoint, token=token).upload_folder(repo_id=repo_id, folder_path=folder)
print("committed")
"""


def test_client_killed_mid_commit_leaves_the_branch_untouched(
    hub_server: HubServer, alice: HfApi, repo: str, tmp_path: Path
) -> None:
    head = alice.repo_info(repo).sha
    files = {f"shard-{i}.bin": os.urandom(512 * 1024) for i in range(8)}
    folder = write_folder(tmp_path / "src", files)
    proxy = StallingProxy(urlsplit(hub_server.endpoint).port or 0, stall_after=2 * 1024 * 1024)
    client = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_SCRIPT, proxy.endpoint, hub_server.tokens["alice"], repo, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proxy.stalled.wait(timeout=30), "the client never reached the commit request"
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
    finally:
        client.kill()
        proxy.close()
    assert client.returncode == -signal.SIGKILL
    assert client.stdout is not None and client.stdout.read() == b""

    # The server did get part of the commit: the blobs of the first whole files are written, yet unreachable.
    git_dir = hub_server.git_dir(repo)
    deadline = time.monotonic() + 5
    while not any(has_object(git_dir, git_blob_sha(data)) for data in files.values()):
        assert time.monotonic() < deadline, "no blob of the interrupted commit reached the server"
        time.sleep(0.05)

    assert alice.repo_info(repo).sha == head
    assert alice.list_repo_files(repo) == [".gitattributes"]
    subprocess.run(["git", f"--git-dir={git_dir}", "fsck", "--strict", "--no-dangling"], check=True)

    retried = alice.upload_folder(repo_id=repo, folder_path=folder)  # the same upload, uninterrupted
    assert [c.commit_id for c in alice.list_repo_commits(repo)][:2] == [retried.oid, head]
    assert sorted(alice.list_repo_files(repo)) == sorted([".gitattributes", *files])
