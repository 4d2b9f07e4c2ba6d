"""Profile bundles for mounts (docs/spec/bundle.md): made by ``shoal profile``, served by a lazy mount.

- ``build`` makes the bundle of a recording (``Recording``: the directories the workload listed, the
  files and chunks it read) from the image's index and verified chunks.
- ``check`` opens a bundle blob against the manifest's root (``format.bundle.open_bundle``): a bundle
  that fails is logged and ignored whole, never served.
- ``BundleSource`` wraps a mount's frame source: the Reader takes the bundle's chunks from it
  (``held_chunk``, hashed against the index like every chunk), batch fetches and prefetch leave out
  frames holding one of them, and read-ahead frames holding any chunk of a file the bundle lists.  A
  mount hands it the blob unchecked (``deferred``): the daemon checks it in two steps while the
  container starts (bundle.md §3.6, §6.1).
- Locally a bundle is ``STORE/profiles/<manifest hex>.bundle`` beside the profile (``save_local``,
  ``load_local``); in a registry it is a layer of the profile artifact (``mount/profile.py``).

This module imports nothing of the mount's upper layers (``remote`` and ``record`` use it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

from shoal.atomicfile import Durability, write_atomic
from shoal.errors import FormatError, IntegrityError, ShoalError, TransportError
from shoal.format import bundle as fb
from shoal.format.model import Index
from shoal.mount.profile import Recording, local_path
from shoal.reader import ForwardingSource, FrameSource, Reader

__all__ = ["BundleSource", "BundleStats", "build", "check", "save_local", "load_local", "bundle_path"]

log = logging.getLogger(__name__)

# the check of a bundle's tree waits until no read asked for a chunk this long, or at most SETTLE_MAX s
# (BundleSource._settled)
SETTLE_QUIET = 0.25
SETTLE_MAX = 5.0


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


class ArrivingBlob:
    """A bundle blob (``fb.Blob``) filled as its bytes arrive, by the thread running ``fill`` (bundle.md
    §6.2): ``get`` waits for the bytes it asks for, and raises the transfer's error if they never come."""

    def __init__(self, size: int, timeout: float = 30.0) -> None:
        self._buf = bytearray(size)
        self._have = 0
        self._done = False
        self._error: ShoalError | None = None
        self._cond = threading.Condition()
        self.timeout = timeout  # longest wait of ``get`` for its bytes (a registry that trickles them)

    @property
    def size(self) -> int:
        return len(self._buf)

    def fill(self, pieces: Iterable[bytes]) -> None:
        """Copy ``pieces`` in, in order, then end the blob (with the error their iteration raised: a
        verifying stream raises at its end when the digest does not match)."""
        err: ShoalError | None = None
        try:
            for piece in pieces:
                if self._done:  # abandoned by a reader that waited too long
                    return
                n = len(piece)
                if self._have + n > len(self._buf):
                    raise IntegrityError(f"bundle: more than the {len(self._buf)} bytes its descriptor states")
                self._buf[self._have : self._have + n] = piece  # same length: nothing moves under a reader
                with self._cond:
                    self._have += n
                    self._cond.notify_all()
            if self._have != len(self._buf):
                raise IntegrityError(f"bundle: truncated at {self._have} of {len(self._buf)} bytes")
        except ShoalError as exc:
            err = exc
        except (OSError, ValueError) as exc:
            err = TransportError(f"bundle: {exc}")
        with self._cond:
            if not self._done:
                self._done = True
                self._error = err
            self._cond.notify_all()

    def get(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` once they are here; TransportError (and the transfer abandoned) when they
        took longer than ``timeout`` (as a demand read gives up on a frame after ``--fetch-timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._have >= end or self._done, self.timeout):
                self._done = True
                self._error = TransportError(f"bundle: its bytes up to {end} took longer than {self.timeout:g}s "
                                             f"({self._have} of {len(self._buf)} arrived)")
                self._cond.notify_all()
            if self._have < end:
                raise self._error or IntegrityError("bundle: truncated")
        return bytes(self._buf[start:end])

    def whole(self) -> bytes:
        """Every byte, once the transfer ended and its digest matched; else its error."""
        self.get(0, len(self._buf))
        with self._cond:
            self._cond.wait_for(lambda: self._done)  # the digest is checked after the last byte
            if self._error is not None:
                raise self._error
        return bytes(self._buf)


@dataclass
class _Deferred:
    """A bundle not checked yet: its bytes (``blob``), or a ``fetch`` of them (``size`` bytes), and what
    to check them against."""

    blob: bytes | None
    fetch: Callable[[], Iterable[bytes]] | None
    size: int
    root: str
    image: str
    keep: Callable[[bytes], object] | None
    timeout: float = 30.0
    arriving: ArrivingBlob | None = None


class BundleSource(ForwardingSource):
    """``inner`` plus a bundle's chunks (bundle.md §6), from a blob read here (``deferred``, bundle.md
    §3.6, §6.1) so that the check overlaps the container's start instead of delaying the mount; the
    blob may still be arriving (``fetch``: the mount daemon streams it, §6.2).
    Once the mount is live (``serving``), a thread reads the header, opens every data frame, verifies the
    index's directories the header lists and, once the workload's start has settled, checks the partial
    tree; a read that comes first reads the header and opens the frame it needs itself (waiting for its
    bytes).  A chunk is handed out only after its frame's chunks were hashed against
    their ids (and the Reader hashes it again against the index); a bundle that fails any check, or
    whose transfer fails, is logged and dropped whole, and the source serves as ``inner`` alone."""

    def __init__(self, inner: FrameSource, index: Index, deferred: _Deferred) -> None:
        super().__init__(inner)
        self._index = index
        self._chunks: dict[bytes, bytes] = {}
        self._held_frames: frozenset[int] = frozenset()
        self._file_frames: frozenset[int] = frozenset()
        self._served: set[bytes] = set()
        self._lock = threading.Lock()
        self._data_lock = threading.Lock()  # the deferred bundle's state below
        self._data: fb.BundleData | None = None
        self._pending: _Deferred | None = deferred  # None once checked or refused
        self._asked = threading.Event()  # a read or the header thread asked for the bundle
        self._live_at = 0.0  # when the mount went live (serving), 0 before
        self._last_use = 0.0  # when a read last asked for a chunk
        self.bundle = BundleStats(deferred.size, 0)
        self._state = "pending"

    @classmethod
    def deferred(cls, inner: FrameSource, index: Index, blob: bytes | None, root: str, image: str,
                 keep: Callable[[bytes], object] | None = None,
                 fetch: Callable[[], Iterable[bytes]] | None = None, size: int = 0,
                 timeout: float = 30.0) -> "BundleSource":
        """A source whose bundle ``blob`` (or the ``size`` bytes ``fetch`` streams, in a thread of the
        process that serves: never before a fork) is checked against ``root`` (the manifest's) as it is
        used; ``keep`` hears the blob once it passed every check (to save it locally).  A read waits at
        most ``timeout`` for the bytes it needs (then the bundle is dropped and the frames serve)."""
        if blob is not None:
            size = len(blob)
        return cls(inner, index, deferred=_Deferred(blob, fetch, size, root, image, keep, timeout))

    @property
    def bundle_state(self) -> str:
        return self._state

    def _frames_of(self, ids: Iterable[bytes], files: Iterable[fb.BundleFile]) -> None:
        index = self._index
        held = set(ids)
        # C loops over the index's 13,000 chunks: the header thread runs while the mount comes up
        self._held_frames = frozenset(compress(index.chunk_frames, map(held.__contains__, index.chunk_ids)))
        # frames of the files the workload read: the bundle says which of their bytes it reads, so
        # read-ahead there would fetch what the profile saw go unread
        read = {cid for f in files for cid in f.ids}
        self._file_frames = frozenset(compress(index.chunk_frames, map(read.__contains__, index.chunk_ids)))
        self.bundle.bundle_chunks = len(held)

    def _header(self) -> fb.BundleData | None:
        """The deferred bundle with its header read (once), or None (none, or refused)."""
        if self._data is not None or self._pending is None:
            return self._data
        with self._data_lock:
            return self._opened()

    def _start_fetch(self, p: _Deferred) -> fb.Blob:
        """The blob to read: its bytes, or (once) a thread streaming them into an ``ArrivingBlob``."""
        if p.blob is not None or p.fetch is None:
            return fb.WholeBlob(p.blob or b"")
        if p.arriving is None:
            p.arriving = ArrivingBlob(p.size, p.timeout)
            fetch, into = p.fetch, p.arriving
            threading.Thread(target=lambda: into.fill(fetch()), name="shoal-bundle-fetch", daemon=True).start()
        return p.arriving

    def _opened(self) -> fb.BundleData | None:
        """``_header`` under ``_data_lock``."""
        p = self._pending
        if self._data is None and p is not None:
            self._asked.set()
            try:
                if not p.root.startswith("sha256:") or len(p.root) != 71:
                    raise FormatError(f"invalid root {p.root[:80]!r}")
                self._data = fb.BundleData(self._start_fetch(p), bytes.fromhex(p.root[7:]))
            except (ShoalError, ValueError) as exc:
                self._refuse(exc)
                return None
            self._frames_of(self._data.ids, self._data.files)
            log.debug("timeline: bundle header read")
        return self._data

    def _refuse(self, exc: BaseException) -> None:
        image = self._pending.image if self._pending is not None else "?"
        used = (f" ({len(self._served)} of its chunks served before, each checked against its id)"
                if self._served else "")
        log.warning("ignoring the profile bundle of %s: %s%s", image, exc, used)
        self._data = None
        self._pending = None
        self._chunks = {}
        self._held_frames = self._file_frames = frozenset()
        self._state = "refused"

    def checked(self, settle: bool = False) -> None:
        """Check a deferred bundle whole now: every data frame, then the partial tree, and a streamed
        blob's digest at its end (once).  ``settle``: the tree once the workload's start has settled."""
        with self._data_lock:
            data = self._opened()
            p = self._pending
            if data is None or p is None:
                return
        old = sys.getswitchinterval()
        sys.setswitchinterval(min(old, 0.0005))  # the FUSE loop answers lookups meanwhile: short GIL slices
        try:
            for cid in data.first_ids:  # a read meanwhile opens the frame it needs itself (no lock held)
                if self._data is None:
                    return
                try:
                    data.chunk(cid)
                except ShoalError as exc:
                    with self._data_lock:
                        self._refuse(exc)
                    return
            self._warm_index(data.dir_paths)
            if settle:  # long slices meanwhile: nothing of the check competes with the FUSE loop
                sys.setswitchinterval(old)
                self._settled()
                sys.setswitchinterval(min(old, 0.0005))
            try:
                data.tree()
                blob = p.arriving.whole() if p.arriving is not None else p.blob
            except ShoalError as exc:
                with self._data_lock:
                    self._refuse(exc)
                return
        finally:
            sys.setswitchinterval(old)
        with self._data_lock:
            if self._pending is not p:  # refused meanwhile by a read
                return
            self._chunks = data.chunks()  # every frame is open: the held chunks, for ``_held``'s quick path
            self._state = "checked"
            self._pending = None
        b = self.bundle
        log.info("profile bundle of %s: %d bytes, %d files, %d chunks checked", p.image, b.bundle_bytes,
                 len(data.files), b.bundle_chunks)
        if p.keep is not None and blob is not None:
            try:
                p.keep(blob)
            except OSError as exc:
                log.warning("cannot save the profile bundle of %s locally: %s", p.image, exc.strerror)

    def after_fork(self) -> None:
        """In the mount daemon: start a streamed bundle's transfer and read its header, in a thread,
        while the mount comes up (a few ms of the GIL against mostly system calls)."""
        super().after_fork()
        if self._pending is not None:
            threading.Thread(target=self._header, name="shoal-bundle-header", daemon=True).start()

    def _warm_index(self, paths: Iterable[bytes]) -> None:
        """Verify the index's directories the workload lists (a lazy index checks each on first use,
        1-6 ms for a large one) and build its hardlink table (``st_nlink`` of any file needs it), now,
        while the runtime starts, instead of in the workload's first lookups (§6.1).  ``paths`` are the
        header's, not checked yet: only names to look up (the index verifies what it decodes).  A
        directory that fails is left for its first use to report."""
        index = self._index
        try:
            index.hardlinks_to(b"")
        except ShoalError:
            return
        for path in paths:
            pos = index.position(path)
            if pos is not None:
                try:
                    index.names_and_kinds(pos)
                except ShoalError:
                    continue

    def _settled(self) -> None:
        """Wait until the workload's start has settled: the mount live and no chunk asked for in the last
        SETTLE_QUIET s, or at most SETTLE_MAX s from now (the frames are open).  The tree's check (11-21 ms of the
        GIL for the 108 chunks of ``print(1)``) then no longer competes with the container's start; no
        read needs it (§3.6)."""
        deadline = time.monotonic() + SETTLE_MAX
        while (now := time.monotonic()) < deadline:
            quiet = now - max(self._last_use, self._live_at)
            if quiet >= SETTLE_QUIET:
                return
            time.sleep(min(SETTLE_QUIET - quiet, deadline - now) + 0.001)

    def serving(self) -> None:
        """Check a deferred bundle now, in a thread: the mount is live, and the container's runtime
        starts meanwhile (its first requests are lookups, which need no chunk)."""
        super().serving()
        self._live_at = time.monotonic()
        if self._pending is not None:
            threading.Thread(target=self.checked, args=(True,), name="shoal-bundle-check", daemon=True).start()

    def _held(self, cid: bytes) -> bytes | None:
        if self._pending is None:
            return self._chunks.get(cid)
        data = self._header()
        if data is None:
            return None
        try:
            return data.chunk(cid)
        except ShoalError as exc:
            with self._data_lock:
                self._refuse(exc)
            return None

    def held_chunk(self, cid: bytes) -> bytes | None:
        self._last_use = time.monotonic()
        data = self._held(cid)
        if data is not None and cid not in self._served:
            if not self._served:
                log.debug("timeline: first bundle chunk served")
            with self._lock:
                self._served.add(cid)
                self.bundle.bundle_chunks_used = len(self._served)
        return data

    def _without(self, frames: list[int], files: bool = False) -> list[int]:
        self._header()
        skip = self._file_frames if files else self._held_frames
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
        if self._pending is not None and self._data is None:
            return  # never blocks: not before the bundle's header says which frames it makes needless
        keep = self._without(frames, files=True)
        if keep:
            self.inner.readahead(keep)

    def prefetch(self, frames: list[int]) -> int | None:
        self._asked.wait()  # started before the mount is live: waits until the header is asked for
        return self.inner.prefetch(self._without(frames))

    def close(self) -> None:
        b = self.bundle
        log.info("profile bundle: %d of its %d chunks used, %d frames not fetched ahead for it",
                 b.bundle_chunks_used, b.bundle_chunks, b.frames_skipped)
        self.inner.close()
