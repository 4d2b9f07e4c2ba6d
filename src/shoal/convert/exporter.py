"""Export a Shoal image as a classic OCI image with one layer, derived from the index alone (convert.md §7).

The layer is ``tarwriter.tar_stream`` of the index, compressed deterministically; the config carries
the runtime fields back with ``rootfs.diff_ids = [sha256 of the tar]``; the manifest is canonical
JSON.  The same image exports to the same bytes on every run.  A Shoal image index exports as an OCI
image index over the per-platform classic images.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import mediatypes as mt
from shoal.convert.platforms import Platform, resolve_images
from shoal.convert.tarwriter import make_compressor, tar_stream
from shoal.errors import UsageError, from_oserror
from shoal.format.manifest import ImageConfig, ShoalManifest, canonical_json, parse_config
from shoal.progress import NULL, Sink
from shoal.reader import Reader, StoreSource
from shoal.store import Store
from shoal.store.layout import unlinked_tempfile
from shoal.transports.base import BlobInfo, ImageDestination

__all__ = ["export", "export_to_layout", "ExportResult", "ExportedImage", "oci_config", "LAYER_MEDIA_TYPES"]

LAYER_MEDIA_TYPES = {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD, "none": mt.OCI_LAYER_TAR}
_EXPORT_BY = "shoal export"


@dataclass(frozen=True)
class ExportedImage:
    platform: dict[str, Any]
    source: str  # the Shoal manifest digest
    manifest_digest: str
    manifest: bytes
    config_digest: str
    layer: BlobInfo
    diff_id: str
    tar_bytes: int


@dataclass(frozen=True)
class ExportResult:
    digest: str  # the top manifest (one image) or image index (several platforms)
    media_type: str
    raw: bytes
    images: tuple[ExportedImage, ...]
    seconds: float


def oci_config(cfg: ImageConfig, diff_id: str, root: str) -> bytes:
    """The OCI image config of the exported image (convert.md §7.4): canonical JSON, no timestamp that
    the Shoal config does not already carry."""
    doc: dict[str, Any] = {
        "architecture": cfg.architecture,
        "os": cfg.os,
        "config": cfg.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    if cfg.variant:
        doc["variant"] = cfg.variant
    for key in ("created", "author"):
        if isinstance(cfg.extra.get(key), str) and cfg.extra[key]:
            doc[key] = cfg.extra[key]
    history = cfg.extra.get("history")
    if isinstance(history, list) and history:
        # the source's layers are all flattened into one: its history entries become empty layers
        doc["history"] = [{**h, "empty_layer": True} for h in history if isinstance(h, dict)] + [
            {"created_by": _EXPORT_BY, "comment": f"flattened from Shoal root {root}"}]
    return canonical_json(doc)


class _TempBlob:
    """An unlinked temporary file in the store's tmp/: written once, then read back as a stream."""

    def __init__(self, tmpdir: Path) -> None:
        self.fd = unlinked_tempfile(tmpdir, "export")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.hash.update(data)
        self.size += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise from_oserror(exc, "cannot write a temp file", "", store=True) from None

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def open(self) -> Any:
        f = os.fdopen(os.dup(self.fd), "rb")
        f.seek(0)
        return f

    def close(self) -> None:
        os.close(self.fd)


def _export_one(store: Store, m: ShoalManifest, plat: dict[str, Any], dest: ImageDestination, compression: str,
                level: int | None, workers: int | None, child: bool, sink: Sink) -> ExportedImage:
    idx = store.load_index(m)
    cfg = parse_config(store.layout.get(m.config.digest))
    reader = Reader(idx, StoreSource(store))
    blob = _TempBlob(store.layout.tmp)
    try:
        comp = make_compressor(compression, blob.write, level, workers)
        uhash = hashlib.sha256()
        tar_bytes = 0
        sink.start("export", idx.logical_bytes)
        try:
            for part in tar_stream(idx, reader):
                uhash.update(part)
                tar_bytes += len(part)
                comp.write(part)
                sink.advance("export", len(part))
            comp.close()
        finally:
            comp.abort()
        sink.finish("export")
        diff_id = "sha256:" + uhash.hexdigest()
        layer = BlobInfo(blob.digest, blob.size, LAYER_MEDIA_TYPES[compression])
        if not dest.has_blob(layer):
            with blob.open() as f:
                dest.put_blob(f, layer)
    finally:
        blob.close()
    cfg_raw = oci_config(cfg, diff_id, m.root)
    cfg_info = BlobInfo("sha256:" + hashlib.sha256(cfg_raw).hexdigest(), len(cfg_raw), mt.OCI_CONFIG)
    if not dest.has_blob(cfg_info):
        dest.put_blob(io.BytesIO(cfg_raw), cfg_info)
    raw = canonical_json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": cfg_info.digest, "size": cfg_info.size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
        "annotations": {mt.ANN_ROOT: m.root},
    })
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    dest.put_manifest(raw, mt.OCI_MANIFEST, digest if child else None)
    if not plat:
        plat = {"architecture": cfg.architecture, "os": cfg.os}
        if cfg.variant:
            plat["variant"] = cfg.variant
    return ExportedImage(plat, m.digest, digest, raw, cfg_info.digest, layer, diff_id, tar_bytes)


def export(store: Store, ref: str, dest: ImageDestination, compression: str = "gzip", *,
           platform: str | Platform | None = None, level: int | None = None, workers: int | None = None,
           sink: Sink = NULL) -> ExportResult:
    """Write the Shoal image ``ref`` to ``dest`` as a classic OCI image (one layer) and commit it.

    ``compression``: ``gzip`` (level 6), ``zstd`` (level 3) or ``none``.  ``workers``: gzip threads
    (default: the cores); the bytes are the same for any number.  A Shoal image index becomes
    an OCI image index (or, with ``platform``, its image for that platform by
    ``shoal.format.platform.choose``; a destination that holds one image gets this machine's)."""
    if compression not in LAYER_MEDIA_TYPES:
        raise UsageError(f"unknown compression {compression!r} (gzip, zstd or none)")
    t0 = time.monotonic()
    want = Platform.parse(platform) if isinstance(platform, str) and platform else platform or None
    if want is None and not dest.supports_index:
        want = Platform.host()  # like copy: a one-image format gets this machine's image of an index
    kind, items = resolve_images(store, ref, want)  # with a platform: the one image ``choose`` picks
    many = kind == mt.OCI_INDEX and want is None
    images = tuple(_export_one(store, m, plat, dest, compression, level, workers, many, sink) for plat, m in items)
    if many:
        raw = canonical_json({
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": im.manifest_digest, "size": len(im.manifest),
                           "platform": im.platform} for im in images],
        })
        dest.put_manifest(raw, mt.OCI_INDEX, None)
        top, media = "sha256:" + hashlib.sha256(raw).hexdigest(), mt.OCI_INDEX
    else:
        raw, top, media = images[0].manifest, images[0].manifest_digest, mt.OCI_MANIFEST
    dest.commit()
    return ExportResult(top, media, raw, images, time.monotonic() - t0)


def export_to_layout(store: Store, ref: str, path: str | os.PathLike[str], tag: str = "latest",
                     compression: str = "gzip", **kw: Any) -> ExportResult:
    """``export`` into the OCI image layout at ``path`` under the name ``tag`` (``oci:PATH:TAG``)."""
    from shoal.transports.base import parse_reference

    dest_ref = parse_reference(f"oci:{os.fspath(path)}:{tag}")
    with dest_ref.new_destination() as dest:
        return export(store, ref, dest, compression, **kw)
