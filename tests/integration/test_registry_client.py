"""RegistryClient against a real distribution registry (docker-registry 2.8)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regfix import (
    TEST_PASSWORD,
    TEST_USER,
    Registry,
    RegistryProxy,
    ThreadedServer,
    _token_registry_session,  # noqa: F401
    basic_registry,
    proxy_factory,
    registry,
    registry_factory,
    reply,
    token_registry,
)
from shoal.errors import AuthError, FormatError, IntegrityError, NotFound, TransportError, UsageError
from shoal.transports.registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    Credentials,
    RegistryClient,
    erase_credentials,
    load_credentials,
    parse_www_authenticate,
    referrers_tag,
    store_credentials,
)

__all__ = ["basic_registry", "proxy_factory", "registry", "registry_factory", "token_registry"]

ProxyFactory = Callable[..., RegistryProxy]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def client(host: str, **kw: Any) -> RegistryClient:
    kw.setdefault("lookup_credentials", False)
    kw.setdefault("backoff", 0.05)
    return RegistryClient(host, **kw)


def artifact(c: RegistryClient, repo: str, *, subject: dict[str, Any] | None = None,
             artifact_type: str = "application/vnd.shoal.test.v1", seed: int = 1) -> tuple[bytes, str]:
    cfg = b'{"shoal":true}'
    layer = blob(1000, seed)
    c.put_blob(repo, sha(cfg), cfg, len(cfg))
    c.put_blob(repo, sha(layer), layer, len(layer))
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.shoal.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.shoal.chunk.v1", "digest": sha(layer), "size": len(layer)}],
        "annotations": {"seed": str(seed)},
    }
    if subject:
        doc["subject"] = subject
    data = json.dumps(doc, separators=(",", ":")).encode()
    return data, sha(data)


# -- parsing --------------------------------------------------------------------
def test_parse_www_authenticate() -> None:
    ch = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push repository:c:pull", Basic realm="x\\"y"'
    )
    assert [c.scheme for c in ch] == ["bearer", "basic"]
    assert ch[0].params["realm"] == "https://auth.example/token"
    assert ch[0].scopes == ("repository:a/b:pull,push", "repository:c:pull")
    assert ch[1].params["realm"] == 'x"y'
    assert referrers_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32


def test_scheme_selection(registry: Registry) -> None:
    for host in ("localhost:5000", "127.0.0.1", "[::1]:5000", "registry.example", "10.0.0.1:5000"):
        with RegistryClient(host, lookup_credentials=False) as c:
            assert c.base_url == f"https://{host}"  # a loopback host: until its first request finds out
    with RegistryClient(registry.host, lookup_credentials=False) as c:
        c.ping()
        assert c.base_url == f"http://{registry.host}"  # a plain-HTTP loopback registry
    with RegistryClient("registry.example", plain_http=True, lookup_credentials=False) as c:
        assert c.base_url == "http://registry.example"
    with RegistryClient("docker.io", lookup_credentials=False) as c:
        assert c.base_url == "https://registry-1.docker.io"


def test_a_client_learns_the_scheme_another_found_out(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount daemon's clients, made before its fork, speak to a loopback registry as the parent
    found out (``learn_scheme``; ``DockerSource.follow``): no second TLS probe on the mount's path."""
    from shoal.transports.registry import transport

    with client(registry.host) as first, client(registry.host) as second, client("127.0.0.2:5000") as other:
        second.learn_scheme(first)  # not found out yet: nothing to learn
        first.ping()
        probes: list[str] = []
        real = transport.speaks_tls
        monkeypatch.setattr(transport, "speaks_tls", lambda *a: probes.append(a[0]) or real(*a))
        second.learn_scheme(first)
        other.learn_scheme(first)  # another host: learns nothing
        second.ping()
        assert probes == [] and second.base_url == f"http://{registry.host}"
        assert other.base_url == "https://127.0.0.2:5000"


def test_tls_registry(registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory(tls=True)
    assert reg.ca_bundle is not None
    data = blob(1000, 30)
    with client(reg.host, plain_http=False, ca_bundle=str(reg.ca_bundle)) as c:
        assert c.put_blob("t/tls", sha(data), data, len(data)) == "uploaded"
        assert c.get_blob("t/tls", sha(data)) == data
    with client(reg.host, plain_http=False) as c:
        with pytest.raises(TransportError) as ei:
            c.ping()
        assert "TLS" in str(ei.value) and c.stats.retries == 0  # not retried
    with client(reg.host, plain_http=False, tls_verify=False) as c:
        c.ping()


# -- blobs ----------------------------------------------------------------------
def test_blob_small_roundtrip(registry: Registry) -> None:
    with client(registry.host) as c:
        c.ping()
        data = blob(5000, 11)
        d = sha(data)
        assert c.has_blob("t/small", d) is None
        assert c.put_blob("t/small", d, data, len(data)) == "uploaded"
        assert c.put_blob("t/small", d, data, len(data)) == "exists"
        assert c.has_blob("t/small", d) == len(data)
        assert c.get_blob("t/small", d) == data
        with c.open_blob_stream("t/small", d) as r:
            assert r.read(10) == data[:10] and r.read() == data[10:]
        with c.open_blob_stream("t/small", d) as r:
            v = r.read_verified()  # hashed once, as it streamed
            assert (v.data, v.digest, v.size) == (data, d, len(data))
        with c.open_blob_stream("t/small", d) as r, pytest.raises(ValueError):
            r.read(1)
            r.read_verified()  # only a blob read from its first byte
        assert c.stats.requests > 0 and c.stats.bytes_sent >= len(data) and c.stats.bytes_fetched >= 2 * len(data)
        with pytest.raises(NotFound):
            c.get_blob("t/small", sha(b"nope"))


def test_blob_stream_reads_of_any_size_give_the_blob(registry: Registry) -> None:
    data = blob(700_001, 21)  # several of the transport's chunks
    d = sha(data)
    with client(registry.host) as c:
        c.put_blob("t/reads", d, data, len(data))
        for sizes in ([1, 7, 65536, 0, 3, 1 << 20], [200_000, 1, 300_000], [1 << 20], [65536] * 3 + [-1]):
            got = bytearray()
            with c.open_blob_stream("t/reads", d) as r:
                for n in sizes:
                    part = r.read(n)
                    assert n < 0 or len(part) <= n
                    got += part
                while part := r.read(99_999):
                    got += part
            assert bytes(got) == data, sizes


def test_blob_large_chunked_from_file(registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url)
    data = blob(350_003, 12)
    d = sha(data)
    path = tmp_path / "big"
    path.write_bytes(b"HEADER" + data)
    with client(proxy.host, monolithic_max=64 * 1024, chunk_size=100_000) as c, open(path, "rb") as f:
        f.seek(6)
        assert c.put_blob("t/large", d, f, len(data)) == "uploaded"
        assert sum(1 for m, _, _ in proxy.log if m == "PATCH") == 4
        out = tmp_path / "out"
        assert c.get_blob_to_file("t/large", d, out) == len(data)
        assert out.read_bytes() == data
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    with client(registry.host, monolithic_max=1000, chunk_size=40_000) as c:  # from a path, other repo
        assert c.put_blob("t/large2", d, str(plain), len(data)) == "uploaded"
        assert c.get_blob("t/large2", d, size=len(data)) == data


def test_put_blob_source_mismatch(registry: Registry) -> None:
    data = blob(3000, 13)
    wrong = sha(b"something else")
    with client(registry.host, monolithic_max=1000, chunk_size=1000) as c:
        with pytest.raises(IntegrityError):
            c.put_blob("t/mismatch", wrong, data, len(data))  # chunked path
        with pytest.raises(IntegrityError):
            c.put_blob("t/mismatch", sha(data), data, len(data) + 5)
        assert c.has_blob("t/mismatch", wrong) is None
    with client(registry.host) as c, pytest.raises(IntegrityError):
        c.put_blob("t/mismatch", wrong, data, len(data))  # monolithic path


def test_cross_repo_mount(registry: Registry) -> None:
    data = blob(2000, 14)
    d = sha(data)
    with client(registry.host) as c:
        c.put_blob("t/mount-src", d, data, len(data))
        assert c.put_blob("t/mount-dst", d, data, len(data), mount_from="t/mount-src") == "mounted"
        assert c.has_blob("t/mount-dst", d) == len(data)
        other = blob(100, 15)  # source lacks it: 202 -> falls back to an upload
        assert c.put_blob("t/mount-dst", sha(other), other, len(other), mount_from="t/mount-src") == "uploaded"


# -- manifests --------------------------------------------------------------------
def test_manifest_lifecycle_and_tags(registry: Registry, proxy_factory: ProxyFactory) -> None:
    repo = "t/manifests"
    with client(registry.host) as c:
        data, d = artifact(c, repo)
        assert c.put_manifest(repo, "v1", data, OCI_MANIFEST) == d
        got, mt, gd = c.get_manifest(repo, "v1", [OCI_MANIFEST])
        assert (got, mt, gd) == (data, OCI_MANIFEST, d)
        assert c.get_manifest(repo, d, [])[0] == data
        info = c.head_manifest(repo, "v1")
        assert info is not None and (info.digest, info.size, info.media_type) == (d, len(data), OCI_MANIFEST)
        for t in ("v2", "v3", "a", "b"):
            c.put_manifest(repo, t, data, OCI_MANIFEST)
        # distribution 2.8 ignores ?n= on tags/list (no Link): one page, unsorted
        assert sorted(c.list_tags(repo, page_size=2)) == ["a", "b", "v1", "v2", "v3"]
        assert c.head_manifest(repo, "missing") is None
        with pytest.raises(NotFound):
            c.get_manifest(repo, "missing", [])
        with pytest.raises(NotFound):
            c.list_tags("t/no-such-repo")
        c.delete_manifest(repo, d)
        assert c.head_manifest(repo, d) is None
        with pytest.raises(FormatError):
            c.put_manifest(repo, "huge", b" " * (4 * 1024 * 1024 + 1), OCI_MANIFEST)
        with pytest.raises(UsageError):
            c.get_manifest("Bad/Repo", "v1", [])
        with pytest.raises(NotFound):  # layer blob unknown
            c.put_manifest(repo, "bad", json.dumps(_with_missing_layer(data)).encode(), OCI_MANIFEST)


def test_list_tags_pagination() -> None:
    tags = [f"t{i}" for i in range(7)]

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        q = dict(p.split("=") for p in req.path.partition("?")[2].split("&") if p)
        n, last = int(q.get("n", "100")), q.get("last")
        start = tags.index(last) + 1 if last else 0
        page = tags[start:start + n]
        headers = {"Content-Type": "application/json"}
        if start + n < len(tags):
            headers["Link"] = f'</v2/t/x/tags/list?n={n}&last={page[-1]}>; rel="next"'
        reply(req, 200, json.dumps({"name": "t/x", "tags": page}).encode(), headers)

    srv = ThreadedServer(handle)
    try:
        with client(f"127.0.0.1:{srv.port}") as c:
            assert c.list_tags("t/x", page_size=3) == tags
            assert c.stats.requests == 3
    finally:
        srv.close()


def _with_missing_layer(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    doc["layers"][0]["digest"] = sha(b"missing layer")
    return doc


def test_manifest_size_cap_on_get() -> None:
    big = b"{" + b" " * (4 * 1024 * 1024) + b"}"

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        reply(req, 200, big, {"Content-Type": OCI_MANIFEST})

    srv = ThreadedServer(handle)
    try:
        with client(f"127.0.0.1:{srv.port}") as c, pytest.raises(FormatError):
            c.get_manifest("t/x", "latest", [])
    finally:
        srv.close()


def test_referrers_fallback(registry: Registry) -> None:
    repo = "t/referrers"
    with client(registry.host) as c:
        subj, sd = artifact(c, repo, seed=2)
        c.put_manifest(repo, "subject", subj, OCI_MANIFEST)
        assert c.referrers(repo, sd) == []
        subject = {"mediaType": OCI_MANIFEST, "digest": sd, "size": len(subj)}
        sig, sigd = artifact(c, repo, subject=subject, artifact_type="application/vnd.shoal.sig", seed=3)
        c.put_manifest(repo, sigd, sig, OCI_MANIFEST)
        desc = {"mediaType": OCI_MANIFEST, "digest": sigd, "size": len(sig),
                "artifactType": "application/vnd.shoal.sig"}
        idx = c.put_referrer_tag_index(repo, sd, desc)
        assert c.put_referrer_tag_index(repo, sd, desc) == idx  # idempotent
        assert c.referrers(repo, sd) == [desc]
        assert c.referrers(repo, sd, artifact_type="application/vnd.shoal.sig") == [desc]
        assert c.referrers(repo, sd, artifact_type="other/type") == []
        assert c.get_manifest(repo, referrers_tag(sd), [OCI_INDEX])[1] == OCI_INDEX


# -- ranges -------------------------------------------------------------------------
RANGES = [(0, 10), (10, 5), (100, 50), (120, 10), (200_000, 1000), (5, 0), (299_990, 10), (50_000, 70_000)]


def _check_ranges(data: bytes, got: list[bytes]) -> None:
    assert got == [data[o:o + n] for o, n in RANGES]


def test_range_reads_206(registry: Registry, proxy_factory: ProxyFactory) -> None:
    data = blob(300_000, 16)
    d = sha(data)
    proxy = proxy_factory(registry.url)
    with client(registry.host) as c:
        c.put_blob("t/ranges", d, data, len(data))
    with client(proxy.host, range_merge_gap=1024, range_concurrency=4) as c:
        _check_ranges(data, c.get_blob_ranges("t/ranges", d, RANGES))
        gets = [s for m, p, s in proxy.log if m == "GET" and "/blobs/" in p]
        assert gets == [206] * 4  # [0,15)+[100,150) merged, 50k.., 200k.., 299990..
        with pytest.raises(UsageError):
            c.get_blob_ranges("t/ranges", d, [(len(data), 10)])
        assert c.get_blob_ranges("t/ranges", d, [(0, 0)]) == [b""]


def test_range_reads_keep_their_connection(registry: Registry, proxy_factory: ProxyFactory) -> None:
    """Range reads one after another go over one keep-alive connection: each answer is read to its end
    (a lazy mount's reads would otherwise each pay a new TCP and TLS handshake)."""
    data = blob(300_000, 19)
    d = sha(data)
    proxy = proxy_factory(registry.url)
    with client(registry.host) as c:
        c.put_blob("t/ranges", d, data, len(data))
    with client(proxy.host) as c:
        opened = 0
        for i in range(12):
            assert c.get_blob_ranges("t/ranges", d, [(i * 20_000, 7_000)]) == [data[i * 20_000:i * 20_000 + 7_000]]
            opened = opened or proxy.connections  # the scheme probe's and the first read's
    gets = [s for m, p, s in proxy.log if m == "GET" and "/blobs/" in p]
    assert gets == [206] * 12
    assert proxy.connections == opened <= 2


def test_range_reads_200_fallback(registry: Registry, proxy_factory: ProxyFactory) -> None:
    data = blob(300_000, 17)
    d = sha(data)
    proxy = proxy_factory(registry.url, ignore_range=True)
    with client(registry.host) as c:
        c.put_blob("t/ranges", d, data, len(data))
    with client(proxy.host, range_merge_gap=1024) as c:
        _check_ranges(data, c.get_blob_ranges("t/ranges", d, RANGES))
        _check_ranges(data, c.get_blob_ranges("t/ranges", d, RANGES))
        gets = [s for m, p, s in proxy.log if m == "GET" and "/blobs/" in p]
        assert set(gets) == {200}
        # each 200 is read only up to its span's end, then dropped: never the whole blob per range
        assert c.stats.bytes_fetched < 2 * len(RANGES) * 200_000


def test_range_200_reads_only_the_span(registry: Registry, proxy_factory: ProxyFactory) -> None:
    """A 200 to a Range request is streamed up to the span and dropped; unverified bytes are returned
    as sent (callers verify what they use: the lazy source checks every chunk)."""
    data = blob(4_000_000, 18)
    d = sha(data)
    with client(registry.host) as c:
        c.put_blob("t/ranges", d, data, len(data))
    proxy = proxy_factory(registry.url, ignore_range=True, corrupt=True)
    with client(proxy.host) as c:
        got = c.get_blob_ranges("t/ranges", d, [(0, 10)])
        assert got[0] == bytes([data[0] ^ 0xFF]) + data[1:10]
        assert c.stats.bytes_fetched < 300_000  # the first chunks only, not 4 MB


def test_redirect_keeps_range_and_drops_credentials(basic_registry: Registry, proxy_factory: ProxyFactory) -> None:
    creds = Credentials(basic_registry.username, basic_registry.password)
    data = blob(200_000, 19)
    d = sha(data)
    proxy = proxy_factory(basic_registry.url, redirect_blobs=True, blobstore_auth=creds.basic_header())
    with client(proxy.host, credentials=creds) as c:
        assert c.put_blob("t/redirect", d, data, len(data)) == "uploaded"
        assert c.has_blob("t/redirect", d) == len(data)
        assert c.get_blob("t/redirect", d) == data
        assert c.get_blob_ranges("t/redirect", d, [(10, 20), (150_000, 5)]) == [data[10:30], data[150_000:150_005]]
    assert proxy.redirect_log, "blob requests were not redirected"
    assert all("authorization" not in h for h in proxy.redirect_log)
    assert any(h.get("range") == "bytes=10-29" for h in proxy.redirect_log)
    assert any(m == "GET" and "/blobs/" in p and s == 307 for m, p, s in proxy.log)


# -- integrity --------------------------------------------------------------------
def test_digest_mismatch_detected(registry: Registry, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    repo = "t/corrupt"
    with client(registry.host) as c:
        data, d = artifact(c, repo, seed=4)
        c.put_manifest(repo, "v1", data, OCI_MANIFEST)
        layer = blob(1000, 4)
    proxy = proxy_factory(registry.url, corrupt=True)
    with client(proxy.host) as c:
        with pytest.raises(IntegrityError):
            c.get_blob(repo, sha(layer))
        with pytest.raises(IntegrityError):
            c.get_manifest(repo, d, [])
        with pytest.raises(IntegrityError):
            c.get_manifest(repo, "v1", [])  # Docker-Content-Digest disagrees
        with pytest.raises(IntegrityError):
            c.get_blob_to_file(repo, sha(layer), tmp_path / "layer")
        assert not list(tmp_path.iterdir())
        with pytest.raises(IntegrityError), c.open_blob_stream(repo, sha(layer)) as r:
            r.read_verified()  # no VerifiedBlob of bytes that do not match


def test_stream_resumes_after_dropped_connection() -> None:
    data = blob(100_000, 20)
    d = sha(data)
    seen: list[str] = []

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> None:
        rng = req.headers.get("Range")
        seen.append(rng or "")
        if not rng:  # first answer: promise everything, send half, hang up
            req.send_response(200)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data[:40_000])
            req.wfile.flush()
            req.close_connection = True
            return
        start = int(rng.split("=")[1].split("-")[0])
        reply(req, 206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})

    srv = ThreadedServer(handle)
    try:
        with client(f"127.0.0.1:{srv.port}") as c:
            assert c.get_blob("t/x", d) == data
        assert seen[0] == "" and seen[1].startswith("bytes=") and int(seen[1][6:].split("-")[0]) > 0
    finally:
        srv.close()


# -- faults and retries -------------------------------------------------------------
def test_retry_across_registry_restart(registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory()
    data = blob(4000, 21)
    d = sha(data)
    with client(reg.host, retries=6) as c:
        c.put_blob("t/restart", d, data, len(data))
        m, md = artifact(c, "t/restart", seed=5)
        c.put_manifest("t/restart", "v1", m, OCI_MANIFEST)
        t = reg.restart_later(0.3)
        assert c.get_blob("t/restart", d) == data  # waits out the outage
        t.join()
        assert c.stats.retries >= 1
        t = reg.restart_later(0.3)
        other = blob(5000, 22)
        assert c.put_blob("t/restart", sha(other), other, len(other)) == "uploaded"
        t.join()
        t = reg.restart_later(0.3)
        assert c.put_manifest("t/restart", "v2", m, OCI_MANIFEST) == md
        t.join()
        assert c.get_manifest("t/restart", "v2", [])[2] == md


def test_chunked_upload_restarts_when_registry_dies(registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory()
    data = blob(300_000, 23)
    d = sha(data)
    state = {"reads": 0, "thread": None}

    class Killing(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
            state["reads"] = int(state["reads"] or 0) + 1
            if state["reads"] == 2:  # between the first and second chunk
                state["thread"] = reg.restart_later(0.3)
            return super().read(n)

    with client(reg.host, monolithic_max=10_000, chunk_size=100_000) as c:
        assert c.put_blob("t/upload-restart", d, Killing(data), len(data)) == "uploaded"
        assert c.get_blob("t/upload-restart", d) == data
        assert c.stats.retries >= 1
    assert state["thread"] is not None
    state["thread"].join()  # type: ignore[attr-defined]


def test_retry_on_429_503_and_upload_5xx(registry: Registry, proxy_factory: ProxyFactory) -> None:
    data = blob(250_000, 24)
    d = sha(data)
    proxy = proxy_factory(registry.url, faults=[
        ("HEAD", "/blobs/", 503), ("HEAD", "/blobs/", 429), ("PATCH", "/blobs/uploads/", 500),
        ("GET", "/blobs/", 502),
    ])
    with client(proxy.host, monolithic_max=50_000, chunk_size=100_000) as c:
        assert c.put_blob("t/faults", d, data, len(data)) == "uploaded"
        assert c.get_blob("t/faults", d) == data
        assert not proxy.faults and c.stats.retries >= 4
    with client(proxy.host, retries=0) as c:
        proxy.faults.append(("GET", "/blobs/", 503))
        with pytest.raises(TransportError):
            c.get_blob("t/faults", d)


# -- auth ---------------------------------------------------------------------------
def test_basic_auth(basic_registry: Registry) -> None:
    host = basic_registry.host
    good = Credentials(basic_registry.username, basic_registry.password)
    data = blob(3000, 25)
    d = sha(data)
    with client(host, credentials=good) as c:
        c.ping()
        assert c.put_blob("t/basic", d, data, len(data)) == "uploaded"  # relative Location URLs
        assert c.get_blob("t/basic", d) == data
        big = blob(150_000, 26)
        c.monolithic_max, c.chunk_size = 10_000, 60_000
        assert c.put_blob("t/basic", sha(big), big, len(big)) == "uploaded"
    with client(host, credentials=Credentials(TEST_USER, "wrong-password-xyz")) as c:
        with pytest.raises(AuthError) as ei:
            c.get_blob("t/basic", d)
        msg = str(ei.value)
        assert host in msg and "wrong-password-xyz" not in msg and "\n" not in msg
    with client(host) as c, pytest.raises(AuthError):
        c.has_blob("t/basic", d)


def test_basic_auth_from_auth_file(basic_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate(monkeypatch, tmp_path)
    auth_file = tmp_path / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    store_credentials(basic_registry.host, basic_registry.username, basic_registry.password)
    with RegistryClient(basic_registry.host) as c:
        c.ping()
        assert c.has_blob("t/basic", sha(b"absent")) is None


def test_token_auth(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    creds = Credentials(token_registry.username, token_registry.password)
    data = blob(2000, 27)
    d = sha(data)
    with client(token_registry.host, credentials=creds) as c:
        c.ping()
        assert c.put_blob("t/token", d, data, len(data)) == "uploaded"
        assert c.get_blob("t/token", d) == data
        fetched = c.auth.token_fetches
        assert c.get_blob("t/token", d) == data and c.has_blob("t/token", d) == len(data)
        assert c.auth.token_fetches == fetched  # cached per scope
        m, md = artifact(c, "t/token", seed=6)
        c.put_manifest("t/token", "v1", m, OCI_MANIFEST)
        c.delete_manifest("t/token", md)
        assert c.put_blob("t/token-mounted", d, data, len(data), mount_from="t/token") == "mounted"
    scopes = {s for e in ts.log for s in e.get("scopes", [])}
    assert {"repository:t/token:pull,push", "repository:t/token:pull", "repository:t/token:delete",
            "repository:t/token-mounted:pull,push"} <= scopes
    assert all(e["account"] == TEST_USER for e in ts.log)


def test_token_auth_failures(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    d = sha(b"x")
    with client(token_registry.host, credentials=Credentials(TEST_USER, "bad-token-pw")) as c:
        with pytest.raises(AuthError) as ei:
            c.has_blob("t/token", d)
        assert token_registry.host in str(ei.value) and "bad-token-pw" not in str(ei.value)
    with client(token_registry.host) as c, pytest.raises(AuthError):
        c.has_blob("t/token", d)  # anonymous, no access granted
    ts.anonymous_pull = True
    with client(token_registry.host) as c:
        assert c.has_blob("t/token", d) is None
        with pytest.raises(AuthError):
            c.put_blob("t/token", d, b"x", 1)


def test_token_access_token_field_and_identity_token(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.token_field = "access_token"
    with client(token_registry.host, credentials=Credentials(TEST_USER, TEST_PASSWORD)) as c:
        assert c.has_blob("t/token", sha(b"y")) is None
    with client(token_registry.host, credentials=Credentials("", "", identity_token=f"refresh-{TEST_USER}")) as c:
        assert c.has_blob("t/token", sha(b"y")) is None
    assert ts.log[-1]["method"] == "POST"


def test_token_refresh_on_expiry_and_on_401(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.expires_in = 1
    with client(token_registry.host, credentials=Credentials(TEST_USER, TEST_PASSWORD)) as c:
        c.has_blob("t/token", sha(b"z"))
        c.has_blob("t/token", sha(b"z"))
        assert c.auth.token_fetches == 1
        time.sleep(1.0)
        c.has_blob("t/token", sha(b"z"))
        assert c.auth.token_fetches == 2  # expired locally: fetched before asking the registry
        ts.expires_in, ts.bad_tokens = 300, 1
        c.auth.invalidate()
        c.has_blob("t/token", sha(b"z"))  # gets a bad token, 401, refreshes once
        assert c.auth.token_fetches == 4
        assert [e["bad"] for e in ts.log[-2:]] == [True, False]


def test_anonymous_plain_and_concurrent_clients(registry: Registry) -> None:
    data = blob(64_000, 28)
    d = sha(data)
    with client(registry.host) as c:
        c.put_blob("t/conc", d, data, len(data))
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                assert c.get_blob_ranges("t/conc", d, [(i * 1000, 500) for i in range(0, 60, 7)]) == [
                    data[i * 1000:i * 1000 + 500] for i in range(0, 60, 7)]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


# -- credentials files --------------------------------------------------------------
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_credentials_file_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _isolate(monkeypatch, tmp_path)
    xdg = tmp_path / "run"
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert load_credentials("reg.example:5000") is None
    path = store_credentials("reg.example:5000", "alice", "pw:with:colons")
    assert path == xdg / "containers" / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credentials("reg.example:5000") == Credentials("alice", "pw:with:colons")
    assert "pw:with" not in repr(load_credentials("reg.example:5000"))
    assert erase_credentials("reg.example:5000") and load_credentials("reg.example:5000") is None
    assert not erase_credentials("reg.example:5000")
    # docker config.json, Docker Hub key, username/password form, namespaced keys
    docker = home / ".docker" / "config.json"
    store_credentials("docker.io", "bob", "hub-pw", path=docker)
    doc = json.loads(docker.read_text())
    assert list(doc["auths"]) == ["https://index.docker.io/v1/"]
    assert load_credentials("registry-1.docker.io") == Credentials("bob", "hub-pw")
    cfg = home / ".config" / "containers" / "auth.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"auths": {
        "quay.example": {"username": "u1", "password": "p1"},
        "quay.example/org": {"auth": base64.b64encode(b"u2:p2").decode()},
    }}))
    assert load_credentials("quay.example") == Credentials("u1", "p1")
    assert load_credentials("quay.example", repo="org/app") == Credentials("u2", "p2")
    assert load_credentials("https://quay.example/v2/") == Credentials("u1", "p1")
    cfg.write_text("{not json")
    with pytest.raises(FormatError):
        load_credentials("quay.example")


HELPER = """#!{python}
import json, os, sys
db = os.environ["SHOAL_TEST_HELPER_DB"]
data = json.load(open(db)) if os.path.exists(db) else {{}}
action = sys.argv[1]
payload = sys.stdin.read()
if action == "get":
    url = payload.strip()
    if url not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps({{"ServerURL": url, "Username": data[url][0], "Secret": data[url][1]}}))
elif action == "store":
    doc = json.loads(payload)
    data[doc["ServerURL"]] = [doc["Username"], doc["Secret"]]
    json.dump(data, open(db, "w"))
elif action == "erase":
    url = payload.strip()
    if url not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    del data[url]
    json.dump(data, open(db, "w"))
"""


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            basic_registry: Registry) -> None:
    home = _isolate(monkeypatch, tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text(HELPER.format(python=sys.executable))
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    db = tmp_path / "helper-db.json"
    monkeypatch.setenv("SHOAL_TEST_HELPER_DB", str(db))
    docker = home / ".docker" / "config.json"
    docker.parent.mkdir()
    host = basic_registry.host
    # credHelpers for one host
    docker.write_text(json.dumps({"credHelpers": {host: "test"}}))
    store_credentials(host, basic_registry.username, basic_registry.password, path=docker)
    assert json.loads(db.read_text()) == {host: [basic_registry.username, basic_registry.password]}
    assert basic_registry.password not in docker.read_text()
    assert load_credentials(host) == Credentials(basic_registry.username, basic_registry.password)
    with RegistryClient(host) as c:  # credentials looked up through the helper
        c.ping()
    assert erase_credentials(host, path=docker)
    assert load_credentials(host) is None
    # credsStore for everything
    docker.write_text(json.dumps({"credsStore": "test"}))
    store_credentials("other.example", "carol", "pw3", path=docker)
    assert json.loads(docker.read_text())["auths"] == {"other.example": {}}
    assert load_credentials("other.example") == Credentials("carol", "pw3")
    assert load_credentials("nothing.example") is None
