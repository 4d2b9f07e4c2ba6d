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
from shoal.format.metadata import MODE_BITS, keep_xattr, recorded_xattrs
from shoal.format.model import Entry, Kind, path_key
from shoal.format.platform import Platform

__all__ = ["ScannedTree", "scan", "tree_platform", "build_platform", "DEFAULT_PLATFORM"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScannedTree:
    root: bytes  # absolute source directory
    entries: list[Entry]  # canonical order; FILE entries have no chunks yet
    skipped: list[bytes]  # sockets and other unsupported types


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs of ``path`` that an image records (format.md §4.7); the others are not even read."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in names:
        name = os.fsencode(n)
        if not keep_xattr(name):
            continue
        try:
            out.append((name, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return recorded_xattrs(out)


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
        common = (rel, m & MODE_BITS, st.st_uid, st.st_gid, mtime, _xattrs(full))
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


# ---------------------------------------------------------------------------------------------- platform

# Binaries whose ELF header tells the tree's architecture (oci-mapping.md §2.1), in the order asked.
PLATFORM_PROBES = (b"bin/sh", b"usr/bin/sh", b"bin/busybox", b"usr/bin/env", b"bin/ls", b"usr/bin/ls")
# (e_machine, ELF class 1/2 = 32/64-bit, data 1/2 = little/big-endian or 0 = either) -> OCI architecture
_ELF_ARCH = {(62, 2, 0): "amd64", (183, 2, 0): "arm64", (40, 1, 0): "arm", (3, 1, 0): "386",
             (21, 2, 1): "ppc64le", (21, 2, 2): "ppc64", (22, 2, 0): "s390x", (243, 2, 0): "riscv64",
             (258, 2, 0): "loong64"}


def _resolve_in(base: bytes, rel: bytes, hops: int = 40) -> bytes | None:
    """``rel`` under ``base`` with symlinks resolved as if ``base`` were ``/`` (never leaving it)."""
    parts = [c for c in rel.split(b"/") if c and c != b"."]
    done: list[bytes] = []
    while parts:
        c = parts.pop(0)
        if c == b"..":
            if done:
                done.pop()
            continue
        p = os.path.join(base, *done, c)
        try:
            st = os.lstat(p)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(p)
            if target.startswith(b"/"):
                done = []
            parts = [x for x in target.split(b"/") if x and x != b"."] + parts
            continue
        done.append(c)
    return os.path.join(base, *done)


def _elf_arch(path: bytes) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, 20, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_ARCH.get((machine, head[4], head[5])) or _ELF_ARCH.get((machine, head[4], 0))


def tree_platform(root: str | bytes | os.PathLike[str]) -> Platform | None:
    """The platform of the binaries in the tree ``root`` (``linux/ARCH``), from the ELF header of the
    first of PLATFORM_PROBES that is an ELF file of a known machine; None if there is none.  It depends
    on the tree only, never on the machine that reads it (oci-mapping.md §2.1)."""
    base = os.path.abspath(os.fsencode(root))
    for probe in PLATFORM_PROBES:
        path = _resolve_in(base, probe)
        arch = None if path is None else _elf_arch(path)
        if arch is not None:
            return Platform("linux", arch)
    return None


DEFAULT_PLATFORM = Platform("linux", "amd64")  # oci-mapping.md §2.1: a tree without a known binary


def build_platform(root: str | bytes | os.PathLike[str], platform: str | None = None, os_name: str | None = None,
                   arch: str | None = None, variant: str | None = None) -> Platform:
    """The platform ``build`` records for ``root`` (oci-mapping.md §2.1).

    ``platform`` is ``OS/ARCH[/VARIANT]`` or ``host`` (this machine's, the only way the machine enters);
    ``os_name``, ``arch`` and ``variant`` override its parts.  Without ``platform`` or ``arch``, the
    architecture is the tree's (``tree_platform``), else DEFAULT_PLATFORM's: never the machine's."""
    if platform == "host":
        base = Platform.host()
    elif platform:
        base = Platform.parse(platform)
    else:
        base = DEFAULT_PLATFORM
        if arch is None:
            base = tree_platform(root) or DEFAULT_PLATFORM
    for what, value in (("--os", os_name), ("--arch", arch), ("--variant", variant)):
        if value is not None and (("/" in value) or (not value and what != "--variant")):
            raise UsageError(f"invalid {what} {value!r}")
    return Platform(os_name or base.os, arch or base.architecture,
                    base.variant if variant is None else variant)
