"""Hostile and broken registries: slow loris, silent servers, oversized or lying answers, redirect loops,
refused connections and unresolvable names, transient failures that a retry fixes (and permanent ones it
does not).  Each ends in bounded time and memory with one clear line; nothing corrupt is stored."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_transfer import build_image, fresh_store, make_tree, shoal  # noqa: E402

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, ThreadedServer, free_port, proxy_factory, registry, reply  # noqa: E402,F401
from shoal.errors import AuthError, FormatError, IntegrityError, NotFound, TransportError  # noqa: E402
from shoal.transports.registry import RegistryClient  # noqa: E402
from shoal.transports.registry.deadline import Deadline  # noqa: E402

ProxyFactory = Callable[..., RegistryProxy]
MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def client(host: str, **kw: Any) -> RegistryClient:
    kw.setdefault("lookup_credentials", False)
    kw.setdefault("backoff", 0.05)
    return RegistryClient(host, **kw)


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``hostile/img:1`` (make_tree, ~3.5 MB) in the session registry; returns ``host/repo:tag`` minus host."""
    d = tmp_path_factory.mktemp("hostile")
    store = d / "store"
    build_image(store, make_tree(d / "tree"), "img:1")
    shoal(store, "push", "img:1", f"docker://{registry.host}/hostile/img:1")
    return "hostile/img:1"


@pytest.fixture()
def server() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler, bytes], None]], ThreadedServer]]:
    made: list[ThreadedServer] = []

    def make(handle: Callable[[BaseHTTPRequestHandler, bytes], None]) -> ThreadedServer:
        made.append(ThreadedServer(handle))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _stream(req: BaseHTTPRequestHandler, status: int, total: int, headers: dict[str, str] | None = None,
            length: bool = True) -> None:
    """Answer ``status`` and ``total`` bytes of zeros, written 1 MiB at a time (until the client leaves)."""
    req.send_response(status)
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    if length:
        req.send_header("Content-Length", str(total))
    else:
        req.send_header("Connection", "close")
    req.end_headers()
    piece = bytes(MiB)
    try:
        while total > 0:
            req.wfile.write(piece[:min(total, MiB)])
            total -= MiB
    except OSError:
        pass
    req.close_connection = True


# ------------------------------------------------------------------------------ time: slow and silent servers

@pytest.mark.parametrize("cmd,slow", [("inspect", "/manifests/"), ("cat", "/blobs/"), ("pull", "/blobs/")])
def test_slow_loris_fails_in_bounded_time(image: str, registry: Registry, proxy_factory: ProxyFactory,
                                          tmp_path: Path, cmd: str, slow: str) -> None:
    proxy = proxy_factory(registry.url, trickle=slow, trickle_delay=0.2)
    store = fresh_store(tmp_path)
    ref = f"docker://{proxy.host}/{image}"
    args = {"inspect": [ref], "cat": [ref, "etc/conf0/f000.txt"], "pull": [ref, "got:1"]}[cmd]
    t0 = time.monotonic()
    p = shoal(store, cmd, "--timeout", "1", *args, check=False)
    dt = time.monotonic() - t0
    line = helpers.assert_one_line_error(p, "too slow")
    assert p.returncode == 7, line
    assert dt < 20, f"{cmd} took {dt:.1f}s"  # ~2 attempts of ~1 s each, plus start-up on a busy machine
    if store.exists():
        shoal(store, "fsck")  # nothing half-written or unverified was kept


def test_silent_server_fails_in_bounded_time(image: str, registry: Registry, proxy_factory: ProxyFactory,
                                             tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url, stall="/manifests/")
    t0 = time.monotonic()
    p = shoal(fresh_store(tmp_path), "inspect", "--timeout", "1", f"docker://{proxy.host}/{image}", check=False)
    dt = time.monotonic() - t0
    helpers.assert_one_line_error(p, "stalled")
    assert p.returncode == 7 and dt < 20, dt
    assert sum(1 for m, path, _ in proxy.log if "/manifests/" in path) == 2  # one retry, no more


def test_deadline_grows_with_the_bytes_moved() -> None:
    d = Deadline(2.0, 1000.0)
    d.charge(1.5, 0)
    assert not d.expired
    d.charge(1.0, 0)
    assert d.expired  # 2.5 s for nothing
    d.charge(0.0, 10_000)
    assert not d.expired and d.remaining() == pytest.approx(9.5)  # an honest transfer earns its time


# ------------------------------------------------------------------------------ connection failures

def test_refused_and_unresolvable_fail_fast_with_the_cause(tmp_path: Path) -> None:
    port = free_port()
    for ref, words in ((f"docker://127.0.0.1:{port}/x/y:1", f"connection refused by 127.0.0.1:{port}"),
                       ("docker://registry.invalid/x/y:1", "cannot resolve registry.invalid")):
        t0 = time.monotonic()
        p = shoal(fresh_store(tmp_path), "inspect", ref, check=False)
        dt = time.monotonic() - t0
        line = helpers.assert_one_line_error(p, words)
        assert p.returncode == 7 and dt < 15, (line, dt)


# ------------------------------------------------------------------------------ memory: answers capped

def test_range_answered_200_reads_only_the_span_in_bounded_memory(server: Any) -> None:
    total = 160 * MiB
    srv = server(lambda req, body: _stream(req, 200, total))
    script = (
        "import resource, sys\n"
        "from shoal.transports.registry import RegistryClient\n"
        f"c = RegistryClient('127.0.0.1:{srv.port}', lookup_credentials=False, retries=0)\n"
        f"got = c.get_blob_ranges('x/y', 'sha256:' + 'a' * 64, [({total - 2 * MiB}, {MiB})])\n"
        "assert got == [bytes(1024 * 1024)], len(got[0])\n"
        # VmHWM is this process image's own peak: ru_maxrss would carry the (v)forking pytest worker's
        # peak across exec (Linux folds the old mm's high-water mark into it)
        "print(next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=True)
    assert int(p.stdout) < 120, f"peak RSS {int(p.stdout)} MB for a 1 MiB range of a 160 MiB answer"


def test_absurd_content_range_is_refused_unread(server: Any) -> None:
    srv = server(lambda req, body: _stream(req, 206, 64 * MiB, {"Content-Range": f"bytes 0-{64 * MiB - 1}/*"}))
    with client(srv.url.removeprefix("http://"), retries=1) as c:
        with pytest.raises(TransportError, match="Content-Range"):
            c.get_blob_ranges("x/y", "sha256:" + "a" * 64, [(0, 100)])
        assert c.stats.bytes_fetched < 256 * 1024 and c.stats.retries == 0


def test_error_bodies_are_capped(server: Any) -> None:
    srv = server(lambda req, body: _stream(req, 500, 100 * MiB))
    with client(srv.url.removeprefix("http://"), retries=0) as c:
        with pytest.raises(TransportError, match="HTTP 500"):
            c.get_manifest("x/y", "1")
        assert c.stats.bytes_fetched < 256 * 1024


@pytest.mark.parametrize("length", [True, False])
def test_manifest_over_4_mib_is_refused_while_streaming(server: Any, length: bool) -> None:
    srv = server(lambda req, body: _stream(req, 200, 5 * MiB, {"Content-Type": "application/json"}, length=length))
    with client(srv.url.removeprefix("http://"), retries=0) as c:
        with pytest.raises(FormatError, match="exceeds 4194304 bytes"):
            c.get_manifest("x/y", "1")
        assert c.stats.bytes_fetched <= 4 * MiB + 256 * 1024


def test_truncated_or_lying_manifests(server: Any) -> None:
    good, other = b'{"schemaVersion":2,"a":1}', b'{"schemaVersion":2,"a":2}'
    calls: list[str] = []

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        calls.append(req.path)
        if req.path.endswith("/short"):  # Content-Length 1000, 25 bytes, then the connection closes
            req.send_response(200)
            req.send_header("Content-Length", "1000")
            req.end_headers()
            req.wfile.write(good)
            req.close_connection = True
            return None
        # the tag moved between computing the digest header and sending the body; by digest, wrong bytes
        return reply(req, 200, other, {"Content-Type": "application/json", "Docker-Content-Digest": sha(good)})

    srv = server(handle)
    with client(srv.url.removeprefix("http://"), retries=2) as c:
        with pytest.raises(TransportError, match="lost"):
            c.get_manifest("x/y", "short")
        assert calls.count("/v2/x/y/manifests/short") == 3  # retried, then a clear error
        with pytest.raises(IntegrityError, match="Docker-Content-Digest"):
            c.get_manifest("x/y", "moved")
        with pytest.raises(IntegrityError, match="does not match its digest"):
            c.get_manifest("x/y", sha(good))


def test_redirect_loops_and_chains_end_clearly(server: Any) -> None:
    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        if "/loop" in req.path:
            return reply(req, 307, b"", {"Location": req.path.split("?")[0] + "?X-Sig=secret"})
        n = int(req.path.rsplit("chain", 1)[-1] or 0)
        return reply(req, 302, b"", {"Location": f"/v2/x/y/manifests/chain{n + 1}"})

    srv = server(handle)
    with client(srv.url.removeprefix("http://"), retries=0) as c:
        with pytest.raises(TransportError, match="redirect loop") as ei:
            c.get_manifest("x/y", "loop")
        assert "secret" not in str(ei.value)
        with pytest.raises(TransportError, match="more than 10 redirects"):
            c.get_manifest("x/y", "chain")


# ------------------------------------------------------------------------------ retries: what a retry fixes

def test_upload_damaged_in_transit_is_retried(registry: Registry, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(registry.url, corrupt_uploads=1)
    data = hashlib.sha256(b"transit").digest() * 4000
    with client(proxy.host) as c:
        assert c.put_blob("hostile/up", sha(data), data, len(data)) == "uploaded"
        assert c.get_blob("hostile/up", sha(data)) == data
        assert c.stats.retries == 1
    puts = [s for m, p, s in proxy.log if m == "PUT"]
    assert puts == [400, 201]  # DIGEST_INVALID, then the fresh upload


@pytest.mark.parametrize("status", [499, 502, 503, 504])
def test_transient_statuses_are_retried(image: str, registry: Registry, proxy_factory: ProxyFactory,
                                        status: int) -> None:
    proxy = proxy_factory(registry.url, faults=[("GET", "/manifests/", status), ("GET", "/manifests/", status)])
    repo, tag = image.split(":")
    with client(proxy.host) as c:
        assert c.get_manifest(repo, tag)[0]
        assert c.stats.retries == 2


@pytest.mark.parametrize("status,exc", [(401, AuthError), (403, AuthError), (404, NotFound), (400, TransportError)])
def test_permanent_statuses_are_not_retried(image: str, registry: Registry, proxy_factory: ProxyFactory,
                                            status: int, exc: type[Exception]) -> None:
    proxy = proxy_factory(registry.url, faults=[("GET", "/manifests/", status)] * 3)
    repo, tag = image.split(":")
    with client(proxy.host) as c, pytest.raises(exc):
        c.get_manifest(repo, tag)
    assert len([1 for m, p, s in proxy.log if "/manifests/" in p]) == 1


def test_verbose_logs_show_retries_but_no_presigned_queries(image: str, registry: Registry,
                                                            proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url, redirect_blobs=True, faults=[("GET", "/manifests/", 503)])
    store = fresh_store(tmp_path)
    p = shoal(store, "-vv", "pull", f"docker://{proxy.host}/{image}", "got:1")
    err = p.stderr.decode()
    assert "retry 1 of" in err and "HTTP 503" in err
    assert "127.0.0.2" in err  # the redirect target is logged...
    assert "X-Sig" not in err  # ...without its signature
    assert json.loads(shoal(store, "fsck", "--json").stdout)
