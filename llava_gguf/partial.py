"""Partial files: what a writer fills before renaming it into place, and the sweeping of those a
writer that died (``kill -9``, a power cut) left behind.

The partial file of ``dir/name`` is ``dir/.name.<pid>.partial``. Its writer holds an exclusive
``flock`` on it from creation until it is renamed into place or removed, so a sweeper that can take
the lock knows that no live writer is filling it. A partial file is stale, and swept, when its lock
is free and either its pid is gone or it is older than ``PID_REUSE_AGE_S`` (its pid now names
another process). Where locks cannot tell (no ``fcntl``, a file system without ``flock``), only the
pid does: stale when it is gone (on Windows, which has no harmless pid test, nothing is swept).

Other programs (gguf's writer, llama.cpp's quantizer) may open the partial file by its path and
write it: they truncate the same inode, so the lock holds. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".partial"
PID_REUSE_AGE_S = 600.0  # a free lock on a younger file of a live pid: its writer is about to take it
_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial$")


@dataclass(frozen=True)
class PartialFile:
    """A partial file being written: its path, and the open (read and write) file holding its lock."""

    path: Path
    file: BinaryIO


@dataclass(frozen=True)
class Usage:
    files: int = 0
    bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.files + other.files, self.bytes + other.bytes)


def partial_path(final: Path, pid: int | None = None) -> Path:
    """The partial file of ``final`` for the process ``pid`` (default: this one)."""
    return final.with_name(f".{final.name}.{os.getpid() if pid is None else pid}{SUFFIX}")


def writer_pid(path: Path) -> int | None:
    """The pid in a partial file's name, or None when ``path`` is not named as a partial file."""
    match = _NAME.match(path.name)
    return int(match["pid"]) if match else None


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def open_partial(final: Path) -> Iterator[PartialFile]:
    """A new, empty partial file beside ``final``, locked while the block runs; removed at its end
    unless the block renamed it (``commit``)."""
    path = partial_path(final)
    file = _create(path)
    try:
        _lock(file.fileno())
        yield PartialFile(path, file)
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # removed before the lock is released: never seen unlocked
        file.close()


def _lock(fd: int) -> None:
    """Hold ``fd``'s exclusive lock (waiting only while a sweeper looks at it); on a file system
    without locks, go on unlocked: sweepers then judge by the pid alone."""
    if fcntl is None:
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


def _create(path: Path) -> BinaryIO:
    """Create ``path`` (for reading and writing); an unlocked file already there is the leftover of a
    dead process that had this pid, replaced; a locked one is another thread's, an error."""
    try:
        return open(path, "x+b")  # noqa: SIM115  closed by open_partial, after the file is gone
    except FileExistsError:
        if fcntl is not None:
            with open(path, "rb") as existing:
                try:
                    fcntl.flock(existing.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise FileExistsError(errno.EEXIST, "another thread is writing it", str(path)) from None
        path.unlink(missing_ok=True)
        return open(path, "x+b")  # noqa: SIM115


def commit(partial: PartialFile, final: Path) -> None:
    """Flush ``partial`` and rename it to ``final`` (atomically replacing what was there)."""
    partial.file.flush()
    os.replace(partial.path, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[PartialFile]:
    """A partial file that becomes ``final`` when the block succeeds; removed when it fails."""
    with open_partial(final) as partial:
        yield partial
        commit(partial, final)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    with atomic_file(path) as partial:
        partial.file.write(data)


# ---------------------------------------------------------------- sweeping


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill would signal it; without a cheap test, never call a writer dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _stale_unlocked(pid: int, fd: int) -> bool:
    """Whether a partial file whose lock is free (we hold it) was left by a writer that is gone."""
    if not _pid_alive(pid):
        return True
    try:
        return time.time() - os.fstat(fd).st_mtime > PID_REUSE_AGE_S
    except OSError:
        return False


@contextlib.contextmanager
def _locked_if_stale(path: Path) -> Iterator[int | None]:
    """Inside the block, the size of ``path`` when it is a stale partial file (its lock held by us
    meanwhile, so no writer takes it), else None."""
    pid = writer_pid(path)
    if pid is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone, or not ours to read
        yield None
        return
    try:
        locked = _try_lock(fd)
        if locked is None:  # a live writer holds it
            yield None
            return
        stale = _stale_unlocked(pid, fd) if locked else not _pid_alive(pid)
        yield os.fstat(fd).st_size if stale and _same_file(path, fd) else None
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool | None:
    """Take ``fd``'s lock if it is free: True; None when a writer holds it; False when locks cannot
    tell (no fcntl, or a file system without them)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError:
        return False
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except OSError:
        return False


def _partials(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.glob(f".*{SUFFIX}") if writer_pid(p) is not None]
    except OSError:
        return []


def is_stale(path: Path) -> bool:
    """Whether ``path`` is a partial file whose writer is gone."""
    with _locked_if_stale(path) as size:
        return size is not None


def sweep(directory: Path) -> Usage:
    """Remove the stale partial files directly in ``directory``; what was removed."""
    removed = Usage()
    for path in _partials(directory):
        with _locked_if_stale(path) as size:
            if size is None:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            removed += Usage(1, size)
    return removed


_swept: set[str] = set()


def sweep_once(directory: Path) -> Usage:
    """``sweep(directory)`` the first time a process writes there; nothing the next times."""
    key = os.path.abspath(directory)
    if key in _swept:
        return Usage()
    _swept.add(key)
    return sweep(directory)


def _directories(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield root
        for current, dirs, _ in os.walk(root):
            for name in dirs:
                yield Path(current) / name


def sweep_tree(root: Path) -> Usage:
    """Remove the stale partial files anywhere under ``root``; what was removed."""
    removed = Usage()
    for directory in _directories(root):
        removed += sweep(directory)
    return removed


def stale_usage(root: Path) -> Usage:
    """The stale partial files anywhere under ``root``: how many, how many bytes (nothing removed)."""
    found = Usage()
    for directory in _directories(root):
        for path in _partials(directory):
            with _locked_if_stale(path) as size:
                if size is not None:
                    found += Usage(1, size)
    return found
