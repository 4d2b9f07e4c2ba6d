"""The local store as a transport: a bare ``NAME[:TAG]`` reference (docs/transports.md).

As a source it serves the store's blobs; a pack that is only partly present
(a pull fetched just the frames the store lacked) is rebuilt byte-exactly by
recompressing the missing frames from chunks the store holds elsewhere, and
refused if that does not reproduce the pack's digest.
As a destination it writes verified blobs and tags at ``commit()``, and offers the chunk-level
``partial_pull()`` capability (pull.py): a Shoal image fetches only the frames the store lacks.

Referrers (docs/spec/trust.md §6): the store's untagged index.json entries (store.md §5) and its start-up
profiles (``STORE/profiles/<hex>.json``, mount.md §6), which leave as the registry's profile artifact and
come back as the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from shoal import mediatypes as mt
from shoal.atomicfile import Durability, write_atomic
from shoal.errors import FormatError, IntegrityError, NotFound, ShoalError
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
    Referrer,
    SystemContext,
    Transport,
    referrer_kind,
    register,
    with_subject,
)

__all__ = ["LocalReference", "LocalTransport"]

log = logging.getLogger(__name__)

EMPTY_CONFIG = b"{}"
MAX_PROFILE = 16 << 20  # bytes of a profile (mount/profile.py)
MAX_BUNDLE = 256 << 20  # bytes of a profile bundle (format/bundle.py LIMITS.blob)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def profile_path(store: Store, digest: str) -> Path:
    """``STORE/profiles/<hex>.json``: the start-up profile of the manifest ``digest`` (mount.md §6)."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise FormatError(f"invalid image digest {digest[:80]!r}")
    return store.root / "profiles" / f"{hexpart}.json"


def bundle_path(store: Store, digest: str) -> Path:
    """``STORE/profiles/<hex>.bundle``: the profile's bundle (bundle.md §5), beside ``profile_path``."""
    return profile_path(store, digest).with_suffix(".bundle")


def profile_artifact(profile: bytes, subject: dict[str, Any], created: str,
                     bundle: bytes | None = None) -> tuple[bytes, dict[str, bytes]]:
    """The registry form of a profile (mount.md §6): an OCI 1.1 artifact manifest with ``subject``, the
    empty config, the profile as its first layer and its bundle, if any, as the second (bundle.md §5),
    and its blobs by digest."""
    cfg, lay = _sha(EMPTY_CONFIG), _sha(profile)
    layers = [{"mediaType": mt.PROFILE, "digest": lay, "size": len(profile)}]
    annotations = {mt.ANN_CREATED: created, mt.ANN_PROFILE_BLOB: f"{lay}:{len(profile)}"}
    blobs = {cfg: EMPTY_CONFIG, lay: profile}
    if bundle is not None:
        bun = _sha(bundle)
        layers.append({"mediaType": mt.BUNDLE, "digest": bun, "size": len(bundle)})
        annotations[mt.ANN_BUNDLE_BLOB] = f"{bun}:{len(bundle)}"
        blobs[bun] = bundle
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": mt.PROFILE,
           "config": {"mediaType": mt.OCI_EMPTY, "digest": cfg, "size": len(EMPTY_CONFIG)},
           "layers": layers, "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
           "annotations": annotations}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), blobs


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
        self._extra: dict[str, bytes] = {}

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

    def referrers(self, digest: str) -> list[Referrer]:
        """The untagged index.json entries whose ``subject`` is ``digest`` (store.md §5), then the profile
        saved for it, as the artifact a registry keeps (its ``created``: the file's modification time)."""
        out = []
        for d in self.store.referrers(digest):
            raw = self.store.layout.get(str(d["digest"]), limit=MAX_MANIFEST_BYTES)
            out.append(Referrer(digest, raw, str(d.get("mediaType") or mt.OCI_MANIFEST), referrer_kind(raw)))
        try:
            path = profile_path(self.store, digest)
            if path.is_file() and self.store.layout.has(digest):
                prof = path.read_bytes()
                if len(prof) > MAX_PROFILE:
                    raise FormatError(f"profile {path} is larger than 16 MiB")
                sraw = self.store.layout.get(digest, limit=MAX_MANIFEST_BYTES)
                subject = {"mediaType": str(json_value(sraw).get("mediaType") or mt.OCI_MANIFEST), "digest": digest,
                           "size": len(sraw)}
                created = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                bpath = bundle_path(self.store, digest)
                bundle = None
                if bpath.is_file():
                    if bpath.stat().st_size > MAX_BUNDLE:
                        raise FormatError(f"profile bundle {bpath} is larger than 256 MiB")
                    bundle = bpath.read_bytes()
                raw, blobs = profile_artifact(prof, subject, created, bundle)
                self._extra.update(blobs)
                out.append(Referrer(digest, raw, mt.OCI_MANIFEST, "artifact"))
        except (OSError, ShoalError, AttributeError) as exc:
            log.warning("profile of %s not carried: %s", digest, exc)
        return out

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        if info.digest in self._extra:  # a blob of a profile artifact made by referrers()
            data = self._extra[info.digest]
            return io.BytesIO(data), len(data)
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

    keeps_referrers = True

    def put_referrer(self, ref: Referrer, subject: dict[str, Any]) -> None:
        """A profile artifact becomes ``STORE/profiles/<hex>.json`` (one recorded here already is kept); any
        other referrer is written (given a ``subject`` if it names none) and listed untagged in index.json."""
        doc = json_value(ref.manifest)
        if isinstance(doc, dict) and doc.get("artifactType") == mt.PROFILE:
            self._put_profile(doc, ref.subject)
            return
        raw = with_subject(ref.manifest, subject)
        kept = Referrer(ref.subject, raw, ref.media_type, ref.kind)
        self.store.layout.put(raw, kept.digest)
        self.store.layout.add_referrer(kept.descriptor())

    def _put_profile(self, doc: dict[str, Any], subject: str) -> None:
        path = profile_path(self.store, subject)
        if path.exists():
            log.info("a profile of %s is kept here already (%s): the copied one is not saved", subject, path)
            return
        layers = [ly for ly in doc.get("layers") or [] if isinstance(ly, dict) and ly.get("mediaType") == mt.PROFILE]
        if len(layers) != 1 or not isinstance(layers[0].get("digest"), str):
            raise FormatError("a profile artifact has one profile layer")
        blob = self.store.layout.get(str(layers[0]["digest"]), limit=MAX_PROFILE)  # put (verified) by the copier
        prof = json_value(blob, "profile")
        if not isinstance(prof, dict) or prof.get("mediaType") != mt.PROFILE or prof.get("image") != subject:
            raise FormatError(f"the profile artifact of {subject} holds no profile of that image")
        path.parent.mkdir(parents=True, exist_ok=True)
        bundles = [ly for ly in doc.get("layers") or [] if isinstance(ly, dict) and ly.get("mediaType") == mt.BUNDLE]
        if bundles and isinstance(bundles[0].get("digest"), str):  # checked against the image's root when used
            bun = self.store.layout.get(str(bundles[0]["digest"]), limit=MAX_BUNDLE)
            write_atomic(bundle_path(self.store, subject), bun, durability=Durability.FILE, mode=0o600)
        write_atomic(path, blob, durability=Durability.FILE, mode=0o600)

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
