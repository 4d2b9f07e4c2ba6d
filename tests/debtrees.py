"""Derived Debian trees for the lineage tests (rebase, apply), cached under $SHOAL_TEST_CACHE like
``debian_rootfs``: a second, independent ``debootstrap --variant=minbase bookworm`` and copies of a base
tree with packages installed by ``chroot DIR apt-get install -y``.  Root and network only; callers skip
otherwise.  Trees are read-only once made."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helpers import locked


def _make(cache: Path, name: str, fill: "list[list[str]]", copy_from: Path | None) -> Path:
    target = cache / name
    marker = cache / f"{name}.complete"
    with locked(cache / f"{name}.lock"):
        if marker.exists() and target.is_dir():
            return target
        partial = cache / f"{name}.partial"
        for p in (partial, target):
            if p.exists():
                shutil.rmtree(p)
        log = cache / f"{name}.log"
        with open(log, "wb") as out:
            if copy_from is not None:
                subprocess.run(["cp", "-a", str(copy_from), str(partial)], check=True, stdout=out, stderr=out)
            for cmd in fill:
                argv = [a.replace("{DIR}", str(partial)) for a in cmd]
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
                r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1800)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} failed (exit {r.returncode}); log {log}")
        os.rename(partial, target)
        marker.write_text(f"{name}\n")
    return target


def debootstrap(cache: Path, name: str) -> Path:
    """An independent ``debootstrap --variant=minbase bookworm`` run, cached as ``name``."""
    deb = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    return _make(cache, name, [[deb, "--variant=minbase", "bookworm", "{DIR}"]], None)


def with_packages(cache: Path, name: str, base: Path, packages: tuple[str, ...]) -> Path:
    """A copy of ``base`` with ``packages`` installed (``chroot DIR apt-get install -y``), cached as ``name``."""
    return _make(cache, name, [["chroot", "{DIR}", "apt-get", "install", "-y", "-q", "--no-install-recommends",
                                *packages]], base)
