#!/usr/bin/env python3
"""Storage for a series of related real images: classic tar.gz vs Shoal, in one registry run.

Usage: python bench/series.py
Series (each a single-layer classic image made with umoci from a debootstrap tree, cached in
$SHOAL_BENCH_CACHE): bookworm minbase, an independent rebuild of it, and the base plus python3,
plus git, plus curl.  Prints, from this run:
  - the sum of the classic layers (tar.gz) and the registry bytes after `skopeo copy` of all of them;
  - the registry bytes after pushing the Shoal conversions (each converted with --reuse of the
    earlier ones, like a distribution publishing versions);
  - the limit: every unique FastCDC chunk of all trees, compressed as one zstd -3 stream;
  - one Shoal image against `tar | zstd -3` of the same tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, rootfs, row, sh  # noqa: E402

SERIES = [
    ("base", "bookworm-base", ()),
    ("rebuild", "bookworm-rebuild", ()),
    ("python3", "bookworm-python3", ("python3",)),
    ("git", "bookworm-git", ("git",)),
    ("curl", "bookworm-curl", ("curl",)),
]


def du(path: Path) -> int:
    return int(sh(f"du -sb --apparent-size {path}").stdout.split()[0]) if path.exists() else 0


def classic_image(name: str, tree: Path) -> Path:
    """A single-layer OCI image of ``tree`` made by umoci (cached)."""
    layout = CACHE / f"oci-{name}"
    if (layout / ".complete").exists():
        return layout
    shutil.rmtree(layout, ignore_errors=True)
    bundle = Path(tempfile.mkdtemp(prefix="umoci-", dir="/var/tmp"))
    try:
        sh(f"umoci init --layout {layout} && umoci new --image {layout}:{name}")
        sh(f"umoci unpack --image {layout}:{name} {bundle}/b")
        sh(f"cp -a {tree}/. {bundle}/b/rootfs/")
        sh(f"umoci repack --image {layout}:{name} {bundle}/b")
        (layout / ".complete").touch()
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    return layout


def unique_chunk_limit(trees: list[Path]) -> tuple[int, int]:
    """(uncompressed, zstd -3 one-stream) bytes of the unique chunks of all trees."""
    from shoal.build import DirSource
    from shoal.chunking import get_chunker
    from shoal.format.model import Kind

    seen: set[bytes] = set()
    cctx = zstandard.ZstdCompressor(level=3).compressobj()
    raw = comp = 0
    chunker = get_chunker()
    import hashlib

    for t in trees:
        src = DirSource(t)
        for e in src.entries:
            if e.kind != Kind.FILE:
                continue
            data = src.read(e)
            mv = memoryview(data)
            for off, ln in chunker.cut(mv):
                piece = mv[off : off + ln]
                cid = hashlib.sha256(piece).digest()
                if cid not in seen:
                    seen.add(cid)
                    raw += ln
                    comp += len(cctx.compress(piece))
    comp += len(cctx.flush())
    return raw, comp


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    (work / "reg.yml").write_text(
        f"version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {work}/regdata}}\n"
        f"  delete: {{enabled: true}}\nhttp: {{addr: 127.0.0.1:{port}, secret: bench}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(work / "reg.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


def registry_blob_bytes(work: Path) -> int:
    """Bytes of the blob files the registry stores (directories are not counted: each blob has one)."""
    root = work / "regdata" / "docker" / "registry" / "v2" / "blobs"
    return sum(p.stat().st_size for p in root.rglob("data") if p.is_file()) if root.exists() else 0


def main() -> None:
    trees = [rootfs(cache, pkgs) for _, cache, pkgs in SERIES]
    layouts = [classic_image(n, t) for (n, _, _), t in zip(SERIES, trees)]
    work = Path(tempfile.mkdtemp(prefix="shoal-series-", dir="/var/tmp"))
    shoal = shutil.which("shoal") or "shoal"
    env = {**os.environ, "SHOAL_STORE": str(work / "store")}
    proc, reg = start_registry(work)
    try:
        classic_layers = 0
        for (n, _, _), layout in zip(SERIES, layouts):
            classic_layers += sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir()
                                  if p.stat().st_size > 1_000_000)
            sh(f"skopeo copy --quiet --dest-tls-verify=false oci:{layout}:{n} docker://{reg}/classic/{n}:1")
        classic_reg = registry_blob_bytes(work)
        reuse: list[str] = []
        for (n, _, _), layout in zip(SERIES, layouts):
            args = [shoal, "convert", f"oci:{layout}:{n}", f"series/{n}:1"]
            for r in reuse:
                args += ["--reuse", r]
            subprocess.run(args, check=True, env=env, capture_output=True)
            reuse.append(f"series/{n}:1")
            subprocess.run([shoal, "push", f"series/{n}:1", f"docker://{reg}/shoal/{n}:1"], check=True, env=env,
                           capture_output=True)
        shoal_reg = registry_blob_bytes(work) - classic_reg
        raw, limit = unique_chunk_limit(trees)
        print(f"series of {len(SERIES)} images: {', '.join(n for n, _, _ in SERIES)}")
        row("classic layers, sum of tar.gz", f"{classic_layers / 1e6:.1f} MB")
        row("registry bytes, classic (skopeo copy)", f"{classic_reg / 1e6:.1f} MB")
        row("registry bytes, Shoal (convert --reuse, push)", f"{shoal_reg / 1e6:.1f} MB",
            f"{shoal_reg / classic_reg:.3f}x classic registry bytes")
        row("limit: unique chunks, one zstd -3 stream", f"{limit / 1e6:.1f} MB",
            f"Shoal is {shoal_reg / limit:.3f}x the limit ({raw / 1e6:.0f} MB raw)")
        # one image against tar | zstd -3
        t0 = trees[0]
        zst = int(sh(f"tar -C {t0} -cf - . | zstd -q -3 -T0 | wc -c").stdout)
        insp = subprocess.run([shoal, "inspect", "series/base:1", "--json"], check=True, env=env,
                              capture_output=True).stdout
        import json

        size = json.loads(insp)["size"]
        row("one Shoal image (base)", f"{size / 1e6:.1f} MB", f"{size / zst:.3f}x tar | zstd -3 ({zst / 1e6:.1f} MB)")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
