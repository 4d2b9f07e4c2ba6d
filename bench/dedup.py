#!/usr/bin/env python3
"""Store and registry growth when an image is built next to related ones (issue 13).

Usage: python bench/dedup.py [--no-registry]
In a fresh store, `shoal build` bookworm minbase as a:1, then next to it, in order:
  b:1  bookworm + python3 (its own debootstrap), built;
  c:1  the same bookworm tree as a:1 with usr/share/doc deleted, built;
  d:1  bookworm + git, a classic one-layer image (umoci) run through `shoal convert`.
Trees and the classic image are cached in $SHOAL_BENCH_CACHE (see common.rootfs, series.classic_image).

For each step it prints what the store grew by (the apparent sizes of the blob files under blobs/ that
the step added: packs, index, config and manifest) against the compressed size of the step's new
chunks: the FastCDC chunks of its tree (per regular file, as `shoal build` cuts them) that are in none
of the trees already in the store, compressed as one zstd level-5 stream (the level of Shoal's frames).
Goal (issue 13): store growth <= 1.1x that, with no flag.  It runs the steps with no flag, with the
explicit `--reuse` of every earlier image, and with `--no-reuse` when the CLI has it (read from
`shoal build --help`).

Then, for each of those stores, it pushes the images in the same order to a fresh docker-registry, once
all into one repository and once each into its own, and prints the registry's growth (blob files) and
the bytes the push sent against the same new chunks.  Goal: <= 1.05x.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, new_chunks, rootfs, sh  # noqa: E402
from series import classic_image, registry_blobs, start_registry  # noqa: E402

LEVEL = 5  # zstd level of the new-chunk yardstick: the level of Shoal's frames (format.md §5.3)


@dataclass(frozen=True)
class Step:
    ref: str
    label: str
    convert: bool
    tree: Path
    source: str  # what shoal builds or converts


@dataclass
class Measure:
    new_chunks: int
    new_raw: int
    new_comp: int  # one zstd -5 stream


def nodoc_tree(base: Path) -> Path:
    """``base`` with usr/share/doc deleted (cached)."""
    target = CACHE / "bookworm-nodoc"
    if not (target / ".shoal-complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        sh(f"cp -a {base} {target}/root && rm -rf {target}/root/usr/share/doc")
        (target / ".shoal-complete").touch()
    return target / "root"


def steps() -> list[Step]:
    base = rootfs("bookworm-base", (), "bookworm")
    py = rootfs("bookworm-python3", ("python3",), "bookworm")
    git = rootfs("bookworm-git", ("git",), "bookworm")
    nodoc = nodoc_tree(base)
    layout = classic_image("git", git)
    return [
        Step("a:1", "bookworm", False, base, str(base)),
        Step("b:1", "bookworm + python3", False, py, str(py)),
        Step("c:1", "bookworm - usr/share/doc", False, nodoc, str(nodoc)),
        Step("d:1", "bookworm + git (convert)", True, git, f"oci:{layout}:git"),
    ]


def store_blobs(store: Path) -> dict[str, int]:
    root = store / "blobs" / "sha256"
    return {"sha256:" + p.name: p.stat().st_size for p in root.iterdir() if p.is_file()} if root.exists() else {}


def classify(store: Path, ref: str) -> dict[str, str]:
    """Digest -> "pack", "index" or "meta" (config, manifest) for the store image ``ref``."""
    from shoal.store import Store

    m = Store.open(store).resolve(ref)
    kinds = {m.digest: "meta", m.config.digest: "meta", m.index.digest: "index"}
    kinds.update({p.digest: "pack" for p in m.packs})
    return kinds


def has_flag(shoal: str, cmd: str, flag: str) -> bool:
    out = subprocess.run([shoal, cmd, "--help"], check=True, capture_output=True, text=True).stdout
    return flag in out.split()


def ratio(a: int, y: Measure) -> str:
    return f"{a / y.new_comp:.3f}x" if y.new_chunks else "n/a"


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def run_store(shoal: str, store: Path, plan: list[Step], mode: str, yard: list[Measure]) -> None:
    env = {**os.environ, "SHOAL_STORE": str(store)}
    print(f"store growth, {mode}:")
    print(f"  {'step':<28} {'grew MB':>8} {'packs':>7} {'index':>6} {'meta':>6} {'new MB':>7} {'grew/new':>9} "
          f"{'packs/new':>9} {'s':>5}")
    for i, st in enumerate(plan):
        if mode == "--reuse":
            flags = [a for s in plan[:i] for a in ("--reuse", s.ref)]
        elif mode == "--no-reuse":
            flags = ["--no-reuse"]
        else:
            flags = []
        before = store_blobs(store)
        t = time.monotonic()
        cmd = [shoal, "convert" if st.convert else "build", st.source, st.ref, *flags]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        secs = time.monotonic() - t
        added = {d: n for d, n in store_blobs(store).items() if d not in before}
        kinds = classify(store, st.ref)
        parts = {"pack": 0, "index": 0, "meta": 0, "other": 0}
        for d, n in added.items():
            parts[kinds.get(d, "other")] += n
        grew = sum(added.values())
        other = f"  (+{mb(parts['other'])} MB of other blobs)" if parts["other"] else ""
        y = yard[i]
        print(f"  {st.ref + ' ' + st.label:<28} {mb(grew):>8} {mb(parts['pack']):>7} {mb(parts['index']):>6} "
              f"{mb(parts['meta']):>6} {mb(y.new_comp):>7} {ratio(grew, y):>9} "
              f"{ratio(parts['pack'], y):>9} {secs:>5.1f}{other}")


def run_registry(shoal: str, store: Path, plan: list[Step], mode: str, yard: list[Measure], work: Path) -> None:
    env = {**os.environ, "SHOAL_STORE": str(store)}
    for case in ("one repository", "own repositories"):
        regwork = Path(tempfile.mkdtemp(prefix="reg-", dir=work))
        proc, reg = start_registry(regwork)
        try:
            print(f"registry growth, store built {mode}, pushed into {case}:")
            print(f"  {'push':<28} {'grew MB':>8} {'sent MB':>8} {'new MB':>7} {'grew/new':>9} {'sent/new':>9}")
            for i, st in enumerate(plan):
                name, tag = st.ref.split(":")
                dst = f"docker://{reg}/dedup/img:{name}" if case == "one repository" else \
                    f"docker://{reg}/dedup/{name}:{tag}"
                before = registry_blobs(regwork)
                out = subprocess.run([shoal, "push", st.ref, dst, "--json"], check=True, env=env,
                                     capture_output=True).stdout
                sent = int(json.loads(out.splitlines()[-1])["bytes_sent"])
                grew = sum(n for d, n in registry_blobs(regwork).items() if d not in before)
                y = yard[i]
                print(f"  {st.ref + ' ' + st.label:<28} {mb(grew):>8} {mb(sent):>8} {mb(y.new_comp):>7} "
                      f"{ratio(grew, y):>9} {ratio(sent, y):>9}")
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    plan = steps()
    shoal = shutil.which("shoal") or "shoal"
    modes = ["no flag", "--reuse"]
    if has_flag(shoal, "build", "--no-reuse") and has_flag(shoal, "convert", "--no-reuse"):
        modes.append("--no-reuse")
    else:
        print("(shoal build/convert have no --no-reuse here: that mode is left out)")
    seen: set[bytes] = set()
    yard = [Measure(*new_chunks(st.tree, seen, LEVEL)) for st in plan]
    print("new chunks of each step: FastCDC chunks of its tree in none of the earlier trees, "
          f"one zstd -{LEVEL} stream")
    for st, y in zip(plan, yard):
        print(f"  {st.ref + ' ' + st.label:<28} {y.new_chunks:>6} chunks {y.new_raw / 1e6:>7.1f} MB raw "
              f"{y.new_comp / 1e6:>7.2f} MB zstd -{LEVEL}")
    work = Path(tempfile.mkdtemp(prefix="shoal-dedup-", dir="/var/tmp"))
    try:
        stores = {}
        for mode in modes:
            stores[mode] = work / f"store-{len(stores)}"
            run_store(shoal, stores[mode], plan, mode, yard)
        if "--no-registry" not in sys.argv[1:]:
            for mode in modes:
                run_registry(shoal, stores[mode], plan, mode, yard, work)
        print("goal (issue 13): store grew/new <= 1.1x with no flag; registry grew and sent/new <= 1.05x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
