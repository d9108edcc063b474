"""Atomic file writes: a file is replaced whole or not at all, even if the process is killed mid-write."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

_TMP_PREFIX = ".hf_lora-"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically; a small file that already holds exactly `data` is left
    alone (so re-saving an unchanged config is not a write at all).

    The temporary file lives beside the target *directory* (so a crash leaves nothing inside it, for a
    folder that is uploaded as a whole) where that is the same file system, else beside the file; it is
    fsynced before the rename, and the directory after it, so the new file survives a power cut.
    Temporary files of writers that were killed are removed on the next write.
    """
    with contextlib.suppress(OSError):
        if len(data) <= 2**20 and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    for tmp_dir in _temp_dirs(path.parent):
        _remove_stale(tmp_dir)
        try:
            prefix = f"{_TMP_PREFIX}{os.getpid()}-{path.parent.name}.{path.name}."
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=tmp_dir)
        except OSError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(path))
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno == errno.EXDEV and tmp_dir != path.parent:
                continue  # the parent is another file system: write beside the file instead
            raise
        _fsync_dir(path.parent)
        return
    raise OSError(f"cannot create a temporary file to write {path}")


def _temp_dirs(directory: Path) -> tuple[Path, ...]:
    """Where to try the temporary file: the parent of `directory` only if a rename from there can work
    (a mount point's parent is another file system: the whole file would be written there, maybe filling
    a small root file system, only for the rename to fail)."""
    with contextlib.suppress(OSError):
        if os.stat(directory.parent).st_dev == os.stat(directory).st_dev:
            return directory.parent, directory
    return (directory,)


def _mode_for(path: Path) -> int:
    """What a plain write would give: an existing file keeps its mode, a new one gets 0o666 less the umask
    (mkstemp's own 0o600 would hide files from their group; a fixed 0o644 would show private ones)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read from /proc where it can be (Linux): setting it to read it back leaves a
    moment in which another thread's new files get umask 0."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)  # the safe value for that moment
    os.umask(umask)
    return umask


def _remove_stale(directory: Path) -> None:
    """Temporary files of writers that died (their pid is in the name)."""
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f"{_TMP_PREFIX}*.tmp"):
            pid = tmp.name.removeprefix(_TMP_PREFIX).split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
