"""Registry TLS as containers/image (skopeo, podman) sets it up: one ``ssl.SSLContext`` per (host, options).

* **Roots**: the system trust store, i.e. OpenSSL's default paths (``ssl.SSLContext.load_default_certs``):
  on Debian ``/etc/ssl/certs/ca-certificates.crt`` and the hashed ``/etc/ssl/certs``, which
  ``update-ca-certificates`` maintains; ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` replace them exactly as
  they do for OpenSSL itself.  (httpx's own default is certifi's bundle, which ignores the system
  store.)  The ``truststore`` package was considered and not used: on Linux it reads the same OpenSSL
  default paths, so it would add a dependency and no trust; Shoal targets Linux only.
* **Extra CAs**, *added* to the roots: ``ca_bundle`` (``--ca-bundle``, a PEM file) and the ``*.crt``
  files of the host's certificate directory: ``cert_dir`` (``--cert-dir``) if given, else the first of
  ``~/.config/containers/certs.d/HOST[:PORT]``, ``/etc/containers/certs.d/HOST[:PORT]`` and
  ``/etc/docker/certs.d/HOST[:PORT]`` that exists (containers/image's order and rule: one directory).
* **Client certificate** (mTLS): a ``NAME.cert`` with its ``NAME.key`` in that directory.  A ``.cert``
  without its ``.key``, or a ``.key`` without its ``.cert``, is refused as containers/image refuses it.
  OpenSSL holds one client certificate per context: with several pairs, the first by name is used.

The extras are read and checked when the context is made (a bad file is one ``UsageError`` naming it,
before any request); CA certificates are loaded from memory (``cadata``), client pairs from their own
files, so nothing is written to a temporary file.  The system roots, which cost ~50 ms to load, are
loaded on the first ``get()``: a client that never speaks https never pays for them.  Contexts are
cached per (host, options) for the life of the process; ``verify=False`` keeps the client certificate
and skips every CA (nothing is verified).

``speaks_tls`` is the probe that tells a TLS server from a plain-HTTP one (transport.Endpoint).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import UsageError, short

from .responses import one_line

__all__ = ["TLSOptions", "TLSContext", "tls_context", "host_cert_dir", "speaks_tls", "CERTS_D"]

log = logging.getLogger(__name__)

CERTS_D = ("~/.config/containers/certs.d", "/etc/containers/certs.d", "/etc/docker/certs.d")


@dataclass(frozen=True)
class TLSOptions:
    """What a user said about TLS for one registry (``--tls-verify``, ``--ca-bundle``, ``--cert-dir``)."""

    verify: bool = True
    ca_bundle: str | None = None
    cert_dir: str | None = None  # instead of the certs.d directories


@dataclass(frozen=True)
class _Extras:
    cas: tuple[tuple[str, str], ...]  # (file, PEM text)
    client: tuple[str, str] | None  # (cert file, key file)


def host_cert_dir(host: str, cert_dir: str | None = None,
                  bases: tuple[str, ...] = CERTS_D) -> Path | None:
    """The certificate directory of ``host`` (``HOST[:PORT]`` as the user wrote it): ``cert_dir`` (which
    must exist), else the first existing ``BASE/HOST`` of ``bases``, else ``None``."""
    if cert_dir is not None:
        d = Path(cert_dir)
        if not d.is_dir():
            raise UsageError(f"certificate directory {short(cert_dir)} does not exist")
        return d
    for base in bases:
        d = Path(os.path.expanduser(base)) / host
        try:
            if d.is_dir():
                return d
        except OSError:  # unreadable parent: as containers/image, look further
            continue
    return None


def _read_pem(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {what} {short(str(path))}: {e.strerror or e}") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {short(str(path))} is not a PEM file") from None
    _check_cas(text, path, what)
    return text


def _check_cas(text: str, path: Path, what: str) -> None:
    """Load ``text`` into a bare context: one clear error for a file that holds no usable certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        reason = one_line(str(getattr(e, "reason", None) or e), 80)
        raise UsageError(f"{what} {short(str(path))} holds no valid PEM certificate ({reason})") from None


def _read_cert_dir(d: Path) -> _Extras:
    """The ``*.crt`` CAs and the first ``*.cert``/``*.key`` pair of a certificate directory."""
    try:
        names = sorted(e.name for e in os.scandir(d) if e.is_file())
    except PermissionError:  # containers/image skips an unreadable directory
        log.info("skipping certificate directory %s: permission denied", d)
        return _Extras((), None)
    except OSError as e:
        raise UsageError(f"cannot read certificate directory {short(str(d))}: {e.strerror or e}") from None
    present = set(names)
    cas: list[tuple[str, str]] = []
    pairs: list[tuple[str, str]] = []
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if not dot:
            continue
        if ext == "crt":
            cas.append((str(d / name), _read_pem(d / name, "CA certificate")))
        elif ext == "cert":
            if f"{stem}.key" not in present:
                raise UsageError(f"missing key {stem}.key for client certificate {short(str(d / name))} "
                                 "(CA certificates are named *.crt)")
            pairs.append((str(d / name), str(d / f"{stem}.key")))
        elif ext == "key" and f"{stem}.cert" not in present:
            raise UsageError(f"missing client certificate {stem}.cert for key {short(str(d / name))}")
    if len(pairs) > 1:
        log.info("%s: several client certificates; using %s", d, pairs[0][0])
    return _Extras(tuple(cas), pairs[0] if pairs else None)


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


class TLSContext:
    """One ``ssl.SSLContext``: the extras loaded at once, the system roots on the first ``get()``."""

    def __init__(self, host: str, opts: TLSOptions) -> None:
        self.host, self.opts = host, opts
        d = host_cert_dir(host, opts.cert_dir)
        extras = _read_cert_dir(d) if d is not None else _Extras((), None)
        if opts.ca_bundle is not None:
            bundle = Path(opts.ca_bundle)
            if not bundle.is_file():
                raise UsageError(f"CA bundle {short(opts.ca_bundle)} does not exist")
            extras = _Extras(((str(bundle), _read_pem(bundle, "CA bundle")), *extras.cas), extras.client)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if opts.verify:
            for _, pem in extras.cas:
                ctx.load_verify_locations(cadata=pem)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if extras.client is not None:
            cert, key = extras.client
            try:
                ctx.load_cert_chain(cert, key, password=_no_password)
            except (ssl.SSLError, OSError) as e:
                reason = one_line(str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e), 80)
                raise UsageError(f"cannot load client certificate {short(cert)} with key {short(key)} "
                                 f"({reason}; an encrypted key is not supported)") from None
        self.cert_dir, self.extra_cas, self.client_cert = d, tuple(f for f, _ in extras.cas), extras.client
        self._ctx = ctx
        self._roots = not opts.verify  # nothing to load when nothing is verified
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        """The context, with the system roots loaded (once)."""
        with self._lock:
            if not self._roots:
                self._ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
                self._roots = True
            return self._ctx


_CACHE: dict[tuple[str, TLSOptions], TLSContext] = {}
_CACHE_LOCK = threading.Lock()


def tls_context(host: str, opts: TLSOptions) -> TLSContext:
    """The one :class:`TLSContext` of ``host`` with ``opts`` in this process (UsageError for bad files)."""
    key = (host, opts)
    with _CACHE_LOCK:
        ctx = _CACHE.get(key)
        if ctx is None:
            ctx = _CACHE[key] = TLSContext(host, opts)
        return ctx


def speaks_tls(hostname: str, port: int, timeout: float) -> bool:
    """Whether the server at ``hostname:port`` answers a TLS ClientHello with a TLS record.

    The hello is sent and the sending side shut, and only the first bytes of the answer are read (no
    verification, nothing kept): a TLS server answers with a handshake or alert record; a plain-HTTP
    server with ``HTTP/`` (Go), an HTTP/0.9 error page (Python), or nothing.  Each of those, and no answer
    within ``timeout``, is ``False``.  Connecting may raise ``OSError`` (refused, unreachable).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sni = None if hostname.replace(".", "").isdigit() or ":" in hostname else hostname
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    with socket.create_connection((hostname, port), timeout=timeout) as s:
        try:
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            head = b""
            while len(head) < 3:
                got = s.recv(3 - len(head))
                if not got:
                    break
                head += got
        except OSError:  # reset or timed out after connecting: whatever it is, it is not TLS
            return False
        _drain(s)
    return len(head) == 3 and head[0] in (0x15, 0x16) and head[1] == 0x03


def _drain(s: socket.socket, limit: int = 256 * 1024, wait: float = 0.25) -> None:
    """Read what the server still sends until it closes (briefly, boundedly), so that closing does not
    reset a connection the server is still answering on."""
    s.settimeout(wait)
    try:
        while limit > 0:
            got = s.recv(min(limit, 65536))
            if not got:
                return
            limit -= len(got)
    except OSError:
        return
