"""The Reader decompresses a frame once however many threads want it at the same moment."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from shoal.build import build
from shoal.errors import ShoalError
from shoal.reader import FrameSource, LayoutSource, Reader
from shoal.store import Store


class _SlowCountingSource(FrameSource):
    """Frames from a layout, each fetch slowed down and counted; the first ``fail`` fetches raise."""

    def __init__(self, inner: LayoutSource, fail: int = 0) -> None:
        self.inner, self.fail, self.fetches = inner, fail, 0
        self.lock = threading.Lock()

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.fetches += 1
            failing = self.fetches <= self.fail
        time.sleep(0.05)
        if failing:
            raise ShoalError("registry went away")
        return self.inner.fetch(pack, offset, length)


def _image(tmp_path: Path) -> tuple[Store, object, bytes]:
    src = tmp_path / "tree"
    src.mkdir()
    data = bytes(range(256)) * 400  # 100 KiB: one frame
    (src / "f").write_bytes(data)
    store = Store.open(tmp_path / "store")
    m = build(store, src, "t:1").manifest
    return store, store.load_index(m), data


def _read_in_threads(reader: Reader, idx: object, n: int) -> list[object]:
    e = idx.lookup(b"f")  # type: ignore[attr-defined]
    out: list[object] = [None] * n

    def go(i: int) -> None:
        try:
            out[i] = reader.read(e, 0, e.size)
        except ShoalError as exc:
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_concurrent_readers_share_one_fetch(tmp_path: Path) -> None:
    store, idx, data = _image(tmp_path)
    src = _SlowCountingSource(LayoutSource(store.layout))
    assert _read_in_threads(Reader(idx, src), idx, 8) == [data] * 8  # type: ignore[arg-type]
    assert src.fetches == 1


@pytest.mark.parametrize("fail", [1, 3])
def test_a_failed_fetch_lets_the_waiters_try_again(tmp_path: Path, fail: int) -> None:
    store, idx, data = _image(tmp_path)
    src = _SlowCountingSource(LayoutSource(store.layout), fail=fail)
    out = _read_in_threads(Reader(idx, src), idx, 8)  # type: ignore[arg-type]
    assert sum(isinstance(o, ShoalError) for o in out) == fail  # each failure reaches only its own reader
    assert out.count(data) == 8 - fail and src.fetches == fail + 1


def test_an_offered_frame_is_read_without_a_fetch_and_its_checked_chunks_not_hashed_again(tmp_path: Path) -> None:
    """``Reader.offer`` (the unpack beside a pull): the frame is served as handed in, no fetch; a chunk
    the caller did not say it checked is still hashed, and so refused when the bytes lie."""
    from shoal.format.packing import open_frame

    store, idx, data = _image(tmp_path)
    src = _SlowCountingSource(LayoutSource(store.layout))
    f = idx.frames[0]  # type: ignore[attr-defined]
    frame = open_frame(LayoutSource(store.layout).fetch("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen),  # type: ignore[attr-defined]
                       f, "test")
    e = idx.lookup(b"f")  # type: ignore[attr-defined]
    chunks = list(idx.frame_chunks(0))  # type: ignore[attr-defined]

    r = Reader(idx, src)  # type: ignore[arg-type]
    assert r.offer(0, frame, chunks)
    assert r.read(e, 0, e.size) == data and src.fetches == 0

    # bytes that lie, offered as checked: served as they are (the caller's check is the check) ...
    liar = bytearray(frame)
    liar[0] ^= 1
    r = Reader(idx, src)  # type: ignore[arg-type]
    assert r.offer(0, bytes(liar), chunks)
    assert r.read(e, 0, 1) == bytes(liar[:1])
    # ... and offered unchecked: hashed, refused
    r = Reader(idx, src)  # type: ignore[arg-type]
    assert r.offer(0, bytes(liar), [])
    with pytest.raises(ShoalError, match="failed verification"):
        r.read(e, 0, e.size)
    assert src.fetches == 0

    # a frame of the wrong length, or past OFFER_MAX waiting: refused, the read goes to the source
    r = Reader(idx, src)  # type: ignore[arg-type]
    assert not r.offer(0, frame[:-1], chunks)
    r.OFFER_MAX = len(frame) - 1
    assert not r.offer(0, frame, chunks)
    assert r.read(e, 0, e.size) == data and src.fetches == 1


def test_unpack_writes_every_file_from_one_thread_and_reads_frames_ahead_on_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``unpack``: the file system calls of the files come from the one writing thread (a hand-off per
    small file cost more than the write); frames are decompressed on the ``workers`` threads, ahead."""
    import os

    import shoal.format.packing as packing
    from shoal.unpack import UnpackOptions, unpack

    src = tmp_path / "tree"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}").write_bytes(os.urandom(3000 + i))
    store = Store.open(tmp_path / "store")
    m = build(store, src, "t:1").manifest
    idx = store.load_index(m)
    writers: set[str] = set()
    deflaters: set[str] = set()
    real_write, real_decompress = os.write, packing.decompress_frame

    def write(fd: int, data: object) -> int:
        writers.add(threading.current_thread().name)
        return real_write(fd, data)  # type: ignore[arg-type]

    def decompress(data: object, ulen: int, where: str) -> bytes:
        deflaters.add(threading.current_thread().name)
        return real_decompress(data, ulen, where)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(packing, "decompress_frame", decompress)
    r = unpack(idx, Reader(idx, LayoutSource(store.layout)), str(tmp_path / "out"), UnpackOptions(workers=3))
    assert r.files == 300
    assert writers == {threading.current_thread().name}
    # frames are decompressed ahead on the worker threads; the writing thread decompresses one itself
    # only when it overtook the read-ahead (a loaded machine: the workers had no CPU yet), never every one
    assert any(n.startswith("shoal-unpack") for n in deflaters), deflaters
    for i in range(300):
        assert (tmp_path / "out" / f"f{i:03d}").read_bytes() == (src / f"f{i:03d}").read_bytes()


def test_chunks_in_is_the_chunks_a_range_touches(tmp_path: Path) -> None:
    """Reader.chunks_in (frames_for's and the bundle recorder's one walk): against a brute force."""
    import random

    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_bytes(random.Random(7).randbytes(3 << 20))
    store = Store.open(tmp_path / "store")
    idx = store.load_index(build(store, src, "t:1").manifest)
    e = idx.lookup(b"f")
    assert len(e.chunks) > 3
    reader = Reader(idx, LayoutSource(store.layout))
    spans, at = [], 0
    for ci in e.chunks:
        spans.append((ci, at, at + idx.chunk_lengths[ci]))
        at += idx.chunk_lengths[ci]
    rng = random.Random(1)
    for off, size in [(0, 1), (0, e.size), (e.size - 1, 10), (e.size, 5), (spans[2][1], 1), (spans[2][1] - 1, 2)] + [
            (rng.randrange(e.size), rng.randrange(1, 1 << 20)) for _ in range(50)]:
        want = [ci for ci, a, b in spans if a < min(e.size, off + size) and b > off]
        assert reader.chunks_in(e, off, size) == want, (off, size)
        assert reader.frames_for(e, off, size) == {idx.chunk_frames[ci] for ci in want}


class _NowaitCountingSource(FrameSource):
    """A store's frames; ``fetch_nowait`` answers what ``ready`` says (the bytes, None, or other bytes)."""

    def __init__(self, store: Store, ready: str = "yes") -> None:
        from shoal.reader import StoreSource

        self.inner, self.ready, self.fetches, self.nowaits = StoreSource(store), ready, 0, 0

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        self.fetches += 1
        return self.inner.fetch(pack, offset, length)

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        self.nowaits += 1
        if self.ready == "no":
            return None
        if self.ready == "lying":  # a frame of zeros where the pack holds other bytes
            import zstandard

            got = zstandard.decompress(self.inner.fetch(pack, offset, length))
            return zstandard.ZstdCompressor().compress(b"\0" * len(got))
        return self.inner.fetch_nowait(pack, offset, length)


def test_frame_now_decompresses_what_the_source_has_at_once_and_nothing_else(tmp_path: Path) -> None:
    """``Reader.frame_now`` (the mount's reader thread, mount.md §2): a frame whose bytes the source has
    without waiting is decompressed there and kept; one it would wait for is left to ``frame``."""
    store, idx, data = _image(tmp_path)
    e = idx.lookup(b"f")  # type: ignore[attr-defined]
    fi = idx.chunk_frames[e.chunks[0]]  # type: ignore[attr-defined]
    waits = _NowaitCountingSource(store, "no")
    r = Reader(idx, waits)  # type: ignore[arg-type]
    assert r.frame_now(fi) is None and not r.has_frames({fi}) and waits.fetches == 0
    assert r.read(e, 0, e.size) == data and waits.fetches == 1  # then fetched as ever
    at_once = _NowaitCountingSource(store, "yes")  # the pack was just written: in the page cache
    r = Reader(idx, at_once)  # type: ignore[arg-type]
    f = idx.frames[fi]  # type: ignore[attr-defined]
    if store.read_frame_nowait("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen) is None:  # type: ignore[attr-defined]
        pytest.skip("this file system does not answer preadv2(RWF_NOWAIT)")
    assert r.frame_now(fi) is not None and r.has_frames({fi})
    assert r.read(e, 0, e.size) == data and at_once.fetches == 0 and at_once.nowaits == 1


def test_frame_now_bytes_are_checked_like_any_other(tmp_path: Path) -> None:
    from shoal.errors import IntegrityError

    store, idx, _ = _image(tmp_path)
    e = idx.lookup(b"f")  # type: ignore[attr-defined]
    r = Reader(idx, _NowaitCountingSource(store, "lying"))  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):  # the frame refused as it is opened, or its chunks when read
        r.frame_now(idx.chunk_frames[e.chunks[0]])  # type: ignore[attr-defined]
        r.read(e, 0, e.size)
    assert not r.has_frames({idx.chunk_frames[e.chunks[0]]})  # type: ignore[attr-defined]


def test_a_forwarding_source_does_not_pass_fetch_nowait_around_its_fetch(tmp_path: Path) -> None:
    """A wrapper that sees every ``fetch`` (counting, recording, holding) would miss reads that went
    around it: ``ForwardingSource`` answers None unless a subclass forwards it."""
    from shoal.reader import ForwardingSource, StoreSource

    store, idx, _ = _image(tmp_path)
    f = idx.frames[0]  # type: ignore[attr-defined]
    pack = "sha256:" + idx.packs[f.pack].hex()  # type: ignore[attr-defined]
    assert StoreSource(store).fetch_nowait(pack, f.offset, f.clen) is not None
    assert ForwardingSource(StoreSource(store)).fetch_nowait(pack, f.offset, f.clen) is None


def test_read_range_nowait_answers_only_from_the_page_cache(tmp_path: Path) -> None:
    import os

    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else tmp_path  # /tmp may be tmpfs: always cached
    store, idx, _ = _image(Path(__import__("tempfile").mkdtemp(dir=base)))
    f = idx.frames[0]  # type: ignore[attr-defined]
    pack = "sha256:" + idx.packs[f.pack].hex()  # type: ignore[attr-defined]
    lay = store.layout
    if lay.read_range_nowait(pack, f.offset, f.clen) is None:
        pytest.skip("this file system does not answer preadv2(RWF_NOWAIT)")
    assert lay.read_range_nowait(pack, f.offset, f.clen) == lay.read_range(pack, f.offset, f.clen)
    size = lay.size(pack)
    assert lay.read_range_nowait(pack, size - 10, 20) is None  # short: the caller's read says why
    assert lay.read_range_nowait("sha256:" + "0" * 64, 0, 10) is None  # missing
    fd = os.open(lay.path(pack), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
    finally:
        os.close(fd)
    evicted = lay.read_range_nowait(pack, f.offset, f.clen)
    if _fstype(lay.path(pack)) != "tmpfs":  # on tmpfs the page cache is the file
        assert evicted is None  # it would have waited for the disk
    assert lay.read_range(pack, f.offset, f.clen)  # read as ever
    import shutil

    shutil.rmtree(store.root, ignore_errors=True)


def _fstype(path: Path) -> str:
    p = path.resolve()
    while not p.is_mount():
        p = p.parent
    types = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    return types.get(str(p), "")
