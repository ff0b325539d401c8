"""Atomic writes: a file is written to a temporary file beside it, fsynced and renamed over it,
so a kill at any moment leaves either the old file or the new one whole; a failed write (a full
disk, a read-only folder) is one line (`WriteFailed`) and leaves no temporary file."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from localearn.errors import UserError


class WriteFailed(UserError):
    """A file could not be written (its temporary file was removed; the old file is intact)."""

    def __init__(self, message: str, path: Path, no_space: bool) -> None:
        super().__init__(message)
        self.path, self.no_space = path, no_space


def _os_error(exc: BaseException) -> OSError | None:
    """The `OSError` behind ``exc`` (itself, or one it was raised from or during)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _no_space(path: Path, os_err: OSError | None) -> bool:
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # torch reports a failed write without its errno: look at the disk
        return os_err is None and shutil.disk_usage(mount_point(path)).free < 2**20
    except OSError:
        return False


def write_failed(path: Path, exc: BaseException) -> WriteFailed:
    """A one-line `WriteFailed` for a failed write of ``path``."""
    os_err = _os_error(exc)
    if _no_space(path, os_err):
        return WriteFailed(f"no space left on the device {mount_point(path)} while writing "
                           f"{path}", path, True)
    if os_err is not None:
        why = os_problem(Path(path).parent, os_err)
    else:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WriteFailed(f"could not write {path}: {why}", path, False)


def _atomic(path: Path, write: Any) -> None:
    """``write(f)`` to a temporary file beside ``path``, fsync, rename over ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            raise write_failed(path, exc) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file, fsync it, then rename over ``path``;
    a failed write (a full disk...) is a `WriteFailed` and leaves no temporary file."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    _atomic(path, lambda f: f.write(data))


def atomic_copy(src: Path, path: Path) -> None:
    """Copy ``src`` to ``path`` through a temporary file, as the other atomic writes."""
    with open(src, "rb") as source:
        _atomic(path, lambda f: shutil.copyfileobj(source, f, 1 << 20))



def short_path(path: Path, n: int = 120) -> str:
    text = str(path)
    return text if len(text) <= n else f"{text[:n // 2]}...{text[-n // 2:]}"


def os_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be used as an output folder, in words."""
    if exc.errno == errno.ENAMETOOLONG:
        return "its name is too long (at most 255 bytes a name)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        p = Path(os.path.abspath(path))
        for parent in [p, *p.parents]:
            try:
                if parent.exists() and not parent.is_dir():
                    return f"{short_path(parent)} is a file, not a folder"
            except OSError:
                continue
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "it is not writable (permission denied)"
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device {mount_point(path)}"
    return exc.strerror or type(exc).__name__

