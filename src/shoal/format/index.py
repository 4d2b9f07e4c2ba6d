"""Encode, decode and validate the canonical index; compute Merkle digests (docs/spec/format.md §4, §6).

``decode`` trusts nothing: every field is type- and range-checked, paths must
be canonical and strictly sorted (so duplicates are impossible), every parent
must be an earlier directory, hardlinks must point at an earlier file, and the
Merkle digests are recomputed and compared.
"""

from __future__ import annotations

import array
import hashlib
import operator
import sys
from dataclasses import dataclass, replace
from typing import Any, Iterable

import zstandard

from shoal.errors import FormatError, HostileInput
from shoal.format import cbor
from shoal.format.model import CHUNKLOC, FRAMEREC, Entry, Frame, Index, Kind, name_of, parent_of, path_key
from shoal.format.packing import FRAME_MAX

__all__ = [
    "FORMAT", "encode", "decode", "compress", "decompress", "merkle", "validate_path",
    "MAX_INDEX_BYTES", "INDEX_ZSTD_LEVEL", "Tables", "decode_tables", "decode_entry", "child_bytes", "dir_digest",
    "meta_record", "split_tables", "entries_at",
]

FORMAT = 2  # §4.1; §9 lists the changes
MAX_INDEX_BYTES = 1 << 30  # §4.6 decompressed index cap
MAX_PATH = 4096
MAX_XATTRS_BYTES = 64 * 1024
MAX_CHUNK = 256 * 1024
INDEX_ZSTD_LEVEL = 12
_KEYS = {"format", "root", "entries", "chunks", "chunklocs", "frames", "packs"}
_U32 = 1 << 32
_U64 = 1 << 64
_DIR_TAG = "shoal/dir/2"
_WORD = next(t for t in "IL" if array.array(t).itemsize == 4)  # the array typecode of a u32 here


# ---------------------------------------------------------------- Merkle (§6)

def meta_record(e: Entry) -> list[Any]:
    return [e.mode, e.uid, e.gid, e.mtime_ns, dict(e.xattrs)]


def content_record(e: Entry, ids: tuple[bytes, ...]) -> bytes:
    """What a file's Merkle record says of its bytes: sha256 of its chunk ids, in file order,
    concatenated (§6).

    Chunk ids are sha256 of the chunk bytes and every reader verifies every chunk it serves, so a
    root that covers this sequence covers every byte of the file: order, repetition and length.
    Hashed in slices of at most ``_ID_SLICE`` ids, so a file of a million chunk references costs no
    more memory than its reference list.
    """
    chunks = e.chunks
    if len(chunks) == 1:  # most files
        return hashlib.sha256(ids[chunks[0]]).digest()
    h = hashlib.sha256()
    for i in range(0, len(chunks), _ID_SLICE):
        h.update(b"".join([ids[c] for c in chunks[i : i + _ID_SLICE]]))
    return h.digest()


_ID_SLICE = 4096


def child_record(e: Entry, ids: tuple[bytes, ...]) -> list[Any]:
    name = name_of(e.path)
    k = e.kind
    if k == Kind.DIR:
        return [name, int(k), e.digest]
    if k == Kind.HARDLINK:
        return [name, int(k), e.target]
    rec: list[Any] = [name, int(k), *meta_record(e)]
    if k == Kind.FILE:
        rec += [e.size, content_record(e, ids)]
    elif k == Kind.SYMLINK:
        rec.append(e.target)
    elif k in (Kind.CHAR, Kind.BLOCK):
        rec += [e.rdev[0], e.rdev[1]]
    return rec


# The Merkle walk encodes every record by hand: the bytes are exactly ``cbor.encode`` of
# ``child_record``/``meta_record`` (an array's encoding is its head followed by its items'), which
# tests/unit/test_index.py checks for every kind, at a fraction of the cost of the generic encoder.
_H = cbor.head
_DIR_PREFIX = _H(4, 3) + cbor.encode(_DIR_TAG)
_SHA_HEAD = _H(2, 32)
_NO_XATTRS = cbor.encode({})
_HEADS: list[list[bytes]] = [[_H(m, n) for n in range(256)] for m in range(8)]  # one-byte and two-byte heads
_DIR_LEAD, _FILE_LEAD, _SYMLINK_LEAD, _HARDLINK_LEAD = (_H(0, k) for k in range(4))
_A3, _A5, _A7, _A8, _A9 = (_H(4, n) for n in (3, 5, 7, 8, 9))


def _uint(n: int) -> bytes:
    return _HEADS[0][n] if 0 <= n < 256 else _H(0, n)


def _meta_items(e: Entry) -> bytes:
    """The five items of ``meta_record(e)``, without the array head."""
    t = e.mtime_ns
    return b"".join((_uint(e.mode), _uint(e.uid), _uint(e.gid), _H(0, t) if t >= 0 else _H(1, -1 - t),
                     cbor.encode(dict(e.xattrs)) if e.xattrs else _NO_XATTRS))


def child_bytes(e: Entry, ids: tuple[bytes, ...], digest: bytes | None = None) -> bytes:
    """``cbor.encode(child_record(e, ids))``; a directory's record with ``digest`` if given, else its own."""
    name = e.path[e.path.rfind(b"/") + 1 :]
    nh = _HEADS[2][len(name)] if len(name) < 256 else _H(2, len(name))
    k = e.kind
    if k == Kind.DIR:
        return b"".join((_A3, nh, name, _DIR_LEAD, _SHA_HEAD, e.digest if digest is None else digest))
    if k == Kind.FILE:
        content = content_record(e, ids)
        return b"".join((_A9, nh, name, _FILE_LEAD, _meta_items(e), _uint(e.size), _SHA_HEAD, content))
    if k == Kind.HARDLINK:
        return b"".join((_A3, nh, name, _HARDLINK_LEAD, _H(2, len(e.target)), e.target))
    meta = _meta_items(e)
    if k == Kind.SYMLINK:
        return b"".join((_A8, nh, name, _SYMLINK_LEAD, meta, _H(2, len(e.target)), e.target))
    if k in (Kind.CHAR, Kind.BLOCK):
        return b"".join((_A9, nh, name, _H(0, int(k)), meta, _H(0, e.rdev[0]), _H(0, e.rdev[1])))
    return b"".join((_A7, nh, name, _H(0, int(k)), meta))


def dir_digest(d: Entry, children: list[bytes]) -> bytes:
    """sha256 of ``cbor.encode([_DIR_TAG, meta_record(d), children])``, children already encoded."""
    h = hashlib.sha256(_DIR_PREFIX)
    h.update(_A5 + _meta_items(d) + _H(4, len(children)))
    h.update(b"".join(children))
    return h.digest()


def _digests(entries: list[Entry] | tuple[Entry, ...], ids: tuple[bytes, ...]) -> dict[int, bytes]:
    """The Merkle digest of every directory, by its position in ``entries`` (canonical order).  A
    directory's own ``digest`` field is never read: its record in its parent uses the digest computed
    here."""
    digests: dict[int, bytes] = {}
    # entries are in depth-first preorder, so a stack of open directories suffices: (position, path,
    # records of its children so far)
    stack: list[tuple[int, bytes, list[bytes]]] = []
    kind_dir = Kind.DIR
    for i, e in enumerate(entries):
        path = e.path
        if stack and i:
            cut = path.rfind(b"/")
            parent = b"" if cut < 0 else path[:cut]
            while stack and stack[-1][1] != parent:
                _close(entries, stack, ids, digests)
        if e.kind == kind_dir:
            stack.append((i, path, []))
        elif stack:
            stack[-1][2].append(child_bytes(e, ids))
    while stack:
        _close(entries, stack, ids, digests)
    return digests


def _close(entries: list[Entry] | tuple[Entry, ...], stack: list[tuple[int, bytes, list[bytes]]],
           ids: tuple[bytes, ...], digests: dict[int, bytes]) -> None:
    i, _, kids = stack.pop()
    d = digests[i] = dir_digest(entries[i], kids)
    if stack:
        stack[-1][2].append(child_bytes(entries[i], ids, d))


def merkle(entries: Iterable[Entry], ids: tuple[bytes, ...]) -> list[Entry]:
    """Return ``entries`` (canonical order) with every directory's Merkle digest filled in; ``ids``
    is the chunk table the files' chunk references index."""
    out = list(entries)
    for i, d in _digests(out, ids).items():
        out[i] = replace(out[i], digest=d)
    return out


# ---------------------------------------------------------------- encoding (§4)

def _payload(e: Entry) -> Any:
    k = e.kind
    if k == Kind.DIR:
        return e.digest
    if k == Kind.FILE:
        return [e.size, list(e.chunks)]
    if k in (Kind.SYMLINK, Kind.HARDLINK):
        return e.target
    if k in (Kind.CHAR, Kind.BLOCK):
        return [e.rdev[0], e.rdev[1]]
    return None


def encode(idx: Index) -> bytes:
    """The canonical CBOR bytes of ``idx`` (uncompressed)."""
    entries = [
        [e.path, int(e.kind), e.mode, e.uid, e.gid, e.mtime_ns, dict(e.xattrs), _payload(e)]
        for e in idx.entries
    ]
    locs = b"".join(
        CHUNKLOC.pack(f, o, n) for f, o, n in zip(idx.chunk_frames, idx.chunk_offsets, idx.chunk_lengths)
    )
    frames = b"".join(FRAMEREC.pack(f.pack, f.offset, f.clen, f.ulen) for f in idx.frames)
    return cbor.encode({
        "format": FORMAT,
        "root": idx.root,
        "entries": entries,
        "chunks": b"".join(idx.chunk_ids),
        "chunklocs": locs,
        "frames": frames,
        "packs": list(idx.packs),
    })


def compress(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=INDEX_ZSTD_LEVEL, write_checksum=False, write_content_size=True).compress(raw)


def decompress(blob: bytes, limit: int = MAX_INDEX_BYTES) -> bytes:
    """Decompress an index blob, refusing anything that would inflate past ``limit``."""
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise FormatError(f"index is not a zstd frame: {exc}") from None
    if params.content_size <= 0 or params.content_size > limit:
        raise HostileInput(f"index declares {params.content_size} bytes, limit is {limit}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=params.content_size,
                                                      allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"index is corrupt or truncated: {exc}") from None
    if len(raw) != params.content_size:
        raise FormatError("index decompressed to the wrong size")
    return raw


# ---------------------------------------------------------------- decoding + validation

def validate_path(path: bytes) -> None:
    """Refuse anything but a canonical relative path: no ``..``, ``.``, empty components, NUL or leading ``/``."""
    if len(path) > MAX_PATH:
        raise HostileInput(f"path longer than {MAX_PATH} bytes")
    if b"\0" in path:
        raise HostileInput("path contains NUL")
    framed = b"/" + path + b"/"  # an empty component, ".", ".." anywhere, a leading or trailing "/"
    if b"//" in framed or b"/./" in framed or b"/../" in framed:
        raise HostileInput(f"non-canonical path {path[:200]!r}")


def _int(v: Any, hi: int, what: str, lo: int = 0) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise FormatError(f"index: bad {what}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise FormatError(f"index: {what} must be a byte string")
    return v


_KINDS = tuple(Kind)
_MTIME_LO, _MTIME_HI = -(1 << 63), 1 << 63


def _xattrs(xa: Any) -> tuple[tuple[bytes, bytes], ...]:
    if type(xa) is not dict:
        raise FormatError("index: xattrs must be a map")
    if not xa:
        return ()
    total = 0
    prev: tuple[int, bytes] = (-1, b"")
    for k, v in xa.items():
        if type(k) is not bytes or type(v) is not bytes or not k or b"\0" in k:
            raise FormatError("index: bad xattr")
        key = (len(k), k)  # byte-string keys in the bytewise order of their encodings (§3)
        if key <= prev:
            raise FormatError("index: xattr names unsorted or duplicated")
        prev = key
        total += len(k) + len(v)
    if total > MAX_XATTRS_BYTES:
        raise HostileInput("index: xattrs too large")
    return tuple(xa.items())


def decode_entry(raw: Any, ids: tuple[bytes, ...], chunk_lengths: tuple[int, ...]) -> Entry:
    if type(raw) is not list or len(raw) != 8:
        raise FormatError("index: entry must be an array of 8 items")
    path, k, mode, uid, gid, mtime, xa, p = raw
    if type(path) is not bytes:
        raise FormatError("index: path must be a byte string")
    if path:
        validate_path(path)
    if type(k) is not int or not 0 <= k < 7:
        raise FormatError("index: bad kind")
    kind = _KINDS[k]
    if type(mode) is not int or not 0 <= mode < 0o10000:
        raise FormatError("index: bad mode")
    if type(uid) is not int or not 0 <= uid < _U32:
        raise FormatError("index: bad uid")
    if type(gid) is not int or not 0 <= gid < _U32:
        raise FormatError("index: bad gid")
    if type(mtime) is not int or not _MTIME_LO <= mtime < _MTIME_HI:
        raise FormatError("index: bad mtime")
    xattrs = _xattrs(xa)
    if kind == Kind.FILE:
        if type(p) is not list or len(p) != 2 or type(p[1]) is not list:
            raise FormatError("index: bad file payload")
        size = _int(p[0], 1 << 63, "file size")
        chunks = tuple(p[1])
        n_chunks = len(ids)
        for c in chunks:
            if type(c) is not int or not 0 <= c < n_chunks:
                raise FormatError("index: bad chunk reference")
        if sum(map(chunk_lengths.__getitem__, chunks)) != size:
            raise FormatError(f"index: chunks of {path[:200]!r} do not add up to its size")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, size, chunks)
    if kind == Kind.DIR:
        if type(p) is not bytes:
            raise FormatError("index: directory digest must be a byte string")
        if len(p) != 32:
            raise FormatError("index: directory digest must be 32 bytes")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, digest=p)
    if kind == Kind.SYMLINK or kind == Kind.HARDLINK:
        target = _bytes(p, "link target")
        if not target or b"\0" in target or len(target) > MAX_PATH:
            raise FormatError("index: bad link target")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, target=target)
    if kind == Kind.CHAR or kind == Kind.BLOCK:
        if type(p) is not list or len(p) != 2:
            raise FormatError("index: bad device payload")
        rdev = (_int(p[0], _U32, "major"), _int(p[1], _U32, "minor"))
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, rdev=rdev)
    if p is not None:
        raise FormatError("index: fifo payload must be null")
    return Entry(path, kind, mode, uid, gid, mtime, xattrs)


# the top-level keys in canonical order: text keys sort by length, then bytewise (§3)
_KEY_ORDER = tuple(sorted(_KEYS, key=lambda k: (len(k), k)))


def decode(raw: bytes) -> Index:
    """Decode and fully validate uncompressed index bytes.

    The document is decoded by ``cbor.decode_fast`` (cbor2's C decoder and a byte-exact re-encode) and
    every value is type- and range-checked here, as it must be for that decoder; if anything is
    refused, ``cbor.decode`` (the reference decoder) decodes it again, so a bad index gets the same
    answer and the same message either way."""
    doc = cbor.decode_fast(raw)
    if doc is not None:
        try:
            return _decode_doc(doc)
        except FormatError:
            pass  # the reference decoder below says why
    return _decode_doc(cbor.decode(raw))


@dataclass(frozen=True)
class Tables:
    """Everything of a decoded index but its entries, checked (§4.4, §4.5)."""

    root: bytes
    ids: tuple[bytes, ...]
    chunk_frames: tuple[int, ...]
    chunk_offsets: tuple[int, ...]
    chunk_lengths: tuple[int, ...]
    frames: tuple[Frame, ...]
    packs: tuple[bytes, ...]
    entries: list[Any]  # raw, not yet checked


def decode_tables(doc: Any) -> Tables:
    """The checked top level of a decoded index document: format, root, chunk, frame and pack tables."""
    if type(doc) is not dict or set(doc) != _KEYS:
        raise FormatError("index: wrong top-level keys")
    if tuple(doc) != _KEY_ORDER:
        raise FormatError("index: top-level keys unsorted")
    fmt = doc["format"]
    if type(fmt) is not int or fmt != FORMAT:  # type(): ``True == 1`` must not pass (one value, one encoding)
        if type(fmt) is int and fmt == 1:
            raise FormatError("index: format 1 is no longer read: its Merkle root does not bind file contents "
                              "(rebuild or re-convert the image)")
        raise FormatError(f"index: unsupported format {str(fmt)[:40]!r}")
    root = _bytes(doc["root"], "root")
    ids_raw = _bytes(doc["chunks"], "chunk table")
    locs_raw = _bytes(doc["chunklocs"], "chunk locations")
    frames_raw = _bytes(doc["frames"], "frame table")
    packs = doc["packs"]
    if len(ids_raw) % 32 or len(locs_raw) != len(ids_raw) // 32 * CHUNKLOC.size or len(frames_raw) % FRAMEREC.size:
        raise FormatError("index: table sizes disagree")
    if type(packs) is not list or any(type(p) is not bytes or len(p) != 32 for p in packs):
        raise FormatError("index: bad pack table")
    n = len(ids_raw) // 32
    ids = tuple([ids_raw[i : i + 32] for i in range(0, n * 32, 32)])
    if len(set(ids)) != n:
        raise FormatError("index: duplicate chunk ids")
    frames = _frames(frames_raw, len(packs))
    cf, co, cl = _chunk_locations(locs_raw, frames)
    raw_entries = doc["entries"]
    if type(raw_entries) is not list or not raw_entries:
        raise FormatError("index: no entries")
    return Tables(root, ids, cf, co, cl, frames, tuple(packs), raw_entries)


_LATER: list[Any] = [None]  # ``split_tables``'s stand-in for the entries, which ``decode_tables`` passes through


def split_tables(raw: bytes) -> tuple[Tables, int, int] | None:
    """The checked tables of index bytes laid out as §3 orders them, with the entries left undecoded:
    (the tables, their ``entries`` empty; start; end), where ``raw[start:end]`` must be exactly the
    entries array's encoding.  In canonical key order the entries are the last value but one, before
    the chunk locations, whose size the chunk table gives; so the entries are found without decoding
    them (they are ~90% of the decoding: format.md §6.2).  None for bytes laid out otherwise (decode
    them whole: ``decode`` says what is wrong); FormatError for bad tables."""
    before = len(_KEY_ORDER) - 2  # the pairs ahead of "entries"
    if raw[:1] != cbor.head(5, len(_KEY_ORDER)) or _KEY_ORDER[before:] != ("entries", "chunklocs"):
        return None
    got = cbor.decode_items(raw, 1, 2 * before + 1, cbor.MAX_DEPTH - 1)
    if got is None or got[0][-1] != "entries":
        return None
    items, start = got
    head = dict(zip(items[0:-1:2], items[1:-1:2]))
    ids_raw = head.get("chunks")
    if len(head) != before or type(ids_raw) is not bytes:
        return None
    n_locs = len(ids_raw) // 32 * CHUNKLOC.size
    key = cbor.encode("chunklocs") + cbor.head(2, n_locs)
    end = len(raw) - n_locs - len(key)
    if end <= start or raw[end : end + len(key)] != key:
        return None
    t = decode_tables({**head, "entries": _LATER, "chunklocs": raw[end + len(key) :]})
    return replace(t, entries=[]), start, end


def entries_at(raw: bytes, start: int, end: int) -> list[Any] | None:
    """The raw entries array that ``split_tables`` found at ``raw[start:end]`` (each row unchecked), or
    None if those bytes are not exactly one array (``decode`` then says what is wrong)."""
    got = cbor.decode_items(raw[:end], start, 1, cbor.MAX_DEPTH - 1)
    if got is None or got[1] != end or type(got[0][0]) is not list or not got[0][0]:
        return None
    entries: list[Any] = got[0][0]
    return entries


def _decode_doc(doc: Any) -> Index:
    t = decode_tables(doc)
    ids = t.ids
    entries = [decode_entry(r, ids, t.chunk_lengths) for r in t.entries]
    _check_tree(entries)
    digests = _digests(entries, ids)
    for i, d in digests.items():
        if entries[i].digest != d:
            raise FormatError(f"index: Merkle digest mismatch at {entries[i].path[:200]!r}")
    if digests[0] != t.root:
        raise FormatError("index: root digest mismatch")
    return Index(tuple(entries), ids, t.chunk_frames, t.chunk_offsets, t.chunk_lengths, t.frames, t.packs, t.root)


def _chunk_locations(raw: bytes, frames: tuple[Frame, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The chunk-location table as three columns (frame, offset, length), every row checked."""
    n = len(raw) // CHUNKLOC.size
    words = array.array(_WORD, raw)  # CHUNKLOC is three big-endian u32s: one C pass, not a tuple per row
    if sys.byteorder == "little":
        words.byteswap()
    cf, co, cl = tuple(words[0::3]), tuple(words[1::3]), tuple(words[2::3])
    if n and (max(cf) >= len(frames) or min(cl) <= 0 or max(cl) > MAX_CHUNK):
        raise FormatError("index: bad chunk location")
    ulens = [f.ulen for f in frames]
    if any(map(operator.gt, map(operator.add, co, cl), map(ulens.__getitem__, cf))):
        raise FormatError("index: bad chunk location")
    return cf, co, cl


def _frames(raw: bytes, n_packs: int) -> tuple[Frame, ...]:
    """The frame table, each distinct record checked and made once: a hostile index of a million copies
    of one record costs a dict lookup per copy, not a validation and an object."""
    made: dict[tuple[int, int, int, int], Frame] = {}
    out = []
    for t in FRAMEREC.iter_unpack(raw):
        f = made.get(t)
        if f is None:
            pack, _, clen, ulen = t
            if pack >= n_packs or not 0 < ulen <= FRAME_MAX or not 0 < clen <= FRAME_MAX + 4096:
                raise FormatError("index: bad frame record")
            f = made[t] = Frame(*t)
        out.append(f)
    return tuple(out)


def _check_tree(entries: list[Entry]) -> None:
    if entries[0].path != b"" or entries[0].kind != Kind.DIR:
        raise FormatError("index: first entry must be the root directory")
    dirs = {b""}
    files: dict[bytes, Entry] = {}
    prev = path_key(b"")
    for e in entries[1:]:
        key = path_key(e.path)
        if key <= prev:
            raise FormatError(f"index: entries unsorted or duplicated at {e.path[:200]!r}")
        prev = key
        if parent_of(e.path) not in dirs:
            raise HostileInput(f"index: parent of {e.path[:200]!r} is not a directory")
        if e.kind == Kind.DIR:
            dirs.add(e.path)
        elif e.kind == Kind.FILE:
            files[e.path] = e
        elif e.kind == Kind.HARDLINK:
            primary = files.get(e.target)
            if primary is None:
                raise HostileInput(f"index: hardlink {e.path[:200]!r} does not point at an earlier file")
            if meta_record(primary) != meta_record(e):
                raise FormatError(f"index: hardlink {e.path[:200]!r} metadata differs from its file")


def make_index(
    entries: list[Entry],
    chunk_ids: list[bytes],
    chunk_frames: list[int],
    chunk_offsets: list[int],
    chunk_lengths: list[int],
    frames: list[Frame],
    packs: list[bytes],
) -> Index:
    """Assemble an Index from canonical entries, filling in the Merkle digests."""
    full = merkle(entries, tuple(chunk_ids))
    return Index(
        tuple(full), tuple(chunk_ids), tuple(chunk_frames), tuple(chunk_offsets), tuple(chunk_lengths),
        tuple(frames), tuple(packs), full[0].digest,
    )
