"""Partially present packs: frames fetched by range reads, kept at their pack offsets (docs/spec/store.md §3).

A pull or a lazy mount fetches only the frames holding chunks the store lacks.
Those frames are written into ``partial/<hex>``, a sparse file laid out like
the pack itself, and recorded in the catalogue's ``frames`` table once
durable.  Callers verify every chunk of a frame before ``put_frame``.  When
every byte of a pack is present and the file hashes to the pack's digest, the
file is promoted to ``blobs/sha256/``.

A frame's bytes are only verified against the chunk ids of the index that
claimed them, not against the pack (its digest needs every byte), so two
images may claim different bytes for one range of one pack.  The first
verified frame keeps the range: ``put_frame`` never writes over bytes a
recorded frame covers, and refuses a differing claim with ``FrameConflict``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path

from shoal import digest as dg
from shoal.errors import FrameConflict, IntegrityError, NotFound, ShoalError, StoreError, from_oserror
from shoal.store import forkgate
from shoal.store.catalog import Catalog
from shoal.store.layout import Layout, pread_file, store_io

__all__ = ["PartialPacks"]

log = logging.getLogger(__name__)


class PartialPacks:
    def __init__(self, layout: Layout, catalog: Catalog) -> None:
        self.layout = layout
        self.catalog = catalog
        self.dir = layout.root / "partial"
        with store_io("cannot initialise the store"):
            self.dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()

    def path(self, pack: str) -> Path:
        return self.dir / dg.hex_of(pack)

    def has_frame(self, pack: str, offset: int) -> bool:
        return self.catalog.has_frame(pack, offset)

    def put_frame(self, pack: str, offset: int, data: bytes) -> None:
        """Record a verified frame of ``pack`` at ``offset`` (durable before it is recorded).

        The same frame again is a no-op; bytes that differ from, or overlap, a recorded frame are
        refused with ``FrameConflict`` and nothing is written.  An flock on the partial file makes the
        check and the write one step across processes."""
        p = self.path(pack)
        with forkgate.held():  # a child forked meanwhile would keep the flock for its whole life
            try:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise from_oserror(exc, f"cannot write partial pack {pack}", p, store=True) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                overlap = self.catalog.frames_overlapping(pack, offset, len(data))
                if overlap:
                    if overlap == [(offset, len(data))] and os.pread(fd, len(data), offset) == data:
                        return
                    raise FrameConflict(f"pack {pack}: bytes {offset}+{len(data)} differ from a verified frame "
                                        "another image stored there; not overwritten")
                os.pwrite(fd, data, offset)
                os.fdatasync(fd)
                self.catalog.add_frame(pack, offset, len(data))
            except OSError as exc:
                raise from_oserror(exc, f"cannot write partial pack {pack}", p, store=True) from None
            finally:
                os.close(fd)

    def read(self, pack: str, offset: int, length: int) -> bytes:
        if not self.catalog.has_frame(pack, offset):
            raise NotFound(f"frame {pack}@{offset} is not in the store")
        data = pread_file(self.path(pack), offset, length, f"frame {pack}@{offset}")
        if len(data) != length:
            raise NotFound(f"frame {pack}@{offset} is truncated in the store")
        return data

    def present(self, pack: str) -> int:
        return self.catalog.frame_bytes(pack)

    def try_promote(self, pack: str, size: int) -> bool:
        """If every byte of ``pack`` is present and verifies, make it a complete blob."""
        if self.layout.has(pack):
            self.supersede(pack)
            return True
        if self.catalog.frame_bytes(pack) != size:
            return self.layout.has(pack)
        p = self.path(pack)
        try:
            # another process may promote the same pack at the same time, and unlink this file once
            # it has: an open descriptor still reads it whole, a missing file means it is done
            with self._lock, open(p, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    raise IntegrityError(f"partial pack {pack} has the wrong size")
                self.layout.put_stream(f, pack, size)  # verifies the digest before it becomes visible
        except FileNotFoundError:
            return self.layout.has(pack)
        except IntegrityError:
            log.warning("partial pack %s is complete but does not verify; keeping frames only", pack)
            return False
        self.drop(pack)
        return True

    def supersede(self, pack: str) -> None:
        """The complete blob of ``pack`` is now in the store: drop the partial file, and the catalogue
        rows of any frame whose bytes differ from the blob's (they were some other image's claim)."""
        p = self.path(pack)
        for off, clen in self.catalog.frames_overlapping(pack, 0, 1 << 62):
            try:
                mine = pread_file(p, off, clen, f"frame {pack}@{off}")
            except (NotFound, StoreError):
                mine = b""
            try:
                theirs = self.layout.read_range(pack, off, clen)
            except ShoalError:  # a frame some index placed past the pack's real end
                theirs = None
            if mine != theirs:
                log.warning("frame %s@%d differed from the pack's verified bytes; its chunks are forgotten", pack, off)
                self.catalog.drop_frame_chunks(pack, off)
        self.drop(pack)

    def drop(self, pack: str) -> None:
        self.catalog.drop_frames(pack)
        with store_io("cannot remove a partial pack"), contextlib.suppress(FileNotFoundError):
            self.path(pack).unlink()

    def packs(self) -> set[str]:
        return {"sha256:" + p.name for p in self.dir.iterdir() if len(p.name) == 64}
