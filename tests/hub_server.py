"""A small Hugging Face Hub-compatible HTTP server backed by bare git repositories, for tests.

It speaks the part of the Hub protocol that `huggingface_hub` uses to create repos, commit files (always inline,
never LFS or Xet), manage branches and tags, and download files, so that push/pull code can be tested offline
against the unmodified client:

    python tests/hub_server.py --root DIR --tokens TOKENS.json [--host 127.0.0.1] [--port 0] [--port-file F]

TOKENS.json maps token -> user name. Each repo is a bare git repository at DIR/{models,datasets}/<ns>/<name>.git,
with its settings in <name>.json beside it, so commit ids and ETags are real git sha1s. A commit writes its blobs
and tree first and then moves the branch with one compare-and-swap `git update-ref`: a client that disconnects
mid-request, or a request that fails, leaves the branch where it was.

Stdlib only, plus the `git` command. Standard output carries only the port, once the server listens.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

ZERO_SHA = "0" * 40
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{5,40}")
# Hermetic git: no inherited GIT_* variables (a git hook running the tests sets some), no user or system config.
_GIT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
_GIT_ENV.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


class HubError(Exception):
    """An error answer; `code` goes to X-Error-Code, which the client maps to its exception types."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.fields = headers or {}, fields or {}

    def reply(self) -> Reply:
        """JSON {"error": message, **fields}, plus X-Error-Message (ASCII, one line) and X-Error-Code."""
        headers = {
            "X-Error-Message": self.message.encode("ascii", "backslashreplace").decode().replace("\n", " ")
        }
        if self.code:
            headers["X-Error-Code"] = self.code
        return Reply.json({"error": self.message, **self.fields}, self.status, {**headers, **self.headers})


class Disconnected(Exception):
    """The client went away before sending its whole request body."""


def repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def hub_date(timestamp: float) -> str:
    """The Hub's timestamp format, "%Y-%m-%dT%H:%M:%S.%fZ" with milliseconds."""
    dt = datetime.fromtimestamp(timestamp, timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def check_path(path: Any) -> str:
    """A file path inside a repo: relative, '/'-separated, no '.', '..' or '.git' part, no backslash."""
    if (
        not isinstance(path, str)
        or "\\" in path
        or any(ord(c) < 32 for c in path)
        or any(part in ("", ".", "..", ".git") for part in path.split("/"))
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def check_name(namespace: str, name: str) -> bool:
    return bool(_NAME.fullmatch(namespace) and _NAME.fullmatch(name)) and ".." not in namespace + name


# ---------------------------------------------------------------------------------------------------- git storage


def git(git_dir: Path, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> bytes:
    """Run a git command on a bare repository and return its standard output."""
    result = subprocess.run(
        ["git", f"--git-dir={git_dir}", *args],
        input=input,
        capture_output=True,
        env={**_GIT_ENV, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


class Entry(NamedTuple):
    """A file or folder of a commit, as the Hub's tree listing describes it."""

    type: str  # "file" or "directory"
    oid: str
    size: int


@functools.lru_cache(maxsize=512)
def _tree(git_dir: Path, commit: str) -> dict[str, Entry]:
    """Every path of a commit; cached because a commit never changes."""
    entries = {}
    for record in git(git_dir, "ls-tree", "-r", "-t", "-l", "-z", commit).split(b"\0"):
        if record:
            meta, path = record.split(b"\t", 1)
            _, kind, oid, size = meta.split()
            entries[path.decode()] = Entry(
                "directory" if kind == b"tree" else "file", oid.decode(), 0 if size == b"-" else int(size)
            )
    return entries


@dataclass(frozen=True)
class Repo:
    """One repo: a bare git repository plus a JSON file of settings (the repo exists iff that file exists)."""

    type: str  # "model" or "dataset"
    namespace: str
    name: str
    git_dir: Path
    meta_path: Path

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def meta(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None

    def create(self, owner: str, private: bool) -> None:
        """A repo with an initial commit on `main`, as the Hub makes; the settings file comes last."""
        shutil.rmtree(self.git_dir, ignore_errors=True)  # left over by a crash mid-creation, if any
        self.git_dir.parent.mkdir(parents=True, exist_ok=True)
        git(self.git_dir, "init", "--quiet", "--bare", "--initial-branch=main", str(self.git_dir))
        files = {".gitattributes": self.write_blob(GITATTRIBUTES)}
        self.set_ref("refs/heads/main", self.make_commit(files, None, "initial commit", owner), ZERO_SHA)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"private": private, "createdAt": hub_date(datetime.now().timestamp())}))
        tmp.replace(self.meta_path)

    def delete(self) -> None:
        self.meta_path.unlink()
        shutil.rmtree(self.git_dir)

    def refs(self) -> dict[str, str]:
        """{"refs/heads/main": sha, "refs/tags/v1": sha, ...}; tags are lightweight, so need no peeling."""
        out = git(self.git_dir, "for-each-ref", "--format=%(objectname) %(refname)").decode()
        return {ref: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}

    def resolve(self, rev: str) -> str:
        """The commit sha of a branch, a tag or a full sha (of a commit reachable from a ref)."""
        refs = self.refs()
        for ref in (f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref in refs:
                return refs[ref]
        if _SHA.fullmatch(rev) and rev in git(self.git_dir, "rev-list", "--all").decode().split():
            return rev
        raise revision_not_found(rev)

    def tree(self, commit: str) -> dict[str, Entry]:
        return _tree(self.git_dir, commit)

    def files(self, commit: str) -> dict[str, str]:
        """{path: blob sha} of the files of a commit."""
        return {path: e.oid for path, e in self.tree(commit).items() if e.type == "file"}

    def blob(self, oid: str) -> bytes:
        return git(self.git_dir, "cat-file", "blob", oid)

    def write_blob(self, content: bytes) -> str:
        return git(self.git_dir, "hash-object", "-w", "--stdin", input=content).decode().strip()

    def make_commit(self, files: dict[str, str], parent: str | None, message: str, author: str) -> str:
        """Write the tree of `files` ({path: blob sha}) and a commit of it, through a throwaway index; moves no ref."""
        records = b"".join(f"100644 {oid}\t{path}".encode() + b"\0" for path, oid in sorted(files.items()))
        with tempfile.TemporaryDirectory() as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(self.git_dir, "update-index", "-z", "--add", "--index-info", input=records, env=index)
            tree = git(self.git_dir, "write-tree", env=index).decode().strip()
        identity = {"NAME": author, "EMAIL": f"{author}@users.noreply.localhost"}
        env = {
            f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER") for key, value in identity.items()
        }
        parents = ["-p", parent] if parent else []
        return (
            git(self.git_dir, "commit-tree", tree, *parents, input=message.encode(), env=env).decode().strip()
        )

    def set_ref(self, ref: str, new: str, old: str) -> None:
        """Compare-and-swap a ref: it must be at `old` (ZERO_SHA: must not exist); `new` = ZERO_SHA deletes it."""
        if new == ZERO_SHA:
            git(self.git_dir, "update-ref", "-d", ref, old)
        else:
            git(self.git_dir, "update-ref", ref, new, old)

    def log(self, commit: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The history of a commit, newest first, as the Hub's commit listing describes it."""
        count = [f"--max-count={limit}"] if limit else []
        out = git(self.git_dir, "log", "-z", *count, "--format=%H%x1f%an%x1f%ct%x1f%B", commit).decode()
        commits = []
        for record in filter(None, out.split("\0")):
            sha, author, timestamp, message = record.split("\x1f", 3)
            title, _, body = message.strip().partition("\n")
            commits.append(
                {
                    "id": sha,
                    "title": title,
                    "message": body.strip(),
                    "authors": [{"user": author}],
                    "date": hub_date(int(timestamp)),
                }
            )
        return commits


def apply_operations(files: dict[str, str], operations: list[tuple[str, str, str]]) -> dict[str, str]:
    """The files of a new commit: `files` ({path: blob sha}) with (kind, path, oid) operations applied in order."""
    files = dict(files)
    for kind, path, oid in operations:
        if kind == "file":
            files[path] = oid
        elif kind == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        else:
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del files[p]
    folders = {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}
    if clash := sorted(folders & files.keys()):
        raise HubError(400, f"Paths would be both a file and a folder: {clash}")
    return files


# ------------------------------------------------------------------------------------------------------ requests


class Body:
    """A request body, read no further than its Content-Length so that keep-alive connections stay in step."""

    def __init__(self, rfile: IO[bytes], length: int) -> None:
        self._rfile, self.remaining = rfile, length

    def _read(self, reader: Callable[[int], bytes], limit: int) -> bytes:
        try:
            data = reader(limit)
        except OSError:  # reset or timed out
            raise Disconnected from None
        self.remaining -= len(data)
        return data

    def readline(self) -> bytes:
        """The next whole line (the last one may lack its newline); Disconnected if the connection ends first."""
        line = self._read(self._rfile.readline, self.remaining)
        if self.remaining and not line.endswith(b"\n"):
            raise Disconnected
        return line

    def read(self) -> bytes:
        data = self._read(self._rfile.read, self.remaining)
        if self.remaining:
            raise Disconnected
        return data

    def json(self) -> dict[str, Any]:
        """The body as a JSON object ({} if empty)."""
        data = self.read()
        try:
            value = json.loads(data) if data else {}
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(value, dict):
            raise HubError(400, "The JSON body must be an object")
        return value

    def drain(self) -> None:
        while self.remaining:
            if not self._read(self._rfile.read, min(self.remaining, 1 << 20)):
                raise Disconnected


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Body
    base_url: str  # "http://host:port", for the URLs in answers
    authorization: str | None
    range: str | None
    user: str | None = None  # set once the token is checked
    params: dict[str, str] = field(default_factory=dict)  # from the route, URL-decoded

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


_REPO = r"/api/(?P<type>models|datasets)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_RESOLVE = r"(?:/(?P<type>datasets))?/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"


class Hub:
    """The Hub's logic: routes, authentication, access rules and endpoints, apart from the HTTP transport."""

    def __init__(self, root: Path, tokens: dict[str, str]) -> None:
        self.root, self.tokens = root, tokens
        self.write_lock = threading.Lock()  # serialises ref moves and repo creation/deletion
        self.routes: list[tuple[str, re.Pattern[str], Callable[[Request], Reply]]] = [
            ("GET", re.compile(r"/api/whoami-v2"), self.whoami),
            ("POST", re.compile(r"/api/repos/create"), self.create_repo),
            ("DELETE", re.compile(r"/api/repos/delete"), self.delete_repo),
            (
                "POST",
                re.compile(r"/api/validate-yaml"),
                lambda req: Reply.json({"errors": [], "warnings": []}),
            ),
            ("GET", re.compile(_REPO + r"(?:/revision/(?P<rev>[^/]+))?"), self.repo_info),
            ("GET", re.compile(_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), self.list_tree),
            ("GET", re.compile(_REPO + r"/refs"), self.list_refs),
            ("GET", re.compile(_REPO + r"/commits/(?P<rev>[^/]+)"), self.list_commits),
            ("POST", re.compile(_REPO + r"/preupload/(?P<rev>[^/]+)"), self.preupload),
            ("POST", re.compile(_REPO + r"/commit/(?P<rev>[^/]+)"), self.commit),
            ("POST", re.compile(_REPO + r"/branch/(?P<branch>[^/]+)"), self.create_branch),
            ("POST", re.compile(_REPO + r"/tag/(?P<rev>[^/]+)"), self.create_tag),
            ("DELETE", re.compile(_REPO + r"/(?P<kind>branch|tag)/(?P<ref>[^/]+)"), self.delete_ref),
            ("GET", re.compile(_RESOLVE), self.resolve_file),
            ("HEAD", re.compile(_RESOLVE), self.resolve_file),
        ]

    def dispatch(self, req: Request) -> Reply:
        """Authenticate, route and run a request; errors become Hub-style error answers."""
        try:
            if req.authorization is not None:
                req.user = self.tokens.get(req.authorization.removeprefix("Bearer ").strip())
                if req.user is None:  # this exact message keeps the client from calling it RepositoryNotFound
                    raise HubError(401, "Invalid credentials in Authorization header")
            for method, pattern, handler in self.routes:
                if method == req.method and (match := pattern.fullmatch(req.path)):
                    req.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return handler(req)
            raise HubError(404, f"Not found: {req.method} {req.path}")
        except HubError as e:
            return e.reply()
        except Disconnected:
            raise
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            return HubError(500, f"Internal error: {e}").reply()

    # ---- access rules

    def _repo_at(self, repo_type: str, namespace: str, name: str) -> Repo:
        base = self.root / f"{repo_type}s" / namespace
        return Repo(repo_type, namespace, name, base / f"{name}.git", base / f"{name}.json")

    def _repo(self, req: Request, write: bool = False) -> Repo:
        """The repo of the URL if this user may see it (others' private repos do not exist) and, if `write`, change it."""
        if not check_name(req.params["ns"], req.params["name"]):
            raise repo_not_found()
        repo = self._repo_at(req.params.get("type", "models")[:-1], req.params["ns"], req.params["name"])
        meta = repo.meta()
        if meta is None or (meta["private"] and req.user != repo.namespace):
            raise repo_not_found()
        if write:
            self._check_can_write(req, repo.namespace)
        return repo

    @staticmethod
    def _user(req: Request) -> str:
        if req.user is None:
            raise HubError(401, "You must be authenticated to do this")
        return req.user

    def _check_can_write(self, req: Request, namespace: str) -> None:
        if self._user(req) != namespace:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}")

    def _repo_from_body(self, req: Request) -> tuple[Repo, dict[str, Any]]:
        """The repo named by a /api/repos/* JSON body {name, organization, type}, for a signed-in user."""
        body = req.body.json()
        repo_type, name = body.get("type") or "model", body.get("name")
        namespace = body.get("organization") or self._user(req)
        if repo_type not in ("model", "dataset"):
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        if not isinstance(name, str) or not isinstance(namespace, str) or not check_name(namespace, name):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        return self._repo_at(repo_type, namespace, name), body

    @staticmethod
    def _url(req: Request, repo: Repo) -> str:
        return f"{req.base_url}/{'datasets/' if repo.type == 'dataset' else ''}{repo.id}"

    # ---- endpoints

    def whoami(self, req: Request) -> Reply:
        self._user(req)
        return Reply.json({"type": "user", "name": req.user, "fullname": req.user, "orgs": []})

    def create_repo(self, req: Request) -> Reply:
        repo, body = self._repo_from_body(req)
        self._check_can_write(req, repo.namespace)
        with self.write_lock:
            if repo.meta() is not None:  # with exist_ok, the client reads "url" from this 409
                raise HubError(
                    409, f"You already created this {repo.type} repo", fields={"url": self._url(req, repo)}
                )
            repo.create(repo.namespace, body.get("visibility") == "private" or body.get("private") is True)
        return Reply.json({"url": self._url(req, repo), "name": repo.id})

    def delete_repo(self, req: Request) -> Reply:
        repo, _ = self._repo_from_body(req)
        with self.write_lock:
            meta = repo.meta()
            if meta is None or (meta["private"] and req.user != repo.namespace):
                raise repo_not_found()
            self._check_can_write(req, repo.namespace)
            repo.delete()
        return Reply.json({})

    def repo_info(self, req: Request) -> Reply:
        repo = self._repo(req)
        commit = repo.resolve(req.params.get("rev", "main"))
        blobs = req.flag("blobs")
        siblings = [
            {"rfilename": path, **({"size": e.size, "blobId": e.oid} if blobs else {})}
            for path, e in repo.tree(commit).items()
            if e.type == "file"
        ]
        meta = repo.meta() or {}
        return Reply.json(
            {
                "_id": repo.id,
                "id": repo.id,
                "author": repo.namespace,
                "sha": commit,
                "lastModified": repo.log(commit, limit=1)[0]["date"],
                "createdAt": meta.get("createdAt"),
                "private": meta.get("private", False),
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            }
        )

    def list_tree(self, req: Request) -> Reply:
        repo = self._repo(req)
        tree = repo.tree(repo.resolve(req.params["rev"]))
        folder = req.params.get("path", "").strip("/")
        if folder and (folder not in tree or tree[folder].type != "directory"):
            raise HubError(404, f"Folder not found: {folder}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        recursive = req.flag("recursive")
        return Reply.json(
            [
                {"type": e.type, "oid": e.oid, "size": e.size, "path": path}
                for path, e in tree.items()
                if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
            ]
        )

    def list_refs(self, req: Request) -> Reply:
        refs = self._repo(req).refs()

        def listing(prefix: str) -> list[dict[str, str]]:
            return [
                {"name": ref.removeprefix(prefix), "ref": ref, "targetCommit": sha}
                for ref, sha in sorted(refs.items())
                if ref.startswith(prefix)
            ]

        return Reply.json(
            {
                "branches": listing("refs/heads/"),
                "tags": listing("refs/tags/"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def list_commits(self, req: Request) -> Reply:
        repo = self._repo(req)
        return Reply.json(repo.log(repo.resolve(req.params["rev"])))

    def preupload(self, req: Request) -> Reply:
        """Every file is "regular" (sent inline in the commit); `oid` lets the client skip unchanged files."""
        repo = self._repo(req, write=True)
        paths = [check_path(f.get("path")) for f in req.body.json().get("files", [])]
        commit = repo.resolve(req.params["rev"])
        existing = repo.files(commit)
        return Reply.json(
            {
                "files": [
                    {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(path)}
                    for path in paths
                ],
                "commitOid": commit,
            }
        )

    def commit(self, req: Request) -> Reply:
        """An ndjson commit: a header line, then file / deletedFile / deletedFolder lines, applied in order."""
        repo = self._repo(req, write=True)
        branch = req.params["rev"]
        repo.resolve(branch)  # 404 before reading a large body for nothing
        header, operations = read_operations(req.body, repo)
        message = str(header.get("summary") or "Update")
        if header.get("description"):
            message += f"\n\n{header['description']}"
        parent = header.get("parentCommit")
        if parent is not None and not _SHORT_SHA.fullmatch(parent := str(parent).lower()):
            raise HubError(400, f"Invalid parentCommit: {parent!r}")
        with self.write_lock:
            head = repo.refs().get(f"refs/heads/{branch}")
            if head is None:
                raise revision_not_found(branch)
            if parent is not None and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = apply_operations(repo.files(head), operations)
            new = repo.make_commit(files, head, message, req.user or "")
            repo.set_ref(f"refs/heads/{branch}", new, head)
        return Reply.json(
            {
                "success": True,
                "commitOid": new,
                "commitUrl": f"{self._url(req, repo)}/commit/{new}",
                "hookOutput": "",
            }
        )

    def create_branch(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        start = repo.resolve(str(req.body.json().get("startingPoint") or "main"))
        self._create_ref(repo, "refs/heads/", req.params["branch"], start)
        return Reply.json({})

    def create_tag(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        tag = req.body.json().get("tag")
        self._create_ref(repo, "refs/tags/", tag, repo.resolve(req.params["rev"]))
        return Reply.json({})

    def _create_ref(self, repo: Repo, prefix: str, name: Any, commit: str) -> None:
        ref = f"{prefix}{name}"
        if (
            not isinstance(name, str)
            or subprocess.run(["git", "check-ref-format", ref], env=_GIT_ENV).returncode
        ):
            raise HubError(400, f"Invalid reference name: {name!r}")
        with self.write_lock:
            if ref in repo.refs():
                raise HubError(409, f"Reference already exists: {ref}")
            repo.set_ref(ref, commit, ZERO_SHA)

    def delete_ref(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        name = req.params["ref"]
        ref = f"refs/{'heads' if req.params['kind'] == 'branch' else 'tags'}/{name}"
        if ref == "refs/heads/main":
            raise HubError(403, "The default branch cannot be deleted")
        with self.write_lock:
            sha = repo.refs().get(ref)
            if sha is None:
                raise revision_not_found(name)
            repo.set_ref(ref, ZERO_SHA, sha)
        return Reply.json({})

    def resolve_file(self, req: Request) -> Reply:
        """HEAD/GET a file: its blob sha is the ETag, its commit goes in X-Repo-Commit; a Range is honoured."""
        repo = self._repo(req)
        commit = repo.resolve(req.params["rev"])
        path = req.params["path"]
        entry = repo.tree(commit).get(path)
        if entry is None or entry.type != "file":
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(
                404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit}
            )
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.oid}"',
            "X-Linked-Etag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if req.method == "HEAD":
            return Reply(200, b"", {**headers, "Content-Length": str(entry.size)})
        content = repo.blob(entry.oid)
        if not req.range or (byte_range := parse_range(req.range, len(content))) is None:
            return Reply(200, content, headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        return Reply(206, content[start:end], headers)


def read_operations(body: Body, repo: Repo) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Stream an ndjson commit body, writing each file's blob as it comes; returns (header, [(kind, path, oid)])."""
    header: dict[str, Any] | None = None
    operations = []
    while body.remaining:
        line = body.readline()
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise HubError(400, "Malformed commit payload line") from None
        if header is None:
            if key != "header" or not isinstance(value, dict):
                raise HubError(400, "The first line of a commit must be its header")
            header = value
        elif key == "file":
            path = check_path(value.get("path"))
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
            try:
                content = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, KeyError, TypeError):
                raise HubError(400, f"Invalid base64 content for {path}") from None
            operations.append(("file", path, repo.write_blob(content)))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append((key, check_path(str(value.get("path", "")).rstrip("/")), ""))
        elif key == "lfsFile":
            raise HubError(400, "LFS files are not supported here (preupload always answers 'regular')")
        else:
            raise HubError(400, f"Unknown commit operation: {key}")
    if header is None:
        raise HubError(400, "Empty commit payload")
    return header, operations


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single "bytes=" range, None to send everything; HubError 416 if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or not any(match.groups()):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), (min(int(last) + 1, size) if last else size)
    else:
        start, end = max(size - int(last), 0), size
    if start >= end:
        raise HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
    return start, end


# ----------------------------------------------------------------------------------------------------- transport


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive transport: every body is read to its end, every answer has a Content-Length."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay silent, so that dead clients free their thread
    server: HubHTTPServer

    def _serve(self) -> None:
        length = self.headers.get("Content-Length") or "0"
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not length.isdigit():
            self.close_connection = True  # the body's end is unknown: the connection cannot carry on
            self._send(HubError(411, "A request body needs a valid Content-Length").reply())
            return
        url = urlsplit(self.path)
        body = Body(self.rfile, int(length))
        req = Request(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query),
            body=body,
            base_url=f"http://{self.headers.get('Host') or self.server.server_name}",
            authorization=self.headers.get("Authorization"),
            range=self.headers.get("Range"),
        )
        try:
            reply = self.server.hub.dispatch(req)
            body.drain()
            self._send(reply)
        except (Disconnected, OSError):
            self.close_connection = True  # the client is gone; whatever it was sending was not committed

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        reply.headers.setdefault("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:  # request lines only: tokens travel in headers, never logged
            super().log_message(format, *args)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: Hub, verbose: bool) -> None:
        super().__init__(address, Handler)
        self.hub, self.verbose = hub, verbose


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A small Hub-compatible server for tests.")
    parser.add_argument("--root", type=Path, required=True, help="directory holding the repositories")
    parser.add_argument("--tokens", type=Path, required=True, help='JSON file {"token": "user", ...}')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="file to write the port to once listening")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    args.root.mkdir(parents=True, exist_ok=True)
    hub = Hub(args.root.resolve(), json.loads(args.tokens.read_text()))
    with HubHTTPServer((args.host, args.port), hub, args.verbose) as server:
        port = server.server_address[1]
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(args.port_file)  # atomic: a reader never sees a partial number
        print(port, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.serve_forever()


if __name__ == "__main__":
    main()
