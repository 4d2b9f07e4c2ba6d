"""The in-memory tree that classic layers are applied to (docs/spec/convert.md §2, §4).

Only metadata lives in memory.  The bytes of every regular file are appended to one temporary
*spill* file in the store's ``tmp/`` directory (unlinked as soon as it is created, so a crash leaves
nothing behind) and a file remembers ``(offset, size)`` in it.  Regular files are inodes: a tar
hardlink makes a second name for the same inode, so deleting one name never affects the others.

Every node records the last layer that *touched* it (created it, re-declared it, or created
something below it): the "upper" paths of umoci and of the OCI image spec.  Whiteouts and opaque
markers remove only what the current layer did not touch, whatever the order of the tar entries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shoal.errors import FormatError, HostileInput, StoreError, from_oserror
from shoal.format.model import Entry, Kind
from shoal.store.layout import unlinked_tempfile

__all__ = ["Meta", "Spill", "SpillFile", "Tree", "ConvertedTree", "split_path", "show", "IMPLICIT_DIR", "MAX_PATH"]

MAX_PATH = 4096  # format.md §4.2
XattrList = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Meta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: XattrList = ()


# A directory that a layer needs but never declares (convert.md §4.3): root:root 0755, mtime 0.
IMPLICIT_DIR = Meta(0o755, 0, 0, 0)


def show(path: bytes | list[bytes]) -> str:
    """A printable form of a path for one-line error messages."""
    if isinstance(path, list):
        path = b"/".join(path)
    return repr(path.decode("utf-8", "backslashreplace"))[1:-1][:300] or "/"


def split_path(raw: bytes) -> list[bytes]:
    """Normalize a tar member name to components (convert.md §4.1).

    Leading ``/`` and ``./`` are dropped (as GNU tar does), as are empty and ``.`` components;
    ``..`` anywhere and NUL bytes are refused.  ``[]`` is the root.
    """
    if b"\0" in raw:
        raise HostileInput(f"tar member name contains a NUL byte: {show(raw)}")
    comps = [c for c in raw.split(b"/") if c and c != b"."]
    if b".." in comps:
        raise HostileInput(f"tar member name has a '..' component: {show(raw)}")
    if sum(len(c) + 1 for c in comps) - 1 > MAX_PATH:
        raise HostileInput(f"path longer than {MAX_PATH} bytes: {show(raw[:200])}...")
    return comps


class Spill:
    """An append-only temporary file holding the contents of every regular file seen."""

    def __init__(self, tmpdir: Path) -> None:
        self.fd = unlinked_tempfile(tmpdir, "convert")
        self.size = 0

    def append(self, read: Callable[[int], bytes], size: int, what: str) -> int:
        """Copy exactly ``size`` bytes from ``read`` to the end of the spill; return their offset."""
        off = self.size
        left = size
        while left:
            buf = read(min(left, 1 << 20))
            if not buf:
                raise FormatError(f"{what}: unexpected end of data")
            view = memoryview(buf)
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:
                raise from_oserror(exc, "cannot write the spill file", "", store=True) from None
            left -= len(buf)
        self.size += size
        return off

    def pread(self, off: int, size: int) -> bytes:
        parts = []
        while size:
            b = os.pread(self.fd, size, off)
            if not b:
                raise StoreError("spill file is shorter than expected")
            parts.append(b)
            off += len(b)
            size -= len(b)
        return b"".join(parts)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SpillFile:
    """One file's bytes in the spill, read in pieces (a ``shoal.treesource.FileReader``)."""

    def __init__(self, spill: Spill, off: int, size: int) -> None:
        self.spill = spill
        self.pos = off
        self.end = off + size

    def read(self, n: int) -> bytes:
        n = min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = self.spill.pread(self.pos, n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


class Inode:
    __slots__ = ("off", "size", "meta")

    def __init__(self, off: int, size: int, meta: Meta) -> None:
        self.off = off
        self.size = size
        self.meta = meta


class Node:
    __slots__ = ("kind", "meta", "target", "rdev", "inode", "children", "upper")

    def __init__(self, kind: Kind, meta: Meta, upper: int, *, target: bytes = b"", rdev: tuple[int, int] = (0, 0),
                 inode: Inode | None = None) -> None:
        self.kind = kind
        self.meta = meta  # for FILE nodes the inode's meta is authoritative
        self.target = target
        self.rdev = rdev
        self.inode = inode
        self.children: dict[bytes, Node] | None = {} if kind == Kind.DIR else None
        self.upper = upper


class Tree:
    """The merged tree of the layers applied so far."""

    def __init__(self) -> None:
        self.root = Node(Kind.DIR, IMPLICIT_DIR, -1)
        self.layer = 0
        self.skipped: list[bytes] = []

    # ------------------------------------------------------------------ lookups

    def _parent(self, comps: list[bytes], create: bool) -> Node | None:
        """The directory that holds ``comps[-1]``.  ``create``: make missing directories and mark the
        whole chain as touched by the current layer.  A symlink on the way is refused (never followed);
        another non-directory is an error when creating and "nothing there" otherwise."""
        cur = self.root
        if create:
            cur.upper = self.layer
        for i, c in enumerate(comps[:-1]):
            assert cur.children is not None
            nxt = cur.children.get(c)
            if nxt is None:
                if not create:
                    return None
                nxt = cur.children[c] = Node(Kind.DIR, IMPLICIT_DIR, self.layer)
            elif nxt.kind != Kind.DIR:
                if nxt.kind == Kind.SYMLINK:
                    raise HostileInput(f"{show(comps)}: {show(comps[: i + 1])} is a symlink; "
                                       "a layer may not write through a symlink")
                if not create:
                    return None
                raise FormatError(f"{show(comps)}: {show(comps[: i + 1])} is not a directory")
            if create:
                nxt.upper = self.layer
            cur = nxt
        return cur

    # ------------------------------------------------------------------ changes

    def put_dir(self, comps: list[bytes], meta: Meta) -> None:
        """A directory entry: an existing directory keeps its children and takes the new metadata."""
        if not comps:
            self.root.meta = meta
            self.root.upper = self.layer
            return
        parent = self._parent(comps, create=True)
        assert parent is not None and parent.children is not None
        old = parent.children.get(comps[-1])
        if old is not None and old.kind == Kind.DIR:
            old.meta = meta
            old.upper = self.layer
        else:
            parent.children[comps[-1]] = Node(Kind.DIR, meta, self.layer)

    def put(self, comps: list[bytes], node: Node) -> None:
        """Any non-directory entry: replaces whatever was at the path (a directory with its subtree)."""
        if not comps:
            raise HostileInput("a layer tries to replace the root directory with a non-directory")
        parent = self._parent(comps, create=True)
        assert parent is not None and parent.children is not None
        node.upper = self.layer
        parent.children[comps[-1]] = node

    def remove(self, comps: list[bytes]) -> None:
        """Drop whatever is at ``comps`` (used before resolving a hardlink, as extractors do)."""
        parent = self._parent(comps, create=True)
        assert parent is not None and parent.children is not None
        parent.children.pop(comps[-1], None)

    def hardlink_source(self, comps: list[bytes], link: list[bytes]) -> Node:
        """The node a hardlink entry at ``link`` names with ``comps``."""
        if not comps:
            raise HostileInput(f"hardlink {show(link)} points to the root directory")
        parent = self._parent(comps, create=False)
        node = None if parent is None or parent.children is None else parent.children.get(comps[-1])
        if node is None:
            raise HostileInput(f"hardlink {show(link)} points to {show(comps)}, which does not exist")
        if node.kind == Kind.DIR:
            raise HostileInput(f"hardlink {show(link)} points to a directory ({show(comps)})")
        return node

    def _prune(self, d: Node) -> None:
        """Remove every descendant of ``d`` that the current layer did not touch."""
        stack = [d]
        while stack:
            n = stack.pop()
            assert n.children is not None
            for name in [k for k, c in n.children.items() if c.upper != self.layer]:
                del n.children[name]
            stack.extend(c for c in n.children.values() if c.kind == Kind.DIR)

    def whiteout(self, comps: list[bytes]) -> None:
        """``.wh.NAME``: hide NAME of the lower layers (what this layer wrote itself stays)."""
        parent = self._parent(comps, create=False)
        if parent is None or parent.children is None:
            return
        node = parent.children.get(comps[-1])
        if node is None:
            return
        if node.upper != self.layer:
            del parent.children[comps[-1]]
        elif node.kind == Kind.DIR:
            self._prune(node)

    def opaque(self, comps: list[bytes]) -> None:
        """``.wh..wh..opq`` in directory ``comps``: hide every lower-layer child of it."""
        if comps:
            parent = self._parent(comps, create=False)
            node = None if parent is None or parent.children is None else parent.children.get(comps[-1])
        else:
            node = self.root
        if node is not None and node.kind == Kind.DIR:
            self._prune(node)

    # ------------------------------------------------------------------ output

    def canonical(self, spill: Spill, source_date_epoch: int | None = None) -> "ConvertedTree":
        """Entries in canonical order (format.md §4.2); hardlink primaries are the first name of an inode."""
        clamp = None if source_date_epoch is None else source_date_epoch * 1_000_000_000
        entries: list[Entry] = []
        files: dict[bytes, tuple[int, int]] = {}
        primary: dict[int, bytes] = {}
        names: dict[int, int] = {}
        # count the names of each inode first: an inode with one surviving name is a plain file
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        order: list[tuple[bytes, Node]] = []
        while stack:
            path, n = stack.pop()
            order.append((path, n))
            if n.kind == Kind.DIR:
                assert n.children is not None
                for name in sorted(n.children, reverse=True):
                    stack.append((path + b"/" + name if path else name, n.children[name]))
            elif n.kind == Kind.FILE:
                assert n.inode is not None
                names[id(n.inode)] = names.get(id(n.inode), 0) + 1
        for path, n in order:
            m = n.inode.meta if n.kind == Kind.FILE and n.inode is not None else n.meta
            mt = m.mtime_ns if clamp is None else min(m.mtime_ns, clamp)
            if n.kind == Kind.FILE:
                ino = n.inode
                assert ino is not None
                first = primary.get(id(ino))
                if first is not None:
                    entries.append(Entry(path, Kind.HARDLINK, m.mode, m.uid, m.gid, mt, m.xattrs, target=first))
                    continue
                if names[id(ino)] > 1:
                    primary[id(ino)] = path
                files[path] = (ino.off, ino.size)
                entries.append(Entry(path, Kind.FILE, m.mode, m.uid, m.gid, mt, m.xattrs, size=ino.size))
            else:
                entries.append(Entry(path, n.kind, m.mode, m.uid, m.gid, mt, m.xattrs, target=n.target,
                                     rdev=n.rdev))
        return ConvertedTree(entries, list(self.skipped), files, spill)


class ConvertedTree:
    """A ``shoal.treesource.TreeSource``: canonical entries, file bytes read back from the spill."""

    def __init__(self, entries: list[Entry], skipped: list[bytes], files: dict[bytes, tuple[int, int]],
                 spill: Spill) -> None:
        self.entries = entries
        self.skipped = skipped
        self.files = files
        self.spill = spill

    def read(self, e: Entry) -> bytes:
        off, size = self.files[e.path]
        return self.spill.pread(off, size)

    def open(self, e: Entry) -> "SpillFile":
        off, size = self.files[e.path]
        return SpillFile(self.spill, off, size)

    @property
    def file_bytes(self) -> int:
        return sum(size for _, size in self.files.values())
