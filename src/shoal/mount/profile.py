"""Start-up profiles: which frames a workload reads, in first-touch order (docs/spec/mount.md §6).

A profile is bound to one image manifest digest.  It names each frame as (pack, offset, clen): the
pack's position among the manifest's packs and the frame's byte range in it, so a mount can start the
range reads from the manifest alone, before the index is even downloaded (``shoal.early``).
It is stored *beside* the image, never in its blobs:

- locally as ``STORE/profiles/<manifest hex>.json`` (written atomically; ``fsck`` ignores it, ``gc``
  removes it once it no longer keeps the manifest);
- in the image's repository as an OCI 1.1 referrer artifact: a manifest with ``subject`` = the image
  manifest, ``artifactType`` ``application/vnd.shoal.profile.v1+json``, the empty config, and the
  profile JSON as its only layer.  Where the registry has no referrers API (distribution 2.8), the
  ``sha256-<hex>`` tag-schema index lists it (``DockerDestination`` keeps that index).

``RecordingSource`` records first touches at the FrameSource level (below the Reader's frame cache,
above the store and the network), so read-ahead and prefetch never pollute a recording.
``shoal.mount.record`` runs a workload on a lazy mount (``shoal run``'s machinery) and saves the result;
it lives above ``run``, so this module imports nothing of the mount's upper layers (the daemon uses it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal import mediatypes as mt
from shoal.atomicfile import Durability, write_atomic
from shoal.errors import FormatError, NotFound, ShoalError
from shoal.format.manifest import json_loads, json_value
from shoal.format.model import Index
from shoal.reader import ForwardingSource, FrameSource

if TYPE_CHECKING:
    from shoal.transports.context import SystemContext

__all__ = ["Profile", "RecordingSource", "load_local", "save_local", "fetch_remote", "fetch_remote_pair", "find_remote",
           "push_remote", "local_path",
           "write_recording", "read_recording", "Recording"]

log = logging.getLogger(__name__)

FORMAT = 1
MAX_PROFILE_BYTES = 16 * 1024 * 1024
ANN_CREATED = "org.opencontainers.image.created"
# the profile blob's descriptor, repeated in the artifact's annotations (and so in its referrers entry):
# a mount reads the blob straight from the entry, one round trip fewer; the blob is verified by digest
ANN_BLOB = "dev.shoal.profile.blob"
EMPTY_CONFIG = b"{}"


FrameRange = tuple[int, int, int]  # (pack position in the manifest, offset in the pack, compressed length)


@dataclass(frozen=True)
class Profile:
    """``frames``: the frames image ``image`` read first, in first-touch order (no repeats)."""

    image: str  # manifest digest the profile belongs to
    frames: tuple[FrameRange, ...]
    pack_count: int  # packs in that image's manifest (a consistency check)
    nbytes: int = 0  # compressed bytes of the profiled frames
    seconds: float = 0.0  # how long the workload was recorded
    command: tuple[str, ...] = ()

    @classmethod
    def of_frames(cls, image: str, index: Index, frames: list[int], seconds: float = 0.0,
                  command: tuple[str, ...] = ()) -> "Profile":
        fs = [index.frames[fi] for fi in dict.fromkeys(frames)]
        return cls(image, tuple((f.pack, f.offset, f.clen) for f in fs), len(index.packs),
                   sum(f.clen for f in fs), seconds, command)

    def frame_indices(self, index: Index) -> tuple[int, ...] | None:
        """The profile's frames as indices into ``index``, or None if one of them is not a frame of it."""
        if self.pack_count != len(index.packs):
            return None
        where = {(f.pack, f.offset): (fi, f.clen) for fi, f in enumerate(index.frames)}
        out = []
        for pack, off, clen in self.frames:
            hit = where.get((pack, off))
            if hit is None or hit[1] != clen:
                return None
            out.append(hit[0])
        return tuple(out)

    def encode(self) -> bytes:
        doc = {"mediaType": mt.PROFILE, "format": FORMAT, "image": self.image, "packCount": self.pack_count,
               "frames": [list(r) for r in self.frames], "bytes": self.nbytes, "seconds": round(self.seconds, 3),
               "command": list(self.command)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, image: str, pack_count: int | None = None) -> "Profile":
        """Parse and check a profile of ``image`` (and, if given, of a manifest with ``pack_count`` packs)."""
        if len(raw) > MAX_PROFILE_BYTES:
            raise FormatError("profile larger than 16 MiB")
        try:
            doc = json_loads(raw)
        except ValueError:
            raise FormatError("profile is not JSON") from None
        if not isinstance(doc, dict) or doc.get("mediaType") != mt.PROFILE or doc.get("format") != FORMAT:
            raise FormatError("not a Shoal profile (format 1)")
        if doc.get("image") != image:
            raise FormatError(f"profile belongs to {str(doc.get('image'))[:80]}, not {image}")
        n, frames = doc.get("packCount"), doc.get("frames")
        if not isinstance(n, int) or (pack_count is not None and n != pack_count):
            raise FormatError("profile pack count differs from the image's manifest")
        if not isinstance(frames, list) or not all(
                isinstance(f, list) and len(f) == 3 and all(isinstance(x, int) and x >= 0 for x in f)
                and f[0] < n and f[2] > 0 for f in frames):
            raise FormatError("profile frames must be [pack, offset, clen] within the image's packs")
        ranges = tuple((f[0], f[1], f[2]) for f in frames)
        if len({(p, o) for p, o, _ in ranges}) != len(ranges):
            raise FormatError("profile frames must be distinct")
        cmd = doc.get("command") or []
        size, secs = doc.get("bytes", 0), doc.get("seconds", 0.0)
        if (not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd) or not isinstance(size, int)
                or not isinstance(secs, (int, float))):
            raise FormatError("malformed profile fields")
        return cls(image, ranges, n, size, float(secs), tuple(cmd))


# ---------------------------------------------------------------------------------------------- local


def local_path(store_root: str | os.PathLike[str], image: str) -> Path:
    algo, _, hexpart = image.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise FormatError(f"invalid image digest {image[:80]!r}")
    return Path(store_root) / "profiles" / f"{hexpart}.json"


def load_local(store_root: str | os.PathLike[str], image: str, pack_count: int | None = None) -> Profile | None:
    """The profile saved for ``image`` in the store, or None (a broken one is logged and ignored)."""
    p = local_path(store_root, image)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read profile %s: %s", p, exc.strerror)
        return None
    try:
        return Profile.decode(raw, image, pack_count)
    except FormatError as exc:
        log.warning("ignoring profile %s: %s", p, exc)
        return None


def save_local(store_root: str | os.PathLike[str], prof: Profile) -> Path:
    """Write the profile atomically (temp file, fsync, rename); return its path."""
    p = local_path(store_root, prof.image)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, prof.encode(), durability=Durability.FILE, mode=0o600)
    return p


# ---------------------------------------------------------------------------------------------- registry


def fetch_remote(client: Any, repo: str, image: str) -> Profile | None:
    """The newest profile referring to ``image`` in ``repo`` (a ``RegistryClient``), or None."""
    return fetch_remote_pair(client, repo, image, bundle=False)[0]


def fetch_remote_pair(client: Any, repo: str, image: str, bundle: bool = True,
                      max_bundle: int = 256 * 1024 * 1024) -> tuple[Profile | None, bytes | None]:
    """The newest profile referring to ``image`` in ``repo`` (a ``RegistryClient``), or None, and with
    ``bundle`` its artifact's bundle blob (docs/spec/bundle.md §5), or None.

    The ``sha256-<hex>`` tag-schema index and the referrers API are asked at once (the index wins when
    it lists profiles); the blobs are read straight from the entry's annotations when they name them
    (profile and bundle in parallel), else from the artifact manifest, and are verified by digest either
    way.  A profile only steers prefetching and a bundle is checked against the image's root by its user
    (every byte either leads to is verified), so failures are logged and give None: a missing or broken
    profile never fails a mount.  The bundle is not checked here."""
    prof, _, blob = _remote(client, repo, image, bundle, max_bundle, fetch_bundle=True)
    return prof, blob


def find_remote(client: Any, repo: str, image: str,
                max_bundle: int = 256 * 1024 * 1024) -> tuple[Profile | None, tuple[str, int] | None]:
    """``fetch_remote_pair``, but the bundle is not fetched: its ``(digest, size)`` (within
    ``max_bundle``), for a mount daemon to stream it (bundle.md §6.2)."""
    prof, desc, _ = _remote(client, repo, image, True, max_bundle, fetch_bundle=False)
    return prof, desc


def _remote(client: Any, repo: str, image: str, bundle: bool, max_bundle: int, fetch_bundle: bool,
            ) -> tuple[Profile | None, tuple[str, int] | None, bytes | None]:
    from concurrent.futures import ThreadPoolExecutor

    from shoal.transports.registry import referrers_tag

    def tag_index() -> list[dict[str, Any]]:
        try:
            raw, _, _ = client.get_manifest(repo, referrers_tag(image), [mt.OCI_INDEX])
        except NotFound:
            return []
        doc = json_value(raw, "referrers index")
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        return [e for e in entries or [] if isinstance(e, dict) and e.get("artifactType") == mt.PROFILE]

    def valid(where: tuple[str, Any] | None) -> tuple[str, int] | None:
        if where is None:
            return None
        if not isinstance(where[1], int) or not 0 < where[1] <= max_bundle:
            log.warning("ignoring the profile bundle of %s in %s: invalid or oversized size", image, repo)
            return None
        return where[0], where[1]

    def get_bundle(where: tuple[str, int]) -> bytes | None:
        try:
            return bytes(client.get_blob(repo, where[0], size=where[1]))
        except (ShoalError, ValueError) as exc:
            log.warning("cannot read the profile bundle of %s in %s: %s", image, repo, exc)
            return None

    bundle_blob: bytes | None = None
    bundle_desc: tuple[str, int] | None = None
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="shoal-referrers") as pool:
            api = pool.submit(client.referrers, repo, image, mt.PROFILE, False)  # the tag schema is read here
            refs = tag_index() or api.result()
            if not refs:
                return None, None, None
            ranked = sorted(enumerate(refs),
                            key=lambda t: (str((t[1].get("annotations") or {}).get(ANN_CREATED, "")), t[0]))
            desc = ranked[-1][1]
            blob_desc: tuple[str, Any] | None = _blob_of(desc.get("annotations"))
            if bundle:
                bundle_desc = valid(_blob_of(desc.get("annotations"), mt.ANN_BUNDLE_BLOB))
            if blob_desc is None:
                raw, _, _ = client.get_manifest(repo, str(desc.get("digest")), [mt.OCI_MANIFEST])
                doc = json_value(raw, "profile manifest")
                subject = doc.get("subject") if isinstance(doc, dict) else None
                if not isinstance(subject, dict) or subject.get("digest") != image:
                    raise FormatError("profile artifact has another subject")
                layers = [x for x in doc.get("layers") or [] if isinstance(x, dict)]
                prof_l = [x for x in layers if x.get("mediaType") == mt.PROFILE]
                blob_desc = (str(prof_l[0].get("digest")), prof_l[0].get("size")) if prof_l else None
                bund_l = [x for x in layers if x.get("mediaType") == mt.BUNDLE]
                if bundle and bund_l:
                    bundle_desc = valid((str(bund_l[0].get("digest")), bund_l[0].get("size")))
            if blob_desc is None or not isinstance(blob_desc[1], int) or not 0 < blob_desc[1] <= MAX_PROFILE_BYTES:
                raise FormatError("profile artifact has no valid profile layer")
            bundle_f = (pool.submit(get_bundle, bundle_desc) if fetch_bundle and bundle_desc is not None
                        else None)
            blob = client.get_blob(repo, blob_desc[0], size=blob_desc[1])
            prof = Profile.decode(blob, image)
            bundle_blob = bundle_f.result() if bundle_f is not None else None
    except (ShoalError, ValueError) as exc:
        log.warning("no usable profile for %s in %s: %s", image, repo, exc)
        return None, None, None
    size = len(bundle_blob) if bundle_blob is not None else bundle_desc[1] if bundle_desc is not None else None
    log.info("found profile %s for %s (%d frames%s)", desc.get("digest"), image, len(prof.frames),
             f", bundle of {size} bytes" if size is not None else "")
    return prof, bundle_desc, bundle_blob


def _blob_of(annotations: Any, key: str = ANN_BLOB) -> tuple[str, int] | None:
    """``(digest, size)`` from an ``ANN_BLOB`` (or ``key``) annotation ``"sha256:<hex>:<size>"``."""
    text = annotations.get(key) if isinstance(annotations, dict) else None
    if not isinstance(text, str):
        return None
    digest, _, size = text.rpartition(":")
    return (digest, int(size)) if digest.startswith("sha256:") and size.isdigit() else None


def push_remote(ref_text: str, opts: "SystemContext | None", prof: Profile, bundle: bytes | None = None) -> str:
    """Push ``prof`` (and its ``bundle``, a second layer: docs/spec/bundle.md §5) as a referrer artifact
    of its image into the repository of ``ref_text`` (``docker://...``); return the artifact manifest's
    digest."""
    from shoal.transports.base import BlobInfo, parse_reference
    from shoal.transports.docker import DockerDestination, DockerReference

    ref = parse_reference(ref_text)
    if not isinstance(ref, DockerReference):
        raise FormatError(f"{ref_text!r} is not a docker:// reference")
    blob = prof.encode()
    with ref.new_destination(opts) as dst:
        assert isinstance(dst, DockerDestination)
        info = dst.client.head_manifest(ref.repo, prof.image)
        if info is None:
            raise NotFound(f"image {prof.image} is not in {ref.host}/{ref.repo}")
        cfg = BlobInfo("sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest(), len(EMPTY_CONFIG), mt.OCI_EMPTY)
        lay = BlobInfo("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob), mt.PROFILE)
        blobs = [(EMPTY_CONFIG, cfg), (blob, lay)]
        layers = [{"mediaType": mt.PROFILE, "digest": lay.digest, "size": lay.size}]
        created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        annotations = {ANN_CREATED: created, ANN_BLOB: f"{lay.digest}:{lay.size}"}
        if bundle is not None:
            bun = BlobInfo("sha256:" + hashlib.sha256(bundle).hexdigest(), len(bundle), mt.BUNDLE)
            blobs.append((bundle, bun))
            layers.append({"mediaType": mt.BUNDLE, "digest": bun.digest, "size": bun.size})
            annotations[mt.ANN_BUNDLE_BLOB] = f"{bun.digest}:{bun.size}"
        for data, bi in blobs:
            if not dst.has_blob(bi):
                dst.put_blob(io.BytesIO(data), bi)
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": mt.PROFILE,
               "config": {"mediaType": mt.OCI_EMPTY, "digest": cfg.digest, "size": cfg.size},
               "layers": layers, "subject": info.descriptor(), "annotations": annotations}
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        dst.put_manifest(raw, mt.OCI_MANIFEST, digest)  # by digest; also updates the tag-schema index
    return digest


# ---------------------------------------------------------------------------------------------- recording


class RecordingSource(ForwardingSource):
    """Forwards to ``inner`` and records each frame's first request (``frames()``, in order)."""

    def __init__(self, inner: FrameSource, index: Index) -> None:
        super().__init__(inner)
        self._frame_of = {("sha256:" + index.packs[f.pack].hex(), f.offset): i for i, f in enumerate(index.frames)}
        self._order: list[int] = []
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        self._touch(pack, offset)
        return self.inner.fetch(pack, offset, length)

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        data = self.inner.fetch_nowait(pack, offset, length)
        if data is not None:
            self._touch(pack, offset)
        return data

    def _touch(self, pack: str, offset: int) -> None:
        fi = self._frame_of.get((pack, offset))
        if fi is not None:
            with self._lock:
                if fi not in self._seen:
                    self._seen.add(fi)
                    self._order.append(fi)

    def frames(self) -> list[int]:
        with self._lock:
            return list(self._order)


@dataclass
class Recording:
    """What a profiled workload used, in first-use order (the mount daemon's hand-over): the frames
    (the profile), and for the bundle (docs/spec/bundle.md) the chunk indices and file positions it
    read and the directory positions it listed."""

    frames: list[int] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    dirs: list[int] = field(default_factory=list)


def write_recording(path: str, rec: Recording) -> None:
    """The daemon's hand-over of a recording (atomic: temp file, rename)."""
    doc = {"frames": rec.frames, "chunks": rec.chunks, "files": rec.files, "dirs": rec.dirs}
    write_atomic(path, json.dumps(doc).encode(), durability=Durability.PROCESS)


def read_recording(path: str) -> Recording:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ShoalError(f"the mount daemon left no recording ({exc})") from None
    parts: list[list[int]] = []
    for k in ("frames", "chunks", "files", "dirs"):
        v = doc.get(k, []) if isinstance(doc, dict) else None
        if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
            raise ShoalError("the mount daemon left a malformed recording")
        parts.append(v)
    return Recording(*parts)
