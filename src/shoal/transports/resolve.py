"""What an image reference names, read the same way through every transport (docs/transports.md §reading).

``resolve_image(source, ref, platform)`` reads the top manifest as stored (``inspect --raw``), picks
an image index's image for ``platform`` by ``shoal.format.platform.choose`` (a Shoal child wins over
a classic one of the same platform), and reads its config (``inspect --config``) and, for a Shoal
image, its index blob -- never a pack or a layer.  Everything is verified: a child manifest against
the index's descriptor, config and index against theirs, the index against the manifest's root and
pack table.  No transport is special-cased: ``docker://``, ``oci:``, ``oci-archive:``, ``dir:``,
``docker-archive:`` and the store all serve ``get_manifest``/``get_blob``.

``SourceFrames`` turns any ``ImageSource`` into a frame source (``fetch(pack, offset, length)``
through ``get_blob_ranges``): range requests on a registry, reads of the pack files of a layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound
from shoal.format import index as fidx
from shoal.format.manifest import ShoalManifest, json_object, parse_manifest
from shoal.format.model import Index
from shoal.format.platform import choose
from shoal.format.runtime_view import for_readers, view_of
from shoal.reader import FrameSource
from shoal.transports.base import BlobInfo, ImageReference, ImageSource

__all__ = ["ResolvedImage", "resolve_image", "decode_index", "SourceFrames", "FORMAT_SHOAL", "FORMAT_CLASSIC"]

FORMAT_SHOAL = "shoal"
FORMAT_CLASSIC = "classic"
_MAX_META = 256 * 1024 * 1024  # config and index blobs are read whole


@dataclass(frozen=True)
class ResolvedImage:
    """One image of a reference: its bytes as stored, and, for a Shoal image, its manifest and index."""

    ref: ImageReference
    top: bytes  # the manifest or image index the reference names, byte for byte (inspect --raw)
    top_media_type: str
    raw: bytes  # the image's manifest (``top``, or the index's child for the platform)
    digest: str  # of ``raw``
    media_type: str
    config: bytes  # the config blob (inspect --config), verified
    manifest: ShoalManifest | None = None  # Shoal images only
    index: Index | None = None

    @property
    def format(self) -> str:
        return FORMAT_SHOAL if self.manifest is not None else FORMAT_CLASSIC

    @property
    def top_digest(self) -> str:
        return _sha(self.top)

    def layers(self) -> list[dict[str, Any]]:
        """The manifest's layer descriptors (a classic image's layers, a Shoal image's index and packs)."""
        layers = json_object(self.raw).get("layers")
        return [d for d in layers if isinstance(d, dict)] if isinstance(layers, list) else []


def _sha(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _is_index(raw: bytes, media: str) -> bool:
    return media in mt.INDEX_TYPES or "manifests" in json_object(raw)


def _blob(src: ImageSource, d: Any, what: str) -> bytes:
    """A small blob of descriptor ``d``, verified against its digest and size."""
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str):
        raise FormatError(f"{what} has no valid descriptor")
    size = d.get("size")
    if not isinstance(size, int) or not 0 <= size <= _MAX_META:
        raise FormatError(f"{what} {str(d['digest'])[:80]} has an invalid or oversized size")
    stream, _ = src.get_blob(BlobInfo(str(d["digest"]), size, str(d.get("mediaType", ""))))
    with stream:
        data = stream.read(size + 1)
    if len(data) != size or _sha(data) != d["digest"]:
        raise IntegrityError(f"{what} {d['digest']} does not match its descriptor")
    return data


def decode_index(m: ShoalManifest, blob: bytes) -> Index:
    """The index of ``m`` from its blob, checked against the manifest's root and pack table."""
    if len(blob) != m.index.size or _sha(blob) != m.index.digest:
        raise IntegrityError(f"index blob {m.index.digest} does not match its descriptor")
    idx = fidx.decode(fidx.decompress(blob))
    if "sha256:" + idx.root.hex() != m.root:
        raise FormatError("index root differs from the manifest's annotation")
    if len(idx.packs) != len(m.packs) or any("sha256:" + p.hex() != d.digest for p, d in zip(idx.packs, m.packs)):
        raise FormatError("index pack table differs from the manifest layers")
    return idx


def resolve_image(src: ImageSource, ref: ImageReference, platform: str | None = None, *,
                  with_index: bool = True) -> ResolvedImage:
    """Read what ``ref`` (served by ``src``) names for ``platform`` (default: this machine's); see the
    module text.  ``with_index=False`` leaves a Shoal image's index unread (``inspect --config``)."""
    top, top_media = src.get_manifest()
    raw, media = top, top_media
    if _is_index(top, top_media):
        kid = choose(for_readers(json_object(top).get("manifests")), platform, str(ref),
                     prefer=lambda m: m.get("artifactType") == mt.ARTIFACT_TYPE)
        digest = str(kid["digest"])
        raw, media = src.get_manifest(digest)
        if _sha(raw) != digest:
            raise IntegrityError(f"manifest {digest} of {ref} does not match its digest")
        media = str(kid.get("mediaType") or media)
    doc = json_object(raw)
    target = view_of(doc)
    if target is not None:  # a runtime view alone (e.g. skopeo copy without --all): its Shoal manifest
        try:
            raw, media = src.get_manifest(target)
        except NotFound:
            raise NotFound(f"{ref} is the runtime view of the Shoal image {target}, which it does not hold "
                           "(copy the whole image index, e.g. skopeo copy --all)") from None
        if _sha(raw) != target:
            raise IntegrityError(f"manifest {target} of {ref} does not match its digest")
        doc = json_object(raw)
    config = _blob(src, doc.get("config"), f"config of {ref}")
    manifest = index = None
    if doc.get("artifactType") == mt.ARTIFACT_TYPE:
        manifest = parse_manifest(raw)
        if with_index:
            index = decode_index(manifest, _blob(src, json_object(raw)["layers"][0], f"index of {ref}"))
    return ResolvedImage(ref, top, top_media, raw, _sha(raw), media, config, manifest, index)


class SourceFrames(FrameSource):
    """A frame source over any ``ImageSource``: each frame is one range of its pack blob
    (``get_blob_ranges``), unverified here (the reader verifies every chunk)."""

    def __init__(self, src: ImageSource) -> None:
        self.src = src

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        return self.src.get_blob_ranges(BlobInfo(pack, -1, mt.PACK), [(offset, length)])[0]

    def close(self) -> None:
        self.src.close()
