"""Walk a directory tree into canonical index entries (docs/spec/format.md §4.3).

The walk order does not matter: entries are sorted canonically afterwards.
File contents are not read here; regular files come back with ``size`` from
``lstat`` and empty chunk lists, and ``build`` fills them in.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from shoal.errors import FormatError, NotFound, UsageError, from_oserror, short
from shoal.format.index import MAX_PATH
from shoal.format.model import Entry, Kind, path_key

__all__ = ["ScannedTree", "scan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScannedTree:
    root: bytes  # absolute source directory
    entries: list[Entry]  # canonical order; FILE entries have no chunks yet
    skipped: list[bytes]  # sockets and other unsupported types


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in names:
        try:
            out.append((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(sorted(out))


def scan(root: str | bytes | os.PathLike[str], source_date_epoch: int | None = None) -> ScannedTree:
    """Read the metadata of every entry under ``root`` (not following symlinks)."""
    base = os.path.abspath(os.fsencode(root))
    try:
        st_root = os.lstat(base)
    except FileNotFoundError:
        raise NotFound(f"no such directory: {os.fsdecode(base)}") from None
    if not stat.S_ISDIR(st_root.st_mode):
        raise UsageError(f"not a directory: {os.fsdecode(base)}")
    clamp = None if source_date_epoch is None else source_date_epoch * 1_000_000_000

    try:
        return _scan(base, st_root, clamp)
    except OSError as exc:
        raise from_oserror(exc, "cannot read the tree") from None


def _scan(base: bytes, st_root: os.stat_result, clamp: int | None) -> ScannedTree:
    raw: list[tuple[bytes, os.stat_result]] = [(b"", st_root)]
    skipped: list[bytes] = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            for de in it:
                name = de.name if isinstance(de.name, bytes) else os.fsencode(de.name)
                p = rel + b"/" + name if rel else name
                if len(p) > MAX_PATH:
                    raise FormatError(f"path longer than the format's {MAX_PATH} bytes: "
                                      f"{short(os.fsdecode(os.path.join(base, p)))}")
                st = de.stat(follow_symlinks=False)
                m = st.st_mode
                if stat.S_ISSOCK(m) or not (
                    stat.S_ISDIR(m) or stat.S_ISREG(m) or stat.S_ISLNK(m)
                    or stat.S_ISCHR(m) or stat.S_ISBLK(m) or stat.S_ISFIFO(m)
                ):
                    log.warning("skipping %r: sockets and unknown file types are not stored", p)
                    skipped.append(p)
                    continue
                raw.append((p, st))
                if stat.S_ISDIR(m):
                    stack.append(p)
    raw.sort(key=lambda t: path_key(t[0]))

    entries: list[Entry] = []
    primaries: dict[tuple[int, int], Entry] = {}
    for rel, st in raw:
        full = os.path.join(base, rel) if rel else base
        m = st.st_mode
        mtime = st.st_mtime_ns if clamp is None else min(st.st_mtime_ns, clamp)
        common = (rel, stat.S_IMODE(m), st.st_uid, st.st_gid, mtime, _xattrs(full))
        if stat.S_ISDIR(m):
            e = Entry(rel, Kind.DIR, *common[1:]) if rel else Entry(b"", Kind.DIR, *common[1:])
        elif stat.S_ISREG(m):
            key = (st.st_dev, st.st_ino)
            prim = primaries.get(key) if st.st_nlink > 1 else None
            if prim is not None:
                e = Entry(rel, Kind.HARDLINK, prim.mode, prim.uid, prim.gid, prim.mtime_ns, prim.xattrs,
                          target=prim.path)
            else:
                e = Entry(rel, Kind.FILE, *common[1:], size=st.st_size)
                if st.st_nlink > 1:
                    primaries[key] = e
        elif stat.S_ISLNK(m):
            e = Entry(rel, Kind.SYMLINK, *common[1:], target=os.readlink(full))
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            kind = Kind.CHAR if stat.S_ISCHR(m) else Kind.BLOCK
            e = Entry(rel, kind, *common[1:], rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        else:
            e = Entry(rel, Kind.FIFO, *common[1:])
        entries.append(e)
    return ScannedTree(base, entries, skipped)
