"""Pull a Shoal image into the local store, fetching only what the store lacks (docs/transports.md §3).

1. The manifest, config and index come first (small, verified).
2. A frame is needed unless the catalogue holds every chunk in it (from any image: catalogued
   chunks were verified when they entered), or the store holds its whole pack blob.
3. A pack whose every byte is needed is fetched whole and verified by digest; otherwise the
   needed frames are fetched with range reads (adjacent frames merged into one range), every
   chunk in them is verified against its sha256, and they are kept in a partial pack and
   catalogued.  A range of a pack that another image's verified frame already covers with other
   bytes is not overwritten: the whole pack is fetched instead, verified by its digest.
4. Every chunk is hashed before its location enters the catalogue: frames of whole packs are
   decompressed and checked by ``Store.register_chunks``.  An index that lies about a chunk is
   refused, and nothing it claims is recorded.
5. The manifest goes to the destination's ``put_manifest`` last, and the copier's ``commit()`` tags it.
   An interrupted pull resumes: chunks already catalogued and whole packs already stored are not
   fetched again.

``StorePull`` is the local store destination's ``PartialPull`` capability (transports/base.py): the
copier reaches it through ``ImageDestination.partial_pull()``, never by naming the transport.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

from shoal import mediatypes as mt
from shoal.digest import VerifiedBlob
from shoal.errors import FrameConflict, IntegrityError, NotFound, TransportError
from shoal.format.manifest import parse_manifest
from shoal.format.model import Index
from shoal.format.packing import PACK_MAX, verify_frame
from shoal.progress import Sink
from shoal.reader import Reader, StoreSource
from shoal.store.layout import Batch, pread_file
from shoal.transports.base import BlobInfo, ImageDestination, ImageSource, PartialPull, PartialPullResult
from shoal.unpack import UnpackRequest, UnpackResult, check_target, unpack

if TYPE_CHECKING:
    from shoal.store import Store

__all__ = ["PullSource", "StorePull", "plan_frames"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def plan_frames(idx: Index, have_chunk: set[bytes], has_pack: Callable[[str], bool]) -> dict[int, list[int]]:
    """pack index -> sorted frame indices the store must fetch."""
    need: dict[int, list[int]] = {}
    held: dict[int, bool] = {}  # one look per pack, not per frame
    for fi, f in enumerate(idx.frames):
        cis = idx.frame_chunks(fi)
        if all(idx.chunk_ids[c] in have_chunk for c in cis):
            continue
        whole = held.get(f.pack)
        if whole is None:
            whole = held[f.pack] = has_pack("sha256:" + idx.packs[f.pack].hex())
        if whole:
            continue
        need.setdefault(f.pack, []).append(fi)
    for frames in need.values():
        frames.sort(key=lambda fi: idx.frames[fi].offset)
    return need


def _merge(idx: Index, frames: list[int]) -> list[tuple[int, int, list[int]]]:
    """Group frames that sit back to back in the pack into one (offset, length, frames) range."""
    out: list[tuple[int, int, list[int]]] = []
    for fi in frames:
        f = idx.frames[fi]
        if out and out[-1][0] + out[-1][1] == f.offset:
            off, ln, fs = out[-1]
            out[-1] = (off, ln + f.clen, fs + [fi])
        else:
            out.append((f.offset, f.clen, [fi]))
    return out


@dataclass
class _Tally:
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    blobs_skipped: int = 0
    unpacked: UnpackResult | None = None


class _Puller:
    def __init__(self, src: ImageSource, store: "Store", idx: Index, sizes: dict[str, int],
                 sink: Sink, result: _Tally) -> None:
        self.src = src
        self.store = store
        self.idx = idx
        self.sizes = sizes
        self.sink = sink
        self.result = result
        self.lock = threading.Lock()
        self.batch: Batch | None = None
        self.reader: Reader | None = None  # an unpack beside this pull reads through it (``_unpack_beside``)
        self.feed: PullSource | None = None
        self.verified: set[int] = set()  # frames whose chunks were checked against this index
        self.by_frame = idx.chunks_by_frame()
        self.pack_index = {"sha256:" + p.hex(): i for i, p in enumerate(idx.packs)}
        self.frames_of: dict[int, list[int]] = {}  # pack index -> its frames that hold chunks of this index
        for fi in self.by_frame:
            self.frames_of.setdefault(idx.frames[fi].pack, []).append(fi)

    def count(self, nbytes: int, chunks: int) -> None:
        with self.lock:
            self.result.bytes_fetched += nbytes
            self.result.chunks_fetched += chunks
        self.sink.advance("pull", nbytes)

    def verify_frame(self, fi: int, raw: bytes | memoryview,
                     pack: str) -> list[tuple[bytes, str, int, int, int, int, int]]:
        """Check every chunk of frame ``fi`` in ``raw``; return its catalogue rows.  The frame, decompressed
        and checked, goes to the unpack that runs beside this pull, if one does (``Reader.offer``)."""
        f = self.idx.frames[fi]
        try:
            data, bad = verify_frame(self.idx, fi, raw, f"{pack}@{f.offset}")
        except IntegrityError as exc:  # corrupted bytes usually break the zstd frame before any chunk hash
            raise IntegrityError(f"frame at offset {f.offset} of pack {pack} failed verification (digest mismatch: "
                                 f"{exc}); nothing from it was stored") from None
        cis = self.idx.frame_chunks(fi)
        if bad is not None:
            raise IntegrityError(f"chunk sha256:{self.idx.chunk_ids[bad].hex()} from pack {pack} failed "
                                 "verification (digest mismatch); nothing from it was stored")
        if self.reader is not None:
            self.reader.offer(fi, data, cis)
        idx = self.idx
        return [(idx.chunk_ids[ci], pack, f.offset, f.clen, f.ulen, idx.chunk_offsets[ci], idx.chunk_lengths[ci])
                for ci in cis]

    def verify_whole(self, pi: int, blob: VerifiedBlob | None = None) -> None:
        """Hash every chunk this index claims in pack ``pi``, just fetched whole (its digest checked): from
        ``blob``, the pack in memory, or else from the file it was written to, while other packs are still
        arriving.  A failure here is the index lying about a pack whose bytes are right: it is not
        fetched again."""
        pack = "sha256:" + self.idx.packs[pi].hex()
        frames = self.frames_of.get(pi, [])
        if frames:
            lo = min(self.idx.frames[fi].offset for fi in frames)
            hi = max(self.idx.frames[fi].offset + self.idx.frames[fi].clen for fi in frames)
            if blob is not None:
                view = memoryview(blob.data)[lo:hi]
            else:
                path = (self.batch.pending(pack) if self.batch is not None else None) or self.store.layout.path(pack)
                view = memoryview(pread_file(path, lo, hi - lo, f"pack {pack}"))
            for fi in frames:
                f = self.idx.frames[fi]
                self.verify_frame(fi, view[f.offset - lo : f.offset - lo + f.clen], pack)
                with self.lock:
                    self.verified.add(fi)
        if self.feed is not None:
            self.feed.done(pack)

    def pack(self, item: tuple[int, list[int]]) -> None:
        pi, frames = item
        pack = "sha256:" + self.idx.packs[pi].hex()
        size = self.sizes[pack]
        if sum(self.idx.frames[fi].clen for fi in frames) == size and not self.store.partial.present(pack):
            blob = _whole_pack(self.src, self.store, pack, size, self.batch)
            self.verify_whole(pi, blob)
            self.count(size, sum(len(self.idx.frame_chunks(fi)) for fi in frames))
            return
        _again(lambda: self._ranges(pi, frames), pack)

    def _ranges(self, pi: int, frames: list[int]) -> None:
        pack = "sha256:" + self.idx.packs[pi].hex()
        size = self.sizes[pack]
        info = BlobInfo(pack, size, mt.PACK)
        ranges = _merge(self.idx, frames)
        datas = self.src.get_blob_ranges(info, [(off, ln) for off, ln, _ in ranges])
        for (off, ln, fis), data in zip(ranges, datas):
            if len(data) != ln:
                raise IntegrityError(f"range {off}+{ln} of pack {pack} came back with {len(data)} bytes")
            for fi in fis:
                f = self.idx.frames[fi]
                raw = data[f.offset - off : f.offset - off + f.clen]
                rows = self.verify_frame(fi, raw, pack)
                try:
                    self.store.partial.put_frame(pack, f.offset, raw)
                except FrameConflict as exc:
                    # another image's verified frame holds other bytes at this range of the pack: this
                    # index or that one lies about the pack, and only the pack's digest can tell
                    log.info("%s; fetching the whole pack", exc)
                    _whole_pack(self.src, self.store, pack, size, None)
                    self.store.partial.try_promote(pack, size)
                    self.count(size, 0)
                    if self.feed is not None:
                        self.feed.done(pack)
                    return
                self.store.catalog.add(rows)  # verified just above: a resumed pull skips these chunks
                with self.lock:
                    self.verified.add(fi)
            self.count(ln, sum(len(self.idx.frame_chunks(fi)) for fi in fis))
        self.store.partial.try_promote(pack, size)
        if self.feed is not None:
            self.feed.done(pack)


_ATTEMPTS = 3  # bytes damaged in transit fail verification; nothing of them was kept, so fetch again


def _again(fn: Callable[[], T], what: str) -> T:
    """``fn()``, again up to ``_ATTEMPTS`` times if what it fetched failed verification.  A source that
    keeps serving bad bytes (a lying index, a corrupt blob) still fails, after a bounded number of tries."""
    for attempt in range(_ATTEMPTS):
        try:
            return fn()
        except FrameConflict:
            raise
        except IntegrityError as exc:
            if attempt == _ATTEMPTS - 1:
                raise
            log.info("%s: %s; fetching it again", what, exc)
    raise AssertionError("unreachable")


# a pack up to this size is fetched into memory, checked there, then written (a Shoal build makes packs of at
# most PACK_MAX uncompressed bytes): at most ``concurrency`` of them at once
WHOLE_IN_MEMORY = 2 * PACK_MAX


def _whole_pack(src: ImageSource, store: "Store", pack: str, size: int, batch: Batch | None) -> VerifiedBlob | None:
    """GET a whole pack (again if it arrives damaged) and store it, its size and digest verified before it
    can become visible.  Returns the pack's bytes (a ``VerifiedBlob``: the source hashed them as it read
    them, and the store does not hash them again) when it was read into memory, else None."""
    return _again(lambda: _whole_pack_once(src, store, pack, size, batch), pack)


def _whole_pack_once(src: ImageSource, store: "Store", pack: str, size: int,
                     batch: Batch | None) -> VerifiedBlob | None:
    info = BlobInfo(pack, size, mt.PACK)
    if 0 <= size <= WHOLE_IN_MEMORY:
        blob = src.get_verified_blob(info)
        store.layout.put_verified(blob, pack, size, batch=batch)
        return blob
    stream, _ = src.get_blob(info)
    try:
        store.layout.put_stream(stream, pack, size, batch=batch)
    finally:
        stream.close()
    return None


class PullSource(StoreSource):
    """Frames for the unpack that runs beside a pull (``Reader`` over the pull's own index): a frame of a
    pack this pull fetches is waited for until the pull has verified that pack, then read from where the
    pull put it (the batch's file until ``commit``, then the store); any other frame is the store's."""

    def __init__(self, store: "Store", batch: Batch, packs: set[str]) -> None:
        super().__init__(store)
        self.batch = batch
        self.waits = {p: threading.Event() for p in packs}
        self.ready: set[str] = set()
        self.failed = False

    def done(self, pack: str) -> None:
        ev = self.waits.get(pack)
        if ev is not None:
            self.ready.add(pack)
            ev.set()

    def fail(self) -> None:
        """The pull failed: every read still waiting fails too."""
        self.failed = True
        for ev in self.waits.values():
            ev.set()

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        ev = self.waits.get(pack)
        if ev is not None:
            ev.wait()
            if pack not in self.ready:
                raise TransportError(f"pack {pack} was not pulled (the pull failed)")
            path = self.batch.pending(pack)
            if path is not None:
                try:
                    return pread_file(path, offset, length, f"frame {pack}@{offset}")
                except NotFound:  # committed meanwhile: it is in the store now
                    pass
        return super().fetch(pack, offset, length)


class _Beside:
    """``unpack`` of the image being pulled, on its own thread, reading frames as the pull verifies them."""

    def __init__(self, req: UnpackRequest, idx: Index, store: "Store", batch: Batch, packs: set[str],
                 sink: Sink) -> None:
        self.feed = PullSource(store, batch, packs)
        self.reader = Reader(idx, self.feed)
        self.result: UnpackResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(req, idx, sink), name="shoal-unpack-main",
                                       daemon=True)
        self.thread.start()

    def _run(self, req: UnpackRequest, idx: Index, sink: Sink) -> None:
        try:
            self.result = unpack(idx, self.reader, req.dest, req.options, sink)
        except BaseException as exc:  # noqa: BLE001 - handed to the pulling thread, raised there
            self.error = exc

    def join(self) -> UnpackResult:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class StorePull(PartialPull):
    """The local store's partial pull: ``dst`` is the store's destination, ``registered(digest)`` tells it
    that the image's chunks are catalogued already (so its ``commit()`` does not decode the index again)."""

    def __init__(self, store: "Store", dst: ImageDestination, registered: Callable[[str], None]) -> None:
        self.store = store
        self.dst = dst
        self.registered = registered

    def pull(self, src: ImageSource, raw: bytes, concurrency: int, sink: Sink,
             digest: str | None = None, unpack: UnpackRequest | None = None) -> PartialPullResult:
        t = _pull(src, raw, self.store, concurrency, sink, self.registered, unpack)
        self.dst.put_manifest(raw, mt.OCI_MANIFEST, digest)
        return PartialPullResult(t.bytes_fetched, t.chunks_fetched, t.blobs_skipped, t.unpacked)


def _pull(src: ImageSource, raw: bytes, store: "Store", concurrency: int, sink: Sink,
          registered: Callable[[str], None], unpack_req: UnpackRequest | None = None) -> _Tally:
    result = _Tally()
    m = parse_manifest(raw)
    if unpack_req is not None:
        check_target(unpack_req.dest)  # before anything is fetched
    for d in (m.config, m.index):
        if not store.layout.has(d.digest):
            stream, _ = src.get_blob(BlobInfo(d.digest, d.size, d.media_type))
            try:
                store.layout.put_stream(stream, d.digest, d.size)  # verifies size and digest before it is visible
            finally:
                stream.close()
            result.bytes_fetched += d.size
        else:
            result.blobs_skipped += 1
    batch = Batch(store.layout)
    pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="shoal-pull")
    early: dict[str, Future[None]] = {}
    beside: _Beside | None = None
    ready = threading.Event()  # set once the puller exists (or the pull failed before it did)
    box: list[_Puller] = []

    def early_pack(digest: str, size: int) -> None:
        """Fetch pack ``digest`` whole; then, the index decoded, check its chunks against it on this
        thread, from the pack in memory (``verify_whole``), while the other packs are still arriving."""
        blob = _whole_pack(src, store, digest, size, batch)
        ready.wait()
        if box:
            p = box[0]
            p.verify_whole(p.pack_index[digest], blob)
            p.count(size, 0)

    try:
        if store.catalog.empty() and not store.partial.packs():
            # nothing in the store can stand in for any chunk: every pack is needed whole, so start
            # fetching them now and decode the index meanwhile
            early = {p.digest: pool.submit(early_pack, p.digest, p.size)
                     for p in m.packs if not store.layout.has(p.digest)}
        idx = store.load_index(m)
        have = set(store.catalog.locate(idx.chunk_ids))
        need = plan_frames(idx, have, store.layout.has)
        need = {pi: fis for pi, fis in need.items() if "sha256:" + idx.packs[pi].hex() not in early}
        sizes = {p.digest: p.size for p in m.packs}
        total = sum(idx.frames[fi].clen for frames in need.values() for fi in frames)
        total += sum(sizes[d] for d in early)
        sink.start("pull", total)
        puller = _Puller(src, store, idx, sizes, sink, result)
        puller.batch = batch
        if unpack_req is not None:
            fetched = set(early) | {"sha256:" + idx.packs[pi].hex() for pi in need}
            beside = _Beside(unpack_req, idx, store, batch, fetched, sink)
            puller.reader, puller.feed = beside.reader, beside.feed
        box.append(puller)
        ready.set()
        for _ in pool.map(puller.pack, sorted(need.items())):
            pass
        if early:
            in_early = {i for i, p in enumerate(idx.packs) if "sha256:" + p.hex() in early}
            for fut in early.values():
                fut.result()
            result.chunks_fetched += sum(1 for fi in idx.chunk_frames if idx.frames[fi].pack in in_early)
    except BaseException:
        ready.set()
        if beside is not None:
            beside.feed.fail()
        pool.shutdown(wait=True, cancel_futures=True)
        # every pack in the batch was verified: even a pull that failed half way keeps them,
        # and a retry resumes after them
        batch.commit()
        if beside is not None:
            with contextlib.suppress(BaseException):
                beside.join()  # it failed too, and removed what it wrote
        raise
    pool.shutdown(wait=True)
    # every whole pack synced (the last few now), then they become visible
    batch.commit()
    sink.finish("pull")
    store.register_chunks(m, idx, verified=puller.verified)  # hashes what the pull did not already
    registered(m.digest)
    result.blobs_skipped += len(m.packs) - len(need)
    log.info("pulled %s: %d bytes in %d chunks", m.digest, result.bytes_fetched, result.chunks_fetched)
    if beside is not None:
        result.unpacked = beside.join()
    return result
