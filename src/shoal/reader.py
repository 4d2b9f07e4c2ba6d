"""Read files out of an image: index + a frame source -> verified bytes.

Used by ``cat``, ``unpack``, ``export`` and the FUSE mount.  Nothing here
knows where frames come from: ``FrameSource`` is the local store for a pulled
image and HTTP range reads for a lazy one.  Every chunk is checked against
its sha256 before a byte of it is returned.
"""

from __future__ import annotations

import abc
import bisect
import collections
import threading
from typing import Iterable, Iterator

from shoal.errors import IntegrityError, NotFound, UsageError
from shoal.format import packing
from shoal.format.model import Entry, Frame, Index, Kind
from shoal.store import Store
from shoal.store.layout import Layout

__all__ = ["FrameSource", "ForwardingSource", "LayoutSource", "StoreSource", "Reader"]


class FrameSource(abc.ABC):
    """Where frames come from: the contract between a Reader (and the mount) and a source (mount.md §1).

    Only ``fetch`` is required.  Every other hook has a default that does nothing (or answers None /
    False), and the Reader and the mount call them directly: a source overrides what it needs.
    """

    @abc.abstractmethod
    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        """The ``length`` compressed bytes at ``offset`` of pack blob ``pack`` (unverified); NotFound if
        this source does not hold that frame."""

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        """``fetch``'s bytes if they can be had without waiting for a disk or the network (a local pack in
        the page cache), else None at once (default: never).  The mount decompresses such a frame on its
        request-reading thread instead of handing the read to a worker (mount.md §2)."""
        return None

    def find_chunk(self, cid: bytes) -> bytes | None:
        """A chunk by id (verified by the Reader), for a frame ``fetch`` raised NotFound for because the
        store holds its chunks elsewhere; None (default) if unknown."""
        return None

    def held_chunk(self, cid: bytes) -> bytes | None:
        """A chunk this source holds in memory outside any frame (a profile bundle, bundle.md §6), asked
        before the chunk's frame; None (default) if not held.  The Reader hashes it before serving it."""
        return None

    def opened(self, pack: str, offset: int) -> bytes | None:
        """Frame ``pack@offset`` decompressed, if this source just decompressed it (called after ``fetch``
        of it, once: the source may forget it); None (default) otherwise, and the Reader decompresses
        ``fetch``'s bytes itself.  Either way the Reader hashes each chunk before it serves it."""
        return None

    # ------------------------------------------------------------ fetching ahead (a remote source)

    @property
    def fetches_ahead(self) -> bool:
        """True if ``ensure`` and ``readahead`` do something: the mount only plans them then (default False)."""
        return False

    def ensure(self, frames: list[int]) -> None:  # noqa: B027 - optional hook
        """Make frame indices ``frames`` local in one batch before a read that needs all of them."""

    def readahead(self, frames: list[int]) -> None:  # noqa: B027
        """Start fetching ``frames`` in the background; never blocks, never raises."""

    def prefetch(self, frames: list[int]) -> int | None:
        """Fetch ``frames`` in bulk and return the bytes fetched; None (default): no bulk path, the caller
        fetches them one by one."""
        return None

    # ------------------------------------------------------------ figures (shoal status)

    def cached_chunks(self) -> int | None:
        """How many chunks of the image are on this machine; None (default): the caller counts."""
        return None

    @property
    def stats(self) -> object | None:
        """The source's own counters, a dataclass of numbers (``stats.source`` in status); default None."""
        return None

    @property
    def bundle_state(self) -> str:
        """Its profile bundle's (bundle.md §6): none (default), pending, checked or refused."""
        return "none"

    # ------------------------------------------------------------ life cycle (the mount daemon forks)

    def before_fork(self) -> None:  # noqa: B027
        """In the parent, before the mount daemon forks: close sqlite handles, end thread pools."""

    def after_fork_parent(self) -> None:  # noqa: B027
        """In the parent, after the fork (e.g. hand frames still being fetched to the daemon)."""

    def handover_wait(self, timeout: float | None = None) -> None:  # noqa: B027
        """In the parent: wait until the daemon holds what was handed over (at most ``timeout``)."""

    def after_fork(self) -> None:  # noqa: B027
        """In the forked daemon: make new connections, pools and locks; never close inherited ones."""

    def serving(self) -> None:  # noqa: B027
        """The mount is live (its caller was told): work deferred so as not to delay that may start."""

    def close(self) -> None:  # noqa: B027
        """Stop background work (the mount is going away)."""


class ForwardingSource(FrameSource):
    """A wrapper around ``inner`` that forwards every hook to it; a subclass overrides what it adds.

    But ``fetch_nowait``: a subclass that sees every fetch (to count, record or hold it) would not see
    the fetches that bypass ``fetch``, so it is only forwarded by a subclass that says so (it answers
    None here: the read goes to ``fetch`` on a worker)."""

    def __init__(self, inner: FrameSource) -> None:
        self.inner = inner

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        return self.inner.fetch(pack, offset, length)

    def find_chunk(self, cid: bytes) -> bytes | None:
        return self.inner.find_chunk(cid)

    def held_chunk(self, cid: bytes) -> bytes | None:
        return self.inner.held_chunk(cid)

    def opened(self, pack: str, offset: int) -> bytes | None:
        return self.inner.opened(pack, offset)

    @property
    def fetches_ahead(self) -> bool:
        return self.inner.fetches_ahead

    def ensure(self, frames: list[int]) -> None:
        self.inner.ensure(frames)

    def readahead(self, frames: list[int]) -> None:
        self.inner.readahead(frames)

    def prefetch(self, frames: list[int]) -> int | None:
        return self.inner.prefetch(frames)

    def cached_chunks(self) -> int | None:
        return self.inner.cached_chunks()

    @property
    def stats(self) -> object | None:
        return self.inner.stats

    @property
    def bundle_state(self) -> str:
        return self.inner.bundle_state

    def before_fork(self) -> None:
        self.inner.before_fork()

    def after_fork_parent(self) -> None:
        self.inner.after_fork_parent()

    def handover_wait(self, timeout: float | None = None) -> None:
        self.inner.handover_wait(timeout)

    def after_fork(self) -> None:
        self.inner.after_fork()

    def serving(self) -> None:
        self.inner.serving()

    def close(self) -> None:
        self.inner.close()


class LayoutSource(FrameSource):
    """Frames from complete packs in an OCI layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        return self.layout.read_range(pack, offset, length)


class StoreSource(FrameSource):
    """Frames from the local store: complete packs, partial packs, and — for a frame the store
    never fetched because it already held its chunks elsewhere — any chunk by id via the catalogue."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        return self.store.read_frame(pack, offset, length)

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        return self.store.read_frame_nowait(pack, offset, length)

    def find_chunk(self, cid: bytes) -> bytes | None:
        loc = self.store.catalog.locate([cid]).get(cid)
        if loc is None:
            return None
        try:
            raw = self.store.read_frame(loc.pack, loc.frame_off, loc.frame_clen)
        except NotFound:
            return None
        data = packing.open_frame(raw, Frame(0, loc.frame_off, loc.frame_clen, loc.frame_ulen),
                                  f"{loc.pack}@{loc.frame_off}")
        return data[loc.off : loc.off + loc.length]


class Reader:
    def __init__(self, index: Index, source: FrameSource, cache_frames: int = 64) -> None:
        self.index = index
        self.source = source
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_max = cache_frames
        self._lock = threading.Lock()
        self._verified: set[int] = set()  # chunks checked in their frame (in the cache)
        self._held_ok: dict[int, bytes] = {}  # chunks checked as the source held them (held_chunk)
        self._inflight: dict[int, threading.Event] = {}
        self._offsets: dict[bytes, list[int]] = {}
        self._offered: dict[int, bytes] = {}  # frames handed in by ``offer``, each kept until its first read
        self._offered_bytes = 0

    # ---------------------------------------------------------------- frames handed in

    OFFER_MAX = 256 << 20  # decompressed bytes ``offer`` keeps waiting for their first read

    def offer(self, fi: int, data: bytes, checked: Iterable[int]) -> bool:
        """Frame ``fi`` decompressed by the caller, with ``checked``, the chunks of it the caller hashed
        against this Reader's index (``packing.verify_frame``: a pull that just fetched it), for a read
        that is coming (an unpack while the pull runs): kept until its first read, so the frame is not
        read and decompressed again and those chunks are not hashed again.  False (and nothing kept)
        when ``OFFER_MAX`` bytes already wait: the read then goes to the source, and hashes."""
        if len(data) != self.index.frames[fi].ulen:
            return False
        with self._lock:
            if fi in self._cache or fi in self._offered:
                return True
            if self._offered_bytes + len(data) > self.OFFER_MAX:
                return False
            self._offered[fi] = data
            self._offered_bytes += len(data)
            self._verified.update(checked)
        return True

    # ---------------------------------------------------------------- frames and chunks

    @property
    def cache_frames(self) -> int:
        """How many decompressed frames the Reader keeps."""
        return self._cache_max

    def pack_digest(self, i: int) -> str:
        return "sha256:" + self.index.packs[i].hex()

    def frame(self, fi: int) -> bytes:
        """Frame ``fi`` decompressed; threads that want the same frame at once wait for one of them."""
        while True:
            with self._lock:
                data, busy = self._held_or_claim(fi)
                if data is not None:
                    return data
                if busy is None:
                    busy = self._inflight[fi] = threading.Event()
                    break
            busy.wait()  # then look again: the cache has it, or that thread failed and this one tries
        try:
            f = self.index.frames[fi]
            pack = self.pack_digest(f.pack)
            raw = self.source.fetch(pack, f.offset, f.clen)
            with self._lock:  # offered while the source was waited for (a pull that fed it meanwhile)
                offered = self._take_offered(fi)
            if offered is not None:
                return offered
            # decompressed by the source already: not again.  Each chunk is still hashed against this
            # Reader's index on its first read (``chunk``), so nothing rests on the source's word.
            data = self.source.opened(pack, f.offset)
            if data is None or len(data) != f.ulen:
                data = packing.open_frame(raw, f, f"{pack}@{f.offset}")
            self._keep(fi, data)
            return data
        finally:
            with self._lock:
                del self._inflight[fi]
            busy.set()

    def frame_now(self, fi: int) -> bytes | None:
        """Frame ``fi`` decompressed if that needs no wait: in memory, or its compressed bytes to be had
        at once from the source (``fetch_nowait``: a local pack in the page cache), decompressed here;
        else None (another thread is loading it, or the source would wait)."""
        with self._lock:
            data, busy = self._held_or_claim(fi)
            if data is not None or busy is not None:
                return data
            busy = self._inflight[fi] = threading.Event()
        try:
            f = self.index.frames[fi]
            pack = self.pack_digest(f.pack)
            raw = self.source.fetch_nowait(pack, f.offset, f.clen)
            if raw is None:
                return None
            data = packing.open_frame(raw, f, f"{pack}@{f.offset}")
            self._keep(fi, data)
            return data
        finally:
            with self._lock:
                del self._inflight[fi]
            busy.set()

    def _held_or_claim(self, fi: int) -> tuple[bytes | None, threading.Event | None]:
        """(the frame, None) if it is in memory; else (None, the event of the thread loading it), or
        (None, None) if no thread is (the lock held)."""
        data = self._cache.get(fi)
        if data is not None:
            self._cache.move_to_end(fi)
            return data, None
        data = self._take_offered(fi)
        if data is not None:
            return data, None
        return None, self._inflight.get(fi)

    def _keep(self, fi: int, data: bytes) -> None:
        with self._lock:
            self._cache[fi] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)

    def _take_offered(self, fi: int) -> bytes | None:
        """Move an offered frame into the cache (the lock held)."""
        data = self._offered.pop(fi, None)
        if data is not None:
            self._offered_bytes -= len(data)
            self._cache[fi] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return data

    def chunk(self, ci: int) -> memoryview:
        """Chunk ``ci``, checked against its id the first time it is read (``packing.chunk_ok``, the check
        every path makes)."""
        idx = self.index
        fi, off, ln = idx.chunk_frames[ci], idx.chunk_offsets[ci], idx.chunk_lengths[ci]
        held = self.source.held_chunk(idx.chunk_ids[ci])
        if held is not None:
            if held is not self._held_ok.get(ci):  # these very bytes were checked before
                if len(held) != ln or not packing.chunk_ok(held, 0, ln, idx.chunk_ids[ci]):
                    raise IntegrityError(f"chunk sha256:{idx.chunk_ids[ci].hex()} failed verification")
                self._held_ok[ci] = held
            return memoryview(held)
        try:
            frame = self.frame(fi)
        except NotFound:
            alt = self.source.find_chunk(idx.chunk_ids[ci])
            if alt is None:
                raise
            if len(alt) != ln or not packing.chunk_ok(alt, 0, ln, idx.chunk_ids[ci]):
                raise IntegrityError(f"chunk sha256:{idx.chunk_ids[ci].hex()} failed verification") from None
            return memoryview(alt)
        if ci not in self._verified:
            if not packing.chunk_ok(frame, off, ln, idx.chunk_ids[ci]):
                with self._lock:
                    self._cache.pop(fi, None)
                f = idx.frames[fi]
                raise IntegrityError(
                    f"chunk sha256:{idx.chunk_ids[ci].hex()} in pack {self.pack_digest(f.pack)} failed verification"
                )
            self._verified.add(ci)
        return memoryview(frame)[off : off + ln]

    # ---------------------------------------------------------------- files

    def resolve(self, path: bytes, follow_last: bool = True) -> Entry | None:
        """Look ``path`` up as a process chrooted into the image would, following symlinks (max 40)."""
        parts = [p for p in path.split(b"/") if p and p != b"."]
        cur: list[bytes] = []
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == b"..":
                if cur:
                    cur.pop()
                continue
            e = self.index.lookup(b"/".join(cur + [name]))
            if e is None:
                return None
            if e.kind == Kind.SYMLINK and (parts or follow_last):
                hops += 1
                if hops > 40:
                    return None
                target = [p for p in e.target.split(b"/") if p and p != b"."]
                if e.target.startswith(b"/"):
                    cur = []
                parts = target + parts
                continue
            if parts and e.kind != Kind.DIR:
                return None
            cur.append(name)
        return self.index.lookup(b"/".join(cur))

    def file_entry(self, path: bytes) -> Entry:
        e = self.resolve(path)
        if e is not None and e.kind == Kind.HARDLINK:
            i = self.index.position(e.path)
            e = None if i is None else self.index.entries[self.index.primary(i)]
        if e is None or e.kind != Kind.FILE:
            raise UsageError(f"not a regular file in the image: {path.decode(errors='replace')}")
        return e

    def iter_file(self, e: Entry) -> Iterator[memoryview]:
        for ci in e.chunks:
            yield self.chunk(ci)

    def _starts(self, e: Entry) -> list[int]:
        starts = self._offsets.get(e.path)
        if starts is None:
            starts, pos = [], 0
            for ci in e.chunks:
                starts.append(pos)
                pos += self.index.chunk_lengths[ci]
            self._offsets[e.path] = starts
        return starts

    def frames_for(self, e: Entry, offset: int, size: int) -> set[int]:
        """Frame indices holding bytes ``[offset, offset+size)`` of file ``e``, but for chunks the source
        holds outside frames (``held_chunk``): a read of only those needs no frame."""
        idx, held = self.index, self.source.held_chunk
        return {idx.chunk_frames[ci] for ci in self.chunks_in(e, offset, size) if held(idx.chunk_ids[ci]) is None}

    def chunks_in(self, e: Entry, offset: int, size: int) -> list[int]:
        """Chunk indices of file ``e`` holding bytes ``[offset, offset+size)``, in file order."""
        starts = self._starts(e)
        end = min(e.size, offset + size)
        k = max(0, bisect.bisect_right(starts, offset) - 1) if offset < end else len(e.chunks)  # at EOF: none
        out = []
        while k < len(e.chunks) and starts[k] < end:
            out.append(e.chunks[k])
            k += 1
        return out

    def span_in_frames(self, e: Entry, offset: int, size: int, frames: set[int]) -> tuple[int, int]:
        """The widest byte range of file ``e`` around ``[offset, offset+size)`` whose chunks all lie in
        ``frames`` (what decompressing those frames makes readable without another fetch)."""
        starts = self._starts(e)
        if not starts or offset >= e.size:
            return offset, offset
        cf = self.index.chunk_frames
        lo = max(0, bisect.bisect_right(starts, offset) - 1)
        hi = max(lo, bisect.bisect_left(starts, min(e.size, offset + size)) - 1)
        while lo > 0 and cf[e.chunks[lo - 1]] in frames:
            lo -= 1
        while hi + 1 < len(starts) and cf[e.chunks[hi + 1]] in frames:
            hi += 1
        return starts[lo], starts[hi] + self.index.chunk_lengths[e.chunks[hi]]

    def ready(self, fi: int) -> bool:
        """True if frame ``fi`` is decompressed in memory (cached, or offered by a pull): reading it needs
        no source, nor another thread to read it ahead.  A hint: the frame may be evicted meanwhile."""
        return fi in self._cache or fi in self._offered

    def has_frames(self, frames: set[int]) -> bool:
        """True if every frame is in the in-memory cache (a read of them will not block)."""
        with self._lock:
            return all(f in self._cache for f in frames)

    def read(self, e: Entry, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of file ``e`` (short at end of file)."""
        parts = self.read_parts(e, offset, size)
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)  # one copy of the bytes

    def read_parts(self, e: Entry, offset: int, size: int) -> list[memoryview]:
        """``read``'s bytes as views of the chunks that hold them, in order (verified, not copied)."""
        if offset >= e.size or size <= 0:
            return []
        starts = self._starts(e)
        end = min(e.size, offset + size)
        k = bisect.bisect_right(starts, offset) - 1
        parts: list[memoryview] = []
        while k < len(e.chunks) and starts[k] < end:
            data = self.chunk(e.chunks[k])
            parts.append(data[max(0, offset - starts[k]):min(len(data), end - starts[k])])
            k += 1
        return parts
