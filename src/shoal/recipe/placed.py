"""A copy-only tree step made on the parent's index, without unpacking it (docs/spec/lineage.md §7).

The unpack path (``builder._tree_step``) unpacks the parent, copies into the directory (``_copy_into``)
and builds the directory.  Here the same copies are made on the parent's index entries: each copy adds or
replaces entries exactly as ``_copy_into`` changes the directory and as ``scan`` would then read it back
(owner root, permission bits kept, mtimes SOURCE_DATE_EPOCH, missing parents 0755, every directory an entry
was created in or removed from touched, every mtime clamped to SOURCE_DATE_EPOCH), only the copied files'
bytes are chunked, and the index is built with ``build_placed``, every chunk placed where the store's
catalogue places it (as ``build`` places a chunk it finds stored).  The result is the image the unpack
path makes, byte for byte.

Whatever this model does not follow exactly is left to the unpack path (``copy_step`` returns None): a
destination whose parent path crosses a symlink or a non-directory of the tree, a copy through an existing
symlink, overwriting a file that is hardlinked or has xattrs, removing a hardlinked file, a special file in
the way, a directory with a default ACL or set-group-ID that new entries would inherit from, a parent chunk
the store does not hold in a whole pack, a build not run as root, SOURCE_DATE_EPOCH in the future, or more
than ``MAX_NEW_BYTES`` of copied file bytes (they are held in memory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import replace
from typing import Sequence

from shoal.build import BuildOptions, BuildResult, Placed, PlacedTree, build_placed
from shoal.chunking import get_chunker
from shoal.format.manifest import ImageConfig, ShoalManifest
from shoal.format.model import Entry, Frame, Index, Kind, path_key
from shoal.recipe.spec import CopySpec
from shoal.store import Store

__all__ = ["copy_step", "MAX_NEW_BYTES"]

log = logging.getLogger(__name__)

MAX_NEW_BYTES = 256 * 1024 * 1024  # copied file bytes held in memory; more: the unpack path


class _Unsupported(Exception):
    """This copy needs the unpack path (the message says why)."""


def _parent_of(path: bytes) -> bytes:
    i = path.rfind(b"/")
    return path[:i] if i >= 0 else b""


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _inherits(e: Entry) -> bool:
    """A directory whose new entries would get more than the copy gives them (a default ACL)."""
    return any(b"posix_acl_default" in k for k, _ in e.xattrs)


class _Model:
    """The parent's entries by path, changed copy by copy; FILE chunks index ``ids``."""

    def __init__(self, idx: Index, sde_ns: int) -> None:
        self.sde_ns = sde_ns
        self.entries: dict[bytes, Entry] = {
            e.path: replace(e, mtime_ns=min(e.mtime_ns, sde_ns)) if e.mtime_ns > sde_ns else e
            for e in idx.entries}
        self.ids: list[bytes] = list(idx.chunk_ids)
        self.id_pos: dict[bytes, int] = {}
        self.new: dict[bytes, bytes] = {}
        self.new_bytes = 0
        self.linked = {e.target for e in idx.entries if e.kind == Kind.HARDLINK}

    def touch(self, d: bytes, creating: bool) -> None:
        """An entry was created in (or removed from) directory ``d``: its mtime is now, read back clamped."""
        e = self.entries[d]
        if creating and _inherits(e):
            raise _Unsupported(f"/{d.decode(errors='replace')} has a default ACL")
        self.entries[d] = replace(e, mtime_ns=self.sde_ns)

    def remove(self, path: bytes) -> None:
        prefix = path + b"/"
        gone = [p for p in self.entries if p == path or p.startswith(prefix)]
        for p in gone:
            if self.entries[p].kind == Kind.HARDLINK or p in self.linked:
                raise _Unsupported(f"/{p.decode(errors='replace')} is hardlinked")
        for p in gone:
            del self.entries[p]
        self.touch(_parent_of(path), False)

    def file(self, host: str) -> tuple[int, tuple[int, ...]]:
        with open(host, "rb") as f:
            data = f.read()
        self.new_bytes += len(data)
        if self.new_bytes > MAX_NEW_BYTES:
            raise _Unsupported(f"more than {MAX_NEW_BYTES} bytes copied")
        refs = []
        for off, n in get_chunker().cut(memoryview(data)):
            piece = data[off:off + n]
            cid = hashlib.sha256(piece).digest()
            i = self.id_pos.get(cid)
            if i is None:
                i = self.id_pos[cid] = len(self.ids)
                self.ids.append(cid)
                self.new[cid] = piece
            refs.append(i)
        return len(data), tuple(refs)

    def put(self, host: str, tp: bytes) -> None:
        """``_copy_into``'s ``one``: ``host`` (not followed) to ``tp``, merging into an existing directory."""
        st = os.lstat(host)
        cur = self.entries.get(tp)
        mode, sde = stat.S_IMODE(st.st_mode), self.sde_ns
        if cur is None:
            self.touch(_parent_of(tp), True)
        if stat.S_ISLNK(st.st_mode):
            if cur is not None:
                raise _Unsupported("a symlink copied onto an existing path")
            self.entries[tp] = Entry(tp, Kind.SYMLINK, mode, 0, 0, sde, target=os.fsencode(os.readlink(host)))
        elif stat.S_ISDIR(st.st_mode):
            if cur is not None and cur.kind != Kind.DIR:
                raise _Unsupported("a directory copied onto a non-directory")
            xattrs = cur.xattrs if cur is not None else ()
            self.entries[tp] = Entry(tp, Kind.DIR, 0o700, 0, 0, sde, xattrs)  # its children see it
            for n in sorted(os.listdir(host)):
                self.put(os.path.join(host, n), _join(tp, os.fsencode(n)))
            self.entries[tp] = Entry(tp, Kind.DIR, mode, 0, 0, sde, xattrs)
        elif stat.S_ISREG(st.st_mode):
            if cur is not None and (cur.kind != Kind.FILE or tp in self.linked or cur.xattrs):
                raise _Unsupported("a file copied over a hardlinked, xattr-bearing or non-regular file")
            size, chunks = self.file(host)
            self.entries[tp] = Entry(tp, Kind.FILE, mode, 0, 0, sde, (), size=size, chunks=chunks)
        else:
            raise _Unsupported("a special file")

    def copy(self, ctx: str, c: CopySpec) -> None:
        """``_copy_into`` on the entries."""
        parts = [os.fsencode(p) for p in c.dst.split("/") if p]
        if not parts or any(p in (b".", b"..") for p in parts):
            raise _Unsupported(f"destination {c.dst}")
        host_src = os.path.join(ctx, c.src)
        st = os.lstat(host_src)
        src_dir = os.path.isdir(host_src)  # followed, as _copy_into asks
        if stat.S_ISLNK(st.st_mode) and src_dir:
            raise _Unsupported("the source is a symlink to a directory")
        anc = b""
        k = 0
        for k in range(len(parts) - 1):
            p = _join(anc, parts[k])
            e = self.entries.get(p)
            if e is None:
                break
            if e.kind != Kind.DIR:
                raise _Unsupported(f"/{p.decode(errors='replace')} is not a directory in the parent tree"
                                   + (" (a symlink)" if e.kind == Kind.SYMLINK else ""))
            anc = p
        else:
            k = len(parts) - 1
        if k < len(parts) - 1:  # missing parents, made 0755 by the build's (root) user
            a = self.entries[anc]
            if a.mode & stat.S_ISGID:
                raise _Unsupported(f"/{anc.decode(errors='replace')} is set-group-ID")
            self.touch(anc, True)
            for i in range(k, len(parts) - 1):
                anc = _join(anc, parts[i])
                self.entries[anc] = Entry(anc, Kind.DIR, 0o755, 0, 0, self.sde_ns)
        parent = anc
        target = _join(parent, parts[-1])
        te = self.entries.get(target)
        if te is not None and te.kind == Kind.DIR and not src_dir:
            name = os.fsencode(os.path.basename(c.src))
            if name in (b"", b".", b".."):
                raise _Unsupported(f"source {c.src}")
            parent, target = target, _join(target, name)
            te = self.entries.get(target)
        if te is not None:
            if te.kind == Kind.DIR and src_dir:
                pass  # merged into
            elif te.kind == Kind.SYMLINK and src_dir:
                raise _Unsupported("a directory copied onto a symlink")
            else:
                self.remove(target)
        self.put(host_src, target)


def copy_step(store: Store, parent: ShoalManifest, ctx: str, copies: Sequence[CopySpec], sde: int,
              config: ImageConfig, workers: int) -> BuildResult | None:
    """The copy-only tree step on ``parent``'s index; None when it needs the unpack path."""
    sde_ns = sde * 1_000_000_000
    try:
        if os.geteuid() != 0 or os.getegid() != 0:
            raise _Unsupported("not root")
        if time.time_ns() < sde_ns:
            raise _Unsupported("SOURCE_DATE_EPOCH is in the future")
        idx = store.load_index(parent)
        m = _Model(idx, sde_ns)
        for c in copies:
            m.copy(ctx, c)
        entries = sorted(m.entries.values(), key=lambda e: path_key(e.path))
        entries = [replace(e, digest=b"") if e.kind == Kind.DIR else e for e in entries]
        places = _places(store, m, entries)
    except _Unsupported as exc:
        log.info("copy step on the index not possible (%s): unpacking the parent", exc)
        return None
    new = {cid: b for cid, b in m.new.items() if cid not in places}  # stored already: placed, as build does
    return build_placed(store, PlacedTree(entries, m.ids, places, new), None,
                        BuildOptions(workers=workers, config=config))


def _places(store: Store, m: _Model, entries: list[Entry]) -> dict[bytes, Placed]:
    """Where ``build`` would place each chunk: the catalogue's location, when the store holds that pack
    whole; a new chunk elsewhere is packed anew, a parent chunk elsewhere needs the unpack path."""
    used: dict[bytes, None] = {}
    for e in entries:
        if e.kind == Kind.FILE:
            for c in e.chunks:
                used[m.ids[c]] = None
    lay = store.layout
    whole: dict[str, int | None] = {}
    out: dict[bytes, Placed] = {}
    for cid, loc in store.catalog.locate(list(used)).items():
        if loc.pack not in whole:
            whole[loc.pack] = lay.size(loc.pack) if lay.has(loc.pack) else None
        size = whole[loc.pack]
        if size is not None:
            out[cid] = Placed(bytes.fromhex(loc.pack[7:]), size, Frame(0, loc.frame_off, loc.frame_clen,
                                                                       loc.frame_ulen), loc.off, loc.length)
    for cid in used:
        if cid not in out and cid not in m.new:
            raise _Unsupported(f"chunk sha256:{cid.hex()} of the parent is not in a pack the store holds whole")
    return out
