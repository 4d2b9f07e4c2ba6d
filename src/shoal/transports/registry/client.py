"""An OCI distribution-spec client: manifests, blobs, tags, referrers.

One :class:`RegistryClient` per registry host.  It is thread-safe (one
keep-alive connection pool, shared token cache) and quiet (``logging``
only).  Every blob or manifest fetched by digest is verified.

Besides the registry operations, the client has a small public surface that
blobs.py, uploads.py, referrers.py and the docker transport build on
(docs/transports-registry.md §The client's surface): ``request`` (one attempt,
no retries), ``retrying`` (the one retry/backoff/resume loop), ``error_for``
(an error answer as a Shoal error; the mapping is responses.py's),
``scopes``, ``count``, ``executor`` and ``ranges_ignored``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from shoal.errors import FormatError, IntegrityError, ShoalError, TransportError, UsageError
from shoal.format.manifest import MAX_MANIFEST_BYTES, json_loads

from .auth import Authenticator, repository_scope
from .blobs import BlobReader, check_digest, digest_of, fetch_ranges, hasher, read_all
from .credentials import Credentials
from .deadline import DEFAULT_MIN_RATE, Deadline
from .referrers import has_referrers_api, put_referrer_tag_index, referrers, referrers_tag
from .responses import MAX_ERROR_BODY, RETRY_STATUSES, Attempts, Transient, answer_error, failure, redact
from .tls import TLSOptions, tls_context
from .transport import Endpoint, http_client
from .uploads import BlobSource, PutBlobResult, mount_blob, put_blob

__all__ = [
    "RegistryClient",
    "RegistryStats",
    "ManifestInfo",
    "BlobReader",
    "PutBlobResult",
    "OCI_MANIFEST",
    "OCI_INDEX",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DEFAULT_MANIFEST_ACCEPT",
    "MAX_MANIFEST_SIZE",
    "referrers_tag",
]

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DEFAULT_MANIFEST_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
MAX_MANIFEST_SIZE = MAX_MANIFEST_BYTES  # the one cap (format/manifest.py)

_REPO_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_MAX_SMALL_BODY = 16 * 1024 * 1024  # cap on answers read whole (tags, tokens)
_T = TypeVar("_T")


@dataclass
class RegistryStats:
    """Counters for reporting; updated by every thread of one client."""

    requests: int = 0
    bytes_fetched: int = 0
    bytes_sent: int = 0
    retries: int = 0


@dataclass(frozen=True)
class ManifestInfo:
    """What a manifest HEAD tells: enough for an OCI descriptor."""

    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _is_digest(reference: str) -> bool:
    return ":" in reference


def _manifest_digest(data: bytes, reference: str, what: str) -> str:
    """The digest of manifest bytes: checked against ``reference`` when it is a digest, else sha256."""
    if _is_digest(reference):
        h = hasher(reference)
        h.update(data)
        digest = digest_of(h, reference)
        if digest != reference:
            raise IntegrityError(f"{what}: content does not match its digest")
        return digest
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _StoredOther(Transient):
    """The registry stored a manifest with another digest than the bytes sent: damaged on the way."""


class RegistryClient:
    """Client of one OCI registry host (``host`` or ``host:port``)."""

    def __init__(
        self,
        host: str,
        *,
        tls_verify: bool = True,
        ca_bundle: str | None = None,
        cert_dir: str | None = None,
        plain_http: bool | None = None,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        max_connections: int = 16,
        retries: int = 5,
        lookup_credentials: bool = True,
        backoff: float = 0.2,
        backoff_max: float = 10.0,
        monolithic_max: int = 8 * 1024 * 1024,
        chunk_size: int = 16 * 1024 * 1024,
        range_concurrency: int = 8,
        range_merge_gap: int = 64 * 1024,
        min_rate: float = DEFAULT_MIN_RATE,
        auth_file: str | None = None,
    ) -> None:
        host = host.strip().rstrip("/")
        if not host or "/" in host or "@" in host:
            raise UsageError(f"invalid registry host {host[:80]!r}")
        self.host = host
        self._api_host = "registry-1.docker.io" if host in ("docker.io", "index.docker.io") else host
        self._endpoint = Endpoint(self._api_host, plain_http=plain_http, tls_verify=tls_verify, timeout=timeout)
        self.retries = max(0, retries)
        self.timeout, self.min_rate = timeout, min_rate
        self.backoff, self.backoff_max = backoff, backoff_max
        self.monolithic_max, self.chunk_size = monolithic_max, max(1, chunk_size)
        self.range_concurrency, self.range_merge_gap = max(1, range_concurrency), max(0, range_merge_gap)
        self.stats = RegistryStats()
        self._stats_lock = threading.Lock()
        tls = tls_context(host, TLSOptions(tls_verify, ca_bundle, cert_dir))  # tls.py: roots + extras
        self._http = http_client(tls=tls, timeout=timeout, max_connections=max_connections,
                                 headers={"User-Agent": "shoal", "Accept-Encoding": "identity"})
        self.auth = Authenticator(host, self._send_raw, credentials, lookup=lookup_credentials,
                                  secure=lambda: not self._endpoint.plain_http, auth_file=auth_file)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.ranges_ignored = False  # a server answered a Range request with the whole blob (blobs.py)

    @property
    def base_url(self) -> str:  # ``scheme://host`` as last chosen: a loopback or insecure host's first request
        return self._endpoint.base_url  # finds out its scheme (transport.Endpoint)

    def learn_scheme(self, other: "RegistryClient") -> None:
        """Speak to the registry as ``other`` (a client of the same host) found out it must be spoken
        to, instead of probing it again (``transport.Endpoint.adopt``)."""
        self._endpoint.adopt(other._endpoint)

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public surface the rest of the package builds on ---------------
    def count(self, *, requests: int = 0, fetched: int = 0, sent: int = 0, retries: int = 0) -> None:
        """Add to :attr:`stats` (thread-safe)."""
        with self._stats_lock:
            self.stats.requests += requests
            self.stats.bytes_fetched += fetched
            self.stats.bytes_sent += sent
            self.stats.retries += retries

    def scopes(self, repo: str, actions: str = "pull") -> tuple[str, ...]:
        """The token scopes for ``actions`` (``pull``, ``pull,push``, ``delete``) on ``repo``; refuses
        an invalid repository name (UsageError)."""
        if len(repo) > 255 or not _REPO_RE.fullmatch(repo):
            raise UsageError(f"invalid repository name {repo[:80]!r}")
        return (repository_scope(repo, actions),)

    def executor(self) -> ThreadPoolExecutor:
        """The client's worker pool (``range_concurrency`` threads, made on first use)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.range_concurrency, thread_name_prefix="shoal-reg")
            return self._pool

    def retrying(self, fn: Callable[[], _T], what: str, *, on: type[Transient] = Transient,
                 attempts: Attempts | None = None) -> _T:
        """``fn()``, again after a backoff while it raises ``on`` (:class:`Transient` or a subclass):
        at most ``retries`` times, or fewer when the failure says so (a refused connection, a
        timeout), after Retry-After when the server gave one.  ``attempts`` shares one budget between
        calls (a resumed blob read); by default each call has its own.  The one retry loop."""
        used = attempts if attempts is not None else Attempts()
        while True:
            try:
                return fn()
            except on as e:
                cap = self.retries if e.retries is None else min(self.retries, e.retries)
                if used.used >= cap:
                    if used.used:
                        log.info("%s: giving up after %d retries: %s", what, used.used, e)
                    raise
                used.used += 1
                log.info("%s: %s; retry %d of %d", what, e, used.used, cap)
                delay = e.after
                if delay is None:
                    delay = min(self.backoff_max, self.backoff * 2 ** (used.used - 1)) * (0.5 + random.random() / 2)
                self.count(retries=1)
                time.sleep(min(delay, 60.0))

    def request(self, method: str, url: str, *, scopes: Sequence[str] | None,
                headers: dict[str, str] | None = None, content: bytes | None = None,
                stream: bool = False) -> httpx.Response:
        """One attempt of one request, without retries: auth (``scopes=None``: none at all; ``()``:
        the registry's base), redirects (credentials never follow to another host), a
        :class:`Deadline` (kept in ``extensions["shoal.deadline"]`` for the reads of a streamed body).

        A network failure, and an answer worth retrying (408, 429, 5xx), raise :class:`Transient`
        (see :meth:`retrying`); every other answer is returned for the caller to check, read whole
        (at most 16 MiB) unless ``stream``.  ``url`` is a path on the registry or a full URL."""
        full = url if url.startswith(("http://", "https://")) else self._endpoint.resolve() + url
        return self._attempt(method, full, scopes, headers, content, stream)

    def error_for(self, resp: httpx.Response, what: str, transient_codes: Sequence[str] = ()) -> ShoalError:
        """The Shoal error for error answer ``resp`` to ``what`` (responses.answer_error: one line, no
        secrets; ``transient_codes`` make it :class:`Transient`).  Reads at most ``MAX_ERROR_BODY``
        bytes of it and closes it."""
        body = b""
        try:
            try:
                body = resp.content[:MAX_ERROR_BODY]
            except httpx.ResponseNotRead:  # streamed: read no more than the cap
                body = read_all(self, resp, MAX_ERROR_BODY)[:MAX_ERROR_BODY]
        except (TransportError, httpx.StreamError):  # decoration only: the status decides the error
            pass
        finally:
            resp.close()
        return answer_error(resp, body, self.host, what, transient_codes)

    # -- HTTP core ---------------------------------------------------------
    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int | None]:
        p = urlsplit(url)
        port = p.port or (443 if p.scheme == "https" else 80)
        return (p.scheme, (p.hostname or "").lower(), port)

    def _call(self, method: str, url: str, *, scopes: Sequence[str] | None, headers: dict[str, str] | None = None,
              content: bytes | None = None) -> httpx.Response:
        """:meth:`request`, retried; the answer read whole."""
        shown = redact(url) if "://" in url else self.host + url
        return self.retrying(lambda: self.request(method, url, scopes=scopes, headers=headers, content=content),
                             f"{method} {shown}")

    def _send_raw(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> httpx.Response:
        """Send without registry auth (token service); retried, body read."""
        return self._call(method, url, scopes=None, headers=headers, content=body)

    def _attempt(self, method: str, url: str, scopes: Sequence[str] | None, headers: dict[str, str] | None,
                 content: bytes | None, stream: bool) -> httpx.Response:
        """:meth:`request` on a full URL, following redirects under one :class:`Deadline`."""
        auth_tries = 0
        auth = self.auth.header_for(scopes) if scopes is not None else None
        cur, cur_method, first_origin = url, method, self._origin_of(url)
        seen: set[str] = set()
        dl = Deadline(self.timeout, self.min_rate)
        while True:
            origin = self._origin_of(cur)
            same_origin = origin == self._origin_of(self._endpoint.base_url)
            hdrs = dict(headers or {})
            if origin != first_origin:  # never forward credentials to another host
                hdrs.pop("Authorization", None)
            if auth and same_origin and scopes is not None:
                hdrs["Authorization"] = auth
            resp = self._send(cur_method, cur, hdrs, content, dl)
            status = resp.status_code
            if status == 401 and same_origin and scopes is not None:
                resp.close()
                if auth_tries >= 2:
                    raise self.auth.denied(scopes)
                auth_tries += 1
                auth = self.auth.handle_401(resp, scopes, hdrs.get("Authorization"))
                continue
            if status in _REDIRECTS and resp.headers.get("location"):
                cur = self._redirect(resp, cur, seen, method, url)
                if status == 303:
                    cur_method, content = "GET", None
                continue
            if status in RETRY_STATUSES:
                raise self.error_for(resp, f"{cur_method} {urlsplit(cur).path}")
            return resp if stream else self._read_small(resp)

    def _send(self, method: str, url: str, headers: dict[str, str], content: bytes | None,
              dl: Deadline) -> httpx.Response:
        """One HTTP exchange (its body not read yet); a network failure as Shoal's error (responses.failure)."""
        try:
            req = self._http.build_request(method, url, headers=headers, content=content)
            with dl.active():
                resp = self._http.send(req, stream=True)
        except httpx.TransportError as e:
            self.count(requests=1)
            raise self._endpoint.explain(failure(e, f"{method} {urlsplit(url).path}", url, dl), url) from None
        resp.extensions["shoal.deadline"] = dl
        self.count(requests=1, sent=len(content or b""))
        log.debug("%s %s -> %d", method, redact(url), resp.status_code)
        return resp

    def _redirect(self, resp: httpx.Response, cur: str, seen: set[str], method: str, url: str) -> str:
        """Where redirect ``resp`` (an answer to ``cur``) points; refuses a loop or too many hops."""
        resp.close()
        seen.add(cur)
        nxt = urljoin(cur, resp.headers["location"])
        if nxt in seen or len(seen) > _MAX_REDIRECTS:
            kind = "a redirect loop" if nxt in seen else f"more than {_MAX_REDIRECTS} redirects"
            raise TransportError(f"{method} {self.host}{urlsplit(url).path}: {kind} (at {redact(nxt)})")
        log.debug("redirected to %s", redact(nxt))
        return nxt

    def _read_small(self, resp: httpx.Response) -> httpx.Response:
        """``resp`` with its body read (at most ``_MAX_SMALL_BODY``)."""
        try:
            body = read_all(self, resp, _MAX_SMALL_BODY)
        finally:
            resp.close()
        if len(body) > _MAX_SMALL_BODY:
            what = f"{resp.request.method} {self.host}{resp.request.url.path}"
            raise FormatError(f"{what}: answer exceeds {_MAX_SMALL_BODY} bytes")
        headers_out = [(k, v) for k, v in resp.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(resp.status_code, headers=headers_out, content=body, request=resp.request)

    def _check_ref(self, reference: str) -> str:
        if _is_digest(reference):
            return check_digest(reference)
        if not _TAG_RE.fullmatch(reference):
            raise UsageError(f"invalid tag {reference[:80]!r}")
        return reference

    # -- registry ----------------------------------------------------------
    def ping(self) -> None:
        """Check that the host speaks the distribution API (and that credentials work)."""
        resp = self._call("GET", "/v2/", scopes=())
        if resp.status_code != 200:
            raise self.error_for(resp, "ping")

    def list_tags(self, repo: str, *, page_size: int | None = None) -> list[str]:
        """Every tag of ``repo``, following ``Link: rel="next"`` pagination."""
        scopes = self.scopes(repo)
        url = f"/v2/{repo}/tags/list" + (f"?n={int(page_size)}" if page_size else "")
        tags: list[str] = []
        seen: set[str] = set()
        while url:
            resp = self._call("GET", url, scopes=scopes)
            if resp.status_code != 200:
                raise self.error_for(resp, f"list tags of {repo}")
            try:
                doc = resp.json()
                page = doc.get("tags") or []
            except (ValueError, AttributeError):
                raise FormatError(f"list tags of {repo}: {self.host} sent malformed JSON") from None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise FormatError(f"list tags of {repo}: {self.host} sent malformed JSON")
            tags.extend(page)
            m = _LINK_NEXT_RE.search(resp.headers.get("link", ""))
            nxt = urljoin(str(resp.request.url), m.group(1)) if m else ""
            if nxt in seen or len(seen) > 100000:
                raise TransportError(f"list tags of {repo}: {self.host} pagination loops")
            seen.add(nxt)
            url = nxt
        return tags

    # -- manifests ---------------------------------------------------------
    def _accept(self, accept: Sequence[str]) -> str:
        # distribution 2.8 404s an OCI manifest unless OCI types are acceptable
        return ", ".join(dict.fromkeys([*accept, *DEFAULT_MANIFEST_ACCEPT]))

    def get_manifest(self, repo: str, reference: str, accept: Sequence[str] = ()) -> tuple[bytes, str, str]:
        """``(bytes, media_type, digest)``; verified when ``reference`` is a digest."""
        self._check_ref(reference)
        what = f"manifest {repo}:{reference}" if not _is_digest(reference) else f"manifest {repo}@{reference}"

        def once() -> tuple[httpx.Response, bytes]:
            resp = self.request(
                "GET", f"/v2/{repo}/manifests/{reference}", scopes=self.scopes(repo),
                headers={"Accept": self._accept(accept)}, stream=True,
            )
            try:
                if resp.status_code != 200:
                    raise self.error_for(resp, f"get {what}")
                if int(resp.headers.get("content-length") or 0) > MAX_MANIFEST_SIZE:
                    raise FormatError(f"{what} exceeds {MAX_MANIFEST_SIZE} bytes")
                data = read_all(self, resp, MAX_MANIFEST_SIZE)  # stops once past the cap
            finally:
                resp.close()
            if len(data) > MAX_MANIFEST_SIZE:
                raise FormatError(f"{what} exceeds {MAX_MANIFEST_SIZE} bytes")
            return resp, data

        resp, data = self.retrying(once, f"get {what}")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        if not media_type or media_type in ("application/json", "application/octet-stream", "text/plain"):
            try:
                doc = json_loads(data)
                media_type = str(doc.get("mediaType") or media_type) if isinstance(doc, dict) else media_type
            except ValueError:
                pass
        digest = _manifest_digest(data, reference, what)
        if not _is_digest(reference):
            claimed = resp.headers.get("docker-content-digest", "")
            if claimed.startswith("sha256:") and claimed != digest:
                raise IntegrityError(f"{what}: content does not match Docker-Content-Digest")
        return data, media_type, digest

    def head_manifest(self, repo: str, reference: str, accept: Sequence[str] = ()) -> ManifestInfo | None:
        """Descriptor of a manifest, or ``None`` if it does not exist."""
        self._check_ref(reference)
        resp = self._call("HEAD", f"/v2/{repo}/manifests/{reference}", scopes=self.scopes(repo),
                          headers={"Accept": self._accept(accept)})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self.error_for(resp, f"head manifest {repo}:{reference}")
        digest = resp.headers.get("docker-content-digest", "")
        size = resp.headers.get("content-length", "")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        if not digest or not size.isdigit() or not media_type:
            data, media_type, digest = self.get_manifest(repo, reference, accept)
            return ManifestInfo(media_type, digest, len(data))
        if _is_digest(reference) and digest != reference:
            raise IntegrityError(f"manifest {repo}@{reference}: registry reports digest {digest}")
        return ManifestInfo(media_type, digest, int(size))

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under a tag or its digest; returns its digest."""
        self._check_ref(reference)
        if len(data) > MAX_MANIFEST_SIZE:
            raise FormatError(f"manifest for {repo} exceeds {MAX_MANIFEST_SIZE} bytes")
        digest = _manifest_digest(data, reference, f"manifest for {repo}@{reference}")
        what = f"put manifest {repo}:{reference}"

        def once() -> None:
            resp = self._call("PUT", f"/v2/{repo}/manifests/{reference}", scopes=self.scopes(repo, "pull,push"),
                              headers={"Content-Type": media_type}, content=bytes(data))
            if resp.status_code not in (200, 201, 202):
                raise self.error_for(resp, what)
            claimed = resp.headers.get("docker-content-digest", "")
            if claimed and claimed.split(":")[0] == digest.split(":")[0] and claimed != digest:
                raise _StoredOther(f"{what}: registry stored digest {claimed}", retries=2, after=0.0)

        try:  # bytes damaged in transit: the registry stored (and tagged) other bytes; send them again
            self.retrying(once, what, on=_StoredOther)
        except _StoredOther as e:
            raise IntegrityError(str(e)) from None
        return digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        check_digest(digest)
        resp = self._call("DELETE", f"/v2/{repo}/manifests/{digest}", scopes=self.scopes(repo, "delete"))
        if resp.status_code not in (200, 202, 204):
            raise self.error_for(resp, f"delete manifest {repo}@{digest}")

    # -- referrers (referrers.py) ------------------------------------------
    def referrers(self, repo: str, digest: str, artifact_type: str | None = None,
                  fallback: bool = True, api: bool = True) -> list[dict[str, Any]]:
        """Descriptors of manifests whose ``subject`` is ``digest``: the referrers API (unless ``api`` is
        false: known absent), else (with ``fallback``) the tag schema."""
        return referrers(self, repo, digest, artifact_type, fallback, api)

    def has_referrers_api(self, repo: str, digest: str) -> bool:
        """Whether the registry serves the referrers API (else the tag schema stands in for it)."""
        return has_referrers_api(self, repo, digest)

    def put_referrer_tag_index(self, repo: str, subject_digest: str, descriptor: dict[str, Any]) -> str:
        """Append ``descriptor`` to the tag-schema referrers index of ``subject_digest``."""
        return put_referrer_tag_index(self, repo, subject_digest, descriptor)

    # -- blobs: read -------------------------------------------------------
    def has_blob(self, repo: str, digest: str) -> int | None:
        """Size of the blob if the registry has it, else ``None``."""
        check_digest(digest)
        resp = self._call("HEAD", f"/v2/{repo}/blobs/{digest}", scopes=self.scopes(repo))
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self.error_for(resp, f"head blob {repo}@{digest}")
        length = resp.headers.get("content-length", "")
        return int(length) if length.isdigit() else 0

    def open_blob_stream(self, repo: str, digest: str, *, size: int | None = None) -> BlobReader:
        """A streaming reader; raises IntegrityError at EOF if content or size is wrong."""
        return BlobReader(self, repo, digest, size)

    def get_blob(self, repo: str, digest: str, *, size: int | None = None) -> bytes:
        with self.open_blob_stream(repo, digest, size=size) as r:
            return r.read()

    def get_blob_to_file(self, repo: str, digest: str, path: str | os.PathLike[str], *,
                         size: int | None = None) -> int:
        """Stream a blob into ``path`` (atomically, only once verified); returns its size."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=str(target.parent))
        try:
            with os.fdopen(fd, "wb") as f, self.open_blob_stream(repo, digest, size=size) as r:
                for chunk in r:
                    f.write(chunk)
                total = r.offset
            os.replace(tmp, target)
            return total
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get_blob_ranges(self, repo: str, digest: str, ranges: Sequence[tuple[int, int]], *,
                        concurrency: int | None = None) -> list[bytes]:
        """``[blob[off:off+length] for off, length in ranges]`` via HTTP Range.

        Near ranges (gap <= ``range_merge_gap``) are merged and the merged
        spans fetched in parallel (``concurrency``, default
        ``range_concurrency``) over keep-alive connections.  If the server
        ignores Range (200), the full body is fetched once, verified against
        ``digest`` and sliced for every range of the call.  Content-Range is
        checked on every 206.
        """
        return fetch_ranges(self, repo, digest, ranges, concurrency or self.range_concurrency)

    # -- blobs: write ------------------------------------------------------
    def put_blob(self, repo: str, digest: str, data_or_file: BlobSource, size: int, *,
                 mount_from: str | None = None, check_exists: bool = True) -> PutBlobResult:
        """Make blob ``digest`` exist in ``repo``; returns "exists", "mounted" or "uploaded".

        HEAD first (unless ``check_exists`` is False: the caller just did); then a cross-repo
        mount from ``mount_from`` if given;
        blobs up to ``monolithic_max`` go in one POST+PUT, larger ones in
        ``chunk_size`` PATCHes.  ``data_or_file`` is bytes, a binary file
        (read from its current position) or a path.  The content is checked
        against ``digest`` before the upload is committed; a lost session is
        restarted from scratch (seekable sources only).
        """
        return put_blob(self, repo, digest, data_or_file, size, mount_from, check_exists)

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount of ``digest`` from ``from_repo`` into ``repo``; True if the registry
        linked it, False if it cannot or will not (an upload session it offers instead is dropped)."""
        return mount_blob(self, repo, digest, from_repo)

    def delete_blob(self, repo: str, digest: str) -> None:
        check_digest(digest)
        resp = self._call("DELETE", f"/v2/{repo}/blobs/{digest}", scopes=self.scopes(repo, "delete"))
        if resp.status_code not in (200, 202, 204):
            raise self.error_for(resp, f"delete blob {repo}@{digest}")
