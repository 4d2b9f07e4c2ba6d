"""Blob transfer machinery behind :class:`~.client.RegistryClient`.

Verifying streaming reads (resumed with Range after a dropped connection),
parallel coalesced Range reads with a fallback for servers that ignore
Range, and uploads (cross-repo mount, monolithic POST+PUT, chunked PATCH),
restarted from scratch when the registry loses the session.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urljoin, urlsplit

import httpx

from shoal.errors import FormatError, IntegrityError, TransportError, UsageError

from .auth import merge_scopes
from .responses import BodyLost, Transient, failure

if TYPE_CHECKING:
    from .client import RegistryClient

log = logging.getLogger(__name__)

PutBlobResult = Literal["exists", "mounted", "uploaded"]
BlobSource = bytes | bytearray | memoryview | IO[bytes] | str | os.PathLike[str]

_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX_LEN = {"sha256": 64, "sha512": 128}
CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
READ_CHUNK = 256 * 1024
RANGE_SLACK = 64 * 1024  # a range answer may be this much longer than asked (aligned servers), no more
_TRANSIT_CODES = ("DIGEST_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID")  # on a verified source: damage on the way


def hasher(digest: str) -> Any:
    algo, _, hexpart = digest.partition(":")
    if algo not in _HEX_LEN:
        raise FormatError(f"unsupported digest algorithm {algo!r}")
    if len(hexpart) != _HEX_LEN[algo] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise FormatError(f"malformed digest {digest[:80]!r}")
    return hashlib.new(algo)


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise UsageError(f"malformed digest {digest[:80]!r}")
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
        client._count(fetched=len(chunk))
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
    chunk), never reads past them.  A body that ends early raises BodyLost."""
    buf = bytearray()
    for chunk in iter_body(client, resp):
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        buf += chunk[skip:skip + take - len(buf)]
        skip = 0
        if len(buf) >= take:
            return bytes(buf)
    raise BodyLost(f"{client.host}: answer ended {take - len(buf)} bytes short")


# -- reads ------------------------------------------------------------------
class BlobReader:
    """Streaming, verifying blob reader; resumes with Range after a dropped connection.

    Bytes are handed out before the blob is verified: the digest (and size)
    check happens at EOF and raises IntegrityError there.
    """

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int | None) -> None:
        self._c, self.repo, self.digest, self.expected = client, repo, check_digest(digest), size
        self._h = hasher(digest)
        self._scopes = client._pull(repo)
        self.offset = 0
        self.size: int | None = size
        self._resp: httpx.Response | None = None
        self._it: Iterator[bytes] | None = None
        self._buf = b""
        self._eof = False
        self._resumes = 0
        self._open()

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self._c._request("GET", f"/v2/{self.repo}/blobs/{self.digest}", scopes=self._scopes,
                                headers=headers, stream=True)
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
            raise self._c._error(resp, f"get blob {self.repo}@{self.digest}")
        self._resp = resp
        self._it = self._chunks(resp, skip)

    def _chunks(self, resp: httpx.Response, skip: int) -> Iterator[bytes]:
        for chunk in iter_body(self._c, resp):
            if skip:
                drop = min(skip, len(chunk))
                chunk, skip = chunk[drop:], skip - drop
            if chunk:
                yield chunk

    def _next(self) -> bytes:
        while not self._eof:
            assert self._it is not None
            try:
                chunk = next(self._it)
            except StopIteration:
                self._finish()
                return b""
            except BodyLost as e:
                self._drop()
                cap = self._c.retries if e.retries is None else min(self._c.retries, e.retries)
                if self._resumes >= cap:
                    raise TransportError(f"blob {self.repo}@{self.digest}: {e}") from None
                self._resumes += 1
                log.info("blob %s: %s at byte %d; resuming (%d of %d)", self.digest, e, self.offset,
                         self._resumes, cap)
                self._c._sleep(self._resumes)
                self._open()
                continue
            self._h.update(chunk)
            self.offset += len(chunk)
            limit = self.expected if self.expected is not None else self.size
            if limit is not None and self.offset > limit:
                self.close()
                raise IntegrityError(f"blob {self.repo}@{self.digest}: more bytes than expected")
            return chunk
        return b""

    def _finish(self) -> None:
        self._eof = True
        self._drop()
        want = self.expected if self.expected is not None else self.size
        if want is not None and self.offset != want:
            raise IntegrityError(f"blob {self.repo}@{self.digest}: got {self.offset} bytes, expected {want}")
        if digest_of(self._h, self.digest) != self.digest:
            raise IntegrityError(f"blob {self.repo}@{self.digest}: content does not match its digest")

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


def fetch_ranges(client: RegistryClient, repo: str, digest: str, ranges: Sequence[tuple[int, int]],
                 concurrency: int) -> list[bytes]:
    """See :meth:`RegistryClient.get_blob_ranges`."""
    check_digest(digest)
    scopes = client._pull(repo)
    for off, ln in ranges:
        if off < 0 or ln < 0:
            raise UsageError(f"invalid range ({off}, {ln})")
    order = sorted((i for i, (_, ln) in enumerate(ranges) if ln > 0), key=lambda i: ranges[i][0])
    spans: list[list[int]] = []  # [start, end_exclusive, *indices of ranges]
    for i in order:
        off, ln = ranges[i]
        if spans and off <= spans[-1][1] + client.range_merge_gap:
            spans[-1][1] = max(spans[-1][1], off + ln)
            spans[-1].append(i)
        else:
            spans.append([off, off + ln, i])
    what = f"blob {repo}@{digest}"

    def fetch(start: int, end: int) -> bytes:
        return client._retry(lambda: fetch_once(start, end), f"get range {start}-{end - 1} of {what}")

    def fetch_once(start: int, end: int) -> bytes:
        """One request for ``blob[start:end]``: never holds or reads more than asked (+ RANGE_SLACK)."""
        want = end - start
        resp = client._request("GET", f"/v2/{repo}/blobs/{digest}", scopes=scopes,
                               headers={"Range": f"bytes={start}-{end - 1}"}, stream=True, retry=False)
        try:
            if resp.status_code == 206:
                m = CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
                first, last = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
                if not m or first > start or last < end - 1 or last - first + 1 > want + RANGE_SLACK:
                    raise TransportError(f"{what}: {client.host} answered bytes {start}-{end - 1} with "
                                         f"Content-Range {resp.headers.get('content-range', '(none)')[:80]!r}")
                return read_span(client, resp, start - first, want)
            if resp.status_code == 200:  # Range ignored: stream up to the span, keep only the span
                if not client._ranges_ignored:
                    log.info("%s ignores Range: each range streams the blob up to its end", client.host)
                client._ranges_ignored = True
                return read_span(client, resp, start, want)
            if resp.status_code == 416:
                raise UsageError(f"range {start}-{end - 1} outside {what}")
            raise client._error(resp, f"get range of {what}")
        finally:
            resp.close()

    results: list[bytes] = [b""] * len(ranges)

    def place(span: list[int], data: bytes) -> None:
        for i in span[2:]:
            off, ln = ranges[i]
            results[i] = data[off - span[0]:off - span[0] + ln]
            if len(results[i]) != ln:
                raise UsageError(f"range ({off}, {ln}) outside {what}")

    todo = list(spans)
    if todo and (len(todo) == 1 or client._ranges_ignored):
        span = todo.pop(0)  # probe alone: avoids N full downloads from a Range-less server
        place(span, fetch(span[0], span[1]))
    workers = max(1, min(concurrency, len(todo)))
    if workers == 1 or client._ranges_ignored:
        for span in todo:
            place(span, fetch(span[0], span[1]))
    elif todo:
        pool = client._executor()
        futures = [pool.submit(fetch, s[0], s[1]) for s in todo[:workers]]
        pending = todo[workers:]
        for idx, span in enumerate(todo):  # futures[k] belongs to todo[k]
            place(span, futures[idx].result())
            if pending:
                nxt = pending.pop(0)
                futures.append(pool.submit(fetch, nxt[0], nxt[1]))
    return results


# -- writes -----------------------------------------------------------------
class Source:
    """Blob upload source: bytes, an open binary file, or a path; rewindable for retries."""

    def __init__(self, obj: BlobSource) -> None:
        self._mem: memoryview | None = None
        self._file: IO[bytes] | None = None
        self._own = False
        self._pos = 0
        if isinstance(obj, (bytes, bytearray, memoryview)):
            self._mem = memoryview(obj).cast("B")
        elif isinstance(obj, (str, os.PathLike)):
            self._file, self._own = open(obj, "rb"), True  # noqa: SIM115
        else:
            self._file = obj
        seekable = self._file is not None and self._file.seekable()
        self._start = self._file.tell() if self._file is not None and seekable else 0
        self.rewindable = self._mem is not None or seekable

    def rewind(self) -> None:
        self._pos = 0
        if self._file is not None and self._file.seekable():
            self._file.seek(self._start)

    def read(self, n: int) -> bytes:
        if self._mem is not None:
            out = bytes(self._mem[self._pos:self._pos + n])
            self._pos += len(out)
            return out
        assert self._file is not None
        buf = bytearray()
        while len(buf) < n:
            part = self._file.read(n - len(buf))
            if not part:
                break
            buf += part
        return bytes(buf)

    def close(self) -> None:
        if self._own and self._file is not None:
            self._file.close()


def put_blob(client: RegistryClient, repo: str, digest: str, data: BlobSource, size: int,
             mount_from: str | None, check_exists: bool = True) -> PutBlobResult:
    """See :meth:`RegistryClient.put_blob`."""
    hasher(check_digest(digest))
    client._check_repo(repo)
    if mount_from is not None:
        client._check_repo(mount_from)
    if size < 0:
        raise UsageError(f"invalid blob size {size}")
    if check_exists and client.has_blob(repo, digest) is not None:
        return "exists"
    src = Source(data)
    try:
        if not src.rewindable:
            return _upload_once(client, repo, digest, src, size, mount_from)
        return client._retry(lambda: _upload_once(client, repo, digest, src, size, mount_from),
                             f"upload of {digest} to {repo}")  # each retry starts again from a fresh POST
    finally:
        src.close()


def _lost(client: RegistryClient, resp: httpx.Response, repo: str) -> Transient:
    resp.close()
    return Transient(f"upload to {repo}: {client.host} answered HTTP {resp.status_code}")


def _upload_once(client: RegistryClient, repo: str, digest: str, src: Source, size: int,
                 mount_from: str | None) -> PutBlobResult:
    extra = client._pull(mount_from) if mount_from and mount_from != repo else ()
    scopes = merge_scopes(client._push(repo) + extra)
    url = f"/v2/{repo}/blobs/uploads/"
    if mount_from:
        url += f"?mount={quote(digest, safe='')}&from={quote(mount_from, safe='')}"
    resp = client._request("POST", url, scopes=scopes, headers={"Content-Length": "0"}, retry=False)
    if resp.status_code == 201 and mount_from:
        return "mounted"
    if resp.status_code != 202 or not resp.headers.get("location"):
        raise client._error(resp, f"start upload to {repo}")
    loc = urljoin(str(resp.request.url), resp.headers["location"])
    h = hasher(digest)
    octet = {"Content-Type": "application/octet-stream"}
    src.rewind()
    if size <= client.monolithic_max:
        body = src.read(size)
        if len(body) != size:
            raise IntegrityError(f"blob {digest}: source has {len(body)} bytes, expected {size}")
        h.update(body)
        if digest_of(h, digest) != digest:
            raise IntegrityError(f"blob {digest}: source content does not match the digest")
        resp = client._request("PUT", with_query(loc, "digest", digest), scopes=scopes,
                               headers=octet, content=body, retry=False)
    else:
        offset = 0
        while offset < size:
            chunk = src.read(min(client.chunk_size, size - offset))
            if not chunk:
                break
            h.update(chunk)
            rng = f"{offset}-{offset + len(chunk) - 1}"
            resp = client._request("PATCH", loc, scopes=scopes, retry=False, content=chunk,
                                   headers={**octet, "Content-Range": rng})
            if resp.status_code != 202:
                if resp.status_code in (400, 404, 416) or resp.status_code >= 500:
                    raise _lost(client, resp, repo)  # session lost, e.g. registry restarted
                raise client._error(resp, f"upload chunk to {repo}")
            got = resp.headers.get("range", "")
            if got and got.rsplit("-", 1)[-1] != str(offset + len(chunk) - 1):
                raise Transient(f"upload to {repo}: {client.host} acknowledged range {got}, sent {rng}")
            loc = urljoin(str(resp.request.url), resp.headers.get("location") or loc)
            offset += len(chunk)
        problem = ""
        if offset != size:
            problem = f"source has {offset} bytes, expected {size}"
        elif digest_of(h, digest) != digest:
            problem = "source content does not match the digest"
        if problem:
            _cancel(client, loc, scopes)
            raise IntegrityError(f"blob {digest}: {problem}")
        resp = client._request("PUT", with_query(loc, "digest", digest), scopes=scopes,
                               headers={"Content-Length": "0"}, retry=False)
    if resp.status_code not in (201, 204):
        if resp.status_code in (404, 416) or resp.status_code >= 500:
            raise _lost(client, resp, repo)
        raise client._error(resp, f"finish upload to {repo}", transient_codes=_TRANSIT_CODES)
    claimed = resp.headers.get("docker-content-digest", "")
    if claimed and claimed != digest:
        raise IntegrityError(f"blob {digest}: registry stored digest {claimed}")
    return "uploaded"


def _cancel(client: RegistryClient, loc: str, scopes: Sequence[str]) -> None:
    try:
        client._request("DELETE", loc, scopes=scopes, retry=False).close()
    except TransportError:
        pass
