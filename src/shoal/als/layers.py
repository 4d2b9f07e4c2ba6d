"""What podman's additional layer store asks, answered for Shoal images (docs/podman.md).

containers/storage looks up ``<store>/<base64(ref)>/<compressed layer digest>/{diff,info,blob}``
for every layer of a manifest it pulls.  A Shoal manifest's layers are the index, then the packs
(docs/spec/oci-mapping.md §1), so the mapping is:

- the **index** layer's ``diff`` is the image's whole tree: a lazy Shoal mount of the image;
- each **pack** layer's ``diff`` is empty (its bytes are reached through the index layer's mount);
- the **stub** layer of the image's runtime view (oci-mapping.md §4: what ``shoal push`` lists first at the
  tag, so podman pulls it) is the image's whole tree too.

``info`` tells c/storage the layer's digests and sizes.  ``diff-digest`` (the layer's "DiffID")
cannot be the sha256 of an uncompressed tar, since there is none: the index layer's is the image's
Merkle root (the same tree gives the same layer), a pack layer's is the digest of an empty tar; the
stub's is its own digest (an uncompressed tar), the diff id the view's config lists.
Resolution goes through Shoal's docker:// code with the usual credentials (as ``shoal pull``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from enum import Enum

from shoal.errors import NotFound, UsageError
from shoal.format.manifest import ShoalManifest
from shoal.format.runtime_view import stub_layer
from shoal.transports.base import parse_reference
from shoal.transports.context import SystemContext

__all__ = ["LayerKind", "Layer", "Resolver", "decode_ref", "EMPTY_TAR_DIGEST", "DIGEST_RE"]

log = logging.getLogger(__name__)

#: sha256 of 1024 zero bytes: the DiffID of an empty tar layer (Docker's "empty layer").
EMPTY_TAR_DIGEST = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
DIGEST_RE = re.compile(rb"^sha256:[0-9a-f]{64}$")
_COMPRESSION_NONE = 0
_COMPRESSION_ZSTD = 4  # containers/storage pkg/archive Compression: Uncompressed 0, Bzip2 1, Gzip 2, Xz 3, Zstd 4


class LayerKind(Enum):
    TREE = "tree"  # the index layer: diff is the image's lazy mount
    EMPTY = "empty"  # a pack layer: diff is an empty directory


@dataclass(frozen=True)
class Layer:
    ref: str  # the reference podman was given, e.g. 127.0.0.1:5000/app:1
    digest: str  # the layer's (compressed) digest, as in the manifest
    kind: LayerKind
    manifest_digest: str
    mount_ref: str  # docker://REPO@MANIFEST-DIGEST: what the lazy mount opens
    info: bytes  # the info file's JSON
    size: int  # the blob's size (the manifest's layer size)
    data: bytes | None = None  # the blob's bytes when they are computed, not fetched (the stub)


def decode_ref(prefix: str) -> str:
    """The reference a ``<base64(ref)>`` path names (standard base64 with padding; a ``/`` of the
    encoding is a path separator), or UsageError."""
    try:
        text = base64.b64decode(prefix.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise UsageError("not a base64 reference") from None
    if not text or any(c.isspace() for c in text) or len(text) > 1024:
        raise UsageError("not a reference")
    return text


def _repository(ref: str) -> str:
    """``host/repo`` of ``host/repo:tag`` or ``host/repo@digest``."""
    if "@" in ref:
        return ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


class Resolver:
    """Reference -> Shoal manifest (cached; fetched again when asked for a digest it lacks)."""

    def __init__(self, ctx: SystemContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[ShoalManifest, int]] = {}

    def _fetch(self, ref: str) -> tuple[ShoalManifest, int]:
        from shoal.transports.resolve import resolve_image

        r = parse_reference("docker://" + ref)
        src = r.new_source(self.ctx)
        try:
            res = resolve_image(src, r, self.ctx.platform)
        finally:
            src.close()
        if res.manifest is None or res.index is None:
            raise NotFound(f"{ref} is not a Shoal image")
        return res.manifest, res.index.logical_bytes

    def layer(self, ref: str, digest: str) -> Layer:
        """The layer ``digest`` of the Shoal image ``ref``; NotFound if it has no such layer."""
        with self._lock:
            cached = self._cache.get(ref)
        if cached is None or not _has(cached[0], digest):
            cached = self._fetch(ref)
            with self._lock:
                self._cache[ref] = cached
        m, tree_bytes = cached
        mount_ref = f"docker://{_repository(ref)}@{m.digest}"
        stub = stub_layer(m.digest)
        if digest == _sha(stub):
            # diff-size is the stub's own: c/image checks it against the bytes of ``blob`` (podman save/push)
            info = {"compressed-diff-digest": digest, "compressed-size": len(stub), "diff-digest": digest,
                    "diff-size": len(stub), "compression": _COMPRESSION_NONE}
            kind, size, data = LayerKind.TREE, len(stub), stub
        elif digest == m.index.digest:
            info = {"compressed-diff-digest": digest, "compressed-size": m.index.size, "diff-digest": m.root,
                    "diff-size": tree_bytes, "compression": _COMPRESSION_ZSTD}
            kind, size, data = LayerKind.TREE, m.index.size, None
        else:
            pack = next((p for p in m.packs if p.digest == digest), None)
            if pack is None:
                raise NotFound(f"{ref} has no layer {digest}")
            info = {"compressed-diff-digest": digest, "compressed-size": pack.size, "diff-digest": EMPTY_TAR_DIGEST,
                    "diff-size": 1024, "compression": _COMPRESSION_ZSTD}
            kind, size, data = LayerKind.EMPTY, pack.size, None
        return Layer(ref, digest, kind, m.digest, mount_ref, json.dumps(info, sort_keys=True).encode(), size, data)


def _has(m: ShoalManifest, digest: str) -> bool:
    return (digest in (m.index.digest, _sha(stub_layer(m.digest)))
            or any(p.digest == digest for p in m.packs))


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()
