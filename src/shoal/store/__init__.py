"""The local store: an OCI image layout plus a sqlite chunk catalogue (docs/spec/store.md)."""

from __future__ import annotations

import gc
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound, ShoalError, UsageError
from shoal.format import index as fidx
from shoal.format.lazyindex import decode_lazy
from shoal.format.manifest import MAX_MANIFEST_BYTES, ShoalManifest, json_loads, parse_manifest
from shoal.format.model import Index
from shoal.format.packing import verify_frame
from shoal.format.platform import Platform, choose, platform_json
from shoal.format.runtime_view import for_readers
from shoal.store.catalog import Catalog
from shoal.store.layout import Layout
from shoal.store.partial import PartialPacks

__all__ = ["Store", "default_store_path", "normalize_ref", "new_image_name", "refuse_reserved", "RESERVED_NAMES"]

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


#: The transport names (shoal.transports): ``oci:latest`` is the oci transport with the path ``latest``,
#: so a store image called ``oci`` could never be named again.  No new image may take one of these
#: names (docs/transports.md); tests/unit checks the set against the registered transports.
RESERVED_NAMES = frozenset({"docker", "oci", "oci-archive", "docker-archive", "dir"})


def new_image_name(ref: str) -> str:
    """``normalize_ref`` for a name about to be written: also refuses the reserved transport names."""
    name = normalize_ref(ref)
    repo = name.rpartition(":")[0]
    if repo in RESERVED_NAMES:
        raise UsageError(f"cannot name a store image {repo!r}: it is a transport prefix ({repo}:...), "
                         f"so {name} would not name it again; choose another name")
    return name


def refuse_reserved(ref: str) -> None:
    """Raise ``new_image_name``'s error if ``ref`` is a valid image name that is reserved; else nothing."""
    try:
        name = normalize_ref(ref)
    except UsageError:
        return
    new_image_name(name)


def default_store_path() -> Path:
    env = os.environ.get("SHOAL_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/shoal")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_on = True
_gc_freeze = False  # a pauser asked to freeze what exists when the last one leaves


@contextmanager
def collector_paused(freeze: bool = False) -> Iterator[None]:
    """No cyclic garbage collection in here (nested and from several threads alike; the collector is
    turned back on by the last to leave, and only if it was on).  Decoding an index allocates some
    100,000 objects, none of them garbage; each generation-0 collection on the way walks the young ones
    and the later ones everything not frozen: 39-95 ms for the Debian tree's index against 25-27 ms
    without (mount.md §5).  With ``freeze`` (a mount's index, kept as long as the mount), what exists
    when the last one leaves is frozen (``gc.freeze``) before the collector is back: its first
    collection would otherwise walk the ~60,000 young objects of the index (6 ms on the Debian tree,
    on the path to the mount); a mount daemon unfreezes them after its fork."""
    global _gc_pauses, _gc_was_on, _gc_freeze
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_on = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
        _gc_freeze = _gc_freeze or freeze
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                if _gc_freeze:
                    gc.freeze()
                    _gc_freeze = False
                if _gc_was_on:
                    gc.enable()


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
        try:
            return self.partial.read(pack, offset, length)
        except NotFound:
            # promoted since the look above (by any process): ``try_promote`` makes the complete blob
            # visible before it drops the partial file and its frame rows
            if self.layout.has(pack):
                return self.layout.read_range(pack, offset, length)
            raise

    def read_frame_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        """``read_frame``'s bytes from a complete pack if they are in the page cache, else None without
        waiting for the disk (a partial pack: None)."""
        return self.layout.read_range_nowait(pack, offset, length)

    def has_frame(self, pack: str, offset: int) -> bool:
        return self.layout.has(pack) or self.partial.has_frame(pack, offset)

    # ---------------------------------------------------------------- images

    def manifest(self, digest: str) -> ShoalManifest:
        return parse_manifest(self.layout.get(digest, limit=MAX_MANIFEST_BYTES), digest)

    def resolve_all(self, ref: str, platform: Platform | None = None
                    ) -> tuple[str, list[tuple[dict[str, Any], ShoalManifest]]]:
        """The media type a tag points at and its (platform, manifest) pairs: one for a manifest tag,
        one per platform of an image index, or with ``platform`` only the index's image for it
        (``shoal.format.platform.choose``: NotFound if it has none)."""
        name = normalize_ref(ref)
        desc = self.layout.refs().get(name)
        if desc is None:
            raise NotFound(f"no image {name} in the store")
        digest = dg.validate(str(desc.get("digest")))
        if desc.get("mediaType") != mt.OCI_INDEX:
            return mt.OCI_MANIFEST, [({}, self.manifest(digest))]
        children = self.index_children(digest)
        if platform is not None:
            entries = [{"digest": child, "platform": plat} for plat, child in children]
            pick = choose(entries, platform, name)
            children = [children[next(i for i, e in enumerate(entries) if e is pick)]]
        return mt.OCI_INDEX, [(plat, self.manifest(child)) for plat, child in children]

    def index_children(self, digest: str) -> list[tuple[dict[str, Any], str]]:
        """(platform, manifest digest) of each entry of the image index blob ``digest``."""
        try:
            doc = json_loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except ValueError as exc:
            raise FormatError(f"image index {digest} is not JSON: {exc}") from None
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
            raise FormatError(f"image index {digest} has no valid manifests list")
        # a registry's index lists runtime views: each stands for its Shoal manifest (oci-mapping.md §4)
        return [(platform_json(d.get("platform")), dg.validate(str(d.get("digest")))) for d in for_readers(manifests)]

    def resolve(self, ref: str, platform: str | Platform | None = None) -> ShoalManifest:
        """The one Shoal manifest ``ref`` names: a manifest tag's, or an image index's image for
        ``platform`` (``os/arch[/variant]``; default this machine's) by ``choose``'s rule."""
        want = Platform.parse(platform) if isinstance(platform, str) and platform else platform or Platform.host()
        return self.resolve_all(ref, want)[1][0][1]

    def tag_index(self, ref: str, raw: bytes) -> str:
        """Store image index bytes and tag them ``ref``; return the index digest."""
        name = new_image_name(ref)
        digest = self.layout.put(raw)
        self.layout.set_ref(name, {"mediaType": mt.OCI_INDEX, "digest": digest, "size": len(raw)})
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

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[dict[str, Any]]:
        """Descriptors of the artifacts listed in index.json whose manifest's ``subject`` is ``subject``
        (store.md §5), optionally of one ``artifactType``, sorted by digest."""
        out = []
        for d in self.layout.untagged():
            if artifact_type is not None and d.get("artifactType") != artifact_type:
                continue
            if self.subject_of(str(d["digest"])) == subject:
                out.append(d)
        return sorted(out, key=lambda d: str(d["digest"]))

    def subject_of(self, digest: str) -> str | None:
        """The ``subject`` digest of the manifest ``digest`` holds, or None (no such blob, no subject)."""
        if not self.layout.has(digest):
            return None
        try:
            doc = json_loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except (ValueError, ShoalError):  # a corrupt or oversized one refers to nothing
            return None
        subj = doc.get("subject") if isinstance(doc, dict) else None
        d = subj.get("digest") if isinstance(subj, dict) else None
        return d if isinstance(d, str) else None

    def is_shoal(self, digest: str) -> bool:
        try:
            doc = json_loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("artifactType") == mt.ARTIFACT_TYPE

    def blobs_of(self, digest: str, depth: int = 0) -> set[str]:
        """Every blob a manifest or index reaches by its descriptors (generic OCI/Docker walk)."""
        out = {digest}
        if depth > 4 or not self.layout.has(digest):
            return out
        try:
            doc = json_loads(self.layout.get(digest, limit=MAX_MANIFEST_BYTES))
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

    def load_index(self, m: ShoalManifest, lazy: bool = False, freeze: bool = False) -> Index:
        """The index of ``m``, decoded and checked whole, or with ``lazy`` (a mount) its entries on first
        use of any and each directory on its own (``format.lazyindex``); with ``freeze``, frozen as it
        is made (``collector_paused``, also around the entries' later decoding)."""
        blob = self.layout.get(m.index.digest)
        if len(blob) != m.index.size:
            raise FormatError("index blob size differs from its descriptor")
        raw = fidx.decompress(blob)
        with collector_paused(freeze=freeze):
            idx = decode_lazy(raw, lambda: collector_paused(freeze=freeze)) if lazy else fidx.decode(raw)
        if "sha256:" + idx.root.hex() != m.root:
            raise FormatError("index root differs from the manifest's annotation")
        if len(idx.packs) != len(m.packs) or any(
            "sha256:" + p.hex() != d.digest for p, d in zip(idx.packs, m.packs)
        ):
            raise FormatError("index pack table differs from the manifest layers")
        return idx

    def register_chunks(self, m: ShoalManifest, idx: Index | None = None, verified: Collection[int] = ()) -> int:
        """Record in the catalogue every chunk of ``m`` whose frame the store holds; return how many.

        The catalogue only ever holds verified locations (store.md §3): a chunk id it already knows was
        checked when it entered, and every other chunk is decompressed and hashed here before its row
        is written, unless its frame index is in ``verified`` (the caller checked that frame's chunks
        against this index, e.g. a pull that just fetched it or a build that made it).  An index that
        claims a chunk its frame does not hold is refused with nothing recorded.
        """
        idx = idx or self.load_index(m)
        known = self.catalog.locate(idx.chunk_ids)
        by_frame: dict[int, list[int]] = {}
        for fi, cis in idx.chunks_by_frame().items():
            new = [ci for ci in cis if idx.chunk_ids[ci] not in known]
            if new:
                by_frame[fi] = new
        todo: list[int] = []
        present: list[int] = []
        whole = {pi for pi in {idx.frames[fi].pack for fi in by_frame}
                 if self.layout.has("sha256:" + idx.packs[pi].hex())}  # one look per pack
        for fi in by_frame:
            f = idx.frames[fi]
            if f.pack in whole or self.partial.has_frame("sha256:" + idx.packs[f.pack].hex(), f.offset):
                present.append(fi)
                if fi not in verified:
                    todo.append(fi)
        if todo:
            with ThreadPoolExecutor(2, thread_name_prefix="shoal-verify") as pool:
                for _ in pool.map(lambda fi: self.verify_frame(idx, fi, by_frame[fi]), todo):
                    pass
        rows = []
        for fi in present:
            f = idx.frames[fi]
            pack = "sha256:" + idx.packs[f.pack].hex()
            rows += [(idx.chunk_ids[ci], pack, f.offset, f.clen, f.ulen, idx.chunk_offsets[ci], idx.chunk_lengths[ci])
                     for ci in by_frame[fi]]
        self.catalog.add(rows)
        return len(rows)

    def verify_frame(self, idx: Index, fi: int, chunks: Iterable[int]) -> None:
        """Check that frame ``fi`` of ``idx``, as the store holds it, holds ``chunks`` (IntegrityError if not)."""
        f = idx.frames[fi]
        pack = "sha256:" + idx.packs[f.pack].hex()
        where = f"{pack}@{f.offset}"
        _, bad = verify_frame(idx, fi, self.read_frame(pack, f.offset, f.clen), where, chunks)
        if bad is not None:
            raise IntegrityError(f"the index claims chunk sha256:{idx.chunk_ids[bad].hex()} in frame {where}, "
                                 "but the bytes there hash otherwise (digest mismatch); nothing was recorded")

    def tag(self, ref: str, m: ShoalManifest) -> None:
        self.layout.set_ref(new_image_name(ref), {"mediaType": mt.OCI_MANIFEST, "digest": m.digest,
                                                 "size": len(m.raw), "artifactType": mt.ARTIFACT_TYPE})

    def untag(self, ref: str) -> None:
        name = normalize_ref(ref)
        if name not in self.layout.refs():
            raise NotFound(f"no image {name} in the store")
        self.layout.set_ref(name, None)

    def images(self) -> list[tuple[str, ShoalManifest]]:
        return [(f"{name} [{plat}]" if plat else name, m) for name, plat, m in self.all_manifests()]
