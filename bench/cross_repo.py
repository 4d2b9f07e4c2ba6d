#!/usr/bin/env python3
"""Pushes to a second repository of the same registry: bytes sent against the bytes of the blobs that
registry lacks under every repository (cross-repository mounts from the blob-info cache,
docs/transports.md §2.2).

Usage: python bench/cross_repo.py [--tree DIR]
Tree A: --tree, else the test suite's cached bookworm minbase, else debootstrap (bench/common.py).  B is A
plus one 8 MB file with 10 files removed, built with --reuse a:1 (a rebuild sharing A's packs).  One
docker-registry on loopback; the blob-info cache is a fresh directory of this run, never the machine's.

1. push a:1 -> r1                 everything goes up
2. push a:1 -> r2                 every blob mounted from r1: manifests only
3. pull r1 into a new store, push from it -> r3, with another blob-info cache (as on another machine):
   mounted from r1 where the pull saw the blobs; the runtime view's config and stub, which a pull
   never reads, go up again
4. push b:1 -> r4                 A's packs mounted, B's new blobs uploaded
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs, row, sh, tree_bytes  # noqa: E402
from pull import Registry  # noqa: E402

SHOAL = shutil.which("shoal") or str(Path(sys.executable).parent / "shoal")
TEST_TREE = Path(os.environ.get("SHOAL_TEST_CACHE", "/var/tmp/shoal-test-cache")) / "bookworm-minbase"


def shoal(store: Path, *args: str, cache: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "SHOAL_BLOB_INFO_CACHE_DIR": str(cache)} if cache else None
    out = subprocess.run([SHOAL, "--store", str(store), *args, "--json"], check=True, capture_output=True,
                         env=env).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def blobs(store: Path, name: str) -> dict[str, int]:
    from shoal.store import Store

    m = Store.open(store).resolve(name)
    return {**{p.digest: p.size for p in m.packs}, m.index.digest: m.index.size, m.config.digest: m.config.size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    args = ap.parse_args()
    a = args.tree or (TEST_TREE if (TEST_TREE.parent / "bookworm-minbase.complete").exists() else rootfs())
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-xrepo-", dir="/var/tmp"))
    os.environ["SHOAL_BLOB_INFO_CACHE_DIR"] = str(work / "blob-info-cache")
    reg = Registry(work)
    try:
        b = work / "tree-b"
        sh(f"cp -al {a} {b}")  # hard links: only new files and removals below, never an edit in place
        rng = random.Random(7)
        (b / "opt").mkdir(exist_ok=True)
        (b / "opt" / "new.bin").write_bytes(rng.randbytes(8 << 20))
        files = sorted(p for p in b.rglob("*") if p.is_file() and not p.is_symlink() and "opt/new" not in str(p))
        for p in rng.sample(files, 10):
            p.unlink()
        s1, s2 = work / "s1", work / "s2"
        shoal(s1, "build", str(a), "a:1")
        shoal(s1, "build", str(b), "b:1", "--reuse", "a:1")
        ba, bb = blobs(s1, "a:1"), blobs(s1, "b:1")
        print(f"tree A {a}: {tree_bytes(a) / 1e6:.1f} MB, {len(ba)} blobs; B: {len(bb)} blobs; registry {reg.host}")
        p1 = shoal(s1, "push", "a:1", f"docker://{reg.host}/r1:a")
        p2 = shoal(s1, "push", "a:1", f"docker://{reg.host}/r2:a")
        other = work / "other-cache"  # as on another machine: only the pull says where the blobs are
        shoal(s2, "pull", f"docker://{reg.host}/r1:a", "a:1", cache=other)
        p3 = shoal(s2, "push", "a:1", f"docker://{reg.host}/r3:a", cache=other)
        p4 = shoal(s1, "push", "b:1", f"docker://{reg.host}/r4:b")
        new_b = sum(size for d, size in bb.items() if d not in ba)
        print("bytes sent (lower is better); new = blobs the registry holds under no repository")
        row("1. push A -> r1 (new registry)", f"{p1['bytes_sent'] / 1e6:.3f} MB",
            f"{p1['blobs_sent']} blobs sent, new {sum(ba.values()) / 1e6:.3f} MB")
        row("2. push A -> r2 (A in r1)", f"{p2['bytes_sent'] / 1e3:.1f} kB",
            f"{p2['blobs_sent']} blobs sent, {p2['blobs_skipped']} mounted/present; new 0")
        row("3. pull r1, push -> r3 (other cache)", f"{p3['bytes_sent'] / 1e3:.1f} kB",
            f"{p3['blobs_sent']} blobs sent, {p3['blobs_skipped']} mounted/present")
        row("4. push B (--reuse A) -> r4", f"{p4['bytes_sent'] / 1e6:.3f} MB",
            f"{p4['blobs_sent']} blobs sent; new {new_b / 1e6:.3f} MB; "
            f"ratio {p4['bytes_sent'] / max(1, new_b):.3f}x")
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
