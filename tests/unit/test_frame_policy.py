"""The frame policy of docs/spec/format.md §5.1: small files' chunks go to frames of their own, cut finer,
never shared with a larger file's chunks; larger files keep the 192 + 320 KiB frames, and a file from
OWN_FILE up shares none of its frames with another file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shoal.build import BuildOptions, build
from shoal.format import packing
from shoal.format.model import Index, Kind
from shoal.store import Store

KiB = 1024


def test_frame_ends_after_minimums() -> None:
    always = b"\x00\x00\x00\x00"  # u32 id prefix 0: closes whenever the minimum is reached
    never = b"\xff\xff\xff\xff"  # closes only if the span test passes for a huge chunk
    assert not packing.frame_ends_after(always, 1, packing.SMALL_FRAME_MIN - 1, small=True)
    assert packing.frame_ends_after(always, 1, packing.SMALL_FRAME_MIN, small=True)
    assert not packing.frame_ends_after(always, 1, packing.FRAME_MIN - 1)
    assert packing.frame_ends_after(always, 1, packing.FRAME_MIN)
    assert not packing.frame_ends_after(never, 16 * KiB, packing.FRAME_MIN)
    assert packing.small_file(packing.SMALL_FILE - 1) and not packing.small_file(packing.SMALL_FILE)
    assert packing.own_frames(packing.OWN_FILE) and not packing.own_frames(packing.OWN_FILE - 1)


def _data(seed: int, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d/%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def test_small_files_get_their_own_frames(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("a", "b"):
        (tree / d).mkdir(parents=True)
    # canonical order: a/big0, a/s000..a/s059, b/big1: small files between two large ones
    (tree / "a" / "big0").write_bytes(_data(0, 300 * KiB))
    for i in range(60):
        (tree / "a" / f"s{i:03d}").write_bytes(_data(100 + i, 3 * KiB + i))
    (tree / "b" / "big1").write_bytes(_data(1, 200 * KiB))
    os.utime(tree, ns=(0, 0))
    build(Store.open(tmp_path / "s"), tree, "t:1", BuildOptions(workers=2))
    store = Store.open(tmp_path / "s")
    idx = store.load_index(store.resolve("t:1"))
    small_frames: set[int] = set()
    large_frames: set[int] = set()
    for e in idx.entries:
        if e.kind == Kind.FILE:
            frames = {idx.chunk_frames[c] for c in e.chunks}
            (small_frames if packing.small_file(e.size) else large_frames).update(frames)
    assert small_frames and large_frames and not small_frames & large_frames
    # 60 small files (~190 KiB) fill several small frames, each but the last at least SMALL_FRAME_MIN
    ulens = sorted((idx.frames[f].ulen for f in small_frames), reverse=True)
    assert len(ulens) >= 2
    assert all(u >= packing.SMALL_FRAME_MIN for u in ulens[:-1])
    assert sum(ulens) == sum(e.size for e in idx.entries if e.kind == Kind.FILE and packing.small_file(e.size))


def _frames_by_file(idx: Index) -> dict[bytes, set[int]]:
    return {e.path: {idx.chunk_frames[c] for c in e.chunks} for e in idx.entries if e.kind == Kind.FILE and e.size}


def test_a_file_from_own_file_up_shares_no_frame(tmp_path: Path) -> None:
    """Each file of at least OWN_FILE bytes (one above a read window, too) has frames no other file's new
    chunks are in; the files between the small ones and OWN_FILE still share frames; the cut is the same
    for any worker count."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    # canonical order: d/a0 (mid) d/a1 (own) d/a2 (own) d/a3 (mid) d/a4 (mid) d/a5 (> a 4 MiB window) d/s (small)
    sizes = {"a0": 100 * KiB, "a1": packing.OWN_FILE, "a2": 700 * KiB, "a3": 90 * KiB, "a4": packing.OWN_FILE - 1,
             "a5": 4 * 1024 * KiB + 5, "s": 3 * KiB}
    for i, (name, n) in enumerate(sizes.items()):
        (tree / "d" / name).write_bytes(_data(200 + i, n))
    os.utime(tree, ns=(0, 0))
    digests = set()
    for workers in (1, 3):
        s = Store.open(tmp_path / f"s{workers}")
        digests.add(build(s, tree, "t:1", BuildOptions(workers=workers)).manifest.digest)
    assert len(digests) == 1
    store = Store.open(tmp_path / "s1")
    idx = store.load_index(store.resolve("t:1"))
    frames = _frames_by_file(idx)
    own = sorted(p for p in frames if packing.own_frames(sizes[p.decode()[2:]]))
    assert own == [b"d/a1", b"d/a2", b"d/a5"]
    for p in own:
        others = set().union(*(f for q, f in frames.items() if q != p))
        assert not frames[p] & others, p
        # its frames hold exactly its bytes: no neighbour before or after it
        assert sum(idx.frames[f].ulen for f in frames[p]) == sizes[p.decode()[2:]]
    # the files below OWN_FILE (and not small) still share frames: a0 with nothing before it, a3 with a4
    assert frames[b"d/a3"] & frames[b"d/a4"]
    assert len(idx.frames) > len(frames[b"d/a2"]) + len(frames[b"d/a5"]) + 3
