#!/usr/bin/env python3
"""Convert speed: `shoal convert` of a >= 300 MB classic image against `skopeo copy` + `umoci unpack`
of the same image (the classic way to get from a layout to a usable tree), same run, warm caches.

Usage: python bench/convert.py
Image: one gzip layer made by umoci from debootstrap minbase bookworm + python3 + git (cached).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs, row, sh, timed, tree_bytes  # noqa: E402
from series import classic_image  # noqa: E402


def main() -> None:
    tree = rootfs("bookworm-py", ("python3", "git"))
    layout = classic_image("py", tree)
    size = tree_bytes(tree)
    work = Path(tempfile.mkdtemp(prefix="shoal-convert-", dir="/var/tmp"))
    shoal = shutil.which("shoal") or "shoal"
    try:
        sh(f"cat {layout}/blobs/sha256/* > /dev/null")
        out = subprocess.run([shoal, "--store", str(work / "store"), "convert", f"oci:{layout}:py", "conv:1", "--json"],
                             check=True, capture_output=True).stdout
        t_shoal = json.loads(out)["seconds"]
        t_copy, _ = timed(lambda: sh(f"skopeo copy -q oci:{layout}:py oci:{work}/copy:py"))
        t_unpack, _ = timed(lambda: sh(f"umoci unpack --image {work}/copy:py {work}/bundle"))
        classic = t_copy + t_unpack
        print(f"convert a classic image of {size / 1e6:.0f} MB (one gzip layer, umoci), {tree}")
        row("shoal convert (stream layer -> chunks -> packs)", f"{size / t_shoal / 1e6:.0f} MB/s", f"{t_shoal:.2f} s")
        row("skopeo copy + umoci unpack", f"{size / classic / 1e6:.0f} MB/s",
            f"{t_copy:.2f} + {t_unpack:.2f} s; shoal is {classic / t_shoal:.2f}x faster")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
