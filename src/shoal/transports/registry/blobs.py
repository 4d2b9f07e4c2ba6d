"""Blob reads behind :class:`~.client.RegistryClient`, built on its public surface.

Verifying streaming reads (resumed with Range after a dropped connection,
through the client's one retry loop), and parallel coalesced Range reads
with a fallback for servers that ignore Range.  Uploads are uploads.py's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from shoal.digest import BlobDigester, VerifiedBlob
from shoal.errors import FormatError, HostileInput, IntegrityError, TransportError, UsageError

from .responses import Attempts, BodyLost, failure

if TYPE_CHECKING:
    from .client import RegistryClient

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX_LEN = {"sha256": 64, "sha512": 128}
CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
READ_CHUNK = 256 * 1024
RANGE_SLACK = 64 * 1024  # a range answer may be this much longer than asked (aligned servers), no more


def hasher(digest: str) -> Any:
    algo, _, hexpart = digest.partition(":")
    if algo not in _HEX_LEN:
        raise FormatError(f"unsupported digest algorithm {algo!r}")
    if len(hexpart) != _HEX_LEN[algo] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise FormatError(f"malformed digest {digest[:80]!r}")
    return hashlib.new(algo)


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):  # from a manifest or a caller: never part of a URL path
        raise (HostileInput if "/" in digest else FormatError)(f"malformed digest {digest[:80]!r}")
    hasher(digest)
    return digest


def digest_of(h: Any, digest: str) -> str:
    """``algo:hex`` of hasher ``h``, named with the algorithm of ``digest``."""
    return f"{digest.split(':', 1)[0]}:{h.hexdigest()}"


def with_query(url: str, name: str, value: str) -> str:
    # never hand upload URLs to httpx's params=: it replaces their query (_state)
    return f"{url}{'&' if '?' in url else '?'}{name}={quote(value, safe='')}"


def iter_body(client: RegistryClient, resp: httpx.Response) -> Iterator[bytes]:
    """The body of ``resp`` as it arrives, under its request's deadline; a failure raises BodyLost
    (or a final error, see ``responses.failure``).  The one place bodies are read."""
    dl = resp.extensions.get("shoal.deadline")
    it = resp.iter_bytes()
    while True:
        try:
            with dl.active() if dl is not None else nullcontext():
                chunk = next(it)
        except StopIteration:
            return
        except httpx.TransportError as e:
            url = str(resp.request.url)
            raise failure(e, f"{resp.request.method} {urlsplit(url).path}", url, dl, body=True) from None
        client.count(fetched=len(chunk))
        yield chunk


def read_all(client: RegistryClient, resp: httpx.Response, limit: int | None) -> bytes:
    """The body, but no more than about ``limit`` bytes (one chunk past it: the caller checks)."""
    buf = bytearray()
    for chunk in iter_body(client, resp):
        buf += chunk
        if limit is not None and len(buf) > limit:
            break
    return bytes(buf)


def read_span(client: RegistryClient, resp: httpx.Response, skip: int, take: int) -> bytes:
    """Bytes ``skip`` to ``skip + take`` of the body, streaming: never holds more than ``take`` (+ one
    chunk), never reads past them, but for a rest of at most RANGE_SLACK bytes that the answer declares
    (``_finish_body``).  A body that ends early raises BodyLost."""
    buf = bytearray()
    body = iter_body(client, resp)
    seen = 0
    for chunk in body:
        seen += len(chunk)
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        buf += chunk[skip:skip + take - len(buf)]
        skip = 0
        if len(buf) >= take:
            _finish_body(body, resp, seen)
            return bytes(buf)
    raise BodyLost(f"{client.host}: answer ended {take - len(buf)} bytes short")


def _finish_body(body: Iterator[bytes], resp: httpx.Response, seen: int) -> None:
    """Read to its end a body whose declared rest is at most RANGE_SLACK bytes (none, for an exact range
    answer), so that its keep-alive connection goes back to the pool: closing a response before its end
    drops the connection, and the next range read paid a new TCP (and TLS) handshake.  A longer or
    undeclared rest is left unread (the connection is dropped); a failure here costs only the connection."""
    try:
        rest = int(resp.headers.get("content-length", "")) - seen
    except ValueError:
        return
    if not 0 <= rest <= RANGE_SLACK:
        return
    try:
        for _ in body:
            pass
    except TransportError as e:
        log.debug("dropped the connection after a range read: %s", e)


# -- reads ------------------------------------------------------------------
class BlobReader:
    """Streaming, verifying blob reader; resumes with Range after a dropped connection.

    Bytes are handed out before the blob is verified: the digest (and size)
    check happens at EOF and raises IntegrityError there.  The resumes of one
    blob share one retry budget (the client's ``retries``).
    """

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int | None) -> None:
        self._c, self.repo, self.digest, self.expected = client, repo, check_digest(digest), size
        hasher(digest)  # a supported, well-formed digest
        self._d = BlobDigester(digest)
        self._scopes = client.scopes(repo)
        self.offset = 0
        self.size: int | None = size
        self._resp: httpx.Response | None = None
        self._it: Iterator[bytes] | None = None
        self._buf = b""
        self._eof = False
        self._resumes = Attempts()
        self.verified = False  # set at EOF once size and digest matched
        self._open()

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        url = f"/v2/{self.repo}/blobs/{self.digest}"
        resp = self._c.retrying(lambda: self._c.request("GET", url, scopes=self._scopes, headers=headers, stream=True),
                                f"GET {self._c.host}{url}")
        skip = 0
        if resp.status_code == 206 and self.offset:
            m = CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
            if not m or int(m.group(1)) != self.offset:
                resp.close()
                raise TransportError(f"blob {self.repo}@{self.digest}: bad Content-Range on resume")
        elif resp.status_code == 200:
            skip = self.offset
            length = resp.headers.get("content-length", "")
            if length.isdigit():
                if self.expected is not None and int(length) != self.expected:
                    resp.close()
                    raise IntegrityError(f"blob {self.repo}@{self.digest}: size {length}, expected {self.expected}")
                self.size = int(length)
        else:
            raise self._c.error_for(resp, f"get blob {self.repo}@{self.digest}")
        self._resp = resp
        self._it = self._chunks(resp, skip)

    def _chunks(self, resp: httpx.Response, skip: int) -> Iterator[bytes]:
        for chunk in iter_body(self._c, resp):
            if skip:
                drop = min(skip, len(chunk))
                chunk, skip = chunk[drop:], skip - drop
            if chunk:
                yield chunk

    def _step(self) -> bytes | None:
        """The next chunk, ``None`` at the end of the body; (re)opens at ``offset`` first if needed.
        A dropped connection raises BodyLost, for :meth:`RegistryClient.retrying` to resume."""
        if self._it is None:
            self._open()
        assert self._it is not None
        try:
            return next(self._it)
        except StopIteration:
            return None
        except BodyLost:
            self._drop()
            raise

    def _next(self) -> bytes:
        if self._eof:
            return b""
        try:
            chunk = self._c.retrying(self._step, f"blob {self.digest} at byte {self.offset}", on=BodyLost,
                                     attempts=self._resumes)
        except BodyLost as e:
            raise TransportError(f"blob {self.repo}@{self.digest}: {e}") from None
        if chunk is None:
            self._finish()
            return b""
        self._d.update(chunk)
        self.offset += len(chunk)
        limit = self.expected if self.expected is not None else self.size
        if limit is not None and self.offset > limit:
            self.close()
            raise IntegrityError(f"blob {self.repo}@{self.digest}: more bytes than expected")
        return chunk

    def _finish(self) -> None:
        self._eof = True
        self._drop()
        want = self.expected if self.expected is not None else self.size
        if want is not None and self.offset != want:
            raise IntegrityError(f"blob {self.repo}@{self.digest}: got {self.offset} bytes, expected {want}")
        if not self._d.matches():
            raise IntegrityError(f"blob {self.repo}@{self.digest}: content does not match its digest")
        self.verified = True

    def read_verified(self) -> VerifiedBlob:
        """The whole blob, read from its first byte and verified as it streamed (size and digest), as a
        VerifiedBlob: the store keeps it without hashing it again."""
        if self.offset or self._buf or self._eof:
            raise ValueError(f"blob {self.digest}: read_verified must read the blob from its first byte")
        self._d.keep()
        while self._next():
            pass
        return self._d.seal(f"blob {self.repo}@{self.digest}")

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining if ``n < 0``); ``b""`` at verified EOF.  Only the
        chunk that crosses ``n`` is split, so a large read copies its bytes once."""
        parts = [self._buf]
        have = len(self._buf)
        self._buf = b""
        if 0 <= n < have:
            self._buf = parts[0][n:]
            return parts[0][:n]
        while (n < 0 or have < n) and not self._eof:
            chunk = self._next()
            if 0 <= n < have + len(chunk):
                cut = n - have
                parts.append(chunk[:cut])
                self._buf = chunk[cut:]
                break
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def __iter__(self) -> Iterator[bytes]:
        if self._buf:
            buf, self._buf = self._buf, b""
            yield buf
        while True:
            chunk = self._next()
            if not chunk:
                return
            yield chunk

    def _drop(self) -> None:
        self._it = None
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._drop()
        self._eof = True

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



@dataclass(frozen=True)
class Span:
    """``blob[start:end]``: one request that serves the asked ranges at indices ``members``."""

    start: int
    end: int
    members: tuple[int, ...]


def coalesce(ranges: Sequence[tuple[int, int]], gap: int) -> list[Span]:
    """The non-empty ``(offset, length)`` ranges, merged where at most ``gap`` bytes apart, in order."""
    for off, ln in ranges:
        if off < 0 or ln < 0:
            raise UsageError(f"invalid range ({off}, {ln})")
    order = sorted((i for i, (_, ln) in enumerate(ranges) if ln > 0), key=lambda i: ranges[i][0])
    spans: list[list[int]] = []  # [start, end_exclusive, *indices of ranges]
    for i in order:
        off, ln = ranges[i]
        if spans and off <= spans[-1][1] + gap:
            spans[-1][1] = max(spans[-1][1], off + ln)
            spans[-1].append(i)
        else:
            spans.append([off, off + ln, i])
    return [Span(s[0], s[1], tuple(s[2:])) for s in spans]


class RangeFetch:
    """Range reads of one blob: each span one request (retried), never holding more than asked."""

    def __init__(self, client: RegistryClient, repo: str, digest: str) -> None:
        self.client, self.repo, self.digest = client, repo, check_digest(digest)
        self.scopes = client.scopes(repo)
        self.what = f"blob {repo}@{digest}"

    def fetch(self, span: Span) -> bytes:
        return self.client.retrying(lambda: self.once(span.start, span.end),
                                    f"get range {span.start}-{span.end - 1} of {self.what}")

    def once(self, start: int, end: int) -> bytes:
        """One request for ``blob[start:end]``: never holds or reads more than asked (+ RANGE_SLACK)."""
        c = self.client
        resp = c.request("GET", f"/v2/{self.repo}/blobs/{self.digest}", scopes=self.scopes,
                         headers={"Range": f"bytes={start}-{end - 1}"}, stream=True)
        try:
            if resp.status_code == 206:
                return self._partial(resp, start, end)
            if resp.status_code == 200:  # Range ignored: stream up to the span, keep only the span
                if not c.ranges_ignored:
                    log.info("%s ignores Range: each range streams the blob up to its end", c.host)
                c.ranges_ignored = True
                return read_span(c, resp, start, end - start)
            if resp.status_code == 416:
                raise UsageError(f"range {start}-{end - 1} outside {self.what}")
            raise c.error_for(resp, f"get range of {self.what}")
        finally:
            resp.close()

    def _partial(self, resp: httpx.Response, start: int, end: int) -> bytes:
        m = CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
        first, last = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if not m or first > start or last < end - 1 or last - first + 1 > end - start + RANGE_SLACK:
            raise TransportError(f"{self.what}: {self.client.host} answered bytes {start}-{end - 1} with "
                                 f"Content-Range {resp.headers.get('content-range', '(none)')[:80]!r}")
        return read_span(self.client, resp, start - first, end - start)

    def in_order(self, spans: list[Span], concurrency: int) -> Iterator[tuple[Span, bytes]]:
        """``(span, its bytes)`` for every span, in order; up to ``concurrency`` at once on the client's
        executor, one at a time from a server that ignores Range (each read streams the blob)."""
        todo = list(spans)
        if todo and (len(todo) == 1 or self.client.ranges_ignored):
            span = todo.pop(0)  # probe alone: avoids N full downloads from a Range-less server
            yield span, self.fetch(span)
        workers = max(1, min(concurrency, len(todo)))
        if workers == 1 or self.client.ranges_ignored:
            for span in todo:
                yield span, self.fetch(span)
            return
        pool = self.client.executor()
        futures = [pool.submit(self.fetch, s) for s in todo[:workers]]
        pending = todo[workers:]
        for idx, span in enumerate(todo):  # futures[k] belongs to todo[k]
            yield span, futures[idx].result()
            if pending:
                futures.append(pool.submit(self.fetch, pending.pop(0)))


def fetch_ranges(client: RegistryClient, repo: str, digest: str, ranges: Sequence[tuple[int, int]],
                 concurrency: int) -> list[bytes]:
    """See :meth:`RegistryClient.get_blob_ranges`."""
    reader = RangeFetch(client, repo, digest)
    results: list[bytes] = [b""] * len(ranges)
    for span, data in reader.in_order(coalesce(ranges, client.range_merge_gap), concurrency):
        for i in span.members:
            off, ln = ranges[i]
            results[i] = data[off - span.start:off - span.start + ln]
            if len(results[i]) != ln:
                raise UsageError(f"range ({off}, {ln}) outside {reader.what}")
    return results
