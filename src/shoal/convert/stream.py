"""One classic layer blob -> verified, bounded, decompressed tar bytes (docs/spec/convert.md §3, §6).

``LayerStream`` is a read-only file object over the *uncompressed* tar of a layer.  While it is
read it hashes the compressed bytes (checked against the descriptor's digest and size) and the
uncompressed bytes (checked against the config's diff_id), sniffs the compression from the magic
bytes (gzip, zstd or none), and enforces the decompression limits of ``ConvertLimits``: it never
holds more than a bounded amount of decompressed data in memory, whatever the input.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard
from zlib_ng import zlib_ng

from shoal.errors import FormatError, HostileInput, IntegrityError

__all__ = ["ConvertLimits", "Budget", "LayerStream", "GZIP_MAGIC", "ZSTD_MAGIC"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW_READ = 256 * 1024  # compressed bytes read from the source at a time
_OUT_MAX = 1024 * 1024  # gzip: at most this much output per inflate call
# zstd: a 4-byte RLE block can expand to 128 KiB, so 1 KiB of input inflates to at most 32 MiB.
_ZSTD_SLICE = 1024
_INFLATE_ERROR = cast("type[Exception]", zlib_ng.error)  # a class (zlib-ng's stub calls it an instance)
# threaded streams: the decompressing thread stops once this much output waits for the tar reader
QUEUE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ConvertLimits:
    """Limits against hostile layers (convert.md §6).  All are checked while streaming."""

    max_total_bytes: int = 64 << 30  # uncompressed tar bytes, summed over every layer of one image
    max_layer_ratio: int = 4096  # uncompressed / compressed bytes of one layer ...
    ratio_floor: int = 256 << 20  # ... checked once the layer has inflated past this many bytes
    max_entries: int = 4_000_000  # tar headers over every layer
    max_header_bytes: int = 1 << 20  # one PAX or GNU long-name header
    max_sparse_blocks: int = 1 << 20  # entries of one sparse map
    max_blob_bytes: int = 64 << 20  # an image config (read into memory); manifests: 4 MiB


class Budget:
    """Uncompressed bytes left for one image (shared by its layers)."""

    def __init__(self, limits: ConvertLimits) -> None:
        self.limits = limits
        self.used = 0
        self._lock = threading.Lock()  # taken by a layer's decompressing thread and by the tar reader

    def take(self, n: int, what: str) -> None:
        with self._lock:
            self.used += n
        if self.used > self.limits.max_total_bytes:
            raise HostileInput(f"{what} inflates past the limit of {self.limits.max_total_bytes} uncompressed "
                               "bytes per image (decompression bomb?)")


class _Hasher:
    """Feeds sha256 objects in order, on a thread of its own when ``threaded`` (hashlib releases the
    GIL), at most ``QUEUE_BYTES`` behind.  ``close()`` hashes what is queued and stops the thread."""

    def __init__(self, threaded: bool) -> None:
        self._q: deque[tuple["hashlib._Hash", bytes] | None] = deque()
        self._queued = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="layer-sha256", daemon=True)
            self._thread.start()

    def update(self, h: "hashlib._Hash", data: bytes) -> None:
        if self._thread is None:
            h.update(data)
            return
        with self._cv:
            while self._queued >= QUEUE_BYTES:
                self._cv.wait()
            self._q.append((h, data))
            self._queued += len(data)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q:
                    self._cv.wait()
                item = self._q.popleft()
            if item is None:
                return
            item[0].update(item[1])
            with self._cv:
                self._queued -= len(item[1])
                self._cv.notify_all()

    def close(self) -> None:
        t = self._thread
        if t is None:
            return
        with self._cv:
            self._q.append(None)
            self._cv.notify_all()
        t.join()
        self._thread = None


class LayerStream:
    """``read(n)`` returns uncompressed tar bytes; ``finish()`` drains and checks both digests.

    ``threaded``: reading, hashing and decompressing run on a thread of their own, at most
    ``QUEUE_BYTES`` (plus one decompression step) ahead of the reader, so they overlap the tar parsing
    (zlib, zstd and hashlib release the GIL).  The bytes, digests, limits and errors are the same
    either way: an error of the thread is raised by ``read`` where the serial stream would raise it.
    ``close()`` stops the thread (always call it)."""

    def __init__(self, raw: BinaryIO, digest: str, size: int, diff_id: str | None, budget: Budget,
                 what: str, threaded: bool = False) -> None:
        self.raw = raw
        self.digest = digest
        self.size = size
        self.diff_id = diff_id
        self.budget = budget
        self.what = what
        self.chash = hashlib.sha256()
        self.uhash = hashlib.sha256()
        self._hasher = _Hasher(threaded)  # threaded: the two sha256 on a third thread
        self.cbytes = 0  # compressed bytes read
        self.ubytes = 0  # uncompressed bytes produced
        self.raw_eof = False
        self.pending = bytearray()  # compressed bytes read but not yet decoded
        self.out = bytearray()
        self.out_pos = 0
        self.done = False  # the compressed stream ended cleanly
        head = self._peek(4)
        if head.startswith(GZIP_MAGIC):
            self.compression = "gzip"
        elif head.startswith(ZSTD_MAGIC) or self._skippable():
            self.compression = "zstd"
        else:
            self.compression = "none"
        self._gz: "zlib_ng._Decompress | None" = None
        self._zs: "zstandard.ZstdDecompressionObj | None" = None
        self._member_started = False
        # threaded: the decompressing thread appends (data | exception | None at the end) to ``_q``
        self._q: deque[bytes | BaseException | None] = deque()
        self._queued = 0
        self._cv = threading.Condition()
        self._stop = False
        self._ended = False  # the consumer has taken the end (or an error) off the queue
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._produce, name="layer-inflate", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the decompressing thread

    def _produce(self) -> None:
        item: BaseException | None = None
        try:
            while not self._stop and self._step():
                pass
        except BaseException as exc:  # handed to the reader, raised there
            item = exc
        with self._cv:
            self._q.append(item)
            self._cv.notify_all()

    def _push(self, data: bytes) -> None:
        with self._cv:
            while self._queued >= QUEUE_BYTES and not self._stop:
                self._cv.wait()
            self._q.append(data)
            self._queued += len(data)
            self._cv.notify_all()

    def _more(self) -> bool:
        """Put more output into ``out``; False at the end of the stream."""
        if self._thread is None:
            return self._step()
        if self._ended:
            return False
        with self._cv:
            while not self._q:
                self._cv.wait()
            item = self._q.popleft()
            if isinstance(item, bytes):
                self._queued -= len(item)
                self._cv.notify_all()
        if isinstance(item, bytes):
            self.out += item
            return True
        self._ended = True
        self._thread.join()
        if item is not None:
            raise item
        return False

    def close(self) -> None:
        """Stop the decompressing thread (it finishes the step it is in) and the hashing thread (it hashes
        what was read); the stream is then serial again."""
        t = self._thread
        if t is not None:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            t.join()
            self._thread = None
            self._q.clear()
        self._hasher.close()

    # ------------------------------------------------------------------ compressed side

    def _fill(self) -> bool:
        """Read more compressed bytes into ``pending``; False at the end of the blob."""
        if self.raw_eof:
            return False
        want = _RAW_READ if self.size < 0 else min(_RAW_READ, self.size - self.cbytes + 1)
        buf = self.raw.read(max(1, want))
        if not buf:
            self.raw_eof = True
            return False
        self.cbytes += len(buf)
        if self.size >= 0 and self.cbytes > self.size:
            raise IntegrityError(f"{self.what}: blob {self.digest} is longer than its descriptor's {self.size} bytes")
        self._hasher.update(self.chash, buf)
        self.pending += buf
        return True

    def _peek(self, n: int) -> bytes:
        while len(self.pending) < n and self._fill():
            pass
        return bytes(self.pending[:n])

    def _take_pending(self, n: int | None = None) -> bytes:
        if n is None or n >= len(self.pending):
            data = bytes(self.pending)
            self.pending.clear()
        else:
            data = bytes(self.pending[:n])
            del self.pending[:n]
        return data

    # ------------------------------------------------------------------ decoding

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.ubytes += len(data)
        self._hasher.update(self.uhash, data)
        self.budget.take(len(data), self.what)
        lim = self.budget.limits
        if (self.compression != "none" and self.ubytes > lim.ratio_floor
                and self.ubytes > lim.max_layer_ratio * max(1, self.cbytes)):
            raise HostileInput(f"{self.what} inflates {self.ubytes} bytes from {self.cbytes} compressed bytes, "
                               f"more than {lim.max_layer_ratio}:1 (decompression bomb?)")
        if self._thread is not None:
            self._push(data)
        else:
            self.out += data

    def _step(self) -> bool:
        """Decode some more output into ``out``; False once the stream is exhausted."""
        if self.done:
            return False
        if self.compression == "none":
            if not self.pending and not self._fill():
                self.done = True
                return False
            self._emit(self._take_pending())
            return True
        if self.compression == "gzip":
            return self._step_gzip()
        return self._step_zstd()

    def _new_member(self, magic: bytes, kind: str) -> bool:
        """At a member/frame boundary: start the next one, or end the stream. Trailing garbage is an error."""
        if not self.pending and not self._fill():
            self.done = True
            return False
        if not self._peek(len(magic)).startswith(magic) and not (kind == "zstd" and self._skippable()):
            raise FormatError(f"{self.what}: trailing garbage after the {kind} stream")
        return True

    def _skippable(self) -> bool:
        head = self._peek(4)
        return len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18"

    def _step_gzip(self) -> bool:
        d = self._gz
        if d is None:
            if not self._new_member(GZIP_MAGIC, "gzip"):
                return False
            d = self._gz = zlib_ng.decompressobj(31)  # zlib-ng: twice zlib's inflate speed
        ended = False
        try:
            if d.unconsumed_tail:
                data = d.decompress(d.unconsumed_tail, _OUT_MAX)
            elif self.pending or self._fill():
                data = d.decompress(self._take_pending(), _OUT_MAX)
            else:  # no more input: only what inflate still holds (at most one match)
                data = d.flush()
                ended = True
        except _INFLATE_ERROR as exc:
            raise FormatError(f"{self.what}: corrupt gzip stream: {exc}") from None
        self._emit(data)
        if ended and not d.eof:
            raise FormatError(f"{self.what}: truncated gzip stream")
        if d.eof:
            rest = d.unused_data
            self.pending[:0] = rest
            self._gz = None
        return True

    def _step_zstd(self) -> bool:
        d = self._zs
        if d is None:
            if not self._new_member(ZSTD_MAGIC, "zstd"):
                return False
            d = self._zs = zstandard.ZstdDecompressor().decompressobj()
        if not self.pending and not self._fill():
            raise FormatError(f"{self.what}: truncated zstd stream")
        try:
            data = d.decompress(self._take_pending(_ZSTD_SLICE))
        except zstandard.ZstdError as exc:
            raise FormatError(f"{self.what}: corrupt zstd stream: {exc}") from None
        self._emit(data)
        if d.eof:
            self.pending[:0] = d.unused_data
            self._zs = None
        return True

    # ------------------------------------------------------------------ file object

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._more():
                pass
            n = len(self.out) - self.out_pos
        while len(self.out) - self.out_pos < n and self._more():
            pass
        data = bytes(self.out[self.out_pos : self.out_pos + n])
        self.out_pos += len(data)
        if self.out_pos > (1 << 20):
            del self.out[: self.out_pos]
            self.out_pos = 0
        return data

    def drain(self) -> None:
        """Read (and hash) whatever the tar reader left: padding, end-of-archive blocks, trailing data."""
        while self._more():
            self.out.clear()
            self.out_pos = 0
        self.out.clear()
        self.out_pos = 0

    def check_blob(self) -> None:
        """Read the rest of the compressed blob and compare it with the descriptor (IntegrityError)."""
        self.close()
        while self._fill():
            self.pending.clear()
        self._hasher.close()
        got = "sha256:" + self.chash.hexdigest()
        if self.size >= 0 and self.cbytes != self.size:
            raise IntegrityError(f"{self.what}: blob {self.digest} is truncated: {self.cbytes} of {self.size} bytes")
        if got != self.digest:
            raise IntegrityError(f"{self.what}: blob digest mismatch: descriptor says {self.digest}, content is {got}")

    def finish(self) -> str:
        """Drain, verify the blob and the diff_id; return the diff_id (sha256 of the uncompressed tar)."""
        self.drain()
        self.check_blob()
        diff = "sha256:" + self.uhash.hexdigest()
        if self.diff_id is not None and diff != self.diff_id:
            raise IntegrityError(f"{self.what}: diff_id mismatch: config says {self.diff_id}, "
                                 f"uncompressed layer is {diff}")
        return diff
