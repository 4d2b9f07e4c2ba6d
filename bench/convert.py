#!/usr/bin/env python3
"""Convert and export speed, each against its classic counterpart in the same run, warm caches.

Usage: python bench/convert.py [--tree DIR]
  1. `shoal convert` of a >= 300 MB classic image (one gzip layer made by umoci from ``--tree``, default
     debootstrap minbase bookworm + python3 + git, cached) against `skopeo copy` + `umoci unpack` of it
     (the classic way to get from a layout to a usable tree); with the CPU use of the convert
     (user+sys / wall: 2 cores make 200 %).
  2. `shoal convert` of a 3-layer classic image (bookworm minbase, then + python3, then + git, each
     layer made by `umoci repack` from the cached debootstrap trees of bench/dedup.py): wall time and
     CPU use.
  3. `shoal export` of the converted image with gzip against `pigz -6` of the same tar (the image's
     export with --compression none), same run, as a ratio (issue 13: export >= pigz -6 on the same
     cores); zstd and none for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, rootfs, row, sh, timed, tree_bytes  # noqa: E402
from series import classic_image  # noqa: E402


def layered_image() -> Path:
    """A 3-layer OCI image (tag ``l``): bookworm minbase, + python3, + git, by umoci repack (cached)."""
    layout = CACHE / "oci-layered3"
    if (layout / ".complete").exists():
        return layout
    trees = [rootfs("bookworm-base", (), "bookworm"), rootfs("bookworm-python3", ("python3",), "bookworm"),
             rootfs("bookworm-git", ("git",), "bookworm")]
    shutil.rmtree(layout, ignore_errors=True)
    bundle = Path(tempfile.mkdtemp(prefix="umoci-", dir="/var/tmp")) / "b"
    try:
        sh(f"umoci init --layout {layout} && umoci new --image {layout}:l")
        for tree in trees:  # each repack diffs against the unpacked image: a new layer of what changed
            sh(f"umoci unpack --image {layout}:l {bundle}")
            sh(f"cp -a {tree}/. {bundle}/rootfs/ && umoci repack --image {layout}:l {bundle}")
            shutil.rmtree(bundle)
        (layout / ".complete").touch()
    finally:
        shutil.rmtree(bundle.parent, ignore_errors=True)
    return layout


def run(cmd: list[str]) -> tuple[float, float, bytes]:
    """(wall seconds, CPU use in % of one core, stdout) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, 100 * cpu / wall, out


def layer_blob(layout: Path, manifest: bytes) -> Path:
    digest = json.loads(manifest)["layers"][0]["digest"]
    return layout / "blobs" / "sha256" / digest[7:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, help="root filesystem for the one-layer image (default: bookworm-py)")
    args = ap.parse_args()
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    layout = classic_image("py" if args.tree is None else f"tree-{tree.parent.name}", tree)
    layered = layered_image()
    size = tree_bytes(tree)
    work = Path(tempfile.mkdtemp(prefix="shoal-convert-", dir="/var/tmp"))
    shoal = shutil.which("shoal") or "shoal"
    store = ["--store", str(work / "store")]
    try:
        tag = next(iter(json.loads((layout / "index.json").read_text())["manifests"]))["annotations"][
            "org.opencontainers.image.ref.name"]
        sh(f"cat {layout}/blobs/sha256/* {layered}/blobs/sha256/* > /dev/null")
        wall, cpu, out = run([shoal, *store, "convert", f"oci:{layout}:{tag}", "conv:1", "--json"])
        t_shoal = json.loads(out)["seconds"]
        t_copy, _ = timed(lambda: sh(f"skopeo copy -q oci:{layout}:{tag} oci:{work}/copy:py"))
        t_unpack, _ = timed(lambda: sh(f"umoci unpack --image {work}/copy:py {work}/bundle"))
        shutil.rmtree(work / "bundle", ignore_errors=True)
        classic = t_copy + t_unpack
        print(f"convert a classic image of {size / 1e6:.0f} MB (one gzip layer, umoci), {tree}")
        row("shoal convert (stream layer -> chunks -> packs)", f"{size / t_shoal / 1e6:.0f} MB/s",
            f"{t_shoal:.2f} s (process {wall:.2f} s, CPU {cpu:.0f} %)")
        row("skopeo copy + umoci unpack", f"{size / classic / 1e6:.0f} MB/s",
            f"{t_copy:.2f} + {t_unpack:.2f} s; shoal is {classic / t_shoal:.2f}x faster")

        man = json.loads((layered / "blobs" / "sha256" / json.loads((layered / "index.json").read_text())[
            "manifests"][0]["digest"][7:]).read_bytes())
        gz = sum(d["size"] for d in man["layers"])
        # a store of its own: nothing to take from the one-layer conversion's chunks
        wall, cpu, out = run([shoal, "--store", str(work / "store2"), "convert", f"oci:{layered}:l", "layered:1",
                              "--json"])
        t_conv = json.loads(out)["seconds"]
        print(f"convert a {len(man['layers'])}-layer classic image ({gz / 1e6:.0f} MB of gzip layers, umoci repack)")
        row("shoal convert", f"{t_conv:.2f} s", f"process {wall:.2f} s, CPU {cpu:.0f} % (of 200 %)")

        print("export the one-layer conversion; pigz -6 compresses the same tar (the export with none)")
        res = {}
        for comp in ("none", "gzip", "zstd"):
            dest = work / f"out-{comp}"
            wall, cpu, out = run([shoal, *store, "export", "conv:1", f"oci:{dest}:x", "--compression", comp,
                                  "--json"])
            doc = json.loads(out)
            raw = (dest / "blobs" / "sha256" / doc["digest"][7:]).read_bytes()
            res[comp] = (doc["seconds"], cpu, layer_blob(dest, raw))
        tar = res["none"][2]
        tar_mb = tar.stat().st_size / 1e6
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t_pigz, _ = timed(lambda: sh(f"pigz -6 -c {tar} > {work}/pigz.gz"))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_pigz = 100 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / t_pigz
        t_gz, cpu_gz, blob_gz = res["gzip"]
        row("shoal export --compression gzip", f"{tar_mb / t_gz:.0f} MB/s",
            f"{t_gz:.2f} s, CPU {cpu_gz:.0f} %, {blob_gz.stat().st_size / 1e6:.1f} MB")
        row("pigz -6 of the same tar", f"{tar_mb / t_pigz:.0f} MB/s",
            f"{t_pigz:.2f} s, CPU {cpu_pigz:.0f} %, {os.path.getsize(work / 'pigz.gz') / 1e6:.1f} MB; "
            f"export/pigz = {t_pigz / t_gz:.2f}")
        for comp in ("zstd", "none"):
            t, cpu, blob = res[comp]
            row(f"shoal export --compression {comp}", f"{tar_mb / t:.0f} MB/s",
                f"{t:.2f} s, {blob.stat().st_size / 1e6:.1f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
