"""Atomic file writes: a file is replaced whole or not at all, even if the process is killed mid-write."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_TMP_PREFIX = ".hf_lora-"
# Temporary files are staged in this folder inside the target folder: on its file system (so the rename is
# atomic), and skipped by every huggingface_hub upload (its DEFAULT_IGNORE_PATTERNS), so neither a crash nor
# an upload running during a save (Trainer.push_to_hub, hub_strategy="every_save") ever sends one.
STAGING_DIR = Path(".cache") / "huggingface"
# Temporary files of writers on other hosts or in other pid namespaces (containers sharing a volume) are
# not judged by pid: theirs may match a live or a dead process here. They are removed only once this old.
_FOREIGN_STALE_AFTER_S = 24 * 3600


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (see `atomic_write_files`)."""
    atomic_write_files({path: data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Replace each file with its data, whole or not at all; a small file that already holds exactly its
    data is left alone (so re-saving an unchanged config is not a write at all).

    Every new file is written and fsynced before the first rename, so files saved together (an adapter's
    weights and config) change together: a crash leaves the old set or the new one, short of the instant
    between two renames. The temporary files are staged in the target folder's `STAGING_DIR`, which
    uploads skip (the parent folder is no place for them: a Trainer checkpoint's parent is the output
    folder that Trainer.push_to_hub uploads); the directories are fsynced after the renames, so the new
    files survive a power cut. Temporary files of writers that were killed are removed on the next write.
    """
    todo = {path: data for path, data in files.items() if not _holds(path, data)}
    for path in todo:  # a rename would replace a read-only file, which a plain write refuses
        with contextlib.suppress(FileNotFoundError):
            if not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise PermissionError(
                    errno.EACCES,
                    f"{path} is read-only; make it writable (chmod u+w) to replace it",
                    str(path),
                )
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in todo.items():
            staged.append((_stage(path, data, _temp_dirs(path.parent)), path))
        for i, (tmp, path) in enumerate(staged):
            try:
                os.replace(tmp, path)
            except OSError as e:
                if e.errno != errno.EXDEV or Path(tmp).parent == path.parent:
                    raise
                # the parent is another file system after all (a bind mount): write beside the file
                os.unlink(tmp)
                staged[i] = (tmp := _stage(path, todo[path], (path.parent,)), path)
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:  # those not renamed yet
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for directory in dict.fromkeys(path.parent for path in todo):
            _remove_empty_staging(directory)
        raise
    for directory in dict.fromkeys(path.parent for path in todo):
        _fsync_dir(directory)
        _remove_empty_staging(directory)


@contextlib.contextmanager
def folder_lock(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (flock on the folder itself: no lock file is left behind), so
    that the files one writer saves there together (an adapter's weights, config and card) are not mixed
    with another process's saving into the same folder at the same time. `shared=True` is a reader's lock:
    readers go together, but not while a writer holds it, so they see one whole save. Where flock is missing
    (Windows) or the file system refuses it, writers are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holds(path: Path, data: bytes) -> bool:
    with contextlib.suppress(OSError):
        return len(data) <= 2**20 and path.stat().st_size == len(data) and path.read_bytes() == data
    return False


def _stage(path: Path, data: bytes, tmp_dirs: tuple[Path, ...]) -> str:
    """A fsynced temporary file holding `data`, with the mode `path` should get, in the first of tmp_dirs
    where one can be made."""
    error: OSError | None = None
    for tmp_dir in tmp_dirs:
        _remove_stale(tmp_dir)
        try:
            prefix = f"{_TMP_PREFIX}{writer_tag()}{path.parent.name}.{path.name}."
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=tmp_dir)
        except OSError as e:
            error = e
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp
    # The error a plain write would raise (PermissionError for a read-only folder), naming the target.
    code = error.errno if error is not None else errno.EIO
    raise OSError(code, f"{os.strerror(code)}: cannot write {path}", str(path))


def _temp_dirs(directory: Path) -> tuple[Path, ...]:
    """Where to try the temporary file: the folder's STAGING_DIR, else the folder itself."""
    staging = directory / STAGING_DIR
    with contextlib.suppress(OSError):
        staging.parent.mkdir(exist_ok=True)  # not parents=True: a missing folder stays an error
        staging.mkdir(exist_ok=True)
        return staging, directory
    return (directory,)


def _remove_empty_staging(directory: Path) -> None:
    """Leave no empty `.cache/huggingface` behind (one that holds anything else stays)."""
    with contextlib.suppress(OSError):
        (directory / STAGING_DIR).rmdir()
        (directory / STAGING_DIR.parent).rmdir()


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


@functools.cache
def _writer_id() -> str:
    """This host and pid namespace, so that a pid in a temporary file's name is only judged where it means
    the same process."""
    with contextlib.suppress(OSError):
        namespace = os.stat("/proc/self/ns/pid").st_ino
        return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag() -> str:
    """`<pid>-<writer id>-`: what the names of this process's temporary files and folders start with
    (after their own prefix), for `left_by_dead_writer` to judge."""
    return f"{os.getpid()}-{_writer_id()}-"


def left_by_dead_writer(path: Path, tagged_name: str) -> bool:
    """Whether the temporary file or folder `path`, whose name (without its prefix) `tagged_name` starts
    with a `writer_tag()`, was left by a writer that died: here, by the pid; elsewhere, by age."""
    pid, writer, *_ = [*tagged_name.split("-", 2), "", ""]
    if writer == _writer_id():
        return pid.isdigit() and not pid_alive(int(pid))
    return time.time() - path.stat().st_mtime > _FOREIGN_STALE_AFTER_S


def _remove_stale(directory: Path) -> None:
    """Temporary files of writers that died."""
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f"{_TMP_PREFIX}*.tmp"):
            if left_by_dead_writer(tmp, tmp.name.removeprefix(_TMP_PREFIX)):
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
