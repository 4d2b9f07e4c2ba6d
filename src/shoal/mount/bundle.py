"""Profile bundles for mounts (docs/spec/bundle.md): made by ``shoal profile``, served by a lazy mount.

- ``build`` makes the bundle of a recording (``Recording``: the directories the workload listed, the
  files and chunks it read) from the image's index and verified chunks.
- ``check`` opens a bundle blob against the manifest's root (``format.bundle.open_bundle``): a bundle
  that fails is logged and ignored whole, never served.
- ``BundleSource`` wraps a mount's frame source: the Reader takes the bundle's chunks from it
  (``held_chunk``, hashed against the index like every chunk), batch fetches and prefetch leave out
  frames holding one of them, and read-ahead frames holding any chunk of a file the bundle lists.
- Locally a bundle is ``STORE/profiles/<manifest hex>.bundle`` beside the profile (``save_local``,
  ``load_local``); in a registry it is a layer of the profile artifact (``mount/profile.py``).

This module imports nothing of the mount's upper layers (``remote`` and ``record`` use it).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from shoal.atomicfile import Durability, write_atomic
from shoal.errors import FormatError, ShoalError
from shoal.format import bundle as fb
from shoal.format.model import Index
from shoal.mount.profile import Recording, local_path
from shoal.reader import ForwardingSource, FrameSource, Reader

__all__ = ["BundleSource", "BundleStats", "build", "check", "save_local", "load_local", "bundle_path",
           "frames_holding"]

log = logging.getLogger(__name__)


def build(index: Index, rec: Recording, source: FrameSource) -> bytes:
    """The bundle of ``rec`` on ``index``, its chunks read (and verified) through ``source``."""
    reader = Reader(index, source)
    return fb.make(index, rec.dirs, rec.files, rec.chunks, lambda ci: bytes(reader.chunk(ci)))


def check(blob: bytes, root: str, image: str) -> fb.Bundle | None:
    """``blob`` checked against the root ``root`` (``sha256:<hex>``, the manifest's), or None (logged)."""
    try:
        if not root.startswith("sha256:") or len(root) != 71:
            raise FormatError(f"invalid root {root[:80]!r}")
        b = fb.open_bundle(blob, bytes.fromhex(root[7:]))
    except (ShoalError, ValueError) as exc:
        log.warning("ignoring the profile bundle of %s: %s", image, exc)
        return None
    log.info("profile bundle of %s: %d bytes, %d directories, %d files, %d chunks (%d bytes) checked", image,
             b.size, len(b.dirs), len(b.files), len(b.chunks), b.data_bytes)
    return b


def bundle_path(store_root: str | os.PathLike[str], image: str) -> Path:
    return local_path(store_root, image).with_suffix(".bundle")


def save_local(store_root: str | os.PathLike[str], image: str, blob: bytes) -> Path:
    p = bundle_path(store_root, image)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, blob, durability=Durability.FILE, mode=0o600)
    return p


def load_local(store_root: str | os.PathLike[str], image: str) -> bytes | None:
    p = bundle_path(store_root, image)
    try:
        if p.stat().st_size > fb.LIMITS.blob:
            log.warning("ignoring the profile bundle %s: larger than %d bytes", p, fb.LIMITS.blob)
            return None
        return p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the profile bundle %s: %s", p, exc.strerror)
        return None


@dataclass
class BundleStats:
    """Counters of a bundle in a mount (logged when the mount stops)."""

    bundle_bytes: int = 0  # the blob
    bundle_chunks: int = 0  # chunks it holds
    bundle_chunks_used: int = 0  # distinct chunks the Reader asked it for (to plan a read or to serve it)
    frames_skipped: int = 0  # frames left out of batch fetches, read-ahead and prefetch


class BundleSource(ForwardingSource):
    """``inner`` plus a checked bundle's chunks (bundle.md §6)."""

    def __init__(self, inner: FrameSource, index: Index, bundle: fb.Bundle) -> None:
        super().__init__(inner)
        self._chunks = bundle.chunks
        self._held_frames = frozenset(frames_holding(index, bundle))
        # frames of the files the workload read: the bundle says which of their bytes it reads, so
        # read-ahead there would fetch what the profile saw go unread
        ids = {cid for f in bundle.files for cid in f.ids}
        self._file_frames = frozenset(index.chunk_frames[ci] for ci, cid in enumerate(index.chunk_ids) if cid in ids)
        self._served: set[bytes] = set()
        self._lock = threading.Lock()
        self.bundle = BundleStats(bundle.size, len(bundle.chunks))

    def held_chunk(self, cid: bytes) -> bytes | None:
        data = self._chunks.get(cid)
        if data is not None and cid not in self._served:
            with self._lock:
                self._served.add(cid)
                self.bundle.bundle_chunks_used = len(self._served)
        return data

    def _without(self, frames: list[int], skip: frozenset[int] | None = None) -> list[int]:
        skip = self._held_frames if skip is None else skip
        keep = [f for f in frames if f not in skip]
        if len(keep) != len(frames):
            with self._lock:
                self.bundle.frames_skipped += len(frames) - len(keep)
        return keep

    def ensure(self, frames: list[int]) -> None:
        keep = self._without(frames)
        if keep:
            self.inner.ensure(keep)

    def readahead(self, frames: list[int]) -> None:
        keep = self._without(frames, self._file_frames)
        if keep:
            self.inner.readahead(keep)

    def prefetch(self, frames: list[int]) -> int | None:
        return self.inner.prefetch(self._without(frames))

    def close(self) -> None:
        b = self.bundle
        log.info("profile bundle: %d of its %d chunks used, %d frames not fetched ahead for it",
                 b.bundle_chunks_used, b.bundle_chunks, b.frames_skipped)
        self.inner.close()


def frames_holding(index: Index, bundle: fb.Bundle) -> set[int]:
    """The frames of ``index`` holding a chunk of ``bundle``."""
    chunks = bundle.chunks
    return {index.chunk_frames[ci] for ci, cid in enumerate(index.chunk_ids) if cid in chunks}

