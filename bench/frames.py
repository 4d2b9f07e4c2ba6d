#!/usr/bin/env python3
"""Bytes a lazy start fetches, against the floor, and frame policies compared by simulation (issue 12).

Usage (root; loop devices):
  python bench/frames.py trace  [--tree DIR]           # which pages each workload reads (cached as JSON)
  python bench/frames.py report [--tree DIR] [--store S --ref REF] [--policies a,b,...]

``trace`` copies the tree into an ext4 image on a loop device (once), and for each workload mounts it
fresh (a new superblock: a cold page cache for these files alone, nothing else on the machine is
touched), runs the workload with ``chroot``, then asks ``mincore`` which pages of every file are
resident: what the workload read or faulted in, kernel read-ahead included, as a FUSE mount would be
asked for them.  Saved to $SHOAL_BENCH_CACHE/frames/access.json.

``report`` takes the built image's index (``shoal build TREE REF`` into ``--store``; built here if
missing) for the canonical chunk order, chunk ids and lengths, then for each frame policy cuts the
chunks into frames, compresses every frame with zstd -3 (as the builder does), and prints per policy:
frames, image size against ``tar | zstd -3``, and per workload the bytes a profiled lazy start fetches
(the index plus every frame holding a chunk the workload touches).  The floor is the index plus each
touched file's touched ranges compressed on their own (zstd -3, per file).

``--policies`` takes names from POLICIES or ad-hoc specs such as
``small=16:smin=32:sspan=32:sep=1:min=192:span=320:level=3:slevel=3:dir=0:ilevel=12:own=256`` (sizes in
KiB): files below ``small`` KiB go to frames closed at ``smin``+``sspan``; ``sep=1`` keeps a small-file
frame and a large-file frame open side by side (otherwise a change of class closes the frame); ``dir=1``
also closes a frame where the directory changes; a file of at least ``own`` KiB shares no frame.
Image size for minbase (the 1.05x target, format.md §8):
``report --tree $SHOAL_BENCH_CACHE/bookworm/root --store /tmp/fr-m`` (its workload columns are moot).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zstandard

CACHE = Path(os.environ.get("SHOAL_BENCH_CACHE", "/var/tmp/shoal-bench"))
WORK = CACHE / "frames"
TREE = CACHE / "bookworm-py" / "root"
PAGE = mmap.PAGESIZE
READ_AHEAD_KB = 128  # FUSE's default max_readahead
KiB, MiB = 1024, 1024 * 1024
WORKLOADS = {
    "print(1)": ["/usr/bin/python3", "-c", "print(1)"],
    "import json, email, ...": ["/usr/bin/python3", "-c",
                                "import json, email, http.client, asyncio, unittest; print(1)"],
    "git --version": ["/usr/bin/git", "--version"],
}
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LANG": "C.UTF-8"}
SHOAL = [str(Path(sys.executable).parent / "shoal")]


# ------------------------------------------------------------------------------------------ trace

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path: str) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` in the page cache (mincore over a shared read-only mapping)."""
    size = os.lstat(path).st_size
    if size == 0:
        return []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            n = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(n)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            out: list[tuple[int, int]] = []
            for i, b in enumerate(vec.raw[:n]):
                if b & 1:
                    s, e = i * PAGE, min(size, (i + 1) * PAGE)
                    if out and out[-1][1] == s:
                        out[-1] = (out[-1][0], e)
                    else:
                        out.append((s, e))
            return out
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def trace(tree: Path) -> dict[str, dict[str, list[tuple[int, int]]]]:
    WORK.mkdir(parents=True, exist_ok=True)
    img, mnt = WORK / "tree.ext4", WORK / "mnt"
    mnt.mkdir(exist_ok=True)
    if not (WORK / "tree.ext4.done").exists():
        subprocess.run(["truncate", "-s", "1200M", img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
        subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
        try:
            subprocess.run(["cp", "-a", f"{tree}/.", f"{mnt}/"], check=True)
        finally:
            subprocess.run(["umount", mnt], check=True)
        (WORK / "tree.ext4.done").touch()
    out: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for name, cmd in WORKLOADS.items():
        # an explicit loop device, to give it FUSE's default read-ahead (128 KiB) before the mount
        dev = subprocess.run(["losetup", "-f", "--show", "-r", img], check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            Path(f"/sys/block/{os.path.basename(dev)}/queue/read_ahead_kb").write_text(str(READ_AHEAD_KB))
            subprocess.run(["mount", "-o", "ro", dev, mnt], check=True)
        finally:
            subprocess.run(["losetup", "-d", dev], check=True)  # lazily: freed at the umount
        try:
            p = subprocess.run(["chroot", str(mnt), *cmd], env=ENV, capture_output=True, check=True)
            got: dict[str, list[tuple[int, int]]] = {}
            for d, _, files in os.walk(mnt):
                for f in files:
                    full = os.path.join(d, f)
                    if os.path.islink(full) or not os.path.isfile(full):
                        continue
                    r = resident(full)
                    if r:
                        got[os.path.relpath(full, mnt)] = r
            out[name] = got
            print(f"{name}: {p.stdout.decode().strip()!r}, {len(got)} files, "
                  f"{sum(e - s for v in got.values() for s, e in v) / 1e6:.2f} MB resident", file=sys.stderr)
        finally:
            subprocess.run(["umount", mnt], check=True)
    (WORK / "access.json").write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------------ model

@dataclass(frozen=True)
class Chunk:
    cid: bytes
    path: str  # first file that references it
    offset: int  # in that file
    length: int
    fsize: int  # that file's size
    dirname: str


@dataclass(frozen=True)
class Policy:
    """A content-defined frame cut: ``cut(prev, chunk, frame_len_with_chunk)``-style parameters."""
    name: str
    frame_min: int = 192 * KiB
    frame_span: int = 320 * KiB
    small_file: int = 0  # files below this size go to small-file frames ...
    small_min: int = 0  # ... closed at these targets
    small_span: int = 0
    dir_cut: bool = False  # a small-file frame also ends where the next small file is in another directory
    small_level: int = 3
    level: int = 3  # zstd level of the other frames
    separate: bool = False  # small files get their own current frame (large files' frames go on around them)
    index_level: int = 12
    own_frames: int = 0  # a file at least this large shares no frame with another file (0: off)


POLICIES = {
    "a": Policy("a: before 2026-12, 192+320 KiB, zstd -3"),
    "a19": Policy("d: a, index zstd -19", index_level=19),
    "a5": Policy("d: a, frames zstd -5", level=5),
    "b64": Policy("b: files < 64 KiB in 32+32 KiB frames", small_file=64 * KiB, small_min=32 * KiB,
                  small_span=32 * KiB),
    "b256": Policy("b: files < 256 KiB in 32+32 KiB frames", small_file=256 * KiB, small_min=32 * KiB,
                   small_span=32 * KiB),
    "b16s": Policy("b: files < 16 KiB in 32+32 KiB frames, separate", small_file=16 * KiB, small_min=32 * KiB,
                   small_span=32 * KiB, separate=True),
    "b64s": Policy("b: files < 64 KiB in 32+32 KiB frames, separate", small_file=64 * KiB, small_min=32 * KiB,
                   small_span=32 * KiB, separate=True),
    "c": Policy("c: a + cut at directory changes", dir_cut=True),
    "bc": Policy("b+c: files < 64 KiB 32+32 KiB, cut at dir", small_file=64 * KiB, small_min=32 * KiB,
                 small_span=32 * KiB, dir_cut=True),
    "b64z5": Policy("b: files < 64 KiB 32+32 KiB, all zstd -5", small_file=64 * KiB, small_min=32 * KiB,
                    small_span=32 * KiB, small_level=5, level=5),
    "b32z5": Policy("b: files < 32 KiB 64+64 KiB, all zstd -5", small_file=32 * KiB, small_min=64 * KiB,
                    small_span=64 * KiB, small_level=5, level=5),
    "own256": Policy("b32z5 + own frames from 256 KiB (§5.1 now)", small_file=32 * KiB, small_min=64 * KiB,
                     small_span=64 * KiB, small_level=5, level=5, own_frames=256 * KiB),
    "L128": Policy("large 64+64, < 64 KiB 32+32 KiB", frame_min=64 * KiB, frame_span=64 * KiB,
                   small_file=64 * KiB, small_min=32 * KiB, small_span=32 * KiB),
    "all64": Policy("all frames 32+32 KiB", frame_min=32 * KiB, frame_span=32 * KiB),
    "chunk": Policy("one chunk per frame", frame_min=1, frame_span=1),
}


def parse_policy(spec: str) -> Policy:
    """An ad-hoc policy: ``min=192:span=320:small=64:smin=32:sspan=32:slevel=3:level=3:dir=1`` (sizes in KiB)."""
    kv = dict(item.split("=") for item in spec.split(":"))
    k = {n: int(v) for n, v in kv.items()}
    return Policy(spec, frame_min=k.get("min", 192) * KiB, frame_span=k.get("span", 320) * KiB,
                  small_file=k.get("small", 0) * KiB, small_min=k.get("smin", 0) * KiB,
                  small_span=k.get("sspan", 0) * KiB, dir_cut=bool(k.get("dir", 0)),
                  small_level=k.get("slevel", 3), level=k.get("level", 3), index_level=k.get("ilevel", 12),
                  separate=bool(k.get("sep", 0)), own_frames=k.get("own", 0) * KiB)


def frames_of(chunks: list[Chunk], p: Policy) -> list[list[int]]:
    """Frames (lists of chunk positions) as the builder would cut them under policy ``p`` (format.md §5.1
    generalized): every decision depends on the chunk ids, lengths, file sizes and paths alone."""
    out: list[list[int]] = []
    cur: dict[bool, list[int]] = {False: [], True: []}
    ln: dict[bool, int] = {False: 0, True: 0}
    lastdir: dict[bool, str] = {False: "", True: ""}

    def close(k: bool) -> None:
        if cur[k]:
            out.append(cur[k])
            cur[k], ln[k] = [], 0

    for i, c in enumerate(chunks):
        small = p.small_file > 0 and c.fsize < p.small_file
        k = small if p.separate else False
        if not p.separate and cur[k]:
            prev_small = p.small_file > 0 and chunks[cur[k][-1]].fsize < p.small_file
            if prev_small != small:  # small and large files never share a frame
                close(k)
        if cur[k] and p.own_frames:
            prev = chunks[cur[k][-1]]
            if prev.path != c.path and max(prev.fsize, c.fsize) >= p.own_frames:
                close(k)  # a large file's frames hold its chunks alone
        if cur[k] and p.dir_cut and c.dirname != lastdir[k] and (small or p.small_file == 0):
            close(k)
        if ln[k] > 0 and ln[k] + c.length > MiB:
            close(k)
        cur[k].append(i)
        ln[k] += c.length
        lastdir[k] = c.dirname
        fmin, fspan = (p.small_min, p.small_span) if small else (p.frame_min, p.frame_span)
        if ln[k] >= fmin and int.from_bytes(c.cid[0:4], "big") * fspan < c.length * (1 << 32):
            close(k)
    close(False)
    close(True)
    return out


class Tree:
    def __init__(self, tree: Path, store: str, ref: str) -> None:
        from shoal.store import Store
        self.tree = tree
        st = Store.open(store)
        m = st.resolve(ref)
        self.index_blob = m.index.size
        idx = st.load_index(m)
        self.idx = idx
        self.chunks: list[Chunk | None] = [None] * len(idx.chunk_ids)
        self.file_chunks: dict[str, list[tuple[int, int, int]]] = {}  # path -> (chunk, offset, length)
        for e in idx.entries:
            if e.kind != 1:
                continue
            path = os.fsdecode(e.path)
            off, refs = 0, []
            for ci in e.chunks:
                n = idx.chunk_lengths[ci]
                if self.chunks[ci] is None:
                    self.chunks[ci] = Chunk(idx.chunk_ids[ci], path, off, n, e.size, os.path.dirname(path))
                refs.append((ci, off, n))
                off += n
            self.file_chunks[path] = refs
        self._data: dict[int, bytes] = {}

    def chunk_bytes(self, i: int) -> bytes:
        c = self.chunks[i]
        assert c is not None
        with open(self.tree / c.path, "rb") as f:
            f.seek(c.offset)
            return f.read(c.length)


def frame_level(chunks: list[Chunk], p: Policy, fr: list[int]) -> int:
    return p.small_level if chunks[fr[0]].fsize < p.small_file else p.level


def compress_all(t: Tree, frames: list[list[int]], level: Callable[[list[int]], int]) -> list[int]:
    def one(fr: list[int]) -> int:
        data = b"".join(t.chunk_bytes(i) for i in fr)
        return len(zstandard.ZstdCompressor(level=level(fr), write_checksum=False,
                                            write_content_size=True).compress(data))
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(one, frames, chunksize=16))


def index_size(t: Tree, frames: list[list[int]], clens: list[int], level: int) -> int:
    """The compressed index this framing gives (frame table in order of first reference, packs cut as in §5.2)."""
    from shoal.format import index as fidx
    from shoal.format import packing
    from shoal.format.model import Frame, Index
    idx = t.idx
    n = len(idx.chunk_ids)
    fr_of, off_of = [0] * n, [0] * n
    for fi, fr in enumerate(frames):
        o = 0
        for ci in fr:
            fr_of[ci], off_of[ci] = fi, o
            o += idx.chunk_lengths[ci]
    # packs over frames in the order they close (as the builder), with §5.2 cuts
    pack_of: list[tuple[int, int]] = []
    pn, plen, poff = 0, 0, 0
    for fi, fr in enumerate(frames):
        ulen = sum(idx.chunk_lengths[ci] for ci in fr)
        if plen and packing.pack_full(plen, ulen):
            pn, plen, poff = pn + 1, 0, 0
        pack_of.append((pn, poff))
        plen += ulen
        poff += clens[fi]
        if packing.pack_ends_after(idx.chunk_ids[fr[-1]], ulen, plen):
            pn, plen, poff = pn + 1, 0, 0
    order: dict[int, int] = {}
    for ci in range(n):
        order.setdefault(fr_of[ci], len(order))
    recs = [Frame(0, 0, 0, 0)] * len(frames)
    for fi, fr in enumerate(frames):
        recs[order[fi]] = Frame(pack_of[fi][0], pack_of[fi][1], clens[fi], sum(idx.chunk_lengths[ci] for ci in fr))
    packs = [hashlib.sha256(b"%d" % i).digest() for i in range(pack_of[-1][0] + 1)]
    new = Index(idx.entries, idx.chunk_ids, tuple(order[f] for f in fr_of), tuple(off_of), idx.chunk_lengths,
                     tuple(recs), tuple(packs), idx.root)
    raw = fidx.encode(new)
    return len(zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True).compress(raw))


def touched_chunks(t: Tree, access: dict[str, list[tuple[int, int]]]) -> set[int]:
    out: set[int] = set()
    for path, ranges in access.items():
        for ci, off, n in t.file_chunks.get(path, []):
            if any(s < off + n and off < e for s, e in ranges):
                out.add(ci)
    return out


def floor_bytes(t: Tree, access: dict[str, list[tuple[int, int]]]) -> tuple[int, int]:
    """(uncompressed, zstd -3) bytes of the touched ranges, compressed per file."""
    u = c = 0
    cctx = zstandard.ZstdCompressor(level=3)
    for path, ranges in access.items():
        if path not in t.file_chunks:
            continue
        with open(t.tree / path, "rb") as f:
            data = b""
            for s, e in ranges:
                f.seek(s)
                data += f.read(e - s)
        u += len(data)
        c += len(cctx.compress(data))
    return u, c


def tar_zstd(tree: Path) -> int:
    cache = WORK / f"tar_zstd3{hashlib.sha256(str(tree).encode()).hexdigest()[:8]}.size"
    if cache.exists():
        return int(cache.read_text())
    tar = subprocess.Popen(["tar", "-C", str(tree), "--sort=name", "--numeric-owner", "-cf", "-", "."],
                           stdout=subprocess.PIPE)
    z = subprocess.run(["zstd", "-3", "-q", "-c", "-T1"], stdin=tar.stdout, capture_output=True, check=True)
    tar.wait()
    cache.write_text(str(len(z.stdout)))
    return len(z.stdout)


def report(args: argparse.Namespace) -> None:
    tree = Path(args.tree)
    acc_file = WORK / "access.json"
    access = json.loads(acc_file.read_text()) if acc_file.exists() else trace(tree)
    if not os.path.exists(args.store):
        subprocess.run([*SHOAL, "--store", args.store, "build", str(tree), args.ref], check=True)
    t0 = time.perf_counter()
    t = Tree(tree, args.store, args.ref)
    tz = tar_zstd(tree)
    print(f"tree {tree}: {len(t.file_chunks)} files, {len(t.chunks)} unique chunks; tar | zstd -3 = {tz / 1e6:.1f} MB; "
          f"index blob {t.index_blob / 1e3:.0f} KB")
    touched = {w: touched_chunks(t, a) for w, a in access.items()}
    print("\nfloor (index + touched ranges zstd -3 per file):")
    for w, a in access.items():
        u, c = floor_bytes(t, a)
        print(f"  {w:26s} {len(a):4d} files, {u / 1e6:5.2f} MB read, {c / 1e6:5.2f} MB compressed, "
              f"floor {(c + t.index_blob) / 1e6:5.2f} MB")
    chunks = [c for c in t.chunks if c is not None]
    assert len(chunks) == len(t.chunks)
    print(f"\n{'policy':52s} {'frames':>6s} {'idxKB':>5s} {'image MB':>8s} {'ratio':>6s}  " +
          "  ".join(f"{w[:16]:>16s}" for w in access) + "   (MB fetched: index + frames; frames)")
    for key in args.policies.split(","):
        p = POLICIES[key] if key in POLICIES else parse_policy(key)
        frames = frames_of(chunks, p)
        clens = compress_all(t, frames, functools.partial(frame_level, chunks, p))
        where = {ci: fi for fi, fr in enumerate(frames) for ci in fr}
        isize = index_size(t, frames, clens, p.index_level)
        image = sum(clens) + isize
        cols = []
        for w in access:
            fs = {where[ci] for ci in touched[w]}
            b = sum(clens[f] for f in fs) + isize
            cols.append(f"{b / 1e6:7.2f} ({len(fs):4d}fr)")
        print(f"{p.name:52s} {len(frames):6d} {isize / 1e3:5.0f} {image / 1e6:8.1f} {image / tz:6.3f}  " +
              "  ".join(cols), flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["trace", "report"])
    ap.add_argument("--tree", default=str(TREE))
    ap.add_argument("--store", default="/tmp/fr-s")
    ap.add_argument("--ref", default="img:1")
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args()
    if args.what == "trace":
        trace(Path(args.tree))
    else:
        report(args)


if __name__ == "__main__":
    main()
