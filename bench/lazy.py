#!/usr/bin/env python3
"""Lazy start over a throttled link: time to first output of a container, and bytes fetched by then,
against pulling everything first (Shoal's own pull, and the classic skopeo + umoci + runc path).

Usage: python bench/lazy.py [--tree DIR] [--reps N] [--full-reps N] [--mbit 100] [--latency-ms 20]

The tree is debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE).  The bench
starts its own loopback docker-registry and puts bench/throttle.py in front of it (one shared
100 Mbit/s token bucket, 20 ms added to every request; TCP_NODELAY on its sockets, see NODELAY below).
Every Shoal image and the classic image (one gzip layer made by umoci from the same tree, pushed with
skopeo) live in that registry; every client talks to it through the throttle, from a cold local store.

Per workload (``python3 -c 'print(1)'`` and ``python3 -c 'import json, email, http.client; print(1)'``):
- lazy, no profile:    ``shoal run --rm --prefetch none docker://THROTTLE/...``
- lazy, with profile:  ``shoal profile`` once (against the registry directly), then
                       ``shoal run --rm docker://THROTTLE/...`` (``--prefetch auto``, the default)
- shoal full:          ``shoal pull`` + ``shoal unpack`` + ``runc run`` of the unpacked tree
- classic full:        ``skopeo copy docker://... oci:`` + ``umoci unpack`` + ``runc run``
Time to first output runs from starting the first command to the first byte on the container's
stdout; bytes are what crossed the throttle by then (all requests: manifests, index, profile, ranges).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs, row, sh, tree_bytes  # noqa: E402
from pull import SKOPEO_HTTP, Registry  # noqa: E402
from throttle import Throttle  # noqa: E402

SHOAL = shutil.which("shoal") or str(Path(sys.executable).parent / "shoal")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKLOADS = {
    "print(1)": ["python3", "-c", "print(1)"],
    "import json, email, http.client": ["python3", "-c", "import json, email, http.client; print(1)"],
}
# eStargz, optimized, measured by its authors' method at 100 Mbit/s + 20 ms (docs: BRIEF.md §4)
ESTARGZ_SECONDS, ESTARGZ_BYTES = 0.96, 5.2e6


@dataclass
class Sample:
    seconds: float  # to the first byte of output
    bytes: int  # through the throttle by then
    requests: int
    total: float  # to the end of the last command


def first_output(cmds: list[list[str]], link: Any, env: dict[str, str] | None = None,
                 prepare: Callable[[], None] | None = None) -> Sample:
    """Run ``cmds`` one after the other; the last one's first stdout byte ends the clock.  ``prepare``
    runs before the last command with the clock stopped (it must not use the network)."""
    b0, r0 = link.bytes, link.requests
    t0 = time.perf_counter()
    for cmd in cmds[:-1]:
        subprocess.run(cmd, check=True, capture_output=True, env=env)
    paused = 0.0
    if prepare is not None:
        tp = time.perf_counter()
        prepare()
        paused = time.perf_counter() - tp
    p = subprocess.Popen(cmds[-1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    got = os.read(p.stdout.fileno(), 1)  # unbuffered: communicate() reads the rest from the fd
    t1 = time.perf_counter()
    b1, r1 = link.bytes, link.requests
    rest, err = p.communicate()
    if p.returncode != 0 or got + rest != b"1\n":
        raise SystemExit(f"{' '.join(cmds[-1])} failed ({p.returncode}): {(got + rest)[:200]!r} {err[-2000:]!r}")
    return Sample(t1 - t0 - paused, b1 - b0, r1 - r0, time.perf_counter() - t0 - paused)


def runc_bundle(bundle: Path, args: list[str], rootfs_dir: Path | None = None) -> None:
    """Point the runc bundle at ``bundle`` (umoci's config.json if there is one, else ``runc spec``'s)
    at ``args`` and, if given, ``rootfs_dir``."""
    cfg = bundle / "config.json"
    if not cfg.exists():
        bundle.mkdir(parents=True, exist_ok=True)
        sh(f"runc spec --bundle {bundle}")
    doc = json.loads(cfg.read_text())
    if rootfs_dir is not None:
        doc["root"] = {"path": str(rootfs_dir), "readonly": False}
    doc["process"]["args"] = args
    doc["process"]["terminal"] = False
    doc["process"]["env"] = [PATH_ENV, "HOME=/root"]
    cfg.write_text(json.dumps(doc))


def runc(bundle: Path, name: str) -> list[str]:
    return ["runc", "run", "--bundle", str(bundle), name]


def shoal(store: Path, *args: str) -> list[str]:
    return [SHOAL, "--store", str(store), *args]


def umount_all(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root) + "/")]
    for mp in sorted(mps, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def summary(samples: list[Sample]) -> Sample:
    best = min(samples, key=lambda s: s.seconds)
    return Sample(statistics.median(s.seconds for s in samples), best.bytes, best.requests,
                  statistics.median(s.total for s in samples))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3, help="lazy runs per case (the median is shown)")
    ap.add_argument("--full-reps", type=int, default=1, help="full pull+unpack runs (the median is shown)")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("runc"):
        sys.exit("bench/lazy.py needs root and runc")
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-lazy-", dir="/var/tmp"))
    env = {**os.environ, "SHOAL_RUN_DIR": str(work / "run")}
    reg = Registry(work)
    try:
        # ------------------------------------------------------------------ images in the registry
        s0 = work / "s0"
        subprocess.run(shoal(s0, "build", str(tree), "py:1", "--env", PATH_ENV, "--cmd", "python3"), check=True,
                       capture_output=True)
        direct = f"docker://{reg.host}/shoal/py:1"
        subprocess.run(shoal(s0, "push", "py:1", direct), check=True, capture_output=True)
        from shoal.store import Store

        st = Store.open(s0)
        m = st.resolve("py:1")
        image_bytes = m.index.size + m.config.size + sum(p.size for p in m.packs)
        lay, b1 = work / "classic", work / "classic-bundle"
        sh(f"umoci init --layout {lay} && umoci new --image {lay}:py && umoci unpack --image {lay}:py {b1}")
        sh(f"rmdir {b1}/rootfs && cp -a {tree} {b1}/rootfs && umoci repack --image {lay}:py {b1}")
        sh(f"umoci config --image {lay}:py --config.env {PATH_ENV} --config.cmd python3")
        sh(f"skopeo copy -q {' '.join(SKOPEO_HTTP)} oci:{lay}:py docker://{reg.host}/classic/py:1")
        idx = json.loads((lay / "index.json").read_text())
        man = json.loads((lay / "blobs" / "sha256" / idx["manifests"][-1]["digest"].split(":")[1]).read_text())
        classic_bytes = sum(x["size"] for x in man["layers"]) + man["config"]["size"]
        print(f"tree {tree}: {tree_bytes(tree) / 1e6:.1f} MB, {os.cpu_count()} cores; shoal image "
              f"{image_bytes / 1e6:.1f} MB (index {m.index.size / 1e6:.2f} MB), classic image "
              f"{classic_bytes / 1e6:.1f} MB; link {args.mbit:g} Mbit/s + {args.latency_ms:g} ms per request")

        with Throttle(f"http://{reg.host}", args.mbit, args.latency_ms) as t:
            lazy_ref = f"docker://{t.host}/shoal/py:1"
            n = 0

            def cold() -> Path:
                nonlocal n
                n += 1
                return work / f"cold{n}"

            lazy: dict[str, Sample] = {}
            with_profile: dict[str, Sample] = {}
            profiles: dict[str, dict[str, Any]] = {}
            for k, (label, cmd) in enumerate(WORKLOADS.items()):
                lazy[label] = summary([first_output([shoal(cold(), "run", "--rm", "--prefetch", "none", lazy_ref, "--",
                                                            *cmd)], t.link, env) for _ in range(args.reps)])
                # recorded once, straight against the registry; pushed there as a referrer of the image
                out = subprocess.run(shoal(work / f"prof{k}", "profile", "--json", direct, "--", *cmd), check=True,
                                     capture_output=True, env=env, stdin=subprocess.DEVNULL).stdout
                profiles[label] = json.loads(out.splitlines()[-1])
                with_profile[label] = summary([first_output([shoal(cold(), "run", "--rm", lazy_ref, "--", *cmd)],
                                                            t.link, env) for _ in range(args.reps)])
                umount_all(work)
            full: dict[str, list[Sample]] = {label: [] for label in WORKLOADS}
            classic: dict[str, list[Sample]] = {label: [] for label in WORKLOADS}
            for i in range(args.full_reps):
                for j, (label, cmd) in enumerate(WORKLOADS.items()):
                    sd, ud, bd = work / f"full{i}{j}", work / f"unpacked{i}{j}", work / f"fbundle{i}{j}"
                    runc_bundle(bd, cmd, ud)
                    os.sync()
                    full[label].append(first_output([shoal(sd, "pull", f"docker://{t.host}/shoal/py:1", "py:1"),
                                                     shoal(sd, "unpack", "py:1", str(ud)), runc(bd, f"f{i}{j}")],
                                                    t.link, env))
                    od, cb = work / f"oci{i}{j}", work / f"cbundle{i}{j}"
                    os.sync()
                    pre = [["skopeo", "copy", "-q", *SKOPEO_HTTP, f"docker://{t.host}/classic/py:1", f"oci:{od}:py"],
                           ["umoci", "unpack", "--image", f"{od}:py", str(cb)]]
                    # umoci writes the bundle's config.json; pointing it at the command is not timed
                    classic[label].append(first_output(pre + [runc(cb, f"c{i}{j}")], t.link, env,
                                                       prepare=functools.partial(runc_bundle, cb, cmd)))
        # ------------------------------------------------------------------ report
        print(f"time to first output (median of {args.reps} lazy / {args.full_reps} full runs; lower is better)")
        for label, cmd in WORKLOADS.items():
            a, p, f, c, pr = lazy[label], with_profile[label], summary(full[label]), summary(classic[label]), \
                profiles[label]
            print(f"  workload: {' '.join(cmd[:2])} '{cmd[2]}'")
            row("shoal run, lazy, no profile", f"{a.seconds:.2f} s",
                f"{a.bytes / 1e6:.2f} MB ({100 * a.bytes / image_bytes:.1f}% of the image), {a.requests} requests; "
                f"{a.seconds / c.seconds:.3f}x classic")
            row("shoal run, lazy, with profile", f"{p.seconds:.2f} s",
                f"{p.bytes / 1e6:.2f} MB ({100 * p.bytes / image_bytes:.1f}% of the image, goal <= 10%), "
                f"{p.requests} requests; {p.seconds / c.seconds:.3f}x classic (goal <= 0.15x); "
                f"profile: {pr['frames']} frames, {pr['bytes'] / 1e6:.2f} MB")
            row("shoal pull + unpack + runc run", f"{f.seconds:.2f} s",
                f"{f.bytes / 1e6:.1f} MB; lazy with profile is {p.seconds / f.seconds:.3f}x this")
            row("skopeo copy + umoci unpack + runc run", f"{c.seconds:.2f} s",
                f"{c.bytes / 1e6:.1f} MB ({100 * c.bytes / classic_bytes:.0f}% of the image); "
                f"shoal's full path is {f.seconds / c.seconds:.2f}x this")
            if cmd[2] == "print(1)":
                row("eStargz, optimized (published bar)", f"{ESTARGZ_SECONDS:.2f} s",
                    f"{ESTARGZ_BYTES / 1e6:.1f} MB; shoal lazy with profile: {p.seconds / ESTARGZ_SECONDS:.2f}x the "
                    f"time, {p.bytes / ESTARGZ_BYTES:.2f}x the bytes")
    finally:
        umount_all(work)
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
