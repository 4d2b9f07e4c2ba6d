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
``chaos_rate(default)``: ``$SHOAL_CHAOS_RATE`` (the share of requests that meet a fault) or ``default``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

__all__ = ["ChaosProxy", "Forked", "Forker", "REQ_KINDS", "RESP_KINDS", "chaos_rate", "chaos_seed", "family_trees",
           "isolated_auth",
           "scaled", "stress_factor"]

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


def chaos_rate(default: float) -> float:
    env = os.environ.get("SHOAL_CHAOS_RATE")
    return float(env) if env else default


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


def family_trees(root: Path, variants: int, seed: int = 11) -> list[Path]:
    """A base tree (~2.5 MB: 8 random 300 KiB files, so 2 packs, and 40 small text files) and
    ``variants`` copies of it with a few files changed: they share most chunks and packs."""
    import shutil

    import helpers

    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"shoal", b"chunk", b"pack", b"frame", b"\n"]
    files = {f"lib/blob{i}.bin": rng.randbytes(300 * 1024) for i in range(8)}
    for i in range(40):
        files[f"etc/d{i // 10}/f{i:02d}.txt"] = b" ".join(rng.choice(words) for _ in range(rng.randint(100, 1500)))
    base = helpers.write_tree(Path(root) / "base", files)
    out = [base]
    for v in range(variants):
        t = Path(root) / f"v{v}"
        shutil.copytree(base, t, symlinks=True)
        (t / "lib" / f"blob{v % 8}.bin").write_bytes(rng.randbytes(300 * 1024))
        p = t / "etc" / f"d{(v * 7) // 10 % 4}" / f"f{(v * 7) % 40:02d}.txt"
        p.write_bytes(p.read_bytes() + b"\nvariant %d\n" % v)
        (t / f"new{v}.bin").write_bytes(rng.randbytes(rng.randrange(1000, 60_000)))
        helpers.fix_times(t, 1_600_000_000_000_000_000)
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------- kill targets

_ZYGOTE = r"""
import json, os, sys
import shoal.cli
for _m in ("shoal.build", "shoal.convert", "shoal.copier", "shoal.pull", "shoal.transports.docker",
           "shoal.transports.local", "shoal.transports.oci_layout", "shoal.store.maintenance", "shoal.unpack"):
    __import__(_m)
for line in sys.stdin:
    errfile, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(errfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            try:
                shoal.cli.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(f"{os.waitstatus_to_exitcode(status)}\n")
    sys.stdout.flush()
"""


class Forker:
    """A pre-imported ``shoal`` that forks one child per command: a real process running the real CLI
    (``shoal.cli.main``) that can be SIGKILLed, minus the interpreter start-up of each run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        env = dict(os.environ)
        env.pop("SHOAL_STORE", None)
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.n = 0

    def start(self, argv: list[str]) -> "Forked":
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        err = self.workdir / f"forked-{self.n}.err"
        self.proc.stdin.write((json.dumps([str(err), argv]) + "\n").encode())
        self.proc.stdin.flush()
        return Forked(self, int(self.proc.stdout.readline()), err)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


class Forked:
    """One forked ``shoal`` run: ``poll()``, ``kill()``, ``wait() -> (exit code, stderr)`` like Popen."""

    def __init__(self, forker: Forker, pid: int, err: Path) -> None:
        self.forker, self.pid, self.err = forker, pid, err
        self.fd = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.fd], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)

    def wait(self) -> tuple[int, bytes]:
        if self.returncode is None:
            assert self.forker.proc.stdout is not None
            self.returncode = int(self.forker.proc.stdout.readline())
            os.close(self.fd)
        return self.returncode, self.err.read_bytes() if self.err.exists() else b""



@pytest.fixture(autouse=True)
def isolated_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials from this machine's files (import it into a test module to apply it there)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for v in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(v, raising=False)
