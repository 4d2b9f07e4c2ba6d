"""Convert a classic OCI / Docker image from any ImageSource into the local store (convert.md §2).

Manifest (or index / manifest list) -> config -> layers, streamed one at a time through
``LayerApplier`` -> ``build_tree``.  Every manifest, config and layer is verified against the
digest that names it.  Nothing is tagged until every platform has been built: a failure leaves at
most untagged blobs, which ``gc`` reclaims.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.build import BuildOptions, BuildResult, build_tree
from shoal.convert.layers import LayerApplier, LayerResult
from shoal.convert.platforms import ANN_SOURCE, Platform, index_bytes, platform_json, write_index
from shoal.convert.stream import ConvertLimits
from shoal.errors import FormatError, IntegrityError, UsageError
from shoal.format.manifest import MAX_MANIFEST_BYTES, Descriptor, ImageConfig, json_object
from shoal.format.platform import choose
from shoal.progress import NULL, Sink
from shoal.store import Store
from shoal.transports.base import BlobInfo, ImageSource

__all__ = ["convert", "ConvertResult", "PlatformResult", "CONFIG_KEYS"]

log = logging.getLogger(__name__)

# Fields of the image config's "config" object that are carried into the Shoal config (convert.md §2.2).
CONFIG_KEYS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
               "StopSignal", "ArgsEscaped", "Healthcheck", "Shell", "OnBuild")
_CONFIG_TYPES = (mt.OCI_CONFIG, mt.DOCKER_CONFIG)
_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v1+prettyjws")


@dataclass(frozen=True)
class PlatformResult:
    platform: Platform
    source_manifest: str  # digest of the classic manifest
    layers: tuple[LayerResult, ...]
    build: BuildResult
    apply_seconds: float  # reading, decompressing and applying the layers


@dataclass(frozen=True)
class ConvertResult:
    ref: str | None
    digest: str  # what ``ref`` points at: the Shoal manifest, or the Shoal image index
    media_type: str  # mt.OCI_MANIFEST or mt.OCI_INDEX
    source_digest: str  # the classic manifest or index that was converted
    images: tuple[PlatformResult, ...]
    seconds: float


@dataclass(frozen=True)
class _Manifest:
    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _sha(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _media_type(doc: dict[str, Any], announced: str) -> str:
    media = doc.get("mediaType") or announced
    if not media:  # OCI allows leaving it out; infer from the shape
        media = mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST
    return str(media)


def _parse_manifest(raw: bytes, announced: str, digest: str) -> _Manifest | list[tuple[Descriptor, dict[str, Any]]]:
    """A classic image manifest, or the (descriptor, platform) pairs of an image index."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest {digest} is larger than {MAX_MANIFEST_BYTES} bytes")
    doc = json_object(raw, f"manifest {digest}")
    media = _media_type(doc, announced)
    if media in _DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise FormatError("Docker schema 1 manifests are not supported (convert with a newer tool first)")
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"manifest {digest}: schemaVersion must be 2")
    if doc.get("artifactType") == mt.ARTIFACT_TYPE:
        raise UsageError("the source is already a Shoal image; copy it instead of converting it")
    if media in mt.INDEX_TYPES:
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise FormatError(f"image index {digest} has no manifests list")
        return [(Descriptor.from_json(d), platform_json(d.get("platform") if isinstance(d, dict) else None))
                for d in items]
    if media not in mt.MANIFEST_TYPES:
        raise FormatError(f"unsupported manifest media type {media!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"manifest {digest} has no layers list")
    config = Descriptor.from_json(doc.get("config"))
    if config.media_type not in _CONFIG_TYPES:
        raise FormatError(f"not a container image: config media type {config.media_type!r}")
    return _Manifest(digest, media, config, tuple(Descriptor.from_json(layer) for layer in layers))


def _read_blob(source: ImageSource, d: Descriptor, limit: int, what: str) -> bytes:
    stream, _ = source.get_blob(BlobInfo(d.digest, d.size, d.media_type))
    want = min(d.size, limit) + 1
    parts: list[bytes] = []
    got = 0
    with stream:
        while got < want:  # streams may return short reads
            b = stream.read(want - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
    data = b"".join(parts)
    if len(data) > limit:
        raise FormatError(f"{what} is larger than {limit} bytes")
    if len(data) != d.size:
        raise IntegrityError(f"{what} {d.digest} has {len(data)} bytes, its descriptor says {d.size}")
    if _sha(data) != d.digest:
        raise IntegrityError(f"{what} digest mismatch: descriptor says {d.digest}, content is {_sha(data)}")
    return data


def _image_config(raw: bytes, m: _Manifest, index_digest: str | None) -> tuple[ImageConfig, list[str]]:
    doc = json_object(raw, f"image config {m.config.digest}")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise FormatError("image config has no rootfs.diff_ids")
    diff_ids = [dg.validate(d) for d in rootfs["diff_ids"]]
    if len(diff_ids) != len(m.layers):
        raise FormatError(f"image config lists {len(diff_ids)} diff_ids for {len(m.layers)} layers")
    conf: dict[str, Any] = doc["config"] if isinstance(doc.get("config"), dict) else {}
    source: dict[str, Any] = {"manifest": m.digest, "mediaType": m.media_type, "config": m.config.digest,
                              "diff_ids": diff_ids}
    if index_digest is not None:
        source["index"] = index_digest
    extra: dict[str, Any] = {"source": source}
    for key in ("created", "author", "history"):
        if doc.get(key) not in (None, "", []):
            extra[key] = doc[key]
    cfg = ImageConfig(
        architecture=str(doc.get("architecture", "")), os=str(doc.get("os", "")),
        variant=str(doc.get("variant", "") or ""),
        config={k: conf[k] for k in CONFIG_KEYS if k in conf and conf[k] is not None},
        extra=extra,
    )
    return cfg, diff_ids


def _fetch_manifest(source: ImageSource, d: Descriptor) -> bytes:
    raw, _ = source.get_manifest(d.digest)
    if len(raw) != d.size:
        raise IntegrityError(f"manifest {d.digest} has {len(raw)} bytes, the index says {d.size}")
    if _sha(raw) != d.digest:
        raise IntegrityError(f"manifest digest mismatch: index says {d.digest}, content is {_sha(raw)}")
    return raw


class _Converter:
    def __init__(self, source: ImageSource, store: Store, limits: ConvertLimits, opts: dict[str, Any],
                 sink: Sink) -> None:
        self.source = source
        self.store = store
        self.limits = limits
        self.opts = opts
        self.sink = sink

    def one(self, m: _Manifest, ref: str | None, index_digest: str | None, want: Platform | None = None
            ) -> PlatformResult:
        cfg_raw = _read_blob(self.source, m.config, self.limits.max_blob_bytes, "image config")
        cfg, diff_ids = _image_config(cfg_raw, m, index_digest)
        if want is not None and not want.matches(Platform(cfg.os, cfg.architecture, cfg.variant)):
            raise UsageError(f"the source image is {Platform(cfg.os, cfg.architecture, cfg.variant)}, not {want}")
        t0 = time.monotonic()
        applier = LayerApplier(self.store.layout.tmp, self.limits)
        layers: list[LayerResult] = []
        total = sum(d.size for d in m.layers)
        try:
            self.sink.start("convert", total)
            for i, d in enumerate(m.layers):
                what = f"layer {i + 1}/{len(m.layers)} ({d.digest[:19]})"
                stream, _ = self.source.get_blob(BlobInfo(d.digest, d.size, d.media_type))
                with stream:
                    layers.append(applier.apply(stream, digest=d.digest, size=d.size, diff_id=diff_ids[i],
                                                media_type=d.media_type, what=what))
                self.sink.advance("convert", d.size)
            self.sink.finish("convert")
            tree = applier.finish(self.opts.get("source_date_epoch"))
            applied = time.monotonic() - t0
            log.info("applied %d layers of %s: %d entries, %d file bytes in %.2fs", len(layers), m.digest,
                     len(tree.entries), tree.file_bytes, applied)
            opts = BuildOptions(**self.opts, config=cfg)
            built = build_tree(self.store, tree, ref, opts, self.sink)
        finally:
            applier.close()
        return PlatformResult(Platform(cfg.os, cfg.architecture, cfg.variant), m.digest, tuple(layers), built,
                              applied)


def convert(source: ImageSource, store: Store, ref: str | None, *, platform: str | Platform | None = None,
            reuse: Sequence[str] = (), reuse_store: bool = True, limits: ConvertLimits | None = None,
            workers: int | None = None, source_date_epoch: int | None = None, sink: Sink = NULL) -> ConvertResult:
    """Convert the image ``source`` serves into ``store`` and tag it ``ref`` (if given).

    A manifest list / image index converts every image platform it lists, or only ``platform``
    (``os/arch[/variant]``), which then gives a single Shoal manifest.  Several platforms give a
    Shoal image index (convert.md §2.3).
    """
    t0 = time.monotonic()
    want = Platform.parse(platform) if isinstance(platform, str) else platform
    opts: dict[str, Any] = {"reuse": tuple(reuse), "reuse_store": reuse_store, "source_date_epoch": source_date_epoch}
    if workers is not None:
        opts["workers"] = workers
    conv = _Converter(source, store, limits or ConvertLimits(), opts, sink)
    raw, announced = source.get_manifest()
    top = _sha(raw)
    parsed = _parse_manifest(raw, announced, top)
    with store.layout.writing():  # gc must not collect untagged children before the index is tagged
        if isinstance(parsed, _Manifest):
            r = conv.one(parsed, ref, None, want)
            return ConvertResult(ref, r.build.manifest.digest, mt.OCI_MANIFEST, top, (r,), time.monotonic() - t0)
        chosen = _choose(parsed, want)
        if want is not None:
            d, plat = chosen[0]
            r = conv.one(_child(source, d), ref, top)
            return ConvertResult(ref, r.build.manifest.digest, mt.OCI_MANIFEST, top, (r,), time.monotonic() - t0)
        results = [(plat, conv.one(_child(source, d), None, top)) for d, plat in chosen]
        items = [(plat, r.build.manifest) for plat, r in results]
        raw_index = index_bytes(items, {ANN_SOURCE: top})
        digest = _sha(raw_index)
        if ref is not None:
            write_index(store, ref, raw_index)
        return ConvertResult(ref, digest, mt.OCI_INDEX, top, tuple(r for _, r in results), time.monotonic() - t0)


def _child(source: ImageSource, d: Descriptor) -> _Manifest:
    parsed = _parse_manifest(_fetch_manifest(source, d), d.media_type, d.digest)
    if not isinstance(parsed, _Manifest):
        raise FormatError(f"nested image index {d.digest} is not supported")
    return parsed


def _choose(children: list[tuple[Descriptor, dict[str, Any]]], want: Platform | None
            ) -> list[tuple[Descriptor, dict[str, Any]]]:
    """Image manifests of an index (attestations and unknown platforms skipped), or with ``want`` the
    one ``shoal.format.platform.choose`` picks for it (NotFound if none)."""
    out = []
    for d, plat in children:
        ann = dict(d.annotations)
        if d.media_type not in mt.MANIFEST_TYPES and d.media_type not in mt.INDEX_TYPES:
            continue
        if plat.get("os") in (None, "unknown") or plat.get("architecture") in (None, "unknown"):
            continue  # buildx attestation manifests and the like
        if "vnd.docker.reference.type" in ann:
            continue
        out.append((d, plat))
    if want is not None:
        entries = [{"digest": d.digest, "platform": plat} for d, plat in out]
        pick = choose(entries, want, "the image index")
        return [out[next(i for i, e in enumerate(entries) if e is pick)]]
    if not out:
        raise UsageError("the image index lists no image manifests")
    return out
