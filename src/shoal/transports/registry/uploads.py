"""Blob uploads behind :class:`~.client.RegistryClient`, built on its public surface.

A cross-repository mount (the one place it is asked for: ``start_upload``), monolithic POST+PUT,
chunked PATCH; restarted from scratch through the client's one retry loop when the registry loses
the session (rewindable sources only).  The content is checked against its digest before the
upload is committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal
from urllib.parse import quote, urljoin

import httpx

from shoal.errors import IntegrityError, TransportError, UsageError

from .auth import merge_scopes
from .blobs import check_digest, digest_of, hasher, with_query
from .responses import Transient

if TYPE_CHECKING:
    from .client import RegistryClient

__all__ = ["PutBlobResult", "BlobSource", "Source", "UploadStart", "upload_scopes", "start_upload", "mount_blob",
           "put_blob"]

log = logging.getLogger(__name__)

PutBlobResult = Literal["exists", "mounted", "uploaded"]
BlobSource = bytes | bytearray | memoryview | IO[bytes] | str | os.PathLike[str]

_TRANSIT_CODES = ("DIGEST_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID")  # on a verified source: damage on the way
_MOUNT_REFUSED = frozenset({401, 403, 404, 405})  # no permission on the source, or mounts unsupported
_OCTET = {"Content-Type": "application/octet-stream"}


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


@dataclass(frozen=True)
class UploadStart:
    """How a POST to ``/blobs/uploads/`` went: ``mounted`` (201 to a mount), else the upload session's
    URL in ``location`` (``""`` when a mount was refused and no session was opened)."""

    mounted: bool
    location: str = ""


def upload_scopes(client: RegistryClient, repo: str, mount_from: str | None) -> tuple[str, ...]:
    """Push to ``repo``, and pull from ``mount_from`` when mounting from another repository."""
    extra = client.scopes(mount_from) if mount_from and mount_from != repo else ()
    return merge_scopes(client.scopes(repo, "pull,push") + extra)


def start_upload(client: RegistryClient, repo: str, digest: str, scopes: Sequence[str], mount_from: str | None,
                 *, refused_ok: bool = False) -> UploadStart:
    """One POST (no retries) that opens an upload session in ``repo``, asking first for a cross-repository
    mount of ``digest`` from ``mount_from`` if given.  With ``refused_ok``, a registry that refuses
    the mount (401, 403, 404, 405) gives ``UploadStart(False)`` instead of an error."""
    url = f"/v2/{repo}/blobs/uploads/"
    if mount_from:
        url += f"?mount={quote(digest, safe='')}&from={quote(mount_from, safe='')}"
    resp = client.request("POST", url, scopes=scopes, headers={"Content-Length": "0"})
    if resp.status_code == 201 and mount_from:
        return UploadStart(True)
    if resp.status_code == 202 and resp.headers.get("location"):
        return UploadStart(False, urljoin(str(resp.request.url), resp.headers["location"]))
    if refused_ok and mount_from and resp.status_code in _MOUNT_REFUSED:
        log.debug("mount of %s from %s: HTTP %d", digest, mount_from, resp.status_code)
        resp.close()
        return UploadStart(False)
    what = f"mount {digest} into {repo}" if refused_ok else f"start upload to {repo}"
    raise client.error_for(resp, what)


def mount_blob(client: RegistryClient, repo: str, digest: str, from_repo: str) -> bool:
    """See :meth:`RegistryClient.mount_blob`."""
    scopes = upload_scopes(client, repo, from_repo)
    start = client.retrying(lambda: start_upload(client, repo, digest, scopes, from_repo, refused_ok=True),
                            f"mount {digest} into {repo}")
    if start.location:  # an upload session instead: drop it
        _cancel(client, start.location, scopes)
    return start.mounted


def put_blob(client: RegistryClient, repo: str, digest: str, data: BlobSource, size: int,
             mount_from: str | None, check_exists: bool = True) -> PutBlobResult:
    """See :meth:`RegistryClient.put_blob`."""
    hasher(check_digest(digest))
    scopes = upload_scopes(client, repo, mount_from)
    if mount_from is not None:
        client.scopes(mount_from)  # a valid name, even when it is ``repo``
    if size < 0:
        raise UsageError(f"invalid blob size {size}")
    if check_exists and client.has_blob(repo, digest) is not None:
        return "exists"
    src = Source(data)
    try:
        if not src.rewindable:
            return _upload_once(client, repo, digest, src, size, mount_from, scopes)
        return client.retrying(lambda: _upload_once(client, repo, digest, src, size, mount_from, scopes),
                               f"upload of {digest} to {repo}")  # each retry starts again from a fresh POST
    finally:
        src.close()


def _lost(client: RegistryClient, resp: httpx.Response, repo: str) -> Transient:
    resp.close()
    return Transient(f"upload to {repo}: {client.host} answered HTTP {resp.status_code}")


def _upload_once(client: RegistryClient, repo: str, digest: str, src: Source, size: int,
                 mount_from: str | None, scopes: Sequence[str]) -> PutBlobResult:
    start = start_upload(client, repo, digest, scopes, mount_from)
    if start.mounted:
        return "mounted"
    src.rewind()
    if size <= client.monolithic_max:
        resp = _put_whole(client, digest, src, size, start.location, scopes)
    else:
        resp = _put_chunks(client, repo, digest, src, size, start.location, scopes)
    if resp.status_code not in (201, 204):
        if resp.status_code in (404, 416) or resp.status_code >= 500:
            raise _lost(client, resp, repo)
        raise client.error_for(resp, f"finish upload to {repo}", transient_codes=_TRANSIT_CODES)
    claimed = resp.headers.get("docker-content-digest", "")
    if claimed and claimed != digest:
        raise IntegrityError(f"blob {digest}: registry stored digest {claimed}")
    return "uploaded"


def _put_whole(client: RegistryClient, digest: str, src: Source, size: int, loc: str,
               scopes: Sequence[str]) -> httpx.Response:
    """The monolithic upload: the whole (verified) blob in the closing PUT."""
    body = src.read(size)
    if len(body) != size:
        raise IntegrityError(f"blob {digest}: source has {len(body)} bytes, expected {size}")
    h = hasher(digest)
    h.update(body)
    if digest_of(h, digest) != digest:
        raise IntegrityError(f"blob {digest}: source content does not match the digest")
    return client.request("PUT", with_query(loc, "digest", digest), scopes=scopes, headers=_OCTET, content=body)


def _put_chunks(client: RegistryClient, repo: str, digest: str, src: Source, size: int, loc: str,
                scopes: Sequence[str]) -> httpx.Response:
    """The chunked upload: ``chunk_size`` PATCHes, then (the content verified) an empty closing PUT."""
    h = hasher(digest)
    offset = 0
    while offset < size:
        chunk = src.read(min(client.chunk_size, size - offset))
        if not chunk:
            break
        h.update(chunk)
        loc = _patch(client, repo, loc, scopes, chunk, offset)
        offset += len(chunk)
    problem = ""
    if offset != size:
        problem = f"source has {offset} bytes, expected {size}"
    elif digest_of(h, digest) != digest:
        problem = "source content does not match the digest"
    if problem:
        _cancel(client, loc, scopes)
        raise IntegrityError(f"blob {digest}: {problem}")
    return client.request("PUT", with_query(loc, "digest", digest), scopes=scopes, headers={"Content-Length": "0"})


def _patch(client: RegistryClient, repo: str, loc: str, scopes: Sequence[str], chunk: bytes, offset: int) -> str:
    """One PATCH of ``chunk`` at ``offset``; the session's next URL."""
    rng = f"{offset}-{offset + len(chunk) - 1}"
    resp = client.request("PATCH", loc, scopes=scopes, content=chunk, headers={**_OCTET, "Content-Range": rng})
    if resp.status_code != 202:
        if resp.status_code in (400, 404, 416) or resp.status_code >= 500:
            raise _lost(client, resp, repo)  # session lost, e.g. registry restarted
        raise client.error_for(resp, f"upload chunk to {repo}")
    got = resp.headers.get("range", "")
    if got and got.rsplit("-", 1)[-1] != str(offset + len(chunk) - 1):
        raise Transient(f"upload to {repo}: {client.host} acknowledged range {got}, sent {rng}")
    return urljoin(str(resp.request.url), str(resp.headers.get("location") or loc))


def _cancel(client: RegistryClient, loc: str, scopes: Sequence[str]) -> None:
    try:
        client.request("DELETE", loc, scopes=scopes).close()
    except TransportError:
        pass
