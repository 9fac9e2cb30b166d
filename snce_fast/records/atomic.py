"""Atomic file writes: a temp file in the target's directory, fsynced, given the mode a plain
`open()` would give (mkstemp's 0600 otherwise leaks into the result), then renamed over the target.
A crash leaves either the old file or the new one, never half of one.

JSON is written strictly (no NaN / Infinity, which are not JSON): a non-finite number is refused
with a ValueError naming its key path. `check_writable_dir` tells, before any long work, whether
a result directory can be written at all."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask is process-wide, and flipping it later would race with other threads
_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to `path`; when the block succeeds, fsync it and rename it to `path`
    (then fsync the directory); when it raises, remove the temp file. `suffix` keeps an extension
    for writers that look at it (e.g. ".png")."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _nonfinite(obj: Any, where: str = "") -> Optional[str]:
    """The key path of the first NaN / inf float in `obj` (dicts, lists, tuples) and what it is,
    e.g. "history[3].fvu is NaN"; None when every number is finite."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'} is {'NaN' if math.isnan(obj) else repr(obj)}"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _nonfinite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _nonfinite(value, f"{where}[{i}]")
            if found:
                return found
    return None


def json_text(obj: Any, indent: Optional[int] = 2, sort_keys: bool = False) -> str:
    """`obj` as strict JSON (indent 2, trailing newline). A NaN or infinite number raises a
    ValueError naming its key path ("fvu is NaN"): JSON has no such numbers, and a result file
    holding one would be read back wrongly (or not at all) by strict parsers."""
    bad = _nonfinite(obj)
    if bad:
        raise ValueError(f"cannot write JSON: {bad} (only finite numbers are valid JSON)")
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as strict JSON (see `json_text`; a non-finite number raises ValueError and
    leaves `path` untouched)."""
    atomic_write_text(path, json_text(obj))


def check_writable_dir(path: PathLike) -> Path:
    """Check, before any long work, that files can be written into the directory `path`: create it
    (and missing parents) when needed, write and remove a probe file, then remove again the
    directories this check created, so that a run failing later leaves nothing behind. Raises a
    ValueError naming the path when it cannot be created or written."""
    target = Path(path)
    created: list[Path] = []
    p = target
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".snce-write-probe.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"{str(path)!r} is not a writable directory ({reason})") from None
    finally:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
    return target


def atomic_save_image(image: Any, path: PathLike) -> None:
    """Save a PIL image (or a matplotlib figure) as PNG via a temp file + rename."""
    with atomic_path(path, suffix=".png") as tmp:
        if hasattr(image, "savefig"):
            image.savefig(tmp)
        else:
            image.save(tmp)
