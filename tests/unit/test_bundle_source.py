"""A bundle checked in two steps by the mount (docs/spec/bundle.md §3.6, §6.1): a chunk is served by id
once its frame's chunks hashed to their ids; the tree is checked after, and a failure drops the bundle."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_bundle import CHUNKS, IDS, _make, _rewrite, _tree

from shoal.errors import FormatError, HostileInput
from shoal.format import cbor
from shoal.mount.bundle import BundleSource
from shoal.reader import FrameSource


class _Inner(FrameSource):
    def __init__(self) -> None:
        self.prefetched: list[list[int]] = []

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        raise AssertionError("the bundle's chunks need no frame")

    def prefetch(self, frames: list[int]) -> int | None:
        self.prefetched.append(frames)
        return 0


def _source(blob: bytes) -> tuple[BundleSource, _Inner, list[bytes]]:
    idx = _tree()
    kept: list[bytes] = []
    inner = _Inner()
    return BundleSource.deferred(inner, idx, blob, "sha256:" + idx.root.hex(), "sha256:" + "ab" * 32,
                                 kept.append), inner, kept


def _setuid(doc: dict[str, Any]) -> None:
    doc["dirs"][2][3][0][2] = 0o4755  # usr/bin/tool made setuid: usr/bin's digest no longer matches


def test_a_chunk_is_served_before_the_tree_is_checked_and_the_bundle_kept_after() -> None:
    src, _, kept = _source(_make())
    assert src.bundle_state == "pending"
    assert src.held_chunk(IDS[1]) == CHUNKS[1]  # its frame opened, its chunks hashed: the tree not yet
    assert src.bundle_state == "pending" and not kept
    assert src.held_chunk(IDS[5]) is None  # etc/conf's chunk is not in the bundle
    src.checked()
    assert src.bundle_state == "checked" and kept == [_make()]
    assert [src.held_chunk(i) for i in (IDS[0], IDS[1], IDS[4])] == [CHUNKS[0], CHUNKS[1], CHUNKS[4]]


def test_a_wrong_tree_drops_the_bundle_after_its_chunks_were_served_by_id(caplog: pytest.LogCaptureFixture) -> None:
    src, _, kept = _source(_rewrite(_make(), _setuid))
    assert src.held_chunk(IDS[1]) == CHUNKS[1]  # content-addressed: right whatever the tree says
    src.checked()
    assert src.bundle_state == "refused" and not kept
    assert src.held_chunk(IDS[1]) is None  # from now on the frames (the index's) serve it
    assert "Merkle digest mismatch at b'usr/bin'" in caplog.text and "1 of its chunks served before" in caplog.text


def test_a_wrong_chunk_is_never_served() -> None:
    blob = bytearray(_make())
    blob[-3] ^= 1  # in the last data frame (zstd refuses it, or a chunk fails its hash)
    src, _, kept = _source(bytes(blob))
    got = [src.held_chunk(i) for i in (IDS[1], IDS[0], IDS[4])]
    assert all(g in (None, c) for g, c in zip(got, (CHUNKS[1], CHUNKS[0], CHUNKS[4])))
    src.checked()
    assert src.bundle_state == "refused" and not kept
    assert [src.held_chunk(i) for i in (IDS[0], IDS[1], IDS[4])] == [None, None, None]


def test_the_quick_header_decode_accepts_only_canonical_cbor() -> None:
    doc = {"dirs": [], "root": b"x"}
    assert cbor.decode_canonical(cbor.encode(doc), 100) == doc
    swapped = b"\xa2" + cbor.encode("root") + cbor.encode(b"x") + cbor.encode("dirs") + cbor.encode([])
    with pytest.raises(FormatError, match="unsorted"):
        cbor.decode_canonical(swapped, 100)  # cbor2 reads it, but it is not its own canonical encoding
    with pytest.raises(HostileInput):
        cbor.decode_canonical(cbor.encode([[]] * 50), 20)  # more bytes than items allowed: counted as decoded


def test_the_prefetch_waits_until_the_mount_is_live_then_leaves_out_the_bundle_s_frames() -> None:
    src, inner, _ = _source(_make())
    done = threading.Event()
    t = threading.Thread(target=lambda: (src.prefetch([0]), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.2)  # started before the mount is live: no header read on its account
    src.serving()  # checks in a thread
    assert done.wait(10)
    assert inner.prefetched == [[]]  # frame 0 holds the bundle's chunks
    for _ in range(100):
        if src.bundle_state != "pending":
            break
        threading.Event().wait(0.05)
    assert src.bundle_state == "checked"


def test_the_tree_is_checked_once_the_workload_s_reads_have_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once live, the frames are opened at once and the tree (GIL-bound, needed by no read) is checked
    only after no read asked for a chunk for SETTLE_QUIET s; then the bundle is kept."""
    from shoal.mount import bundle as mb

    monkeypatch.setattr(mb, "SETTLE_QUIET", 0.5)
    src, _, kept = _source(_make())
    src.serving()
    for _ in range(20):  # 1 s of reads, each within SETTLE_QUIET of the one before
        assert src.held_chunk(IDS[1]) == CHUNKS[1]
        threading.Event().wait(0.05)
        assert src.bundle_state == "pending" and not kept
    for _ in range(100):
        if src.bundle_state != "pending":
            break
        threading.Event().wait(0.05)
    assert src.bundle_state == "checked" and len(kept) == 1


# ------------------------------------------------------------------ a bundle streamed by the daemon (§6.2)


def _streamed(blob: bytes, pieces: list[bytes], fail: Exception | None = None,
              gate: threading.Event | None = None, timeout: float = 30.0) -> tuple[BundleSource, list[bytes]]:
    def fetch() -> Any:
        for i, p in enumerate(pieces):
            if i == 1 and gate is not None:
                assert gate.wait(10)
            yield p
        if fail is not None:
            raise fail

    idx = _tree()
    kept: list[bytes] = []
    src = BundleSource.deferred(_Inner(), idx, None, "sha256:" + idx.root.hex(), "sha256:" + "ab" * 32,
                                kept.append, fetch=fetch, size=len(blob), timeout=timeout)
    return src, kept


def test_a_streamed_bundle_serves_a_chunk_as_soon_as_its_frame_arrived() -> None:
    blob = _make(frame_target=1, level=3)  # a frame per chunk
    gate = threading.Event()
    split = len(blob) - 10  # all but the last frame's tail arrive first
    src, kept = _streamed(blob, [blob[:split], blob[split:]], gate=gate)
    assert src.held_chunk(IDS[1]) == CHUNKS[1]  # the first frame: here before the rest
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(src.held_chunk(IDS[4])), daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # the last frame waits for its bytes
    gate.set()
    t.join(10)
    assert got == [CHUNKS[4]]
    src.checked()
    assert src.bundle_state == "checked" and kept == [blob]


def test_a_streamed_bundle_whose_transfer_fails_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from shoal.errors import IntegrityError, TransportError

    blob = _make(frame_target=1, level=3)
    for fail, words in ((IntegrityError("digest mismatch"), "digest mismatch"),
                        (TransportError("connection reset"), "connection reset")):
        src, kept = _streamed(blob, [blob], fail=fail)
        assert src.held_chunk(IDS[1]) == CHUNKS[1]  # hashed against its id: served
        src.checked()  # the end of the transfer says it was not the blob: dropped, never kept
        assert src.bundle_state == "refused" and not kept
        assert src.held_chunk(IDS[1]) is None
        assert words in caplog.text
    short, _ = _streamed(blob, [blob[:100]])
    assert short.held_chunk(IDS[1]) is None and short.bundle_state == "refused"  # truncated: refused
    long, _ = _streamed(blob, [blob, b"x"])
    long.checked()
    assert long.bundle_state == "refused"  # more bytes than its descriptor


def test_a_read_waits_for_a_trickling_bundle_at_most_the_fetch_timeout(caplog: pytest.LogCaptureFixture) -> None:
    import time

    blob = _make(frame_target=1, level=3)
    gate = threading.Event()  # never set: the registry stops sending after the first piece
    src, kept = _streamed(blob, [blob[:40], blob[40:]], gate=gate, timeout=0.3)
    t0 = time.monotonic()
    assert src.held_chunk(IDS[1]) is None  # the header never arrived: the frames serve it
    assert 0.25 < time.monotonic() - t0 < 5
    assert src.bundle_state == "refused" and "took longer than 0.3s" in caplog.text
    gate.set()  # the stream resumes: it is abandoned, nothing is kept
    src.checked()
    assert not kept and src.held_chunk(IDS[1]) is None
