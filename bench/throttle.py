"""A rate-limiting, latency-adding HTTP reverse proxy for benchmarks (loopback only).

    python bench/throttle.py --upstream http://127.0.0.1:5000 --port 5100 --mbit 100 --latency-ms 20

Every request waits ``latency`` before it is forwarded; every response body is paced so the
*sum* over all connections never exceeds ``mbit`` (one shared token bucket, like a real link).
Headers (Range, Authorization, Location) pass through unchanged; redirects are not followed.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade"}


class Link:
    """A shared token bucket: ``rate`` bytes per second across all connections."""

    def __init__(self, mbit: float) -> None:
        self.rate = mbit * 1e6 / 8
        self.lock = threading.Lock()
        self.next_free = time.monotonic()
        self.bytes = 0
        self.requests = 0
        self.active = 0  # requests in flight
        self.last = time.perf_counter()  # when the last request ended (or a byte was sent)
        self.log: list[tuple[float, float, str, str, str, int]] | None = None  # set to a list to record
        # (start, end, method, path, Range, response bytes) per request, perf_counter() seconds

    def quiet_for(self) -> float:
        """Seconds since the link last carried anything (0 while a request is in flight)."""
        with self.lock:
            return 0.0 if self.active else time.perf_counter() - self.last

    def send(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            self.bytes += n
            self.last = time.perf_counter()
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


def make_handler(upstream: str, link: Link, latency: float) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes

        def log_message(self, *args: object) -> None:
            pass

        def _proxy(self) -> None:
            t0 = time.perf_counter()
            with link.lock:
                link.requests += 1
                link.active += 1
            sent = 0
            try:
                sent = self._forward()
            finally:
                with link.lock:
                    link.active -= 1
                    link.last = time.perf_counter()
                    if link.log is not None:
                        link.log.append((t0, link.last, self.command, self.path, self.headers.get("Range", ""), sent))

        def _forward(self) -> int:
            time.sleep(latency)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if body:
                link.send(len(body))
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
            headers: dict[str, str] = {}
            for k, v in self.headers.items():  # repeated lines (skopeo's Accept) joined, not dropped
                if k.lower() not in HOP and k.lower() != "host":
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
            headers["Host"] = f"{up.hostname}:{up.port}"
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # a HEAD answer keeps the upstream's length (containerd sizes manifests and blobs by it)
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                for i in range(0, len(data), 64 * 1024):
                    piece = data[i : i + 64 * 1024]
                    link.send(len(piece))
                    self.wfile.write(piece)
            conn.close()
            return len(data) if self.command != "HEAD" else 0

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    return Handler


class Throttle:
    """Run the proxy in a background thread: ``with Throttle(upstream, mbit, latency_ms) as t: t.url``."""

    def __init__(self, upstream: str, mbit: float = 100.0, latency_ms: float = 20.0, port: int = 0) -> None:
        self.link = Link(mbit)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(upstream, self.link, latency_ms / 1000))
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Throttle":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    a = ap.parse_args()
    with Throttle(a.upstream, a.mbit, a.latency_ms, a.port) as t:
        print(t.host, flush=True)
        try:
            t.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
