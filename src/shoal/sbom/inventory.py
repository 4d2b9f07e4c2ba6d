"""What an image has installed, from its index and the few files that record it (docs/sbom.md §2).

``packages_of`` finds the package databases by their paths in the index alone, then reads only those
files through the image's ``Reader`` (for a ``docker://`` image: range reads of the frames holding
them, every chunk verified).  Nothing else of the tree is read.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from dataclasses import dataclass, field

from shoal.errors import FormatError, HostileInput, NotFound, UsageError
from shoal.format.model import Index, Kind
from shoal.reader import Reader
from shoal.sbom import databases as db
from shoal.sbom.databases import LIMITS, Distro, FileRef, Limits, Package

__all__ = ["Inventory", "packages_of", "owners"]

log = logging.getLogger(__name__)

DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d"
DPKG_INFO = "var/lib/dpkg/info"
APK_INSTALLED = "lib/apk/db/installed"
RPMDB_SQLITE = ("var/lib/rpm/rpmdb.sqlite", "usr/lib/sysimage/rpm/rpmdb.sqlite")
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")


@dataclass
class Inventory:
    """The packages of one image, sorted by (ecosystem, name, arch, version, location); ``read`` lists
    the files read (absolute paths) and ``bytes_read`` their sizes; ``warnings`` what was skipped."""

    distro: Distro
    packages: list[Package]
    read: list[str] = field(default_factory=list)
    bytes_read: int = 0
    newest_mtime_ns: int = 0  # of the files read: a deterministic time when the image has none
    warnings: list[str] = field(default_factory=list)


class _Files:
    """Reads files of the image by path, within the limits; counts what it reads."""

    def __init__(self, index: Index, reader: Reader, lim: Limits) -> None:
        self.index, self.reader, self.lim = index, reader, lim
        self.read: list[str] = []
        self.total = 0
        self.newest = 0

    def entry(self, rel: str) -> tuple[bytes, int] | None:
        """(resolved index path, size) of regular file ``rel`` (symlinks followed inside the image)."""
        e = self.reader.resolve(rel.encode("utf-8", "surrogateescape"))
        if e is not None and e.kind == Kind.HARDLINK:
            i = self.index.position(e.path)
            e = None if i is None else self.index.entries[self.index.primary(i)]
        if e is None or e.kind != Kind.FILE:
            return None
        return e.path, e.size

    def get(self, rel: str, limit: int) -> bytes | None:
        """The bytes of regular file ``rel`` or None when there is none; HostileInput past ``limit``."""
        found = self.entry(rel)
        if found is None:
            return None
        path, size = found
        if size > limit:
            raise HostileInput(f"/{rel}: {size} bytes, more than the {limit} a package database file may have")
        if self.total + size > self.lim.total:
            raise HostileInput(f"package databases larger than {self.lim.total} bytes in all")
        e = self.reader.file_entry(path)
        data = b"".join(bytes(c) for c in self.reader.iter_file(e))
        self.total += len(data)
        self.newest = max(self.newest, e.mtime_ns)
        self.read.append("/" + rel)
        return data


def _children(index: Index, rel: str) -> list[tuple[str, Kind]]:
    e = index.lookup(rel.encode())
    if e is None or e.kind != Kind.DIR:
        return []
    return [(c.path.decode("utf-8", "surrogateescape"), c.kind) for c in index.children(e.path)]


def packages_of(index: Index, reader: Reader, *, limits: Limits = LIMITS) -> Inventory:
    """Every package the image's databases record: dpkg, rpm (sqlite), apk, Python dist-info and
    node_modules package.json, with the files each owns where its database records them.

    Raises FormatError / HostileInput for a malformed or oversized database (naming it), and what
    reading raises (IntegrityError, TransportError)."""
    f = _Files(index, reader, limits)
    distro = Distro()
    for rel in OS_RELEASE:
        data = f.get(rel, limits.small)
        if data is not None:
            distro = db.parse_os_release(data, limits)
            break
    pkgs: list[Package] = []
    warnings: list[str] = []
    pkgs += _dpkg(index, f, distro, limits)
    data = f.get(APK_INSTALLED, limits.database)
    if data is not None:
        pkgs += db.parse_apk_installed(data, distro, "/" + APK_INSTALLED, limits)
    for rel in RPMDB_SQLITE:
        data = f.get(rel, limits.database)
        if data is not None:
            pkgs += db.parse_rpmdb_sqlite(data, distro, "/" + rel, limits)
            break
    pkgs += _language(index, f, limits, warnings)
    pkgs.sort(key=lambda p: (p.ecosystem, p.name, p.arch, p.version, p.location))
    log.info("%d packages from %d files (%d bytes)", len(pkgs), len(f.read), f.total)
    return Inventory(distro, pkgs, f.read, f.total, f.newest, warnings)


def _dpkg(index: Index, f: _Files, distro: Distro, lim: Limits) -> list[Package]:
    out: list[Package] = []
    data = f.get(DPKG_STATUS, lim.database)
    if data is not None:
        out += db.parse_dpkg_status(data, distro, "/" + DPKG_STATUS, lim)
    for path, kind in _children(index, DPKG_STATUS_D):  # distroless: one paragraph a file
        if kind == Kind.FILE and not path.endswith(".md5sums"):
            d = f.get(path, lim.small)
            if d is not None:
                out += db.parse_dpkg_status(d, distro, "/" + path, lim)
    if not out:
        return out
    lists = {posixpath.basename(p)[:-5]: p for p, k in _children(index, DPKG_INFO) if p.endswith(".list")}
    owned: list[Package] = []
    for p in out:
        rel = lists.get(f"{p.name}:{p.arch}") or lists.get(p.name)
        if rel is None:
            owned.append(p)
            continue
        d = f.get(rel, lim.file_list)
        paths = db.parse_dpkg_list(d, "/" + rel, lim) if d is not None else []
        files = _existing(index, f, paths)
        owned.append(dataclasses.replace(p, files=tuple(FileRef(x) for x in files)))
    return owned


def _existing(index: Index, f: _Files, paths: list[str]) -> list[str]:
    """The non-directory entries among ``paths`` as the image holds them: a path through a symlinked
    directory (``/bin/ls`` on a merged-/usr system) is given by where it resolves (``/usr/bin/ls``)."""
    out: set[str] = set()
    for p in paths:
        b = p.lstrip("/").encode("utf-8", "surrogateescape")
        e = index.lookup(b)
        if e is None:
            parent, _, name = b.rpartition(b"/")
            d = f.reader.resolve(parent) if parent else None
            e = index.lookup(d.path + b"/" + name if d is not None and d.path else name) if d is not None else None
        if e is not None and e.kind != Kind.DIR:
            out.add("/" + e.path.decode("utf-8", "surrogateescape"))
    return sorted(out)


def _language(index: Index, f: _Files, lim: Limits, warnings: list[str]) -> list[Package]:
    """Python dist-info directories and node_modules packages, anywhere in the tree (from the index)."""
    out: list[Package] = []
    seen_pkgjson = 0
    for e in index.entries:
        if e.kind != Kind.DIR:
            continue
        path = e.path.decode("utf-8", "surrogateescape")
        base = posixpath.basename(path)
        parent = posixpath.dirname(path)
        try:
            if base.endswith(".dist-info"):
                meta = f.get(path + "/METADATA", lim.small)
                if meta is None:
                    continue
                p = db.parse_python_metadata(meta, "/" + path + "/METADATA", lim)
                rec = f.get(path + "/RECORD", lim.file_list)
                files: tuple[FileRef, ...] = ()
                if rec is not None:
                    refs = db.parse_python_record(rec, "/" + parent, "/" + path + "/RECORD", lim)
                    files = tuple(sorted({r for r in refs
                                          if index.lookup(r.path[1:].encode("utf-8", "surrogateescape"))}))
                out.append(dataclasses.replace(p, files=files))
            elif posixpath.basename(parent) == "node_modules" or (
                    base.startswith("@") is False and posixpath.basename(posixpath.dirname(parent)) == "node_modules"
                    and posixpath.basename(parent).startswith("@")):
                pj = path + "/package.json"
                if index.lookup(pj.encode("utf-8", "surrogateescape")) is None or base.startswith("."):
                    continue
                seen_pkgjson += 1
                if seen_pkgjson > lim.packages:
                    raise HostileInput(f"more than {lim.packages} node_modules packages")
                data = f.get(pj, lim.small)
                q = db.parse_package_json(data, "/" + pj, lim) if data is not None else None
                if q is not None:
                    out.append(q)
        except (FormatError, UsageError, NotFound) as exc:
            if isinstance(exc, HostileInput):
                raise
            # one broken language package does not hide the rest: say so, and go on
            warnings.append(str(exc))
            log.warning("skipped: %s", exc)
    return out


def owners(packages: list[Package]) -> dict[str, list[Package]]:
    """Absolute path -> the packages that own it (more than one for shared directories' files)."""
    out: dict[str, list[Package]] = {}
    for p in packages:
        for r in p.files:
            out.setdefault(r.path, []).append(p)
    return out


