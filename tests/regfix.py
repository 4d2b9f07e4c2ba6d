"""Real-registry fixtures: distribution's ``docker-registry`` on loopback.

Use from a test module with ``from regfix import *`` (after putting
``tests/`` on ``sys.path``) or from a conftest with
``pytest_plugins = ["regfix"]``.

Fixtures (all kill their processes/threads at teardown):

* ``registry``        -> Registry: plain, anonymous push/pull (session scope)
* ``basic_registry``  -> Registry: htpasswd Basic auth, ``.username``/``.password``,
  relative Location URLs (session scope)
* ``token_registry``  -> Registry: Bearer token auth; ``.token_server`` is the
  TokenServer (users, knobs, request log); ``.username``/``.password`` (function scope)
* ``registry_factory`` -> ``make(auth="none"|"htpasswd"|"token", **config) -> Registry``
  for private/restartable registries (function scope)
* ``proxy_factory``   -> ``make(upstream_url, **modes) -> RegistryProxy`` (function scope)

``Registry.restart()`` / ``kill()`` / ``start()`` keep port and storage, for fault tests.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
TEST_USER, TEST_PASSWORD = "shoal", "s3cret-pass"

__all__ = [
    "Registry",
    "TokenServer",
    "RegistryProxy",
    "ThreadedServer",
    "free_port",
    "make_tls_cert",
    "registry",
    "basic_registry",
    "token_registry",
    "registry_factory",
    "proxy_factory",
    "TEST_USER",
    "TEST_PASSWORD",
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- generic threaded HTTP server ----------------------------------------------
Handler = Callable[[BaseHTTPRequestHandler, bytes], None]


class ThreadedServer:
    """A ThreadingHTTPServer in a daemon thread; ``handle(req, body)`` answers every method."""

    def __init__(self, handle: Handler, host: str = "127.0.0.1") -> None:
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with outer._count_lock:
                    outer.connections += 1

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.handle(self, body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.handle = handle
        self.connections = 0  # TCP connections accepted
        self._count_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, 0), _H)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(req: BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
    req.send_response(status)
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    has_len = False
    for k, v in items:
        if k.lower() == "content-length":
            has_len = True
        req.send_header(k, v)
    if not has_len:
        req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if req.command != "HEAD" and body:
        req.wfile.write(body)


# -- token server -------------------------------------------------------------
@dataclass
class TokenServer:
    """Issues distribution JWTs (RS256, libtrust ``kid``) for a token-auth registry."""

    workdir: Path
    service: str = "shoal-test-registry"
    issuer: str = "shoal-test-issuer"
    users: dict[str, str] = field(default_factory=lambda: {TEST_USER: TEST_PASSWORD})
    expires_in: int = 300
    token_field: str = "token"  # or "access_token"
    anonymous_pull: bool = False
    bad_tokens: int = 0  # issue this many already-expired tokens (claims expires_in anyway)
    log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test token signer")])
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))  # libtrust key id
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._handle)
        self.realm = f"{self._server.url}/token"

    def reset(self) -> None:
        with self._lock:
            self.expires_in, self.token_field, self.anonymous_pull, self.bad_tokens = 300, "token", False, 0
            self.log.clear()

    def close(self) -> None:
        self._server.close()

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def _handle(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        parts = urlsplit(req.path)
        if parts.path != "/token":
            return reply(req, 404)
        q = parse_qs(parts.query)
        account: str | None = None
        if req.command == "POST":
            form = parse_qs(body.decode())
            q = {**q, **form}
            refresh = (form.get("refresh_token") or [""])[0]
            if not refresh.startswith("refresh-") or refresh[8:] not in self.users:
                return reply(req, 401)
            account = refresh[8:]
        else:
            authz = req.headers.get("Authorization", "")
            if authz.startswith("Basic "):
                user, _, pw = base64.b64decode(authz[6:]).decode().partition(":")
                if self.users.get(user) != pw:
                    with self._lock:
                        self.log.append({"method": req.command, "account": user, "ok": False})
                    return reply(req, 401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
                account = user
        scopes = [s for v in q.get("scope", []) for s in v.split()]
        access = []
        for s in scopes:
            rtype, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            acts = actions.split(",") if account else [a for a in actions.split(",") if a == "pull"]
            if not account and not self.anonymous_pull:
                acts = []
            access.append({"type": rtype, "name": name, "actions": acts})
        now = int(time.time())
        with self._lock:
            bad = self.bad_tokens > 0
            if bad:
                self.bad_tokens -= 1
            self.log.append({"method": req.command, "account": account, "scopes": scopes, "ok": True, "bad": bad})
            expires_in, token_field = self.expires_in, self.token_field
        exp = now - 3600 if bad else now + max(expires_in, 1) + 60
        claims = {"iss": self.issuer, "sub": account or "", "aud": self.service, "exp": exp,
                  "nbf": now - 7200 if bad else now - 10, "iat": now - 7200 if bad else now,
                  "jti": uuid.uuid4().hex, "access": access}
        doc = {token_field: self.sign(claims), "expires_in": expires_in,
               "issued_at": _dt.datetime.now(_dt.UTC).isoformat()}
        reply(req, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})


def make_tls_cert(workdir: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1/localhost: (cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = _dt.datetime.now(_dt.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=30))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- the registry -------------------------------------------------------------
@dataclass
class Registry:
    """One ``docker-registry`` process; restartable on the same port and storage."""

    workdir: Path
    auth: str = "none"  # "none" | "htpasswd" | "token"
    relative_urls: bool = False
    tls: bool = False  # serve HTTPS with a self-signed cert; ``ca_bundle`` is its path
    tls_cert: tuple[Path, Path] | None = None  # serve HTTPS with this (cert, key) instead (implies tls)
    client_ca: Path | None = None  # require a client certificate issued by this CA (http.tls.clientcas)
    bind: str = "127.0.0.1"  # the address to listen on (and ``host``)
    port: int = 0
    username: str = TEST_USER
    password: str = TEST_PASSWORD
    token_server: TokenServer | None = None
    proc: subprocess.Popen[bytes] | None = None
    proxy_remote: str | None = None  # a pull-through cache (distribution's proxy mode) of this URL
    access_log: bool = False  # one line per request in ``log_path`` (``requests()`` reads them)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.bind)
        self.storage = self.workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.ca_bundle: Path | None = None
        self._tls_key: Path | None = None
        if self.tls_cert is not None:
            self.tls, (self.ca_bundle, self._tls_key) = True, self.tls_cert
        elif self.tls:
            self.ca_bundle, self._tls_key = make_tls_cert(self.workdir)
        self.config_path.write_text(self._config())

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> str:
        cfg = f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: {str(not self.access_log).lower()}
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.bind}:{self.port}
  secret: shoal-test-secret-{self.port}
  relativeurls: {str(self.relative_urls).lower()}
"""
        if self.tls:
            cfg += f"  tls:\n    certificate: {self.ca_bundle}\n    key: {self._tls_key}\n"
            if self.client_ca is not None:
                cfg += f"    clientcas:\n      - {self.client_ca}\n"
        if self.proxy_remote:
            cfg += f"proxy:\n  remoteurl: {self.proxy_remote}\n"
        if self.auth == "htpasswd":
            import bcrypt

            hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{self.username}:{hashed}\n")
            cfg += f"auth:\n  htpasswd:\n    realm: shoal-test\n    path: {htpasswd}\n"
        elif self.auth == "token":
            ts = self.token_server = self.token_server or TokenServer(self.workdir)
            ts.users[self.username] = self.password
            cfg += (f"auth:\n  token:\n    realm: {ts.realm}\n    service: {ts.service}\n"
                    f"    issuer: {ts.issuer}\n    rootcertbundle: {ts.cert_path}\n")
        elif self.auth != "none":
            raise ValueError(self.auth)
        return cfg

    def requests(self) -> list[str]:
        """``METHOD /path`` of each request in the access log (``access_log=True``), oldest first."""
        import re

        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [f"{m[1]} {m[2]}" for m in re.finditer(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/', text)]

    def start(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        logf = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config_path)],
                                         stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.client_ca is not None:  # no client certificate here: listening is enough
                    socket.create_connection((self.bind, self.port), timeout=1).close()
                    return
                conn = (http.client.HTTPSConnection(self.bind, self.port, timeout=1,
                                                    context=ssl._create_unverified_context())
                        if self.tls else http.client.HTTPConnection(self.bind, self.port, timeout=1))
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"docker-registry did not answer on {self.host}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def restart_later(self, delay: float) -> threading.Thread:
        """Kill now, start again after ``delay`` seconds in a thread (join it!)."""
        self.kill()

        def _later() -> None:
            time.sleep(delay)
            self.start()

        t = threading.Thread(target=_later, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.kill()
        if self.token_server is not None:
            self.token_server.close()


# -- a fault-injecting proxy ----------------------------------------------------
@dataclass
class RegistryProxy:
    """Forwards to ``upstream`` (``http://host:port``) with optional faults.

    * ``corrupt``: flip a byte of every blob/manifest GET body
    * ``ignore_range``: drop Range from blob GETs (upstream answers 200)
    * ``redirect_blobs``: answer blob GET/HEAD with 307 to a second server on
      127.0.0.2 (another host) that serves the blob; headers it saw are in
      ``redirect_log``; it authenticates upstream with ``blobstore_auth``
    * ``faults``: list of ``(method, path_substring, status)``; each matching
      request consumes the first matching entry and gets that status
      (with ``Retry-After: 0`` for 429/503)
    * ``trickle``: GETs whose path contains it get the upstream headers at once,
      then the body one byte every ``trickle_delay`` seconds (a slow loris)
    * ``stall``: requests whose path contains it are read and never answered
    * ``corrupt_uploads``: this many PUT/PATCH bodies get a byte flipped on the way
    * ``delay``: ``(path_substring, seconds)``: matching requests are answered that much later
    * ``timing``: ``(method, path, arrived, answered)`` of every forwarded request (``time.monotonic()``)
    """

    upstream: str
    corrupt: bool = False
    ignore_range: bool = False
    redirect_blobs: bool = False
    faults: list[tuple[str, str, int]] = field(default_factory=list)
    blobstore_auth: str | None = None  # Authorization the blob store itself uses upstream
    log: list[tuple[str, str, int]] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range) of every blob GET with one
    redirect_log: list[dict[str, str]] = field(default_factory=list)
    trickle: str | None = None
    trickle_delay: float = 0.25
    stall: str | None = None
    corrupt_uploads: int = 0
    delay: tuple[str, float] | None = None
    timing: list[tuple[str, str, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._closing = threading.Event()
        u = urlsplit(self.upstream)
        self._up = (u.hostname or "127.0.0.1", int(u.port or 80))
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._handle)
        self.host = f"127.0.0.1:{self._server.port}"
        self.url = self._server.url
        self._blobstore = ThreadedServer(self._serve_blobstore, host="127.0.0.2")

    @property
    def connections(self) -> int:
        """TCP connections the proxy accepted from clients."""
        return self._server.connections

    def close(self) -> None:
        self._closing.set()
        self._server.close()
        self._blobstore.close()

    def _slow(self, req: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        """Headers now, then the body a byte at a time (until the client gives up or we close)."""
        req.send_response(status)
        for k, v in headers:
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        try:
            req.wfile.flush()
            for i in range(len(data)):
                if self._closing.wait(self.trickle_delay):
                    break
                req.wfile.write(data[i:i + 1])
                req.wfile.flush()
        except OSError:
            pass
        req.close_connection = True

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._up, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            try:
                data = resp.read()
            except http.client.IncompleteRead as e:  # distribution's 416 lies about Content-Length
                data = e.partial
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        arrived = time.monotonic()
        try:
            self._handle_timed(req, body)
        finally:
            with self._lock:
                self.timing.append((req.command, req.path, arrived, time.monotonic()))

    def _handle_timed(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        path = req.path
        if self.delay is not None and self.delay[0] in path:
            self._closing.wait(self.delay[1])
        with self._lock:
            for i, (m, sub, status) in enumerate(self.faults):
                if m == req.command and sub in path:
                    del self.faults[i]
                    self.log.append((req.command, path, status))
                    extra = {"Retry-After": "0"} if status in (429, 503) else {}
                    return reply(req, status, b"", extra)
        if self.stall is not None and self.stall in path:
            with self._lock:
                self.log.append((req.command, path, 0))
            self._closing.wait(60)
            req.close_connection = True
            return None
        if self.corrupt_uploads and req.command in ("PUT", "PATCH") and body:
            with self._lock:
                self.corrupt_uploads -= 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        is_blob = "/blobs/sha256:" in path or "/blobs/sha512:" in path
        if self.redirect_blobs and is_blob and req.command in ("GET", "HEAD"):
            target = f"{self._blobstore.url}/store{path}?X-Sig=abc"
            with self._lock:
                self.log.append((req.command, path, 307))
            return reply(req, 307, b"", {"Location": target})
        headers: dict[str, str] = {}
        for k, v in req.headers.items():  # a repeated header (podman sends one Accept per type) is joined
            if k.lower() not in ("connection", "content-length"):
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if self.ignore_range and is_blob:
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        status, rheaders, data = self._forward(req.command, path, headers, body)
        with self._lock:
            self.log.append((req.command, path, status))
            rng = req.headers.get("Range")
            if is_blob and req.command == "GET" and rng:
                self.ranges.append((path, rng))
        if self.corrupt and req.command == "GET" and status in (200, 206) and data and (
                is_blob or "/manifests/" in path):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        out = [(k, v) for k, v in rheaders if k.lower() not in ("connection", "transfer-encoding", "content-length")]
        if self.ignore_range:
            out = [(k, v) for k, v in out if k.lower() != "accept-ranges"]
        if self.trickle is not None and self.trickle in path and req.command == "GET" and data:
            return self._slow(req, status, out, data)
        out.append(("Content-Length", dict((k.lower(), v) for k, v in rheaders).get("content-length", str(len(data)))
                    if req.command == "HEAD" else str(len(data))))
        reply(req, status, data, out)

    def _serve_blobstore(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            self.redirect_log.append({k.lower(): v for k, v in req.headers.items()})
        path = urlsplit(req.path).path
        if not path.startswith("/store/"):
            return reply(req, 404)
        headers = {k: v for k, v in req.headers.items() if k.lower() == "range"}
        if self.blobstore_auth:
            headers["Authorization"] = self.blobstore_auth
        status, rheaders, data = self._forward(req.command, path[len("/store"):], headers, b"")
        keep = ("content-type", "content-range", "accept-ranges", "docker-content-digest")
        out = [(k, v) for k, v in rheaders if k.lower() in keep]
        if req.command == "HEAD":
            out.append(("Content-Length", dict((k.lower(), v) for k, v in rheaders).get("content-length", "0")))
        reply(req, status, data, out)


# -- pytest fixtures ------------------------------------------------------------
def _need_registry() -> None:
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("docker-registry (distribution) is not installed")


def _running_registry(prefix: str, **kw: Any) -> Iterator[Registry]:
    """A started registry in a temporary storage directory, closed and removed afterwards."""
    _need_registry()
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        reg = Registry(Path(d), **kw)
        reg.start()
        try:
            yield reg
        finally:
            reg.close()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    yield from _running_registry("shoal-reg-")


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[Registry]:
    yield from _running_registry("shoal-reg-basic-", auth="htpasswd", relative_urls=True)


@pytest.fixture(scope="session")
def _token_registry_session() -> Iterator[Registry]:
    yield from _running_registry("shoal-reg-token-", auth="token")


@pytest.fixture()
def token_registry(_token_registry_session: Registry) -> Registry:
    """Session registry; its token server's knobs and log are reset for each test."""
    assert _token_registry_session.token_server is not None
    _token_registry_session.token_server.reset()
    return _token_registry_session


@pytest.fixture()
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    _need_registry()
    made: list[Registry] = []

    def make(auth: str = "none", **kw: Any) -> Registry:
        reg = Registry(tmp_path / f"reg{len(made)}", auth=auth, **kw)
        made.append(reg)
        reg.start()
        return reg

    yield make
    for reg in made:
        reg.close()


@pytest.fixture()
def proxy_factory() -> Iterator[Callable[..., RegistryProxy]]:
    made: list[RegistryProxy] = []

    def make(upstream: str, **kw: Any) -> RegistryProxy:
        p = RegistryProxy(upstream, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
