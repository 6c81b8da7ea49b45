"""Atomic file writes: a temporary file in the target's directory, ``fsync``, then ``os.replace``.

A crash, a full disk or a kill at any point leaves either the previous complete file or the new complete file,
never a cut-off one; the temporary file is removed when the write fails. The new file gets the permissions a
plain ``open(path, "w")`` would give it (``0o666`` minus the umask), or those of the file it replaces --
not the ``0600`` of :func:`tempfile.mkstemp`.

Pure standard library (no torch, Lightning or W&B).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "default_mode"]


def default_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` creates)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system allows opening a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """``with atomic_open(path) as fh: fh.write(...)``: ``path`` is replaced only when the block completes.

    ``mode`` is ``"w"`` (text, ``encoding``, ``newline`` as for :func:`open`) or ``"wb"``. The parent directory
    must exist."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} must be 'w' or 'wb'")
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        try:
            perms = target.stat().st_mode & 0o7777
        except OSError:
            perms = default_mode()
        os.fchmod(fd, perms)
        text = "b" not in mode
        with os.fdopen(
            fd, mode, encoding=encoding if text else None, newline=newline if text else None
        ) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, **kwargs: Any) -> None:
    """Serialise first (a value that is not JSON leaves the old file untouched), then write atomically."""
    text = json.dumps(data, indent=indent, **kwargs) + "\n"
    atomic_write_text(path, text)
