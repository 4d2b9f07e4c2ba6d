"""The HTTP transports of a registry client: TLS set up on first use, never for plain HTTP.

Loading the CA certificates costs ~100 ms per client (httpx builds its SSL context when the client is
made), which a lazy mount or a loopback registry pays for nothing. ``http_client`` therefore mounts a
plain transport for ``http://`` and a ``LazyTLSTransport`` for ``https://`` that builds the verifying
context on its first request (e.g. a plain-HTTP registry that redirects blob reads to an HTTPS CDN).
When the environment names a proxy, the client is httpx's default one, which routes through it.
Both mounted transports run their sockets through ``DeadlineBackend`` (deadline.py), which bounds
every request's total network time; through a proxy only httpx's per-operation timeouts apply.
"""

from __future__ import annotations

import os
import ssl
import threading

import httpcore
import httpx

from .deadline import DeadlineBackend

__all__ = ["LazyTLSTransport", "http_client"]

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class LazyTLSTransport(httpx.BaseTransport):
    """An ``httpx.HTTPTransport`` for https, created with its SSL context on the first request."""

    def __init__(self, verify: bool | ssl.SSLContext, limits: httpx.Limits) -> None:
        self._verify, self._limits = verify, limits
        self._transport: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def _get(self) -> httpx.HTTPTransport:
        with self._lock:
            if self._transport is None:
                self._transport = bounded_transport(self._verify, self._limits)
            return self._transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._get().handle_request(request)

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()


def bounded_transport(verify: bool | ssl.SSLContext, limits: httpx.Limits) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` whose connection pool uses ``DeadlineBackend`` (httpx 0.28 has no
    parameter for a network backend, so its pool is replaced by an equal one that has it)."""
    ctx = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
    transport = httpx.HTTPTransport(verify=ctx, limits=limits)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ctx, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=DeadlineBackend(),
    )
    return transport


def http_client(*, tls_verify: bool, ca_bundle: str | None, timeout: float, max_connections: int,
                headers: dict[str, str]) -> httpx.Client:
    """An httpx client with one pool per scheme; only an https request ever loads certificates."""
    verify: bool | ssl.SSLContext = tls_verify
    if ca_bundle and tls_verify:  # an explicit bundle is loaded at once, so a bad one fails here, clearly
        verify = ssl.create_default_context(cafile=ca_bundle)
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    if any(os.environ.get(k) for k in _PROXY_VARS):  # httpx's own routing through the proxies named there
        return httpx.Client(verify=verify, limits=limits, timeout=httpx.Timeout(timeout), follow_redirects=False,
                            headers=headers)
    return httpx.Client(
        verify=False,  # the default transport is never used: both schemes are mounted below
        mounts={"http://": bounded_transport(False, limits),
                "https://": LazyTLSTransport(verify, limits)},
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers=headers,
    )
