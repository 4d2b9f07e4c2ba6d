"""Tree -> chunks -> frames -> packs -> index -> manifest, into the local store (docs/spec/format.md §5).

Threads do the heavy work (reading, FastCDC, sha256, zstd: all release the
GIL); the main thread walks files in canonical order and makes every
decision, so the output never depends on the number of workers.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import zstandard

from shoal import mediatypes as mt
from shoal.errors import IntegrityError
from shoal.format import index as fidx
from shoal.format import packing
from shoal.format.manifest import Descriptor, ImageConfig, ShoalManifest, build_config, build_manifest, parse_manifest
from shoal.format.model import Entry, Frame, Kind
from shoal.progress import NULL, Sink
from shoal.store import Store
from shoal.store.layout import Batch
from shoal.treesource import STREAM_QUEUE, WINDOW, Chunked, DirSource, FileReader, Streamed, TreeSource, chunk_batch

# TreeSource, FileReader and DirSource live in shoal.treesource (reading a tree); named here as before
__all__ = ["BuildOptions", "BuildResult", "TreeSource", "FileReader", "DirSource", "build", "build_tree",
           "Placed", "PlacedTree", "build_placed"]

log = logging.getLogger(__name__)

# Memory bounds (convert.md §5): file bytes read ahead of the main thread, and one file's window.
_INFLIGHT_BYTES = 32 * 1024 * 1024
_STREAMERS = 2  # large files read at once
# frame classes (format.md §5.1, ``_Builder.file_class``): small files, the other files below OWN_FILE; a
# file from OWN_FILE up is a class of its own (numbered from 1)
_SMALL, _LARGE = -2, -1
_STREAM_BYTES = (STREAM_QUEUE + 2) * WINDOW  # what a large file in flight may hold
_PENDING_PACKS = 8
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_FILES = 128


@dataclass(frozen=True)
class BuildOptions:
    workers: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))  # I/O overlaps CPU
    source_date_epoch: int | None = None
    # where chunks already stored are taken from (format.md §5): these images only, when any are named;
    # else, with reuse_store, every chunk the store's catalogue places in a pack it holds whole; else none
    reuse: tuple[str, ...] = ()
    reuse_store: bool = True
    config: ImageConfig = field(default_factory=ImageConfig)


@dataclass(frozen=True)
class BuildResult:
    manifest: ShoalManifest
    files: int
    bytes_in: int
    chunks: int  # chunk references, duplicates included
    unique_chunks: int
    new_chunks: int  # in new frames: not found in the --reuse images or the store
    packs: int
    new_packs: int  # packs this build wrote (may already have been in the store)
    stored_bytes: int  # compressed size of the image: config + index + packs
    added_bytes: int  # bytes this build added to the store
    seconds: float
    skipped: tuple[bytes, ...] = ()


_tls = threading.local()


def _compress(parts: list[memoryview]) -> bytes:
    """One zstd frame of the concatenated chunks (format.md §5.3); runs in a worker thread."""
    cctx = getattr(_tls, "cctx", None)
    if cctx is None:
        cctx = _tls.cctx = zstandard.ZstdCompressor(
            level=packing.ZSTD_LEVEL, write_checksum=False, write_content_size=True)
    return cctx.compress(b"".join(parts))


@dataclass
class _ReuseLoc:
    pack: bytes
    frame: Frame  # pack field unused
    off: int
    length: int


@dataclass
class _NewPack:
    frames: list[tuple[int, Future[bytes], int]]  # frame index, compressed future, ulen; emptied once written
    future: Future[tuple[str, list[int], int]] | None = None
    ulens: list[int] = field(default_factory=list)  # decompressed length of each frame


class _Builder:
    def __init__(self, store: Store, opts: BuildOptions, sink: Sink) -> None:
        self.store = store
        self.opts = opts
        self.sink = sink
        self.pool = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="shoal-build")
        self.writer = ThreadPoolExecutor(2, thread_name_prefix="shoal-write")
        # large files: their own threads, which block on a full queue (never the pool's, whose frames they'd wait for)
        self.streamer = ThreadPoolExecutor(_STREAMERS, thread_name_prefix="shoal-stream")
        self.stop = threading.Event()
        self.reuse: dict[bytes, _ReuseLoc] = {}
        self.from_store = opts.reuse_store and not opts.reuse
        self.whole_packs: dict[str, bool] = {}  # pack digest -> the store holds its whole blob
        self.pack_sizes: dict[str, int] = {}  # pack digest -> blob size, where an input's manifest says it
        self.n_reused = 0
        # chunk table
        self.chunk_index: dict[bytes, int] = {}
        self.chunk_ids: list[bytes] = []
        self.chunk_frames: list[int] = []
        self.chunk_offsets: list[int] = []
        self.chunk_lengths: list[int] = []
        # frames: index -> ("new", pack number, position) or ("reuse", pack digest, Frame)
        self.n_frames = 0
        self.reused_frames: dict[tuple[bytes, int], int] = {}
        self.reused_frame_recs: dict[int, tuple[bytes, Frame]] = {}
        self.reused_packs: list[bytes] = []
        self.new_frame_pack: dict[int, tuple[int, int]] = {}  # frame -> (new pack number, position)
        # current frame / pack
        self.cur_parts: list[memoryview] = []
        self.cur_len = 0
        self.cur_frame = -1
        self.cur_last_id = b""
        self.cur_class = _LARGE  # the frame class of the current frame's chunks (``file_class``)
        self.n_own = 0  # files that had frames of their own so far
        self.cur_pack: _NewPack | None = None
        self.pack_len = 0
        self.packs: list[_NewPack] = []
        self.writing: collections.deque[Future[tuple[str, list[int], int]]] = collections.deque()
        self.refs = 0
        self.batch = Batch(store.layout)

    # ---------------------------------------------------------------- reuse

    def load_reuse(self) -> None:
        for ref in self.opts.reuse:
            m = self.store.resolve(ref)
            idx = self.store.load_index(m)
            for cid, fi, off, ln in zip(idx.chunk_ids, idx.chunk_frames, idx.chunk_offsets, idx.chunk_lengths):
                if cid not in self.reuse:
                    f = idx.frames[fi]
                    self.reuse[cid] = _ReuseLoc(idx.packs[f.pack], f, off, ln)

    def look_up(self, ids: Iterable[bytes]) -> None:
        """With store reuse: note where the store holds each of ``ids`` not yet placed, if it holds that
        place's pack whole (format.md §5).  The catalogue records only verified locations (store.md §3)."""
        want = [c for c in ids if c not in self.chunk_index and c not in self.reuse]
        if not want:
            return
        for cid, loc in self.store.catalog.locate(want).items():
            whole = self.whole_packs.get(loc.pack)
            if whole is None:
                whole = self.whole_packs[loc.pack] = self.store.layout.has(loc.pack)
            if whole:
                self.reuse[cid] = _ReuseLoc(bytes.fromhex(loc.pack[7:]),
                                            Frame(0, loc.frame_off, loc.frame_clen, loc.frame_ulen),
                                            loc.off, loc.length)

    # ---------------------------------------------------------------- chunks -> frames -> packs

    def file_class(self, size: int, streamed: bool = False) -> int:
        """The frame class of the new chunks of the next file (of ``size`` bytes; ``streamed``: larger than
        a window), for ``add_chunk`` (format.md §5.1): only chunks of one class share a frame.  Small files
        form one class, the other files below OWN_FILE another, and each file from OWN_FILE up its own."""
        if not streamed and packing.small_file(size):
            return _SMALL
        if not streamed and not packing.own_frames(size):
            return _LARGE
        self.n_own += 1
        return self.n_own

    def add_chunk(self, cid: bytes, data: memoryview, cls: int = _LARGE) -> int:
        """Chunk ``cid`` into the table and, when new, into the current frame (format.md §5.1); ``cls``: the
        frame class of the file it comes from (``file_class``)."""
        ln = len(data)
        i, added = self._row(cid, ln)
        if not added or self._reused(cid, ln):
            return i
        if packing.frame_full(self.cur_len, ln) or (self.cur_parts and cls != self.cur_class):
            self.close_frame()
        if not self.cur_parts:
            self.cur_frame = self.n_frames
            self.n_frames += 1
            self.cur_class = cls
        self.chunk_frames.append(self.cur_frame)
        self.chunk_offsets.append(self.cur_len)
        self.cur_parts.append(data)
        self.cur_len += ln
        self.cur_last_id = cid
        if packing.frame_ends_after(cid, ln, self.cur_len, cls == _SMALL):
            self.close_frame()
        return i

    def _row(self, cid: bytes, ln: int) -> tuple[int, bool]:
        """The chunk table row of ``cid``, appended on its first reference; (row, whether it was added)."""
        i = self.chunk_index.get(cid)
        if i is not None:
            return i, False
        i = len(self.chunk_ids)
        self.chunk_index[cid] = i
        self.chunk_ids.append(cid)
        self.chunk_lengths.append(ln)
        return i, True

    def _reused(self, cid: bytes, ln: int) -> bool:
        """Place the chunk just added to the table where ``reuse`` says it is stored, if it does."""
        r = self.reuse.get(cid)
        if r is None or r.length != ln:
            return False
        self.n_reused += 1
        key = (r.pack, r.frame.offset)
        fi = self.reused_frames.get(key)
        if fi is None:
            fi = self.reused_frames[key] = self.n_frames
            self.n_frames += 1
            self.reused_frame_recs[fi] = (r.pack, r.frame)
            if r.pack not in self.reused_packs:
                self.reused_packs.append(r.pack)
        self.chunk_frames.append(fi)
        self.chunk_offsets.append(r.off)
        return True

    def place_chunk(self, cid: bytes, ln: int) -> int:
        """A chunk whose bytes are not at hand: it must be in ``reuse`` (a stored chunk of an input)."""
        i, added = self._row(cid, ln)
        if not added:
            return i
        if not self._reused(cid, ln):
            raise IntegrityError(f"chunk sha256:{cid.hex()} ({ln} bytes) has no stored location among the inputs")
        return i

    def close_frame(self) -> None:
        if not self.cur_parts:
            return
        ulen = self.cur_len
        fut = self.pool.submit(_compress, self.cur_parts)
        if self.cur_pack is not None and packing.pack_full(self.pack_len, ulen):
            self.close_pack()
        if self.cur_pack is None:
            self.cur_pack = _NewPack([])
            self.pack_len = 0
        self.cur_pack.frames.append((self.cur_frame, fut, ulen))
        self.pack_len += ulen
        self.cur_parts, self.cur_len = [], 0
        if packing.pack_ends_after(self.cur_last_id, ulen, self.pack_len):
            self.close_pack()

    def close_pack(self) -> None:
        p = self.cur_pack
        if p is None:
            return
        self.cur_pack = None
        number = len(self.packs)
        for pos, (fi, _, ulen) in enumerate(p.frames):
            self.new_frame_pack[fi] = (number, pos)
            p.ulens.append(ulen)
        p.future = self.writer.submit(self._write_pack, p)
        self.packs.append(p)
        # bound the packs in flight (their frames stay in memory): wait for the oldest beyond the limit.
        # A deque, not a scan of every pack: Future.done() takes a lock, and the scan cost 7% of a build.
        self.writing.append(p.future)
        while self.writing and self.writing[0].done():
            self.writing.popleft()
        if len(self.writing) > _PENDING_PACKS:
            self.writing.popleft().result()

    def _write_pack(self, p: _NewPack) -> tuple[str, list[int], int]:
        blobs = [f.result() for _, f, _ in p.frames]
        digest, size = self.store.layout.put_parts(blobs, batch=self.batch)
        p.frames = []  # the compressed frames are on disk: let them go (they are the size of the image)
        return digest, [len(b) for b in blobs], size

    # ---------------------------------------------------------------- files

    def chunked_files(self, source: TreeSource) -> Iterator[Chunked]:
        """Chunk the FILE entries in parallel, yielding results in canonical order, bounded in memory.
        Small files travel in batches so a task costs more than its scheduling; a file larger than a
        window streams through a bounded queue, so no file is ever in memory whole."""
        batches: list[list[Entry]] = [[]]
        size = 0
        for e in source.entries:
            if e.kind != Kind.FILE:
                continue
            big = e.size > WINDOW
            if batches[-1] and (big or size + e.size > _BATCH_BYTES or len(batches[-1]) >= _BATCH_FILES):
                batches.append([])
                size = 0
            batches[-1].append(e)
            size += e.size
            if big:
                batches.append([])
                size = 0
        q: collections.deque[tuple[Future[list[Chunked]] | Chunked, int]] = collections.deque()
        inflight = 0
        it = iter(b for b in batches if b)
        done = False
        while True:
            while not done and (inflight < _INFLIGHT_BYTES or not q):
                batch = next(it, None)
                if batch is None:
                    done = True
                    break
                if len(batch) == 1 and batch[0].size > WINDOW:
                    c = Chunked((), streamed=True)
                    stream = Streamed(self.stop)
                    c.pieces = stream
                    self.streamer.submit(stream.produce, source, batch[0], c)
                    q.append((c, _STREAM_BYTES))
                    inflight += _STREAM_BYTES
                    continue
                nbytes = sum(e.size for e in batch)
                q.append((self.pool.submit(chunk_batch, source, batch), nbytes))
                inflight += nbytes
            if not q:
                return
            item, nbytes = q.popleft()
            inflight -= nbytes
            if isinstance(item, Chunked):
                yield item
            else:
                files = item.result()
                if self.from_store:  # one catalogue query for the batch (a streamed file: in add_file)
                    self.look_up(cid for c in files for _, chunks in c.pieces for cid, _, _ in chunks)
                yield from files

    def add_file(self, c: Chunked) -> tuple[int, ...]:
        """Add the chunks of one file, window by window; its chunk indexes."""
        refs: list[int] = []
        cls = self.file_class(c.size, c.streamed)  # a window-sized file's size is known here
        for data, chunks in c.pieces:
            if c.streamed and self.from_store:
                self.look_up(cid for cid, _, _ in chunks)
            mv = memoryview(data)
            refs.extend(self.add_chunk(cid, mv[o : o + n], cls) for cid, o, n in chunks)
        return tuple(refs)

    def run(self, tree: TreeSource, t0: float) -> BuildResult:
        total = sum(e.size for e in tree.entries if e.kind == Kind.FILE)
        self.sink.start("build", total)
        self.load_reuse()
        entries: list[Entry] = []
        results = self.chunked_files(tree)
        bytes_in = 0
        for e in tree.entries:
            if e.kind == Kind.FILE:
                c = next(results)
                refs = self.add_file(c)
                self.refs += len(refs)
                bytes_in += c.size
                e = Entry(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs,
                          size=c.size, chunks=refs)
                self.sink.advance("build", c.size)
            entries.append(e)
        self.close_frame()
        self.close_pack()
        written = [p.future.result() for p in self.packs]  # type: ignore[union-attr]
        self.sink.finish("build")
        return self.finish(entries, written, bytes_in, t0, tree.skipped)

    def finish(self, entries: list[Entry], written: list[tuple[str, list[int], int]], bytes_in: int,
               started: float, skipped: list[bytes]) -> BuildResult:
        layout = self.store.layout
        n_new = len(written)
        pack_digests = [bytes.fromhex(w[0][7:]) for w in written] + self.reused_packs
        frames: list[Frame | None] = [None] * self.n_frames
        for fi, (number, pos) in self.new_frame_pack.items():
            clens = written[number][1]
            frames[fi] = Frame(number, sum(clens[:pos]), clens[pos], self.packs[number].ulens[pos])
        reused_pos = {p: n_new + i for i, p in enumerate(self.reused_packs)}
        for fi, (pack, f) in self.reused_frame_recs.items():
            frames[fi] = Frame(reused_pos[pack], f.offset, f.clen, f.ulen)
        assert all(f is not None for f in frames)
        idx = fidx.make_index(entries, self.chunk_ids, self.chunk_frames, self.chunk_offsets,
                              self.chunk_lengths, frames, pack_digests)  # type: ignore[arg-type]
        blob = fidx.compress(fidx.encode(idx))
        root = "sha256:" + idx.root.hex()
        sizes = {w[0]: w[2] for w in written}
        for p in self.reused_packs:
            d = "sha256:" + p.hex()
            sizes[d] = self.pack_sizes[d] if d in self.pack_sizes else layout.size(d)
        pack_descs = [Descriptor(mt.PACK, "sha256:" + p.hex(), sizes["sha256:" + p.hex()]) for p in pack_digests]
        idx_desc = Descriptor(mt.INDEX, self._put(blob), len(blob))
        cfg = build_config(ImageConfig(**{**self.opts.config.__dict__, "root": root}))
        cfg_desc = Descriptor(mt.CONFIG, self._put(cfg), len(cfg))
        raw, digest = build_manifest(cfg_desc, idx_desc, pack_descs, root)
        self._put(raw)
        self.batch.commit()
        m = parse_manifest(raw, digest)
        self.store.register_chunks(m, idx, verified=self.new_frame_pack.keys())  # made here from hashed data
        return BuildResult(
            manifest=m, files=idx.files, bytes_in=bytes_in, chunks=self.refs, unique_chunks=len(self.chunk_ids),
            new_chunks=len(self.chunk_ids) - self.n_reused,
            packs=len(pack_digests), new_packs=n_new, stored_bytes=m.size,
            added_bytes=self.batch.added_bytes, seconds=time.monotonic() - started, skipped=tuple(skipped),
        )

    def _put(self, data: bytes) -> str:
        return self.store.layout.put(data, batch=self.batch)

    def close(self) -> None:
        self.stop.set()
        self.batch.abort()
        self.streamer.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)


def build(store: Store, source: str | bytes | os.PathLike[str], ref: str | None,
          opts: BuildOptions | None = None, sink: Sink = NULL) -> BuildResult:
    """Build the directory ``source`` into ``store`` and tag it ``ref`` (if given)."""
    opts = opts or BuildOptions()
    t0 = time.monotonic()
    return build_tree(store, DirSource(source, opts.source_date_epoch), ref, opts, sink, t0)


def build_tree(store: Store, tree: TreeSource, ref: str | None, opts: BuildOptions | None = None,
               sink: Sink = NULL, started: float | None = None) -> BuildResult:
    """Build any TreeSource (a directory, a converted image) into ``store``."""
    b = _Builder(store, opts or BuildOptions(), sink)
    try:
        with store.layout.writing():
            result = b.run(tree, time.monotonic() if started is None else started)
            if ref is not None:
                store.tag(ref, result.manifest)
    finally:
        b.close()
    log.info("built %s: %d files, %d bytes in %.2fs", result.manifest.digest, result.files, result.bytes_in,
             result.seconds)
    return result


@dataclass(frozen=True)
class Placed:
    """Where a stored chunk is: pack (raw sha256), its blob size, the frame record (pack field unused) and
    the chunk's offset and length in the decompressed frame."""

    pack: bytes
    pack_size: int
    frame: Frame
    off: int
    length: int


@dataclass(frozen=True)
class PlacedTree:
    """A tree whose file contents are chunk-id sequences, not bytes on disk (a merge of indexes,
    docs/spec/lineage.md): ``entries`` in canonical order, each FILE's ``chunks`` indexing ``ids``;
    ``places`` locates stored chunks, ``new`` holds the bytes of the chunks no input stores (a file the
    merge wrote); every id is in one of them."""

    entries: list[Entry]
    ids: list[bytes]
    places: dict[bytes, Placed]
    new: dict[bytes, bytes]


def build_placed(store: Store, tree: PlacedTree, ref: str | None, opts: BuildOptions | None = None,
                 sink: Sink = NULL) -> BuildResult:
    """Make an image of ``tree`` with the build machinery (chunk table, frames, packs): stored chunks are
    referenced where they are (no chunk data is read, decompressed or copied), new chunks are packed as a
    build packs them.  ``opts.reuse``/``reuse_store`` are not used: the places are the reuse set."""
    opts = opts or BuildOptions()
    t0 = time.monotonic()
    b = _Builder(store, BuildOptions(workers=opts.workers, reuse_store=False, config=opts.config), sink)
    try:
        with store.layout.writing():
            for cid, p in tree.places.items():
                if cid not in tree.new:
                    b.reuse[cid] = _ReuseLoc(p.pack, p.frame, p.off, p.length)
                    b.pack_sizes["sha256:" + p.pack.hex()] = p.pack_size
            entries: list[Entry] = []
            bytes_in = 0
            for e in tree.entries:
                if e.kind == Kind.FILE:
                    cls = b.file_class(e.size)
                    refs = []
                    for c in e.chunks:
                        cid = tree.ids[c]
                        data = tree.new.get(cid)
                        if data is not None:
                            refs.append(b.add_chunk(cid, memoryview(data), cls))
                        else:
                            refs.append(b.place_chunk(cid, tree.places[cid].length))
                    b.refs += len(refs)
                    bytes_in += e.size
                    e = Entry(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs, size=e.size,
                              chunks=tuple(refs))
                entries.append(e)
            b.close_frame()
            b.close_pack()
            written = [p.future.result() for p in b.packs]  # type: ignore[union-attr]
            result = b.finish(entries, written, bytes_in, t0, [])
            if ref is not None:
                store.tag(ref, result.manifest)
    finally:
        b.close()
    log.info("assembled %s: %d files, %d new chunks, %d new packs", result.manifest.digest, result.files,
             result.new_chunks, result.new_packs)
    return result
