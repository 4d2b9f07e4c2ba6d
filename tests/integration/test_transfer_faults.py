"""Faults during push and pull: a registry killed and restarted mid-transfer, corrupted ranges, 5xx/429."""

from __future__ import annotations

import random
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_transfer import build_image, fresh_store, make_tree, make_tree_b, shoal  # noqa: E402

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, proxy_factory, registry_factory  # noqa: E402,F401
from shoal.copier import CopyOptions, CopyResult, copy  # noqa: E402
from shoal.errors import IntegrityError, NotFound, TransportError  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.store.maintenance import fsck  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402

__all__ = ["proxy_factory", "registry_factory"]

RegFactory = Callable[..., Registry]


@pytest.fixture(autouse=True)
def _isolated_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for v in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(v, raising=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a:1 (~3.5 MB), c:1 (A's tree edited, built alone) and big:1 (~12 MB in ~8 packs)."""
    d = tmp_path_factory.mktemp("faults")
    a = make_tree(d / "a")
    b = make_tree_b(a, d / "b")
    rng = random.Random(3)
    files = {f"data/{i:02d}.bin": rng.randbytes(1_000_000) for i in range(12)}
    g = helpers.write_tree(d / "g", files)
    store = d / "store"
    build_image(store, a, "a:1")
    build_image(store, b, "c:1", reuse_store=False)
    build_image(store, g, "big:1", reuse_store=False)
    return store


class KillOnProgress:
    """A progress sink that kills (and maybe later restarts) the registry at the first progress event."""

    def __init__(self, reg: Registry, restart_after: float | None) -> None:
        self.reg, self.restart_after = reg, restart_after
        self.fired = threading.Event()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, task: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, task: str, amount: int) -> None:
        with self._lock:
            if self.fired.is_set():
                return
            self.fired.set()
            if self.restart_after is None:
                self.reg.kill()
            else:
                self.thread = self.reg.restart_later(self.restart_after)

    def finish(self, task: str) -> None:
        pass

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(30)


def run(src: str, dst: str, store: Path | None, sink: Any = None, **kw: Any) -> CopyResult:
    o: dict[str, object] = {"backoff": 0.05, "concurrency": 1}
    if store is not None:
        o["store"] = str(store)
    o.update(kw)
    opts = CopyOptions(concurrency=int(o["concurrency"]), src_opts=dict(o), dst_opts=dict(o))  # type: ignore[call-overload]
    if sink is None:
        return copy(parse_reference(src), parse_reference(dst), opts)
    return copy(parse_reference(src), parse_reference(dst), opts, sink)


def pack_bytes(store: Path, ref: str) -> int:
    m = Store.open(store).resolve(ref)
    return sum(p.size for p in m.packs)


def assert_clean(store: Path) -> None:
    rep = fsck(Store.open(store))
    assert rep.ok, rep.errors


def assert_same_image(want_store: Path, want_ref: str, got_store: Path, got_ref: str, tmp: Path) -> None:
    """Same manifest digest (so same Merkle root), a clean store, and an unpack equal to the source's."""
    want, got = Store.open(want_store).resolve(want_ref), Store.open(got_store).resolve(got_ref)
    assert got.digest == want.digest and got.root == want.root
    assert_clean(got_store)
    helpers.assert_same_tree(helpers.tree_snapshot(_unpack(want_store, want_ref, tmp / "want")),
                             helpers.tree_snapshot(_unpack(got_store, got_ref, tmp / "got")))


def repo() -> str:
    return f"faults/{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------------------ pull


@pytest.mark.parametrize("in_memory", [True, False])  # packs read into memory (VerifiedBlob), or streamed
def test_pull_survives_a_registry_restart(registry_factory: RegFactory, big: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, in_memory: bool) -> None:
    if not in_memory:
        monkeypatch.setattr(sys.modules["shoal.pull"], "WHOLE_IN_MEMORY", 0)
    reg = registry_factory()
    r = repo()
    run("big:1", f"docker://{reg.host}/{r}:1", big)
    s2 = fresh_store(tmp_path)
    sink = KillOnProgress(reg, restart_after=0.6)
    res = run(f"docker://{reg.host}/{r}:1", "big:1", s2, sink, backoff=0.3, retries=6)
    sink.join()
    assert sink.fired.is_set() and res.retries > 0
    assert helpers.published_shoal_digest(reg.host, r, res.digest) == Store.open(big).resolve("big:1").digest
    assert res.bytes_fetched >= pack_bytes(big, "big:1")
    assert_same_image(big, "big:1", s2, "big:1", tmp_path)


@pytest.mark.parametrize("ref", ["big:1", "c:1"])  # whole packs; range reads after A
def test_interrupted_pull_resumes_without_refetching(registry_factory: RegFactory, big: Path, tmp_path: Path,
                                                     ref: str) -> None:
    reg = registry_factory()
    r = repo()
    run("a:1", f"docker://{reg.host}/{r}:a", big)
    run(ref, f"docker://{reg.host}/{r}:x", big)
    s2 = fresh_store(tmp_path)
    if ref == "c:1":
        run(f"docker://{reg.host}/{r}:a", "a:1", s2)
    # the reference run: how much this pull costs uninterrupted
    s3 = fresh_store(tmp_path)
    if ref == "c:1":
        run(f"docker://{reg.host}/{r}:a", "a:1", s3)
    full = run(f"docker://{reg.host}/{r}:x", "x:1", s3)
    sink = KillOnProgress(reg, restart_after=None)
    with pytest.raises(TransportError):
        run(f"docker://{reg.host}/{r}:x", "x:1", s2, sink, retries=1)
    with pytest.raises(NotFound):
        Store.open(s2).resolve("x:1")  # not tagged
    assert_clean(s2)  # what was stored is verified and consistent
    reg.start()
    again = run(f"docker://{reg.host}/{r}:x", "x:1", s2)
    assert again.bytes_fetched < full.bytes_fetched
    assert again.chunks_fetched < full.chunks_fetched
    assert again.digest == full.digest
    assert_same_image(big, ref, s2, "x:1", tmp_path)


def _unpack(store: Path, ref: str, dest: Path) -> Path:
    shoal(store, "unpack", ref, str(dest))
    return dest


# ------------------------------------------------------------------------------------------ push


@pytest.mark.parametrize("chunk_size", [None, 256 * 1024])  # monolithic and chunked (PATCH) uploads
def test_push_survives_a_registry_restart(registry_factory: RegFactory, big: Path, tmp_path: Path,
                                          chunk_size: int | None) -> None:
    reg = registry_factory()
    r = repo()
    sink = KillOnProgress(reg, restart_after=0.6)
    kw: dict[str, Any] = {"chunk_size": chunk_size} if chunk_size else {}
    res = run("big:1", f"docker://{reg.host}/{r}:1", big, sink, backoff=0.3, retries=6, **kw)
    sink.join()
    assert sink.fired.is_set() and res.retries > 0
    assert helpers.published_shoal_digest(reg.host, r, res.digest) == Store.open(big).resolve("big:1").digest
    s2 = fresh_store(tmp_path)
    run(f"docker://{reg.host}/{r}:1", "big:1", s2)  # straight from the registry, no proxy
    assert_same_image(big, "big:1", s2, "big:1", tmp_path)


def test_interrupted_push_resumes_without_resending(registry_factory: RegFactory,
                                                    proxy_factory: Callable[..., RegistryProxy], big: Path,
                                                    tmp_path: Path) -> None:
    reg = registry_factory()
    r = repo()
    sink = KillOnProgress(reg, restart_after=None)
    with pytest.raises(TransportError):
        run("big:1", f"docker://{reg.host}/{r}:1", big, sink, retries=1)
    reg.start()
    proxy = proxy_factory(reg.url)
    m = Store.open(big).resolve("big:1")
    res = run("big:1", f"docker://{proxy.host}/{r}:1", big)
    assert res.blobs_skipped >= 1 and res.blobs_sent < 2 + len(m.packs)
    uploads = [p for meth, p, _ in proxy.log if meth == "PUT" and "/blobs/uploads/" in p]
    assert len(uploads) == res.blobs_sent
    assert helpers.published_shoal_digest(reg.host, r, res.digest) == m.digest
    s2 = fresh_store(tmp_path)
    run(f"docker://{reg.host}/{r}:1", "big:1", s2)
    assert_same_image(big, "big:1", s2, "big:1", tmp_path)


# ------------------------------------------------------------------------------------------ lies and hiccups


class CorruptOneRange(RegistryProxy):
    """Flips one byte near the start of the first 206 (range) answer, in the frame the range starts with
    (a range may also bridge frames the reader does not need, whose bytes it neither checks nor keeps);
    everything else is forwarded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.flips = 0
        self._flip_lock = threading.Lock()

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes]:
        status, rheaders, data = super()._forward(method, path, headers, body)
        if method == "GET" and status == 206 and len(data) > 16:
            with self._flip_lock:
                if self.flips == 0:
                    self.flips = 1
                    i = min(len(data) // 2, 200)
                    data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
        return status, rheaders, data


def test_corrupted_range_is_never_stored_and_is_fetched_again(registry_factory: RegFactory, big: Path,
                                                              tmp_path: Path) -> None:
    """A range damaged once in transit fails chunk verification, is not stored, and is fetched again
    (pull.py: 3 tries); a registry that keeps corrupting fails (next test)."""
    reg = registry_factory()
    r = repo()
    run("a:1", f"docker://{reg.host}/{r}:a", big)
    run("c:1", f"docker://{reg.host}/{r}:c", big)
    proxy = CorruptOneRange(reg.url)
    try:
        s2 = fresh_store(tmp_path)
        run(f"docker://{reg.host}/{r}:a", "a:1", s2)
        p = shoal(s2, "-v", "pull", f"docker://{proxy.host}/{r}:c", "c:1", "-j", "1")
        assert proxy.flips == 1
        assert b"fetching it again" in p.stderr and b"verification" in p.stderr, p.stderr[-2000:]
    finally:
        proxy.close()
    assert Store.open(s2).resolve("c:1").root == Store.open(big).resolve("c:1").root
    assert_clean(s2)  # every frame the store holds verifies


def test_corrupting_registry_gives_one_clear_error(registry_factory: RegFactory,
                                                   proxy_factory: Callable[..., RegistryProxy], big: Path,
                                                   tmp_path: Path) -> None:
    reg = registry_factory()
    r = repo()
    run("a:1", f"docker://{reg.host}/{r}:a", big)
    proxy = proxy_factory(reg.url, corrupt=True)
    s2 = fresh_store(tmp_path)
    p = shoal(s2, "pull", f"docker://{proxy.host}/{r}:a", "a:1", check=False)
    helpers.assert_one_line_error(p, "digest", "does not match")
    m = Store.open(big).resolve("a:1")
    with pytest.raises(IntegrityError):  # by digest, the manifest passes; then every blob is refused
        run(f"docker://{proxy.host}/{r}@{m.digest}", "a:1", s2)
    assert_clean(s2)


def test_5xx_and_429_are_retried(registry_factory: RegFactory, proxy_factory: Callable[..., RegistryProxy],
                                 big: Path, tmp_path: Path) -> None:
    reg = registry_factory()
    r = repo()
    faults = [("HEAD", "/blobs/", 503), ("POST", "/blobs/uploads/", 502), ("PUT", "/manifests/", 500),
              ("GET", "/manifests/", 429), ("GET", "/blobs/", 503), ("GET", "/blobs/", 504)]
    proxy = proxy_factory(reg.url, faults=list(faults))
    s2 = fresh_store(tmp_path)
    results = [run("a:1", f"docker://{proxy.host}/{r}:a", big), run("c:1", f"docker://{proxy.host}/{r}:c", big),
               run(f"docker://{proxy.host}/{r}:a", "a:1", s2), run(f"docker://{proxy.host}/{r}:c", "c:1", s2)]
    assert not proxy.faults, proxy.faults  # every fault was served, and survived
    assert sum(x.retries for x in results) == len(faults)
    assert Store.open(s2).resolve("c:1").root == Store.open(big).resolve("c:1").root
    assert_clean(s2)
