"""An SBOM stored beside its image as an OCI 1.1 referrer artifact (docs/sbom.md §5).

The artifact is an OCI image manifest with ``subject`` = the image's manifest descriptor,
``artifactType`` the SBOM's media type (``application/spdx+json`` or ``application/vnd.cyclonedx+json``),
the empty config, and the document as its only layer.  Its bytes depend only on the document and the
subject, so attaching the same SBOM twice stores one artifact.  In the local store it is listed,
untagged, in index.json (store.md §5); in a registry it is pushed by digest, and ``DockerDestination``
keeps the ``sha256-<hex>`` tag-schema referrers index where the registry has no referrers API.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal import mediatypes as mt
from shoal.errors import NotFound, UsageError

if TYPE_CHECKING:
    from shoal.store import Store
    from shoal.transports.context import SystemContext

__all__ = ["Artifact", "artifact", "attach_local", "push_artifact", "ANN_FORMAT", "ANN_CREATED"]

EMPTY_CONFIG = b"{}"
ANN_CREATED = "org.opencontainers.image.created"
ANN_FORMAT = "dev.shoal.sbom.format"  # spdx-json or cyclonedx-json


@dataclass(frozen=True)
class Artifact:
    manifest: bytes
    digest: str
    media_type: str  # the artifactType, also the layer's media type
    blobs: tuple[tuple[bytes, str, str], ...]  # (bytes, digest, media type): the empty config, the document

    def descriptor(self) -> dict[str, Any]:
        """Its entry in a referrers list (and in the store's index.json)."""
        doc = json.loads(self.manifest)
        return {"mediaType": mt.OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest),
                "artifactType": self.media_type, "annotations": doc["annotations"]}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def artifact(document: bytes, fmt: str, media_type: str, subject: dict[str, Any], created: str) -> Artifact:
    """The referrer artifact of ``document`` for the image manifest ``subject`` (a descriptor:
    mediaType, digest, size); ``created`` is the SBOM's own creation time (deterministic)."""
    if not {"mediaType", "digest", "size"} <= subject.keys():
        raise UsageError("the subject of an SBOM artifact needs mediaType, digest and size")
    cfg, lay = _sha(EMPTY_CONFIG), _sha(document)
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": media_type,
           "config": {"mediaType": mt.OCI_EMPTY, "digest": cfg, "size": len(EMPTY_CONFIG)},
           "layers": [{"mediaType": media_type, "digest": lay, "size": len(document)}],
           "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
           "annotations": {ANN_CREATED: created, ANN_FORMAT: fmt}}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return Artifact(raw, _sha(raw), media_type,
                    ((EMPTY_CONFIG, cfg, mt.OCI_EMPTY), (document, lay, media_type)))


def attach_local(store: "Store", art: Artifact) -> str:
    """Write ``art`` into the store and list it in index.json; return its digest."""
    with store.layout.writing():  # gc waits: it must not take the blobs before index.json lists them
        for data, digest, _ in art.blobs + ((art.manifest, art.digest, mt.OCI_MANIFEST),):
            if not store.layout.has(digest):
                store.layout.put(data, expected=digest)
        store.layout.add_referrer(art.descriptor())
    return art.digest


def push_artifact(ref_text: str, opts: "SystemContext | None", image_digest: str, document: bytes, fmt: str,
                  media_type: str, created: str) -> str:
    """Push ``document`` as a referrer of ``image_digest`` into the repository of ``ref_text``
    (``docker://...``); return the artifact manifest's digest."""
    from shoal.transports.base import BlobInfo, parse_reference
    from shoal.transports.docker import DockerReference

    ref = parse_reference(ref_text)
    if not isinstance(ref, DockerReference):
        raise UsageError(f"{ref_text!r} is not a docker:// reference")
    dst = ref.new_destination(opts)
    with dst:
        info = dst.client.head_manifest(ref.repo, image_digest)
        if info is None:
            raise NotFound(f"image {image_digest} is not in {ref.host}/{ref.repo}")
        art = artifact(document, fmt, media_type, info.descriptor(), created)
        for data, digest, media in art.blobs:
            bi = BlobInfo(digest, len(data), media)
            if not dst.has_blob(bi):
                dst.put_blob(io.BytesIO(data), bi)
        dst.put_manifest(art.manifest, mt.OCI_MANIFEST, art.digest)  # by digest; keeps the tag-schema index
    return art.digest
