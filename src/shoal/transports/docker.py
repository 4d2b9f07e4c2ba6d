"""The ``docker://`` transport: images in an OCI distribution registry (docs/transports.md §docker).

References use skopeo's syntax and meaning: ``docker://[HOST[:PORT]/]REPO[:TAG|@DIGEST]``.  A name
without a registry host is on Docker Hub (``docker.io``), and a one-component Hub name is in
``library/``; no tag and no digest means ``:latest``; a tag together with a digest is refused (as
skopeo 1.9 does).  ``str(ref)`` is the familiar form (``docker://busybox:latest``), which parses
back to an equal reference.

Options: the ``SystemContext`` (transports/context.py) given to ``new_source``/``new_destination``/
``delete``: ``auth_file`` (``--authfile``: replaces the primary auth file), ``credentials``,
``tls_verify``, ``ca_bundle``, ``cert_dir``, ``plain_http``, ``concurrency``, ``retries``, ``backoff``,
``timeout``, ``min_rate``, ``chunk_size`` (PATCH uploads above it), ``registries_conf`` (a
registries.conf replacing the system one), ``blob_info_cache_dir`` (the record of where blobs were seen,
registry/blobinfo.py), and for destinations ``tags`` (extra tags written at ``commit()``).

Sources and destinations record in the blob-info cache where they saw each blob; a destination mounts a
blob it lacks from the source repository on the same registry, then from the cache's candidates on that
registry (docs/transports.md §2.2).

containers-registries.conf(5) applies as in containers/image (registry/sysregistries.py): a source
tries the ``[[registry.mirror]]`` endpoints in order, then the primary location (the matched prefix
rewritten); the first that serves the manifest serves the blobs, and a blob read that fails there tries
the others (everything is verified by digest, so any endpoint will do).  ``insecure`` endpoints are
reached with ``tls_verify=False``; ``blocked`` registries are refused for pulls, pushes and deletes;
destinations go to the reference itself, never a mirror or a rewritten location.  The transfer itself
(verification, resume, which blobs move) is the copier's; this module maps the transport contract
onto :class:`RegistryClient`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, TypeVar, cast

from shoal.digest import VerifiedBlob
from shoal.errors import IntegrityError, NotFound, ShoalError, TransportError, UsageError
from shoal.format.manifest import json_loads
from shoal.transports.base import (
    BlobInfo,
    ImageDestination,
    ImageReference,
    ImageSource,
    PolicyScope,
    Referrer,
    SystemContext,
    Transport,
    referrer_kind,
    register,
)
from shoal.transports.context import TAG_RE as _TAG_RE
from shoal.transports.registry import RegistryClient, RegistryStats
from shoal.transports.registry.blobinfo import BlobInfoCache, RecordWhenVerified, SeenOnce, cache_for
from shoal.transports.registry.blobs import check_digest
from shoal.transports.registry.referrers import merge_signature_manifests, signature_tag
from shoal.transports.registry.sysregistries import load as load_registries_conf

__all__ = ["DockerReference", "DockerTransport", "DockerSource", "DockerDestination", "RegistryOptions",
           "parse_docker", "make_client", "PullEndpoint", "pull_endpoints",
           "short_name_candidates"]

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
_DOMAIN_COMP = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMP}(?:\.{_DOMAIN_COMP})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_PATH_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_MAX_NAME = 255
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_T = TypeVar("_T")


class DockerTransport(Transport):
    name = "docker"

    def parse(self, details: str) -> "DockerReference":
        return parse_docker(details)


TRANSPORT = register(DockerTransport())


@dataclass(frozen=True)
class DockerReference(ImageReference):
    """``host`` is the registry (``docker.io`` for Hub), ``repo`` the full repository path."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None
    transport = TRANSPORT

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def familiar_name(self) -> str:
        if self.host == DOCKER_HUB:
            rest = self.repo[len("library/"):]
            return rest if self.repo.startswith("library/") and "/" not in rest else self.repo
        return f"{self.host}/{self.repo}"

    def details(self) -> str:
        name = self.familiar_name()
        return "//" + name + (f"@{self.digest}" if self.digest else f":{self.tag}")

    def with_tag(self, tag: str) -> "DockerReference":
        return DockerReference(self.host, self.repo, tag, None)

    def pinned(self, digest: str) -> "DockerReference":
        return DockerReference(self.host, self.repo, None, check_digest(digest))

    def sibling_tag(self, tag: str) -> "DockerReference":
        return self.with_tag(tag)

    def policy_scope(self) -> PolicyScope:
        """As containers/image's docker transport: the identity ``HOST/REPO:TAG`` (or ``@DIGEST``), then
        ``HOST/REPO``, each parent namespace, ``HOST``, then ``*.DOMAIN`` wildcards of the host."""
        name = f"{self.host}/{self.repo}"
        ident = name + (f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}")
        spaces = [name]
        while "/" in name:
            name = name.rsplit("/", 1)[0]
            spaces.append(name)
        host = self.host
        while "." in host:
            host = host.split(".", 1)[1]
            spaces.append("*." + host)
        return PolicyScope("docker", ident, tuple(spaces), ident)

    def new_source(self, ctx: SystemContext | None = None) -> "DockerSource":
        ctx = ctx or SystemContext()
        return DockerSource(self, pull_endpoints(self, ctx), cache_for(ctx.blob_info_cache_dir))

    def new_destination(self, ctx: SystemContext | None = None) -> "DockerDestination":
        o = _push_options(self, ctx or SystemContext())
        return DockerDestination(self, make_client(self.host, o), o.tags, cache_for(o.blob_info_cache_dir))

    def delete(self, ctx: SystemContext | None = None) -> None:
        """Delete the manifest the reference names (every tag pointing at it goes, as in skopeo)."""
        with make_client(self.host, _push_options(self, ctx or SystemContext())) as client:
            digest = self.digest
            if digest is None:
                info = client.head_manifest(self.repo, self.reference)
                if info is None:
                    raise NotFound(f"no image {self} in the registry")
                digest = info.digest
            client.delete_manifest(self.repo, digest)


def parse_docker(details: str) -> DockerReference:
    """Parse the part after ``docker:`` (it starts with ``//``)."""
    if not details.startswith("//"):
        raise UsageError(f"invalid reference docker:{details[:100]!r}: want docker://HOST/REPO:TAG")
    text = details[2:]
    shown = f"docker://{text[:200]}"
    name, at, digest = text.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise UsageError(f"invalid digest in {shown!r}")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag in {shown!r}")
    if tag is not None and at:
        raise UsageError(f"{shown!r}: docker references with both a tag and a digest are not supported")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        host, path = first, rest
        if not _DOMAIN_RE.fullmatch(host):
            raise UsageError(f"invalid registry host in {shown!r}")
    else:
        host, path = DOCKER_HUB, name
    if host.lower() in _HUB_ALIASES:
        host = DOCKER_HUB
    if host == DOCKER_HUB and path and "/" not in path:
        path = "library/" + path
    if not path or not _PATH_RE.fullmatch(path):
        raise UsageError(f"invalid repository name in {shown!r} (lowercase letters, digits, . _ - and /)")
    if len(host) + 1 + len(path) > _MAX_NAME:
        raise UsageError(f"repository name in {shown[:80]!r}... is longer than {_MAX_NAME} characters")
    return DockerReference(host, path, None if at else (tag or "latest"), digest if at else None)


# ------------------------------------------------------------------------------------------ options


#: The options of this transport are the ``SystemContext``'s (transports/context.py); the old name stays
#: for callers that spell it so.
RegistryOptions = SystemContext


def make_client(host: str, o: SystemContext) -> RegistryClient:
    """A RegistryClient for ``host`` with ``o``: the system's CAs plus ``ca_bundle`` and the ``*.crt`` of
    ``cert_dir`` or /etc/{containers,docker}/certs.d/HOST, and a client certificate from there (registry/tls.py)."""
    chunk = o.chunk_size or 8 * 1024 * 1024
    return RegistryClient(
        host, tls_verify=o.tls_verify, ca_bundle=o.ca_bundle, cert_dir=o.cert_dir, plain_http=o.plain_http,
        credentials=o.credentials, timeout=o.timeout, max_connections=max(8, 2 * o.concurrency), retries=o.retries,
        backoff=o.backoff, range_concurrency=o.concurrency, min_rate=o.min_rate, monolithic_max=chunk,
        chunk_size=chunk if o.chunk_size else 2 * chunk, auth_file=o.auth_file,
    )


# ------------------------------------------------------------------------------------------ registries.conf


@dataclass(frozen=True)
class PullEndpoint:
    """One place to pull an image from: ``ref`` is the image there, ``options`` how to reach it."""

    ref: DockerReference
    options: SystemContext
    mirror: bool = False


def _push_options(ref: DockerReference, o: SystemContext) -> SystemContext:
    """A destination (or delete) is the reference itself: its ``[[registry]]``'s blocked and insecure only."""
    reg = load_registries_conf(o.registries_conf).find(f"{ref.host}/{ref.repo}")
    if reg is not None and reg.blocked:
        raise UsageError(f"registry {reg.prefix} is blocked in {reg.origin}")
    return replace(o, tls_verify=False) if reg is not None and reg.insecure else o


def pull_endpoints(ref: DockerReference, o: SystemContext) -> tuple[PullEndpoint, ...]:
    """Where to pull ``ref`` from, in order (mirrors, then the primary), per registries.conf.

    ``credentials`` given in ``o`` go only to endpoints on the reference's own host; the others look
    theirs up in the auth files.  A mirror on a blocked registry is left out."""
    conf = load_registries_conf(o.registries_conf)
    name = f"{ref.host}/{ref.repo}"
    reg, sources = conf.pull_sources(name, ref.digest is not None)
    if reg is not None and reg.blocked:
        raise UsageError(f"registry {reg.prefix} is blocked in {reg.origin}")
    out = []
    for s in sources:
        if reg is None:
            r = ref
        else:
            r = parse_docker("//" + s.name + (f"@{ref.digest}" if ref.digest else f":{ref.tag or 'latest'}"))
        if s.mirror:
            mreg = conf.find(f"{r.host}/{r.repo}")
            if mreg is not None and mreg.blocked:
                log.info("skipping mirror %s of %s: its registry is blocked in %s", r.host, name, mreg.origin)
                continue
        ro = o
        if s.insecure:
            ro = replace(ro, tls_verify=False)
        if r.host != ref.host and ro.credentials is not None:
            ro = replace(ro, credentials=None)
        out.append(PullEndpoint(r, ro, s.mirror))
    return tuple(out)


# ------------------------------------------------------------------------------------------ source

# what makes a pull move on to the next endpoint: it is down, refuses us, or has not got the image
_NEXT_ENDPOINT = (TransportError, NotFound, IntegrityError)


class DockerSource(ImageSource):
    """An image in a registry, pulled from the first of ``endpoints`` (mirrors, then the primary) that
    serves its manifest; blob reads stay there, and try the other endpoints when that one fails."""

    def __init__(self, ref: DockerReference, endpoints: Sequence[PullEndpoint],
                 cache: BlobInfoCache | None = None) -> None:
        if not endpoints:
            raise UsageError(f"no registry to pull {ref} from (every mirror is blocked)")
        self.ref = ref
        self.endpoints = tuple(endpoints)
        self.seen = SeenOnce(cache)
        self._clients: dict[int, RegistryClient] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._top: tuple[bytes, str] | None = None
        self._referrers_api: bool | None = None  # whether the registry answers the referrers API; None: unknown
        self._api_lock = threading.Lock()

    @property
    def client(self) -> RegistryClient:
        """The client of the endpoint in use."""
        return self._client(self._active)

    @property
    def repo(self) -> str:
        """The repository at the endpoint in use (the reference's own, unless a prefix was rewritten)."""
        return self.endpoints[self._active].ref.repo

    @property
    def stats(self) -> RegistryStats:
        with self._lock:
            clients = list(self._clients.values())
        total = RegistryStats()
        for c in clients:
            total.requests += c.stats.requests
            total.bytes_fetched += c.stats.bytes_fetched
            total.bytes_sent += c.stats.bytes_sent
            total.retries += c.stats.retries
        return total

    def follow(self, other: "DockerSource") -> None:
        """Start at the endpoint ``other`` uses (a mount daemon's fresh source: where the manifest came
        from), speaking to it as ``other`` found out (no second TLS probe of a loopback registry)."""
        if other.endpoints == self.endpoints:
            self._active = other._active
            with other._lock:
                known = other._clients.get(other._active)
            if known is not None:
                self._client(self._active).learn_scheme(known)

    def _client(self, i: int) -> RegistryClient:
        with self._lock:
            c = self._clients.get(i)
            if c is None:
                ep = self.endpoints[i]
                c = self._clients[i] = make_client(ep.ref.host, ep.options)
            return c

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
        self.seen.release()

    def _try(self, fn: "Callable[[RegistryClient, str], _T]", order: Sequence[int], what: str,
             seen: str | None = None) -> "_T":
        """``fn(client, repo)`` at each endpoint of ``order`` until one answers; the last error if none does.
        ``seen``: the blob it reads, recorded in the blob-info cache where it was served."""
        err: ShoalError | None = None
        for i in order:
            ep = self.endpoints[i]
            try:
                out = fn(self._client(i), ep.ref.repo)
                if seen is not None:
                    self.seen.record(ep.ref.host, ep.ref.repo, seen)
            except _NEXT_ENDPOINT as exc:
                if len(order) == 1:
                    raise
                log.info("%s from %s/%s failed (%s); trying the next source", what, ep.ref.host, ep.ref.repo, exc)
                err = exc
                continue
            if i != self._active or err is not None or (ep.mirror and what == "manifest"):
                log.info("%s of %s served by %s/%s%s", what, self.ref, ep.ref.host, ep.ref.repo,
                         " (mirror)" if ep.mirror else "")
            self._active = i
            return out
        assert err is not None
        raise err

    def _any(self) -> list[int]:
        a = self._active
        return [a] + [i for i in range(len(self.endpoints)) if i != a]

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        if digest is None:
            if self._top is None:  # fetched once: a tag that moves mid-copy must not mix two images
                raw, media, _ = self._try(lambda c, repo: c.get_manifest(repo, self.ref.reference),
                                          range(len(self.endpoints)), "manifest")
                self._top = (raw, media)
            return self._top
        check_digest(digest)  # a child's digest from an index: never a tag, never a path
        raw, media, _ = self._try(lambda c, repo: c.get_manifest(repo, digest), self._any(), "manifest")
        return raw, media

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        size_hint = info.size if info.size >= 0 else None

        def open_at(c: RegistryClient, repo: str) -> RecordWhenVerified:
            return RecordWhenVerified(c.open_blob_stream(repo, info.digest, size=size_hint), self.seen, c.host, repo)

        stream = self._try(open_at, self._any(), "blob")
        size = stream.size if stream.size is not None else info.size
        return cast(BinaryIO, stream), size

    def get_verified_blob(self, info: BlobInfo) -> VerifiedBlob:
        # the registry stream hashes every byte as it reads it: what it hashed is the blob, not hashed again
        size_hint = info.size if info.size >= 0 else None

        def read_at(c: RegistryClient, repo: str) -> VerifiedBlob:
            with RecordWhenVerified(c.open_blob_stream(repo, info.digest, size=size_hint), self.seen, c.host,
                                    repo) as stream:
                return stream.read_verified()

        return self._try(read_at, self._any(), "blob")

    def get_blob_ranges(self, info: BlobInfo, ranges: list[tuple[int, int]]) -> list[bytes]:
        # the ranges are not the whole blob: its chunks are verified by the reader; that the registry served
        # them under this digest is what makes the repository a place to mount it from
        return self._try(lambda c, repo: c.get_blob_ranges(repo, info.digest, ranges), self._any(), "blob ranges",
                         seen=info.digest)

    def has_blob(self, info: BlobInfo) -> bool:
        found = self.client.has_blob(self.repo, info.digest) is not None
        if found:
            self.seen.record(self.endpoints[self._active].ref.host, self.repo, info.digest)
        return found

    def referrers(self, digest: str) -> list[Referrer]:
        """The cosign attachment at ``sha256-<hex>.sig`` (an error reading it is an error, as skopeo's), then
        the OCI referrers (the referrers API, else the ``sha256-<hex>`` tag-schema index): a referrer that
        cannot be read is logged and left out.  Other signature manifests the referrers list names are left
        out when the ``.sig`` tag exists (it is what containers/image and cosign read)."""
        check_digest(digest)
        out: list[Referrer] = []
        try:
            raw, media = self._manifest_at(signature_tag(digest))
            out.append(Referrer(digest, raw, media or OCI_MANIFEST, "signature"))
        except NotFound:
            pass
        try:
            listed = self._listed(digest)
        except ShoalError as exc:
            log.warning("referrers of %s in %s/%s not read (%s): not carried", digest,
                        self.endpoints[self._active].ref.host, self.repo, exc)
            return out
        have = {r.digest for r in out}
        for d in listed:
            rd = d.get("digest")
            if not isinstance(rd, str) or rd in have:
                continue
            try:
                raw, media = self.get_manifest(rd)
                if "sha256:" + hashlib.sha256(raw).hexdigest() != rd:
                    raise IntegrityError(f"referrer {rd} does not match its digest")
            except ShoalError as exc:
                log.warning("referrer %s of %s not read (%s): not carried", rd, digest, exc)
                continue
            kind = referrer_kind(raw)
            if kind == "signature" and any(r.kind == "signature" for r in out):
                continue
            have.add(rd)
            out.append(Referrer(digest, raw, media or str(d.get("mediaType") or OCI_MANIFEST), kind))
        return out

    def _listed(self, digest: str) -> list[dict[str, Any]]:
        """The referrers API's list, else the tag-schema index's; a registry found without the API is not
        asked again by this source (one request per digest fewer)."""
        with self._api_lock:  # the first lookup asks; lookups running beside it wait for its answer
            if self._referrers_api is None:
                self._referrers_api = self.client.has_referrers_api(self.repo, digest)
            api = self._referrers_api
        return self.client.referrers(self.repo, digest, api=api)

    def _manifest_at(self, tag: str) -> tuple[bytes, str]:
        raw, media, _ = self._try(lambda c, repo: c.get_manifest(repo, tag), [self._active], "manifest")
        return raw, media


# ------------------------------------------------------------------------------------------ destination


class DockerDestination(ImageDestination):
    """Blobs go up as they come (HEAD first, then mount or upload); the tagged manifest at ``commit()``."""

    runtime_view = True  # a Shoal image is tagged as an index with its runtime view (oci-mapping.md §4)

    def __init__(self, ref: DockerReference, client: RegistryClient, tags: tuple[str, ...] = (),
                 cache: BlobInfoCache | None = None) -> None:
        self.ref = ref
        self.client = client
        self.tags = tags
        self.stats: RegistryStats = client.stats
        self._top: tuple[bytes, str] | None = None
        self.mounted = 0
        self._mounted_lock = threading.Lock()
        self.seen = SeenOnce(cache)
        self.digest = ""  # of the top manifest, once committed

    def close(self) -> None:
        self.client.close()
        self.seen.release()

    def has_blob(self, info: BlobInfo) -> bool:
        found = self.client.has_blob(self.ref.repo, info.digest) is not None
        if found:
            self.seen.record(self.ref.host, self.ref.repo, info.digest)
        return found

    def try_reuse_blob(self, info: BlobInfo, source_ref: ImageReference | None) -> bool:
        """HEAD here; else a cross-repository mount from the source's repository when it is on this registry,
        then from the repositories of this registry the blob-info cache saw it in, most recent first, at
        most ``MAX_CANDIDATES`` (docs/transports.md §2.2)."""
        if self.has_blob(info):
            return True
        tried = {self.ref.repo}
        if (isinstance(source_ref, DockerReference) and source_ref.host == self.ref.host
                and source_ref.repo != self.ref.repo):
            tried.add(source_ref.repo)
            if self._mount(info.digest, source_ref.repo):
                return True
        for repo in self.seen.candidates(self.ref.host, info.digest, self.ref.repo):
            if repo in tried:
                continue
            tried.add(repo)
            try:
                ok = self._mount(info.digest, repo)
            except ShoalError as exc:  # a hint gone wrong is no reason to fail: the upload follows
                log.info("mount of %s from %s/%s failed (%s); trying the next place", info.digest,
                         self.ref.host, repo, exc)
                continue
            if ok:
                return True
            log.debug("%s/%s no longer serves %s to us: forgotten", self.ref.host, repo, info.digest)
            self.seen.forget(self.ref.host, repo, info.digest)
        return False

    def _mount(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True if the registry linked the blob (201)."""
        if not self.client.mount_blob(self.ref.repo, digest, from_repo):
            return False
        with self._mounted_lock:
            self.mounted += 1
        self.seen.record(self.ref.host, self.ref.repo, digest)
        self.seen.record(self.ref.host, from_repo, digest)  # it was there: the most recent place to mount from
        return True

    def put_blob(self, stream: BinaryIO, info: BlobInfo) -> None:
        # Spool first: the copier's stream is verified at EOF before anything is committed, and an upload
        # the registry loses (restart, 5xx) can start again from a rewindable copy.
        with tempfile.SpooledTemporaryFile(max_size=self.client.monolithic_max, prefix="shoal-up-") as spool:
            while True:
                b = stream.read(1 << 20)
                if not b:
                    break
                spool.write(b)
            size = spool.tell()
            if info.size >= 0 and size != info.size:  # as every transport: the announced size binds too
                raise IntegrityError(f"blob {info.digest}: {size} bytes where {info.size} were announced; "
                                     "not uploaded")
            spool.seek(0)
            # the copier asked try_reuse_blob (a HEAD) just before: don't ask again
            self.client.put_blob(self.ref.repo, info.digest, cast(BinaryIO, spool), size, check_exists=False)
        self.seen.record(self.ref.host, self.ref.repo, info.digest)

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        if digest is not None:  # a child of an index: by digest, never tagged
            self.client.put_manifest(self.ref.repo, digest, raw, media_type)
            self._referrer(raw, media_type, digest)
            return
        self._top = (raw, media_type)

    def commit(self) -> None:
        if self._top is None:
            raise NotFound("nothing to commit: no manifest was written")
        raw, media = self._top
        digest = self.client.put_manifest(self.ref.repo, self.ref.reference, raw, media)
        for t in self.tags:
            if t != self.ref.tag:
                self.client.put_manifest(self.ref.repo, t, raw, media)
        self._referrer(raw, media, digest)
        self.digest = digest

    keeps_referrers = True

    def put_referrer(self, ref: Referrer, subject: dict[str, Any]) -> None:
        """A signature goes to the ``sha256-<hex>.sig`` tag, merged with the one there (its layers kept, the
        new payloads appended: containers/image's way); any referrer is pushed by digest, and listed in the
        ``sha256-<hex>`` tag-schema index where the registry has no referrers API."""
        if ref.kind != "signature":
            self.client.put_manifest(self.ref.repo, ref.digest, ref.manifest, ref.media_type)
            self._referrer(ref.manifest, ref.media_type, ref.digest)
            return
        tag = signature_tag(ref.subject)
        raw = ref.manifest
        try:
            have, _, have_digest = self.client.get_manifest(self.ref.repo, tag, [OCI_MANIFEST])
        except NotFound:
            have, have_digest = None, ""
        if have is not None and have_digest != ref.digest:
            raw, config = merge_signature_manifests(have, ref.manifest)
            info = BlobInfo("sha256:" + hashlib.sha256(config).hexdigest(), len(config), "")
            if not self.has_blob(info):
                self.client.put_blob(self.ref.repo, info.digest, config, len(config))
            if raw == have:
                return
        digest = self.client.put_manifest(self.ref.repo, tag, raw, OCI_MANIFEST)
        self._referrer(raw, OCI_MANIFEST, digest)

    def _referrer(self, raw: bytes, media: str, digest: str) -> None:
        """A manifest with ``subject``: keep the tag-schema referrers index where there is no referrers API."""
        try:
            doc = json_loads(raw)
        except ValueError:
            return
        subject = doc.get("subject") if isinstance(doc, dict) else None
        if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
            return
        if self.client.has_referrers_api(self.ref.repo, subject["digest"]):
            return
        desc: dict[str, Any] = {"mediaType": media, "digest": digest, "size": len(raw)}
        at = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
        if isinstance(at, str) and at:
            desc["artifactType"] = at
        if isinstance(doc.get("annotations"), dict):
            desc["annotations"] = doc["annotations"]
        self.client.put_referrer_tag_index(self.ref.repo, subject["digest"], desc)


# ------------------------------------------------------------------------------------------ short names


def short_name_candidates(text: str, registries_conf: str | None = None) -> tuple[DockerReference, ...] | None:
    """The ``docker://`` references to try for ``text`` when it is a short name (``busybox``,
    ``team/app:1.2``, ``app@sha256:...``: no registry host), in order; None when it is not one.

    Podman's resolution without a prompt (registry/sysregistries.py ``resolve_short_name``): an alias
    from registries.conf(.d) or short-name-aliases.conf, else the unqualified-search-registries
    (``enforcing`` refuses more than one).  Explicit ``docker://`` references never come here."""
    from shoal.transports.registry.sysregistries import is_short_name, resolve_short_name

    name, at, digest = text.partition("@")
    suffix = f"@{digest}" if at else ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, suffix = name[:colon], name[colon:] + suffix
    if not is_short_name(name):
        return None
    names, _ = resolve_short_name(name, load_registries_conf(registries_conf))
    return tuple(parse_docker("//" + n + suffix) for n in names)


def short_name_store_name(text: str, first: DockerReference) -> str:
    """The store name a pull of short name ``text`` gets by default: the short name itself, with the
    tag of its first candidate when it names none."""
    base = text.partition("@")[0]
    return base if base.rfind(":") > base.rfind("/") else f"{base}:{first.tag or 'latest'}"


def first_candidate(text: str, cands: Sequence[ImageReference], attempt: Callable[[ImageReference], _T]) -> _T:
    """``attempt(c)`` for each candidate of short name ``text`` in order, the next one when a registry is
    down or lacks the image (as podman pull); the last failure, naming every candidate, when none works."""
    err: ShoalError | None = None
    for c in cands:
        try:
            return attempt(c)
        except (NotFound, TransportError) as exc:
            if len(cands) == 1:
                raise
            err = exc
    if err is None:
        raise NotFound(f"short name {text!r} has no candidate")
    raise type(err)(f"short name {text!r}: no candidate could be pulled ({', '.join(map(str, cands))}); last: {err}")
