"""LazySource and profiles against a real registry (no FUSE): verified fetches cached in the store,
one request per frame however many readers, merged prefetch ranges, read-ahead in the background,
deadlines, a forked child with its own connections, and the profile format and referrer artifact."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, ThreadedServer, proxy_factory, registry  # noqa: E402,F401
from shoal.errors import FormatError, IntegrityError, TransportError  # noqa: E402


@pytest.fixture(scope="module")
def pushed(sample: dict[str, object], registry: Registry) -> dict[str, Any]:
    """The sample image pushed to the session registry; its manifest and index."""
    from shoal.store import Store

    store = Path(str(sample["store"]))
    helpers.run_shoal(store, "push", "sample:1", f"docker://{registry.host}/lazy/source:1")
    st = Store.open(store)
    m = st.resolve("sample:1")
    return {"store": store, "manifest": m, "index": st.load_index(m), "repo": "lazy/source"}


def _frame_bytes(store: Path, idx: Any, fi: int) -> bytes:
    from shoal.store import Store

    f = idx.frames[fi]
    return Store.open(store).layout.read_range("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen)


def _lazy(host: str, pushed: dict[str, Any], store_dir: Path, **kw: Any) -> Any:
    from shoal.lazy import LazySource
    from shoal.store import Store
    from shoal.transports.docker import parse_docker

    ref = parse_docker(f"//{host}/{pushed['repo']}:1")
    from shoal.transports.context import SystemContext

    opts = SystemContext(retries=kw.pop("retries", 5), timeout=kw.pop("timeout", 30.0))
    return LazySource(Store.open(store_dir), ref.new_source(opts), pushed["manifest"], pushed["index"],
                      reopen=lambda: ref.new_source(opts), where=host, **kw)


def _range_gets(proxy: RegistryProxy) -> list[str]:
    return [p for m, p, s in proxy.log if m == "GET" and "/blobs/" in p and s == 206]


def _largest_frame(idx: Any) -> tuple[int, Any, str]:
    """The largest frame: its index, its row and its pack's digest."""
    fi = max(range(len(idx.frames)), key=lambda i: idx.frames[i].clen)
    f = idx.frames[fi]
    return fi, f, "sha256:" + idx.packs[f.pack].hex()


def _largest_pack(idx: Any) -> tuple[int, list[int]]:
    """The pack with the most frames, and its frame indices."""
    by_pack: dict[int, list[int]] = {}
    for fi, f in enumerate(idx.frames):
        by_pack.setdefault(f.pack, []).append(fi)
    return max(by_pack.items(), key=lambda kv: len(kv[1]))


def test_fetch_verifies_caches_and_coalesces(pushed: dict[str, Any], registry: Registry, proxy_factory: Any,
                                             tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url)
    idx = pushed["index"]
    src = _lazy(proxy.host, pushed, tmp_path / "store")
    fi, f, pack = _largest_frame(idx)
    want = _frame_bytes(pushed["store"], idx, fi)
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(src.fetch(pack, f.offset, f.clen))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [want] * 8
    assert len(_range_gets(proxy)) == 1  # eight readers, one request
    # served once verified, then persisted: the frame, then its chunks' catalogue rows (what fetch looks for)
    helpers_wait(lambda: src._catalogued_here(fi), 10)
    assert src.fetch(pack, f.offset, f.clen) == want  # now from the store
    s = src.stats
    assert (s.requests, s.frames_fetched, s.frames_cached, s.bytes_cached) == (1, 1, 1, f.clen)
    assert s.frames_total == len(idx.frames) and s.bytes_total == sum(p.size for p in pushed["manifest"].packs)
    assert s.frames_local >= 1 and len(_range_gets(proxy)) == 1
    src.close()


def _short_neighbours(idx: Any) -> tuple[int, int]:
    """Two short frames (under FRAME_MIN) back to back in a pack, the second within NEIGHBOURS bytes."""
    from shoal.format.packing import FRAME_MIN
    from shoal.lazy import NEIGHBOURS

    at = {(f.pack, f.offset): fi for fi, f in enumerate(idx.frames)}
    for a, f in enumerate(idx.frames):
        b = at.get((f.pack, f.offset + f.clen))
        if b is not None and f.ulen < FRAME_MIN and idx.frames[b].ulen < FRAME_MIN and idx.frames[b].clen <= NEIGHBOURS:
            return a, b
    raise AssertionError("the sample image has no two short frames side by side")


def test_a_demand_read_of_a_short_frame_carries_the_short_frame_after_it(
        pushed: dict[str, Any], registry: Registry, proxy_factory: Any, tmp_path: Path) -> None:
    """Small files read one after another (a package's modules) cost one request, not one each; a
    source made with ``neighbours=0`` (a mount with a profile bundle) carries none."""
    idx = pushed["index"]
    a, b = _short_neighbours(idx)
    fa, fb = idx.frames[a], idx.frames[b]
    pack = "sha256:" + idx.packs[fa.pack].hex()
    for neighbours, requests in ((None, 1), (0, 2)):
        proxy = proxy_factory(registry.url)
        src = _lazy(proxy.host, pushed, tmp_path / f"s{neighbours}", **({} if neighbours is None else
                                                                        {"neighbours": neighbours}))
        assert src.fetch(pack, fa.offset, fa.clen) == _frame_bytes(pushed["store"], idx, a)
        first, last = (int(x) for x in proxy.ranges[0][1].removeprefix("bytes=").split("-"))
        assert first == fa.offset and (last >= fb.offset + fb.clen - 1) == (requests == 1)
        if requests == 1:
            helpers_wait(lambda s=src: s._catalogued_here(b), 10)  # verified and stored with the read's frame
        assert src.fetch(pack, fb.offset, fb.clen) == _frame_bytes(pushed["store"], idx, b)
        assert len(_range_gets(proxy)) == requests
        assert (src.stats.neighbour_frames > 0) == (requests == 1)
        src.close()


def test_prefetch_merges_adjacent_frames(pushed: dict[str, Any], registry: Registry, proxy_factory: Any,
                                         tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url)
    idx = pushed["index"]
    src = _lazy(proxy.host, pushed, tmp_path / "store")
    pi, frames = _largest_pack(idx)
    assert len(frames) >= 3
    n = src.prefetch(list(reversed(frames)))  # priority order does not split a run of adjacent frames
    assert n == sum(idx.frames[fi].clen for fi in frames)
    assert len(_range_gets(proxy)) == 1
    assert src.prefetch(frames) == 0  # nothing left to fetch
    # every frame is now served from the store, verified
    for fi in frames:
        f = idx.frames[fi]
        assert src.fetch("sha256:" + idx.packs[pi].hex(), f.offset, f.clen) == _frame_bytes(pushed["store"], idx, fi)
    assert len(_range_gets(proxy)) == 1
    src.close()


def test_prefetch_returns_once_its_frames_are_stored(pushed: dict[str, Any], registry: Registry,
                                                     proxy_factory: Any, tmp_path: Path) -> None:
    """prefetch settles its futures as soon as the frames verify, but returns only once they are
    stored (and the pack promoted): a slow disk must not leave the store behind its answer."""
    proxy = proxy_factory(registry.url)
    idx = pushed["index"]
    src = _lazy(proxy.host, pushed, tmp_path / "store")
    pi, frames = _largest_pack(idx)
    add = src.store.catalog.add

    def slow_add(rows: Any) -> None:  # the job's catalogue write, well after the frames were served
        time.sleep(0.5)
        add(rows)

    src.store.catalog.add = slow_add  # type: ignore[method-assign]
    assert src.prefetch(frames) == sum(idx.frames[fi].clen for fi in frames)
    assert src.store.layout.has("sha256:" + idx.packs[pi].hex())  # promoted: every frame was stored
    assert all(src._catalogued_here(fi) for fi in frames)
    src.close()


def test_fetch_sees_a_frame_stored_between_its_looks(pushed: dict[str, Any], registry: Registry,
                                                      proxy_factory: Any, tmp_path: Path) -> None:
    """A frame fetched in the background, served to its waiters and being stored while a reader looks
    it up: the reader gets the frame's bytes, never "frame not cached, but its chunks are" (the race
    forced: the background job's catalogue write lands just after the reader's first catalogue look)."""
    proxy = proxy_factory(registry.url)
    idx = pushed["index"]
    src = _lazy(proxy.host, pushed, tmp_path / "store")
    fi, f, pack = _largest_frame(idx)
    cat = src.store.catalog
    add, locate = cat.add, cat.locate
    gate = threading.Event()

    def gated_add(rows: Any) -> None:  # the background job stores the frame's chunks when let through
        assert gate.wait(20)
        add(rows)

    looks: list[int] = []

    def racing_locate(ids: Any) -> Any:  # the reader's first look, then the job's write lands
        out = locate(ids)
        if threading.current_thread() is threading.main_thread() and not looks:
            looks.append(1)
            gate.set()
            helpers_wait(lambda: fi in src._stored, 10)
        return out

    cat.add = gated_add  # type: ignore[method-assign]
    src.readahead([fi])
    helpers_wait(lambda: fi in src._inflight and src._inflight[fi][0].done(), 20)  # served, not yet stored
    cat.locate = racing_locate  # type: ignore[method-assign]
    assert src.fetch(pack, f.offset, f.clen) == _frame_bytes(pushed["store"], idx, fi)
    assert looks and len(_range_gets(proxy)) == 1
    src.close()


def test_the_cached_set_keeps_a_frame_stored_while_it_is_built(pushed: dict[str, Any], registry: Registry,
                                                               tmp_path: Path) -> None:
    """The set of local frames (``frames_cached`` in the mount's counters) is built from the catalogue
    once; a frame a job stores after that read but before the set exists must still be in it (the race
    forced: the job's store lands between the catalogue's answer and the set's publication)."""
    idx = pushed["index"]
    src = _lazy(registry.host, pushed, tmp_path / "store")
    fi = max(range(len(idx.frames)), key=lambda i: idx.frames[i].clen)
    cat = src.store.catalog
    add, present = cat.add, cat.present
    gate = threading.Event()

    def gated_add(rows: Any) -> None:
        assert gate.wait(20)
        add(rows)

    def racing_present(ids: Any) -> Any:
        out = present(ids)  # the frame is not stored yet
        gate.set()
        helpers_wait(lambda: fi in src._stored, 10)  # now it is, and no set existed to add it to
        return out

    cat.add = gated_add  # type: ignore[method-assign]
    src.readahead([fi])
    helpers_wait(lambda: fi in src._inflight and src._inflight[fi][0].done(), 20)
    cat.present = racing_present  # type: ignore[method-assign]
    assert fi in src._cached_set()
    src.close()


def test_read_frame_sees_a_pack_promoted_between_its_looks(pushed: dict[str, Any], registry: Registry,
                                                            tmp_path: Path) -> None:
    """Another process promotes a partial pack (complete blob made, partial file and frame rows dropped)
    after Store.read_frame looked for the blob and before it read the partial file: the frame is read
    from the blob, not reported missing."""
    from shoal.store import Store

    idx = pushed["index"]
    src = _lazy(registry.host, pushed, tmp_path / "store")
    pi = max(range(len(idx.packs)), key=lambda p: sum(1 for f in idx.frames if f.pack == p))
    frames = [fi for fi, f in enumerate(idx.frames) if f.pack == pi]
    src.readahead(frames)
    helpers_wait(lambda: all(fi in src._stored for fi in frames), 20)
    src.close()
    pack = "sha256:" + idx.packs[pi].hex()
    size = next(p.size for p in pushed["manifest"].packs if p.digest == pack)
    st = Store.open(tmp_path / "store")
    assert not st.layout.has(pack) and st.partial.present(pack) == size
    other = Store.open(tmp_path / "store")
    read = st.partial.read

    def promoted_meanwhile(p: str, off: int, n: int) -> bytes:
        assert other.partial.try_promote(pack, size)
        return read(p, off, n)

    st.partial.read = promoted_meanwhile  # type: ignore[method-assign]
    f = idx.frames[frames[0]]
    assert st.read_frame(pack, f.offset, f.clen) == _frame_bytes(pushed["store"], idx, frames[0])


def test_readahead_does_not_block(pushed: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    """A read-ahead call returns at once while its fetch stalls on the network; the frame arrives later."""
    gate = threading.Event()

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        import http.client

        if "/blobs/" in req.path:
            gate.wait(20)
        conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
        conn.request(req.command, req.path, headers={k: v for k, v in req.headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        req.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                req.send_header(k, v)
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)

    slow = ThreadedServer(handle)
    try:
        idx = pushed["index"]
        src = _lazy(f"127.0.0.1:{slow.port}", pushed, tmp_path / "store")
        t0 = time.monotonic()
        src.readahead([0, 1])
        assert time.monotonic() - t0 < 0.5
        assert src.stats.readahead_frames == 2 and not src._is_cached(0)
        gate.set()
        helpers_wait(lambda: src._is_cached(0) and src._is_cached(1), 20)
        f = idx.frames[0]
        assert src.fetch("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen) == _frame_bytes(pushed["store"], idx, 0)
        src.close()
    finally:
        gate.set()
        slow.close()


def helpers_wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_deadline_and_corruption(pushed: dict[str, Any], registry: Registry, proxy_factory: Any,
                                 tmp_path: Path) -> None:
    """A registry that never answers: TransportError after fetch_timeout.  A lying one: IntegrityError,
    nothing cached, and the next (honest) fetch succeeds."""
    stall = threading.Event()

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        stall.wait(30)

    dead = ThreadedServer(handle)
    idx = pushed["index"]
    f = idx.frames[0]
    pack = "sha256:" + idx.packs[f.pack].hex()
    try:
        src = _lazy(f"127.0.0.1:{dead.port}", pushed, tmp_path / "s1", fetch_timeout=1.0, timeout=20.0)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="no answer .* within 1s"):
            src.fetch(pack, f.offset, f.clen)
        assert time.monotonic() - t0 < 3.0
        assert src.stats.timeouts == 1
        src.close()
    finally:
        stall.set()
        dead.close()
    proxy = proxy_factory(registry.url, corrupt=True)
    src = _lazy(proxy.host, pushed, tmp_path / "s2")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        src.fetch(pack, f.offset, f.clen)
    assert not src.store.has_frame(pack, f.offset) and src.store.catalog.count() == 0
    assert src.stats.failures >= 1
    proxy.corrupt = False
    assert src.fetch(pack, f.offset, f.clen) == _frame_bytes(pushed["store"], idx, 0)
    src.close()


def test_after_fork_uses_new_connections(pushed: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    idx = pushed["index"]
    src = _lazy(registry.host, pushed, tmp_path / "store")
    f0, f1 = idx.frames[0], idx.frames[-1]
    src.fetch("sha256:" + idx.packs[f0.pack].hex(), f0.offset, f0.clen)  # the parent has a live connection
    # the daemon's protocol (mount/daemon.py): before_fork ends the worker threads (one may still be
    # storing f0) and drops every sqlite connection, whose per-process lock state a child must not inherit
    src.before_fork()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            signal.alarm(120)  # a hang in the child fails the test, not the suite's timeout
            os.close(r)
            old_remote, old_store = src.remote, src.store
            src.after_fork()
            data = src.fetch("sha256:" + idx.packs[f1.pack].hex(), f1.offset, f1.clen)
            src.close(timeout=60)  # lets the fetch store what it verified (slow on a loaded machine)
            doc = {"new_remote": src.remote is not old_remote, "new_store": src.store is not old_store,
                   "sha": hashlib.sha256(data).hexdigest()}
            os.write(w, json.dumps(doc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    src.after_fork_parent()
    with os.fdopen(r, "rb") as fr:
        doc = json.loads(fr.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    want = hashlib.sha256(_frame_bytes(pushed["store"], idx, len(idx.frames) - 1)).hexdigest()
    assert doc == {"new_remote": True, "new_store": True, "sha": want}
    # the parent's source still works, and sees the frame the child cached in the shared store
    assert src._is_cached(len(idx.frames) - 1)
    src.close()


# ---------------------------------------------------------------------------------------------- profiles


def test_profile_format() -> None:
    from shoal.mount.profile import Profile

    img = "sha256:" + "ab" * 32
    p = Profile(img, ((1, 500, 70), (0, 0, 100), (1, 0, 500)), 2, 670, 1.5, ("python3", "-c", "print(1)"))
    raw = p.encode()
    doc = json.loads(raw)
    assert doc["mediaType"] == "application/vnd.shoal.profile.v1+json" and doc["image"] == img
    assert doc["frames"] == [[1, 500, 70], [0, 0, 100], [1, 0, 500]] and doc["packCount"] == 2
    assert Profile.decode(raw, img, 2) == p
    assert p.encode() == raw  # canonical
    frames = b"[[1,500,70],[0,0,100],[1,0,500]]"
    bad = [
        (raw, "sha256:" + "cd" * 32, 2, "belongs to"),
        (raw, img, 3, "pack count"),
        (raw.replace(frames, b"[[1,500,70],[1,500,70]]"), img, 2, "distinct"),
        (raw.replace(frames, b"[[2,0,100]]"), img, 2, "within"),
        (raw.replace(frames, b"[[0,0,0]]"), img, 2, "within"),
        (raw.replace(frames, b"[[0,-1,5]]"), img, 2, "within"),
        (raw.replace(frames, b"[3]"), img, 2, "within"),
        (raw.replace(b'"format":1', b'"format":2'), img, 2, "format 1"),
        (b"not json", img, 2, "not JSON"),
    ]
    for data, image, n, msg in bad:
        with pytest.raises(FormatError, match=msg):
            Profile.decode(data, image, n)


def test_profile_frames_map_to_the_index(pushed: dict[str, Any]) -> None:
    from shoal.mount.profile import Profile

    m, idx = pushed["manifest"], pushed["index"]
    order = [len(idx.frames) - 1, 0, 3, 0]
    p = Profile.of_frames(m.digest, idx, order, 0.5, ("true",))
    assert p.frame_indices(idx) == (len(idx.frames) - 1, 0, 3)  # first touches only
    assert p.nbytes == sum(idx.frames[i].clen for i in (len(idx.frames) - 1, 0, 3))
    f = idx.frames[3]
    wrong = Profile(m.digest, ((f.pack, f.offset, f.clen + 1),), len(idx.packs))
    assert wrong.frame_indices(idx) is None  # not a frame of this image: the profile is ignored


def test_profile_local_and_referrer(pushed: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    from shoal.mount.profile import Profile, fetch_remote, load_local, local_path, push_remote, save_local
    from shoal.transports.registry import RegistryClient, referrers_tag

    m, idx = pushed["manifest"], pushed["index"]
    prof = Profile.of_frames(m.digest, idx, [2, 0, 1], 0.5, ("true",))
    path = save_local(tmp_path, prof)
    assert path == local_path(tmp_path, m.digest) and path.parent.name == "profiles"
    assert load_local(tmp_path, m.digest, len(idx.packs)) == prof
    assert load_local(tmp_path, m.digest, len(idx.packs) + 1) is None  # a mismatching one is ignored
    ref = f"docker://{registry.host}/{pushed['repo']}:1"
    digest = push_remote(ref, {}, prof)
    with RegistryClient(registry.host) as c:
        # distribution 2.8 has no referrers API: the tag-schema index lists the artifact
        raw, _, _ = c.get_manifest(pushed["repo"], referrers_tag(m.digest), ["application/vnd.oci.image.index.v1+json"])
        entries = json.loads(raw)["manifests"]
        assert [e["digest"] for e in entries if e.get("artifactType") == "application/vnd.shoal.profile.v1+json"] \
            == [digest]
        art = json.loads(c.get_manifest(pushed["repo"], digest)[0])
        assert art["subject"]["digest"] == m.digest and art["artifactType"] == "application/vnd.shoal.profile.v1+json"
        assert fetch_remote(c, pushed["repo"], m.digest) == prof
        # a newer profile wins
        time.sleep(1.1)
        newer = Profile.of_frames(m.digest, idx, [1], 0.1, ("true",))
        push_remote(ref, {}, newer)
        assert fetch_remote(c, pushed["repo"], m.digest) == newer
        # the image's own blobs are untouched: same manifest, same layers
        assert helpers.published_shoal_digest(registry.host, pushed["repo"], "1") == m.digest


def _early_source(proxy: RegistryProxy, pushed: dict[str, Any], store_dir: Path, frames: list[int]) -> Any:
    from shoal.early import EarlyFetch

    src = _lazy(proxy.host, pushed, store_dir)
    idx = pushed["index"]
    ranges = [("sha256:" + idx.packs[idx.frames[fi].pack].hex(), idx.frames[fi].offset, idx.frames[fi].clen)
              for fi in frames]
    early = EarlyFetch(src.remote, src.sizes, ranges)
    src._early = {fi: early.futures[(p, o)] for fi, (p, o, _) in zip(frames, ranges)}
    return src


def _child_prefetch(src: Any, frames: list[int]) -> dict[str, Any]:
    """Fork a 'daemon' that prefetches ``frames``; return what it saw."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            signal.alarm(120)  # a hang in the child fails the test, not the suite's timeout
            os.close(r)
            src.after_fork()
            n = src.prefetch(frames)
            s = src.stats
            os.write(w, json.dumps({"bytes": n, "early": s.early_frames, "requests": s.requests}).encode())
            src.close()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return {"pid": pid, "fd": r}


def _child_result(child: dict[str, Any]) -> dict[str, Any]:
    with os.fdopen(child["fd"], "rb") as f:
        doc: dict[str, Any] = json.loads(f.read() or b"{}")
    _, status = os.waitpid(child["pid"], 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return doc


def test_early_frames_are_handed_across_the_fork(pushed: dict[str, Any], registry: Registry, proxy_factory: Any,
                                                 tmp_path: Path) -> None:
    """Frames fetched before the fork reach the daemon through the hand-over pipe: no second request,
    verified and stored by the daemon."""
    from shoal.store import Store

    proxy = proxy_factory(registry.url)
    idx = pushed["index"]
    frames = [0, 1, len(idx.frames) - 1]
    src = _early_source(proxy, pushed, tmp_path / "store", frames)
    src.before_fork()
    child = _child_prefetch(src, frames)
    src.after_fork_parent()
    src.handover_wait(30)
    doc = _child_result(child)
    assert doc["early"] == 3 and doc["requests"] == 0
    assert doc["bytes"] == sum(idx.frames[fi].clen for fi in frames)
    assert len(_range_gets(proxy)) <= 3  # the early requests only (adjacent frames share one)
    st = Store.open(tmp_path / "store")
    for fi in frames:
        f = idx.frames[fi]
        pack = "sha256:" + idx.packs[f.pack].hex()
        assert st.has_frame(pack, f.offset) and st.read_frame(pack, f.offset, f.clen) == _frame_bytes(
            pushed["store"], idx, fi)


def test_early_frames_lost_at_the_fork_are_fetched_again(pushed: dict[str, Any], registry: Registry,
                                                        proxy_factory: Any, tmp_path: Path) -> None:
    """The parent dies before handing anything over: the daemon fetches the frames itself; a corrupt
    early frame is never stored."""
    proxy = proxy_factory(registry.url, corrupt=True)  # the early fetch gets corrupted bytes
    idx = pushed["index"]
    frames = [0, 2]
    src = _early_source(proxy, pushed, tmp_path / "s1", frames)
    src.before_fork()
    child = _child_prefetch(src, frames)
    h = src._handover
    os.close(h.rfd)
    os.close(h.wfd)  # as if the parent died: the daemon reads EOF
    proxy.corrupt = False
    doc = _child_result(child)
    assert doc["early"] == 0 and doc["requests"] >= 1
    assert doc["bytes"] == sum(idx.frames[fi].clen for fi in frames)
    # corrupt early bytes handed over are refused, and the frame is not cached
    proxy.corrupt = True
    src = _early_source(proxy, pushed, tmp_path / "s2", [0])
    f = idx.frames[0]
    pack = "sha256:" + idx.packs[f.pack].hex()
    with pytest.raises(IntegrityError, match="digest mismatch"):
        src.fetch(pack, f.offset, f.clen)
    assert not src.store.has_frame(pack, f.offset)
    proxy.corrupt = False
    assert src.fetch(pack, f.offset, f.clen) == _frame_bytes(pushed["store"], idx, 0)  # fetched afresh
    src.close()


def test_a_checked_frame_is_handed_to_the_reader_opened_once(pushed: dict[str, Any], registry: Registry,
                                                            proxy_factory: Any, tmp_path: Path) -> None:
    """A frame the source checked reaches the Reader decompressed (``opened``, taken once), so it is not
    decompressed twice; a frame that failed its check is never handed over; and the Reader hashes every
    chunk of a handed-over frame itself, so a source that hands over other bytes serves none of them."""
    from shoal.format import packing
    from shoal.reader import ForwardingSource, Reader

    idx = pushed["index"]
    fi, f, pack = _largest_frame(idx)
    want = packing.open_frame(_frame_bytes(pushed["store"], idx, fi), f, "want")
    piece = {ci: want[idx.chunk_offsets[ci]:idx.chunk_offsets[ci] + idx.chunk_lengths[ci]]
             for ci in idx.frame_chunks(fi)}
    proxy = proxy_factory(registry.url, corrupt=True)
    src = _lazy(proxy.host, pushed, tmp_path / "store")
    with pytest.raises(IntegrityError):
        src.fetch(pack, f.offset, f.clen)
    assert src.opened(pack, f.offset) is None  # nothing of a bad frame
    proxy.corrupt = False
    src.fetch(pack, f.offset, f.clen)
    assert src.opened(pack, f.offset) == want
    assert src.opened(pack, f.offset) is None  # taken once
    reader = Reader(idx, src)
    assert bytes(reader.frame(fi)) == want  # from the store: the reader decompresses it itself
    assert all(bytes(reader.chunk(ci)) == b for ci, b in piece.items())

    class Lying(ForwardingSource):
        def opened(self, pack: str, offset: int) -> bytes | None:
            return bytes(len(want))  # the right length, other bytes

    liar = Reader(idx, Lying(src))
    for ci in piece:
        with pytest.raises(IntegrityError, match="failed verification"):
            liar.chunk(ci)
    src.close()
