#!/usr/bin/env python3
"""Build throughput and stored size on a >= 300 MB real rootfs, against tar+gzip, zstd and casync.

Usage: python bench/build.py [--tree DIR]
Default tree: debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE).
Every figure is measured in this run, on this machine, with a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import drop_caches_warm, rootfs, row, sh, timed, tree_bytes  # noqa: E402


def shoal(*args: str) -> dict:
    out = subprocess.run([shutil.which("shoal") or "shoal", *args], check=True, capture_output=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    args = ap.parse_args()
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    size = tree_bytes(tree)
    drop_caches_warm(tree)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-", dir="/var/tmp"))
    try:
        print(f"tree {tree}: {size / 1e6:.1f} MB (apparent), {os.cpu_count()} cores")
        b = shoal("--store", str(work / "store"), "build", str(tree), "bench:1", "--json")
        t_shoal, shoal_bytes = b["seconds"], b["stored_bytes"]
        t_gz, _ = timed(lambda: sh(f"tar -C {tree} -cf - . | gzip -6 > {work}/t.tar.gz"))
        t_zst, _ = timed(lambda: sh(f"tar -C {tree} -cf - . | zstd -q -3 -T0 > {work}/t.tar.zst"))
        t_zst1, _ = timed(lambda: sh(f"tar -C {tree} -cf - . | zstd -q -3 -T1 > {work}/t1.tar.zst"))
        gz_bytes = (work / "t.tar.gz").stat().st_size
        zst_bytes = (work / "t.tar.zst").stat().st_size
        t_ca = None
        if shutil.which("casync"):
            t_ca, _ = timed(lambda: sh(f"casync make --store={work}/castr {work}/t.caidx {tree}"))
        mbs = lambda t: size / t / 1e6  # noqa: E731
        print("build (MB/s of tree data; higher is better)")
        row("shoal build", f"{mbs(t_shoal):.0f} MB/s", f"{t_shoal:.2f} s")
        row("tar | gzip -6", f"{mbs(t_gz):.0f} MB/s", f"shoal is {t_gz / t_shoal:.1f}x faster")
        row("tar | zstd -3 -T0", f"{mbs(t_zst):.0f} MB/s", f"shoal is {t_zst / t_shoal:.2f}x")
        row("tar | zstd -3 (1 thread)", f"{mbs(t_zst1):.0f} MB/s", f"shoal is {t_zst1 / t_shoal:.2f}x")
        if t_ca is not None:
            row("casync make", f"{mbs(t_ca):.0f} MB/s", f"shoal is {t_ca / t_shoal:.1f}x faster")
        print("stored size (lower is better)")
        row("shoal image (index + packs + config)", f"{shoal_bytes / 1e6:.1f} MB",
            f"{shoal_bytes / zst_bytes:.3f}x tar|zstd -3")
        row("tar | zstd -3", f"{zst_bytes / 1e6:.1f} MB")
        row("tar | gzip -6", f"{gz_bytes / 1e6:.1f} MB", f"shoal is {shoal_bytes / gz_bytes:.3f}x")

        # unpack: shoal unpack vs tar -x of a plain tar, both from a warm cache, same disk; two rounds
        # in alternating order, best of each (this ext4's inode allocation slows down after large deletes,
        # whichever tool comes first)
        sh(f"tar -C {tree} -cf {work}/plain.tar .")
        sh(f"cat {work}/plain.tar > /dev/null")
        t_untar: list[float] = []
        t_unpack: list[float] = []

        def untar(i: int) -> None:
            t_untar.append(timed(lambda: sh(f"mkdir {work}/x{i} && tar -C {work}/x{i} -xf {work}/plain.tar"))[0])

        def unpack(i: int) -> None:
            t_unpack.append(shoal("--store", str(work / "store"), "unpack", "bench:1", str(work / f"u{i}"),
                                  "--json")["seconds"])

        untar(0)
        unpack(0)
        unpack(1)
        untar(1)
        best_untar, best_unpack = min(t_untar), min(t_unpack)
        print("unpack (MB/s of tree data; higher is better; best of 2, alternating order)")
        row("shoal unpack (verifying every chunk)", f"{mbs(best_unpack):.0f} MB/s",
            f"{best_unpack:.2f} s (runs: {', '.join(f'{t:.2f}' for t in t_unpack)} s)")
        row("tar -x (plain tar, no verification)", f"{mbs(best_untar):.0f} MB/s",
            f"shoal is {best_untar / best_unpack:.2f}x (runs: {', '.join(f'{t:.2f}' for t in t_untar)} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
