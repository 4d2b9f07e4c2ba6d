"""Reading a registry's answers: Retry-After, TLS failure reasons, one-line error text."""

from __future__ import annotations

import ssl
import time
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["tls_failure", "one_line", "retry_after"]


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
