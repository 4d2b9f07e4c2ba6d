"""Fuzz the tar readers: the layer applier of ``convert`` (convert/layers.py over convert/stream.py) and
``TarIndex`` of the archive transports (transports/oci_archive.py), on arbitrary bytes and on mutants of
small valid tars made with the stdlib ``tarfile`` (PAX with xattrs and sub-second times, GNU long
names, hardlinks, symlinks, whiteouts, devices, PAX 0.1 and 1.0 sparse files), plain, gzip or zstd.

Header mutations recompute the checksum so they reach the code behind it.  Limits are small so no
example can fill the disk.  Oracle: only ShoalError subclasses escape, within a CPU-time bound.
"""

from __future__ import annotations

import atexit
import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import indexgen as ig
import zstandard
from fuzzkit import budget, only_shoal_errors
from hypothesis import given
from hypothesis import strategies as st

from shoal.convert.layers import LayerApplier
from shoal.convert.stream import ConvertLimits
from shoal.transports.oci_archive import ArchiveLimits, TarIndex, plain_tar

LIMITS = ConvertLimits(max_total_bytes=16 << 20, ratio_floor=1 << 20, max_entries=10_000,
                       max_header_bytes=64 << 10, max_sparse_blocks=4096)
ARCHIVE_LIMITS = ArchiveLimits(max_size=16 << 20, max_members=1000)
TMP = Path(tempfile.mkdtemp(prefix="shoal-fuzz-tar-"))
atexit.register(shutil.rmtree, TMP, True)


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _tar(fmt: int, members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def _ti(name: str, type_: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = type_, 0o644, 1_600_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _seeds() -> list[bytes]:
    long = "d" * 120 + "/" + "n" * 150
    pax = _tar(tarfile.PAX_FORMAT, [
        (_ti("etc", tarfile.DIRTYPE, mode=0o755), b""),
        (_ti("etc/passwd", pax_headers={"mtime": "1600000000.123456789", "SCHILY.xattr.user.a": "v",
                                        "LIBARCHIVE.xattr.user.b": "dg=="}), b"root:x:0:0\n"),
        (_ti("etc/link", tarfile.LNKTYPE, linkname="etc/passwd"), b""),
        (_ti("etc/sym", tarfile.SYMTYPE, linkname="../etc/passwd"), b""),
        (_ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (_ti("fifo", tarfile.FIFOTYPE), b""),
        (_ti(long, linkname="x" * 200), b"long"),
    ])
    gnu = _tar(tarfile.GNU_FORMAT, [
        (_ti(long), b"gnu long name"),
        (_ti("l" * 130, tarfile.SYMTYPE, linkname="t" * 130), b""),
        (_ti(long + "2", tarfile.LNKTYPE, linkname=long), b""),
    ])
    whiteouts = _tar(tarfile.USTAR_FORMAT, [
        (_ti("a/.wh.b"), b""), (_ti("a/.wh..wh..opq"), b""), (_ti(".wh..wh.plnk/1"), b""), (_ti("c"), b"c"),
    ])
    sparse01 = _tar(tarfile.PAX_FORMAT, [
        (_ti("s", pax_headers={"GNU.sparse.size": "3000", "GNU.sparse.map": "0,5,2048,5"}), b"aaaaabbbbb"),
    ])
    map10 = b"2\n0\n5\n2048\n5\n".ljust(512, b"\0")
    sparse10 = _tar(tarfile.PAX_FORMAT, [
        (_ti("GNUSparseFile.0/s", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                               "GNU.sparse.name": "s", "GNU.sparse.realsize": "3000"}),
         map10 + b"aaaaabbbbb"),
    ])
    oci = _tar(tarfile.GNU_FORMAT, [
        (_ti("oci-layout"), b'{"imageLayoutVersion":"1.0.0"}'),
        (_ti("index.json"), b'{"schemaVersion":2,"manifests":[]}'),
        (_ti("blobs/sha256/" + "0" * 64), b"blob"),
    ])
    return [pax, gnu, whiteouts, sparse01, sparse10, oci, b""]


SEEDS = _seeds()

_FIELDS = {  # offset, length of ustar header fields
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12),
    "type": (156, 1), "linkname": (157, 100), "magic": (257, 8), "devmajor": (329, 8), "devminor": (337, 8),
    "prefix": (345, 155),
}
_VALUES = [b"", b"0", b"7777777", b"77777777777", b"99999999999", b"-1", b"\x80" + b"\xff" * 11,
           b"\xff" * 12, b"\x80\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00", b"../../etc/passwd", b"/abs",
           b"a\0b", b".wh..", b".wh..wh..opq", b"./", b"..", b"ustar\x0000", b"ustar  \0", b"\xe9\xff"]
_TYPES = b"0\x00123456789gxKLSVMNAZ"


def _headers(buf: bytearray) -> list[int]:
    """Offsets of the 512-byte blocks that look like tar headers (their checksum is right)."""
    out = []
    for off in range(0, len(buf) - 511, 512):
        block = buf[off : off + 512]
        if block.count(0) == 512:
            continue
        try:
            want = int(bytes(block[148:156]).split(b"\0")[0].strip() or b"-1", 8)
        except ValueError:
            continue
        if want == 256 + sum(block[:148]) + sum(block[156:]):
            out.append(off)
    return out


def _fix_checksum(buf: bytearray, off: int) -> None:
    buf[off + 148 : off + 156] = b" " * 8
    buf[off + 148 : off + 156] = b"%06o\0 " % (sum(buf[off : off + 512]) & 0o777777)


@st.composite
def tar_mutants(draw: st.DrawFn) -> bytes:
    """A seed tar with some header fields rewritten (checksum fixed) and/or byte-level edits."""
    buf = bytearray(draw(st.sampled_from(SEEDS)))
    heads = _headers(buf)
    for _ in range(draw(st.integers(0 if heads else 0, 3 if heads else 0))):
        off = draw(st.sampled_from(heads))
        start, size = _FIELDS[draw(st.sampled_from(sorted(_FIELDS)))]
        if size == 1:
            value = bytes([draw(st.sampled_from(_TYPES))])
        else:
            value = draw(st.sampled_from(_VALUES) | st.binary(max_size=size))[:size]
        buf[off + start : off + start + size] = value.ljust(size, b"\0")
        _fix_checksum(buf, off)
    if draw(st.booleans()):
        return ig.byte_mutation(draw, bytes(buf))
    return bytes(buf)


def _compress(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["none", "none", "gzip", "zstd"]))
    if how == "gzip":
        data = gzip.compress(data, mtime=0)
    elif how == "zstd":
        data = zstandard.ZstdCompressor(level=1).compress(data)
    if how != "none" and draw(st.integers(0, 3)) == 0:
        data = ig.byte_mutation(draw, data)  # corrupt the compressed stream
    return data


@st.composite
def layer_blobs(draw: st.DrawFn) -> bytes:
    return _compress(draw, draw(tar_mutants()))


def _apply(blob: bytes) -> None:
    ap = LayerApplier(TMP, LIMITS)
    try:
        ap.apply(io.BytesIO(blob), digest=_sha(blob), size=len(blob))
        tree = ap.finish()
        for e in tree.entries:
            if e.size:
                tree.read(e)
    finally:
        ap.close()


def _index(blob: bytes) -> None:
    path = TMP / "archive"
    path.write_bytes(blob)
    try:
        with plain_tar(path, ARCHIVE_LIMITS, str(TMP)) as plain:
            idx = TarIndex(plain, "archive", ARCHIVE_LIMITS)
            for name in list(idx.members)[:20]:
                only_shoal_errors(idx.read, name)
    finally:
        os.unlink(path)


@budget(100)
@given(st.binary(max_size=2048))
def test_layer_arbitrary_bytes(blob: bytes) -> None:
    only_shoal_errors(_apply, blob)


@budget(120)
@given(layer_blobs())
def test_layer_mutated_tars(blob: bytes) -> None:
    only_shoal_errors(_apply, blob)


@budget(80)
@given(st.binary(max_size=2048))
def test_tar_index_arbitrary_bytes(blob: bytes) -> None:
    only_shoal_errors(_index, blob)


@st.composite
def archive_blobs(draw: st.DrawFn) -> bytes:
    data = draw(tar_mutants())
    how = draw(st.sampled_from(["none", "none", "gzip", "zstd", "bzip2", "xz"]))
    if how == "gzip":
        data = gzip.compress(data, mtime=0)
    elif how == "zstd":
        data = zstandard.ZstdCompressor(level=1).compress(data)
    elif how == "bzip2":
        data = bz2.compress(data)
    elif how == "xz":
        data = lzma.compress(data)
    if how != "none" and draw(st.integers(0, 3)) == 0:
        data = ig.byte_mutation(draw, data)
    return data


@budget(120)
@given(archive_blobs())
def test_tar_index_mutated_tars(blob: bytes) -> None:
    only_shoal_errors(_index, blob)
