"""The index model: frozen values, no I/O (docs/spec/format.md §4)."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from shoal.errors import FormatError, HostileInput

__all__ = ["Kind", "Entry", "Frame", "Index", "Shape", "path_key", "parent_of", "name_of", "CHUNKLOC", "FRAMEREC"]

# §4.4 fixed-width tables
CHUNKLOC = struct.Struct(">III")  # frame index, offset in the decompressed frame, length
FRAMEREC = struct.Struct(">IQII")  # pack index, offset in the pack, compressed length, decompressed length


class Kind(IntEnum):
    DIR = 0
    FILE = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of the tree.  ``path`` is relative, ``/``-separated bytes; the root is ``b""``."""

    path: bytes
    kind: Kind
    mode: int  # permission bits incl. setuid/setgid/sticky (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    size: int = 0  # FILE
    chunks: tuple[int, ...] = ()  # FILE: indices into the chunk table
    target: bytes = b""  # SYMLINK target, or HARDLINK: path of the primary file
    rdev: tuple[int, int] = (0, 0)  # CHAR/BLOCK: (major, minor)
    digest: bytes = b""  # DIR: Merkle digest of the subtree

    @property
    def name(self) -> bytes:
        return name_of(self.path)


@dataclass(frozen=True, slots=True)
class Frame:
    pack: int
    offset: int
    clen: int
    ulen: int


class Shape:
    """Where each path is and which positions are each directory's direct children, from the paths alone
    (no entry decoded).  ``paths`` must be in canonical order (§4.2), so a directory's subtree is the run
    of positions after it whose keys start with its key: its children are found by jumping from each
    child over that child's subtree (a bisection), without reading the rest of the tree.  Safe to call
    from several threads (each table is made whole, then published by one assignment)."""

    def __init__(self, paths: Sequence[bytes], keys: list[list[bytes]] | None = None) -> None:
        self.paths = paths
        self.by_path: dict[bytes, int] = dict(zip(paths, range(len(paths))))
        if keys is None:
            keys = [p.split(b"/") for p in paths]
            if keys:
                keys[0] = []
        self._keys = keys
        self._kids: dict[int, tuple[int, ...]] = {}

    def kids(self, pos: int) -> tuple[int, ...]:
        """Positions whose path's parent is the path at ``pos``, in canonical order (whatever its kind)."""
        got = self._kids.get(pos)
        if got is not None:
            return got
        end = self.end(pos)
        out = []
        c = pos + 1
        while c < end:
            out.append(c)
            c = self.end(c, end)
        got = self._kids[pos] = tuple(out)
        return got

    def end(self, pos: int, hi: int | None = None) -> int:
        """The first position after the subtree of ``pos`` (at most ``hi``)."""
        keys = self._keys
        k = keys[pos]
        if not k:
            return len(keys) if hi is None else hi
        after = k[:-1] + [k[-1] + b"\0"]  # the least key past every key that starts with k
        return bisect.bisect_left(keys, after, pos + 1, len(keys) if hi is None else hi)


@dataclass(frozen=True)
class Index:
    """A decoded, validated index.  Chunk ``i`` has id ``chunk_ids[i]`` and location ``chunk_loc(i)``.

    ``entries`` is a sequence by position; for an index decoded for a mount (``lazyindex.decode_lazy``,
    ``Store.load_index(m, lazy=True)``) it decodes and verifies each directory's entries against its
    Merkle digest on first use (docs/spec/format.md §6.2), so walk the tree with
    ``position``/``child_positions`` and touch only the entries you need."""

    entries: Sequence[Entry]
    chunk_ids: tuple[bytes, ...]
    chunk_frames: tuple[int, ...]
    chunk_offsets: tuple[int, ...]
    chunk_lengths: tuple[int, ...]
    frames: tuple[Frame, ...]
    packs: tuple[bytes, ...]  # raw sha256 of each pack blob, in manifest order
    root: bytes
    _shape: list[Shape] = field(default_factory=list, repr=False, compare=False)
    _links: dict[bytes, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    _by_frame: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    def chunks_by_frame(self) -> Mapping[int, tuple[int, ...]]:
        """Frame index -> the chunk indices the index places in it, in chunk order (only frames that hold
        chunks).  The one inversion of ``chunk_frames``, built once per index."""
        if not self._by_frame and self.chunk_frames:
            built: dict[int, list[int]] = {}
            for ci, fi in enumerate(self.chunk_frames):
                built.setdefault(fi, []).append(ci)
            done = {fi: tuple(cis) for fi, cis in built.items()}
            self._by_frame.update(done)  # one C-level update of int keys: no thread sees it half built
        return self._by_frame

    def frame_chunks(self, fi: int) -> tuple[int, ...]:
        """The chunk indices in frame ``fi`` (empty if none)."""
        return self.chunks_by_frame().get(fi, ())

    def prepare(self) -> None:
        """Do now what this index leaves for the first use of its entries (a lazy index decodes them:
        ``lazyindex``); its error, if they are bad, is also every later use's.  A mount daemon calls
        this once the mount is live, off the path of whoever waits for the mount."""

    def shape(self) -> Shape:
        """Positions by path and children by directory (built on first use)."""
        if not self._shape:
            self._shape.append(Shape([e.path for e in self.entries]))
        return self._shape[0]

    def position(self, path: bytes) -> int | None:
        """The position of ``path``'s entry, or None."""
        return self.shape().by_path.get(path)

    def child_positions(self, pos: int) -> tuple[int, ...]:
        """The positions of the direct children of the directory at ``pos``, in canonical order."""
        return self.shape().kids(pos)

    def names_and_kinds(self, pos: int) -> list[tuple[bytes, Kind, int]]:
        """(name, kind, position) of each direct child of the directory at ``pos``: what its own record
        binds, so a lazy index checks that directory and not its subdirectories' own digests."""
        entries = self.entries
        out = []
        for k in self.child_positions(pos):
            e = entries[k]
            out.append((e.name, e.kind, k))
        return out

    def lookup(self, path: bytes) -> Entry | None:
        i = self.position(path)
        return None if i is None else self.entries[i]

    def children(self, path: bytes) -> list[Entry]:
        """Direct children of directory ``path`` in canonical order."""
        i = self.position(path)
        return [] if i is None else [self.entries[k] for k in self.child_positions(i)]

    def primary(self, pos: int) -> int:
        """The position whose file entry ``pos`` shows: a hardlink's primary file, else ``pos`` itself."""
        e = self.entries[pos]
        if e.kind != Kind.HARDLINK:
            return pos
        p = self.position(e.target)
        f = None if p is None or p >= pos else self.entries[p]
        if p is None or f is None or f.kind != Kind.FILE:
            raise HostileInput(f"index: hardlink {e.path[:200]!r} does not point at an earlier file")
        if (f.mode, f.uid, f.gid, f.mtime_ns, f.xattrs) != (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs):
            raise FormatError(f"index: hardlink {e.path[:200]!r} metadata differs from its file")
        return p

    def hardlinks_to(self, path: bytes) -> tuple[int, ...]:
        """The positions of the hardlink entries whose primary is ``path``."""
        if not self._links:
            self._links.update(self._hardlinks())
            self._links[b"\0"] = ()  # marks "built" even for an index without hardlinks
        return self._links.get(path, ())

    def _hardlinks(self) -> dict[bytes, tuple[int, ...]]:
        built: dict[bytes, list[int]] = {}
        for i, e in enumerate(self.entries):
            if e.kind == Kind.HARDLINK:
                built.setdefault(e.target, []).append(i)
        return {t: tuple(v) for t, v in built.items()}

    @property
    def files(self) -> int:
        return sum(1 for e in self.entries if e.kind in (Kind.FILE, Kind.HARDLINK))

    def has_xattrs(self) -> bool:
        """Whether any entry carries an extended attribute."""
        return any(e.xattrs for e in self.entries)

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.kind == Kind.FILE)

    @property
    def data_bytes(self) -> int:
        """The bytes of the image's data, each chunk once (what a mount's statfs reports: known from the
        chunk table, without the entries)."""
        return sum(self.chunk_lengths)


def path_key(path: bytes) -> list[bytes]:
    """The canonical sort key: paths compare component by component, bytewise (§4.2)."""
    return path.split(b"/") if path else []


def parent_of(path: bytes) -> bytes:
    i = path.rfind(b"/")
    return b"" if i < 0 else path[:i]


def name_of(path: bytes) -> bytes:
    return path[path.rfind(b"/") + 1 :]
