"""The HTTP transports of a registry client, and which scheme its registry speaks (``Endpoint``).

Loading the system's CA certificates costs ~50 ms per context, which a lazy mount or a plain-HTTP
loopback registry pays for nothing. ``http_client`` therefore mounts a plain transport for ``http://``
and a ``LazyTLSTransport`` for ``https://`` that takes its context (tls.py: system roots plus the extra
CAs and client certificate) on its first request (e.g. a plain-HTTP registry that redirects blob reads
to an HTTPS CDN).
When the environment names a proxy, the client is httpx's default one, which routes through it.
Both mounted transports run their sockets through ``DeadlineBackend`` (deadline.py), which bounds
every request's total network time; through a proxy only httpx's per-operation timeouts apply.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpcore
import httpx

from shoal.errors import TransportError

from .deadline import DeadlineBackend
from .tls import TLSContext, speaks_tls

__all__ = ["Endpoint", "LazyTLSTransport", "http_client", "is_loopback"]

log = logging.getLogger(__name__)

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_PROBE_TIMEOUT = 5.0  # at most, for a server to answer a ClientHello


def is_loopback(hostname: str) -> bool:
    return hostname in ("localhost", "::1") or hostname.startswith("127.")


class Endpoint:
    """The scheme of one registry host (``HOST[:PORT]``), fixed or found out once, on first use.

    * ``plain_http`` True: http; False: https.
    * Otherwise https, except that a loopback host (127.0.0.0/8, localhost, ::1) and, with
      ``tls_verify=False``, any host is probed (``speaks_tls``) on the first request: a server that
      does not answer TLS is spoken to in plain HTTP from then on (docker/containerd treat localhost
      so; containers/image falls back so for an insecure registry).  A probe that cannot connect
      decides nothing: that request goes to http for a loopback host, or to port 80 for an insecure
      host without a port (as containerd), else to https, and the next request probes again.
    """

    def __init__(self, host: str, *, plain_http: bool | None, tls_verify: bool, timeout: float) -> None:
        p = urlsplit(f"//{host}")
        self.host, self.hostname, self.port = host, p.hostname or "", p.port
        self.loopback = is_loopback(self.hostname)
        self._probe = plain_http is None and (self.loopback or not tls_verify)
        self._scheme = "http" if plain_http else "https"
        self._timeout = min(timeout, _PROBE_TIMEOUT)
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """``scheme://host`` as last chosen (no probe)."""
        return f"{self._scheme}://{self.host}"

    @property
    def plain_http(self) -> bool:
        return self._scheme == "http"

    def resolve(self) -> str:
        """``base_url``, after the probe if the scheme is not known yet."""
        with self._lock:
            if self._probe:
                try:
                    tls = speaks_tls(self.hostname, self.port or 443, self._timeout)
                except OSError as e:
                    self._scheme = "http" if self.loopback or self.port is None else "https"
                    log.debug("%s: no TLS probe (%s); trying %s", self.host, e, self._scheme)
                else:
                    self._probe = False
                    self._scheme = "https" if tls else "http"
                    log.debug("%s speaks %s", self.host, self._scheme)
            return self.base_url

    def adopt(self, other: "Endpoint") -> None:
        """Take the scheme ``other`` (the same host, of another client of this process) found out, so
        that this one does not probe again (a mount daemon's clients, made before its fork)."""
        if (other.host, other._probe) != (self.host, False) or other is self:
            return
        with self._lock:
            if self._probe:
                self._scheme, self._probe = other._scheme, False

    def explain(self, err: TransportError, url: str) -> TransportError:
        """``err``, or a clearer one when a TLS handshake with this registry failed because it speaks
        plain HTTP (which is allowed only with ``tls_verify=False`` or ``plain_http``)."""
        p = urlsplit(url)
        if (not str(err).startswith("TLS handshake") or p.scheme != "https" or self._probe
                or (p.hostname or "").lower() != self.hostname.lower() or p.port != self.port):
            return err
        try:
            plain = not speaks_tls(self.hostname, self.port or 443, self._timeout)
        except OSError:
            return err
        if not plain:
            return err
        return TransportError(f"{self.host} speaks plain HTTP, not HTTPS; it is used only when marked "
                              "insecure (--tls-verify=false or --plain-http)")


class LazyTLSTransport(httpx.BaseTransport):
    """An ``httpx.HTTPTransport`` for https, created with its SSL context on the first request."""

    def __init__(self, context: Callable[[], ssl.SSLContext], limits: httpx.Limits) -> None:
        self._context, self._limits = context, limits
        self._transport: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def _get(self) -> httpx.HTTPTransport:
        with self._lock:
            if self._transport is None:
                self._transport = bounded_transport(self._context(), self._limits)
            return self._transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._get().handle_request(request)

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()


def bounded_transport(ctx: ssl.SSLContext | None, limits: httpx.Limits) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` whose connection pool uses ``DeadlineBackend`` (httpx 0.28 has no
    parameter for a network backend, so its pool is replaced by an equal one that has it).  ``ctx``
    is None for plain http (no context is made)."""
    transport = httpx.HTTPTransport(verify=ctx if ctx is not None else False, limits=limits)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ctx, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=DeadlineBackend(),
    )
    return transport


def warm_up() -> None:
    """Do, once, in a process that forks for each command (``shoal service``, the snapshotter's fork
    server), what the first registry client of a process pays for: OpenSSL's one-time set-up (its
    configuration and providers, loaded by the first ``SSLContext``) and httpx's first client.  A child
    then makes its first client in ~1 ms instead of ~4 ms, on the path to its first request."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    httpx.Client(verify=False).close()


def http_client(*, tls: TLSContext, timeout: float, max_connections: int, headers: dict[str, str]) -> httpx.Client:
    """An httpx client with one pool per scheme; only an https request loads the system's certificates."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    if any(os.environ.get(k) for k in _PROXY_VARS):  # httpx's own routing through the proxies named there
        return httpx.Client(verify=tls.get(), limits=limits, timeout=httpx.Timeout(timeout),
                            follow_redirects=False, headers=headers)
    return httpx.Client(
        verify=False,  # the default transport is never used: both schemes are mounted below
        mounts={"http://": bounded_transport(None, limits),
                "https://": LazyTLSTransport(tls.get, limits)},
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers=headers,
    )
