#!/usr/bin/env python3
"""Bytes of a profile bundle (docs/spec/bundle.md) for the issue-12 workloads, by simulation and live.

Usage (simulation, after ``bench/frames.py trace``, which records the pages each workload reads):
  python bench/bundle.py [--tree DIR] [--store S --ref REF] [--levels 5,19] [--targets 64,256,1024]
Usage (live, root and runc; a loopback registry behind bench/throttle.py, 100 Mbit/s + 20 ms):
  python bench/bundle.py --live [--tree DIR] [--reps 3]

Live: the tree is built (``--no-reuse``) and pushed twice, to ``bundle/py`` and ``plain/py`` (one manifest
digest); each workload is recorded once by ``shoal profile`` against ``bundle/py`` (profile and bundle
pushed there), and its profile alone is pushed as a referrer in ``plain/py``.  Then ``shoal run --rm``
from a cold store through the throttle, per repository: the bytes that crossed the link by the
container's first output (everything: manifests, index, referrers, profile, bundle, ranges) and by its
end, and the time to first output (noisy on 2 shared cores; the bytes are not).

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


def first_output(cmd: list[str], link: object, env: dict[str, str]) -> tuple[float, int, int]:
    """Run ``cmd``: seconds to its first byte of output, bytes over ``link`` by then and by its end."""
    b0 = link.bytes  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    got = os.read(p.stdout.fileno(), 1)
    t1, b1 = time.perf_counter(), link.bytes  # type: ignore[attr-defined]
    rest, err = p.communicate()
    if p.returncode != 0 or not got:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {(got + rest)[:200]!r} {err[-2000:]!r}")
    return t1 - t0, b1 - b0, link.bytes - b0  # type: ignore[attr-defined]


def live(tree: Path, reps: int) -> None:
    import shutil
    import statistics
    import tempfile

    import lazy as lz  # bench/lazy.py: first_output, Registry, Throttle

    from shoal.mount.profile import Profile, push_remote
    from shoal.store import Store

    work = Path(tempfile.mkdtemp(prefix="shoal-bench-bundle-", dir="/var/tmp"))
    env = {**os.environ, "SHOAL_RUN_DIR": str(work / "run")}
    reg = lz.Registry(work)
    try:
        s0 = work / "s0"
        subprocess.run(lz.shoal(s0, "build", "--no-reuse", str(tree), "py:1", "--env", lz.PATH_ENV), check=True,
                       capture_output=True)
        for repo in ("bundle", "plain"):
            subprocess.run(lz.shoal(s0, "push", "py:1", f"docker://{reg.host}/{repo}/py:1"), check=True,
                           capture_output=True)
        m = Store.open(s0).resolve("py:1")
        print(f"image {sum(p.size for p in m.packs) / 1e6:.1f} MB, index {m.index.size / 1e6:.2f} MB; "
              f"100 Mbit/s + 20 ms; medians of {reps} cold runs")
        print(f"{'workload':44s} {'repo':6s} {'bundle':>7s} {'first-out MB':>12s} {'vs eStargz':>10s} "
              f"{'end MB':>7s} {'seconds':>7s}")
        n = 0
        for k, (label, cmd) in enumerate(fr.WORKLOADS.items()):
            out = subprocess.run(lz.shoal(work / f"prof{k}", "profile", "--json", f"docker://{reg.host}/bundle/py:1",
                                          "--", *cmd), check=True, capture_output=True, env=env,
                                 stdin=subprocess.DEVNULL).stdout
            summary = json.loads(out.splitlines()[-1])
            prof = Profile.decode(Path(summary["local"]).read_bytes(), m.digest)
            push_remote(f"docker://{reg.host}/plain/py:1", None, prof)  # the profile without its bundle
            with lz.Throttle(f"http://{reg.host}", 100.0, 20.0) as t:
                for repo in ("bundle", "plain"):
                    samples = []
                    for _ in range(reps):
                        n += 1
                        run = lz.shoal(work / f"cold{n}", "run", "--rm", f"docker://{t.host}/{repo}/py:1", "--", *cmd)
                        samples.append(first_output(run, t.link, env))
                        lz.umount_all(work)
                    first = statistics.median(x[1] for x in samples)
                    end = statistics.median(x[2] for x in samples)
                    secs = statistics.median(x[0] for x in samples)
                    size = summary["bundle_bytes"] / 1e6 if repo == "bundle" else 0
                    print(f"{label:44s} {repo:6s} {size:7.2f} {first / 1e6:12.2f} {first / ESTARGZ[label]:9.2f}x "
                          f"{end / 1e6:7.2f} {secs:7.2f}", flush=True)
    finally:
        lz.umount_all(work)
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tree", default=str(fr.TREE))
    ap.add_argument("--store", default="/tmp/fr-s")
    ap.add_argument("--ref", default="img:1")
    ap.add_argument("--levels", default="5,19")
    ap.add_argument("--targets", default="64,256,1024")
    args = ap.parse_args()
    tree = Path(args.tree)
    if args.live:
        live(tree, args.reps)
        return
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
