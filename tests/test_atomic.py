"""hf_lora.atomic: where temporary files go and which mode new files get."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from hf_lora import atomic
from hf_lora.atomic import atomic_write, atomic_write_files


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


def test_files_saved_together_are_all_written_before_the_first_rename(tmp_path, monkeypatch):
    """An adapter's weights and config change together: a crash after the weights' rename must not find
    the new config still unwritten (new weights beside an old lora_alpha load silently wrong)."""
    out = tmp_path / "out"
    out.mkdir()
    atomic_write_files({out / "w.bin": b"old weights", out / "c.json": b"old config"})
    staged_at_first_rename = []
    real_replace = os.replace

    def replace(src, dst):
        if not staged_at_first_rename:
            staged_at_first_rename.extend(sorted(p.read_bytes() for p in tmp_path.glob(".hf_lora-*.tmp")))
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_files({out / "w.bin": b"new weights", out / "c.json": b"new config"})
    assert staged_at_first_rename == [b"new config", b"new weights"]
    assert (out / "w.bin").read_bytes() == b"old weights" and (out / "c.json").read_bytes() == b"old config"
    assert not list(tmp_path.rglob("*.tmp")), "the staged files are removed"


def test_temporary_files_of_other_hosts_are_not_judged_by_pid(tmp_path):
    """A writer in another container sharing the volume has a pid that means nothing here: its file in
    progress must survive our cleanup (it did, and that save then failed); an old one is removed."""
    (tmp_path / "out").mkdir()
    dead_pid = 2**22 + 12345  # above any pid_max: dead here
    live_elsewhere = tmp_path / f".hf_lora-{dead_pid}-0ther0ne-jobA.w.bin.abc.tmp"
    old_elsewhere = tmp_path / f".hf_lora-{dead_pid}-0ther0ne-jobA.c.json.def.tmp"
    dead_here = tmp_path / f".hf_lora-{dead_pid}-{atomic._writer_id()}-jobB.w.bin.ghi.tmp"
    for p in (live_elsewhere, old_elsewhere, dead_here):
        p.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(old_elsewhere, (day_ago, day_ago))
    atomic_write(tmp_path / "out" / "a.json", b"{}")
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == [live_elsewhere.name]
