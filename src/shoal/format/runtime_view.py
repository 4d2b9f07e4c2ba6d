"""The runtime view of a Shoal image, and the image index ``shoal push`` publishes (oci-mapping.md §4).
Pure, no I/O.

containerd and podman run only images whose config is an OCI image config and whose layers are OCI
layers with one diff id each.  The *runtime view* is a small OCI image manifest beside the Shoal
manifest:

* config: the Shoal config document (already a valid OCI config) with media type
  ``application/vnd.oci.image.config.v1+json`` and ``rootfs.diff_ids`` = [the stub's digest];
* one layer, the *stub*: an uncompressed tar holding ``.shoal-image`` (the Shoal manifest digest, so
  every image has its own diff id and chain id), media type ``application/vnd.oci.image.layer.shoal.v1``
  and the annotation ``containerd.io/snapshot/shoal.image: <Shoal manifest digest>``, which containerd
  forwards to its snapshotter as a Prepare label (``shoal snapshotter``); podman's additional layer store
  (``shoal store serve``) answers for the stub's digest with the lazy mount of the whole image.  A second
  annotation, ``containerd.io/snapshot/shoal.index: <index digest>:<size>``, lets the snapshotter request
  the index beside the manifest (a hint: the manifest still decides which index is used).

A registry tag holds an OCI image index listing, per platform, the view (with the platform and an
annotation naming the Shoal manifest) and then the Shoal manifest with ``artifactType`` Shoal and the
platform ``unknown/unknown``, as buildkit lists attestation manifests: a runtime's platform matcher never
takes it (``ctr images pull`` fetches every entry of its platform, packs included, before it unpacks),
so a runtime without Shoal support fetches the view's few KiB and fails at once.  Shoal's readers read
the index through ``for_readers``: the view's entry stands for its Shoal manifest, with its platform.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from shoal import mediatypes as mt
from shoal.errors import FormatError
from shoal.format.manifest import canonical_json, json_object, parse_manifest
from shoal.format.platform import platform_json

__all__ = ["STUB_MEDIA_TYPE", "VIEW_LAYER_ANNOTATION", "VIEW_INDEX_ANNOTATION", "ANN_VIEW_OF", "ANN_INDEX",
           "RuntimeView", "runtime_view", "stub_layer", "view_of", "is_view_entry", "config_platform",
           "runtime_index", "for_readers", "index_of", "index_hint", "HIDDEN_PLATFORM"]

STUB_MEDIA_TYPE = "application/vnd.oci.image.layer.shoal.v1"
#: containerd forwards a layer annotation ``containerd.io/snapshot/*`` to its snapshotter as a label
VIEW_LAYER_ANNOTATION = "containerd.io/snapshot/shoal.image"
#: the Shoal image's index blob, ``sha256:<hex>:<size>``: also forwarded as a label (oci-mapping.md §4)
VIEW_INDEX_ANNOTATION = "containerd.io/snapshot/shoal.index"
#: on a view manifest and on its image index entry: the digest of the Shoal manifest it is the view of
ANN_VIEW_OF = "dev.shoal.image"
#: on a Shoal manifest's image index entry: its index blob, ``sha256:<hex>:<size>`` (a hint, §4.1)
ANN_INDEX = "dev.shoal.index"
#: the platform of a Shoal manifest listed beside its view: no runtime matches it
HIDDEN_PLATFORM = {"architecture": "unknown", "os": "unknown"}


@dataclass(frozen=True)
class RuntimeView:
    shoal_digest: str
    manifest: bytes
    config: bytes
    stub: bytes
    index: tuple[str, int] | None = None  # the Shoal image's index blob (digest, size), when known

    def blobs(self) -> dict[str, bytes]:
        return {_digest(b): b for b in (self.config, self.stub)}

    @property
    def digest(self) -> str:
        return _digest(self.manifest)

    @property
    def stub_digest(self) -> str:
        return _digest(self.stub)


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _stub(shoal_digest: str) -> bytes:
    data = (shoal_digest + "\n").encode()
    ti = tarfile.TarInfo(".shoal-image")
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(data), 0o444, 0, "", ""
    # header, the data block, the two zero blocks that end an archive: 2048 bytes (no record padding)
    return ti.tobuf(tarfile.USTAR_FORMAT) + data.ljust(512, b"\0") + bytes(1024)


def stub_layer(shoal_digest: str) -> bytes:
    """The stub layer of the view of ``shoal_digest`` (its digest is also its diff id): it depends on
    nothing else, so podman's layer store recognizes it from the Shoal manifest alone."""
    return _stub(shoal_digest)


def runtime_view(shoal_digest: str, shoal_config: bytes, index: tuple[str, int] | None = None) -> RuntimeView:
    """The view of the Shoal image whose manifest has digest ``shoal_digest``, config ``shoal_config`` and
    index blob ``index`` (digest, size; the Shoal manifest's, when known); byte-reproducible."""
    stub = _stub(shoal_digest)
    ann = {VIEW_LAYER_ANNOTATION: shoal_digest}
    if index is not None:
        ann[VIEW_INDEX_ANNOTATION] = f"{index[0]}:{index[1]}"
    cfg = json_object(shoal_config, "image config")
    cfg["rootfs"] = {"type": "layers", "diff_ids": [_digest(stub)]}
    config = canonical_json(cfg)
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": STUB_MEDIA_TYPE, "digest": _digest(stub), "size": len(stub),
                    "annotations": ann}],
        "annotations": {ANN_VIEW_OF: shoal_digest},
    })
    return RuntimeView(shoal_digest, manifest, config, stub, index)


def view_of(doc: Any) -> str | None:
    """The Shoal manifest digest a view manifest (parsed) stands for, or None if it is not a view."""
    if not isinstance(doc, dict) or doc.get("artifactType"):
        return None
    ann = doc.get("annotations")
    layers = doc.get("layers")
    if (not isinstance(ann, dict) or not isinstance(layers, list) or len(layers) != 1
            or not isinstance(layers[0], dict) or layers[0].get("mediaType") != STUB_MEDIA_TYPE):
        return None
    d = ann.get(ANN_VIEW_OF)
    return d if isinstance(d, str) else None


def is_view_entry(entry: Any) -> bool:
    """An image index entry that is a runtime view (its annotation names the Shoal manifest)."""
    return isinstance(entry, dict) and isinstance((entry.get("annotations") or {}).get(ANN_VIEW_OF), str)


def config_platform(config: bytes) -> dict[str, Any]:
    """The ``platform`` object of an image config's ``os``/``architecture``/``variant``."""
    return platform_json(json_object(config, "image config"))


def _entry(view: RuntimeView, platform: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": mt.OCI_MANIFEST, "digest": view.digest, "size": len(view.manifest),
                           "annotations": {ANN_VIEW_OF: view.shoal_digest}}
    if platform:
        out["platform"] = platform
    return out


def runtime_index(index: dict[str, Any] | None, views: dict[str, RuntimeView],
                  shoal: tuple[bytes, dict[str, Any]] | None = None) -> bytes:
    """The canonical image index that puts, before each Shoal entry, the view ``views[its digest]``.

    ``index`` is an image index (parsed) whose Shoal entries lack views; or None with ``shoal`` =
    (the Shoal manifest bytes, its platform): an index of that one image.  Entries without a view in
    ``views`` and the index's other fields stay as they are."""
    if index is None:
        assert shoal is not None
        raw, plat = shoal
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
            {"mediaType": mt.OCI_MANIFEST, "artifactType": mt.ARTIFACT_TYPE, "digest": _digest(raw),
             "size": len(raw), **({"platform": plat} if plat else {})}]}
    out: list[Any] = []
    for e in index.get("manifests") or []:
        view = views.get(e.get("digest", "")) if isinstance(e, dict) else None
        if view is not None:
            plat = e.get("platform") or config_platform(view.config)
            out.append(_entry(view, plat))
            e = {**e, "platform": dict(HIDDEN_PLATFORM)}
            if view.index is not None:  # a reader by tag requests the index beside this manifest
                e["annotations"] = {**(e.get("annotations") or {}), ANN_INDEX: f"{view.index[0]}:{view.index[1]}"}
        out.append(e)
    return canonical_json({**index, "mediaType": mt.OCI_INDEX, "manifests": out})


def registry_index(shoal_manifest: bytes, shoal_config: bytes) -> tuple[bytes, RuntimeView]:
    """The image index [view, Shoal manifest] a registry is given for the lone Shoal manifest
    ``shoal_manifest`` (§4.1), and the view: byte-reproducible, so its digest is known (signed, kept
    referrers of) before any push."""
    view = runtime_view(_digest(shoal_manifest), shoal_config, index_of(shoal_manifest))
    return runtime_index(None, {view.shoal_digest: view}, (shoal_manifest, config_platform(shoal_config))), view


def index_of(shoal_manifest: bytes) -> tuple[str, int] | None:
    """The (digest, size) of the index blob a Shoal manifest names (its layer 0), or None if it is not one."""
    try:
        d = parse_manifest(shoal_manifest).index
    except FormatError:
        return None
    return d.digest, d.size


def index_hint(value: Any) -> tuple[str, int] | None:
    """``sha256:<hex>:<size>`` (an index annotation or label) as (digest, size); None if it is not one."""
    if not isinstance(value, str):
        return None
    digest, _, size = value.rpartition(":")
    if not _HINT_DIGEST.fullmatch(digest) or not _HINT_SIZE.fullmatch(size):
        return None
    return digest, int(size)


_HINT_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HINT_SIZE = re.compile(r"[0-9]{1,12}")


def for_readers(manifests: Any) -> Any:
    """An image index's ``manifests`` as Shoal's readers choose among them: each runtime view whose Shoal
    manifest the index lists is replaced by that manifest's entry with the view's platform, and that
    entry's own (hidden) listing is dropped.  Anything else (and a list without views) is unchanged."""
    if not isinstance(manifests, list):
        return manifests
    listed = {e.get("digest"): e for e in manifests if isinstance(e, dict)}
    target = {id(e): str(e["annotations"][ANN_VIEW_OF]) for e in manifests if is_view_entry(e)}
    target = {k: d for k, d in target.items() if d in listed}
    if not target:
        return manifests
    shown = set(target.values())
    out: list[Any] = []
    for e in manifests:
        if id(e) in target:
            # the view says it is a Shoal image even where a tool wrote the index again without artifactType
            shoal = {k: v for k, v in listed[target[id(e)]].items() if k != "platform"}
            out.append({**shoal, "artifactType": mt.ARTIFACT_TYPE,
                        **({"platform": e["platform"]} if "platform" in e else {})})
        elif not (isinstance(e, dict) and e.get("digest") in shown):
            out.append(e)
    return out
