"""The index model: frozen values, no I/O (docs/spec/format.md §4)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["Kind", "Entry", "Frame", "Index", "path_key", "parent_of", "name_of", "CHUNKLOC", "FRAMEREC"]

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


@dataclass(frozen=True)
class Index:
    """A decoded, validated index.  Chunk ``i`` has id ``chunk_ids[i]`` and location ``chunk_loc(i)``."""

    entries: tuple[Entry, ...]
    chunk_ids: tuple[bytes, ...]
    chunk_frames: tuple[int, ...]
    chunk_offsets: tuple[int, ...]
    chunk_lengths: tuple[int, ...]
    frames: tuple[Frame, ...]
    packs: tuple[bytes, ...]  # raw sha256 of each pack blob, in manifest order
    root: bytes
    _by_path: dict[bytes, int] = field(default_factory=dict, repr=False, compare=False)
    _children: dict[bytes, list[Entry]] = field(default_factory=dict, repr=False, compare=False)
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

    def lookup(self, path: bytes) -> Entry | None:
        if not self._by_path:
            self._by_path.update((e.path, i) for i, e in enumerate(self.entries))
        i = self._by_path.get(path)
        return None if i is None else self.entries[i]

    def children(self, path: bytes) -> list[Entry]:
        """Direct children of directory ``path`` in canonical order."""
        if not self._children:
            kids: dict[bytes, list[Entry]] = {}
            for e in self.entries[1:]:
                kids.setdefault(parent_of(e.path), []).append(e)
            self._children.update(kids)
            self._children[b"\0"] = []  # marks "built" even for an empty tree
        return self._children.get(path, [])

    @property
    def files(self) -> int:
        return sum(1 for e in self.entries if e.kind in (Kind.FILE, Kind.HARDLINK))

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.kind == Kind.FILE)


def path_key(path: bytes) -> list[bytes]:
    """The canonical sort key: paths compare component by component, bytewise (§4.2)."""
    return path.split(b"/") if path else []


def parent_of(path: bytes) -> bytes:
    i = path.rfind(b"/")
    return b"" if i < 0 else path[:i]


def name_of(path: bytes) -> bytes:
    return path[path.rfind(b"/") + 1 :]
