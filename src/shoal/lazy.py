"""Lazy frame source: local store first, then HTTP range reads on the image's packs (docs/spec/mount.md §5).

Every frame fetched from the network is decompressed and every chunk in it is checked against its
sha256 *before* it is served and written to the store (as a partial pack); a frame that fails is
never cached and the read fails with IntegrityError (EIO through FUSE).  Frames land in the shared
store, so any other image holding the same chunks reuses them.

Fetches are *jobs*: one range request covering one or more frames that sit back to back in a pack,
or one frame whose raw bytes someone else is already fetching (``early``: a recorded profile fetched
before the mount existed, see ``shoal.early``; a failed one falls back to a request).
Each frame being fetched has a future in ``_inflight``, so concurrent readers of one frame share one
request.  Demand reads (``fetch``, ``ensure``) run in their own thread pool and wait at most
``fetch_timeout`` seconds (then TransportError, EIO through FUSE; while the fetch given up on still
hangs, further reads of its frames wait at most a quarter of that, 0.5 s at most: the kernel retries
a failed read, and that retry must not double the wait); ``prefetch`` and ``readahead``
run in a background pool.  A demand read that needs a frame whose background job has not started
yet runs that job itself, so a long prefetch queue never delays a read.

A demand request for a short frame (under FRAME_MIN decompressed: the small-file frames of format.md
§5.1) also carries the short frames that follow it in the pack, up to ``neighbours`` compressed bytes
(32 KiB by default, 0 for none; a mount with a profile bundle takes none): a program reading small files
reads their neighbours next (Python's imports read a package's modules, which sit side by side), and
each of those reads would otherwise wait for a request of its own (mount.md §5).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable

from shoal import mediatypes as mt
from shoal.early import Handover
from shoal.errors import IntegrityError, NotFound, ShoalError, TransportError
from shoal.format.manifest import ShoalManifest
from shoal.format.model import Index
from shoal.format.packing import FRAME_MIN, verify_frame
from shoal.inherited import keep_inherited
from shoal.reader import FrameSource, StoreSource
from shoal.store import Store
from shoal.store.catalog import close_connections
from shoal.transports.base import BlobInfo, ImageSource

__all__ = ["NEIGHBOURS", "LazySource", "LazyStats"]

log = logging.getLogger(__name__)

# frames this source decompressed and checked, not yet taken by the Reader (``opened``): the newest are kept
_OPENED_MAX = 64

# compressed bytes of the short frames after a demanded short frame that its request also carries
NEIGHBOURS = 32 * 1024



@dataclass
class LazyStats:
    """Counters of one lazy source (``shoal status`` shows them under ``stats.source``)."""

    frames_total: int = 0
    frames_cached: int = 0  # frames whose bytes are on this machine (fetched by anyone, or held before)
    bytes_total: int = 0  # compressed bytes of every pack of the image
    bytes_cached: int = 0  # compressed bytes of the cached frames
    frames_local: int = 0  # fetch() answered from the store
    frames_fetched: int = 0  # frames this source fetched and verified
    bytes_fetched: int = 0  # bytes of range answers
    requests: int = 0  # range requests
    readahead_frames: int = 0  # frames queued by read-ahead
    neighbour_frames: int = 0  # short frames carried by a demand request for the short frame before them
    early_frames: int = 0  # frames fetched before the mount started (a profile), verified here
    failures: int = 0  # failed range requests and frames that failed verification
    timeouts: int = 0  # demand reads that gave up after fetch_timeout
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass(eq=False)
class _Job:
    """One range request: ``frames`` (indices) lie back to back from ``start`` in ``pack``."""

    pack: str
    start: int
    length: int
    frames: list[int]
    started: bool = False
    early: Future[bytes] | None = None  # raw bytes fetched by someone else (one frame)


class SourceClosed(TransportError):
    """The lazy source was closed (the mount is going away)."""


class LazySource(FrameSource):
    """A FrameSource for Reader that fetches missing frames from ``remote`` and caches them in ``store``.

    ``reopen`` makes a fresh remote for ``after_fork`` (a forked mount daemon must not share the
    parent's connections); without it the daemon keeps using ``remote``.
    """

    def __init__(self, store: Store, remote: ImageSource, manifest: ShoalManifest, index: Index, *,
                 reopen: Callable[[], ImageSource] | None = None, fetch_timeout: float = 30.0,
                 concurrency: int = 8, max_range: int = 4 * 1024 * 1024, where: str = "",
                 early: dict[int, Future[bytes]] | None = None, neighbours: int = NEIGHBOURS) -> None:
        self._store: Store | None = store
        self._root = store.root
        self.remote = remote
        self.index = index
        self.where = where or "the registry"
        self.fetch_timeout = fetch_timeout
        self.concurrency = max(1, concurrency)
        self.max_range = max_range
        self.neighbours = max(0, neighbours)
        self._reopen = reopen
        self.sizes = {p.digest: p.size for p in manifest.packs}
        self._pack_of = ["sha256:" + p.hex() for p in index.packs]
        self._frame_of: dict[tuple[str, int], int] = {
            (self._pack_of[f.pack], f.offset): fi for fi, f in enumerate(index.frames)
        }
        self._early: dict[int, Future[bytes]] = dict(early or {})  # frame -> raw bytes being fetched elsewhere
        self._handover: Handover | None = None  # the early frames, across the daemon's fork
        self._init_runtime()
        self._stats = LazyStats(frames_total=len(index.frames), bytes_total=sum(self.sizes.values()))

    def _init_runtime(self) -> None:
        """Locks, pools and the in-flight table: made again in a forked child."""
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[Future[bytes], _Job]] = {}
        self._demand: ThreadPoolExecutor | None = None
        self._background: ThreadPoolExecutor | None = None
        self._cached: set[int] | None = None  # frames known to be on this machine (scanned on first use)
        self._stored: set[int] = set()  # frames this source fetched and stored (a claim skips them)
        self._closed = False
        self._running = 0  # jobs between their request and their last future (under _idle)
        # frame -> (the future a demand read gave up on, until when): the kernel retries a failed read at
        # once, and that retry must not wait another fetch_timeout on the same hung request
        self._gave_up: dict[int, tuple[Future[bytes], float]] = {}
        self._idle = threading.Condition(self._lock)
        self._opened: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()

    # ---------------------------------------------------------------- FrameSource

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        fi = self._frame_of.get((pack, offset))
        # one catalogue look answers both "stored in this very frame" and "its chunks are local": two
        # looks would let a job storing the frame in between make it seem stored elsewhere
        here, local = self._placed(fi) if fi is not None else (False, False)
        if here or self.store.layout.has(pack):
            try:
                data = self.store.read_frame(pack, offset, length)
                with self._stats.lock:
                    self._stats.frames_local += 1
                return data
            except NotFound:
                pass
        if fi is None or self.index.frames[fi].clen != length:
            raise NotFound(f"no frame at {pack}@{offset} in this image")
        if local:
            raise NotFound("frame not cached, but its chunks are: read them by id")
        fut = self._claim([fi], demand=True).get(fi)
        if fut is None:  # another reader's fetch stored it between the look above and the claim
            return self.store.read_frame(pack, offset, length)
        return self._wait({fi: fut})[fi]

    def opened(self, pack: str, offset: int) -> bytes | None:
        with self._lock:
            return self._opened.pop((pack, offset), None)

    def find_chunk(self, cid: bytes) -> bytes | None:
        return StoreSource(self.store).find_chunk(cid)

    @property
    def fetches_ahead(self) -> bool:
        return True

    @property
    def store(self) -> Store:
        """The local store, opened again after ``before_fork`` closed it."""
        st = self._store
        if st is None:
            st = self._store = Store.open(self._root)
        return st

    def before_fork(self) -> None:
        """In the parent, just before the mount daemon forks: end the thread pools, close every sqlite
        connection (the next use in either process opens a new one), and prepare to hand the frames
        still being fetched early to the daemon."""
        for pool in (self._demand, self._background):
            if pool is not None:
                pool.shutdown(wait=True)
        self._demand = self._background = None
        self._store = None
        # no sqlite state may cross the fork: SQLite keeps per-process lock bookkeeping that a child would
        # wrongly trust (then the parent, exiting, deletes the WAL index under it: "disk I/O error")
        close_connections()
        if self._early:
            self._handover = Handover(self._early)

    def after_fork_parent(self) -> None:
        """In the parent, after the fork: send the early frames to the daemon as they arrive."""
        if self._handover is not None:
            self._handover.send()
            self._early = {}

    def handover_wait(self, timeout: float | None = None) -> None:
        """Wait until the daemon has every early frame (or ``timeout``, default ``fetch_timeout``)."""
        if self._handover is not None:
            self._handover.wait(self.fetch_timeout if timeout is None else timeout)

    def after_fork(self) -> None:
        """In a forked mount daemon: a new sqlite connection, new HTTP connections, new pools and locks."""
        if self._store is not None:  # before_fork was not called: leave the inherited one alone
            keep_inherited(self._store)
            self._store = None
        if self._handover is not None:
            self._early = self._handover.receive()
            self._handover = None
        else:
            self._early = {}  # the threads fetching them stayed in the parent
        if self._reopen is not None:
            keep_inherited(self.remote)
            self.remote = self._reopen()
        self._init_runtime()
        self._stats.lock = threading.Lock()

    def close(self, timeout: float = 2.0) -> None:
        """Drop queued work, give running fetches ``timeout`` seconds to store what they verified, and
        fail whatever still waits (the mount is going away)."""
        with self._lock:
            self._closed = True
        for pool in (self._demand, self._background):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout)
            pending = list(self._inflight.values())
            self._inflight.clear()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(SourceClosed("the lazy source was closed"))

    # ---------------------------------------------------------------- mount hooks

    def ensure(self, frames: list[int]) -> None:
        """Make ``frames`` local (one merged request per run of adjacent frames, in parallel), waiting
        at most ``fetch_timeout``; used by a read that needs several frames at once."""
        need = [fi for fi in dict.fromkeys(frames) if not self._is_cached(fi)]
        if need:
            self._wait(self._claim(need, demand=True))

    def readahead(self, frames: list[int]) -> None:
        """Fetch ``frames`` in the background (never blocks, never raises)."""
        need = [fi for fi in dict.fromkeys(frames) if fi not in self._inflight and not self._is_cached(fi)]
        if not need or self._closed:
            return
        with self._stats.lock:
            self._stats.readahead_frames += len(need)
        futs = self._claim(need, demand=False)
        for fut in futs.values():
            fut.add_done_callback(_quiet)

    def prefetch(self, frames: list[int], concurrency: int = 8) -> int:
        """Fetch ``frames`` (indices, in priority order) that the store lacks, merging back-to-back frames
        of a pack into one range request; wait for all of them and return the bytes fetched.  Raises
        the first failure after every request has ended."""
        before = self._stats.bytes_fetched
        need = [fi for fi in dict.fromkeys(frames) if not self._is_cached(fi)]
        futs = self._claim(need, demand=False)
        wait_futures(list(futs.values()))
        # a job settles its futures once the frames verify and stores them afterwards: wait until it has
        # (its frames left the in-flight table), so that the store holds what prefetch answered for and
        # a pack fetched whole is promoted below
        with self._idle:
            self._idle.wait_for(lambda: not any((hit := self._inflight.get(fi)) is not None and hit[0] is fut
                                                for fi, fut in futs.items()), self.fetch_timeout)
        for fut in futs.values():
            exc = fut.exception()
            if exc is not None:
                raise exc
        self._promote({self._pack_of[self.index.frames[fi].pack] for fi in need})
        return self._stats.bytes_fetched - before

    def _promote(self, packs: set[str]) -> None:
        """Packs now held whole (every frame fetched) become complete, verified blobs in the store."""
        for pack in sorted(packs):
            size = self.sizes.get(pack, -1)
            if size > 0 and self.store.partial.present(pack) == size:
                try:
                    self.store.partial.try_promote(pack, size)
                except (ShoalError, OSError) as exc:  # the partial pack still serves every frame
                    log.warning("could not promote %s to a complete blob: %s", pack, exc)

    @property
    def stats(self) -> LazyStats:
        """The counters, with the cached-frame figures brought up to date."""
        cached = self._cached_set()
        with self._stats.lock:
            self._stats.frames_cached = len(cached)
            self._stats.bytes_cached = sum(self.index.frames[fi].clen for fi in cached)
        return self._stats

    def cached_chunks(self) -> int:
        return sum(len(self.index.frame_chunks(fi)) for fi in self._cached_set())

    # ---------------------------------------------------------------- planning and waiting

    def _claim(self, frames: list[int], demand: bool) -> dict[int, Future[bytes]]:
        """A future for each frame: an in-flight one, or a new job's; none for a frame this source has
        stored meanwhile (it is local now: under the same lock ``_finish`` records it before it leaves
        the in-flight table, so no frame is fetched twice).  New jobs (and not yet started
        background jobs a demand read needs) are submitted to the demand or background pool."""
        out: dict[int, Future[bytes]] = {}
        steal: list[_Job] = []
        with self._lock:
            if self._closed:
                raise SourceClosed("the lazy source was closed")
            fresh: list[int] = []
            fresh_set = set(frames)
            for fi in frames:
                if fi in self._stored:  # stored by another reader since the caller looked: read it locally
                    continue
                hit = self._inflight.get(fi)
                if hit is None:
                    fresh.append(fi)
                    continue
                out[fi] = hit[0]
                if demand and not hit[1].started and hit[1] not in steal:
                    steal.append(hit[1])
            early = [fi for fi in fresh if fi in self._early]
            jobs = [_Job(self._pack_of[self.index.frames[fi].pack], self.index.frames[fi].offset,
                         self.index.frames[fi].clen, [fi], early=self._early.pop(fi)) for fi in early]
            planned = self._plan([fi for fi in fresh if fi not in early])
            if demand and self.neighbours:
                for job in planned:
                    self._carry_neighbours(job)
            jobs += planned
            for job in jobs:
                for fi in job.frames:
                    fut: Future[bytes] = Future()
                    self._inflight[fi] = (fut, job)
                    if fi in fresh_set:
                        out[fi] = fut  # a carried neighbour's failure is not the read's
            pool = self._pool(demand)
        for job in jobs + steal:
            pool.submit(self._run, job)
        return out

    def _carry_neighbours(self, job: _Job) -> None:
        """Extend a demand job that ends with a short frame by the short frames right after it in its pack
        (none in flight or local), up to ``neighbours`` compressed bytes.  Called under ``_lock``."""
        frames = self.index.frames
        if frames[job.frames[-1]].ulen >= FRAME_MIN:
            return
        budget = self.neighbours
        while True:
            fi = self._frame_of.get((job.pack, job.start + job.length))
            if fi is None:
                return
            f = frames[fi]
            if (f.ulen >= FRAME_MIN or f.clen > budget or job.length + f.clen > self.max_range
                    or fi in self._inflight or fi in self._stored or self._is_cached(fi, locked=True)):
                return
            job.frames.append(fi)
            job.length += f.clen
            budget -= f.clen
            with self._stats.lock:
                self._stats.neighbour_frames += 1

    def _pool(self, demand: bool) -> ThreadPoolExecutor:
        if demand:
            if self._demand is None:
                self._demand = ThreadPoolExecutor(self.concurrency, thread_name_prefix="shoal-lazy")
            return self._demand
        if self._background is None:
            self._background = ThreadPoolExecutor(self.concurrency, thread_name_prefix="shoal-ahead")
        return self._background

    def _plan(self, frames: list[int]) -> list[_Job]:
        """Group frames into jobs: back-to-back frames of a pack share one request (up to ``max_range``
        bytes).  Jobs come in the order of their first frame in ``frames`` (priority order)."""
        rank = {fi: r for r, fi in enumerate(frames)}
        by_pack: dict[int, list[int]] = {}
        for fi in frames:
            by_pack.setdefault(self.index.frames[fi].pack, []).append(fi)
        jobs: list[tuple[int, _Job]] = []
        for pi, fis in by_pack.items():
            fis.sort(key=lambda i: self.index.frames[i].offset)
            cur: _Job | None = None
            for fi in fis:
                f = self.index.frames[fi]
                if cur is not None and cur.start + cur.length == f.offset and cur.length + f.clen <= self.max_range:
                    cur.length += f.clen
                    cur.frames.append(fi)
                    continue
                cur = _Job(self._pack_of[pi], f.offset, f.clen, [fi])
                jobs.append((0, cur))
        jobs = [(min(rank[fi] for fi in j.frames), j) for _, j in jobs]
        jobs.sort(key=lambda t: t[0])
        return [j for _, j in jobs]

    def _wait(self, futs: dict[int, Future[bytes]]) -> dict[int, bytes]:
        """The frames' bytes, waiting at most ``fetch_timeout``; or only ``min(0.5, fetch_timeout / 4)`` when a
        read already gave up on one of these fetches, still pending, within the last ``fetch_timeout``
        (the kernel retries a failed read at once: the retry must not double the wait, yet a fetch that
        answers now, e.g. a registry that was stopped and continued, still serves it)."""
        now = time.monotonic()
        with self._lock:
            retried = [fi for fi, fut in futs.items() if not fut.done()
                       and (g := self._gave_up.get(fi)) is not None and g[0] is fut and g[1] > now]
        limit = min(0.5, self.fetch_timeout / 4) if retried else self.fetch_timeout
        done, pending = wait_futures(list(futs.values()), timeout=limit)
        if pending:
            if retried:
                raise self._timed_out(retried[0], "still ")
            until = time.monotonic() + self.fetch_timeout
            with self._lock:
                for old in [fi for fi, (f, t) in self._gave_up.items() if f.done() or t < now]:
                    del self._gave_up[old]
                for fi, fut in futs.items():
                    if fut in pending:
                        self._gave_up[fi] = (fut, until)
            raise self._timed_out(next(i for i, f in futs.items() if f in pending), "")
        return {fi: fut.result() for fi, fut in futs.items()}

    def _timed_out(self, fi: int, still: str) -> TransportError:
        with self._stats.lock:
            self._stats.timeouts += 1
        f = self.index.frames[fi]
        msg = (f"{still}no answer from {self.where} within {self.fetch_timeout:g}s for frame "
               f"{self._pack_of[f.pack]}@{f.offset} (registry unreachable?)")
        log.error("%s", msg)
        return TransportError(msg)

    # ---------------------------------------------------------------- fetching

    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.started:
                return
            job.started = True
            self._running += 1
            futs = {fi: hit[0] for fi in job.frames if (hit := self._inflight.get(fi)) is not None and hit[1] is job}
        try:
            self._run_started(job, futs)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def _run_started(self, job: _Job, futs: dict[int, Future[bytes]]) -> None:
        try:
            data = self._get(job)
        except BaseException as exc:
            with self._stats.lock:
                self._stats.failures += 1
            if not isinstance(exc, SourceClosed) and not self._closed:
                log.error("fetch of %d bytes at %s@%d from %s failed: %s", job.length, job.pack, job.start,
                          self.where, exc)
            self._finish(job, futs, {}, exc if isinstance(exc, Exception) else TransportError(str(exc)))
            return
        rows: list[tuple[bytes, str, int, int, int, int, int]] = []
        results: dict[int, bytes | Exception] = {}
        for fi in job.frames:
            f = self.index.frames[fi]
            raw = data[f.offset - job.start : f.offset - job.start + f.clen]
            try:
                rows += self._verify(fi, raw)
            except IntegrityError as exc:
                results[fi] = exc
                continue
            results[fi] = raw
            fut = futs.get(fi)
            if fut is not None and not fut.done():
                fut.set_result(raw)  # verified: serve it now, persist below
        self._finish(job, futs, results, None, rows)

    def _get(self, job: _Job) -> bytes:
        if job.early is not None:
            try:
                data = job.early.result()
            except Exception as exc:  # fetch it ourselves
                log.debug("early frame %s@%d not available (%s); fetching it", job.pack, job.start, exc)
            else:
                if len(data) == job.length:
                    with self._stats.lock:
                        self._stats.early_frames += 1
                        self._stats.bytes_fetched += len(data)
                    return data
        info = BlobInfo(job.pack, self.sizes.get(job.pack, -1), mt.PACK)
        t0 = time.monotonic()
        data = self.remote.get_blob_ranges(info, [(job.start, job.length)])[0]
        with self._stats.lock:
            self._stats.requests += 1
            self._stats.bytes_fetched += len(data)
        log.debug("fetched %d bytes (%d frames) at %s@%d in %.3fs", len(data), len(job.frames), job.pack,
                  job.start, time.monotonic() - t0)
        if len(data) != job.length:
            raise IntegrityError(f"range {job.start}+{job.length} of pack {job.pack} returned {len(data)} bytes")
        return data

    def _verify(self, fi: int, raw: bytes) -> list[tuple[bytes, str, int, int, int, int, int]]:
        """Decompress frame ``fi`` and check every chunk; return its catalogue rows."""
        f = self.index.frames[fi]
        pack = self._pack_of[f.pack]
        try:
            data, bad = verify_frame(self.index, fi, raw, f"{pack}@{f.offset}")
        except IntegrityError as exc:
            self._bad(f"frame {pack}@{f.offset} from {self.where} is corrupt (digest mismatch: {exc}); not cached")
        idx, cis = self.index, self.index.frame_chunks(fi)
        if bad is not None:
            self._bad(f"chunk sha256:{idx.chunk_ids[bad].hex()} of frame {pack}@{f.offset} from "
                      f"{self.where} failed verification (digest mismatch); not cached")
        with self._lock:  # the Reader takes it decompressed (``opened``) instead of decompressing it again
            self._opened[(pack, f.offset)] = data
            while len(self._opened) > _OPENED_MAX:
                self._opened.popitem(last=False)
        return [(idx.chunk_ids[ci], pack, f.offset, f.clen, f.ulen, idx.chunk_offsets[ci], idx.chunk_lengths[ci])
                for ci in cis]

    def _bad(self, msg: str) -> None:
        with self._stats.lock:
            self._stats.failures += 1
        log.error("%s", msg)
        raise IntegrityError(msg)

    def _finish(self, job: _Job, futs: dict[int, Future[bytes]], results: dict[int, bytes | Exception],
                error: Exception | None, rows: list[tuple[bytes, str, int, int, int, int, int]] | None = None) -> None:
        """Persist the verified frames, then settle every future and leave the in-flight table."""
        persist_error: Exception | None = None
        stored: list[int] = []
        try:
            for fi in job.frames:
                raw = results.get(fi)
                if isinstance(raw, bytes):
                    self.store.partial.put_frame(job.pack, self.index.frames[fi].offset, raw)
                    stored.append(fi)
            if rows:
                self.store.catalog.add(rows)
        except ShoalError as exc:  # a full disk: the bytes were served, the cache stays as it was
            persist_error = exc
            log.warning("could not cache frames of %s: %s", job.pack, exc)
        with self._stats.lock:
            self._stats.frames_fetched += len(stored)
        with self._lock:
            self._stored.update(stored)
            if self._cached is not None:
                self._cached.update(stored)
            for fi in job.frames:
                hit = self._inflight.get(fi)
                if hit is not None and hit[1] is job:
                    del self._inflight[fi]
        for fi in job.frames:
            fut = futs.get(fi)
            if fut is None or fut.done():
                continue
            res = results.get(fi)
            if isinstance(res, bytes):
                fut.set_result(res)
            else:
                fut.set_exception(res or error or persist_error or TransportError("fetch failed"))

    # ---------------------------------------------------------------- what is local

    def _is_cached(self, fi: int, *, locked: bool = False) -> bool:
        """Whether frame ``fi`` is on this machine (``locked``: the caller holds ``_lock``)."""
        cached = self._cached
        if cached is not None and fi in cached:
            return True
        if not self._held(fi):
            return False
        if cached is not None:
            if locked:
                cached.add(fi)
            else:
                with self._lock:
                    cached.add(fi)
        return True

    def _held(self, fi: int) -> bool:
        """The store holds frame ``fi``'s pack whole, or every chunk of it (one look each)."""
        return self.store.layout.has(self._pack_of[self.index.frames[fi].pack]) or self._all_chunks_local(fi)

    def _cached_set(self) -> set[int]:
        if self._cached is None:
            have: set[int] = set()
            ids = self.index.chunk_ids
            store = self.store
            local = store.catalog.present(ids)
            # one look per pack, not per frame: an index may hold a million frame records of one pack
            held = store.layout.held(self._pack_of)
            whole = {pi for pi, p in enumerate(self._pack_of) if p in held}
            frames = self.index.frames if local or whole else []  # a new store holds none of them
            for fi, f in enumerate(frames):
                if f.pack in whole:
                    have.add(fi)
                    continue
                cis = self.index.frame_chunks(fi)
                if cis and all(ids[ci] in local for ci in cis):
                    have.add(fi)
            with self._lock:
                if self._cached is None:  # with what a job stored while the catalogue was read (its
                    self._cached = have | self._stored  # _finish saw no set to add to yet)
        with self._lock:
            return set(self._cached)

    def _catalogued_here(self, fi: int) -> bool:
        """True if the catalogue places every chunk of frame ``fi`` in this very frame of the store: the
        partial pack holds bytes verified for this index's claim (a partial frame another image stored
        at the same offset with other bytes is never read in its place)."""
        return self._placed(fi)[0]

    def _placed(self, fi: int) -> tuple[bool, bool]:
        """(every chunk of frame ``fi`` catalogued in this very frame, every chunk catalogued somewhere),
        from one catalogue look (one read of the database for a frame of up to 500 chunks, so a job
        storing the frame meanwhile is seen by both answers or by neither)."""
        f = self.index.frames[fi]
        pack = self._pack_of[f.pack]
        ids = [self.index.chunk_ids[ci] for ci in self.index.frame_chunks(fi)]
        if not ids:
            return False, False
        locs = self.store.catalog.locate(ids)
        local = all(c in locs for c in ids)
        here = local and all(loc.pack == pack and loc.frame_off == f.offset for loc in locs.values())
        return here, local

    def _all_chunks_local(self, fi: int) -> bool:
        ids = [self.index.chunk_ids[ci] for ci in self.index.frame_chunks(fi)]
        return bool(ids) and len(self.store.catalog.locate(ids)) == len(ids)


def _quiet(fut: Future[bytes]) -> None:
    """Read-ahead failures are logged by the job; nobody waits for them."""
    fut.exception()
