"""hf_lora.atomic: where temporary files go and which mode new files get."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from hf_lora import atomic
from hf_lora.atomic import atomic_write


def test_umask_is_read_without_setting_it(monkeypatch):
    """Setting the umask to read it back opens a window in which other threads' new files get it."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc: the umask can only be read by setting it")
    old = os.umask(0o027)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "umask", lambda *_: pytest.fail("os.umask was called"))
            assert atomic._umask() == 0o027
    finally:
        os.umask(old)


def test_temporary_file_is_written_beside_the_folder_on_the_same_file_system(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(Path(src)), real_replace(src, dst)))
    (tmp_path / "out").mkdir()
    atomic_write(tmp_path / "out" / "a.json", b"{}")
    assert [p.parent for p in renames] == [tmp_path], "outside the folder, so a crash leaves nothing in it"
    assert (tmp_path / "out" / "a.json").read_bytes() == b"{}"


def test_a_folder_that_is_a_mount_point_gets_its_temporary_file_inside(monkeypatch):
    """/dev/shm is its own file system: writing the file under /dev first would only end in EXDEV."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat("/dev").st_dev):
        pytest.skip("needs a writable /dev/shm mounted apart from /dev")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(Path(src)), real_replace(src, dst)))
    target = shm / f"hf_lora-test-{uuid.uuid4().hex}.json"
    try:
        atomic_write(target, b"[1]")
        assert target.read_bytes() == b"[1]"
    finally:
        target.unlink(missing_ok=True)
    assert [p.parent for p in renames] == [shm], "one rename, from inside the mounted folder"
