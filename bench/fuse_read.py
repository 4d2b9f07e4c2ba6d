#!/usr/bin/env python3
"""Reads through a Shoal FUSE mount of a fully local image, against the same tree in a kernel squashfs.

Usage: python bench/fuse_read.py [--tree DIR] [--random-reads N] [--reps N] [--passes walk,seq,large,random,small]

The tree is debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE).  It is built
into a fresh store and mounted with ``shoal mount``; the same tree goes through ``mksquashfs -comp zstd``
and a loop mount.  Both backing files (the store's packs, the squashfs image) are in the page cache;
the kernel's caches of the mounts themselves are dropped before every pass (``drop_caches``, then the
backing files are read again), so every pass goes through the file system, not around it.

Passes, each printed as Shoal's figure, squashfs's, and their ratio (Shoal / squashfs, higher is better;
each repetition runs Shoal then squashfs, so both see the same load; best of the repetitions):
- walk:          ``os.walk`` + ``lstat`` of every entry (what ``find -ls`` does)
- sequential:    every regular file read whole, in 1 MiB reads, in tree order (MB/s)
- large files:   the files of >= 1 MiB only, read whole (MB/s)
- random 4 KiB:  N preads at random offsets of random files of >= 64 KiB, fixed seed (reads/s)
- small files:   open + read + close of every file under 16 KiB (files/s)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs, row, sh  # noqa: E402

SHOAL = shutil.which("shoal") or str(Path(sys.executable).parent / "shoal")
BLOCK = 1 << 20
PASSES = ("walk", "seq", "large", "random", "small")


def files_of(root: Path) -> list[tuple[str, int]]:
    """Regular files (relative path, size) in a fixed order."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            st = os.lstat(p)
            if (st.st_mode & 0o170000) == 0o100000:
                out.append((os.path.relpath(p, root), st.st_size))
    return out


def walk(root: Path) -> int:
    n = 0
    for d, dirs, names in os.walk(root):
        for name in dirs + names:
            os.lstat(os.path.join(d, name))
            n += 1
    return n


def read_whole(root: Path, files: list[tuple[str, int]]) -> int:
    buf = bytearray(BLOCK)
    total = 0
    for rel, _ in files:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            while k := os.readv(fd, [buf]):
                total += k
        finally:
            os.close(fd)
    return total


def random_reads(root: Path, picks: list[tuple[str, int]]) -> int:
    fds: dict[str, int] = {}
    try:
        for rel, off in picks:
            fd = fds.get(rel)
            if fd is None:
                fd = fds[rel] = os.open(os.path.join(root, rel), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 4096, off)
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(picks)


def drop_and_rewarm(backing: list[Path]) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for p in backing:
        sh(f"find {p} -type f -exec cat {{}} + > /dev/null")


def measure(fn: Callable[[], int], backing: list[Path], reps: int) -> tuple[float, int]:
    """Best-of-``reps`` seconds of ``fn`` with the mounts' caches dropped before each run."""
    times, result = [], 0
    for _ in range(reps):
        drop_and_rewarm(backing)
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def rate(fn: Callable[[Path], int], root: Path, unit: str, backing: list[Path], reps: int) -> float:
    seconds, n = measure(lambda: fn(root), backing, reps)
    return (n / 1e6 if unit == "MB/s" else n) / seconds


def rates(fn: Callable[[Path], int], roots: list[Path], unit: str, backing: list[Path], reps: int) -> list[float]:
    """Best rate of each root over ``reps`` rounds, the roots taking turns within each round, so that a
    change of the machine's load hits both sides of a ratio alike."""
    best = [0.0] * len(roots)
    for _ in range(reps):
        for i, root in enumerate(roots):
            best[i] = max(best[i], rate(fn, root, unit, backing, 1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    args = ap.parse_args()
    chosen = [p for p in args.passes.split(",") if p]
    if not set(chosen) <= set(PASSES):
        sys.exit(f"--passes: unknown pass in {args.passes!r}; choose from {','.join(PASSES)}")
    if os.geteuid() != 0 or shutil.which("mksquashfs") is None:
        sys.exit("fuse_read needs root and squashfs-tools (apt-get install squashfs-tools)")
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    work = Path(tempfile.mkdtemp(prefix="shoal-fuse-bench-", dir="/var/tmp"))
    store, smnt, qmnt, img = work / "store", work / "shoal-mnt", work / "sq-mnt", work / "tree.sqfs"
    smnt.mkdir()
    qmnt.mkdir()
    mounted: list[Path] = []
    try:
        subprocess.run([SHOAL, "--store", str(store), "build", str(tree), "bench:1"], check=True,
                       capture_output=True)
        subprocess.run(["mksquashfs", str(tree), str(img), "-comp", "zstd", "-noappend", "-quiet",
                        "-no-progress"], check=True, capture_output=True)
        subprocess.run([SHOAL, "--store", str(store), "mount", "bench:1", str(smnt)], check=True)
        mounted.append(smnt)
        subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(img), str(qmnt)], check=True)
        mounted.append(qmnt)
        backing = [store / "blobs", img]
        files = files_of(qmnt)
        large = [f for f in files if f[1] >= 1 << 20]
        small = [f for f in files if f[1] < 16 << 10]
        rng = random.Random(7)
        pool = [f for f in files if f[1] >= 64 << 10]
        picks = [(rel, rng.randrange(0, size - 4096)) for rel, size in (rng.choice(pool)
                                                                         for _ in range(args.random_reads))]
        total = sum(s for _, s in files)
        print(f"tree {tree}: {len(files)} files, {total / 1e6:.1f} MB; {len(large)} of >= 1 MiB, "
              f"{len(small)} of < 16 KiB; {os.cpu_count()} cores; best of {args.reps}")
        passes: dict[str, tuple[str, Callable[[Path], int], str]] = {
            "walk": ("walk + lstat (entries/s)", walk, "entries/s"),
            "seq": ("sequential, every file (MB/s)", lambda r: read_whole(r, files), "MB/s"),
            "large": ("sequential, files >= 1 MiB (MB/s)", lambda r: read_whole(r, large), "MB/s"),
            "random": (f"random 4 KiB preads x{len(picks)} (reads/s)", lambda r: random_reads(r, picks), "reads/s"),
            "small": ("small files < 16 KiB, open+read (files/s)",
                      lambda r: len(small) if read_whole(r, small) >= 0 else 0, "files/s"),
        }
        print(f"reads through the mount (higher is better; ratio = shoal / squashfs; load {os.getloadavg()[0]:.1f})")
        summary = []
        for name in chosen:
            label, fn, unit = passes[name]
            got = rates(fn, [smnt, qmnt], unit, backing, args.reps)
            row(label, "", "")
            row("  shoal (FUSE)", f"{got[0]:,.0f} {unit}", f"{got[0] / got[1]:.2f}x squashfs")
            row("  squashfs (kernel)", f"{got[1]:,.0f} {unit}")
            summary.append(f"{name} {got[0] / got[1]:.2f}x")
        print(f"ratios (shoal / squashfs): {', '.join(summary)}; load {os.getloadavg()[0]:.1f}")
        status = subprocess.run([SHOAL, "--store", str(store), "status", str(smnt)], capture_output=True, text=True)
        print(status.stdout.strip() if status.returncode == 0 else "")
    finally:
        for m in reversed(mounted):
            if m == smnt:
                subprocess.run([SHOAL, "--store", str(store), "umount", str(m)], capture_output=True)
            else:
                subprocess.run(["umount", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
