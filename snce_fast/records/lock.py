"""An advisory lock on an output path, so that two runs writing the same result never both succeed.

`output_lock(path)` takes an exclusive `fcntl.flock` on a lock file beside `path` (a file or a
directory, existing or not): `<parent>/.<name>.snce_fast.lock`, the same name for both kinds and
whether or not `path` exists yet, so two processes always meet on one file. A second holder fails at
once with `OutputLockedError` ("another snce-fast run is writing <path> (pid N)"), never waits. The
lock file holds the holder's pid and is removed on release; parent directories the lock had to
create are removed again when they are still empty, so a run that fails leaves nothing behind.

The lock is advisory: it keeps snce-fast runs (and library code that takes it) apart, not other
programs. Without `fcntl` (Windows) it is a no-op."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".snce_fast.lock"

__all__ = ["LOCK_SUFFIX", "OutputLockedError", "lock_path", "output_lock"]


class OutputLockedError(BlockingIOError):
    """Another process (or another open lock in this one) holds the lock on an output path."""


def lock_path(path: Union[str, os.PathLike]) -> Path:
    """The lock file of output `path`: `.<name>.snce_fast.lock` in its (resolved) parent directory."""
    target = Path(path).resolve()
    if target.parent == target:  # the root directory has no parent to hold the lock file
        return target / LOCK_SUFFIX
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _missing_dirs(directory: Path) -> list[Path]:
    """The directories from `directory` up that do not exist yet, innermost first."""
    out = []
    while not directory.exists() and directory != directory.parent:
        out.append(directory)
        directory = directory.parent
    return out


def _make_dir(directory: Path, path: Union[str, os.PathLike]) -> None:
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _acquire(lock: Path, path: Union[str, os.PathLike]) -> int:
    """Open, lock and stamp `lock`; retry when its previous holder removed it between our open and our
    flock (we would then hold a lock on a file nobody else can find)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise type(e)(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLockedError(f"another snce-fast run is writing {path} ({holder})") from None
        except OSError:  # a file system without flock: run unlocked rather than refuse
            return fd
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: Union[str, os.PathLike]) -> Iterator[Optional[Path]]:
    """Hold the advisory lock on output `path` (a file or a directory) for the block; yields the lock
    file (None without fcntl). Raises `OutputLockedError` (a BlockingIOError) at once when another run
    holds it, and an OSError naming `path` when its directory cannot be written."""
    if fcntl is None:  # pragma: no cover - Windows
        yield None
        return
    lock = lock_path(path)
    created = _missing_dirs(lock.parent)
    try:
        _make_dir(lock.parent, path)
        fd = _acquire(lock, path)
        try:
            yield lock
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()  # while still held: a run that opened this file meanwhile sees it gone and retries
            os.close(fd)
    finally:
        for d in created:  # innermost first; only the ones still empty go
            with contextlib.suppress(OSError):
                d.rmdir()
