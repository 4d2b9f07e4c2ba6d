"""Lazy frame source: local store first, then HTTP range reads on the image's packs (docs/spec/mount.md).

Every frame fetched from the network is decompressed and every chunk in it is checked against its
sha256 *before* it is written to the store (as a partial pack) and served; a frame that fails is
never cached and the read fails with IntegrityError (EIO through FUSE).  Frames land in the shared
store, so any other image holding the same chunks reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shoal import mediatypes as mt
from shoal.errors import IntegrityError, NotFound
from shoal.format.manifest import ShoalManifest
from shoal.format.model import Index
from shoal.reader import decompress_frame
from shoal.store import Store
from shoal.transports.base import BlobInfo, ImageSource

__all__ = ["LazySource", "LazyStats"]

log = logging.getLogger(__name__)


@dataclass
class LazyStats:
    frames_local: int = 0
    frames_fetched: int = 0
    bytes_fetched: int = 0
    requests: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class LazySource:
    """A FrameSource for Reader that fetches missing frames from ``remote`` and caches them in ``store``."""

    def __init__(self, store: Store, remote: ImageSource, manifest: ShoalManifest, index: Index) -> None:
        self.store = store
        self.remote = remote
        self.index = index
        self.sizes = {p.digest: p.size for p in manifest.packs}
        self.stats = LazyStats()
        self._frame_of: dict[tuple[str, int], int] = {
            ("sha256:" + index.packs[f.pack].hex(), f.offset): fi for fi, f in enumerate(index.frames)
        }
        self._chunks_of: dict[int, list[int]] = {}
        for ci, fi in enumerate(index.chunk_frames):
            self._chunks_of.setdefault(fi, []).append(ci)
        self._inflight: dict[tuple[str, int], threading.Event] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- FrameSource

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        try:
            data = self.store.read_frame(pack, offset, length)
            with self.stats.lock:
                self.stats.frames_local += 1
            return data
        except NotFound:
            pass
        fi = self._frame_of.get((pack, offset))
        if fi is not None and self._all_chunks_local(fi):
            raise NotFound("frame not cached, but its chunks are: read them by id")
        key = (pack, offset)
        with self._lock:
            ev = self._inflight.get(key)
            owner = ev is None
            if owner:
                ev = self._inflight[key] = threading.Event()
        assert ev is not None
        if not owner:  # someone else is fetching this frame: wait for it, then read the cache
            ev.wait()
            return self.store.read_frame(pack, offset, length)
        try:
            return self._fetch_ranges(pack, [(offset, length)])[0]
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            ev.set()

    def find_chunk(self, cid: bytes) -> bytes | None:
        from shoal.reader import StoreSource

        return StoreSource(self.store).find_chunk(cid)

    # ---------------------------------------------------------------- fetching

    def _fetch_ranges(self, pack: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Fetch whole frames at ``ranges`` of ``pack``; verify, cache and return their bytes."""
        info = BlobInfo(pack, self.sizes.get(pack, -1), mt.PACK)
        try:
            datas = self.remote.get_blob_ranges(info, ranges)
        except Exception:
            with self.stats.lock:
                self.stats.failures += 1
            raise
        out = []
        for (off, ln), data in zip(ranges, datas):
            with self.stats.lock:
                self.stats.requests += 1
                self.stats.bytes_fetched += len(data)
            out += self._accept(pack, off, ln, data)
        return out

    def _accept(self, pack: str, off: int, ln: int, data: bytes) -> list[bytes]:
        """Split a fetched range into frames, verify each, cache each; return the frames' bytes."""
        if len(data) != ln:
            raise IntegrityError(f"range {off}+{ln} of pack {pack} returned {len(data)} bytes")
        out = []
        pos = off
        rows = []
        while pos < off + ln:
            fi = self._frame_of.get((pack, pos))
            if fi is None:
                raise IntegrityError(f"range of pack {pack} does not start at a frame boundary ({pos})")
            f = self.index.frames[fi]
            raw = data[pos - off : pos - off + f.clen]
            plain = decompress_frame(raw, f, f"{pack}@{pos}")
            for ci in self._chunks_of.get(fi, []):
                o, n = self.index.chunk_offsets[ci], self.index.chunk_lengths[ci]
                if hashlib.sha256(plain[o : o + n]).digest() != self.index.chunk_ids[ci]:
                    with self.stats.lock:
                        self.stats.failures += 1
                    log.error("digest mismatch: chunk sha256:%s of pack %s at %d; not cached",
                              self.index.chunk_ids[ci].hex(), pack, pos)
                    raise IntegrityError(f"chunk sha256:{self.index.chunk_ids[ci].hex()} from pack {pack} "
                                         "failed verification (digest mismatch)")
                rows.append((self.index.chunk_ids[ci], pack, f.offset, f.clen, f.ulen, o, n))
            self.store.partial.put_frame(pack, pos, raw)
            with self.stats.lock:
                self.stats.frames_fetched += 1
            out.append(raw)
            pos += f.clen
        self.store.catalog.add(rows)
        return out

    def prefetch(self, frames: list[int], concurrency: int = 8) -> int:
        """Fetch ``frames`` (indices, in priority order) that the store lacks, merging back-to-back frames
        of a pack into one range request; return the bytes fetched."""
        todo: dict[str, list[int]] = {}
        for fi in frames:
            f = self.index.frames[fi]
            pack = "sha256:" + self.index.packs[f.pack].hex()
            if not self.store.has_frame(pack, f.offset) and not self._all_chunks_local(fi):
                todo.setdefault(pack, []).append(fi)
        before = self.stats.bytes_fetched
        jobs = []
        for pack, fis in todo.items():
            fis = sorted(set(fis), key=lambda i: self.index.frames[i].offset)
            ranges: list[tuple[int, int]] = []
            for fi in fis:
                f = self.index.frames[fi]
                if ranges and ranges[-1][0] + ranges[-1][1] == f.offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + f.clen)
                else:
                    ranges.append((f.offset, f.clen))
            jobs.append((pack, ranges))
        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="shoal-prefetch") as pool:
            list(pool.map(lambda j: self._fetch_ranges(*j), jobs))
        return self.stats.bytes_fetched - before

    def _all_chunks_local(self, fi: int) -> bool:
        ids = [self.index.chunk_ids[ci] for ci in self._chunks_of.get(fi, [])]
        return bool(ids) and len(self.store.catalog.locate(ids)) == len(ids)
