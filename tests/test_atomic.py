"""hf_lora.atomic: where temporary files go, which mode new files get, and the errors a write raises."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

import pytest
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

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


def test_temporary_files_are_staged_where_uploads_never_look(tmp_path, monkeypatch):
    """A Trainer checkpoint's parent is the output folder that Trainer.push_to_hub uploads (also while a
    save runs, with hub_strategy="every_save"): temporary files staged there were uploaded, partial after a
    crash. They are staged in the folder's .cache/huggingface, which huggingface_hub never uploads."""
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(Path(src)), real_replace(src, dst)))
    out = tmp_path / "out"
    out.mkdir()
    atomic_write(out / "a.json", b"{}")
    [staged] = renames
    assert staged.parent == out / atomic.STAGING_DIR
    rel = staged.relative_to(out).as_posix()
    assert not list(filter_repo_objects([rel], ignore_patterns=DEFAULT_IGNORE_PATTERNS)), "skipped by uploads"
    assert (out / "a.json").read_bytes() == b"{}"
    assert sorted(p.name for p in out.iterdir()) == ["a.json"], "the empty staging folder is removed"


def test_a_folder_we_may_not_write_raises_what_a_plain_write_would(tmp_path, monkeypatch):
    """PermissionError naming the file (it was a bare OSError, or named an internal temporary path)."""

    def mkstemp(*args, **kwargs):  # a read-only folder, for a test run as root too
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(PermissionError, match=r"Permission denied: cannot write .*out/a\.json"):
        atomic_write(tmp_path / "out" / "a.json", b"{}")


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
            staged_at_first_rename.extend(sorted(p.read_bytes() for p in tmp_path.rglob(".hf_lora-*.tmp")))
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
    staging = tmp_path / "out" / atomic.STAGING_DIR
    staging.mkdir(parents=True)
    dead_pid = 2**22 + 12345  # above any pid_max: dead here
    live_elsewhere = staging / f".hf_lora-{dead_pid}-0ther0ne-jobA.w.bin.abc.tmp"
    old_elsewhere = staging / f".hf_lora-{dead_pid}-0ther0ne-jobA.c.json.def.tmp"
    dead_here = staging / f".hf_lora-{dead_pid}-{atomic._writer_id()}-jobB.w.bin.ghi.tmp"
    for p in (live_elsewhere, old_elsewhere, dead_here):
        p.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(old_elsewhere, (day_ago, day_ago))
    atomic_write(tmp_path / "out" / "a.json", b"{}")
    assert sorted(p.name for p in staging.glob("*.tmp")) == [live_elsewhere.name]


def test_a_read_only_file_is_not_replaced(tmp_path):
    """A plain write refuses a file its owner made read-only (to keep it); a rename would not."""
    target = tmp_path / "adapter_config.json"
    target.write_bytes(b"kept")
    target.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        atomic_write_files({tmp_path / "w.bin": b"new", target: b"replaced"})
    assert target.read_bytes() == b"kept" and not (tmp_path / "w.bin").exists(), "nothing written"
