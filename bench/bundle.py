#!/usr/bin/env python3
"""Bytes of a profile bundle (docs/spec/bundle.md) for the issue-12 workloads, by simulation.

Usage (after ``bench/frames.py trace``, which records the pages each workload reads):
  python bench/bundle.py [--tree DIR] [--store S --ref REF] [--levels 5,19] [--targets 64,256,1024]

For each workload, the bundle ``shoal.format.bundle.make`` gives for the image built from the tree
(``shoal build --no-reuse TREE REF`` into ``--store``; built if missing): the partial tree (every
directory holding a file the workload read, and its ancestors; the mount also lists directories the
workload only probed, which mincore cannot see: ``shoal profile`` records those) and every chunk
overlapping a page the workload had resident, compressed in data frames of ``--targets`` KiB at zstd
``--levels``.  Each bundle is checked with ``open_bundle`` against the image root.  Printed beside: the
index plus every frame holding a touched chunk (a profiled lazy start today) and the optimized eStargz
bytes of the same workloads (docs/spec/mount.md §7).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import frames as fr  # noqa: E402  (bench/frames.py: the tree model and the traces)

from shoal.format import bundle as fb  # noqa: E402
from shoal.format.model import Kind  # noqa: E402

ESTARGZ = {"print(1)": 5.18e6, "import json, email, ...": 8.93e6, "git --version": 3.88e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(fr.TREE))
    ap.add_argument("--store", default="/tmp/fr-s")
    ap.add_argument("--ref", default="img:1")
    ap.add_argument("--levels", default="5,19")
    ap.add_argument("--targets", default="64,256,1024")
    args = ap.parse_args()
    tree = Path(args.tree)
    access = json.loads((fr.WORK / "access.json").read_text())
    if not os.path.exists(args.store):
        subprocess.run([*fr.SHOAL, "--store", args.store, "build", "--no-reuse", str(tree), args.ref], check=True)
    t = fr.Tree(tree, args.store, args.ref)
    idx = t.idx
    pos = {os.fsdecode(e.path): i for i, e in enumerate(idx.entries)}
    # frames of the built image, for today's figure
    where = idx.chunk_frames
    print(f"index blob {t.index_blob / 1e6:.2f} MB; eStargz figures from mount.md §7\n")
    print(f"{'workload':26s} {'level':>5s} {'frame':>6s} {'dirs':>5s} {'files':>5s} {'chunks':>6s} "
          f"{'tree KB':>7s} {'data MB':>7s} {'bundle':>7s} {'vs eStargz':>10s} {'+index':>7s} {'vs eStargz':>10s} "
          f"{'today':>6s}")
    for w, acc in access.items():
        files = [pos[p] for p in acc if p in pos and idx.entries[pos[p]].kind == Kind.FILE]
        touched: list[int] = []
        for p in acc:
            ranges = acc[p]
            for ci, off, n in t.file_chunks.get(p, []):
                if any(s < off + n and off < e for s, e in ranges):
                    touched.append(ci)
        today = t.index_blob + sum(idx.frames[f].clen for f in {where[ci] for ci in touched})
        for level in map(int, args.levels.split(",")):
            for target in map(int, args.targets.split(",")):
                t0 = time.perf_counter()
                blob = fb.make(idx, [], files, touched, t.chunk_bytes, level=level, frame_target=target * 1024)
                secs = time.perf_counter() - t0
                b = fb.open_bundle(blob, idx.root)
                head = len(blob) - sum(c for _, c in b.frames)
                n = len(blob)
                print(f"{w:26s} {level:5d} {target:5d}K {len(b.dirs):5d} {len(b.files):5d} {len(b.chunks):6d} "
                      f"{head / 1e3:7.1f} {(n - head) / 1e6:7.2f} {n / 1e6:7.2f} {n / ESTARGZ[w]:9.2f}x "
                      f"{(n + t.index_blob) / 1e6:7.2f} {(n + t.index_blob) / ESTARGZ[w]:9.2f}x "
                      f"{today / 1e6:6.2f}  ({secs:.1f} s to make)", flush=True)


if __name__ == "__main__":
    main()
