"""Lightning checkpoints written atomically and read with a clear error.

:class:`AtomicCheckpointIO` is the Trainer's checkpoint I/O plugin in every training run
(:class:`~posheads.lit.cli.PosheadsCLI`): a checkpoint is written to a temporary file beside its target,
``fsync``-ed and moved into place with ``os.replace`` (:mod:`posheads.atomic`), so a crash, a kill or a full disk
leaves the previous ``last.ckpt`` intact instead of a cut-off file. Reading a truncated or corrupt checkpoint
raises a :class:`~posheads.errors.ConfigError` naming ``ckpt_path``, the file and what to do.

:func:`check_checkpoint_file` is the cheap test made before any weights load: the file exists, is not empty and
is a complete zip archive (the format of ``torch.save``; a truncated file has no central directory).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from posheads.atomic import atomic_open
from posheads.errors import ConfigError

__all__ = ["AtomicCheckpointIO", "check_checkpoint_file"]


def _others(path: Path) -> str:
    found = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    return (
        f"other checkpoints in {path.parent}: {found}" if found else "there is no other checkpoint beside it"
    )


def check_checkpoint_file(path: str | os.PathLike, option: str = "ckpt_path") -> None:
    """Refuse a checkpoint file that cannot be read: missing, empty or not a complete zip archive."""
    p = Path(path)
    if p.is_dir():  # a sharded (distributed) checkpoint: a directory, read by the strategy
        return
    if not p.is_file():
        raise ConfigError(option, str(path), "no such checkpoint file", hint=_others(p))
    hint = (
        f"the file is truncated or corrupt (an interrupted write or a full disk); resume from another "
        f"checkpoint ({_others(p)}) or start afresh without --ckpt_path"
    )
    if p.stat().st_size == 0:
        raise ConfigError(option, str(path), "is an empty file", hint=hint)
    try:
        ok = zipfile.is_zipfile(p)
    except OSError as err:
        raise ConfigError(option, str(path), f"cannot be read ({err.strerror or err})", hint=hint) from err
    if not ok:
        raise ConfigError(
            option, str(path), "is not a complete checkpoint (no zip directory at its end)", hint=hint
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` with atomic saves and a clear error for unreadable files."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options, got {storage_options!r}"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(Path(path), *args, **kwargs)
        except FileNotFoundError as err:
            raise ConfigError(
                "ckpt_path", str(path), "no such checkpoint file", hint=_others(Path(path))
            ) from err
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ConfigError(
                "ckpt_path",
                str(path),
                f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                hint=f"the file is truncated or corrupt; resume from another checkpoint ({_others(Path(path))}) "
                "or start afresh without --ckpt_path",
            ) from err
