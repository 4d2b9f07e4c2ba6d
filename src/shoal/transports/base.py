"""The three roles every transport plays: reference, source, destination (docs/transports.md).

Contracts (every implementation honours them; tests/conformance runs the same suite on each):

- A **reference** is parsed once, is immutable, and ``str(ref)`` round-trips to the same
  ``transport:details`` text that ``parse_reference`` accepts.
- A **source** serves the manifest (and, for an image index, child manifests by digest) and blobs.
  It does NOT verify blobs: the copier verifies every byte it moves against the descriptor's
  digest and size while streaming. Sources must be closed (use them as context managers).
- A **destination** receives blobs first, then manifests, then ``commit()``. ``has_blob`` lets the
  copier skip blobs that are already there; ``put_blob`` must not make a blob visible until all of
  it has arrived and matches its digest; nothing written before a failed ``commit()`` may become
  visible under the reference (blobs may remain, as garbage). Destinations must be closed.
- A destination may offer a **partial pull** (``partial_pull()``, like containers/image's
  ``SupportsPutBlobPartial``): for a Shoal image the copier hands it the source and the manifest,
  it fetches only the frames the destination lacks and ``put_manifest``s the manifest, and the copier
  then calls ``commit()`` as for any copy.  The copier names no concrete transport.
- **Referrers** (docs/spec/trust.md §6): a source lists the manifests stored beside an image that refer to
  one of its manifests (``referrers(digest)``: cosign signatures, SBOMs, profiles, any OCI referrer), and a
  destination that keeps them (``keeps_referrers``) takes each one with ``put_referrer`` after ``commit()``,
  its blobs put first by the copier, verified as any blob.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from shoal import mediatypes as mt
from shoal.digest import VerifiedBlob
from shoal.errors import FormatError, NotFound, UsageError
from shoal.format.manifest import canonical_json, json_loads
from shoal.progress import Sink
from shoal.transports.context import SystemContext

if TYPE_CHECKING:
    from shoal.unpack import UnpackRequest, UnpackResult

__all__ = [
    "ImageReference",
    "ImageSource",
    "ImageDestination",
    "Transport",
    "TRANSPORTS",
    "BUILTIN",
    "register",
    "transport_named",
    "all_transports",
    "parse_reference",
    "BlobInfo",
    "SystemContext",
    "PartialPull",
    "PartialPullResult",
    "PolicyScope",
    "Referrer",
    "referrer_kind",
    "subject_of",
    "with_subject",
]


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int  # -1 if unknown
    media_type: str = ""


class ImageReference(abc.ABC):
    """A parsed, immutable ``transport:details`` reference."""

    transport: "Transport"

    @abc.abstractmethod
    def details(self) -> str:
        """The part after ``transport:``, such that parsing it again gives an equal reference."""

    def __str__(self) -> str:
        return f"{self.transport.name}:{self.details()}" if self.transport.name else self.details()

    @abc.abstractmethod
    def new_source(self, ctx: SystemContext | None = None) -> "ImageSource":
        """A source reading the image, reached as ``ctx`` says (default ``SystemContext()``)."""

    @abc.abstractmethod
    def new_destination(self, ctx: SystemContext | None = None) -> "ImageDestination": ...

    def delete(self, ctx: SystemContext | None = None) -> None:
        raise UsageError(f"{self.transport.name}: deleting images is not supported")

    def policy_scope(self) -> "PolicyScope | None":
        """Where containers-policy.json looks this image up (docs/spec/trust.md §4); None: the image is not
        subject to the signature policy (the local store: what is in it was admitted when it came in)."""
        return PolicyScope(self.transport.name, self.details(), ())

    def pinned(self, digest: str) -> "ImageReference":
        """This image named by the manifest ``digest`` (what a policy check decided on), where the
        transport names images by digest; else the reference itself."""
        return self

    def sibling_tag(self, tag: str) -> "ImageReference | None":
        """The reference to ``tag`` in this image's repository (where signatures are attached:
        ``sha256-<hex>.sig``), or None where the transport keeps no such tags."""
        return None


@dataclass(frozen=True)
class PolicyScope:
    """An image as containers-policy.json names it: the transport, the image's own scope, and the enclosing
    scopes from the most specific to the least (docker: repository, namespaces, host, ``*.domain``)."""

    transport: str
    identity: str
    namespaces: tuple[str, ...]
    docker_name: str = ""  # docker only: HOST/REPO[:TAG|@DIGEST], the identity signatures are matched with


@dataclass(frozen=True)
class Referrer:
    """A manifest kept beside an image that refers to the manifest ``subject`` (docs/spec/trust.md §6).

    ``kind`` is ``"signature"`` for cosign's attachment (its layers are simple-signing payloads; a registry
    keeps it at the ``sha256-<hex>.sig`` tag) and ``"artifact"`` for any other referrer (SBOM, profile)."""

    subject: str
    manifest: bytes
    media_type: str
    kind: str = "artifact"

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def descriptor(self) -> dict[str, Any]:
        """Its entry in a referrers list: mediaType, digest, size, and its artifactType and annotations."""
        d: dict[str, Any] = {"mediaType": self.media_type or mt.OCI_MANIFEST, "digest": self.digest,
                             "size": len(self.manifest)}
        try:
            doc = json_loads(self.manifest)
        except ValueError:
            return d
        if isinstance(doc, dict):
            at = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if isinstance(at, str) and at:
                d["artifactType"] = at
            ann = doc.get("annotations")
            if isinstance(ann, dict):  # never a name: a referrer is listed untagged
                d["annotations"] = {k: v for k, v in ann.items() if k != mt.ANN_REF_NAME}
        return d


def referrer_kind(raw: bytes) -> str:
    """``"signature"`` when the manifest ``raw`` is a cosign attachment (every layer a simple-signing
    payload), else ``"artifact"``."""
    try:
        doc = json_loads(raw)
    except ValueError:
        return "artifact"
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if isinstance(layers, list) and layers and all(
            isinstance(ly, dict) and ly.get("mediaType") == mt.COSIGN_SIGNATURE for ly in layers):
        return "signature"
    return "artifact"


def subject_of(raw: bytes) -> str | None:
    """The ``subject`` digest of the manifest ``raw``, or None."""
    try:
        doc = json_loads(raw)
    except ValueError:
        return None
    subj = doc.get("subject") if isinstance(doc, dict) else None
    d = subj.get("digest") if isinstance(subj, dict) else None
    return d if isinstance(d, str) else None


def with_subject(raw: bytes, subject: dict[str, Any]) -> bytes:
    """``raw`` itself when it names a ``subject``; else the manifest with ``subject`` added (canonical JSON),
    so that a layout or the store, which find referrers by their subject, can list it (cosign's own
    ``.sig`` manifests have none: the digest changes, the signatures in it do not)."""
    if subject_of(raw) is not None:
        return raw
    doc = json_loads(raw)
    if not isinstance(doc, dict):
        raise FormatError("a referrer manifest must be a JSON object")
    doc["subject"] = {k: subject[k] for k in ("mediaType", "digest", "size")}
    return canonical_json(doc)


class ImageSource(abc.ABC):
    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        """(raw bytes, media type) of the top manifest or index, or of the child ``digest``."""

    @abc.abstractmethod
    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        """A stream of the blob's bytes (unverified) and its size (-1 if unknown)."""

    def get_verified_blob(self, info: BlobInfo) -> VerifiedBlob:
        """The whole blob in memory, its digest (and size, if known) checked; IntegrityError if it does
        not match.  Default: read ``get_blob``'s stream and hash it; a source whose stream hashes every
        byte as it reads it (a registry) hands over what it hashed instead of hashing it twice."""
        stream, _ = self.get_blob(info)
        with stream:
            data = stream.read()
        return VerifiedBlob.check(data, info.digest, info.size if info.size >= 0 else None)

    def get_blob_ranges(self, info: BlobInfo, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Bytes of each (offset, length) range of a blob (unverified).  Default: read the stream."""
        stream, _ = self.get_blob(info)
        with stream:
            data = stream.read()
        out = []
        for off, ln in ranges:
            if off + ln > len(data):
                raise NotFound(f"range {off}+{ln} past the end of blob {info.digest}")
            out.append(data[off : off + ln])
        return out

    def referrers(self, digest: str) -> list[Referrer]:
        """The manifests kept beside this image that refer to its manifest ``digest`` (signatures, SBOMs,
        profiles), each read and checked against its digest.  Default: none (the transport keeps none).
        A signature that cannot be read raises; another referrer that cannot be read is logged and left out."""
        return []

    def has_blob(self, info: BlobInfo) -> bool:
        try:
            s, _ = self.get_blob(info)
            s.close()
            return True
        except NotFound:
            return False


class ImageDestination(abc.ABC):
    #: False for formats that hold one image (docker-archive): the copier then picks one platform.
    supports_index: bool = True
    #: True for registries: the copier tags a Shoal image as an image index that lists its runtime view
    #: first (containerd, podman) and the Shoal manifest (oci-mapping.md §4).
    runtime_view: bool = False
    #: True for the local store: an image copied here passes the signature policy first (a pull;
    #: docs/spec/trust.md §4), before anything is written.
    enforces_policy: bool = False
    #: True where referrers (signatures, SBOMs, profiles) can be kept beside the image: ``put_referrer``.
    keeps_referrers: bool = False

    def __enter__(self) -> "ImageDestination":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    def has_blob(self, info: BlobInfo) -> bool:
        """True if the destination already holds this blob (so the copier skips it)."""

    def try_reuse_blob(self, info: BlobInfo, source_ref: ImageReference | None) -> bool:
        """Make ``info`` available without sending bytes (e.g. a cross-repository mount).  Default: has_blob."""
        return self.has_blob(info)

    @abc.abstractmethod
    def put_blob(self, stream: BinaryIO, info: BlobInfo) -> None:
        """Store a blob.  The stream is already being verified by the copier; raise if it ends short."""

    @abc.abstractmethod
    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        """Store a manifest or index.  ``digest`` set: a child of an index (not tagged itself)."""

    def commit(self) -> None:  # noqa: B027
        """Make the image visible under the reference."""

    def put_referrer(self, ref: Referrer, subject: dict[str, Any]) -> None:
        """Keep ``ref`` beside the image (after ``commit()``; its blobs are here already), merged with what
        is kept for ``subject`` (its descriptor: mediaType, digest, size) and never replacing it."""
        raise UsageError(f"{type(self).__name__}: this destination keeps no referrers")

    def partial_pull(self) -> "PartialPull | None":
        """This destination's chunk-level pull of Shoal images, or None (the default): whole blobs only."""
        return None


@dataclass(frozen=True)
class PartialPullResult:
    """What a partial pull moved: payload bytes and chunks fetched, packs it did not need to fetch."""

    bytes_fetched: int = 0
    chunks_fetched: int = 0
    blobs_skipped: int = 0
    unpacked: UnpackResult | None = None  # with ``unpack``: what was written there


class PartialPull(abc.ABC):
    """A destination capability: pull a Shoal image fetching only what the destination lacks.

    ``pull`` reads the config, index and needed frames from ``src``, verifies every byte it keeps, and
    ends with the destination's own ``put_manifest(raw, ...)``; the copier then calls ``commit()``, the
    one path that makes the image visible under the reference.
    """

    @abc.abstractmethod
    def pull(self, src: ImageSource, raw: bytes, concurrency: int, sink: Sink,
             digest: str | None = None, unpack: UnpackRequest | None = None) -> PartialPullResult:
        """Pull the Shoal image whose manifest is ``raw`` (as the copier read it) from ``src``; ``digest``
        set: it is that child of an image index, put by digest (never the top manifest).  ``unpack`` set:
        the image's tree is written there too, while it is pulled (each frame read once, decompressed
        once, every chunk hashed before a byte of it is written)."""


class Transport(abc.ABC):
    name: str

    @abc.abstractmethod
    def parse(self, details: str) -> ImageReference: ...


TRANSPORTS: dict[str, Transport] = {}  # the transports loaded so far (all of them after all_transports())

# transport name -> the module that registers it, imported on first use, so that reading a local
# image never loads the HTTP stack (docs/transports.md)
BUILTIN: dict[str, str] = {"": "local", "oci": "oci_layout", "oci-archive": "oci_archive",
                           "docker-archive": "docker_archive", "dir": "dirtransport", "docker": "docker"}


def register(t: Transport) -> Transport:
    TRANSPORTS[t.name] = t
    return t


def transport_named(name: str) -> Transport | None:
    """The transport called ``name`` ("" is the local store), loading a built-in one on first use."""
    t = TRANSPORTS.get(name)
    if t is None and name in BUILTIN:
        importlib.import_module(f"shoal.transports.{BUILTIN[name]}")
        t = TRANSPORTS.get(name)
    return t


def all_transports() -> dict[str, Transport]:
    """Every transport, the built-in ones loaded."""
    for name in BUILTIN:
        transport_named(name)
    return TRANSPORTS


def parse_reference(text: str) -> ImageReference:
    """``transport:details``; text without a known transport prefix is a local store NAME[:TAG]."""
    name, sep, rest = text.partition(":")
    t = transport_named(name) if sep and name else None
    if t is not None:
        if name == "docker" and not rest.startswith("//"):
            raise UsageError(f"invalid reference {text!r}: docker references look like docker://HOST/REPO:TAG")
        return t.parse(rest)
    local = transport_named("")
    if local is None:
        raise UsageError(f"unknown transport in {text!r}")
    return local.parse(text)


def iter_chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        b = stream.read(size)
        if not b:
            return
        yield b
