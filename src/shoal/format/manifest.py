"""The OCI 1.1 manifest and config of a Shoal image (docs/spec/oci-mapping.md).  Pure, no I/O.

Raw JSON never leaves this module: ``parse_manifest`` returns typed values
after checking every field Shoal relies on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, NotShoal
from shoal.format.index import FORMAT

__all__ = ["json_value", "json_object", "Descriptor", "ShoalManifest", "ImageConfig", "canonical_json",
           "build_manifest", "parse_manifest",
           "build_config", "parse_config", "MAX_MANIFEST_BYTES"]

#: The one cap on manifests, indexes and configs, wherever they are read (registry, OCI layout, store).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def json_loads(raw: str | bytes) -> Any:
    """``json.loads``, with nesting too deep to parse raised as the ``ValueError`` callers already
    handle (the C decoder raises ``RecursionError`` for a hostile ``[[[[...`` document)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_value(raw: bytes, what: str = "manifest") -> Any:
    """Parse ``raw`` as JSON, or raise a one-line FormatError (also for nesting too deep to parse)."""
    try:
        return json.loads(raw)
    except ValueError as exc:  # includes UnicodeDecodeError and over-long integers
        raise FormatError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply") from None


def json_object(raw: bytes, what: str = "manifest") -> dict[str, Any]:
    """Parse ``raw`` as a JSON object of at most 4 MiB, or raise a one-line FormatError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{what} larger than 4 MiB")
    doc = json_value(raw, what)
    if not isinstance(doc, dict):
        raise FormatError(f"{what} must be a JSON object")
    return doc


def canonical_json(doc: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: the bytes Shoal writes for every JSON document."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @staticmethod
    def from_json(d: Any) -> "Descriptor":
        if not isinstance(d, dict):
            raise FormatError("descriptor must be an object")
        media, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(media, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError("descriptor needs mediaType and a non-negative size")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise FormatError("descriptor annotations must map strings to strings")
        return Descriptor(media, dg.validate(str(digest)), size, tuple(sorted(ann.items())))


@dataclass(frozen=True)
class ShoalManifest:
    digest: str
    raw: bytes
    config: Descriptor
    index: Descriptor
    packs: tuple[Descriptor, ...]
    root: str
    format: int

    @property
    def size(self) -> int:
        return len(self.raw) + self.config.size + self.index.size + sum(p.size for p in self.packs)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image: what OCI's image config carries (for ``run``)."""

    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # Env, Entrypoint, Cmd, WorkingDir, User, ...
    root: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # provenance annotations


def build_config(cfg: ImageConfig) -> bytes:
    doc: dict[str, Any] = {
        "architecture": cfg.architecture,
        "os": cfg.os,
        "config": cfg.config,
        # rootfs is required by the OCI config schema; Shoal has no tar layers, so diff_ids is empty.
        "rootfs": {"type": "layers", "diff_ids": []},
        "shoal": {"format": FORMAT, "root": cfg.root, **cfg.extra},
    }
    if cfg.variant:
        doc["variant"] = cfg.variant
    return canonical_json(doc)


def parse_config(raw: bytes) -> ImageConfig:
    doc = json_value(raw, "image config")
    if not isinstance(doc, dict):
        raise FormatError("image config must be an object")
    sh_raw, conf_raw = doc.get("shoal"), doc.get("config")
    sh: dict[str, Any] = sh_raw if isinstance(sh_raw, dict) else {}
    conf: dict[str, Any] = conf_raw if isinstance(conf_raw, dict) else {}
    return ImageConfig(
        architecture=str(doc.get("architecture", "")), os=str(doc.get("os", "")),
        variant=str(doc.get("variant", "")), config=conf, root=str(sh.get("root", "")),
        extra={k: v for k, v in sh.items() if k not in ("format", "root")},
    )


def build_manifest(config: Descriptor, index: Descriptor, packs: list[Descriptor], root: str,
                   annotations: dict[str, str] | None = None) -> tuple[bytes, str]:
    """Canonical manifest bytes and their digest.  Layer 0 is the index, then packs in index order."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.ARTIFACT_TYPE,
        "config": config.to_json(),
        "layers": [index.to_json()] + [p.to_json() for p in packs],
        "annotations": {mt.ANN_FORMAT: str(FORMAT), mt.ANN_ROOT: root, **(annotations or {})},
    }
    raw = canonical_json(doc)
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def is_shoal(doc: dict[str, Any]) -> bool:
    return doc.get("artifactType") == mt.ARTIFACT_TYPE


def parse_manifest(raw: bytes, digest: str | None = None) -> ShoalManifest:
    """Parse and check a Shoal manifest; ``digest`` (if given) must match the bytes."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError("manifest larger than 4 MiB")
    actual = "sha256:" + hashlib.sha256(raw).hexdigest()
    if digest is not None and digest != actual:
        raise FormatError(f"manifest digest mismatch: expected {digest}, got {actual}")
    doc = json_value(raw, "manifest")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise FormatError("manifest must be an object with schemaVersion 2")
    if not is_shoal(doc):
        raise NotShoal(f"not a Shoal image (artifactType {doc.get('artifactType')!r})")
    config = Descriptor.from_json(doc.get("config"))
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FormatError("Shoal manifest has no layers")
    descs = [Descriptor.from_json(layer) for layer in layers]
    if descs[0].media_type != mt.INDEX or any(d.media_type != mt.PACK for d in descs[1:]):
        raise FormatError("Shoal manifest layers must be the index, then packs")
    if config.media_type not in (mt.CONFIG, mt.OCI_CONFIG):  # OCI's: what podman accepts (docs/podman.md)
        raise FormatError(f"unexpected config media type {config.media_type!r}")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise FormatError("manifest annotations must be an object")
    root = ann.get(mt.ANN_ROOT, "")
    fmt = ann.get(mt.ANN_FORMAT, "")
    if fmt != str(FORMAT):
        hint = " (format 1 roots do not bind file contents: rebuild or re-convert the image)" if fmt == "1" else ""
        raise FormatError(f"unsupported Shoal format {str(fmt)[:40]!r}{hint}")
    return ShoalManifest(actual, raw, config, descs[0], tuple(descs[1:]), dg.validate(root), FORMAT)
