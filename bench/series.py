#!/usr/bin/env python3
"""Storage for a series of related real images: classic tar.gz vs Shoal, in one registry run.

Usage: python bench/series.py [--curl] [--analyze]
Series (each a single-layer classic image made with umoci from a debootstrap tree, cached in
$SHOAL_BENCH_CACHE), the one of issue 13: bookworm minbase, an independent debootstrap of it,
bookworm plus python3, plus git, trixie minbase, trixie plus python3 (each tree its own debootstrap;
--curl adds bookworm plus curl after git).  Prints, from this run:
  - the sum of the classic layers (tar.gz) and the registry bytes after `skopeo copy` of all of them;
  - the registry bytes after pushing the Shoal conversions (each converted with --reuse of the
    earlier ones, like a distribution publishing versions);
  - the limit: every unique FastCDC chunk of all trees, compressed as one zstd -3 stream;
  - one Shoal image against `tar | zstd -3` of the same tree;
  - where the registry bytes go: packs, indexes, configs and manifests; with --analyze also the
    bytes of the packs taken apart (chunks stored twice, frames against one stream, per image).
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
from common import CACHE, rootfs, row, sh, tree_chunks  # noqa: E402

# (image name, cache directory, packages, suite)
SERIES = [
    ("base", "bookworm-base", (), "bookworm"),
    ("rebuild", "bookworm-rebuild", (), "bookworm"),
    ("python3", "bookworm-python3", ("python3",), "bookworm"),
    ("git", "bookworm-git", ("git",), "bookworm"),
    ("trixie", "trixie-base", (), "trixie"),
    ("trixie-python3", "trixie-python3", ("python3",), "trixie"),
]
CURL = ("curl", "bookworm-curl", ("curl",), "bookworm")


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
    seen: set[bytes] = set()
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    raw = comp = 0
    for t in trees:
        for cid, piece in tree_chunks(t):
            if cid not in seen:
                seen.add(cid)
                raw += len(piece)
                comp += len(cobj.compress(piece))
    comp += len(cobj.flush())
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


def registry_blobs(work: Path) -> dict[str, int]:
    """Digest -> size of the blob files the registry stores (directories and links are not counted)."""
    root = work / "regdata" / "docker" / "registry" / "v2" / "blobs"
    if not root.exists():
        return {}
    return {"sha256:" + p.parent.name: p.stat().st_size for p in root.rglob("data") if p.is_file()}


def registry_blob_bytes(work: Path) -> int:
    """Bytes of the blob files the registry stores (directories are not counted: each blob has one)."""
    return sum(registry_blobs(work).values())


def blob_kinds(store_root: Path, names: list[str]) -> dict[str, str]:
    """Digest -> "pack", "index", "config" or "manifest" for the blobs of the store images ``names``."""
    from shoal.store import Store

    store = Store.open(store_root)
    kinds: dict[str, str] = {}
    for n in names:
        m = store.resolve(n)
        kinds[m.digest] = "manifest"
        kinds[m.config.digest] = "config"
        kinds[m.index.digest] = "index"
        for p in m.packs:
            kinds[p.digest] = "pack"
    return kinds


def analyze(store_root: Path, names: list[str]) -> None:
    """Take the series' packs apart: which bytes over the limit are chunks stored twice, which are frames
    (each its own zstd -5 stream) against one zstd -3 stream, which are indexes; then image by image."""
    from shoal.format import packing
    from shoal.format.model import Kind
    from shoal.store import Store

    store = Store.open(store_root)
    frames: dict[tuple[bytes, int], tuple[int, int]] = {}  # (pack, offset) -> (clen, ulen)
    frame_chunks: dict[tuple[bytes, int], list[tuple[bytes, int, int]]] = {}  # -> (id, off, len)
    small: set[tuple[bytes, int]] = set()
    per_image = []
    for n in names:
        m = store.resolve(n)
        idx = store.load_index(m)
        own = {p.digest for p in m.packs}
        first = [k for k in ((idx.packs[f.pack], f.offset) for f in idx.frames) if k not in frames]
        new_frames = set(first)
        for f in idx.frames:
            frames.setdefault((idx.packs[f.pack], f.offset), (f.clen, f.ulen))
        by_frame = idx.chunks_by_frame()
        small_chunks = {ci for e in idx.entries if e.kind == Kind.FILE and packing.small_file(e.size)
                        for ci in e.chunks}
        for fi, cis in by_frame.items():
            f = idx.frames[fi]
            k = (idx.packs[f.pack], f.offset)
            if k in new_frames:
                frame_chunks[k] = [(idx.chunk_ids[ci], idx.chunk_offsets[ci], idx.chunk_lengths[ci]) for ci in cis]
                if cis[0] in small_chunks:
                    small.add(k)
        per_image.append((n, len(own), m.index.size, sum(frames[k][0] for k in new_frames),
                          sum(frames[k][1] for k in new_frames), len(new_frames)))
    # chunks stored in more than one frame
    where: dict[bytes, int] = {}
    stored_raw = 0
    for cs in frame_chunks.values():
        for cid, _, ln in cs:
            where[cid] = where.get(cid, 0) + 1
            stored_raw += ln
    lens = {cid: ln for cs in frame_chunks.values() for cid, _, ln in cs}
    unique_raw = sum(lens.values())
    dup_chunks = sum(1 for c in where.values() if c > 1)
    # recompress what the packs hold: per frame at -3 and -5, and the unique chunks as one stream
    c3 = zstandard.ZstdCompressor(level=3)
    one3 = zstandard.ZstdCompressor(level=3).compressobj()
    one5 = zstandard.ZstdCompressor(level=5).compressobj()
    # the chunks of small-file frames and of the others, each kind as its own zstd -5 stream
    one5_kind = {True: zstandard.ZstdCompressor(level=5).compressobj(),
                 False: zstandard.ZstdCompressor(level=5).compressobj()}
    kind_n = {True: 0, False: 0}
    per3 = clen_all = one3_n = one5_n = 0
    small_clen = small_ulen = 0
    written: set[bytes] = set()
    for k, cs in frame_chunks.items():
        clen, ulen = frames[k]
        raw = packing.decompress_frame(store.read_frame("sha256:" + k[0].hex(), k[1], clen), ulen, "analyze")
        clen_all += clen
        per3 += len(c3.compress(raw))
        kind_n[k in small] += len(one5_kind[k in small].compress(raw))
        if k in small:
            small_clen += clen
            small_ulen += ulen
        for cid, off, ln in cs:
            if cid not in written:
                written.add(cid)
                one3_n += len(one3.compress(raw[off:off + ln]))
                one5_n += len(one5.compress(raw[off:off + ln]))
    one3_n += len(one3.flush())
    one5_n += len(one5.flush())
    for kind in (True, False):
        kind_n[kind] += len(one5_kind[kind].flush())
    idx_total = sum(r[2] for r in per_image)
    print("analysis of the Shoal packs (from the store, which holds the blobs the registry got):")
    row("frames stored", f"{len(frame_chunks)}", f"{sum(1 for _ in small)} small-file frames")
    row("chunk bytes stored (raw)", f"{stored_raw / 1e6:.1f} MB",
        f"unique {unique_raw / 1e6:.1f} MB; {dup_chunks} chunks in 2+ frames")
    row("pack bytes (frames, zstd -5 each)", f"{clen_all / 1e6:.2f} MB")
    row("same frames, zstd -3 each", f"{per3 / 1e6:.2f} MB")
    row("unique stored chunks, one zstd -5 stream", f"{one5_n / 1e6:.2f} MB",
        f"frames cost {clen_all / one5_n:.3f}x")
    row("unique stored chunks, one zstd -3 stream", f"{one3_n / 1e6:.2f} MB",
        f"packs are {clen_all / one3_n:.3f}x")
    row("small-file frames", f"{small_clen / 1e6:.2f} MB",
        f"{small_ulen / 1e6:.1f} MB raw; one zstd -5 stream {kind_n[True] / 1e6:.2f} MB "
        f"({small_clen / kind_n[True]:.3f}x)")
    row("other frames", f"{(clen_all - small_clen) / 1e6:.2f} MB",
        f"{(stored_raw - small_ulen) / 1e6:.1f} MB raw; one zstd -5 stream {kind_n[False] / 1e6:.2f} MB "
        f"({(clen_all - small_clen) / kind_n[False]:.3f}x)")
    row("index blobs, all images", f"{idx_total / 1e6:.2f} MB")
    print(f"  {'image':<16} {'packs':>6} {'new frames':>10} {'new pack MB':>12} {'new raw MB':>11} {'index MB':>9}")
    for n, npk, isz, nclen, nulen, nf in per_image:
        print(f"  {n:<16} {npk:>6} {nf:>10} {nclen / 1e6:>12.2f} {nulen / 1e6:>11.1f} {isz / 1e6:>9.3f}")


def main() -> None:
    series = list(SERIES)
    if "--curl" in sys.argv[1:]:
        series.insert(4, CURL)
    names = [n for n, _, _, _ in series]
    trees = [rootfs(cache, pkgs, suite) for _, cache, pkgs, suite in series]
    layouts = [classic_image(n, t) for n, t in zip(names, trees)]
    work = Path(tempfile.mkdtemp(prefix="shoal-series-", dir="/var/tmp"))
    shoal = shutil.which("shoal") or "shoal"
    env = {**os.environ, "SHOAL_STORE": str(work / "store")}
    proc, reg = start_registry(work)
    try:
        classic_layers = 0
        for n, layout in zip(names, layouts):
            classic_layers += sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir()
                                  if p.stat().st_size > 1_000_000)
            sh(f"skopeo copy --quiet --dest-tls-verify=false oci:{layout}:{n} docker://{reg}/classic/{n}:1")
        classic_blobs = registry_blobs(work)
        classic_reg = sum(classic_blobs.values())
        reuse: list[str] = []
        for n, layout in zip(names, layouts):
            args = [shoal, "convert", f"oci:{layout}:{n}", f"series/{n}:1"]
            for r in reuse:
                args += ["--reuse", r]
            subprocess.run(args, check=True, env=env, capture_output=True)
            reuse.append(f"series/{n}:1")
            subprocess.run([shoal, "push", f"series/{n}:1", f"docker://{reg}/shoal/{n}:1"], check=True, env=env,
                           capture_output=True)
        shoal_blobs = {d: n for d, n in registry_blobs(work).items() if d not in classic_blobs}
        shoal_reg = sum(shoal_blobs.values())
        raw, limit = unique_chunk_limit(trees)
        print(f"series of {len(series)} images: {', '.join(names)}")
        row("classic layers, sum of tar.gz", f"{classic_layers / 1e6:.1f} MB")
        row("registry bytes, classic (skopeo copy)", f"{classic_reg / 1e6:.1f} MB")
        row("registry bytes, Shoal (convert --reuse, push)", f"{shoal_reg / 1e6:.1f} MB",
            f"{shoal_reg / classic_reg:.3f}x classic registry bytes")
        row("limit: unique chunks, one zstd -3 stream", f"{limit / 1e6:.1f} MB",
            f"Shoal is {shoal_reg / limit:.3f}x the limit ({raw / 1e6:.0f} MB raw)")
        kinds = blob_kinds(work / "store", [f"series/{n}:1" for n in names])
        by_kind: dict[str, int] = {}
        for d, size in shoal_blobs.items():
            by_kind[kinds.get(d, "other")] = by_kind.get(kinds.get(d, "other"), 0) + size
        count: dict[str, int] = {}
        for d in shoal_blobs:
            count[kinds.get(d, "other")] = count.get(kinds.get(d, "other"), 0) + 1
        for k in ("pack", "index", "config", "manifest", "other"):
            if k in by_kind:
                label = f"  of which {k} blobs" + (" (classic stubs)" if k == "other" else "")
                row(label, f"{by_kind[k] / 1e6:.2f} MB",
                    f"{by_kind[k] / limit:.4f}x the limit, {count[k]} blobs")
        # one image against tar | zstd -3
        t0 = trees[0]
        zst = int(sh(f"tar -C {t0} -cf - . | zstd -q -3 -T0 | wc -c").stdout)
        insp = subprocess.run([shoal, "inspect", "series/base:1", "--json"], check=True, env=env,
                              capture_output=True).stdout
        import json

        size = json.loads(insp)["size"]
        row("one Shoal image (base)", f"{size / 1e6:.1f} MB", f"{size / zst:.3f}x tar | zstd -3 ({zst / 1e6:.1f} MB)")
        if "--analyze" in sys.argv[1:]:
            analyze(work / "store", [f"series/{n}:1" for n in names])
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
