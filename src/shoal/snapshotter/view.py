"""The containerd view of a Shoal image (docs/spec/oci-mapping.md §4).

containerd runs only images whose config is an OCI image config and whose layers are OCI layers
with one diff id each.  The view is a small OCI image manifest next to the Shoal manifest:

* config: the Shoal config document (already a valid OCI config) with media type
  ``application/vnd.oci.image.config.v1+json`` and ``rootfs.diff_ids`` = [the stub's digest];
* one layer, the *stub*: an uncompressed tar holding ``.shoal-image`` (the Shoal manifest digest,
  so every image has its own diff id and chain id), media type
  ``application/vnd.oci.image.layer.shoal.v1`` and the annotation
  ``containerd.io/snapshot/shoal.image: <Shoal manifest digest>``, which containerd forwards to
  the snapshotter as a Prepare label.

With ``shoal snapshotter`` the stub is never downloaded (remote snapshot, ALREADY_EXISTS).  Without
it, containerd downloads only the stub (a few KiB) and stops at once with
``failed to extract layer sha256:…: failed to get stream processor for
application/vnd.oci.image.layer.shoal.v1: no processor for media-type: unknown``
(an ``application/vnd.oci.image.layer.v1.tar+…`` type would be applied as a plain tar).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

from shoal.snapshotter.remote import SHOAL_IMAGE_LABEL

__all__ = ["STUB_MEDIA_TYPE", "ContainerdView", "containerd_view"]

STUB_MEDIA_TYPE = "application/vnd.oci.image.layer.shoal.v1"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class ContainerdView:
    manifest: bytes
    config: bytes
    stub: bytes

    def blobs(self) -> dict[str, bytes]:
        return {_digest(b): b for b in (self.config, self.stub)}

    @property
    def digest(self) -> str:
        return _digest(self.manifest)


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _stub(shoal_digest: str) -> bytes:
    data = (shoal_digest + "\n").encode()
    ti = tarfile.TarInfo(".shoal-image")
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(data), 0o444, 0, "", ""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def containerd_view(shoal_digest: str, shoal_config: bytes) -> ContainerdView:
    """The view of the Shoal image whose manifest has digest ``shoal_digest`` and config ``shoal_config``;
    byte-reproducible."""
    stub = _stub(shoal_digest)
    cfg = json.loads(shoal_config)
    cfg["rootfs"] = {"type": "layers", "diff_ids": [_digest(stub)]}
    config = _canonical(cfg)
    manifest = _canonical({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": STUB_MEDIA_TYPE, "digest": _digest(stub), "size": len(stub),
                    "annotations": {SHOAL_IMAGE_LABEL: shoal_digest}}],
        "annotations": {"dev.shoal.image": shoal_digest},
    })
    return ContainerdView(manifest, config, stub)
