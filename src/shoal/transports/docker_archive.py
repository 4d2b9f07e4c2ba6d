"""``docker-archive:FILE[:NAME:TAG|:@N]`` -- the ``docker save`` tarball (docs/transports.md).

Format (moby ``image/tarexport``; containers/image ``docker/internal/tarfile``): ``manifest.json`` is a
list of ``{"Config": FILE, "RepoTags": [NAME:TAG...], "Layers": [FILE...]}``; the config is the image
JSON, whose ``rootfs.diff_ids`` are the sha256 of the uncompressed layer tars.  Old ``docker save``
also wrote ``repositories`` and ``<id>/{VERSION,json,layer.tar}``; newer ones store layers as
``blobs/sha256/<hex>``; skopeo writes ``<hex>.tar``, ``<hex>.json`` and symlinks ``<id>/layer.tar``.

Reference: FILE ends at the first ``:``; the rest is ``@N`` (the N-th ``manifest.json`` item) or a
tagged Docker name, matched after normalisation (``busybox`` = ``docker.io/library/busybox:latest``).
Without it, a source needs an archive holding exactly one image.

- The source reads the archive in place (symlinks and hard links are followed inside the archive
  only; names with ``..`` or ``/`` in front, devices and FIFOs are refused).  It synthesises a Docker
  schema2 manifest: config ``application/vnd.docker.container.image.v1+json``; each layer's digest is
  the sha256 of its file, typed ``...rootfs.diff.tar`` (skopeo says ``...tar.gzip`` even for plain
  tars) or ``...tar.gzip`` when the file is gzip.  Each layer is checked against its diff_id.
- The destination stages verified blobs beside FILE; ``commit()`` decompresses compressed layers
  (as skopeo does), checks them against the config's diff_ids, and writes ``<hex>.tar``,
  ``<hex>.json`` and ``manifest.json`` (RepoTags fully qualified, as skopeo writes them) as a
  deterministic tar, renamed over FILE.  Like skopeo it refuses an existing non-empty FILE and
  image indexes; it does not write the legacy ``repositories`` file or ``<id>/`` directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound, UsageError, from_oserror
from shoal.transports.base import BlobInfo, ImageReference, ImageSource, SystemContext, Transport, register
from shoal.transports.context import TAG_RE as _TAG_RE
from shoal.transports.oci_archive import (
    READ_ERRORS,
    ArchiveLimits,
    Member,
    TarEntry,
    TarIndex,
    decompress_file,
    decompressed,
    make_tempdir,
    plain_tar,
    sniff,
    write_tar,
)
from shoal.transports.oci_layout import (
    BlobFileDestination,
    decode_json,
    guess_media_type,
    read_small,
    safe_hex,
    sha256_of,
)

__all__ = ["DockerArchiveTransport", "DockerArchiveReference", "DockerArchiveSource", "DockerArchiveDestination",
           "normalize_tagged", "LAYER_TAR", "TRANSPORT"]

log = logging.getLogger(__name__)

LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
_LAYER_TYPES = {"": LAYER_TAR, "gzip": mt.DOCKER_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}
_CHUNK = 1 << 20
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?")
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_PART}(?:/{_PATH_PART})*")
_INDEX_RE = re.compile(r"@([0-9]{1,18})")  # bounded: int() refuses > 4300 digits


def normalize_tagged(text: str) -> str:
    """``NAME[:TAG]`` as docker/distribution ``ParseNormalizedNamed`` + ``TagNameOnly`` spell it in full."""
    if "@" in text:
        raise UsageError(f"docker-archive does not support digest references: {text!r}")
    slash, colon = text.rfind("/"), text.rfind(":")
    name, tag = (text[:colon], text[colon + 1:]) if colon > slash else (text, "latest")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    if (not _TAG_RE.fullmatch(tag) or not _DOMAIN_RE.fullmatch(domain) or not _PATH_RE.fullmatch(path)
            or re.fullmatch(r"[a-f0-9]{64}", name) or len(domain) + 1 + len(path) > 255):
        raise UsageError(f"invalid image name {text!r} (docker references look like [HOST/]NAME[:TAG])")
    return f"{domain}/{path}:{tag}"


# ------------------------------------------------------------------------------------- reference


class DockerArchiveTransport(Transport):
    name = "docker-archive"

    def parse(self, details: str) -> "DockerArchiveReference":
        path, sep, rest = details.partition(":")
        if not path:
            raise UsageError(f"invalid reference docker-archive:{details}: the path is empty")
        if sep and rest.startswith("@"):
            m = _INDEX_RE.fullmatch(rest)
            if not m:
                raise UsageError(f"invalid reference docker-archive:{details}: {rest!r} is not @N with N >= 0")
            return DockerArchiveReference(path, "", int(m.group(1)))
        if sep:
            normalize_tagged(rest)
        return DockerArchiveReference(path, rest)


TRANSPORT = register(DockerArchiveTransport())


@dataclass(frozen=True)
class DockerArchiveReference(ImageReference):
    path: str
    name: str = ""  # NAME[:TAG] as the user wrote it; compared after normalize_tagged
    index: int = -1
    transport = TRANSPORT

    def details(self) -> str:
        if self.index >= 0:
            return f"{self.path}:@{self.index}"
        return f"{self.path}:{self.name}" if self.name else self.path

    def new_source(self, ctx: SystemContext | None = None) -> "DockerArchiveSource":
        return DockerArchiveSource(self, ArchiveLimits.of(ctx), ctx.tmpdir if ctx is not None else None)

    def new_destination(self, ctx: SystemContext | None = None) -> "DockerArchiveDestination":
        if self.index >= 0:
            raise UsageError(f"{self}: a destination cannot be an index position (@{self.index})")
        return DockerArchiveDestination(self, ArchiveLimits.of(ctx), ctx.tmpdir if ctx is not None else None)


# ------------------------------------------------------------------------------------- source


def _diff_ids(config: bytes, layers: int, what: str) -> list[object]:
    """The ``rootfs.diff_ids`` of an image config, which must list exactly ``layers`` layers."""
    cfg = decode_json(config, what)
    rootfs = cfg.get("rootfs") if isinstance(cfg, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) != layers:
        raise FormatError(f"{what}: rootfs.diff_ids does not list the {layers} layers")
    return ids


def _hash(stream: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


class DockerArchiveSource(ImageSource):
    def __init__(self, ref: DockerArchiveReference, limits: ArchiveLimits, tmpdir: str | None = None) -> None:
        self.label = ref.path
        self._stack = contextlib.ExitStack()
        try:
            path = self._stack.enter_context(plain_tar(Path(ref.path), limits, tmpdir))
            self.tar = TarIndex(path, ref.path, limits)
            self._load(ref)
        except BaseException:
            self.close()
            raise

    def _load(self, ref: DockerArchiveReference) -> None:
        try:
            listing = decode_json(self.tar.read("manifest.json"), f"manifest.json of {self.label}")
        except FormatError:
            if "repositories" in self.tar.members and "manifest.json" not in self.tar.members:
                raise FormatError(f"{self.label} is a pre-1.10 docker save archive (no manifest.json)") from None
            raise
        if not isinstance(listing, list) or not all(isinstance(i, dict) for i in listing):
            raise FormatError(f"manifest.json of {self.label} is not a list of images")
        item = self._choose(listing, ref)
        config_name, layer_names = item.get("Config"), item.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise FormatError(f"manifest.json of {self.label}: an item lacks Config or Layers")
        self.config = self.tar.read(config_name)
        self.config_digest = sha256_of(self.config)
        diff_ids = _diff_ids(self.config, len(layer_names), f"config of {self.label}")
        self.layers: dict[str, Member] = {}
        descs = []
        for name, diff_id in zip(layer_names, diff_ids):
            if not isinstance(name, str):
                raise FormatError(f"manifest.json of {self.label}: a layer name is not a string")
            member = self.tar.lookup(name)
            digest, media = self._check_layer(member, name, str(diff_id))
            self.layers[digest] = member
            descs.append({"mediaType": media, "size": member.size, "digest": digest})
        doc = {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
               "config": {"mediaType": mt.DOCKER_CONFIG, "size": len(self.config), "digest": self.config_digest},
               "layers": descs}
        self.manifest = json.dumps(doc, separators=(",", ":")).encode()
        self.digest = sha256_of(self.manifest)

    def _choose(self, listing: list[dict[str, Any]], ref: DockerArchiveReference) -> dict[str, Any]:
        if ref.index >= 0:
            if ref.index >= len(listing):
                raise NotFound(f"{self.label}: no image @{ref.index}, it holds {len(listing)}")
            return listing[ref.index]
        if ref.name:
            want = normalize_tagged(ref.name)
            for item in listing:
                for tag in item.get("RepoTags") or []:
                    if isinstance(tag, str) and normalize_tagged(tag) == want:
                        return item
            raise NotFound(f"no image tagged {ref.name} in {self.label}")
        if len(listing) != 1:
            raise UsageError(f"{self.label} holds {len(listing)} images, not one: choose with FILE:NAME:TAG or FILE:@N")
        return listing[0]

    def _check_layer(self, member: Member, name: str, diff_id: str) -> tuple[str, str]:
        """(digest of the file, media type); the uncompressed content must hash to ``diff_id``."""
        with self.tar.open(member) as f:
            kind = sniff(f.peek(8)[:8])
            digest = _hash(f)
        if kind not in _LAYER_TYPES:
            raise FormatError(f"{self.label}: layer {name[:100]!r} is {kind}-compressed, which Docker cannot load")
        uncompressed = digest
        if kind:
            try:
                with self.tar.open(member) as f, decompressed(f, kind) as z:
                    uncompressed = _hash(z)
            except READ_ERRORS as exc:
                raise FormatError(f"{self.label}: cannot decompress layer {name[:100]!r}: {str(exc)[:120]}") from None
        if uncompressed != diff_id:
            raise IntegrityError(f"{self.label}: layer {name[:100]!r} does not match its diff_id {diff_id[:80]}")
        return digest, _LAYER_TYPES[kind]

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        if digest is not None and digest != self.digest:
            safe_hex(digest)
            raise NotFound(f"{self.label} holds a single image manifest, not {digest}")
        return self.manifest, mt.DOCKER_MANIFEST

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        safe_hex(info.digest)
        if info.digest == self.config_digest:
            return io.BytesIO(self.config), len(self.config)
        member = self.layers.get(info.digest)
        if member is None:
            raise NotFound(f"blob {info.digest} is not in {self.label}")
        return self.tar.open(member), member.size

    def has_blob(self, info: BlobInfo) -> bool:
        safe_hex(info.digest)
        return info.digest == self.config_digest or info.digest in self.layers

    def close(self) -> None:
        self._stack.close()


# ------------------------------------------------------------------------------------- destination


class DockerArchiveDestination(BlobFileDestination):
    supports_index = False

    def __init__(self, ref: DockerArchiveReference, limits: ArchiveLimits, tmpdir: str | None = None) -> None:
        self.target = Path(ref.path)
        self.limits = limits
        self.repo_tags = [normalize_tagged(ref.name)] if ref.name else []
        if self.target.is_file() and self.target.stat().st_size > 0:
            raise UsageError(f"{self.target} exists: docker-archive does not modify existing archives")
        if not self.target.parent.is_dir():
            raise NotFound(f"{ref}: directory {self.target.parent} does not exist")
        self.dir = make_tempdir(f".{self.target.name}.shoal-", tmpdir or str(self.target.parent))
        self.tmp_dir = self.dir
        self._manifest: bytes | None = None

    def blob_path(self, digest: str) -> Path:
        return self.dir / safe_hex(digest)

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        media_type = media_type or guess_media_type(raw)
        if digest is not None or media_type in mt.INDEX_TYPES:
            raise UsageError("docker-archive holds one image, not an image index: choose a platform")
        if media_type not in mt.MANIFEST_TYPES:
            raise FormatError(f"docker-archive cannot store a {media_type or 'unknown'} manifest")
        self._manifest = raw

    def commit(self) -> None:
        if self._manifest is None:
            raise UsageError(f"docker-archive:{self.target}: commit() before put_manifest()")
        doc = decode_json(self._manifest, "manifest")
        config, layers = (doc.get("config"), doc.get("layers")) if isinstance(doc, dict) else (None, None)
        if not isinstance(config, dict) or not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise FormatError("manifest has no config or layers")
        config_path = self._staged(config)
        diff_ids = _diff_ids(read_small(config_path, "image config"), len(layers), "image config")
        entries = {f"{safe_hex(config['digest'])}.json": config_path}
        names = []
        for i, (layer, diff_id) in enumerate(zip(layers, diff_ids)):
            if "tar" not in str(layer.get("mediaType", "")):
                raise FormatError(f"docker-archive holds only tar layers, not {str(layer.get('mediaType'))[:80]}")
            path = self._staged(layer)
            with open(path, "rb") as f:
                kind = sniff(f.read(8))
            if kind:
                dest = self.dir / f"layer-{i}.tar"
                got = decompress_file(path, kind, dest, self.limits.max_size, f"layer {layer['digest']}")
                path = dest
            else:
                got = layer["digest"]
            if got != diff_id:
                raise IntegrityError(f"layer {layer['digest']} does not match diff_id {str(diff_id)[:80]}")
            names.append(f"{safe_hex(got)}.tar")
            entries[names[-1]] = path
        listing = [{"Config": f"{safe_hex(config['digest'])}.json", "RepoTags": self.repo_tags, "Layers": names}]
        try:
            (self.dir / "manifest.json").write_bytes(json.dumps(listing, separators=(",", ":")).encode())
        except OSError as exc:
            raise from_oserror(exc, f"cannot write {self.dir}/manifest.json", "", store=True) from None
        entries["manifest.json"] = self.dir / "manifest.json"
        write_tar(self.target, [TarEntry(n, p) for n, p in entries.items()])

    def _staged(self, desc: dict[str, Any]) -> Path:
        path = self.blob_path(desc.get("digest", ""))
        if not path.is_file():
            raise NotFound(f"blob {desc.get('digest')} was never written to this docker-archive destination")
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
