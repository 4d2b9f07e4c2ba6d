"""The one canonical tar stream of a Shoal tree, and deterministic compressors (convert.md §7).

Every byte is fixed by the index: entry order, header layout, when a PAX header is used and the
order of its records.  Nothing depends on the host, the clock, user names or the Python version.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Protocol

import zstandard
from zlib_ng import zlib_ng

from shoal.format.model import Entry, Index, Kind
from shoal.reader import Reader

__all__ = ["tar_stream", "entry_header", "pax_record", "Compressor", "GzipWriter", "ZstdWriter", "PlainWriter",
           "make_compressor", "default_workers", "GZIP_LEVEL", "GZIP_BLOCK", "ZSTD_LEVEL", "PAX_NAME"]

BLOCK = 512
GZIP_LEVEL = 6  # §7.3
GZIP_BLOCK = 1 << 20  # §7.3: the tar bytes deflated as one unit (with the 32 KiB before them as dictionary)
_WINDOW = 32 * 1024
ZSTD_LEVEL = 3
PAX_NAME = b"././@PaxHeader"
_TYPE = {Kind.FILE: b"0", Kind.HARDLINK: b"1", Kind.SYMLINK: b"2", Kind.CHAR: b"3", Kind.BLOCK: b"4",
         Kind.DIR: b"5", Kind.FIFO: b"6"}
_MAX7 = 8**7  # largest value + 1 of an 8-byte octal field
_MAX11 = 8**11  # ... of a 12-byte octal field


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"%d %s=%s\\n"`` where the length counts the whole record, itself included."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes, link: bytes,
           major: int, minor: int) -> bytes:
    h = bytearray(BLOCK)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = link[:100].ljust(100, b"\0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    # uname and gname (265..329) stay empty: ids only
    h[329:337] = _octal(major, 8)
    h[337:345] = _octal(minor, 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax_time(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    whole, frac = divmod(abs(ns), 1_000_000_000)
    text = sign + str(whole).encode()
    if frac:
        text += b"." + b"%09d" % frac
        text = text.rstrip(b"0")
    return text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def entry_header(e: Entry) -> bytes:
    """The header block(s) of ``e``: an optional PAX extended header, then the ustar header (§7.2)."""
    if e.kind == Kind.DIR:
        name = e.path + b"/" if e.path else b"./"
    else:
        name = e.path
    link = e.target if e.kind in (Kind.SYMLINK, Kind.HARDLINK) else b""
    size = e.size if e.kind == Kind.FILE else 0
    major, minor = e.rdev if e.kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)
    secs = e.mtime_ns // 1_000_000_000
    pax: list[tuple[bytes, bytes]] = []
    if len(name) > 100:
        pax.append((b"path", name))
    if len(link) > 100:
        pax.append((b"linkpath", link))
    if any(k in (b"path", b"linkpath") and not _is_utf8(v) for k, v in pax):
        pax.append((b"hdrcharset", b"BINARY"))
    if e.mtime_ns % 1_000_000_000 or not 0 <= secs < _MAX11:
        pax.append((b"mtime", _pax_time(e.mtime_ns)))
        if not 0 <= secs < _MAX11:
            secs = 0
    uid, gid = e.uid, e.gid
    if uid >= _MAX7:
        pax.append((b"uid", str(uid).encode()))
        uid = 0
    if gid >= _MAX7:
        pax.append((b"gid", str(gid).encode()))
        gid = 0
    if size >= _MAX11:
        pax.append((b"size", str(size).encode()))
    if major >= _MAX7 or minor >= _MAX7:
        pax += [(b"SCHILY.devmajor", str(major).encode()), (b"SCHILY.devminor", str(minor).encode())]
        major = minor = 0
    pax += [(b"SCHILY.xattr." + k, v) for k, v in e.xattrs]
    head = _ustar(name, e.mode, uid, gid, size if size < _MAX11 else 0, secs, _TYPE[e.kind], link, major, minor)
    if not pax:
        return head
    records = b"".join(pax_record(k, v) for k, v in sorted(pax))
    ext = _ustar(PAX_NAME, 0, 0, 0, len(records), 0, b"x", b"", 0, 0)
    return ext + records + bytes(-len(records) % BLOCK) + head


def tar_stream(index: Index, reader: Reader) -> Iterator[bytes | memoryview]:
    """The canonical tar of the tree: every entry in index order, file bytes verified chunk by chunk,
    then two zero blocks (no record padding)."""
    for e in index.entries:
        yield entry_header(e)
        if e.kind == Kind.FILE and e.size:
            yield from reader.iter_file(e)
            if e.size % BLOCK:
                yield bytes(BLOCK - e.size % BLOCK)
    yield bytes(2 * BLOCK)


def default_workers() -> int:
    """Threads for the gzip writer: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Compressor(Protocol):
    media_suffix: str

    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class PlainWriter:
    media_suffix = ""

    def __init__(self, out: Callable[[bytes | memoryview], None]) -> None:
        self.out = out

    def write(self, data: bytes | memoryview) -> None:
        self.out(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _deflate_block(block: bytes, zdict: bytes, level: int, last: bool) -> tuple[bytes, int]:
    """One block of the gzip member (§7.3): raw deflate from a fresh zlib-ng state primed with ``zdict``
    (the 32 KiB of tar before the block), ended by a sync flush, or by finish for the last block.
    Returns the deflate bytes and the CRC-32 of the block.  zlib-ng releases the GIL while it works."""
    if zdict:
        z = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 8, zlib_ng.Z_DEFAULT_STRATEGY, zdict)
    else:
        z = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 8, zlib_ng.Z_DEFAULT_STRATEGY)
    out = z.compress(block) + z.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)
    return out, zlib_ng.crc32(block)


class GzipWriter:
    """RFC 1952, one member, fixed header fields: no name, mtime 0, XFL per level, OS 255 (unknown) (§7.3).

    The tar is cut into ``GZIP_BLOCK`` blocks that are deflated independently (each primed with the
    32 KiB before it, as pigz does) on ``workers`` threads and written in order: the bytes depend on the
    data and the level only, never on the number of workers or cores."""

    media_suffix = "+gzip"

    def __init__(self, out: Callable[[bytes | memoryview], None], level: int = GZIP_LEVEL,
                 workers: int | None = None) -> None:
        self.out = out
        self.level = level
        xfl = 2 if level == 9 else 4 if level == 1 else 0
        out(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255]))
        self.workers = max(1, workers if workers is not None else default_workers())
        self.pool = ThreadPoolExecutor(self.workers, "gzip") if self.workers > 1 else None
        self.pending: deque[tuple[Future[tuple[bytes, int]], int]] = deque()
        self.buf = bytearray()
        self.zdict = b""
        self.crc = 0
        self.size = 0

    def _submit(self, block: bytes, last: bool) -> None:
        if self.pool is None:
            self._put(_deflate_block(block, self.zdict, self.level, last), len(block))
        else:
            self.pending.append((self.pool.submit(_deflate_block, block, self.zdict, self.level, last), len(block)))
            while len(self.pending) > 2 * self.workers or (self.pending and self.pending[0][0].done()):
                self._drain_one()
        self.zdict = block[-_WINDOW:]

    def _drain_one(self) -> None:
        fut, n = self.pending.popleft()
        self._put(fut.result(), n)

    def _put(self, res: tuple[bytes, int], n: int) -> None:
        data, crc = res
        self.crc = zlib_ng.crc32_combine(self.crc, crc, n)
        if data:
            self.out(data)

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self.buf += data
        while len(self.buf) >= GZIP_BLOCK:
            block = bytes(self.buf[:GZIP_BLOCK])
            del self.buf[:GZIP_BLOCK]
            self._submit(block, False)

    def close(self) -> None:
        self._submit(bytes(self.buf), True)
        self.buf = bytearray()
        while self.pending:
            self._drain_one()
        self.abort()
        self.out(self.crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little"))

    def abort(self) -> None:
        """Stop the workers (after an error, or once closed)."""
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class ZstdWriter:
    """One zstd frame: fixed level, checksum on, no content size, no dictionary, single-threaded (§7.3)."""

    media_suffix = "+zstd"

    def __init__(self, out: Callable[[bytes | memoryview], None], level: int = ZSTD_LEVEL) -> None:
        self.out = out
        self.z = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=False,
                                          threads=0).compressobj()

    def write(self, data: bytes | memoryview) -> None:
        out = self.z.compress(data)
        if out:
            self.out(out)

    def close(self) -> None:
        self.out(self.z.flush())

    def abort(self) -> None:
        pass


def make_compressor(kind: str, out: Callable[[bytes | memoryview], None], level: int | None = None,
                    workers: int | None = None) -> Compressor:
    """``workers`` (gzip only; default: the cores) changes the speed, never the bytes."""
    if kind == "gzip":
        return GzipWriter(out, GZIP_LEVEL if level is None else level, workers)
    if kind == "zstd":
        return ZstdWriter(out, ZSTD_LEVEL if level is None else level)
    if kind == "none":
        return PlainWriter(out)
    from shoal.errors import UsageError
    raise UsageError(f"unknown compression {kind!r} (gzip, zstd or none)")
