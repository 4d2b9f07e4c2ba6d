"""convert and build run in bounded memory (convert.md §5): a 1 GiB file of zeros, in a gzip tar layer of
an ``oci:`` layout or in a directory, never has its bytes in memory at once.  Peak RSS of the ``shoal``
process is read with ``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper process whose only child it is."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from convtools import write_layout

from helpers import run_shoal, shoal_cmd
from shoal import mediatypes as mt

GIB = 1 << 30
PEAK_LIMIT = 256 * 1000 * 1000  # bytes of peak RSS
_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def _zeros_sha(n: int) -> str:
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(n >> 20):
        h.update(block)
    return h.hexdigest()


def _peak_rss(store: Path, *args: str | os.PathLike[str]) -> int:
    """Run ``shoal ARGS``; return its peak RSS in bytes."""
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_STORE"}
    p = subprocess.run([sys.executable, "-c", _WRAP, *shoal_cmd(store, *args)], capture_output=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stderr.split()[-1]) * 1024  # Linux reports KiB


def _gzip_zeros_tar(out: BinaryIO, header: bytes, n: int, tail: bytes) -> str:
    """Write the gzip of ``header + n zero bytes + tail`` to ``out``; return the sha256 of the tar.

    Deflate is run once per distinct piece: after a full flush a compressor starts afresh, so every MiB of
    zeros compresses to the same bytes, which are written 1024 times for a GiB (a valid one-member gzip)."""
    block = bytes(1 << 20)
    assert n % len(block) == 0
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header: no name, mtime 0
    out.write(c.compress(header) + c.flush(zlib.Z_FULL_FLUSH))
    zblock = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    diff = hashlib.sha256(header)
    crc = zlib.crc32(header)
    for _ in range(n // len(block)):
        out.write(zblock)
        diff.update(block)
        crc = zlib.crc32(block, crc)
    out.write(c.compress(tail) + c.flush())
    diff.update(tail)
    crc = zlib.crc32(tail, crc)
    out.write(struct.pack("<II", crc, (len(header) + n + len(tail)) & 0xFFFFFFFF))
    return "sha256:" + diff.hexdigest()


def _zero_layer_layout(root: Path, n: int) -> str:
    """An OCI layout tagged ``big`` whose one gzip layer holds ``big.bin``: ``n`` zero bytes (~1 MB gzipped)."""
    ti = tarfile.TarInfo("big.bin")
    ti.size, ti.mode, ti.mtime = n, 0o644, 1_600_000_000
    header = ti.tobuf(tarfile.PAX_FORMAT)
    tail = bytes(-n % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)  # padding and end-of-archive, as tarfile
    buf = io.BytesIO()
    diff_id = _gzip_zeros_tar(buf, header, n, tail)
    data = buf.getvalue()
    built = write_layout(root, "big", [b""], blobs=[data], diff_ids=[diff_id], layer_types=[mt.OCI_LAYER_GZIP])
    return built.ref


def _cat_sha(store: Path, ref: str, path: str) -> tuple[int, str]:
    """Size and sha256 of what ``shoal cat REF PATH`` streams out."""
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_STORE"}
    h, n = hashlib.sha256(), 0
    with subprocess.Popen(shoal_cmd(store, "cat", ref, path), stdout=subprocess.PIPE, env=env) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(4 << 20):
            h.update(chunk)
            n += len(chunk)
    assert p.returncode == 0
    return n, h.hexdigest()


def _check_unpacked(store: Path, ref: str, dest: Path, n: int) -> None:
    run_shoal(store, "unpack", ref, dest, timeout=300)
    big = dest / "big.bin"
    assert big.stat().st_size == n
    h = hashlib.sha256()
    with open(big, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    assert h.hexdigest() == _zeros_sha(n)


def test_convert_1gib_zero_file_bounded(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    ref = _zero_layer_layout(layout, GIB)
    assert sum(f.stat().st_size for f in (layout / "blobs" / "sha256").iterdir()) < 8 << 20
    store = tmp_path / "store"
    peak = _peak_rss(store, "convert", ref, "big:1")
    assert peak < PEAK_LIMIT, f"convert peaked at {peak / 1e6:.0f} MB RSS"
    _check_unpacked(store, "big:1", tmp_path / "out", GIB)


def test_build_1gib_zero_file_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        f.truncate(GIB)  # reads as zeros
    store = tmp_path / "store"
    peak = _peak_rss(store, "build", src, "big:1", "--workers", "2")
    assert peak < PEAK_LIMIT, f"build peaked at {peak / 1e6:.0f} MB RSS"
    assert _cat_sha(store, "big:1", "big.bin") == (GIB, _zeros_sha(GIB))


def test_build_incompressible_file_bounded(tmp_path: Path) -> None:
    """Incompressible data: the compressed frames of written packs are let go (they once stayed until the end)."""
    src = tmp_path / "src"
    src.mkdir()
    n = 384 << 20
    h = hashlib.sha256()
    with open(src / "random.bin", "wb") as f:
        for _ in range(n >> 22):
            block = os.urandom(4 << 20)
            h.update(block)
            f.write(block)
    want = h.hexdigest()
    store = tmp_path / "store"
    peak = _peak_rss(store, "build", src, "rnd:1")
    assert peak < PEAK_LIMIT, f"build peaked at {peak / 1e6:.0f} MB RSS"
    assert _cat_sha(store, "rnd:1", "random.bin") == (n, want)
