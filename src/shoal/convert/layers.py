"""Apply classic tar layers, in order, onto one in-memory tree (docs/spec/convert.md §3-§5).

One streaming pass per layer: ``tarfile`` in stream mode (``r|``) reads headers from a
``LayerStream`` (decompression, digests, limits); nothing is extracted to disk, file contents go to
the spill file.  Understood: ustar, GNU and PAX headers (long names and links, global headers,
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` xattrs, sub-second and negative mtimes, GNU sparse
files in the old, 0.x and 1.0 formats), whiteouts and opaque markers, hardlinks to files of this
or a lower layer, devices and fifos.
"""

from __future__ import annotations

import base64
import logging
import re
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, cast

from shoal import mediatypes as mt
from shoal.convert.stream import Budget, ConvertLimits, LayerStream
from shoal.convert.tree import ConvertedTree, Inode, Meta, Node, Spill, Tree, show, split_path
from shoal.errors import FormatError, HostileInput
from shoal.format.metadata import MODE_BITS, keep_xattr, recorded_xattrs
from shoal.format.model import Kind

__all__ = ["LayerApplier", "LayerResult", "LAYER_TYPES", "WHITEOUT", "OPAQUE"]

log = logging.getLogger(__name__)

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
LAYER_TYPES = frozenset({
    mt.OCI_LAYER_TAR, mt.OCI_LAYER_GZIP, mt.OCI_LAYER_ZSTD, mt.DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR,
    DOCKER_LAYER_FOREIGN,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_AUFS_META = b".wh..wh."  # .wh..wh.plnk, .wh..wh.aufs, .wh..wh.orph: AUFS bookkeeping, skipped
MAX_XATTRS_BYTES = 64 * 1024  # format.md §4.3
_U32 = 1 << 32
_PAX_TIME = re.compile(r"^(-?)([0-9]+)(?:\.([0-9]*))?$")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


@dataclass(frozen=True)
class LayerResult:
    digest: str
    diff_id: str
    compression: str  # gzip, zstd, none
    compressed_bytes: int
    uncompressed_bytes: int
    entries: int


class _SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized metadata headers before ``tarfile`` reads them into memory."""

    max_header = 1 << 20
    max_sparse = 1 << 20

    def _proc_member(self, tf: Any) -> Any:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > self.max_header:
            raise HostileInput(f"tar metadata header of {self.size} bytes (limit {self.max_header})")
        return super()._proc_member(tf)  # type: ignore[misc]

    def _proc_gnusparse_10(self, nxt: Any, pax_headers: Any, tf: Any) -> None:
        # The stdlib's parser, with a bound on the number of map entries.
        sparse: list[int] = []
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        head, buf = buf.split(b"\n", 1) if b"\n" in buf else (buf, b"")
        try:
            fields = int(head)
        except ValueError:
            raise FormatError("malformed GNU sparse 1.0 map") from None
        if not 0 <= fields <= self.max_sparse:
            raise HostileInput(f"GNU sparse map of {fields} entries (limit {self.max_sparse})")
        while len(sparse) < fields * 2:
            if b"\n" not in buf:
                more = tf.fileobj.read(tarfile.BLOCKSIZE)
                if not more:
                    raise FormatError("truncated GNU sparse 1.0 map")
                buf += more
            number, buf = buf.split(b"\n", 1)
            try:
                sparse.append(int(number))
            except ValueError:
                raise FormatError("malformed GNU sparse 1.0 map") from None
        nxt.offset_data = tf.fileobj.tell()
        nxt.sparse = list(zip(sparse[::2], sparse[1::2]))


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _pax_time(value: str, name: bytes) -> int:
    m = _PAX_TIME.match(value.strip())
    if m is None:
        raise FormatError(f"{show(name)}: malformed PAX mtime {value[:40]!r}")
    sign, whole, frac = m.groups()
    ns = int(whole) * 1_000_000_000 + int((frac or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _xattrs(pax: Mapping[str, str], name: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs of a PAX header that an image records (format.md §4.7: the same rule as ``build``).
    ``SCHILY.acl.*`` records (POSIX ACLs) are not xattrs here and are dropped like the
    ``system.posix_acl_*`` attributes."""
    found: dict[bytes, bytes] = {}
    for k, v in pax.items():
        if k.startswith("LIBARCHIVE.xattr."):
            try:
                key = urllib.parse.unquote_to_bytes(k[17:])
                if not keep_xattr(key):
                    continue
                found.setdefault(key, base64.b64decode(v + "=" * (-len(v) % 4), validate=True))
            except ValueError:
                raise FormatError(f"{show(name)}: malformed {k[:60]} header") from None
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            found[_b(k[13:])] = _b(v)  # SCHILY wins over LIBARCHIVE (they should agree)
    out = recorded_xattrs(found.items())
    if sum(len(k) + len(v) for k, v in out) > MAX_XATTRS_BYTES:
        raise HostileInput(f"{show(name)}: more than {MAX_XATTRS_BYTES} bytes of xattrs")
    return out


def _meta(ti: tarfile.TarInfo, name: bytes) -> Meta:
    uid, gid = int(ti.uid), int(ti.gid)
    if not (0 <= uid < _U32 and 0 <= gid < _U32):
        raise HostileInput(f"{show(name)}: uid/gid {uid}/{gid} out of range")
    pax = ti.pax_headers
    mtime = _pax_time(pax["mtime"], name) if "mtime" in pax else int(ti.mtime) * 1_000_000_000
    return Meta(ti.mode & MODE_BITS, uid, gid, mtime, _xattrs(pax, name))


def _rdev(ti: tarfile.TarInfo, name: bytes) -> tuple[int, int]:
    pax = ti.pax_headers
    try:
        major = int(pax.get("SCHILY.devmajor", ti.devmajor))
        minor = int(pax.get("SCHILY.devminor", ti.devminor))
    except ValueError:
        raise FormatError(f"{show(name)}: malformed device number") from None
    if not (0 <= major < _U32 and 0 <= minor < _U32):
        raise HostileInput(f"{show(name)}: device number {major}:{minor} out of range")
    return major, minor


class LayerApplier:
    """Applies layers in order to one tree; ``finish`` returns the merged tree as a TreeSource."""

    def __init__(self, tmpdir: Path, limits: ConvertLimits | None = None, threaded: bool = True) -> None:
        self.threaded = threaded  # inflate on a second thread (LayerStream); False: all on the caller's
        self.limits = limits or ConvertLimits()
        self.budget = Budget(self.limits)
        self.tree = Tree()
        self.spill = Spill(tmpdir)
        self.entries = 0
        self.layers = 0
        self.tarinfo = type("_LimitedTarInfo", (_SafeTarInfo,), {
            "max_header": self.limits.max_header_bytes, "max_sparse": self.limits.max_sparse_blocks})

    def close(self) -> None:
        self.spill.close()

    def apply(self, raw: BinaryIO, *, digest: str, size: int, diff_id: str | None = None,
              media_type: str = mt.OCI_LAYER_TAR, what: str | None = None) -> LayerResult:
        """Apply one layer blob read from ``raw``.  ``digest``/``size`` describe the blob as its descriptor
        does, ``diff_id`` (if known) the uncompressed tar.  Raises FormatError, HostileInput or
        IntegrityError; after an error the applier must be closed, not reused."""
        n = self.layers
        what = what or f"layer {n + 1} ({digest[:19]})"
        if media_type not in LAYER_TYPES:
            raise FormatError(f"{what}: unsupported layer media type {media_type!r}")
        self.tree.layer = n
        self.layers += 1
        # the blob is read, hashed and inflated on a thread of its own while this one parses the tar
        stream = LayerStream(raw, digest, size, diff_id, self.budget, what, threaded=self.threaded)
        before = self.entries
        try:
            self._read_tar(stream, what)
            got = stream.finish()
        except HostileInput:
            raise
        except FormatError:
            stream.check_blob()  # a corrupt or truncated blob says so more clearly than the tar error
            raise
        finally:
            stream.close()
        return LayerResult(digest, got, stream.compression, stream.cbytes, stream.ubytes, self.entries - before)

    def finish(self, source_date_epoch: int | None = None) -> ConvertedTree:
        return self.tree.canonical(self.spill, source_date_epoch)

    # ------------------------------------------------------------------ tar

    def _read_tar(self, stream: LayerStream, what: str) -> None:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=self.tarinfo,  # type: ignore[call-overload]
                              encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as exc:
            if stream.ubytes == 0:
                return  # an empty blob is an empty layer
            raise FormatError(f"{what}: not a tar archive: {exc}") from None
        except tarfile.TarError as exc:
            raise FormatError(f"{what}: malformed tar: {exc}") from None
        while True:
            try:
                ti = tf.next()
            except tarfile.TarError as exc:
                raise FormatError(f"{what}: malformed tar: {exc}") from None
            except (EOFError, ValueError) as exc:
                raise FormatError(f"{what}: malformed or truncated tar: {exc}") from None
            if ti is None:
                break
            tf.members = []  # the stream reader would otherwise remember every header
            self.entries += 1
            if self.entries > self.limits.max_entries:
                raise HostileInput(f"{what}: more than {self.limits.max_entries} tar entries")
            self._member(tf, ti, what)

    def _member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, what: str) -> None:
        name = _b(ti.name)
        comps = split_path(name)
        base = comps[-1] if comps else b""
        tree = self.tree
        if comps and comps[0].startswith(_AUFS_META) and comps != [OPAQUE]:
            log.debug("%s: skipping AUFS metadata %r", what, name)  # as Docker does
            return
        if base.startswith(WHITEOUT):
            if base == OPAQUE:
                tree.opaque(comps[:-1])
            elif base.startswith(_AUFS_META):
                log.debug("%s: skipping AUFS metadata %r", what, name)
            else:
                target = base[len(WHITEOUT):]
                if target in (b".", b".."):
                    raise HostileInput(f"{what}: whiteout {show(name)} names {target.decode()}")
                tree.whiteout(comps[:-1] + [target])
            return
        t = ti.type
        if t in _REGULAR:
            meta = _meta(ti, name)
            if ti.sparse is not None:  # holes are spilled as zeros: they count against the limit (convert.md §6)
                data = sum(n for _, n in cast("list[tuple[int, int]]", ti.sparse))
                self.budget.take(max(0, ti.size - data), f"{what}: sparse file {show(name)}")
            f = tf.extractfile(ti)
            assert f is not None
            try:
                off = self.spill.append(f.read, ti.size, f"{what}: {show(name)}")
            except tarfile.TarError as exc:
                raise FormatError(f"{what}: {show(name)}: {exc}") from None
            tree.put(comps, Node(Kind.FILE, meta, 0, inode=Inode(off, ti.size, meta)))
        elif t == tarfile.DIRTYPE:
            tree.put_dir(comps, _meta(ti, name))
        elif t == tarfile.SYMTYPE:
            target = _b(ti.linkname)
            if not target or b"\0" in target:
                raise FormatError(f"{what}: symlink {show(name)} has an empty or invalid target")
            tree.put(comps, Node(Kind.SYMLINK, _meta(ti, name), 0, target=target))
        elif t == tarfile.LNKTYPE:
            link = split_path(_b(ti.linkname))
            if not comps:
                raise HostileInput(f"{what}: a hardlink entry names the root directory")
            tree.remove(comps)  # as extractors do: unlink, then link
            src = tree.hardlink_source(link, comps)
            if src.kind == Kind.FILE:
                assert src.inode is not None
                node = Node(Kind.FILE, src.inode.meta, 0, inode=src.inode)
            else:  # hardlinked symlinks, devices, fifos become copies (convert.md §4.5)
                node = Node(src.kind, src.meta, 0, target=src.target, rdev=src.rdev)
            tree.put(comps, node)
        elif t in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            kind = Kind.CHAR if t == tarfile.CHRTYPE else Kind.BLOCK
            tree.put(comps, Node(kind, _meta(ti, name), 0, rdev=_rdev(ti, name)))
        elif t == tarfile.FIFOTYPE:
            tree.put(comps, Node(Kind.FIFO, _meta(ti, name), 0))
        else:
            log.warning("%s: skipping %s: unsupported tar entry type %r", what, show(name), t)
            tree.skipped.append(b"/".join(comps))
