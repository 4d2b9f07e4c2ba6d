"""``oci:PATH[:REF]`` -- an OCI image layout directory, parsed and used as skopeo does (docs/transports.md).

Reference syntax (containers/image ``oci/internal``): everything up to the first ``:`` is PATH (so PATH
may not contain ``:``); the rest is REF, the ``org.opencontainers.image.ref.name`` annotation of an
``index.json`` entry, or ``@N``, the N-th entry (sources only).  Without REF a source takes the only
entry of ``index.json`` (more than one is an error) and a destination adds an entry without a name.

Layout (image-spec ``image-layout.md``): ``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``.

- The source reads ``index.json`` once, serves manifests (verified: they are small) and blobs as file
  streams.  Digest strings are validated strictly before they become file names.
- The destination creates the layout if missing, writes every blob to a temp file inside the layout,
  hashes it while writing, checks digest and size, fsyncs and only then renames it into
  ``blobs/sha256/``.  ``commit()`` rewrites ``index.json`` atomically under a lock, replacing the
  entry that had the same ref name (skopeo merely strips the name from it) and keeping all others.

The file-backed blob roles (``BlobFileSource``, ``BlobFileDestination``) and the small helpers here are
shared with ``dir:``, ``oci-archive:`` and ``docker-archive:``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from shoal import atomicfile
from shoal import mediatypes as mt
from shoal.atomicfile import Durability, fsync_dir
from shoal.errors import FormatError, HostileInput, IntegrityError, NotFound, StoreError, UsageError, from_oserror
from shoal.format.manifest import MAX_MANIFEST_BYTES, json_loads
from shoal.transports.base import (
    BlobInfo,
    ImageDestination,
    ImageReference,
    ImageSource,
    Referrer,
    SystemContext,
    Transport,
    referrer_kind,
    register,
    subject_of,
    with_subject,
)

__all__ = ["OciLayoutTransport", "OciLayoutReference", "OciLayoutSource", "OciLayoutDestination",
           "Descriptor", "LayoutRef", "parse_layout_ref", "BlobFileSource", "BlobFileDestination",
           "safe_hex", "guess_media_type", "manifest_children", "decode_json", "read_small", "write_atomic",
           "MAX_JSON", "TRANSPORT"]

log = logging.getLogger(__name__)

MAX_JSON = MAX_MANIFEST_BYTES  # manifests, indexes and configs: the one cap (format/manifest.py)
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1 << 20
_HEX_RE = re.compile(r"[0-9a-f]{64}")
# image-spec annotations.md, as containers/image validates ref names
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_INDEX_RE = re.compile(r"@([0-9]{1,18})")  # bounded: int() refuses > 4300 digits


# ------------------------------------------------------------------------------------- helpers


def safe_hex(digest: object) -> str:
    """The hex of a ``sha256:<64 lowercase hex>`` digest, safe as a file name; anything else raises."""
    if isinstance(digest, str):
        algo, sep, hexpart = digest.partition(":")
        if sep and algo == "sha256" and _HEX_RE.fullmatch(hexpart):
            return hexpart
    text = repr(digest)[:80]
    if isinstance(digest, str) and ("/" in digest or "\\" in digest or ".." in digest or "\0" in digest):
        raise HostileInput(f"refusing digest {text}: it looks like a path")
    raise FormatError(f"not a sha256 digest: {text}")


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode_json(raw: bytes, what: str) -> Any:
    try:
        return json_loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def open_regular(path: Path, what: str) -> tuple[BinaryIO, int]:
    """Open a regular file for reading (never blocks on a FIFO); NotFound if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} not found ({path})") from None
    except OSError as exc:
        raise from_oserror(exc, f"cannot open {what} ({path})", "", store=True) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FormatError(f"{what} is not a regular file ({path})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def read_small(path: Path, what: str, limit: int = MAX_JSON) -> bytes:
    f, size = open_regular(path, what)
    with f:
        if size > limit:
            raise FormatError(f"{what} is {size} bytes, more than the {limit} allowed ({path})")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{what} grew past {limit} bytes while reading ({path})")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file beside it, fsync, rename, fsync the directory."""
    try:
        atomicfile.write_atomic(path, data, durability=Durability.FULL)
    except OSError as exc:
        raise from_oserror(exc, f"cannot write {path}", "", store=True) from None


def guess_media_type(raw: bytes) -> str:
    """The manifest media type of ``raw``, as containers/image ``manifest.GuessMIMEType`` decides it."""
    try:
        doc = json_loads(raw)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(doc, dict):
        return ""
    declared = doc.get("mediaType")
    if declared in (mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_LIST):
        return str(declared)
    version = doc.get("schemaVersion")
    if version == 1:
        signed = "signatures" in doc
        return "application/vnd.docker.distribution.manifest.v1+" + ("prettyjws" if signed else "json")
    if version != 2:
        return ""
    config = doc.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if config_type == mt.OCI_CONFIG:
        return mt.OCI_MANIFEST
    if config_type == mt.DOCKER_CONFIG:
        return mt.DOCKER_MANIFEST
    if doc.get("manifests") and not config_type:
        return mt.OCI_INDEX
    return mt.OCI_MANIFEST


def manifest_children(raw: bytes) -> list[str]:
    """Every digest a manifest or index points at (config, layers, manifests, subject); [] if not JSON."""
    try:
        doc = json_loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, dict):
        return []
    descs: list[Any] = [doc.get("config"), doc.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        if isinstance(doc.get(key), list):
            descs.extend(doc[key])
    return [d["digest"] for d in descs if isinstance(d, dict) and isinstance(d.get("digest"), str)]


# ------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class LayoutRef:
    """``PATH[:REF]`` or ``PATH:@N`` as skopeo's ``oci:`` and ``oci-archive:`` spell it."""

    path: str
    name: str = ""  # org.opencontainers.image.ref.name; "" = none
    index: int = -1  # a source's N-th index.json entry; -1 = none

    def details(self) -> str:
        if self.index >= 0:
            return f"{self.path}:@{self.index}"
        return f"{self.path}:{self.name}" if self.name else self.path


def parse_layout_ref(details: str, transport: str) -> LayoutRef:
    path, _, image = details.partition(":")  # PATH ends at the first colon, as in containers/image
    if not path:
        raise UsageError(f"invalid reference {transport}:{details}: the path is empty")
    if image.startswith("@"):
        m = _INDEX_RE.fullmatch(image)
        if not m:
            raise UsageError(f"invalid reference {transport}:{details}: {image!r} is not @N with N >= 0")
        return LayoutRef(path, "", int(m.group(1)))
    if image and not _REF_NAME_RE.fullmatch(image):
        raise UsageError(f"invalid reference {transport}:{details}: {image!r} is not a valid image ref name")
    return LayoutRef(path, image)


@dataclass(frozen=True)
class LayoutPathReference(ImageReference):
    """``PATH[:NAME]`` or ``PATH:@N``: the reference of ``oci:`` and of ``oci-archive:``."""

    path: str
    name: str = ""
    index: int = -1

    def details(self) -> str:
        return LayoutRef(self.path, self.name, self.index).details()

    def _check_destination(self) -> None:
        if self.index >= 0:
            raise UsageError(f"{self}: a destination cannot be an index position (@{self.index})")


class OciLayoutTransport(Transport):
    name = "oci"

    def parse(self, details: str) -> "OciLayoutReference":
        r = parse_layout_ref(details, self.name)
        return OciLayoutReference(r.path, r.name, r.index)


TRANSPORT = register(OciLayoutTransport())


@dataclass(frozen=True)
class OciLayoutReference(LayoutPathReference):
    transport = TRANSPORT

    def new_source(self, ctx: SystemContext | None = None) -> "OciLayoutSource":
        return OciLayoutSource(Path(self.path), self.name, self.index)

    def new_destination(self, ctx: SystemContext | None = None) -> "OciLayoutDestination":
        self._check_destination()
        return OciLayoutDestination(Path(self.path), self.name)

    def delete(self, ctx: SystemContext | None = None) -> None:
        """Remove the entry from ``index.json``, then the blobs only it reached (as skopeo does)."""
        root = Path(self.path)
        with _index_lock(root):
            doc = _read_index(root, self.path)
            entries = _descriptors(doc, self.path)
            victim = _choose(entries, self.name, self.index, self.path)
            doc["manifests"] = [e for i, e in enumerate(doc["manifests"]) if i != victim.position]
            write_atomic(root / "index.json", _dump(doc))
            keep = _reachable(root, [e.digest for e in entries if e.position != victim.position])
            for d in _reachable(root, [victim.digest]) - keep:
                with contextlib.suppress(FileNotFoundError):
                    (root / "blobs" / "sha256" / safe_hex(d)).unlink()


# ------------------------------------------------------------------------------------- index.json


@dataclass(frozen=True)
class Descriptor:
    """One entry of ``index.json`` (validated; the raw entry is kept verbatim when rewriting)."""

    media_type: str
    digest: str
    size: int
    name: str = ""
    position: int = 0


def _read_index(root: Path, where: str) -> dict[str, Any]:
    try:
        raw = read_small(root / "index.json", "index.json")
    except NotFound:
        raise NotFound(f"no OCI layout at {where} (index.json is missing)") from None
    doc = decode_json(raw, f"index.json of {where}")
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
        raise FormatError(f"index.json of {where} is not an OCI image index")
    doc.setdefault("manifests", [])
    return doc


def _descriptors(doc: dict[str, Any], where: str) -> list[Descriptor]:
    out = []
    for i, e in enumerate(doc["manifests"]):
        if not isinstance(e, dict):
            raise FormatError(f"index.json of {where}: entry {i} is not an object")
        ann = e.get("annotations") or {}
        size = e.get("size", -1)
        if not isinstance(ann, dict) or not isinstance(size, int) or not isinstance(e.get("mediaType", ""), str):
            raise FormatError(f"index.json of {where}: entry {i} is malformed")
        safe_hex(e.get("digest"))
        out.append(Descriptor(e.get("mediaType", ""), e["digest"], size, str(ann.get(mt.ANN_REF_NAME, "")), i))
    return out


def _choose(entries: list[Descriptor], name: str, index: int, where: str) -> Descriptor:
    if index >= 0:
        if index >= len(entries):
            raise NotFound(f"{where}: no entry @{index}, index.json has {len(entries)}")
        return entries[index]
    if name:
        found = [e for e in entries if e.name == name]
        usable = [e for e in found if e.media_type in (*mt.MANIFEST_TYPES, *mt.INDEX_TYPES, "")]
        if usable:
            return usable[0]
        if found:
            raise FormatError(f"{where}: {name!r} names a {found[0].media_type!r}, not a manifest or index")
        raise NotFound(f"no image named {name!r} in {where}")
    if len(entries) != 1:
        raise UsageError(f"{where} holds {len(entries)} images, not one: choose one with PATH:REF or PATH:@N")
    return entries[0]


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@contextlib.contextmanager
def _index_lock(root: Path) -> Iterator[None]:
    """Serialise index.json rewrites: flock the layout directory, and ``index.lock`` if a Shoal store."""
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
            if (root / "index.lock").exists():
                fds.append(os.open(root / "index.lock", os.O_RDWR))
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except FileNotFoundError:
            raise NotFound(f"no OCI layout at {root}") from None
        except OSError as exc:
            raise from_oserror(exc, f"cannot lock the OCI layout at {root}", "", store=True) from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _reachable(root: Path, digests: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(digests)
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        try:
            path = root / "blobs" / "sha256" / safe_hex(d)
        except FormatError:
            continue
        seen.add(d)
        try:
            if path.stat().st_size <= MAX_JSON:
                todo.extend(manifest_children(path.read_bytes()))
        except OSError:
            continue
    return seen


# ------------------------------------------------------------------------------------- blob roles


class BlobFileSource(ImageSource):
    """A source whose blobs are regular files named by digest."""

    @abc.abstractmethod
    def blob_path(self, digest: str) -> Path:
        """Where the blob lives (``digest`` already validated by the caller via ``safe_hex``)."""

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        safe_hex(info.digest)
        return open_regular(self.blob_path(info.digest), f"blob {info.digest}")

    def has_blob(self, info: BlobInfo) -> bool:
        safe_hex(info.digest)
        return self.blob_path(info.digest).is_file()

    def get_blob_ranges(self, info: BlobInfo, ranges: list[tuple[int, int]]) -> list[bytes]:
        f, size = self.get_blob(info)
        out = []
        with f:
            for off, ln in ranges:
                if off < 0 or ln < 0 or off + ln > size:
                    raise NotFound(f"range {off}+{ln} past the end of blob {info.digest}")
                out.append(os.pread(f.fileno(), ln, off))
        return out

    def read_manifest_file(self, path: Path, digest: str | None) -> bytes:
        """A manifest file, checked against ``digest`` when one is known (manifests are small)."""
        raw = read_small(path, f"manifest {digest or path.name}")
        if digest is not None and sha256_of(raw) != digest:
            raise IntegrityError(f"manifest {digest} in {path.parent} does not match its digest")
        return raw


class BlobFileDestination(ImageDestination):
    """A destination whose blobs are files named by digest, written to ``tmp_dir`` then renamed."""

    tmp_dir: Path

    @abc.abstractmethod
    def blob_path(self, digest: str) -> Path: ...

    def has_blob(self, info: BlobInfo) -> bool:
        safe_hex(info.digest)
        return self.blob_path(info.digest).is_file()

    def put_blob(self, stream: BinaryIO, info: BlobInfo) -> None:
        safe_hex(info.digest)
        self.store_stream(stream, info, self.blob_path(info.digest))

    def store_stream(self, stream: BinaryIO, info: BlobInfo, final: Path) -> None:
        """Write ``stream`` to a temp file, check its sha256 and size, fsync, rename onto ``final``."""
        h = hashlib.sha256()
        n = 0
        try:
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=".shoal-blob-")
        except OSError as exc:
            raise from_oserror(exc, f"cannot create a temp file in {self.tmp_dir}", "", store=True) from None
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := stream.read(_CHUNK):
                    n += len(chunk)
                    if 0 <= info.size < n:
                        raise IntegrityError(f"blob {info.digest} is longer than its {info.size} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
                written = os.fstat(f.fileno()).st_size
            if 0 <= info.size != n:
                raise IntegrityError(f"blob {info.digest} is truncated: {n} of {info.size} bytes")
            if written != n:
                raise StoreError(f"blob {info.digest}: wrote {written} bytes of {n}")
            got = "sha256:" + h.hexdigest()
            if got != info.digest:
                raise IntegrityError(f"blob {info.digest} does not match its digest (got {got})")
            os.chmod(tmp, 0o644)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise from_oserror(exc, f"cannot write blob {info.digest} to {final.parent}", "", store=True) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_bytes(self, data: bytes, digest: str | None, final: Path | None = None) -> str:
        """Store a small blob (a manifest) atomically; checks ``digest`` if given; returns the digest."""
        got = sha256_of(data)
        if digest is not None and digest != got:
            raise IntegrityError(f"manifest does not match its digest {digest} (got {got})")
        self.store_stream(io.BytesIO(data), BlobInfo(got, len(data)), final or self.blob_path(got))
        return got


# ------------------------------------------------------------------------------------- source


class OciLayoutSource(BlobFileSource):
    """``where`` names the layout in messages (an archive's file name when it was extracted)."""

    def __init__(self, root: Path, name: str = "", index: int = -1, where: str | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        where = where or str(root)
        self.entries = _descriptors(_read_index(root, where), where)
        self._subjects: dict[str, str | None] = {}
        images = self.entries
        if not name and index < 0 and len(images) > 1:  # the one image, whatever referrers are listed with it
            images = [e for e in images if self._subject(e.digest) is None]
        self.top = _choose(images, name, index, where)
        self._child_types: dict[str, str] | None = None

    def _subject(self, digest: str) -> str | None:
        """The ``subject`` of the manifest ``digest`` in the layout (None: none, or not a readable manifest)."""
        if digest not in self._subjects:
            try:
                self._subjects[digest] = subject_of(self.read_manifest_file(self.blob_path(digest), digest))
            except (NotFound, FormatError, IntegrityError, StoreError) as exc:
                log.debug("index.json entry %s of %s is not a readable manifest (%s)", digest, self.root, exc)
                self._subjects[digest] = None
        return self._subjects[digest]

    def referrers(self, digest: str) -> list[Referrer]:
        """The manifests listed in index.json whose ``subject`` is ``digest`` (image-spec: a layout lists
        referrers there), each read and checked against its digest."""
        out = []
        for e in self.entries:
            if e.digest == digest or self._subject(e.digest) != digest:
                continue
            raw = self.read_manifest_file(self.blob_path(e.digest), e.digest)
            out.append(Referrer(digest, raw, e.media_type or guess_media_type(raw), referrer_kind(raw)))
        return out

    def blob_path(self, digest: str) -> Path:
        return self.blobs / safe_hex(digest)

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        if digest is None:
            raw = self.read_manifest_file(self.blob_path(self.top.digest), self.top.digest)
            return raw, self.top.media_type or guess_media_type(raw)
        raw = self.read_manifest_file(self.blob_path(digest), digest)
        return raw, self._media_type_of(digest) or guess_media_type(raw)

    def _media_type_of(self, digest: str) -> str:
        """A child's media type as its parent index (or index.json) declares it."""
        if self._child_types is None:
            self._child_types = {e.digest: e.media_type for e in self.entries}
            top, _ = self.get_manifest()
            doc = decode_json(top, "manifest")
            for d in doc.get("manifests", []) if isinstance(doc, dict) else []:
                if isinstance(d, dict) and isinstance(d.get("digest"), str):
                    self._child_types[d["digest"]] = str(d.get("mediaType", ""))
        return self._child_types.get(digest, "")


# ------------------------------------------------------------------------------------- destination


class OciLayoutDestination(BlobFileDestination):
    def __init__(self, root: Path, name: str = "") -> None:
        self.root = root
        self.name = name
        self.blobs = root / "blobs" / "sha256"
        self.tmp_dir = root
        self._top: Descriptor | None = None
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_oserror(exc, f"cannot create an OCI layout at {root}", "", store=True) from None
        if (root / "index.json").exists():
            _descriptors(_read_index(root, str(root)), str(root))  # refuse a broken layout now, not at commit
        if not (root / "oci-layout").exists():
            write_atomic(root / "oci-layout", LAYOUT_FILE)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / safe_hex(digest)

    keeps_referrers = True

    def put_referrer(self, ref: Referrer, subject: dict[str, Any]) -> None:
        """Write the referrer (given a ``subject`` if it names none) and list it, unnamed, in index.json
        beside the entries already there (image-spec image-layout: referrers may be listed there)."""
        raw = with_subject(ref.manifest, subject)
        kept = Referrer(ref.subject, raw, ref.media_type, ref.kind)
        self.put_bytes(raw, None)
        fsync_dir(self.blobs)
        with _index_lock(self.root):
            if (self.root / "index.json").exists():
                doc = _read_index(self.root, str(self.root))
            else:
                doc = {"schemaVersion": 2, "manifests": []}
            if any(isinstance(e, dict) and e.get("digest") == kept.digest for e in doc["manifests"]):
                return
            doc["manifests"].append(kept.descriptor())
            write_atomic(self.root / "index.json", _dump(doc))

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        got = self.put_bytes(raw, digest)
        if digest is None:
            self._top = Descriptor(media_type or guess_media_type(raw), got, len(raw), self.name)

    def commit(self) -> None:
        top = self._top
        if top is None:
            raise UsageError(f"oci:{self.root}: commit() before put_manifest()")
        fsync_dir(self.blobs)
        entry: dict[str, Any] = {"mediaType": top.media_type, "digest": top.digest, "size": top.size}
        if self.name:
            entry["annotations"] = {mt.ANN_REF_NAME: self.name}
        with _index_lock(self.root):
            if (self.root / "index.json").exists():
                doc = _read_index(self.root, str(self.root))
            else:
                doc = {"schemaVersion": 2, "manifests": []}
            old = _descriptors(doc, str(self.root))
            kept = [e for e, d in zip(doc["manifests"], old) if not self._replaces(d)]
            doc["manifests"] = kept + [entry]
            write_atomic(self.root / "index.json", _dump(doc))
        log.debug("oci:%s: %s is now %s", self.root, self.name or "(unnamed)", top.digest)

    def _replaces(self, d: Descriptor) -> bool:
        assert self._top is not None
        if self.name:
            return d.name == self.name
        return not d.name and d.digest == self._top.digest
