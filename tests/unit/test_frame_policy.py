"""The frame policy of docs/spec/format.md §5.1: small files' chunks go to frames of their own, cut finer,
never shared with a larger file's chunks; larger files keep the 192 + 320 KiB frames."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shoal.build import BuildOptions, build
from shoal.format import packing
from shoal.format.model import Kind
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
