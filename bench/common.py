"""Shared helpers for benchmarks: real Debian root filesystems (cached), timing, reporting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

CACHE = Path(os.environ.get("SHOAL_BENCH_CACHE", "/var/tmp/shoal-bench"))


def sh(cmd: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def rootfs(name: str = "bookworm", packages: tuple[str, ...] = (), suite: str = "bookworm") -> Path:
    """A debootstrap minbase tree (plus ``packages``), made once and cached under $SHOAL_BENCH_CACHE."""
    target = CACHE / name
    if (target / ".shoal-complete").exists():
        return target / "root"
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        sys.exit("benchmarks need root and debootstrap (apt-get install debootstrap)")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    print(f"[setup] debootstrap --variant=minbase {suite} {target}/root ...", file=sys.stderr)
    sh(f"debootstrap --variant=minbase {suite} {target}/root")
    if packages:
        print(f"[setup] apt-get install {' '.join(packages)} ...", file=sys.stderr)
        sh(f"chroot {target}/root apt-get install -y -qq {' '.join(packages)}",
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    (target / ".shoal-complete").touch()
    return target / "root"


def tree_bytes(path: Path) -> int:
    out = sh(f"du -sb --apparent-size {path}").stdout.split()[0]
    return int(out)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def drop_caches_warm(path: Path) -> None:
    """Warm the page cache with the tree so every contender reads from memory."""
    sh(f"tar -C {path} -cf - . > /dev/null")


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>14}  {note}")


def compile_bytecode() -> None:
    """Write the ``.pyc`` files of the shoal package, as an installed wheel has them: with
    ``PYTHONDONTWRITEBYTECODE`` set (and an editable install) every shoal process would compile its
    modules again (~0.1 s each), which no installed deployment pays."""
    import shoal

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(shoal.__file__).parent)], check=True)


def tree_chunks(tree: Path) -> Iterator[tuple[bytes, memoryview]]:
    """(sha256 id, bytes) of every chunk of every regular file of ``tree``, in canonical order, cut as
    ``shoal build`` cuts them: FastCDC (shoal.chunking.get_chunker()) over each file on its own."""
    import hashlib

    from shoal.build import DirSource
    from shoal.chunking import get_chunker
    from shoal.format.model import Kind

    chunker = get_chunker()
    src = DirSource(tree)
    for e in src.entries:
        if e.kind != Kind.FILE:
            continue
        mv = memoryview(src.read(e))
        for off, ln in chunker.cut(mv):
            piece = mv[off : off + ln]
            yield hashlib.sha256(piece).digest(), piece


def new_chunks(tree: Path, seen: set[bytes], level: int) -> tuple[int, int, int]:
    """(count, raw bytes, compressed bytes) of the chunks of ``tree`` not in ``seen`` (each counted once),
    compressed as one zstd stream at ``level``; adds them to ``seen``."""
    import zstandard

    cobj = zstandard.ZstdCompressor(level=level).compressobj()
    n = raw = comp = 0
    for cid, piece in tree_chunks(tree):
        if cid in seen:
            continue
        seen.add(cid)
        n += 1
        raw += len(piece)
        comp += len(cobj.compress(piece))
    comp += len(cobj.flush())
    return n, raw, comp
