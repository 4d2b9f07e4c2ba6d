"""Reading a registry's answers and failures: the one map from httpx exceptions to Shoal errors
(``failure``), the one map from error answers to Shoal errors (``answer_error``), which failures are
worth retrying (``Transient``, its retry cap, and ``Attempts``, a budget shared by the calls of one
operation), Retry-After, TLS failure reasons, one-line error text, and URLs fit for a log line
(``redact``)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

from shoal.errors import AuthError, FormatError, IntegrityError, NotFound, ShoalError, TransportError
from shoal.format.manifest import json_loads

from .deadline import Deadline

__all__ = ["Transient", "BodyLost", "Attempts", "failure", "answer_error", "redact", "tls_failure", "one_line",
           "retry_after", "RETRY_STATUSES", "MAX_ERROR_BODY"]

RETRY_STATUSES = frozenset({408, 429, 499, 500, 502, 503, 504})
MAX_ERROR_BODY = 64 * 1024  # an error answer is read this far, for its message


class Transient(TransportError):
    """A failure worth retrying: at most ``retries`` times (``None``: the client's ``retries``), after
    ``after`` seconds when the server said so (Retry-After)."""

    def __init__(self, message: str, *, retries: int | None = None, after: float | None = None) -> None:
        super().__init__(message)
        self.retries, self.after = retries, after


class BodyLost(Transient):
    """The connection dropped (or stalled) while a response body was being read."""


@dataclass
class Attempts:
    """The retries one operation has used, when several calls retry as one (a blob read resumed after
    each dropped connection shares one budget for its whole body)."""

    used: int = 0


def redact(url: str) -> str:
    """``scheme://host/path`` of ``url``: no query (presigned URLs carry signatures), no userinfo."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc.rpartition('@')[2]}{p.path}"  # no fragment either; [v6] keeps brackets


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def failure(exc: httpx.TransportError, what: str, url: str, deadline: Deadline | None,
            *, body: bool = False) -> TransportError:
    """The Shoal error for an httpx failure of request ``what`` to ``url`` (one line, no query string).

    TLS failures and unresolvable names are final; a refused connection is retried 3 times, 0.4 s
    apart (a registry restarting), a timeout or an exceeded deadline once, a lost connection as often
    as the client retries anything.
    """
    p = urlsplit(url)
    host, port = p.hostname or "?", p.port or (443 if p.scheme == "https" else 80)
    reason = tls_failure(exc)
    if reason:
        return TransportError(f"TLS handshake with {host}:{port} failed: {reason}")
    lost = BodyLost if body else Transient
    timeout = isinstance(exc, httpx.TimeoutException)
    if timeout and not isinstance(exc, httpx.ConnectTimeout) and deadline is not None and not deadline.received:
        return lost(f"{what}: no answer from {host}:{port} (stalled)", retries=1)
    if deadline is not None and deadline.expired:
        return lost(f"{what}: {host}:{port} too slow (no complete answer within {deadline.budget:.0f}s, "
                    f"under {deadline.min_rate / 1024:.0f} KiB/s)", retries=1)
    gai = _cause(exc, socket.gaierror)
    if gai is not None:
        if getattr(gai, "errno", None) == socket.EAI_AGAIN:
            return Transient(f"cannot resolve {host} (temporary DNS failure)", retries=1)
        return TransportError(f"cannot resolve {host}")
    if _cause(exc, ConnectionRefusedError) is not None:
        return Transient(f"connection refused by {host}:{port}", retries=3, after=0.4)
    if isinstance(exc, httpx.ConnectTimeout):
        return Transient(f"cannot connect to {host}:{port}: no answer (timed out)", retries=1)
    if timeout:
        return lost(f"{what}: {host}:{port} stalled (sent nothing for too long)", retries=1)
    if isinstance(exc, httpx.ConnectError):
        err = _cause(exc, OSError)
        detail = one_line(getattr(err, "strerror", None) or type(exc).__name__, 80)
        return Transient(f"cannot connect to {host}:{port}: {detail}", retries=2)
    return lost(f"{what}: connection to {host}:{port} lost ({type(exc).__name__})")


def tls_failure(exc: BaseException) -> str:
    """A short reason if ``exc`` was caused by TLS (not worth retrying), else ``""``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return one_line(str(e.verify_message or "certificate verification failed"), 120)
        if isinstance(e, ssl.SSLError):
            return one_line(str(e.reason or type(e).__name__), 120)
        e = e.__cause__ or e.__context__
    return ""


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _error_doc(body: bytes) -> tuple[list[str], str]:
    """The error codes and the first message of a distribution-spec error body (``{"errors": [...]}``)."""
    codes: list[str] = []
    detail = ""
    try:
        doc = json_loads(body) if body else None
    except ValueError:  # decoration only: the status decides the error
        return codes, detail
    errors = doc.get("errors") if isinstance(doc, dict) else None
    for err in errors if isinstance(errors, list) else ():
        if isinstance(err, dict):
            codes.append(str(err.get("code", "")))
            detail = detail or one_line(str(err.get("message", "")))
    return codes, detail


def answer_error(resp: httpx.Response, body: bytes, host: str, what: str,
                 transient_codes: Sequence[str] = ()) -> ShoalError:
    """The Shoal error for an error answer of ``host`` (status and up to ``MAX_ERROR_BODY`` bytes of
    ``body``) to request ``what``: one line, no secrets.  An answer carrying one of ``transient_codes``,
    or a status worth retrying, is :class:`Transient`."""
    codes, detail = _error_doc(body)
    status = resp.status_code
    msg = f"{what}: {host} answered HTTP {status}"
    if codes:
        msg += f" {','.join(c for c in codes if c)}"
    if detail:
        msg += f" ({detail})"
    if any(c in codes for c in transient_codes):
        return Transient(msg + "; damaged on the way?")
    if status == 404 or "BLOB_UNKNOWN" in codes or "MANIFEST_BLOB_UNKNOWN" in codes:
        return NotFound(msg)
    if status in (401, 403):
        return AuthError(msg)
    if "DIGEST_INVALID" in codes or "SIZE_INVALID" in codes:
        return IntegrityError(msg)
    if status == 413 or (status == 400 and codes):
        return FormatError(msg)
    if status in RETRY_STATUSES:
        return Transient(msg, after=retry_after(resp))
    return TransportError(msg)
