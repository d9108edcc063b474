"""pytest fixtures running tests/hub_server.py, a local Hub, so that push/pull code meets the real huggingface_hub.

huggingface_hub (and transformers through it) reads HF_ENDPOINT and HF_HOME once, at import time. So the port is
chosen, and the environment set, before anything imports them; the server starts on that port the first time a
test asks for `hub_server`. Wire it into tests/conftest.py, above any import of huggingface_hub, transformers,
peft or hf_lora:

    sys.path.insert(0, str(Path(__file__).parent))  # makes `hub_fixtures` importable whatever the import mode
    from hub_fixtures import reserve_hub_endpoint
    reserve_hub_endpoint()

    from hub_fixtures import *  # noqa: E402, F403  (the fixtures `hub_server` and `hub_repo_id`)

After that, `hf_hub_download(repo_id, filename)` with no `endpoint=` reaches the local server. Without
`reserve_hub_endpoint()` the fixtures still work, on a free port: pass `endpoint=hub_server.endpoint` explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["HubServer", "StallingProxy", "hub_repo_id", "hub_server", "reserve_hub_endpoint"]

SERVER_SCRIPT = Path(__file__).with_name("hub_server.py")
USERS = {"alice": "hf_alice_secret_token", "bob": "hf_bob_secret_token"}
_reserved_port: int | None = None


def _free_port() -> int:
    """A free port below the usual ephemeral ranges, so that outgoing connections do not take it meanwhile."""
    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found for the local Hub")


def reserve_hub_endpoint() -> str:
    """Point huggingface_hub at the local Hub to come: call before huggingface_hub is first imported.

    Sets HF_ENDPOINT to http://127.0.0.1:<free port>, HF_HOME to a fresh temp dir (an empty cache, no stored
    token), turns telemetry, implicit tokens and Xet off, and drops HF_TOKEN-like variables. Returns the endpoint.
    """
    global _reserved_port
    if _reserved_port is None:
        if "huggingface_hub" in sys.modules:
            raise RuntimeError("reserve_hub_endpoint() must run before huggingface_hub is imported")
        _reserved_port = _free_port()
        hf_home = tempfile.mkdtemp(prefix="hf_home_")
        atexit.register(shutil.rmtree, hf_home, ignore_errors=True)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            os.environ.pop(name, None)
        os.environ.update(
            HF_ENDPOINT=f"http://127.0.0.1:{_reserved_port}",
            HF_HOME=hf_home,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            HF_HUB_DISABLE_XET="1",  # with hf_xet installed, upload_folder would split into several commits
        )
    return f"http://127.0.0.1:{_reserved_port}"


@dataclass(frozen=True)
class HubServer:
    """A running local Hub: its endpoint, users' tokens ({user: token}), storage root, process id, and the log
    file that receives the server's stderr (tracebacks of its internal errors)."""

    endpoint: str
    tokens: dict[str, str]
    root: Path
    pid: int
    log: Path

    def api(self, user: str | None = None) -> HfApi:
        """An HfApi on this Hub, signed in as `user` (anonymous if None)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.tokens[user] if user else False)

    def git_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """The bare git repository behind a repo, for checks below the HTTP API."""
        return self.root / f"{repo_type}s" / f"{repo_id}.git"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The local Hub, started once per session (on the reserved port, if any) and stopped by PID at the end."""
    config = tmp_path_factory.mktemp("hub_config")
    root = tmp_path_factory.mktemp("hub_root")
    tokens_file, port_file, log_file = config / "tokens.json", config / "port", config / "server.log"
    tokens_file.write_text(json.dumps({token: user for user, token in USERS.items()}))
    command = [sys.executable, str(SERVER_SCRIPT), "--root", str(root), "--tokens", str(tokens_file)]
    command += ["--port", str(_reserved_port or 0), "--port-file", str(port_file)]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Hub did not start:\n{log_file.read_text()}")
            time.sleep(0.02)
        yield HubServer(f"http://127.0.0.1:{port_file.read_text()}", dict(USERS), root, process.pid, log_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def hub_repo_id() -> str:
    """A repo id that no other test uses, in alice's namespace (the repo is not created)."""
    return f"alice/test-{uuid.uuid4().hex[:8]}"


class StallingProxy:
    """A TCP relay to the Hub that passes only the first `stall_after` bytes of a commit request, then holds the
    rest: a real client can be killed at a known point in the middle of its upload."""

    def __init__(self, upstream_port: int, stall_after: int) -> None:
        self.upstream_port, self.stall_after = upstream_port, stall_after
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets = [self._listener]
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            threading.Thread(target=self._relay, args=(server, client, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(client, server, True), daemon=True).start()

    def _relay(self, source: socket.socket, target: socket.socket, stall: bool) -> None:
        seen, limit = bytearray(), None
        with contextlib.suppress(OSError):  # a closed connection ends the relay
            while data := source.recv(1 << 16):
                if stall:
                    seen += data
                    if limit is None and (start := seen.find(b"/commit/")) >= 0:
                        limit = start + self.stall_after
                    if limit is not None and len(seen) >= limit:
                        target.sendall(data[: len(data) - (len(seen) - limit)])
                        self.stalled.set()
                        return
                target.sendall(data)

    def close(self) -> None:
        """Close every connection, as the death of the client would."""
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
