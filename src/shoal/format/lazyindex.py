"""An index decoded for a mount: each directory verified against its Merkle digest on first use
(docs/spec/format.md §6.2).

``decode`` (index.py) checks and hashes every entry before it returns: about 0.3 s of one core for the
13,000 entries of a Debian tree with Python, on the critical path of every lazy container start.  A mount
touches a few hundred directories of that tree before the container's first output, so ``decode_lazy``
checks the tables at once, the whole document's shape before any entry is served, and each directory
when it is first used:

- up front: the top level and every table (``decode_tables``, as ``decode`` does); the entries array
  is only located (``split_tables``: ~90% of the decoding, 20-50 ms for a Debian tree);
- before any entry is served (``prepare``, which a mount daemon calls once its mount is live): the
  entries decoded, every path a byte string, all paths strictly in canonical order (so no path twice,
  and every parent before its children), nothing below a non-directory, the root entry, and the root
  directory against the index's ``root``.  What this refuses is refused at every later use too;
- on first use of any entry: the chain of its unverified ancestor directories, top down, and for a
  directory the directory itself (its own metadata is bound by its digest, not by its parent's record).
  A directory is verified by decoding and checking each of its direct children (exactly as ``decode``
  does) and hashing their Merkle records, with each subdirectory's *stated* digest, into the
  directory's own record; the result must equal the directory's stated digest, which its parent's
  verification bound (the root's binds the manifest's ``root``).  Only then is it or any of its
  children handed out.

So an entry is never returned before the digests from the root down to it are checked: the same
guarantee as ``decode``'s, for what is used.  A tampered directory fails with ``IntegrityError`` (EIO in
the mount) when it is first used, and a directory under a non-directory with ``HostileInput``.  A
hardlink's primary is checked when it is resolved (``Index.primary``).
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any, overload

from shoal.errors import FormatError, HostileInput, IntegrityError, ShoalError
from shoal.format import cbor
from shoal.format.index import (
    Tables,
    child_bytes,
    decode,
    decode_entry,
    decode_tables,
    dir_digest,
    entries_at,
    split_tables,
)
from shoal.format.model import Entry, Index, Kind, Shape, parent_of

__all__ = ["decode_lazy", "LazyEntries", "LazyIndex"]

log = logging.getLogger(__name__)


def decode_lazy(raw: bytes, quiet: Callable[[], AbstractContextManager[object]] = nullcontext) -> Index:
    """Decode uncompressed index bytes for a mount: the tables now, the entries' shape on first use of
    the entries, each directory on its first use.

    The tables (chunks, frames, packs, root) are decoded and checked at once; the entries array (~90%
    of the decoding) is only located.  Its decoding and the shape checks run when the entries are
    first used, in ``quiet`` (the store pauses the garbage collector there): for a mount, in its daemon
    after the mount is live (``Index.prepare``), off the path of whoever waits for the mount
    (format.md §6.2).  Bytes laid out otherwise are decoded whole now.  Anything the checks refuse,
    now or then, is decoded again by ``decode``, which says why."""
    try:
        split = split_tables(raw)
    except FormatError:
        split = None  # decode says why, below
    if split is not None:
        t, start, end = split
        return _lazy(t, lambda: _later(raw, start, end, quiet), lambda: decode(raw), cbor.array_length(raw, start))
    doc = cbor.decode_fast(raw, exact=False)  # its digest binds these bytes; fsck and pull check the encoding
    if doc is not None:
        try:
            return _lazy(decode_tables(doc))
        except (FormatError, IntegrityError):
            pass
    return decode(raw)


def _later(raw: bytes, start: int, end: int, quiet: Callable[[], AbstractContextManager[object]]) -> _Rows:
    """The entries ``split_tables`` located, decoded and their shape checked."""
    with quiet():
        rows = entries_at(raw, start, end)
        if rows is None:
            raise FormatError("index: bad entries")
        return _rows(rows)


@dataclass(frozen=True)
class _Rows:
    """The undecoded entries and their shape, checked up to what each entry's own decoding checks."""

    raw: list[Any]
    shape: Shape
    links: tuple[int, ...]  # the rows whose kind equals a hardlink's


def _lazy(t: Tables, load: Callable[[], _Rows] | None = None, explain: Callable[[], object] | None = None,
          count: int | None = None) -> Index:
    entries = LazyEntries(t, load, explain, count)
    return LazyIndex(entries, t.ids, t.chunk_frames, t.chunk_offsets, t.chunk_lengths, t.frames, t.packs, t.root,
                     tree=entries)


def _rows(raw: list[Any]) -> _Rows:
    try:
        paths: list[bytes] = list(map(operator.itemgetter(0), raw))  # the loops in C, here and below
        kinds = list(map(operator.itemgetter(1), raw))  # each is checked when its entry is decoded
    except (TypeError, IndexError, KeyError):
        raise FormatError("index: entry must be an array of 8 items") from None
    if set(map(type, paths)) != {bytes}:
        raise FormatError("index: path must be a byte string")
    if paths[0] != b"":
        raise FormatError("index: first entry must be the root directory")
    keys = list(map(bytes.split, paths, repeat(b"/")))
    keys[0] = []
    if not all(map(operator.lt, keys, keys[1:])):
        raise FormatError("index: entries unsorted or duplicated")
    # nothing below a non-directory: in canonical order a descendant would come right after it, its path
    # starting with the entry's and a slash (a kind that is not 0 counts as a non-directory here; each
    # kind is checked when its entry is decoded)
    below = map(bytes.startswith, paths[2:], map(operator.add, paths[1:-1], repeat(b"/")))
    if kinds[0] and len(paths) > 1 or any(compress(below, kinds[1:-1])):
        raise HostileInput("index: an entry's parent is not a directory")
    # the rows whose kind equals a hardlink's, in one C pass now: the first st_nlink then looks at those
    # alone, not at every row (2-8 ms on a container's first lookup of a file, on the way to its start)
    links = tuple(compress(range(len(kinds)), map(operator.eq, kinds, repeat(_HARDLINK))))
    return _Rows(raw, Shape(paths, keys), links)


_HARDLINK = int(Kind.HARDLINK)


class LazyEntries(Sequence[Entry]):
    """The entries of a lazily verified index, by position (see the module text).  ``load``: the rows,
    decoded on first use (``prepare``); without it, the tables' rows, checked now.  ``explain``: what
    raises the error to report when ``prepare`` refuses the rows (``decode``, which says why).
    ``count``: how many rows the encoding's array head states (``len`` answers it before ``prepare``:
    statfs's figure, on the way to an overlay's mount)."""

    def __init__(self, t: Tables, load: Callable[[], _Rows] | None = None,
                 explain: Callable[[], object] | None = None, count: int | None = None) -> None:
        self._ids = t.ids
        self._lengths = t.chunk_lengths
        self._root = t.root
        self._load = load or (lambda: _rows(t.entries))
        self._explain = explain
        self._count = count
        self._lock = threading.RLock()
        # by position, what may be handed out as it is: decoded, its parent verified, and a directory itself
        # verified (``_ready_rows``, published here by ``prepare``: None until the rows are loaded)
        self._ready: list[Entry | None] | None = None
        self._broken: Exception | None = None  # why the rows could not be loaded
        self._verified: set[int] = set()
        self._failed: dict[int, Exception] = {}
        self._totals: tuple[int, int] | None = None
        self._has_xattrs: bool | None = None
        if load is None:
            self.prepare()

    def prepare(self) -> None:
        """Decode the rows and check their shape and the root directory, once (FormatError, IntegrityError
        or HostileInput, now and at every later use, if they are bad)."""
        if self._ready is not None:
            return
        with self._lock:
            if self._ready is not None:
                return
            if self._broken is not None:
                raise self._broken
            try:
                rows = self._load()
                self._raw = rows.raw
                self._links = rows.links
                self._shape = rows.shape
                self._done: list[Entry | None] = [None] * len(rows.raw)  # decoded, its parent verified
                self._ready_rows: list[Entry | None] = [None] * len(rows.raw)
                root = decode_entry(self._raw[0], self._ids, self._lengths)
                if root.kind != Kind.DIR:
                    raise FormatError("index: first entry must be the root directory")
                if root.digest != self._root:
                    raise FormatError("index: root digest mismatch")
                self._done[0] = root
                self._verify_chain(0)  # the root's own metadata and its children's records, against ``root``
            except (FormatError, IntegrityError) as exc:
                self._broken = self._why(exc)
                raise self._broken from None
            self._ready = self._ready_rows
            log.debug("timeline: index entries decoded (%d)", len(self._done))

    def _why(self, exc: FormatError | IntegrityError) -> ShoalError:
        """The error ``explain`` raises for bad rows, else ``exc``."""
        if self._explain is not None:
            try:
                self._explain()
            except (FormatError, IntegrityError) as why:
                return why
        return exc

    @property
    def shape(self) -> Shape:
        self.prepare()
        return self._shape

    def __len__(self) -> int:
        if self._ready is None and self._count is not None:
            return self._count  # the array decodes to exactly this many rows, or not at all
        self.prepare()
        return len(self._done)

    @overload
    def __getitem__(self, i: int) -> Entry: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Entry]: ...

    def __getitem__(self, i: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        ready = self._ready
        if ready is None:
            self.prepare()
            ready = self._ready_rows
        e = ready[i]
        if e is not None:
            return e
        if i < 0:
            return self[i + len(self)]
        if self._done[i] is None:
            self._verify_chain(self._parent(i))
        e = self._done[i]
        if e is None:  # cannot happen: a verified directory publishes every entry whose parent it is
            raise FormatError(f"index: entry {i} was not verified")
        if e.kind == Kind.DIR:  # its metadata is bound by its own digest, not by its parent's record
            self._verify_chain(i)
        return e

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield self[i]

    def names_and_kinds(self, pos: int) -> list[tuple[bytes, Kind, int]]:
        """``Index.names_and_kinds``: the directory at ``pos`` checked (and its ancestors), not its
        subdirectories: their names and kinds are in its records."""
        self.prepare()
        self._verify_chain(pos)
        out = []
        for k in self._shape.kids(pos):
            e = self._done[k]
            assert e is not None  # published by the check of ``pos``
            out.append((e.name, e.kind, k))
        return out

    def verified(self) -> int:
        """How many directories have been verified so far."""
        return len(self._verified)

    def _parent(self, i: int) -> int:
        p = self._shape.paths[i]
        d = self._shape.by_path.get(p[: max(p.rfind(b"/"), 0)])
        if d is None or d == i:
            raise HostileInput(f"index: parent of {p[:200]!r} is not a directory")
        return d

    def _verify_chain(self, d: int) -> None:
        """Verify directory ``d`` and, first, each of its unverified ancestors, top down."""
        if d in self._verified:
            return
        with self._lock:
            chain = []
            while d not in self._verified:
                chain.append(d)
                if d == 0:
                    break
                d = self._parent(d)
            for x in reversed(chain):
                self._verify_one(x)

    def _verify_one(self, d: int) -> None:
        failed = self._failed.get(d)
        if failed is not None:
            raise failed
        de = self._done[d]
        assert de is not None  # its parent was verified first (or it is the root)
        path = self._shape.paths[d]
        try:
            kids = self._shape.kids(d)
            if de.kind != Kind.DIR:
                raise HostileInput(f"index: parent of {self._shape.paths[kids[0]][:200]!r} is not a directory")
            ids, lengths, raw = self._ids, self._lengths, self._raw
            decoded = [decode_entry(raw[k], ids, lengths) for k in kids]
            for c in decoded:  # in its subtree but under a path that has no entry: unreachable, refused
                if parent_of(c.path) != path:
                    raise HostileInput(f"index: parent of {c.path[:200]!r} is not a directory")
            if dir_digest(de, [child_bytes(c, ids) for c in decoded]) != de.digest:
                raise IntegrityError(f"index: Merkle digest mismatch at {path[:200]!r}")
        except (FormatError, IntegrityError) as exc:
            self._failed[d] = exc
            raise
        where = self._shape.by_path
        for k, c in zip(kids, decoded):
            if c.kind == Kind.HARDLINK and not where.get(c.target, k) < k:  # its kind and metadata: Index.primary
                bad = HostileInput(f"index: hardlink {c.path[:200]!r} does not point at an earlier file")
                self._failed[d] = bad
                raise bad
        for k, c in zip(kids, decoded):
            self._done[k] = c
            if c.kind != Kind.DIR:
                self._ready_rows[k] = c
        self._ready_rows[d] = de
        self._verified.add(d)

    def hardlinks(self) -> dict[bytes, tuple[int, ...]]:
        """Hardlink positions by target, from the undecoded entries (each is verified when it is used)."""
        self.prepare()
        built: dict[bytes, list[int]] = {}
        raw = self._raw
        for i in self._links:
            r = raw[i]
            if type(r) is list and len(r) == 8 and r[1] == Kind.HARDLINK and type(r[7]) is bytes:
                built.setdefault(r[7], []).append(i)
        return {t: tuple(v) for t, v in built.items()}

    def has_xattrs(self) -> bool:
        """Whether any entry may carry an extended attribute, from the undecoded entries (the index's digest
        binds them; each is verified when it is used): one that is not a well-formed row counts as one."""
        if self._has_xattrs is None:
            self.prepare()
            self._has_xattrs = any(type(r) is not list or len(r) != 8 or type(r[6]) is not dict or r[6]
                                   for r in self._raw)
        return self._has_xattrs

    def totals(self) -> tuple[int, int]:
        """Files (and hardlinks) and file bytes, counted once from the undecoded entries (figures only;
        nothing is served from them)."""
        if self._totals is None:
            self.prepare()
            # plain int compares: an IntEnum's == is ~4x slower, over every row
            file, hardlink = int(Kind.FILE), int(Kind.HARDLINK)
            files = size = 0
            for r in self._raw:
                if type(r) is list and len(r) == 8:
                    k = r[1]
                    if k == file:
                        files += 1
                        p = r[7]
                        if type(p) is list and p and type(p[0]) is int and p[0] > 0:
                            size += p[0]
                    elif k == hardlink:
                        files += 1
            self._totals = (files, size)
        return self._totals


@dataclass(frozen=True)
class LazyIndex(Index):
    """An ``Index`` whose ``entries`` are ``tree``: its tree is walked by path without decoding, and
    its totals come from the undecoded entries."""

    tree: LazyEntries | None = field(default=None, repr=False, compare=False)

    def _tree(self) -> LazyEntries:
        if self.tree is None:
            raise FormatError("index: a lazy index without its entries")
        return self.tree

    def prepare(self) -> None:
        self._tree().prepare()

    def shape(self) -> Shape:
        return self._tree().shape

    def names_and_kinds(self, pos: int) -> list[tuple[bytes, Kind, int]]:
        return self._tree().names_and_kinds(pos)

    def _hardlinks(self) -> dict[bytes, tuple[int, ...]]:
        return self._tree().hardlinks()

    @property
    def files(self) -> int:
        return self._tree().totals()[0]

    def has_xattrs(self) -> bool:
        return self._tree().has_xattrs()

    @property
    def logical_bytes(self) -> int:
        return self._tree().totals()[1]
