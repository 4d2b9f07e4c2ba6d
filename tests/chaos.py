"""Fault injection for the fault tests: a chaos proxy in front of a real registry, and stress counts.

``ChaosProxy(upstream, seed, rate)`` forwards HTTP to ``upstream`` (``http://host:port``, a real
``docker-registry``); each request meets, with probability ``rate``, one fault drawn from ``kinds``:

request direction (client -> registry)
  ``drop-req``    hang up on the client; nothing is forwarded
  ``reset-req``   abort the client connection with a TCP RST; nothing is forwarded
  ``stall-req``   wait 50-300 ms, then forward normally
  ``trunc-req``   send the registry only part of the request body, hang up on both sides
  ``flip-req``    flip one byte of the request body, forward it, relay the answer
response direction (registry -> client; the registry has done the work)
  ``drop-resp``   hang up on the client without an answer
  ``reset-resp``  abort the client connection with a TCP RST
  ``stall-resp``  wait 50-300 ms, then answer
  ``trunc-resp``  send the headers (full Content-Length) and part of the body, hang up
  ``flip-resp``   flip one byte of the response body

Decisions are reproducible: fault and its parameters come from ``(seed, method, path with upload
session ids masked, how many such requests came before)``, so thread interleaving changes little.
``log`` lists ``(method, path, kind)`` of every fault served.

``scaled(ci, stress)``: ``ci`` normally; ``stress * N`` with ``SHOAL_STRESS=N`` (``make stress``).
``chaos_seed()``: ``$SHOAL_CHAOS_SEED`` or a fresh random seed (print it; tests put it in failures).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ChaosProxy", "REQ_KINDS", "RESP_KINDS", "chaos_seed", "scaled", "stress_factor"]

REQ_KINDS = ("drop-req", "reset-req", "stall-req", "trunc-req", "flip-req")
RESP_KINDS = ("drop-resp", "reset-resp", "stall-resp", "trunc-resp", "flip-resp")
_UPLOAD_ID = re.compile(r"(/blobs/uploads/)[^/?]+")


def stress_factor() -> int:
    """0 in CI; N with ``SHOAL_STRESS=N``."""
    try:
        return max(0, int(os.environ.get("SHOAL_STRESS", "0") or 0))
    except ValueError:
        return 1


def scaled(ci: int, stress: int) -> int:
    n = stress_factor()
    return ci if n == 0 else stress * n


def chaos_seed() -> int:
    env = os.environ.get("SHOAL_CHAOS_SEED")
    return int(env) if env else secrets.randbelow(1 << 31)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: "ChaosProxy") -> None:
        self.proxy = proxy
        self.aborted: set[int] = set()  # ids of sockets to close with a RST
        super().__init__(("127.0.0.1", 0), _Handler)

    def shutdown_request(self, request: Any) -> None:
        if id(request) in self.aborted:
            self.aborted.discard(id(request))
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()  # no FIN first: the peer sees ECONNRESET
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.server.proxy._handle(self, body)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

    def hang_up(self, reset: bool) -> None:
        self.close_connection = True
        if reset:
            self.server.aborted.add(id(self.request))


@dataclass
class ChaosProxy:
    upstream: str
    seed: int
    rate: float = 0.1
    kinds: tuple[str, ...] = REQ_KINDS + RESP_KINDS
    stall: tuple[float, float] = (0.05, 0.3)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        u = urlsplit(self.upstream)
        self._up = (u.hostname or "127.0.0.1", int(u.port or 80))
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        self.enabled = True
        self._server = _Server(self)
        self.port = int(self._server.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, k in list(self.log):
            out[k] = out.get(k, 0) + 1
        return out

    # ------------------------------------------------------------------ decisions

    def _draw(self, method: str, path: str) -> random.Random:
        key = (method, _UPLOAD_ID.sub(r"\1*", path.split("?", 1)[0]))
        with self._lock:
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            self.requests += 1
        h = hashlib.sha256(f"{self.seed}|{key[0]}|{key[1]}|{n}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "big"))

    def _fault(self, rng: random.Random, method: str, body: bytes) -> str | None:
        if not self.enabled or rng.random() >= self.rate:
            return None
        kinds = [k for k in self.kinds if k not in ("trunc-req", "flip-req") or body]
        if method == "HEAD":
            kinds = [k for k in kinds if k not in ("trunc-resp", "flip-resp")]
        return rng.choice(kinds) if kinds else None

    # ------------------------------------------------------------------ forwarding

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self._up, timeout=60)

    def _handle(self, req: _Handler, body: bytes) -> None:
        rng = self._draw(req.command, req.path)
        kind = self._fault(rng, req.command, body)
        if kind is not None:
            with self._lock:
                self.log.append((req.command, req.path, kind))
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("connection", "content-length")}
        if kind in ("drop-req", "reset-req"):
            return req.hang_up(reset=kind == "reset-req")
        delay = rng.uniform(*self.stall)
        if kind == "stall-req":
            time.sleep(delay)
        if kind == "flip-req":
            i = rng.randrange(len(body))
            body = body[:i] + bytes([body[i] ^ (1 << rng.randrange(8))]) + body[i + 1:]
        if kind == "trunc-req":
            conn = self._conn()
            try:
                conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                conn.send(body[: rng.randrange(len(body))])
            except OSError:
                pass
            finally:
                conn.close()
            return req.hang_up(reset=False)
        try:
            status, rheaders, data = self._forward(req.command, req.path, headers, body)
        except OSError:  # the registry is down: as a gateway would
            return req.hang_up(reset=True)
        if kind in ("drop-resp", "reset-resp"):
            return req.hang_up(reset=kind == "reset-resp")
        if kind == "stall-resp":
            time.sleep(delay)
        if kind == "flip-resp" and data:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
        out = [(k, v) for k, v in rheaders if k.lower() not in ("connection", "transfer-encoding", "content-length")]
        length = (dict((k.lower(), v) for k, v in rheaders).get("content-length", "0") if req.command == "HEAD"
                  else str(len(data)))
        req.send_response(status)
        for k, v in out:
            req.send_header(k, v)
        req.send_header("Content-Length", length)
        req.end_headers()
        if req.command == "HEAD" or not data:
            return None
        if kind == "trunc-resp":
            req.wfile.write(data[: rng.randrange(len(data))])
            req.wfile.flush()
            return req.hang_up(reset=rng.random() < 0.5)
        req.wfile.write(data)
        return None

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = self._conn()
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            try:
                data = resp.read() if method != "HEAD" else b""
            except http.client.IncompleteRead as e:  # distribution's 416 lies about Content-Length
                data = e.partial
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------- images


def family_trees(root: Any, variants: int, seed: int = 11) -> list[Any]:
    """A base tree (~2.2 MB: 8 random 256 KB files, so 2-3 packs, and 40 small text files) and
    ``variants`` copies of it with a few files changed: they share most chunks and packs."""
    import shutil
    from pathlib import Path

    import helpers

    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"shoal", b"chunk", b"pack", b"frame", b"\n"]
    files = {f"lib/blob{i}.bin": rng.randbytes(256 * 1024) for i in range(8)}
    for i in range(40):
        files[f"etc/d{i // 10}/f{i:02d}.txt"] = b" ".join(rng.choice(words) for _ in range(rng.randint(100, 1500)))
    base = helpers.write_tree(Path(root) / "base", files)
    out = [base]
    for v in range(variants):
        t = Path(root) / f"v{v}"
        shutil.copytree(base, t, symlinks=True)
        (t / "lib" / f"blob{v % 8}.bin").write_bytes(rng.randbytes(256 * 1024))
        p = t / "etc" / f"d{(v * 7) // 10 % 4}" / f"f{(v * 7) % 40:02d}.txt"
        p.write_bytes(p.read_bytes() + b"\nvariant %d\n" % v)
        (t / f"new{v}.bin").write_bytes(rng.randbytes(rng.randrange(1000, 60_000)))
        helpers.fix_times(t, 1_600_000_000_000_000_000)
        out.append(t)
    return out
