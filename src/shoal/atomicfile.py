"""Replace a small file atomically, with an explicit durability (a leaf: imports nothing of shoal).

Every whole-file write that must never leave a torn file goes through ``write_atomic``: a temp file
beside the target (``.NAME.<random>.tmp``), then ``rename``.  What survives a crash is the caller's
choice, spelled out at each call site:

- ``Durability.PROCESS``: rename only.  A crash of the process leaves the old or the new file; a
  crash of the machine may leave either, or an empty one (run-time state under /run, hand-over files).
- ``Durability.FILE``: the data is fsynced before the rename (the new name never shows unsynced bytes).
- ``Durability.FULL``: FILE, and the directory is fsynced after the rename, so the new name itself
  survives a power cut (store and OCI layout metadata).

Blobs are streamed, verified and published by their own writers (store/layout.py, the transports):
their temp file only becomes visible once its digest matches, which ``write_atomic`` does not model.
"""

from __future__ import annotations

import contextlib
import enum
import os
import tempfile
from pathlib import Path

__all__ = ["Durability", "write_atomic", "fsync_dir"]


class Durability(enum.Enum):
    PROCESS = "process"
    FILE = "file"
    FULL = "full"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, durability: Durability, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``); raises OSError, leaving no temp file behind."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if durability is not Durability.PROCESS:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durability is Durability.FULL:
        fsync_dir(target.parent)
