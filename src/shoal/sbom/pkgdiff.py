"""What an update changed, in package terms (``shoal diff --packages``, docs/sbom.md §4)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from shoal.diff import DiffResult
from shoal.sbom.databases import Package
from shoal.sbom.inventory import Inventory, owners

__all__ = ["PackageDiff", "Upgrade", "package_diff", "identity"]


@dataclass(frozen=True)
class Upgrade:
    old: Package
    new: Package


@dataclass
class PackageDiff:
    """``added``/``removed``: packages only one image has; ``upgraded``: one package, another version
    (old -> new; a downgrade too); ``files``: each changed path (added, removed or changed, absolute)
    -> the purls of the packages owning it (B's owners, A's for a removed path; empty: no package)."""

    added: list[Package] = field(default_factory=list)
    removed: list[Package] = field(default_factory=list)
    upgraded: list[Upgrade] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)

    def by_package(self) -> dict[str, list[str]]:
        """purl -> the changed paths it owns; ``""`` holds the changed paths no package owns."""
        out: dict[str, list[str]] = {}
        for path, purls in sorted(self.files.items()):
            for p in purls or [""]:
                out.setdefault(p, []).append(path)
        return out


def identity(p: Package) -> tuple[str, str, str, str]:
    """What stays the same across versions: ecosystem, name, arch, and for language packages the
    directory they are installed in (a dist-info's site directory, a node_modules package's path)."""
    where = ""
    if p.ecosystem == "pypi":
        where = posixpath.dirname(posixpath.dirname(p.location))
    elif p.ecosystem == "npm":
        where = posixpath.dirname(p.location)
    return (p.ecosystem, p.name, p.arch, where)


def package_diff(a: Inventory, b: Inventory, tree: DiffResult | None = None) -> PackageDiff:
    """Packages added, removed and upgraded from ``a`` to ``b``; with ``tree`` (the paths' diff), the
    owners of each changed path."""
    ia: dict[tuple[str, str, str, str], Package] = {}
    ib: dict[tuple[str, str, str, str], Package] = {}
    for p in a.packages:
        ia.setdefault(identity(p), p)
    for p in b.packages:
        ib.setdefault(identity(p), p)
    out = PackageDiff()
    for k in sorted(ia.keys() | ib.keys()):
        pa, pb = ia.get(k), ib.get(k)
        if pa is None and pb is not None:
            out.added.append(pb)
        elif pb is None and pa is not None:
            out.removed.append(pa)
        elif pa is not None and pb is not None and pa.version != pb.version:
            out.upgraded.append(Upgrade(pa, pb))
    if tree is not None:
        oa, ob = owners(a.packages), owners(b.packages)
        for paths, own in ((tree.added, ob), (tree.changed, ob), (tree.removed, oa)):
            for raw in paths:
                path = "/" + raw.decode("utf-8", "surrogateescape")
                out.files[path] = sorted({p.purl for p in own.get(path, [])})
    return out
