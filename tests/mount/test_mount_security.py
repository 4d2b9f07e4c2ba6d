"""A mount of an untrusted image gives no privilege to anyone (issue 9): nosuid, nodev and private to
the mounting user by default; ``--allow-other``, ``--suid``, ``--dev`` and ``--trusted-image`` change
exactly that.  Checked as root (findmnt) and as an unprivileged user (setpriv), with a setuid-root
binary and a world-writable device node in the image."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountkit import shoal

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
T = 1_600_000_000


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ``sec:1``: ``bin/id`` (the host's, setuid root) and ``dev/mem0`` (char 1:3, mode 0666)."""
    d = tmp_path_factory.mktemp("sec")
    tree = d / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "dev").mkdir()
    shutil.copy("/usr/bin/id", tree / "bin" / "id")
    os.chown(tree / "bin" / "id", 0, 0)
    os.chmod(tree / "bin" / "id", 0o4755)
    os.mknod(tree / "dev" / "mem0", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(tree / "dev" / "mem0", 0o666)
    for p in (tree / "bin" / "id", tree / "dev" / "mem0", tree / "bin", tree / "dev", tree):
        os.utime(p, (T, T), follow_symlinks=False)
    shoal(d / "store", "build", tree, "sec:1")
    return d / "store"


@pytest.fixture
def mp() -> Iterator[Path]:
    """A mount point another user can walk to (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="shoal-sec-"))
    os.chmod(d, 0o755)
    (d / "m").mkdir()
    try:
        yield d / "m"
    finally:
        subprocess.run(["fusermount3", "-uz", str(d / "m")], capture_output=True)
        subprocess.run(["umount", "-l", str(d / "m")], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _options(mp: Path) -> set[str]:
    p = subprocess.run(["findmnt", "-no", "OPTIONS", str(mp)], capture_output=True, text=True, check=True)
    return set(p.stdout.strip().splitlines()[-1].split(","))


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=30)


def _open_device(path: Path) -> subprocess.CompletedProcess[str]:
    return _as_nobody("/bin/sh", "-c", f"/usr/bin/head -c 1 '{path}' > /dev/null && echo opened")


@contextlib.contextmanager
def _mounted(image: Path, mp: Path, *flags: str) -> Iterator[tuple[set[str], str, bool]]:
    """Mount ``sec:1`` with ``flags``; yield (mount options, ``id -u`` of the setuid-root binary run by
    uid 65534 (or its error), whether uid 65534 could open the device node); unmount."""
    shoal(image, "mount", "sec:1", mp, *flags)
    try:
        p = _as_nobody(str(mp / "bin" / "id"), "-u")
        ran = p.stdout.strip() if p.returncode == 0 else p.stderr
        yield _options(mp), ran, "opened" in _open_device(mp / "dev" / "mem0").stdout
    finally:
        shoal(None, "umount", mp)


def test_default_mount_is_nosuid_nodev_and_private(image: Path, run_dir: Path, mp: Path) -> None:
    with _mounted(image, mp) as (opts, ran, opened):
        assert {"ro", "nosuid", "nodev"} <= opts and "allow_other" not in opts, opts
        assert "Permission denied" in ran and not opened  # another user cannot even enter
        assert (mp / "bin" / "id").stat().st_mode & 0o4000  # the bit is shown, it just does nothing


def test_allow_other_lets_users_read_but_not_gain_privilege(image: Path, run_dir: Path, mp: Path) -> None:
    with _mounted(image, mp, "--allow-other") as (opts, ran, opened):
        assert {"nosuid", "nodev", "allow_other"} <= opts, opts
        assert ran == "65534" and not opened  # setuid root and the device: not honoured


def test_trusted_image_opts_in_to_exactly_suid_dev_and_allow_other(image: Path, run_dir: Path, mp: Path) -> None:
    with _mounted(image, mp, "--trusted-image") as (opts, ran, opened):
        assert "allow_other" in opts and "nosuid" not in opts and "nodev" not in opts, opts
        assert ran == "0" and opened  # what the flags give up, shown


def test_writable_overlay_is_nosuid_nodev_by_default(image: Path, run_dir: Path, mp: Path) -> None:
    with _mounted(image, mp, "--writable") as (opts, ran, opened):
        assert {"nosuid", "nodev"} <= opts, opts
        assert ran == "65534" and not opened
