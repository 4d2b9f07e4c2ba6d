"""Platforms, and Shoal image indexes in the local store (docs/spec/convert.md §2.3).

A multi-platform conversion is tagged as an OCI image index whose manifests are the
per-platform Shoal manifests, each with its ``platform``.  ``resolve_images`` reads a tag of either
kind (``Store.resolve_all``); choosing one platform follows ``shoal.format.platform.choose``.
"""

from __future__ import annotations

from typing import Any

from shoal import mediatypes as mt
from shoal.format.manifest import ShoalManifest, canonical_json
from shoal.format.platform import Platform, platform_json
from shoal.store import Store

__all__ = ["Platform", "ANN_SOURCE", "index_bytes", "write_index", "resolve_images", "platform_json"]

ANN_SOURCE = "dev.shoal.source.digest"  # the classic manifest or index a Shoal image was converted from

def index_bytes(items: list[tuple[dict[str, Any], ShoalManifest]], annotations: dict[str, str] | None = None) -> bytes:
    """The canonical bytes of a Shoal image index over ``items`` (platform, manifest), in that order."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {"mediaType": mt.OCI_MANIFEST, "artifactType": mt.ARTIFACT_TYPE, "digest": m.digest,
             "size": len(m.raw), "platform": plat}
            for plat, m in items
        ],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


def write_index(store: Store, ref: str, raw: bytes) -> str:
    """Store the index ``raw`` (from ``index_bytes``) and tag it ``ref``; return its digest."""
    return store.tag_index(ref, raw)


def resolve_images(store: Store, ref: str, platform: Platform | None = None
                   ) -> tuple[str, list[tuple[dict[str, Any], ShoalManifest]]]:
    """See ``Store.resolve_all``."""
    return store.resolve_all(ref, platform)
