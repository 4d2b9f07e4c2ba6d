"""The local store: an OCI image layout plus a sqlite chunk catalogue (docs/spec/store.md)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, NotFound, UsageError
from shoal.format import index as fidx
from shoal.format.manifest import MAX_MANIFEST_BYTES, ShoalManifest, parse_manifest
from shoal.format.model import Index
from shoal.format.platform import Platform, platform_json
from shoal.store.catalog import Catalog
from shoal.store.layout import Layout
from shoal.store.partial import PartialPacks

__all__ = ["Store", "default_store_path", "normalize_ref"]

_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def normalize_ref(ref: str) -> str:
    """``name[:tag]`` -> ``name:tag`` (tag defaults to ``latest``), or UsageError."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        name, tag = ref, "latest"
    if not _NAME.fullmatch(name) or not _TAG.fullmatch(tag):  # fullmatch: "$" would allow a trailing newline
        raise UsageError(f"invalid image name {ref!r} (want NAME[:TAG], lowercase name)")
    return f"{name}:{tag}"


def default_store_path() -> Path:
    env = os.environ.get("SHOAL_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/shoal")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


@dataclass
class Store:
    root: Path
    layout: Layout
    catalog: Catalog
    partial: PartialPacks

    @classmethod
    def open(cls, root: Path | str | None = None) -> "Store":
        path = Path(root) if root is not None else default_store_path()
        layout = Layout(path)
        layout.init()
        catalog = Catalog(path / "catalog.db")
        return cls(path, layout, catalog, PartialPacks(layout, catalog))

    # ---------------------------------------------------------------- bytes

    def read_frame(self, pack: str, offset: int, length: int) -> bytes:
        """Compressed frame bytes from a complete pack blob or a partial pack (unverified)."""
        if self.layout.has(pack):
            return self.layout.read_range(pack, offset, length)
        return self.partial.read(pack, offset, length)

    def has_frame(self, pack: str, offset: int) -> bool:
        return self.layout.has(pack) or self.partial.has_frame(pack, offset)

    # ---------------------------------------------------------------- images

    def manifest(self, digest: str) -> ShoalManifest:
        return parse_manifest(self.layout.get(digest, limit=MAX_MANIFEST_BYTES), digest)

    def resolve_all(self, ref: str, platform: Platform | None = None
                    ) -> tuple[str, list[tuple[dict[str, Any], ShoalManifest]]]:
        """The media type a tag points at and its (platform, manifest) pairs: one for a manifest tag,
        one per platform of an image index (only those matching ``platform`` if given)."""
        name = normalize_ref(ref)
        desc = self.layout.refs().get(name)
        if desc is None:
            raise NotFound(f"no image {name} in the store")
        digest = dg.validate(str(desc.get("digest")))
        if desc.get("mediaType") != mt.OCI_INDEX:
            return mt.OCI_MANIFEST, [({}, self.manifest(digest))]
        out = []
        for plat, child in self.index_children(digest):
            if platform is None or platform.matches(Platform.of(plat)):
                out.append((plat, self.manifest(child)))
        if not out:
            raise NotFound(f"{name} has no image for platform {platform}")
        return mt.OCI_INDEX, out

    def index_children(self, digest: str) -> list[tuple[dict[str, Any], str]]:
        """(platform, manifest digest) of each entry of the image index blob ``digest``."""
        try:
            doc = json.loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except ValueError as exc:
            raise FormatError(f"image index {digest} is not JSON: {exc}") from None
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
            raise FormatError(f"image index {digest} has no valid manifests list")
        return [(platform_json(d.get("platform")), dg.validate(str(d.get("digest")))) for d in manifests]

    def resolve(self, ref: str, platform: str | None = None) -> ShoalManifest:
        """The one Shoal manifest ``ref`` names: for an image index, the ``platform`` (os/arch[/variant])
        asked for, else this machine's, else the only one."""
        want = Platform.parse(platform) if platform else None
        _, items = self.resolve_all(ref, want)
        if len(items) == 1:
            return items[0][1]
        host = Platform.host()
        for plat, m in items:
            if host.matches(Platform.of(plat)):
                return m
        have = ", ".join(str(Platform.of(p)) for p, _ in items)
        raise UsageError(f"{normalize_ref(ref)} is a multi-platform image ({have}): choose one with --platform")

    def tag_index(self, ref: str, raw: bytes) -> str:
        """Store image index bytes and tag them ``ref``; return the index digest."""
        digest = self.layout.put(raw)
        self.layout.set_ref(normalize_ref(ref), {"mediaType": mt.OCI_INDEX, "digest": digest, "size": len(raw)})
        return digest

    def all_manifests(self) -> list[tuple[str, str, ShoalManifest]]:
        """(tag, platform text, manifest) for every Shoal manifest a tag reaches, indexes expanded.
        Classic images (copied in as they are) are not Shoal manifests and are left out."""
        out = []
        for name, desc in sorted(self.layout.refs().items()):
            d = str(desc.get("digest"))
            if desc.get("mediaType") in mt.INDEX_TYPES:
                children = self.index_children(d)
            else:
                children = [({}, d)]
            for plat, child in children:
                if self.is_shoal(child):
                    out.append((name, str(Platform.of(plat)) if plat else "", self.manifest(child)))
        return out

    def is_shoal(self, digest: str) -> bool:
        try:
            doc = json.loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("artifactType") == mt.ARTIFACT_TYPE

    def blobs_of(self, digest: str, depth: int = 0) -> set[str]:
        """Every blob a manifest or index reaches by its descriptors (generic OCI/Docker walk)."""
        out = {digest}
        if depth > 4 or not self.layout.has(digest):
            return out
        try:
            doc = json.loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except ValueError:
            return out
        if not isinstance(doc, dict):
            return out
        for d in [doc.get("config")] + list(doc.get("layers") or []):
            if isinstance(d, dict) and isinstance(d.get("digest"), str):
                out.add(d["digest"])
        for d in doc.get("manifests") or []:
            if isinstance(d, dict) and isinstance(d.get("digest"), str):
                out |= self.blobs_of(d["digest"], depth + 1)
        return out

    def load_index(self, m: ShoalManifest) -> Index:
        blob = self.layout.get(m.index.digest)
        if len(blob) != m.index.size:
            raise FormatError("index blob size differs from its descriptor")
        idx = fidx.decode(fidx.decompress(blob))
        if "sha256:" + idx.root.hex() != m.root:
            raise FormatError("index root differs from the manifest's annotation")
        if len(idx.packs) != len(m.packs) or any(
            "sha256:" + p.hex() != d.digest for p, d in zip(idx.packs, m.packs)
        ):
            raise FormatError("index pack table differs from the manifest layers")
        return idx

    def register_chunks(self, m: ShoalManifest, idx: Index | None = None) -> int:
        """Record in the catalogue every chunk of ``m`` whose frame the store holds; return how many."""
        idx = idx or self.load_index(m)
        rows = []
        present: dict[tuple[int, int], bool] = {}
        for i, cid in enumerate(idx.chunk_ids):
            f = idx.frames[idx.chunk_frames[i]]
            pack = "sha256:" + idx.packs[f.pack].hex()
            key = (f.pack, f.offset)
            if key not in present:
                present[key] = self.has_frame(pack, f.offset)
            if present[key]:
                rows.append((cid, pack, f.offset, f.clen, f.ulen, idx.chunk_offsets[i], idx.chunk_lengths[i]))
        self.catalog.add(rows)
        return len(rows)

    def tag(self, ref: str, m: ShoalManifest) -> None:
        self.layout.set_ref(normalize_ref(ref), {"mediaType": mt.OCI_MANIFEST, "digest": m.digest,
                                                 "size": len(m.raw), "artifactType": mt.ARTIFACT_TYPE})

    def untag(self, ref: str) -> None:
        name = normalize_ref(ref)
        if name not in self.layout.refs():
            raise NotFound(f"no image {name} in the store")
        self.layout.set_ref(name, None)

    def images(self) -> list[tuple[str, ShoalManifest]]:
        return [(f"{name} [{plat}]" if plat else name, m) for name, plat, m in self.all_manifests()]
