"""Profile bundles: the part of an image's tree a workload uses and the chunks it reads, in one blob,
checkable against the image's Merkle root without the index (docs/spec/bundle.md).

A bundle holds (1) a *partial tree*: for each directory the workload listed (and every ancestor),
its own metadata and the Merkle records (format.md §6) of all its children, so its digest can be
recomputed and compared top down from the root; for each file the workload read, its full chunk-id
list and chunk lengths, which its record's ``ids`` digest and ``size`` bind; (2) the bytes of exactly
the chunks the workload read, in first-read order, in zstd frames of a few chunks each.

``make`` builds one from a verified index; ``open_bundle`` checks one against a root and returns the
verified chunks (every check of the spec, §3, before anything is returned); ``BundleData`` makes the
same checks in the two steps of §3.6, for a mount serving chunks by id while the rest is checked.
``make`` and ``open_bundle`` are pure functions of their inputs: the same index, workload recording
and level give the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from shoal.errors import FormatError, HostileInput, IntegrityError
from shoal.format import cbor
from shoal.format.index import MAX_CHUNK, child_record, meta_record
from shoal.format.model import Entry, Index, Kind, name_of, parent_of

__all__ = ["MAGIC", "FORMAT", "Blob", "WholeBlob", "Bundle", "BundleData", "BundleDir", "BundleFile", "make",
           "open_bundle", "read_header", "LIMITS", "Limits", "FRAME_TARGET", "FIRST_FRAME", "ZSTD_LEVEL",
           "PartialTree", "frame_target_of"]

MAGIC = b"SHOALBD1"  # §2: 8 bytes, then u32be header length
FORMAT = 1
FRAME_TARGET = 1024 * 1024  # §2.3: a data frame closes once it holds this many bytes
FIRST_FRAME = 64 * 1024  # §2.3: the first frame's target; each next one's is 4x, up to FRAME_TARGET
ZSTD_LEVEL = 19  # §2.3 (bench/bundle.py)
_DIR_TAG = "shoal/dir/2"
_HEAD = struct.Struct(">8sI")
_REF = struct.Struct(">II")


@dataclass(frozen=True)
class Limits:
    """§4: what a reader accepts (a bundle is untrusted input until every check passed)."""

    blob: int = 256 * 1024 * 1024  # the whole bundle
    header: int = 16 * 1024 * 1024  # the decompressed header
    dirs: int = 65536
    files: int = 65536
    children: int = 1 << 20  # records over all directories
    chunks: int = 1 << 20  # chunk-id list entries over all files
    data: int = 256 * 1024 * 1024  # decompressed data over all frames
    frame: int = 4 * 1024 * 1024  # decompressed bytes of one data frame
    # the header's CBOR items (array elements, map keys and values) per byte of its compressed frame,
    # plus header_items: a real tree's header holds 0.25-0.75 (a run of empty directories 3.8), while
    # 600 bytes of zstd inflate to 16 MiB of empty arrays, 16M Python lists (39 s, 1.2 GB) to decode
    items_per_byte: int = 16
    header_items: int = 65536


LIMITS = Limits()


@dataclass(frozen=True)
class BundleDir:
    """A directory of the partial tree: its own Merkle metadata, its children's records (§6), and the
    index positions of it and of each child (hints, §3.4)."""

    path: bytes
    pos: int
    meta: tuple[int, int, int, int, tuple[tuple[bytes, bytes], ...]]  # mode, uid, gid, mtime, xattrs
    records: tuple[tuple[Any, ...], ...]
    kids: tuple[int, ...]

    def digest(self) -> bytes:
        mode, uid, gid, mtime, xattrs = self.meta
        doc = [_DIR_TAG, [mode, uid, gid, mtime, dict(xattrs)], [list(r) for r in self.records]]
        return hashlib.sha256(cbor.encode_fast(doc)).digest()  # checked values: one key type per map


@dataclass(frozen=True)
class BundleFile:
    path: bytes
    ids: tuple[bytes, ...]
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: ``chunks`` maps each chunk id to its verified bytes, in first-read order."""

    root: bytes
    dirs: tuple[BundleDir, ...]
    files: tuple[BundleFile, ...]
    chunks: dict[bytes, bytes]
    frames: tuple[tuple[int, int], ...]  # (chunks, compressed length) per data frame
    size: int  # bytes of the blob

    @property
    def data_bytes(self) -> int:
        return sum(len(b) for b in self.chunks.values())


# ------------------------------------------------------------------------------------------ producer


def make(index: Index, dirs: Iterable[int], files: Iterable[int], chunks: Iterable[int],
         read_chunk: Callable[[int], bytes], level: int = ZSTD_LEVEL, frame_target: int = FRAME_TARGET) -> bytes:
    """The bundle of a workload on ``index`` (a verified index): ``dirs`` the positions of the directories
    it listed, ``files`` the positions of the files it read (a hardlink counts as its primary),
    ``chunks`` the chunk indices it read in first-read order, ``read_chunk(ci)`` their bytes (verified
    by the caller).  Every ancestor of a listed directory or read file is included; a read chunk that
    no read file holds is left out."""
    entries = index.entries
    shape = index.shape()
    fpos = sorted({q for q in (index.primary(p) for p in files) if entries[q].kind == Kind.FILE})
    want: set[int] = {0}
    for p in [*dirs, *fpos]:
        e = entries[p]
        path = e.path if e.kind == Kind.DIR else parent_of(e.path)
        d = shape.by_path[path]
        while d not in want:  # up to the first directory already in (the root is)
            want.add(d)
            path = parent_of(path)
            d = shape.by_path[path]
    dir_items = []
    for d in sorted(want):
        de = entries[d]
        if de.kind != Kind.DIR:
            continue
        kids = index.child_positions(d)
        recs = [child_record(entries[k], index.chunk_ids) for k in kids]
        dir_items.append([de.path, d, meta_record(de), recs, b"".join(struct.pack(">I", k) for k in kids)])
    file_items = []
    where: dict[int, tuple[int, int]] = {}  # chunk index -> (file number, chunk number)
    for n, p in enumerate(fpos):
        e = entries[p]
        for k, ci in enumerate(e.chunks):
            where.setdefault(ci, (n, k))
        file_items.append([e.path, b"".join(index.chunk_ids[c] for c in e.chunks),
                           b"".join(struct.pack(">I", index.chunk_lengths[c]) for c in e.chunks)])
    order = [ci for ci in dict.fromkeys(chunks) if ci in where]
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    frames: list[bytes] = []
    table = bytearray()
    cur: list[bytes] = []
    for i, ci in enumerate(order):
        cur.append(read_chunk(ci))
        if sum(map(len, cur)) >= frame_target_of(len(frames), frame_target) or i == len(order) - 1:
            z = cctx.compress(b"".join(cur))
            frames.append(z)
            table += _REF.pack(len(cur), len(z))
            cur = []
    header = {"format": FORMAT, "root": index.root, "dirs": dir_items, "files": file_items,
              "chunks": b"".join(_REF.pack(*where[ci]) for ci in order), "frames": bytes(table)}
    hz = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True).compress(
        cbor.encode(header))
    return b"".join([_HEAD.pack(MAGIC, len(hz)), hz, *frames])


def frame_target_of(n: int, frame_target: int = FRAME_TARGET) -> int:
    """The target of data frame ``n`` (0 first): FIRST_FRAME, then 4x each, up to ``frame_target`` (§2.3)."""
    return min(frame_target, FIRST_FRAME << min(2 * n, 32))


# ------------------------------------------------------------------------------------------ reader


def _fail(msg: str) -> FormatError:
    return FormatError(f"bundle: {msg}")


def _int(v: Any, hi: int, what: str, lo: int = 0) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise _fail(f"bad {what}")
    return v


def _bstr(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise _fail(f"{what} must be a byte string")
    return v


def _zstd(data: bytes, limit: int, what: str, exact: bool = False) -> bytes:
    """One zstd frame that declares its content size (at most ``limit``; with ``exact``, exactly
    ``limit``: format.md §4.6's rule), decompressed against it."""
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"bundle: {what} is not a zstd frame: {exc}") from None
    if exact and declared != limit:
        raise IntegrityError(f"bundle: {what} declares {declared} bytes, its chunks hold {limit}")
    if declared == zstandard.CONTENTSIZE_UNKNOWN or not 0 < declared <= limit:
        raise HostileInput(f"bundle: {what} declares {declared} bytes (limit {limit})")
    try:
        out = zstandard.ZstdDecompressor(max_window_size=1 << 24).decompress(
            data, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"bundle: {what} is corrupt or truncated: {exc}") from None
    if len(out) != declared:
        raise IntegrityError(f"bundle: {what} decompressed to {len(out)} bytes, not {declared}")
    return out


def _name(v: Any) -> bytes:
    name = _bstr(v, "name")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
        raise HostileInput(f"bundle: bad name {name[:80]!r}")
    return name


def _xattrs(v: Any) -> tuple[tuple[bytes, bytes], ...]:
    if type(v) is not dict or not all(type(k) is bytes and type(x) is bytes for k, x in v.items()):
        raise _fail("xattrs must map byte strings to byte strings")
    if sum(len(k) + len(x) for k, x in v.items()) > 64 * 1024:
        raise HostileInput("bundle: xattrs larger than 64 KiB")
    return tuple(sorted(v.items()))


_U32, _U64 = 1 << 32, 1 << 64


def _meta(v: Any, what: str) -> tuple[int, int, int, int, tuple[tuple[bytes, bytes], ...]]:
    if type(v) is not list or len(v) != 5:
        raise _fail(f"{what}: metadata must be 5 items")
    return (_int(v[0], 0o10000, "mode"), _int(v[1], _U32, "uid"), _int(v[2], _U32, "gid"),
            _int(v[3], _U64, "mtime", -_U64), _xattrs(v[4]))


def _record(v: Any) -> tuple[Any, ...]:
    """One child record (format.md §6), its shape checked: the digest of its directory binds its values."""
    if type(v) is not list or len(v) < 3:
        raise _fail("child record must be an array")
    _name(v[0])
    kind = _int(v[1], 7, "kind")
    n = len(v)
    if kind == Kind.DIR:
        ok = n == 3 and type(v[2]) is bytes and len(v[2]) == 32
    elif kind == Kind.HARDLINK:
        ok = n == 3 and type(v[2]) is bytes
    else:
        want = {Kind.FILE: 9, Kind.SYMLINK: 8, Kind.CHAR: 9, Kind.BLOCK: 9, Kind.FIFO: 7}[Kind(kind)]
        ok = n == want
        if ok:
            _meta(v[2:7], "record")
            if kind == Kind.FILE:
                _int(v[7], _U64, "size")
                ok = type(v[8]) is bytes and len(v[8]) == 32
            elif kind == Kind.SYMLINK:
                ok = type(v[7]) is bytes
            elif kind in (Kind.CHAR, Kind.BLOCK):
                _int(v[7], _U32, "major")
                _int(v[8], _U32, "minor")
    if not ok:
        raise _fail(f"malformed record of kind {kind}")
    return tuple(v)


def _child(named: dict[bytes, dict[bytes, tuple[Any, ...]]], path: bytes) -> tuple[Any, ...] | None:
    """The record of ``path`` in its listed parent, or None; only for the canonical spelling of the path
    (``/usr`` splits into the root and ``usr`` too, but is not the path of ``usr``)."""
    parent, name = parent_of(path), name_of(path)
    if not path or path != (parent + b"/" + name if parent else name):
        return None
    kids = named.get(parent)
    return None if kids is None else kids.get(name)


class Blob(Protocol):
    """A bundle blob being read: its ``size`` (known before its bytes, e.g. from a descriptor) and
    ``get(start, end)``, its bytes there once they are present (a blob still arriving waits; one whose
    transfer failed raises ShoalError)."""

    @property
    def size(self) -> int: ...

    def get(self, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class WholeBlob:
    """A ``Blob`` whose bytes are all here."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def get(self, start: int, end: int) -> bytes:
        return self.data[start:end]


def read_header(blob: bytes, limits: Limits = LIMITS) -> tuple[dict[str, Any], int]:
    """The decoded header map of ``blob`` and where its data frames start (§2.1)."""
    return _read_header(WholeBlob(blob), limits)


def _read_header(blob: Blob, limits: Limits) -> tuple[dict[str, Any], int]:
    size = blob.size
    if size > limits.blob:
        raise HostileInput(f"bundle larger than {limits.blob} bytes")
    if size < _HEAD.size:
        raise IntegrityError("bundle: truncated before its header")
    magic, hlen = _HEAD.unpack(blob.get(0, _HEAD.size))
    if magic != MAGIC:
        raise _fail("not a Shoal bundle (bad magic)")
    start = _HEAD.size + hlen
    if start > size:
        raise IntegrityError("bundle: truncated in its header")
    budget = limits.header_items + limits.items_per_byte * hlen  # §4: decoding cost bound by what was sent
    try:  # canonical CBOR only
        doc = cbor.decode_canonical(_zstd(blob.get(_HEAD.size, start), limits.header, "header"), budget)
    except HostileInput as exc:
        raise HostileInput(f"bundle: header holds more CBOR items than {budget} ({exc})") from None
    keys = {"format", "root", "dirs", "files", "chunks", "frames"}
    if type(doc) is not dict or set(doc) != keys:
        raise _fail(f"header must be a map with exactly the keys {sorted(keys)}")
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise _fail(f"format must be {FORMAT}")
    return doc, start


def open_bundle(blob: bytes, root: bytes, limits: Limits = LIMITS) -> Bundle:
    """Check ``blob`` against the image root ``root`` (§3) and return it with its verified chunks.

    Raises FormatError/HostileInput (malformed or over a limit) or IntegrityError (a digest that
    does not match, a truncated blob); nothing of a refused bundle is ever returned."""
    data = BundleData(WholeBlob(blob), root, limits)
    dirs, files = data.tree()
    return Bundle(root, dirs, files, data.chunks(), data.frames, len(blob))


class BundleData:
    """A bundle read in two steps (§3.6): constructing it reads the header, compares its root and checks
    the shape of its files' chunk lists and of its data (so each chunk reference names a chunk id and
    length, and each frame its chunks); ``chunk`` then hands out a chunk by id, its frame decompressed
    on first use and every chunk of it hashed against its id; ``tree`` checks the partial tree against
    the root top down and binds each file's chunk list to its record.  Raises as ``open_bundle``."""

    def __init__(self, blob: Blob, root: bytes, limits: Limits = LIMITS) -> None:
        doc, pos = _read_header(blob, limits)
        if doc["root"] != root:
            raise IntegrityError("bundle: made for another root (image)")
        self._blob, self._root, self._limits, self._doc = blob, root, limits, doc
        raw_dirs, raw_files = doc["dirs"], doc["files"]
        if type(raw_dirs) is not list or not 0 < len(raw_dirs) <= limits.dirs:
            raise _fail("dirs must be a non-empty array within the limit")
        if type(raw_files) is not list or len(raw_files) > limits.files:
            raise _fail("files must be an array within the limit")
        self.files = _file_lists(raw_files, limits)
        nids = sum(len(f.ids) for f in self.files)
        # §3.3 the data: each chunk reference names a listed (file, chunk); each chunk hashes to its id
        refs_raw, table = _bstr(doc["chunks"], "chunks"), _bstr(doc["frames"], "frames")
        if len(refs_raw) % 8 or len(table) % 8:
            raise _fail("chunk and frame tables must be 8-byte rows")
        # before unpacking (a row is ~120 bytes of Python): each reference names another chunk of a listed
        # file, each frame holds at least one
        if len(refs_raw) // 8 > nids or len(table) > len(refs_raw):
            raise _fail("more chunk references than the files' chunks, or more frames than chunks")
        refs = [_REF.unpack_from(refs_raw, i) for i in range(0, len(refs_raw), 8)]
        rows = [_REF.unpack_from(table, i) for i in range(0, len(table), 8)]
        if sum(r[0] for r in rows) != len(refs) or any(r[0] == 0 or r[1] == 0 for r in rows):
            raise _fail("frames must hold every chunk, at least one each")
        wanted: list[tuple[bytes, int]] = []
        seen: set[bytes] = set()
        files = self.files
        for f, k in refs:
            if f >= len(files) or k >= len(files[f].ids):
                raise _fail("chunk reference out of range")
            cid = files[f].ids[k]
            if cid in seen:
                raise _fail("a chunk twice")
            seen.add(cid)
            wanted.append((cid, files[f].lengths[k]))
        if pos + sum(r[1] for r in rows) != blob.size:
            raise IntegrityError(f"bundle: {blob.size - pos} data bytes where its frame table says "
                                 f"{sum(r[1] for r in rows)} (truncated?)")
        if sum(ln for _, ln in wanted) > limits.data:
            raise HostileInput("bundle: more data than the limit")
        self.frames = tuple((r[0], r[1]) for r in rows)
        self._layout: list[tuple[int, int, list[tuple[bytes, int]]]] = []  # (start, length, chunks) per frame
        self._frame_of: dict[bytes, int] = {}
        at = 0
        for fno, (count, clen) in enumerate(rows):
            part = wanted[at : at + count]
            if sum(ln for _, ln in part) > limits.frame:
                raise HostileInput(f"bundle: data frame {fno} holds more than {limits.frame} bytes")
            self._layout.append((pos, clen, part))
            for cid, _ in part:
                self._frame_of[cid] = fno
            pos += clen
            at += count
        self._opened: dict[int, dict[bytes, bytes]] = {}

    @property
    def first_ids(self) -> list[bytes]:
        """The id of each data frame's first chunk (``chunk`` of it opens that frame)."""
        return [part[0][0] for _, _, part in self._layout]

    @property
    def dir_paths(self) -> list[bytes]:
        """The paths of the listed directories, as the header states them: hints, not checked (``tree``
        checks them)."""
        return [d[0] for d in self._doc["dirs"] if type(d) is list and d and type(d[0]) is bytes]

    @property
    def ids(self) -> frozenset[bytes]:
        """The ids of the chunks the bundle holds (not verified until ``chunk`` hands one out)."""
        return frozenset(self._frame_of)

    def chunk(self, cid: bytes) -> bytes | None:
        """Chunk ``cid``, verified, or None if the bundle does not hold it.  Threads may call it at once
        (two that want the same unopened frame both open it)."""
        fno = self._frame_of.get(cid)
        if fno is None:
            return None
        got = self._opened.get(fno)
        if got is None:
            got = self._open(fno)
            self._opened[fno] = got
        return got[cid]

    def _open(self, fno: int) -> dict[bytes, bytes]:
        start, clen, part = self._layout[fno]
        data = _zstd(self._blob.get(start, start + clen), sum(ln for _, ln in part), f"data frame {fno}", exact=True)
        out: dict[bytes, bytes] = {}
        off = 0
        for cid, ln in part:
            piece = data[off : off + ln]
            if hashlib.sha256(piece).digest() != cid:
                raise IntegrityError(f"bundle: chunk sha256:{cid.hex()} failed verification (digest mismatch)")
            out[cid] = piece
            off += ln
        return out

    def chunks(self) -> dict[bytes, bytes]:
        """Every chunk, verified, in first-read order."""
        out: dict[bytes, bytes] = {}
        for fno in range(len(self._layout)):
            got = self._opened.get(fno)
            if got is None:
                got = self._opened[fno] = self._open(fno)
            out.update(got)
        return out

    def tree(self) -> tuple[tuple[BundleDir, ...], tuple[BundleFile, ...]]:
        """§3.1-3.2: the partial tree checked against the root, and each file's chunk list bound to its
        record."""
        dirs, named = _tree(self._doc["dirs"], self._root, self._limits)
        for f in self.files:
            rec = _child(named, f.path)
            if rec is None or rec[1] != Kind.FILE:
                raise _fail(f"file {f.path[:200]!r} is not a listed directory's file")
            if sum(f.lengths) != rec[7]:
                raise IntegrityError(f"bundle: chunk lengths of {f.path[:200]!r} do not add up to its size")
            if hashlib.sha256(b"".join(f.ids)).digest() != rec[8]:
                raise IntegrityError(f"bundle: chunk ids of {f.path[:200]!r} do not match its record")
        return dirs, self.files


def _file_lists(raw_files: list[Any], limits: Limits) -> tuple[BundleFile, ...]:
    """§3.2's shape: each file's path (in canonical order), chunk ids and lengths."""
    files: list[BundleFile] = []
    nids = 0
    prev: bytes | None = None
    for item in raw_files:
        if type(item) is not list or len(item) != 3:
            raise _fail("file must be [path, ids, lengths]")
        path = _bstr(item[0], "path")
        if prev is not None and path.split(b"/") <= prev.split(b"/"):
            raise _fail("files must be in canonical order, each once")
        prev = path
        ids_raw, len_raw = _bstr(item[1], "ids"), _bstr(item[2], "lengths")
        n = len(len_raw) // 4
        if len(ids_raw) != 32 * n or len(len_raw) != 4 * n:
            raise _fail(f"ids and lengths of {path[:200]!r} disagree")
        nids += n
        if nids > limits.chunks:
            raise HostileInput("bundle: too many chunk references")
        lengths = struct.unpack(f">{n}I", len_raw)
        if any(not 0 < x <= MAX_CHUNK for x in lengths):
            raise IntegrityError(f"bundle: chunk lengths of {path[:200]!r} do not add up to its size")
        files.append(BundleFile(path, tuple(ids_raw[i : i + 32] for i in range(0, len(ids_raw), 32)), lengths))
    return tuple(files)


def _tree(raw_dirs: list[Any], root: bytes, limits: Limits
          ) -> tuple[tuple[BundleDir, ...], dict[bytes, dict[bytes, tuple[Any, ...]]]]:
    """§3.1 the partial tree, top down: a directory's digest must be the one its parent's record states."""
    dirs: list[BundleDir] = []
    by_path: dict[bytes, BundleDir] = {}
    named: dict[bytes, dict[bytes, tuple[Any, ...]]] = {}  # directory -> child name -> record
    nrec = 0
    last = -1
    for item in raw_dirs:
        if type(item) is not list or len(item) != 5:
            raise _fail("directory must be [path, position, metadata, records, positions]")
        path = _bstr(item[0], "path")
        dpos = _int(item[1], _U32, "position")
        if dpos <= last:
            raise _fail("directories must be in index order, each once")
        last = dpos
        recs = item[3]
        if type(recs) is not list:
            raise _fail("records must be an array")
        nrec += len(recs)
        if nrec > limits.children:
            raise HostileInput("bundle: too many child records")
        records = tuple(_record(r) for r in recs)
        names = [r[0] for r in records]
        if any(a >= b for a, b in zip(names, names[1:])):
            raise _fail(f"children of {path[:200]!r} must be in name order, each once")
        kp = _bstr(item[4], "child positions")
        if len(kp) != 4 * len(records):
            raise _fail("one position per child")
        kids = struct.unpack(f">{len(records)}I", kp)
        d = BundleDir(path, dpos, _meta(item[2], "directory"), records, kids)
        got = d.digest()
        if not dirs:
            if path != b"" or dpos != 0:
                raise _fail("the first directory must be the root")
            if got != root:
                raise IntegrityError("bundle: Merkle digest mismatch at the root")
        else:
            rec = _child(named, path)
            if rec is None or rec[1] != Kind.DIR:
                raise _fail(f"directory {path[:200]!r} is not a listed directory's child")
            if rec[2] != got:
                raise IntegrityError(f"bundle: Merkle digest mismatch at {path[:200]!r}")
        if path in by_path:
            raise _fail("a directory twice")
        dirs.append(d)
        by_path[path] = d
        named[path] = {r[0]: r for r in records}
    return tuple(dirs), named


class PartialTree:
    """The entries a checked bundle binds, by index position (bundle.md §3.4): each listed directory,
    and each child of one (a subdirectory's own metadata only if it is listed too).  Positions are the
    bundle's hints until ``check_positions`` compared them with the index.

    What a mount needs to start before the index arrives: ``entry(pos)`` is None where only the
    index can answer (an unlisted subdirectory's metadata, anything outside the listed directories),
    ``children(pos)`` None for a directory that is not listed.  A file's chunk references are its
    chunk ids (``file_ids``), not index chunk numbers: its entry's ``chunks`` is empty."""

    def __init__(self, b: Bundle) -> None:
        self._dirs = {d.pos: d for d in b.dirs}
        self._files = {f.path: f for f in b.files}
        self._at: dict[int, tuple[bytes, tuple[Any, ...]]] = {}  # position -> (path, record)
        self._pos: dict[bytes, int] = {}
        for d in b.dirs:
            self._pos[d.path] = d.pos
            for k, r in zip(d.kids, d.records):
                path = d.path + b"/" + r[0] if d.path else r[0]
                self._at[k] = (path, r)
                self._pos[path] = k

    def position(self, path: bytes) -> int | None:
        return self._pos.get(path)

    def children(self, pos: int) -> list[tuple[bytes, Kind, int]] | None:
        d = self._dirs.get(pos)
        return None if d is None else [(r[0], Kind(r[1]), k) for r, k in zip(d.records, d.kids)]

    def entry(self, pos: int) -> Entry | None:
        d = self._dirs.get(pos)
        if d is not None:
            mode, uid, gid, mtime, xattrs = d.meta
            digest = d.digest() if pos == 0 else self._at[pos][1][2]
            return Entry(d.path, Kind.DIR, mode, uid, gid, mtime, xattrs, digest=digest)
        at = self._at.get(pos)
        if at is None:
            return None
        path, r = at
        kind = Kind(r[1])
        if kind == Kind.DIR:
            return None  # its own metadata is in its own item: not listed
        if kind == Kind.HARDLINK:
            p = self._pos.get(r[2])
            prim = None if p is None else self.entry(p)
            if prim is None or prim.kind != Kind.FILE:
                return None
            return Entry(path, kind, prim.mode, prim.uid, prim.gid, prim.mtime_ns, prim.xattrs, target=r[2])
        mode, uid, gid, mtime = r[2], r[3], r[4], r[5]
        xattrs = tuple(sorted(r[6].items()))
        if kind == Kind.FILE:
            return Entry(path, kind, mode, uid, gid, mtime, xattrs, size=r[7])
        if kind == Kind.SYMLINK:
            return Entry(path, kind, mode, uid, gid, mtime, xattrs, target=r[7])
        if kind in (Kind.CHAR, Kind.BLOCK):
            return Entry(path, kind, mode, uid, gid, mtime, xattrs, rdev=(r[7], r[8]))
        return Entry(path, kind, mode, uid, gid, mtime, xattrs)

    def file_ids(self, path: bytes) -> tuple[tuple[bytes, ...], tuple[int, ...]] | None:
        """The chunk ids and lengths of a file the workload read, or None."""
        f = self._files.get(path)
        return None if f is None else (f.ids, f.lengths)

    def check_positions(self, index: Index) -> None:
        """§3.4: every position the bundle states is the index's for that path (IntegrityError if not).
        The entries themselves need no comparison: the root binds both."""
        shape = index.shape()
        for path, pos in self._pos.items():
            if shape.by_path.get(path) != pos:
                raise IntegrityError(f"bundle: position hint of {path[:200]!r} is not the index's")
