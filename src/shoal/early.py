"""Fetching a recorded profile before the mount exists, and handing it to the mount daemon.

``EarlyFetch`` starts the profile's range reads as soon as the profile is known — before the index
is decoded, before the daemon forks — so the link is busy while the rest of the start-up happens.
Its threads hold raw, *unverified* bytes in memory and never touch the store; the ``LazySource``
that adopts them verifies every chunk before anything is served or stored.

Threads do not survive ``fork``.  ``Handover`` carries the frames across it: before the fork a pipe
is made; afterwards the parent writes each frame (``>IBI`` frame index, ok, length, then the bytes)
as its download completes, and the daemon reads them into fresh futures.  A frame that never
arrives (the parent died, a download failed) fails its future, and the daemon fetches it itself.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field

from shoal import mediatypes as mt
from shoal.errors import TransportError
from shoal.transports.base import BlobInfo, ImageSource

__all__ = ["EarlyFetch", "Handover"]

log = logging.getLogger(__name__)

_REC = struct.Struct(">IBI")  # frame index, 1 if ok, length of the bytes that follow


@dataclass(eq=False)
class _Range:
    pack: str
    start: int
    length: int
    frames: list[tuple[int, int]] = field(default_factory=list)  # (offset, clen)


class EarlyFetch:
    """Range reads of ``frames`` (pack digest, offset, clen; in priority order) on ``remote``, started
    at once in daemon threads; ``futures[(pack, offset)]`` gives each frame's raw bytes."""

    def __init__(self, remote: ImageSource, sizes: dict[str, int], frames: list[tuple[str, int, int]],
                 concurrency: int = 8, max_range: int = 4 * 1024 * 1024) -> None:
        self.remote = remote
        self.sizes = sizes
        self.futures: dict[tuple[str, int], Future[bytes]] = {}
        self.bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Range | None] = queue.SimpleQueue()
        for r in self._plan(frames, max_range):
            for off, _ in r.frames:
                self.futures[(r.pack, off)] = Future()
            self._queue.put(r)
        n = max(1, min(concurrency, self._queue.qsize()))
        for _ in range(n):
            self._queue.put(None)
            threading.Thread(target=self._work, name="shoal-early", daemon=True).start()

    @staticmethod
    def _plan(frames: list[tuple[str, int, int]], max_range: int) -> list[_Range]:
        rank: dict[tuple[str, int], int] = {}
        for r, (pack, off, _) in enumerate(frames):
            rank.setdefault((pack, off), r)
        by_pack: dict[str, list[tuple[int, int]]] = {}
        for pack, off, clen in frames:
            by_pack.setdefault(pack, []).append((off, clen))
        out: list[_Range] = []
        for pack, items in by_pack.items():
            cur: _Range | None = None
            for off, clen in sorted(set(items)):
                if cur is not None and cur.start + cur.length == off and cur.length + clen <= max_range:
                    cur.length += clen
                    cur.frames.append((off, clen))
                    continue
                cur = _Range(pack, off, clen, [(off, clen)])
                out.append(cur)
        out.sort(key=lambda r: min(rank[(r.pack, off)] for off, _ in r.frames))
        return out

    def _work(self) -> None:
        while True:
            r = self._queue.get()
            if r is None:
                return
            try:
                info = BlobInfo(r.pack, self.sizes.get(r.pack, -1), mt.PACK)
                data = self.remote.get_blob_ranges(info, [(r.start, r.length)])[0]
                if len(data) != r.length:
                    raise TransportError(f"range {r.start}+{r.length} of {r.pack} returned {len(data)} bytes")
            except Exception as exc:
                log.warning("early fetch of %s@%d failed: %s", r.pack, r.start, exc)
                for off, _ in r.frames:
                    self.futures[(r.pack, off)].set_exception(exc)
                continue
            with self._lock:
                self.bytes += len(data)
            for off, clen in r.frames:
                self.futures[(r.pack, off)].set_result(data[off - r.start : off - r.start + clen])


class Handover:
    """Carries frames that threads of the parent are still fetching to a forked child (see module doc)."""

    def __init__(self, frames: dict[int, Future[bytes]]) -> None:
        self.frames = frames
        self.rfd, self.wfd = os.pipe()
        self.sender: threading.Thread | None = None

    # -- in the parent, after fork ---------------------------------------------------------------
    def send(self) -> None:
        """Write every frame as it completes, then close the pipe (in a thread)."""
        os.close(self.rfd)
        self.sender = threading.Thread(target=self._send, name="shoal-handover", daemon=True)
        self.sender.start()

    def _send(self) -> None:
        by_future = {id(f): fi for fi, f in self.frames.items()}
        try:
            for fut in as_completed(list(self.frames.values())):
                fi = by_future[id(fut)]
                exc = fut.exception()
                data = b"" if exc is not None else fut.result()
                _write_all(self.wfd, _REC.pack(fi, exc is None, len(data)) + data)
        except OSError as exc:  # the daemon is gone
            log.debug("hand-over stopped: %s", exc)
        finally:
            os.close(self.wfd)
            self.frames = {}

    def wait(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every frame was handed over."""
        if self.sender is not None:
            self.sender.join(timeout)

    # -- in the child, after fork -----------------------------------------------------------------
    def receive(self) -> dict[int, Future[bytes]]:
        """Fresh futures for the frames, resolved by a reader thread as the parent writes them."""
        os.close(self.wfd)
        futs: dict[int, Future[bytes]] = {fi: Future() for fi in self.frames}
        # the reader gets its own dict: the source pops the ones it adopts from the returned one
        threading.Thread(target=self._receive, args=(dict(futs),), name="shoal-handover", daemon=True).start()
        return futs

    def _receive(self, futs: dict[int, Future[bytes]]) -> None:
        try:
            with os.fdopen(self.rfd, "rb") as f:
                while True:
                    head = f.read(_REC.size)
                    if len(head) < _REC.size:
                        break
                    fi, ok, n = _REC.unpack(head)
                    data = f.read(n)
                    fut = futs.get(fi)
                    if fut is None or fut.done() or len(data) != n:
                        continue
                    if ok:
                        fut.set_result(data)
                    else:
                        fut.set_exception(TransportError("the early fetch of this frame failed"))
        finally:
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(TransportError("the frame was not handed over"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
