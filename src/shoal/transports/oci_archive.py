"""``oci-archive:FILE[:REF]`` -- a tar of an OCI image layout (docs/transports.md).

REF has the syntax and meaning of ``oci:PATH[:REF]`` (see ``oci_layout``).

- The source extracts FILE into a private temp directory and serves it with ``OciLayoutSource``.
  Extraction trusts nothing: a member whose name is absolute or contains ``..``, any link, device,
  FIFO or sparse file, a duplicate name, more than ``max_members`` members or more than ``max_size``
  bytes is refused (``HostileInput``); a truncated or corrupt archive (including one that lacks the
  end-of-archive block, or ``oci-layout`` / ``index.json``) is a ``FormatError``.
  FILE may be gzip, zstd, bzip2 or xz compressed, as containers/image accepts.
- The destination writes an ``OciLayoutDestination`` in a temp directory beside FILE; ``commit()``
  tars it deterministically (names sorted, mtime 0, uid/gid 0, no owner names, GNU headers, so no pax
  timestamps) into a temp file beside FILE and renames it over FILE.  As with skopeo, an existing FILE
  is replaced, not merged.

The tar plumbing here (``plain_tar``, ``TarIndex``: a checked, in-place index of an archive's members;
``write_tar``: the deterministic writer) is shared with ``docker_archive``.

Options (the ``SystemContext`` fields it reads): ``max_size`` (bytes extracted), ``max_members``,
``tmpdir`` (where temp directories go).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import logging
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, cast

import zstandard

from shoal.errors import FormatError, HostileInput, NotFound, StoreError, from_oserror
from shoal.transports.base import (
    BlobInfo,
    ImageDestination,
    ImageSource,
    Referrer,
    SystemContext,
    Transport,
    register,
)
from shoal.transports.oci_layout import (
    MAX_JSON,
    LayoutPathReference,
    OciLayoutDestination,
    OciLayoutSource,
    parse_layout_ref,
)

__all__ = ["OciArchiveTransport", "OciArchiveReference", "OciArchiveSource", "OciArchiveDestination",
           "ArchiveLimits", "TarIndex", "Member", "TarEntry", "sniff", "decompressed", "decompress_file",
           "plain_tar", "member_name", "write_tar", "make_tempdir", "TRANSPORT", "READ_ERRORS"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# what a corrupt or truncated (compressed) tar raises while being read
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError)
_MAX_LINKS = 16
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


@dataclass(frozen=True)
class ArchiveLimits:
    max_size: int = 64 << 30  # bytes of member data (after decompression)
    max_members: int = 1_000_000

    @classmethod
    def of(cls, ctx: SystemContext | None) -> "ArchiveLimits":
        return cls() if ctx is None else cls(ctx.max_size, ctx.max_members)


def _tmpdir(ctx: SystemContext | None, default: Path | None = None) -> str | None:
    t = ctx.tmpdir if ctx is not None else None
    return t if t else (str(default) if default else None)


def make_tempdir(prefix: str, where: str | None) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    except OSError as exc:
        where = where or tempfile.gettempdir()
        raise from_oserror(exc, f"cannot create a temp directory in {where}", "", store=True) from None


# ------------------------------------------------------------------------------------- reading tars


def sniff(head: bytes) -> str:
    """``gzip``, ``zstd``, ``bzip2``, ``xz`` or ``""`` (not compressed) from a file's first bytes."""
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return ""


def decompressed(f: BinaryIO, kind: str) -> BinaryIO:
    """A stream of ``f`` decompressed as ``kind`` (see ``sniff``); ``f`` itself if ``kind`` is ``""``."""
    if kind == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=f, mode="rb"))
    if kind == "zstd":
        return cast(BinaryIO, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
    if kind == "bzip2":
        return cast(BinaryIO, bz2.BZ2File(f))
    if kind == "xz":
        return cast(BinaryIO, lzma.LZMAFile(f))
    return f


def decompress_file(src: Path, kind: str, dest: Path, limit: int, label: str) -> str:
    """Decompress ``src`` into a new file ``dest`` (at most ``limit`` bytes); return the result's sha256."""
    h, n = hashlib.sha256(), 0
    try:
        out = open(dest, "xb")
    except OSError as exc:
        raise from_oserror(exc, f"cannot write {dest}", "", store=True) from None
    try:
        with out, open(src, "rb") as f, decompressed(f, kind) as z:
            while chunk := z.read(_CHUNK):
                n += len(chunk)
                if n > limit:
                    raise HostileInput(f"{label} decompresses to more than {limit} bytes")
                h.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise from_oserror(exc, f"cannot write {dest}", "", store=True) from None
    except (FormatError, StoreError):
        raise
    except READ_ERRORS as exc:
        raise FormatError(f"cannot decompress {label}: {_why(exc)}") from None
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def plain_tar(archive: Path, limits: ArchiveLimits, tmpdir: str | None) -> Iterator[Path]:
    """``archive`` itself, or a decompressed temp copy of it if it is compressed."""
    try:
        with open(archive, "rb") as f:
            kind = sniff(f.read(8))
    except FileNotFoundError:
        raise NotFound(f"archive {archive} does not exist") from None
    except OSError as exc:
        raise from_oserror(exc, f"cannot open {archive}", "", store=True) from None
    if not kind:
        yield archive
        return
    tmp = make_tempdir("shoal-archive-", tmpdir)
    try:
        decompress_file(archive, kind, tmp / "archive.tar", limits.max_size, str(archive))
        yield tmp / "archive.tar"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def member_name(info: tarfile.TarInfo, archive: str) -> str:
    """The member's normalised relative name; refuses names that could leave the extraction root."""
    name = info.name
    if "\0" in name or name.startswith("/") or any(p == ".." for p in name.split("/")):
        raise HostileInput(f"{archive}: refusing member {name[:100]!r}: it escapes the archive")
    return "/".join(p for p in name.split("/") if p not in ("", "."))


@dataclass(frozen=True)
class Member:
    offset: int
    size: int
    link: str | None = None  # a symlink's or hard link's target member name


class Section(io.RawIOBase):
    """``size`` bytes at ``offset`` of a file, read with pread (each stream has its own descriptor)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos, self._end = offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise FormatError("archive is truncated")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class TarIndex:
    """Member name -> where its bytes are, for an uncompressed tar file read in place.

    Refuses (``HostileInput``) names that are absolute or contain ``..``, links pointing outside the
    archive, devices, FIFOs, sparse files, duplicate names, and more than ``limits`` allow; an archive
    that is truncated or corrupt anywhere, or lacks its end-of-archive block, is a ``FormatError``.
    """

    def __init__(self, path: Path, label: str, limits: ArchiveLimits) -> None:
        self.path, self.label, self.limits = path, label, limits
        self.members: dict[str, Member] = {}
        self.total = 0
        try:
            end = path.stat().st_size
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    self._add(info, end)
                stop = tar.offset
            with open(path, "rb") as f:
                f.seek(stop)
                block = f.read(tarfile.BLOCKSIZE)
        except (FormatError, NotFound):
            raise
        except READ_ERRORS as exc:
            raise FormatError(f"{label} is not a readable tar archive: {_why(exc)}") from None
        if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
            raise FormatError(f"{label} is truncated or corrupt at byte {stop}")

    def _add(self, info: tarfile.TarInfo, end: int) -> None:
        name = member_name(info, self.label)
        if info.isdir() or not name:
            return
        if len(self.members) >= self.limits.max_members:
            raise HostileInput(f"{self.label}: more than {self.limits.max_members} members")
        if name in self.members:
            raise HostileInput(f"{self.label}: member {name[:100]!r} appears twice")
        if info.issym() or info.islnk():
            base = posixpath.dirname(name) if info.issym() else ""
            target = posixpath.normpath(posixpath.join(base, info.linkname))
            if info.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise HostileInput(f"{self.label}: link {name[:100]!r} points outside the archive")
            self.members[name] = Member(0, 0, target)
        elif info.isreg() and not info.issparse():
            if info.offset_data + info.size > end:
                raise FormatError(f"{self.label} is truncated inside {name[:100]!r}")
            self.total += info.size
            if self.total > self.limits.max_size:
                raise HostileInput(f"{self.label}: more than {self.limits.max_size} bytes of content")
            self.members[name] = Member(info.offset_data, info.size)
        else:
            raise HostileInput(f"{self.label}: refusing member {name[:100]!r}: a device, FIFO or sparse file")

    def lookup(self, name: str) -> Member:
        """The regular member ``name`` names, following links inside the archive."""
        key = posixpath.normpath(name)
        for _ in range(_MAX_LINKS):
            m = self.members.get(key)
            if m is None:
                raise FormatError(f"{self.label} has no member {name[:100]!r}")
            if m.link is None:
                return m
            key = m.link
        raise HostileInput(f"{self.label}: too many links resolving {name[:100]!r}")

    def open(self, m: Member) -> io.BufferedReader:
        return io.BufferedReader(Section(self.path, m.offset, m.size), _CHUNK)

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        m = self.lookup(name)
        if m.size > limit:
            raise FormatError(f"{self.label}: {name[:100]!r} is larger than {limit} bytes")
        with self.open(m) as f:
            return f.read()

    def extract(self, dest: Path) -> None:
        """Write every member as a regular file under the empty directory ``dest``; links are refused."""
        for name, m in self.members.items():
            if m.link is not None:
                raise HostileInput(f"{self.label}: refusing link member {name[:100]!r}")
        for name, m in self.members.items():
            path = dest / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                out = open(path, "xb")
            except (FileExistsError, NotADirectoryError):
                raise HostileInput(f"{self.label}: member {name[:100]!r} clashes with another") from None
            except OSError as exc:
                raise from_oserror(exc, f"cannot extract {self.label}", "", store=True) from None
            with out, self.open(m) as src:
                try:
                    shutil.copyfileobj(src, out, _CHUNK)
                except OSError as exc:
                    raise from_oserror(exc, f"cannot extract {self.label}", "", store=True) from None


def _why(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)[:160]


# ------------------------------------------------------------------------------------- writing tars


@dataclass(frozen=True)
class TarEntry:
    name: str
    source: Path | None  # None: a directory


def write_tar(target: Path, entries: Iterable[TarEntry]) -> None:
    """Write a deterministic tar of ``entries`` to ``target`` atomically (temp file beside it, rename)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    except OSError as exc:
        raise from_oserror(exc, f"cannot write {target}", "", store=True) from None
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
                for e in sorted(entries, key=lambda e: e.name.encode()):
                    info = tarfile.TarInfo(e.name)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    if e.source is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                        continue
                    info.mode = 0o644
                    with open(e.source, "rb") as src:
                        info.size = os.fstat(src.fileno()).st_size
                        tar.addfile(info, src)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise from_oserror(exc, f"cannot write {target}", "", store=True) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------- transport


class OciArchiveTransport(Transport):
    name = "oci-archive"

    def parse(self, details: str) -> "OciArchiveReference":
        r = parse_layout_ref(details, self.name)
        return OciArchiveReference(r.path, r.name, r.index)


TRANSPORT = register(OciArchiveTransport())


@dataclass(frozen=True)
class OciArchiveReference(LayoutPathReference):
    transport = TRANSPORT

    def new_source(self, ctx: SystemContext | None = None) -> "OciArchiveSource":
        return OciArchiveSource(self, ArchiveLimits.of(ctx), _tmpdir(ctx))

    def new_destination(self, ctx: SystemContext | None = None) -> "OciArchiveDestination":
        self._check_destination()
        return OciArchiveDestination(self, _tmpdir(ctx, Path(self.path).parent))


class OciArchiveSource(ImageSource):
    def __init__(self, ref: OciArchiveReference, limits: ArchiveLimits, tmpdir: str | None = None) -> None:
        self.dir = make_tempdir("shoal-oci-archive-", tmpdir)
        try:
            with plain_tar(Path(ref.path), limits, tmpdir) as tar:
                TarIndex(tar, ref.path, limits).extract(self.dir)
            if not (self.dir / "index.json").is_file() or not (self.dir / "oci-layout").is_file():
                raise FormatError(f"{ref.path} is not an OCI archive: it lacks index.json or oci-layout")
            self.inner = OciLayoutSource(self.dir, ref.name, ref.index, where=str(ref))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        return self.inner.get_manifest(digest)

    def get_blob(self, info: BlobInfo) -> tuple[BinaryIO, int]:
        return self.inner.get_blob(info)

    def get_blob_ranges(self, info: BlobInfo, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self.inner.get_blob_ranges(info, ranges)

    def has_blob(self, info: BlobInfo) -> bool:
        return self.inner.has_blob(info)

    def referrers(self, digest: str) -> list[Referrer]:
        return self.inner.referrers(digest)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class OciArchiveDestination(ImageDestination):
    def __init__(self, ref: OciArchiveReference, tmpdir: str | None = None) -> None:
        self.target = Path(ref.path)
        if not self.target.parent.is_dir():
            raise NotFound(f"{ref}: directory {self.target.parent} does not exist")
        self.dir = make_tempdir(f".{self.target.name}.shoal-", tmpdir)
        try:
            self.inner = OciLayoutDestination(self.dir, ref.name)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def has_blob(self, info: BlobInfo) -> bool:
        return self.inner.has_blob(info)

    def put_blob(self, stream: BinaryIO, info: BlobInfo) -> None:
        self.inner.put_blob(stream, info)

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        self.inner.put_manifest(raw, media_type, digest)

    def commit(self) -> None:
        self.inner.commit()
        entries = [TarEntry("oci-layout", self.dir / "oci-layout"), TarEntry("index.json", self.dir / "index.json"),
                   TarEntry("blobs", None), TarEntry("blobs/sha256", None)]
        entries += [TarEntry(f"blobs/sha256/{p.name}", p) for p in self.inner.blobs.iterdir()
                    if not p.name.startswith(".") and p.is_file()]
        write_tar(self.target, entries)
        log.debug("wrote %s (%d blobs)", self.target, len(entries) - 4)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
