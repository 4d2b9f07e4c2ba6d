"""Encode, decode and validate the canonical index; compute Merkle digests (docs/spec/format.md §4, §6).

``decode`` trusts nothing: every field is type- and range-checked, paths must
be canonical and strictly sorted (so duplicates are impossible), every parent
must be an earlier directory, hardlinks must point at an earlier file, and the
Merkle digests are recomputed and compared.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Iterable

import zstandard

from shoal.errors import FormatError, HostileInput
from shoal.format import cbor
from shoal.format.model import CHUNKLOC, FRAMEREC, Entry, Frame, Index, Kind, name_of, parent_of, path_key
from shoal.format.packing import FRAME_MAX

__all__ = [
    "FORMAT", "encode", "decode", "compress", "decompress", "merkle", "validate_path",
    "MAX_INDEX_BYTES", "INDEX_ZSTD_LEVEL",
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


# ---------------------------------------------------------------- Merkle (§6)

def meta_record(e: Entry) -> list[Any]:
    return [e.mode, e.uid, e.gid, e.mtime_ns, dict(e.xattrs)]


def content_record(e: Entry, ids: tuple[bytes, ...]) -> bytes:
    """What a file's Merkle record says of its bytes: sha256 of its chunk ids, in file order,
    concatenated (§6).

    Chunk ids are sha256 of the chunk bytes and every reader verifies every chunk it serves, so a
    root that covers this sequence covers every byte of the file: order, repetition and length.
    Hashed incrementally, so a file of a million chunk references costs no memory.
    """
    h = hashlib.sha256()
    for c in e.chunks:
        h.update(ids[c])
    return h.digest()


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
# tests/unit/test_index.py checks for every kind, at a third of the cost of the generic encoder.
_H = cbor.head
_DIR_PREFIX = _H(4, 3) + cbor.encode(_DIR_TAG)
_SHA_HEAD = _H(2, 32)
_NO_XATTRS = cbor.encode({})


def _meta_items(e: Entry) -> bytes:
    """The five items of ``meta_record(e)``, without the array head."""
    t = e.mtime_ns
    return b"".join((_H(0, e.mode), _H(0, e.uid), _H(0, e.gid), _H(0, t) if t >= 0 else _H(1, -1 - t),
                     cbor.encode(dict(e.xattrs)) if e.xattrs else _NO_XATTRS))


def _child_bytes(e: Entry, ids: tuple[bytes, ...]) -> bytes:
    """``cbor.encode(child_record(e, ids))``."""
    name = name_of(e.path)
    k = e.kind
    lead = _H(2, len(name)) + name + _H(0, int(k))
    if k == Kind.DIR:
        return _H(4, 3) + lead + _SHA_HEAD + e.digest
    if k == Kind.HARDLINK:
        return _H(4, 3) + lead + _H(2, len(e.target)) + e.target
    meta = _meta_items(e)
    if k == Kind.FILE:
        content = content_record(e, ids)
        return _H(4, 9) + lead + meta + _H(0, e.size) + _H(2, len(content)) + content
    if k == Kind.SYMLINK:
        return _H(4, 8) + lead + meta + _H(2, len(e.target)) + e.target
    if k in (Kind.CHAR, Kind.BLOCK):
        return _H(4, 9) + lead + meta + _H(0, e.rdev[0]) + _H(0, e.rdev[1])
    return _H(4, 7) + lead + meta


def _dir_digest(d: Entry, children: list[bytes]) -> bytes:
    """sha256 of ``cbor.encode([_DIR_TAG, meta_record(d), children])``, children already encoded."""
    h = hashlib.sha256(_DIR_PREFIX)
    h.update(_H(4, 5) + _meta_items(d) + _H(4, len(children)))
    h.update(b"".join(children))
    return h.digest()


def merkle(entries: Iterable[Entry], ids: tuple[bytes, ...]) -> list[Entry]:
    """Return ``entries`` (canonical order) with every directory's Merkle digest filled in; ``ids``
    is the chunk table the files' chunk references index."""
    out = list(entries)
    # entries are in depth-first preorder, so a stack of open directories suffices
    stack: list[tuple[int, list[bytes]]] = []
    for i, e in enumerate(out):
        if stack and i:
            parent = parent_of(e.path)
            while stack and out[stack[-1][0]].path != parent:
                _close(out, stack, ids)
        if stack and e.kind != Kind.DIR:
            stack[-1][1].append(_child_bytes(e, ids))
        if e.kind == Kind.DIR:
            stack.append((i, []))
    while stack:
        _close(out, stack, ids)
    return out


def _close(out: list[Entry], stack: list[tuple[int, list[bytes]]], ids: tuple[bytes, ...]) -> None:
    i, kids = stack.pop()
    d = replace(out[i], digest=_dir_digest(out[i], kids))
    out[i] = d
    if stack:
        stack[-1][1].append(_child_bytes(d, ids))


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
    for comp in path.split(b"/"):
        if comp in (b"", b".", b".."):
            raise HostileInput(f"non-canonical path {path[:200]!r}")


def _int(v: Any, hi: int, what: str, lo: int = 0) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise FormatError(f"index: bad {what}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise FormatError(f"index: {what} must be a byte string")
    return v


def _decode_entry(raw: Any, ids: tuple[bytes, ...], chunk_lengths: tuple[int, ...]) -> Entry:
    n_chunks = len(ids)
    if type(raw) is not list or len(raw) != 8:
        raise FormatError("index: entry must be an array of 8 items")
    path = _bytes(raw[0], "path")
    if path:
        validate_path(path)
    try:
        kind = Kind(_int(raw[1], 7, "kind"))
    except ValueError:
        raise FormatError("index: unknown entry kind") from None
    mode = _int(raw[2], 0o10000, "mode")
    uid = _int(raw[3], _U32, "uid")
    gid = _int(raw[4], _U32, "gid")
    mtime = _int(raw[5], 1 << 63, "mtime", lo=-(1 << 63))
    xa = raw[6]
    if type(xa) is not dict:
        raise FormatError("index: xattrs must be a map")
    total = 0
    for k, v in xa.items():
        if type(k) is not bytes or type(v) is not bytes or not k or b"\0" in k:
            raise FormatError("index: bad xattr")
        total += len(k) + len(v)
    if total > MAX_XATTRS_BYTES:
        raise HostileInput("index: xattrs too large")
    xattrs = tuple(xa.items())
    p = raw[7]
    if kind == Kind.DIR:
        digest = _bytes(p, "directory digest")
        if len(digest) != 32:
            raise FormatError("index: directory digest must be 32 bytes")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, digest=digest)
    if kind == Kind.FILE:
        if type(p) is not list or len(p) != 2 or type(p[1]) is not list:
            raise FormatError("index: bad file payload")
        size = _int(p[0], 1 << 63, "file size")
        chunks = tuple(p[1])
        total = 0
        for c in chunks:
            total += chunk_lengths[_int(c, n_chunks, "chunk reference")]
        if total != size:
            raise FormatError(f"index: chunks of {path[:200]!r} do not add up to its size")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, size=size, chunks=chunks)
    if kind in (Kind.SYMLINK, Kind.HARDLINK):
        target = _bytes(p, "link target")
        if not target or b"\0" in target or len(target) > MAX_PATH:
            raise FormatError("index: bad link target")
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, target=target)
    if kind in (Kind.CHAR, Kind.BLOCK):
        if type(p) is not list or len(p) != 2:
            raise FormatError("index: bad device payload")
        rdev = (_int(p[0], _U32, "major"), _int(p[1], _U32, "minor"))
        return Entry(path, kind, mode, uid, gid, mtime, xattrs, rdev=rdev)
    if p is not None:
        raise FormatError("index: fifo payload must be null")
    return Entry(path, kind, mode, uid, gid, mtime, xattrs)


def decode(raw: bytes) -> Index:
    """Decode and fully validate uncompressed index bytes."""
    doc = cbor.decode(raw)
    if type(doc) is not dict or set(doc) != _KEYS:
        raise FormatError("index: wrong top-level keys")
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
    ids = tuple(ids_raw[i * 32 : i * 32 + 32] for i in range(n))
    if len(set(ids)) != n:
        raise FormatError("index: duplicate chunk ids")
    frames = _frames(frames_raw, len(packs))
    cf, co, cl = [], [], []
    for fi, off, ln in CHUNKLOC.iter_unpack(locs_raw):
        if fi >= len(frames) or not 0 < ln <= MAX_CHUNK or off + ln > frames[fi].ulen:
            raise FormatError("index: bad chunk location")
        cf.append(fi)
        co.append(off)
        cl.append(ln)
    lengths = tuple(cl)
    raw_entries = doc["entries"]
    if type(raw_entries) is not list or not raw_entries:
        raise FormatError("index: no entries")
    entries = [_decode_entry(r, ids, lengths) for r in raw_entries]
    _check_tree(entries)
    recomputed = merkle(entries, ids)
    for a, b in zip(entries, recomputed):
        if a.digest != b.digest:
            raise FormatError(f"index: Merkle digest mismatch at {a.path[:200]!r}")
    if recomputed[0].digest != root:
        raise FormatError("index: root digest mismatch")
    return Index(tuple(entries), ids, tuple(cf), tuple(co), lengths, frames, tuple(packs), root)


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
