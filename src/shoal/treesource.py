"""Reading a tree for ``build`` (docs/spec/format.md §5, chunking.md §2): what a build consumes (a
``TreeSource`` of canonical entries and each file's bytes, ``DirSource`` for a directory on disk), and
each file read and chunked a bounded window at a time, small files in batches on workers and a large
file by a producer thread into a bounded queue (``Streamed``).  The decisions (frames, packs, index)
are ``build``'s."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from shoal.chunking import get_chunker
from shoal.errors import from_oserror
from shoal.format.model import Entry
from shoal.scan import scan

__all__ = ["FileReader", "TreeSource", "DirSource", "Piece", "Chunked", "windows", "chunk_batch", "Streamed",
           "WINDOW", "STREAM_QUEUE"]

WINDOW = 4 * 1024 * 1024  # a file is read and chunked this many bytes at a time (chunking.md §2)
STREAM_QUEUE = 2  # windows of one large file ready ahead of the build's main thread

# One window of a file: its bytes, and the chunks cut in them (id, offset in the window, length).
Piece = tuple[bytes, list[tuple[bytes, int, int]]]


@dataclass
class Chunked:
    """One file, chunked.  ``pieces`` yields its windows in order; once they are consumed, ``size`` is the
    file's length (the bytes themselves went by in pieces)."""

    pieces: Iterable[Piece]
    size: int = 0
    streamed: bool = False  # larger than a window: never a small file (format.md §5.1)


_tls = threading.local()  # a chunker per thread


class FileReader(Protocol):
    """The bytes of one file: ``read(n)`` returns at most ``n`` bytes, ``b""`` at the end."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class TreeSource(Protocol):
    """What ``build`` consumes: canonical entries, and the bytes of each FILE entry.

    ``entries`` are in canonical order (format.md §4.2) with Merkle digests and chunk lists
    still empty; ``open`` may be called from worker threads, in any order.  A file is read in
    bounded windows, never whole.
    """

    entries: list[Entry]
    skipped: list[bytes]

    def open(self, e: Entry) -> FileReader: ...


class DirSource:
    """A directory on disk."""

    def __init__(self, root: str | bytes | os.PathLike[str], source_date_epoch: int | None = None) -> None:
        tree = scan(root, source_date_epoch)
        self.base = tree.root
        self.entries = tree.entries
        self.skipped = tree.skipped

    def open(self, e: Entry) -> FileReader:
        return _DirFile(os.path.join(self.base, e.path))

    def read(self, e: Entry) -> bytes:
        """The whole file (for tools such as bench/series.py; the builder uses ``open``)."""
        r = self.open(e)
        try:
            parts = []
            while b := r.read(1 << 20):
                parts.append(b)
            return b"".join(parts)
        finally:
            r.close()


class _DirFile:
    def __init__(self, path: bytes) -> None:
        self.path = path
        try:
            self.f = open(path, "rb")
        except OSError as exc:
            raise from_oserror(exc, "cannot read", path) from None

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except OSError as exc:
            raise from_oserror(exc, "cannot read", self.path) from None

    def close(self) -> None:
        self.f.close()


def _read_full(r: FileReader, n: int) -> bytes:
    parts = []
    while n > 0:
        b = r.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def windows(source: TreeSource, e: Entry, out: Chunked) -> Iterator[Piece]:
    """Read and chunk one file a window at a time.  FastCDC decides a cut from at most ``max_size`` bytes
    after the chunk's start, so every chunk of a window but the last is final; the last one (unless the
    file ends there) is cut again at the start of the next window: the cuts are those of the whole file."""
    chunker = getattr(_tls, "chunker", None)
    if chunker is None:
        chunker = _tls.chunker = get_chunker()
    sha = hashlib.sha256
    total = 0
    r = source.open(e)
    try:
        carry = b""
        eof = False
        while not eof:
            fresh = _read_full(r, WINDOW - len(carry))
            eof = len(fresh) < WINDOW - len(carry)
            buf = carry + fresh if carry else fresh
            if not buf:
                break
            mv = memoryview(buf)
            cuts = list(chunker.cut(mv))
            if not eof:
                last_off = cuts.pop()[0]
                carry = buf[last_off:]
            else:
                last_off, carry = len(buf), b""
            chunks = [(sha(mv[o : o + n]).digest(), o, n) for o, n in cuts]
            total += last_off
            yield buf, chunks
    finally:
        r.close()
    out.size = total


def chunk_batch(source: TreeSource, batch: list[Entry]) -> list[Chunked]:
    """Small files (at most one window each), chunked in a worker."""
    out = []
    for e in batch:
        c = Chunked(())
        c.pieces = list(windows(source, e, c))
        out.append(c)
    return out


class Streamed:
    """A large file chunked by a producer thread into a bounded queue of windows (``STREAM_QUEUE``)."""

    _END = object()

    def __init__(self, stop: threading.Event) -> None:
        self.q: queue.Queue[object] = queue.Queue(STREAM_QUEUE)
        self.stop = stop

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce(self, source: TreeSource, e: Entry, out: Chunked) -> None:
        try:
            for piece in windows(source, e, out):
                if not self._put(piece):
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(exc)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Piece]:
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
