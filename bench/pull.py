#!/usr/bin/env python3
"""Registry transfer: update bytes (push and pull of B after A) and full pull + unpack, against the
equivalent classic OCI image (umoci layers, skopeo), same registry, same run.

Usage: python bench/pull.py [--tree DIR] [--reps N] [--aged-fs]
A = debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE); B = A plus a 20 MB
file, 60 edited files and 20 removed ones.  Shoal's B is built with --reuse A (an update); B' is the
same tree built alone (its touched packs are new, so a pull after A takes range reads).  The classic
A is one gzip layer made by umoci from the same tree; classic B is A plus one umoci diff layer.
The registry is distribution's docker-registry on loopback; page caches are warm for everyone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, compile_bytecode, drop_caches_warm, rootfs, row, sh, tree_bytes  # noqa: E402

SHOAL = shutil.which("shoal") or str(Path(sys.executable).parent / "shoal")
SKOPEO_HTTP = ["--src-tls-verify=false", "--dest-tls-verify=false"]


# ------------------------------------------------------------------------------------------ setup


def apply_changes(root: Path, seed: int = 2024) -> None:
    """B's edits, deterministic: one 20 MB file (half random, half text), 60 files edited, 20 removed."""
    rng = random.Random(seed)
    data = bytearray()
    while len(data) < 20_000_000:
        data += rng.randbytes(4096)
        data += b"".join(b"record %d value %d\n" % (len(data), rng.randrange(1000)) for _ in range(180))
    (root / "opt" / "app").mkdir(parents=True, exist_ok=True)
    (root / "opt" / "app" / "data.bin").write_bytes(bytes(data[:20_000_000]))
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and 0 < p.stat().st_size < 65536
                   and "opt/app" not in str(p))
    picked = rng.sample(files, 80)
    for p in picked[:60]:
        with open(p, "ab") as f:
            f.write(b"\n# edited for B\n")
    for p in picked[60:]:
        p.unlink()


def tree_b(a: Path) -> Path:
    target = CACHE / "bookworm-py-b"
    if (target / ".shoal-complete").exists():
        return target / "root"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    print(f"[setup] {target}/root = A + changes ...", file=sys.stderr)
    sh(f"cp -a {a} {target}/root")
    apply_changes(target / "root")
    (target / ".shoal-complete").touch()
    return target / "root"


class Registry:
    def __init__(self, work: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        cfg = work / "registry.yml"
        cfg.write_text(f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n"
                       f"storage: {{filesystem: {{rootdirectory: {work}/registry}}, delete: {{enabled: true}}}}\n"
                       f"http: {{addr: '{self.host}', secret: bench}}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("docker-registry did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def shoal(store: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run([SHOAL, "--store", str(store), *args, "--json"], check=True, capture_output=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def wall(cmd: list[str]) -> float:
    os.sync()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


class FreshFs:
    """A new ext4 file system (a sparse image on a loop device) mounted at ``path`` for one measured
    step, so that no tool writes its files into a file system aged by the steps before it: on this
    machine / is ext4 with online ``discard``, and after a 0.5 GB tree is deleted, the next minutes of
    file creation go several times slower (``recently_deleted`` in ext4's inode allocation), which
    whichever tool runs later pays.  Unmounted (not timed) at the end of the step."""

    def __init__(self, root: Path, name: str, size_gb: int = 6) -> None:
        self.img, self.path = root / f"{name}.img", root / name
        with open(self.img, "wb") as f:
            f.truncate(size_gb << 30)
        sh(f"mkfs.ext4 -q -F {self.img}")
        self.path.mkdir()
        sh(f"mount -o loop {self.img} {self.path}")

    def close(self) -> None:
        sh(f"umount {self.path}")
        self.img.unlink()


def changed_chunks_zstd(store: Path, old: str, new: str) -> int:
    """Chunks of ``new`` that ``old`` lacks, each compressed alone at zstd -3 (the update limit)."""
    import zstandard

    from shoal.reader import Reader, StoreSource
    from shoal.store import Store

    st = Store.open(store)
    ia, ib = st.load_index(st.resolve(old)), st.load_index(st.resolve(new))
    have = set(ia.chunk_ids)
    reader = Reader(ib, StoreSource(st))
    cctx = zstandard.ZstdCompressor(level=3)
    seen: set[bytes] = set()
    total = 0
    for ci, cid in enumerate(ib.chunk_ids):
        if cid not in have and cid not in seen:
            seen.add(cid)
            total += len(cctx.compress(bytes(reader.chunk(ci))))
    return total


def umoci_images(a: Path, work: Path) -> Path:
    """Classic A (one layer of tree A) and B (A + one diff layer), both made by umoci from the same trees."""
    lay, b1, b2 = work / "classic", work / "bundle-a", work / "bundle-b"
    sh(f"umoci init --layout {lay} && umoci new --image {lay}:a && umoci unpack --image {lay}:a {b1}")
    sh(f"rmdir {b1}/rootfs && cp -a {a} {b1}/rootfs && umoci repack --image {lay}:a {b1}")
    sh(f"umoci unpack --image {lay}:a {b2}")
    apply_changes(b2 / "rootfs")
    sh(f"umoci repack --image {lay}:b {b2}")
    return lay  # the bundles go with the work directory at the end (see the note on `discard` in main)


def layers(layout: Path, tag: str) -> list[dict[str, Any]]:
    idx = json.loads((layout / "index.json").read_text())
    d = next(m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    man = json.loads((layout / "blobs" / "sha256" / d["digest"].split(":")[1]).read_text())
    return list(man["layers"])


# ------------------------------------------------------------------------------------------ run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3, help="full pull+unpack repetitions (best is shown)")
    ap.add_argument("--aged-fs", action="store_true",
                    help="write every full pull+unpack into the work directory's own file system (as before "
                         "2026-12-03) instead of a fresh ext4 for each step")
    args = ap.parse_args()
    compile_bytecode()
    a = args.tree or rootfs("bookworm-py", ("python3", "git"))
    b = tree_b(a)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-pull-", dir="/var/tmp"))
    reg = Registry(work)
    try:
        drop_caches_warm(a)
        drop_caches_warm(b)
        print(f"tree A {a}: {tree_bytes(a) / 1e6:.1f} MB; B = A + 20 MB file, 60 edits, 20 removals; "
              f"{os.cpu_count()} cores; registry {reg.host}")
        s1 = work / "s1"
        shoal(s1, "build", str(a), "a:1")
        shoal(s1, "build", str(b), "b:1", "--reuse", "a:1")
        shoal(s1, "build", str(b), "bb:1", "--no-reuse")  # built alone: its touched packs are new
        lay = umoci_images(a, work)
        for tag in ("a", "b"):
            sh(f"skopeo copy -q {' '.join(SKOPEO_HTTP)} oci:{lay}:{tag} docker://{reg.host}/classic:{tag}")
        la, lb = layers(lay, "a"), layers(lay, "b")
        classic_new = sum(x["size"] for x in lb if x["digest"] not in {y["digest"] for y in la})

        # --- push: B after A sends only B's new blobs
        pa = shoal(s1, "push", "a:1", f"docker://{reg.host}/shoal:a")
        pb = shoal(s1, "push", "b:1", f"docker://{reg.host}/shoal:b")
        pbb = shoal(s1, "push", "bb:1", f"docker://{reg.host}/shoal:bb")
        from shoal.store import Store

        st = Store.open(s1)
        ma, mb = st.resolve("a:1"), st.resolve("b:1")
        old = {p.digest for p in ma.packs}
        new_blobs = sum(p.size for p in mb.packs if p.digest not in old) + mb.index.size + mb.config.size
        print("push B after A (bytes sent; lower is better)")
        row("shoal push A (everything)", f"{pa['bytes_sent'] / 1e6:.2f} MB", f"{pa['requests']} requests")
        row("shoal push B (--reuse A)", f"{pb['bytes_sent'] / 1e6:.2f} MB",
            f"B's new packs+index+config {new_blobs / 1e6:.2f} MB; {pb['requests']} requests")
        row("shoal push B' (built alone)", f"{pbb['bytes_sent'] / 1e6:.2f} MB")
        row("classic B's new layer (skopeo push)", f"{classic_new / 1e6:.2f} MB",
            f"shoal is {pb['bytes_sent'] / classic_new:.2f}x")

        # --- pull B when A is local
        limit = changed_chunks_zstd(s1, "a:1", "b:1")
        s2 = work / "s2"
        shoal(s2, "pull", f"docker://{reg.host}/shoal:a", "a:1")
        s3 = work / "s3"
        shutil.copytree(s2, s3)
        ub = shoal(s2, "pull", f"docker://{reg.host}/shoal:b", "b:1")
        ubb = shoal(s3, "pull", f"docker://{reg.host}/shoal:bb", "bb:1")
        print("pull B when A is local (bytes fetched; lower is better)")
        row("changed chunks, each zstd -3 (the limit)", f"{limit / 1e6:.2f} MB")
        row("shoal pull B (--reuse A)", f"{ub['bytes_fetched'] / 1e6:.2f} MB",
            f"{ub['bytes_fetched'] / limit:.3f}x the limit (goal <= 1.3x); {ub['requests']} requests")
        row("shoal pull B' (built alone; range reads)", f"{ubb['bytes_fetched'] / 1e6:.2f} MB",
            f"{ubb['bytes_fetched'] / limit:.3f}x the limit; {ubb['requests']} requests")
        row("classic: B's new layer (skopeo pull)", f"{classic_new / 1e6:.2f} MB",
            f"shoal is {ub['bytes_fetched'] / classic_new:.2f}x")

        # --- full pull + unpack of A, CLI end to end, best of --reps.  Each step writes into a fresh ext4
        # of its own (FreshFs; --aged-fs: into the work directory, where nothing is deleted until the end):
        # / is ext4 mounted with online `discard`, and deleting a 0.5 GB tree slows the next minutes of
        # file creation several times over (measured: shoal unpack 1.7 s -> 9 s, umoci likewise).
        t_shoal: list[float] = []
        t_one: list[float] = []  # shoal pull --unpack: one command, the tree written as the packs arrive
        t_classic: list[float] = []
        t_floor: list[float] = []
        plain = work / "a.tar"  # the floor of writing the files: tar -x of a plain (uncompressed) tar of A
        sh(f"tar -C {a} --numeric-owner -cf {plain} .")
        fresh = not args.aged_fs
        where = "a fresh ext4 of its own" if fresh else "the work directory"
        print(f"full pull + unpack: each step's store and tree on {where}", file=sys.stderr)

        def place(name: str) -> tuple[Path, FreshFs | None]:
            if not fresh:
                return work / f"full-{name}", None
            fs = FreshFs(work, f"full-{name}")
            return fs.path, fs

        def done(fs: FreshFs | None) -> None:
            if fs is not None:
                fs.close()

        for i in range(args.reps):
            # every step starts with no dirty pages pending (``sync`` is not timed): fair to all four
            d, fs = place(f"s{i}")
            t1 = wall([SHOAL, "--store", str(d / "s"), "pull", f"docker://{reg.host}/shoal:a", "a:1"])
            t2 = wall([SHOAL, "--store", str(d / "s"), "unpack", "a:1", str(d / "u")])
            t_shoal.append(t1 + t2)
            done(fs)
            d, fs = place(f"o{i}")
            t5 = wall([SHOAL, "--store", str(d / "s"), "pull", f"docker://{reg.host}/shoal:a", "a:1", "--unpack",
                       str(d / "u")])
            t_one.append(t5)
            done(fs)
            d, fs = place(f"c{i}")
            t3 = wall(["skopeo", "copy", "-q", *SKOPEO_HTTP, f"docker://{reg.host}/classic:a", f"oci:{d / 'o'}:a"])
            t4 = wall(["umoci", "unpack", "--image", f"{d / 'o'}:a", str(d / "b")])
            t_classic.append(t3 + t4)
            done(fs)
            d, fs = place(f"x{i}")
            (d / "x").mkdir()
            t_floor.append(wall(["tar", "-C", str(d / "x"), "--numeric-owner", "-xpf", str(plain)]))
            done(fs)
            print(f"  [rep {i}] shoal pull {t1:.2f}s + unpack {t2:.2f}s; shoal pull --unpack {t5:.2f}s; skopeo copy "
                  f"{t3:.2f}s + umoci unpack {t4:.2f}s; tar -x {t_floor[-1]:.2f}s", file=sys.stderr)
        ts, t1c, tc, tf = min(t_shoal), min(t_one), min(t_classic), min(t_floor)
        print("full pull + unpack of A (seconds, best of each; lower is better)")
        row("shoal pull --unpack (one command)", f"{t1c:.2f} s",
            f"image {(sum(p.size for p in ma.packs)) / 1e6:.1f} MB; {tc / t1c:.2f}x faster than classic (goal >= 3x); "
            f"{t1c / tf:.2f}x the floor")
        row("shoal pull + shoal unpack (two commands)", f"{ts:.2f} s",
            f"{tc / ts:.2f}x faster than classic; {ts / tf:.2f}x the floor")
        row("skopeo copy + umoci unpack (classic)", f"{tc:.2f} s",
            f"layer {sum(x['size'] for x in la) / 1e6:.1f} MB; {tc / tf:.2f}x the floor")
        row("tar -x of a plain tar of A (the floor)", f"{tf:.2f} s", "writing the files, nothing else")
        # the same, rep by rep (each rep runs all four back to back: the ratios within a rep share the load)
        ratios = sorted(c / o for c, o in zip(t_classic, t_one))
        row("classic / shoal pull --unpack, per rep", ", ".join(f"{r:.2f}x" for r in ratios),
            f"median {ratios[len(ratios) // 2]:.2f}x")
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
