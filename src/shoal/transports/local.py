"""The local store as a transport: a bare ``NAME[:TAG]`` reference (docs/transports.md).

As a source it serves the store's blobs; a pack that is only partly present
(a pull fetched just the frames the store lacked) is rebuilt byte-exactly by
recompressing the missing frames from chunks the store holds elsewhere, and
refused if that does not reproduce the pack's digest.
As a destination it writes verified blobs and tags at ``commit()``, and offers the chunk-level
``partial_pull()`` capability (pull.py): a Shoal image fetches only the frames the store lacks.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from shoal import mediatypes as mt
from shoal.errors import IntegrityError, NotFound
from shoal.format import packing
from shoal.format.manifest import MAX_MANIFEST_BYTES, json_loads, json_value
from shoal.pull import StorePull
from shoal.reader import Reader, StoreSource
from shoal.store import Store, normalize_ref
from shoal.transports.base import (
    BlobInfo,
    ImageDestination,
    ImageReference,
    ImageSource,
    PartialPull,
    SystemContext,
    Transport,
    register,
)

__all__ = ["LocalReference", "LocalTransport"]


class LocalTransport(Transport):
    name = ""

    def parse(self, details: str) -> "LocalReference":
        return LocalReference(normalize_ref(details))


TRANSPORT = register(LocalTransport())


@dataclass(frozen=True)
class LocalReference(ImageReference):
    name: str
    transport = TRANSPORT

    def details(self) -> str:
        return self.name

    def policy_scope(self) -> None:
        return None  # the store's images were admitted when they came in (docs/spec/trust.md §4)

    def store(self, ctx: SystemContext | None = None) -> Store:
        return Store.open(ctx.store if ctx is not None else None)

    def new_source(self, ctx: SystemContext | None = None) -> "LocalSource":
        return LocalSource(self, self.store(ctx))

    def new_destination(self, ctx: SystemContext | None = None) -> "LocalDestination":
        return LocalDestination(self, self.store(ctx))

    def delete(self, ctx: SystemContext | None = None) -> None:
        self.store(ctx).untag(self.name)


class LocalSource(ImageSource):
    def __init__(self, ref: LocalReference, store: Store) -> None:
        self.ref = ref
        self.store = store
        desc = store.layout.refs().get(ref.name)
        if desc is None:
            raise NotFound(f"no image {ref.name} in the store")
        self.top = str(desc["digest"])
        self.top_type = str(desc.get("mediaType", mt.OCI_MANIFEST))

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        d = self.top if digest is None else digest  # "" is a malformed digest, not the top manifest
        raw = self.store.layout.get(d, limit=MAX_MANIFEST_BYTES)
        if digest is None:
            return raw, self.top_type
        try:
            media = json_loads(raw).get("mediaType", mt.OCI_MANIFEST)
        except ValueError:
            media = mt.OCI_MANIFEST
        return raw, str(media)

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        layout = self.store.layout
        if layout.has(info.digest):
            return open(layout.path(info.digest), "rb"), layout.size(info.digest)
        if info.media_type == mt.PACK:
            data = self._rebuild_pack(info)
            return io.BytesIO(data), len(data)
        raise NotFound(f"blob {info.digest} is not in the store")

    def get_blob_ranges(self, info: BlobInfo, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [self.store.read_frame(info.digest, off, ln) for off, ln in ranges]

    def _rebuild_pack(self, info: BlobInfo) -> bytes:
        """Reassemble a partly present pack from its frames and, for missing frames, recompressed chunks."""
        from shoal.format.manifest import parse_manifest

        m = parse_manifest(self.store.layout.get(self.top, limit=MAX_MANIFEST_BYTES))
        idx = self.store.load_index(m)
        pi = next((i for i, p in enumerate(m.packs) if p.digest == info.digest), None)
        if pi is None:
            raise NotFound(f"blob {info.digest} is not in the store")
        reader = Reader(idx, StoreSource(self.store))
        frames = sorted((f.offset, fi) for fi, f in enumerate(idx.frames) if f.pack == pi)
        cctxs = [zstandard.ZstdCompressor(level=lv, write_checksum=False, write_content_size=True)
                 for lv in packing.FRAME_LEVELS]  # format.md §5.3: the level a frame was made with is not recorded
        parts: list[list[bytes]] = []  # per frame, the candidate bytes: the levels whose frame has its length
        at = 0
        for off, fi in frames:
            f = idx.frames[fi]
            if off != at:
                raise NotFound(f"pack {info.digest} is not fully known to this image; pull it again to push it")
            at += f.clen
            if self.store.partial.has_frame(info.digest, off):
                parts.append([self.store.partial.read(info.digest, off, f.clen)])
                continue
            plain = bytearray(f.ulen)
            for ci in idx.frame_chunks(fi):
                o = idx.chunk_offsets[ci]
                plain[o : o + idx.chunk_lengths[ci]] = reader.chunk(ci)
            made = [cctx.compress(bytes(plain)) for cctx in cctxs]
            fits = list(dict.fromkeys(b for b in made if len(b) == f.clen))
            parts.append(fits or made[:1])
        # the pack digest decides between levels that gave a frame of the same length (rare: few tries)
        for choice in itertools.islice(itertools.product(*parts), _MAX_REBUILDS):
            out = b"".join(choice)
            if len(out) == info.size and "sha256:" + hashlib.sha256(out).hexdigest() == info.digest:
                return out
        raise IntegrityError(f"pack {info.digest} cannot be rebuilt byte-exactly here (different zstd?); "
                             "pull it fully to push it")


_MAX_REBUILDS = 16  # combinations of same-length candidate frames tried before giving up


class LocalDestination(ImageDestination):
    enforces_policy = True  # a pull: the signature policy first (docs/spec/trust.md §4)

    def __init__(self, ref: LocalReference, store: Store) -> None:
        self.ref = ref
        self.store = store
        self._lock = store.layout.writing()
        self._lock.__enter__()
        self._top: tuple[str, str, int] | None = None
        self._registered: set[str] = set()  # manifests whose chunks a partial pull catalogued already

    def partial_pull(self) -> PartialPull:
        return StorePull(self.store, self, self._registered.add)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None  # type: ignore[assignment]

    def has_blob(self, info: BlobInfo) -> bool:
        return self.store.layout.has(info.digest)

    def put_blob(self, stream: BinaryIO, info: BlobInfo) -> None:
        self.store.layout.put_stream(stream, info.digest, info.size if info.size >= 0 else None)

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        d = self.store.layout.put(raw, digest)
        if digest is None:
            self._top = (d, media_type, len(raw))

    def commit(self) -> None:
        if self._top is None:
            raise NotFound("nothing to commit: no manifest was written")
        d, media, size = self._top
        desc: dict[str, object] = {"mediaType": media, "digest": d, "size": size}
        raw = self.store.layout.get(d)
        doc = json_value(raw)
        if isinstance(doc, dict) and doc.get("artifactType"):
            desc["artifactType"] = doc["artifactType"]
        if isinstance(doc, dict) and doc.get("artifactType") == mt.ARTIFACT_TYPE and d not in self._registered:
            self.store.register_chunks(self.store.manifest(d))
        self.store.layout.set_ref(self.ref.name, desc)
