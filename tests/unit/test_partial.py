"""Partial packs never let one claim overwrite another, and a complete blob supersedes them cleanly
(docs/spec/store.md §3)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from shoal.errors import FrameConflict
from shoal.store import Store


def _pack(tmp_path: Path) -> tuple[Store, bytes, str]:
    store = Store.open(tmp_path / "s")
    data = random.Random(1).randbytes(50_000)
    return store, data, "sha256:" + hashlib.sha256(data).hexdigest()


def test_put_frame_keeps_the_first_verified_bytes(tmp_path: Path) -> None:
    store, data, pack = _pack(tmp_path)
    store.partial.put_frame(pack, 1000, data[1000:3000])
    store.partial.put_frame(pack, 1000, data[1000:3000])  # the same frame again: a no-op
    before = store.partial.path(pack).read_bytes()
    for off, raw in ((1000, b"x" * 2000), (1500, b"y" * 100), (0, b"z" * 1001), (2999, b"w" * 10)):
        with pytest.raises(FrameConflict):
            store.partial.put_frame(pack, off, raw)
    assert store.partial.path(pack).read_bytes() == before
    assert store.catalog.frames_overlapping(pack, 0, 1 << 40) == [(1000, 2000)]
    store.partial.put_frame(pack, 3000, data[3000:4000])  # adjacent, not overlapping
    assert store.catalog.frames_overlapping(pack, 0, 1 << 40) == [(1000, 2000), (3000, 1000)]


def test_a_complete_blob_supersedes_partial_frames_and_forgets_the_ones_that_lied(tmp_path: Path) -> None:
    store, data, pack = _pack(tmp_path)
    honest, liar, past_end = hashlib.sha256(b"h").digest(), hashlib.sha256(b"l").digest(), hashlib.sha256(b"p").digest()
    store.partial.put_frame(pack, 0, data[:1000])
    store.partial.put_frame(pack, 2000, b"\0" * 1000)  # some index's claim: not the pack's bytes
    store.partial.put_frame(pack, 60_000, b"\1" * 1000)  # a claim past the pack's real end
    store.catalog.add([(honest, pack, 0, 1000, 1000, 0, 10), (liar, pack, 2000, 1000, 1000, 0, 10),
                       (past_end, pack, 60_000, 1000, 1000, 0, 10)])
    store.layout.put(data)
    assert store.partial.try_promote(pack, len(data))
    assert set(store.catalog.locate([honest, liar, past_end])) == {honest}
    assert not store.partial.path(pack).exists() and store.catalog.frames_overlapping(pack, 0, 1 << 40) == []
