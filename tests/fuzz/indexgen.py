"""Hypothesis strategies for valid indexes and CBOR documents, and structure-aware mutations of them.

Indexes are built only through the library (``Entry``, ``make_index``, ``encode``, ``compress``), never
as hand-written bytes, so the harnesses follow the index format as it changes.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import strategies as st

from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.model import Entry, Frame, Index, Kind, parent_of, path_key

T0 = 1_600_000_000_000_000_000
_NAMES = [b"a", b"b", b"a.b", b"a-b", b"caf\xe9", b"new\nline", b"...", b"x" * 40, b"\xff"]

# ------------------------------------------------------------------------------------ CBOR values

_scalars = st.one_of(
    st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1),
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, -(1 << 64), -1]),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.none(),
    st.booleans(),
)
_keys = st.one_of(st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1), st.binary(max_size=8),
                  st.text(max_size=8), st.none())
cbor_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=15,
)


# ------------------------------------------------------------------------------------ indexes


_xattrs = st.lists(st.tuples(st.sampled_from([b"user.a", b"user.b", b"security.capability"]),
                             st.binary(max_size=8)), max_size=2, unique_by=lambda kv: kv[0])


@st.composite
def indexes(draw: st.DrawFn) -> Index:
    """A small valid index: nested directories, files of 0-3 chunks, symlinks, hardlinks, devices, fifos."""
    n_chunks = draw(st.integers(0, 6))
    lengths = [draw(st.integers(1, 5000)) for _ in range(n_chunks)]
    ids = [hashlib.sha256(b"chunk %d" % i).digest() for i in range(n_chunks)]
    n_packs = draw(st.integers(1, 2))
    packs = [hashlib.sha256(b"pack %d" % i).digest() for i in range(n_packs)]
    # chunks go into 1-2 frames, in order
    split = draw(st.integers(0, n_chunks))
    groups = [g for g in (list(range(split)), list(range(split, n_chunks))) if g] or [[]]
    frames, cf, co = [], [], []
    for fi, g in enumerate(groups):
        off = 0
        for c in g:
            cf.append(fi)
            co.append(off)
            off += lengths[c]
        frames.append(Frame(fi % n_packs, 100 * fi, draw(st.integers(1, 4096)), max(off, 1)))
    raw_paths = draw(st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3), max_size=8))
    leaves = {b"/".join(p) for p in raw_paths}
    dirs = {parent_of(p) for p in leaves}
    while True:
        more = {parent_of(d) for d in dirs} - dirs
        if not more:
            break
        dirs |= more
    dirs.discard(b"")
    paths = sorted(leaves | dirs, key=path_key)
    meta = st.tuples(st.integers(0, 0o7777), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
                     st.integers(-(1 << 63), (1 << 63) - 1), _xattrs)
    entries = [Entry(b"", Kind.DIR, 0o755, 0, 0, T0)]
    files: list[Entry] = []
    for p in paths:
        mode, uid, gid, mtime, xa = draw(meta)
        x = tuple(sorted(xa, key=lambda kv: cbor.encode(kv[0])))  # the order decode gives (CBOR map order)
        if p in dirs:
            entries.append(Entry(p, Kind.DIR, mode, uid, gid, mtime, x))
            continue
        kind = draw(st.sampled_from(list(Kind)[1:]))
        if kind == Kind.HARDLINK and not files:
            kind = Kind.FIFO
        if kind == Kind.FILE:
            chunks = tuple(draw(st.lists(st.integers(0, n_chunks - 1), max_size=3))) if n_chunks else ()
            e = Entry(p, kind, mode, uid, gid, mtime, x, size=sum(lengths[c] for c in chunks), chunks=chunks)
            files.append(e)
        elif kind == Kind.HARDLINK:
            prim = draw(st.sampled_from(files))
            e = Entry(p, kind, prim.mode, prim.uid, prim.gid, prim.mtime_ns, prim.xattrs, target=prim.path)
        elif kind == Kind.SYMLINK:
            e = Entry(p, kind, mode, uid, gid, mtime, x, target=draw(st.sampled_from([b"/etc", b"../x", b"y"])))
        elif kind in (Kind.CHAR, Kind.BLOCK):
            e = Entry(p, kind, mode, uid, gid, mtime, x,
                      rdev=(draw(st.integers(0, (1 << 32) - 1)), draw(st.integers(0, (1 << 32) - 1))))
        else:
            e = Entry(p, kind, mode, uid, gid, mtime, x)
        entries.append(e)
    return fidx.make_index(entries, ids, cf, co, lengths, frames, packs)


# ------------------------------------------------------------------------------------ mutations


def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One or a few byte-level edits: flip, overwrite, insert, delete, truncate, duplicate a slice."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if not buf:
            buf += draw(st.binary(min_size=1, max_size=4))
            continue
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0x00, 0xFF, 0x17, 0x18, 0x1B, 0x5F, 0x9F, 0xBF, 0xF6, 0xF9, 0xFF, 0x7F]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 9))]
        elif op == "truncate":
            del buf[i:]
        else:
            j = draw(st.integers(i, min(len(buf), i + 64)))
            buf[j:j] = buf[i:j]
    return bytes(buf)


def doc_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) into a JSON or CBOR document, the empty one included."""
    out = [prefix]
    if isinstance(doc, list):
        for i, v in enumerate(doc):
            out += doc_paths(v, prefix + (i,))
    elif isinstance(doc, dict):
        for k, v in doc.items():
            out += doc_paths(v, prefix + (k,))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


_other_types = st.one_of(
    st.sampled_from([None, True, False, 0, 1, 2, 7, 8, -1, (1 << 64) - 1, -(1 << 64), (1 << 63), -(1 << 63) - 1,
                     1 << 32, b"", b"\0" * 32, "", "format", [], {}, [[]], {"a": 1}]),
    cbor_values,
)


def cbor_mutation(draw: st.DrawFn, doc: Any) -> Any:
    """A CBOR-level edit of a decoded document: another type or value somewhere, an entry duplicated or
    removed, a huge integer, a deep nesting, a map key added or dropped."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(doc_paths(doc)))
        node = _get(doc, path)
        op = draw(st.sampled_from(["replace", "dup", "remove", "huge", "nest", "key", "slice"]))
        if op == "replace":
            doc = _set(doc, path, draw(_other_types))
        elif op == "huge":
            doc = _set(doc, path, draw(st.sampled_from([(1 << 64) - 1, -(1 << 64), (1 << 63) - 1, -(1 << 63)])))
        elif op == "nest":
            v = node
            for _ in range(draw(st.integers(1, 40))):
                v = [v] if draw(st.booleans()) else {"k": v}
            doc = _set(doc, path, v)
        elif op in ("dup", "remove", "slice") and isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            if op == "dup":
                node.insert(i, node[i])
            elif op == "remove":
                del node[i]
            else:
                node[i:] = node[i:][::-1]  # reorder the tail
        elif op in ("dup", "remove", "slice") and isinstance(node, bytes) and node:
            i = draw(st.integers(0, len(node) - 1))
            doc = _set(doc, path, node[:i] + node[i:][: draw(st.integers(0, 64))] * draw(st.integers(0, 3)))
        elif op in ("key", "remove") and isinstance(node, dict) and node:
            if op == "remove":
                del node[draw(st.sampled_from(sorted(node, key=repr)))]
            else:
                node[draw(_keys)] = draw(_other_types)
    return doc


def encode_or_none(doc: Any) -> bytes | None:
    """``cbor.encode(doc)``, or None if the mutated document cannot be encoded (e.g. a dict key collision)."""
    try:
        return cbor.encode(doc)
    except Exception:  # noqa: BLE001 - unencodable mutants are just skipped
        return None
