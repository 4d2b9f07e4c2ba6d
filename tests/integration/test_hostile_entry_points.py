"""Hostile Shoal images through every way in: pull and copy from a real registry (``docker://``),
copy from ``oci:`` and ``oci-archive:`` layouts, and mount (a store image and ``docker://``).

One table, ``CASES``, crossed with ``ENTRY_POINTS``: adding a case is one line (``Case(...)``).
Every hand-made image is made through the library (``make_index``/``encode``/``compress``, the
``Image`` helper of tests/functional/test_hostile_images.py), put into a source store, pushed to the
session registry and written as an ``oci-archive`` tarball once per module.

What each run must show:

- ``kind="index"`` (the index itself is hostile): every entry point refuses with ONE
  ``shoal: error:`` line and the case's exit code, and leaves nothing mounted -- except that a mount
  checks each directory when it is first used (docs/spec/format.md §6.2): it may mount, and then
  every use of what the hostile part touches fails with EIO, and the rest serves verified entries only
  (an index that is merely a non-canonical encoding of a sound tree serves that tree).
- ``kind="data"`` (a well-formed index that lies about packs, frames or chunks): pull and copy fail
  with one line, and a mount serves EIO for every file whose bytes do not verify and exact bytes for
  the others -- never a byte that does not verify.
- ``kind="big"`` (huge declared counts): ends, either way, within the case's time and memory.

And always: nothing tagged after a failed pull/copy, ``fsck`` (which re-hashes every chunk and
catalogue row) clean, nothing written outside the store (the sentinel and the working directory are
unchanged), nothing left mounted (/proc/self/mountinfo), bounded peak RSS (``/usr/bin/time -f %M``
for the CLI, ``VmHWM`` for a mount daemon).  ``SHOAL_STRESS=1`` makes the big cases 10x bigger.
"""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import zstandard

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "functional"))
sys.path.insert(0, str(TESTS / "mount"))

import test_hostile_images as hi  # noqa: E402
from mountkit import mounts_under, run_dir_fixture  # noqa: E402,F401

import helpers  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401
from shoal.format import index as fidx  # noqa: E402
from shoal.format.model import Entry, Frame  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.store.maintenance import fsck  # noqa: E402

__all__ = ["registry"]

STRESS = os.environ.get("SHOAL_STRESS", "") not in ("", "0")
BIG = 1_000_000 if STRESS else 20_000
MiB = 1 << 20
D, F, L, H = hi.D, hi.F, hi.L, hi.H
Made = tuple[bytes, str, list[bytes]]  # compressed index, root, pack blobs

# ---------------------------------------------------------------------------------------------- crafting


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def _image(entries: list[Entry], chunks: list[bytes], locs: list[tuple[int, int]], frames: list[Frame],
           packs: list[bytes], ids: list[bytes] | None = None) -> Made:
    """An image of ``entries`` whose chunk ``i`` has id sha256(chunks[i]) (or ``ids[i]``) and lives in
    frame ``locs[i][0]`` at offset ``locs[i][1]``; ``frames`` index ``packs``."""
    ids = ids or [_sha(c) for c in chunks]
    idx = fidx.make_index(entries, ids, [f for f, _ in locs], [o for _, o in locs], [len(c) for c in chunks],
                          frames, [_sha(p) for p in packs])
    return fidx.compress(fidx.encode(idx)), "sha256:" + idx.root.hex(), packs


def _z(data: bytes, content_size: bool = True) -> bytes:
    if content_size:
        return zstandard.ZstdCompressor(level=3).compress(data)
    c = zstandard.ZstdCompressor(level=3).compressobj()  # streamed: the header declares no size
    return c.compress(data) + c.flush()


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


C0, C1 = _rand(20_000, 1), _rand(30_000, 2)


def _one_chunk(frame: bytes, ulen: int = len(C0), clen: int | None = None, offset: int = 0) -> Made:
    """``x`` = C0, in a frame of the given bytes; ``ok`` = empty."""
    return _image([D(b""), F(b"ok"), F(b"x", (0,), len(C0))], [C0], [(0, 0)],
                  [Frame(0, offset, len(frame) if clen is None else clen, ulen)], [frame])


def _frame_header_1gib(_: Path) -> Made:
    """A 16-byte frame whose header declares 1 GiB: must be refused before anything is allocated."""
    return _one_chunk(hi._fake_zstd_header(1 << 30))


def _frame_undeclared_overflow(_: Path) -> Made:
    """A streamed frame (no declared size) of 256 MiB of zeros; the index says 20 000 bytes."""
    z = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(16 * MiB)
    frame = b"".join(z.compress(zeros) for _ in range(16)) + z.flush()
    return _image([D(b""), F(b"x", (0,), 20_000)], [bytes(20_000)], [(0, 0)], [Frame(0, 0, len(frame), 20_000)],
                  [frame])


def _frame_declares_less(_: Path) -> Made:
    return _one_chunk(hi._lying_size(C0))


def _frame_clen_past_pack_end(_: Path) -> Made:
    frame = _z(C0)
    return _one_chunk(frame, clen=len(frame) + 5000)


def _overlapping_frames(_: Path) -> Made:
    """Frame 1's record starts inside frame 0: ``good`` (frame 0) reads, ``bad`` (frame 1) does not."""
    f0, f1 = _z(C0), _z(C1)
    frames = [Frame(0, 0, len(f0), len(C0)), Frame(0, len(f0) // 2, len(f1), len(C1))]
    return _image([D(b""), F(b"bad", (1,), len(C1)), F(b"good", (0,), len(C0))], [C0, C1], [(0, 0), (1, 0)],
                  frames, [f0 + f1])


def _swapped_locations(_: Path) -> Made:
    """Right ids, right frame, but each chunk's location is the other's: two digest mismatches."""
    a, b = _rand(25_000, 3), _rand(25_000, 4)
    frame = _z(a + b)
    return _image([D(b""), F(b"a", (0,), len(a)), F(b"b", (1,), len(b)), F(b"ok")], [a, b], [(0, 25_000), (0, 0)],
                  [Frame(0, 0, len(frame), 50_000)], [frame])


def _symlink_loop(_: Path) -> Made:
    return hi._plain(hi.Image([D(b""), L(b"a", b"a"), F(b"a/x")]))


def _chunk_past_frame(_: Path) -> Made:
    frame = _z(C0)
    return _image([D(b""), F(b"x", (0,), len(C0))], [C0], [(0, 100)], [Frame(0, 0, len(frame), len(C0))], [frame])


def _frame_ulen_1gib(_: Path) -> Made:
    return _one_chunk(_z(C0), ulen=1 << 30)


def _many_frames(_: Path) -> Made:
    """BIG frame records (one real, the rest copies of it): a legal, absurd index."""
    frame = _z(C0)
    f = Frame(0, 0, len(frame), len(C0))
    return _image([D(b""), F(b"x", (0,), len(C0))], [C0], [(0, 0)], [f] * BIG, [frame])


def _many_refs(_: Path) -> Made:
    """One file of BIG references to one chunk (a 2 GB file from a 20 KB pack)."""
    frame = _z(C0)
    return _image([D(b""), F(b"x", (0,) * BIG, len(C0) * BIG)], [C0], [(0, 0)], [Frame(0, 0, len(frame), len(C0))],
                  [frame])


def _many_chunks(_: Path) -> Made:
    """BIG distinct chunk ids all located in one frame: only the first one's bytes verify."""
    frame = _z(C0)
    ids = [_sha(C0)] + [_sha(b"%d" % i) for i in range(BIG - 1)]
    idx = fidx.make_index([D(b""), F(b"bad", tuple(range(1, BIG)), len(C0) * (BIG - 1)), F(b"x", (0,), len(C0))],
                          ids, [0] * BIG, [0] * BIG, [len(C0)] * BIG, [Frame(0, 0, len(frame), len(C0))], [_sha(frame)])
    return fidx.compress(fidx.encode(idx)), "sha256:" + idx.root.hex(), [frame]


def _many_entries(_: Path) -> Made:
    n = BIG // 10
    return hi._plain(hi.Image([D(b"")] + [F(b"f%07d" % i) for i in range(n)]))


def _hi_data(name: str) -> Callable[[Path], Made]:
    return hi.CASES[name][0]


# ---------------------------------------------------------------------------------------------- the table

_ESCAPES = ("non-canonical path", "not a directory", "hardlink")
_CORRUPT = ("verification", "corrupt", "digest", "truncated", "declares", "size")


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Made]
    kind: str  # "index" | "data" | "big"
    words: tuple[str, ...] = _CORRUPT
    code: int = 5
    files: dict[str, bytes | None] = field(default_factory=dict)  # mount: path -> bytes, or None for EIO
    seconds: float = 60.0  # per command, on a loaded 2-core machine
    rss_mb: int = 400  # peak RSS of any one process
    eio_ok: bool = False  # a mount may answer EIO for the honest files too (they share a lying frame)


def _from_hi(name: str) -> Case:
    make, words, code, _ = hi.CASES[name]
    return Case(name, make, "index", words, code)


_CH = hi._chunks()
CASES: list[Case] = [
    # the index itself is hostile (one decoder refuses them all; here through every transport)
    *(_from_hi(n) for n in ("dotdot", "absolute", "symlink-parent-escape", "hardlink-outside", "hardlink-to-dir",
                            "duplicate-kinds", "merkle-mismatch", "noncanonical-cbor-int",
                            "noncanonical-cbor-map-order", "cbor-indefinite", "bomb-declared-size",
                            "chunk-ref-out-of-range", "chunks-do-not-add-up")),
    Case("symlink-loop", _symlink_loop, "index", ("not a directory",), 4),
    Case("chunk-past-frame-end", _chunk_past_frame, "index", ("chunk location",), 4),
    Case("frame-record-1gib", _frame_ulen_1gib, "index", ("frame record",), 4),
    # well-formed indexes that lie about the data
    Case("chunk-data-mismatch", _hi_data("chunk-data-mismatch"), "data",
         files={"a/ok": b"", "a/x": None, "b": None}),
    Case("frame-ulen-lie", _hi_data("frame-ulen-lie"), "data", files={"x": None}),
    Case("frame-past-pack-end", _hi_data("frame-past-pack-end"), "data", files={"x": None}),
    Case("frame-clen-past-pack-end", _frame_clen_past_pack_end, "data", files={"ok": b"", "x": None}),
    Case("frame-header-declares-1gib", _frame_header_1gib, "data", files={"ok": b"", "x": None}, rss_mb=300),
    Case("frame-declares-less", _frame_declares_less, "data", files={"ok": b"", "x": None}),
    Case("frame-inflates-past-ulen", _frame_undeclared_overflow, "data", files={"x": None}, rss_mb=300),
    Case("overlapping-frames", _overlapping_frames, "data", files={"bad": None, "good": C0}),
    Case("swapped-chunk-locations", _swapped_locations, "data", files={"a": None, "b": None, "ok": b""}),
    # huge declared counts: bounded time and memory, whatever the outcome
    Case("many-frame-records", _many_frames, "big", files={"x": C0}, seconds=120 if STRESS else 40),
    Case("many-chunk-refs", _many_refs, "big", seconds=120 if STRESS else 40),
    Case("many-chunks", _many_chunks, "big", files={"x": C0, "bad": None}, eio_ok=True, seconds=180 if STRESS else 40,
         rss_mb=1200 if STRESS else 400),
    Case("many-entries", _many_entries, "big", files={"f0000000": b""}, seconds=180 if STRESS else 40,
         rss_mb=1200 if STRESS else 400),
]
assert _CH and len({c.name for c in CASES}) == len(CASES)

ENTRY_POINTS = ("pull-docker", "copy-docker", "copy-oci", "copy-oci-archive", "mount-store", "mount-docker")
# Every case runs through every entry point with SHOAL_STRESS=1.  In CI (a shared 2-core machine, ~1 s a
# CLI call) pull and copy from a registry share one code path, as do oci: and oci-archive:, so a case
# takes one of each pair in turn; an index every decoder refuses takes one of the two mounts in turn too.
FULL = ("dotdot", "symlink-parent-escape", "hardlink-outside", "bomb-declared-size", "noncanonical-cbor-int")


def _matrix() -> list[tuple[str, str]]:
    out = []
    for i, c in enumerate(CASES):
        if STRESS or c.name in FULL:
            eps: tuple[str, ...] = ENTRY_POINTS
        else:
            eps = (ENTRY_POINTS[i % 2], ENTRY_POINTS[2 + (i // 2) % 2])
            eps += ENTRY_POINTS[4:] if c.kind != "index" else (ENTRY_POINTS[4 + i % 2],)
        out += [(c.name, e) for e in eps]
    return out


# ---------------------------------------------------------------------------------------------- fixtures


def _push(port: int, repo: str, tag: str, blobs: dict[str, bytes], manifest: bytes) -> None:
    """Push blobs and a manifest with plain HTTP: no Shoal code between the test and the registry."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for d, data in blobs.items():
            conn.request("HEAD", f"/v2/{repo}/blobs/{d}")
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                continue
            conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
            r = conn.getresponse()
            r.read()
            assert r.status == 202, r.status
            loc = r.getheader("Location") or ""
            loc = loc.split("://", 1)[-1].split("/", 1)[-1]
            conn.request("PUT", f"/{loc}{'&' if '?' in loc else '?'}digest={d}", body=data,
                         headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            assert r.status == 201, (r.status, d)
        conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 201, (r.status, body[:300])
    finally:
        conn.close()


def _oci_archive(path: Path, blobs: dict[str, bytes], manifest: bytes, ref: str) -> None:
    d = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d,
                            "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index).encode(),
               f"blobs/sha256/{d[7:]}": manifest}
    members.update({f"blobs/sha256/{k[7:]}": v for k, v in blobs.items()})
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            tar.addfile(ti, io.BytesIO(data))


@dataclass(frozen=True)
class World:
    base: Path
    sentinel: Path
    src: Path  # a store holding every case as h-NAME:1 (also an oci: layout)
    host: str  # registry host:port; every case as hostile/NAME:1


@pytest.fixture(scope="module")
def world(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("entry")
    sentinel = base / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"precious\n")
    src = Store.open(base / "src")
    for c in CASES:
        blob, root, packs = c.make(sentinel)
        helpers.put_image(src, f"h-{c.name}:1", blob, root, packs)
        m = src.resolve(f"h-{c.name}:1")
        blobs = {d.digest: src.layout.get(d.digest) for d in (m.config, m.index, *m.packs)}
        _push(registry.port, f"hostile/{c.name}", "1", blobs, m.raw)
        _oci_archive(base / f"{c.name}.tar", blobs, m.raw, "1")
    return World(base, sentinel, base / "src", registry.host)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Ran:
    p: subprocess.CompletedProcess[bytes]
    seconds: float
    rss_mb: float


_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def _run(store: Path, *args: str | os.PathLike[str], timeout: float, cwd: Path) -> Ran:
    """The real CLI under ``/usr/bin/time -f %M`` (its line is taken off stderr), killed at ``timeout``."""
    cmd = helpers.shoal_cmd(store, *args)
    if _TIME:
        cmd = [_TIME, "-f", "shoal-test-maxrss %M"] + cmd
    env = dict(os.environ)
    env.pop("SHOAL_STORE", None)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd=cwd)
    dt = time.monotonic() - t0
    rss = 0.0
    lines = p.stderr.splitlines(keepends=True)
    if _TIME and lines and lines[-1].startswith(b"shoal-test-maxrss "):
        while len(lines) > 1 and lines[-2].startswith((b"Command exited with non-zero status", b"Command terminated")):
            del lines[-2]
        rss = int(lines[-1].split()[1]) / 1024
        p = subprocess.CompletedProcess(p.args, p.returncode, p.stdout, b"".join(lines[:-1]))
    return Ran(p, dt, rss)


_READER = r"""
import errno, json, os, sys
out = {}
for rel in json.loads(sys.argv[2]):
    try:
        with open(os.path.join(sys.argv[1], rel), "rb") as f:
            out[rel] = f.read(4 << 20).hex()
    except OSError as e:
        out[rel] = e.errno
print(json.dumps(out))
"""


_WALKER = r"""
import json, os, sys
out = {}
def walk(rel):
    path = os.path.join(sys.argv[1], rel)
    try:
        st = os.lstat(path)
        if os.path.islink(path):
            os.readlink(path)
        elif os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                walk(os.path.join(rel, name))
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                f.read(4 << 20)
        out[rel] = 0
    except OSError as e:
        out[rel] = e.errno
walk("")
print(json.dumps(out))
"""
_ENCODING_ONLY = {"noncanonical-cbor-int", "noncanonical-cbor-map-order"}  # a sound tree, badly encoded


def _check_lazily_refused(c: Case, mnt: Path, tmp: Path) -> None:
    """A mount of a hostile index that its up-front checks let through: walking the whole tree meets
    EIO wherever the hostile part is, and no other error."""
    try:
        p = subprocess.run([sys.executable, "-c", _WALKER, str(mnt)], capture_output=True, timeout=c.seconds)
        assert p.returncode == 0, p.stderr[-2000:]
        errs = {k: v for k, v in json.loads(p.stdout).items() if v}
        assert set(errs.values()) <= {5}, errs  # EIO only
        assert bool(errs) != (c.name in _ENCODING_ONLY), (c.name, errs)
    finally:
        u = helpers.run_shoal(None, "umount", mnt, check=False, timeout=30)
    assert u.returncode == 0, u.stderr
    assert not mounts_under(tmp), mounts_under(tmp)


def _read_mounted(mnt: Path, paths: list[str], timeout: float) -> dict[str, bytes | int]:
    """Read files of a mount in a child process (a hung FUSE read cannot hang the test)."""
    p = subprocess.run([sys.executable, "-c", _READER, str(mnt), json.dumps(paths)], capture_output=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return {k: (bytes.fromhex(v) if isinstance(v, str) else v) for k, v in json.loads(p.stdout).items()}


def _daemon_hwm_mb(run_dir: Path) -> float:
    for sf in (run_dir / "mounts").glob("*.json"):
        pid = json.loads(sf.read_text())["pid"]
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
    return 0.0


def _source(world: World, c: Case, entry: str) -> str:
    return {"docker": f"docker://{world.host}/hostile/{c.name}:1", "oci": f"oci:{world.src}:h-{c.name}:1",
            "oci-archive": f"oci-archive:{world.base / (c.name + '.tar')}:1", "store": f"h-{c.name}:1"}[
        entry.split("-", 1)[1]]


def _check_transfer(world: World, c: Case, entry: str, tmp: Path) -> None:
    store, cwd = tmp / "store", tmp / "cwd"
    cwd.mkdir()
    verb = entry.split("-", 1)[0]
    args = ("pull", _source(world, c, entry), "got:1") if verb == "pull" else \
        ("copy", _source(world, c, entry), "got:1")
    r = _run(store, *args, timeout=c.seconds, cwd=cwd)
    assert r.seconds < c.seconds
    assert r.rss_mb < c.rss_mb, f"peak RSS {r.rss_mb:.0f} MB"
    if c.kind != "big" or r.p.returncode != 0:
        helpers.assert_one_line_error(r.p, *c.words)
        if c.kind != "big":
            assert r.p.returncode == c.code, r.p.stderr
        if store.exists():
            assert Store.open(store).layout.refs() == {}, "a hostile image was tagged"
    if store.exists():
        rep = fsck(Store.open(store))
        assert rep.ok and not rep.repaired, (rep.errors, rep.repaired)
    assert sorted(os.listdir(tmp)) == sorted(["cwd", "run"] + (["store"] if store.exists() else []))
    assert os.listdir(cwd) == []


def _check_mount(world: World, c: Case, entry: str, tmp: Path, run_dir: Path) -> None:
    mnt, cwd = tmp / "mnt", tmp / "cwd"
    mnt.mkdir()
    cwd.mkdir()
    store = world.src if entry == "mount-store" else tmp / "cache"
    r = _run(store, "mount", _source(world, c, entry), mnt, "--fetch-timeout", "10", timeout=c.seconds, cwd=cwd)
    assert r.seconds < c.seconds and r.rss_mb < c.rss_mb, (r.seconds, r.rss_mb)
    if c.kind == "index" and r.p.returncode == 0:
        _check_lazily_refused(c, mnt, tmp)
        return
    if c.kind == "index" or r.p.returncode != 0:
        helpers.assert_one_line_error(r.p, *c.words)
        if c.kind == "index":
            assert r.p.returncode == c.code, r.p.stderr
        assert not mounts_under(tmp)
        assert os.listdir(mnt) == []
        return
    try:
        got = _read_mounted(mnt, sorted(c.files), timeout=c.seconds)
        for path, want in c.files.items():
            if want is None:
                assert got[path] == 5, f"{path}: expected EIO, got {got[path]!r:.80}"  # errno.EIO
            elif not (c.eio_ok and got[path] == 5):
                assert got[path] == want, f"{path}: not the verified bytes ({got[path]!r:.80})"
        hwm = _daemon_hwm_mb(run_dir)
        assert hwm < c.rss_mb, f"mount daemon peak RSS {hwm:.0f} MB"
    finally:
        u = helpers.run_shoal(None, "umount", mnt, check=False, timeout=30)
    assert u.returncode == 0, u.stderr
    assert not mounts_under(tmp), mounts_under(tmp)
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("name,entry", _matrix())
def test_hostile_image_entry_point(world: World, run_dir: Path, tmp_path: Path, name: str, entry: str) -> None:
    c = next(c for c in CASES if c.name == name)
    if entry.startswith("mount") and (os.geteuid() != 0 or not os.path.exists("/dev/fuse")):
        pytest.skip("mounting needs root and /dev/fuse")
    before = helpers.tree_snapshot(world.sentinel)
    if entry.startswith("mount"):
        _check_mount(world, c, entry, tmp_path, run_dir)
    else:
        _check_transfer(world, c, entry, tmp_path)
    assert helpers.tree_snapshot(world.sentinel) == before
    assert Store.open(world.src).layout.refs().keys() == {f"h-{x.name}:1" for x in CASES}


def test_control_image_goes_through_every_entry_point(world: World, tmp_path: Path) -> None:
    """The crafting is sound: an honest image made the same way pulls, copies and unpacks."""
    frame = _z(C0)
    blob, root, packs = _image([D(b""), F(b"x", (0,), len(C0))], [C0], [(0, 0)], [Frame(0, 0, len(frame), len(C0))],
                               [frame])
    src = Store.open(tmp_path / "src")
    helpers.put_image(src, "ok:1", blob, root, packs)
    m = src.resolve("ok:1")
    blobs = {d.digest: src.layout.get(d.digest) for d in (m.config, m.index, *m.packs)}
    _push(int(world.host.rsplit(":", 1)[1]), "hostile/control", "1", blobs, m.raw)
    _oci_archive(tmp_path / "ok.tar", blobs, m.raw, "1")
    for i, source in enumerate((f"docker://{world.host}/hostile/control:1", f"oci:{tmp_path / 'src'}:ok:1",
                                f"oci-archive:{tmp_path / 'ok.tar'}:1")):
        s = tmp_path / f"s{i}"
        helpers.run_shoal(s, "copy" if i else "pull", source, "ok:1", timeout=60)
        assert helpers.run_shoal(s, "cat", "ok:1", "/x", timeout=60).stdout == C0
    shutil.rmtree(tmp_path / "src")
