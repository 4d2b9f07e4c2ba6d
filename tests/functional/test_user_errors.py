"""Failures a user can cause end in one ``shoal: error:`` line naming the cause, with a documented exit code
(README: 4 malformed input, 6 store, 8 permission, 9 no space), never ``internal error`` (70).

Real conditions only: an unprivileged user (setpriv), small tmpfs mounts, read-only (bind) mounts and
``chattr +i``.  Most cases need root to set them up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from helpers import IS_ROOT, assert_one_line_error, run_shoal, write_tree

NOBODY = 65534
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mounts, setpriv, chattr)")

PERMISSION, FORMAT, STORE, NO_SPACE, USAGE = 8, 4, 6, 9, 2


def _fail(p: subprocess.CompletedProcess[bytes], code: int, *words: str) -> str:
    line = assert_one_line_error(p, *words)
    assert p.returncode == code, (p.returncode, line)
    assert "internal error" not in line and len(line) < 800, line
    return line


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory under /tmp that the unprivileged user can traverse (pytest's tmp_path may not be)."""
    d = Path(tempfile.mkdtemp(prefix="shoal-errs-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-R", "-i", str(d)], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _small(root: Path) -> Path:
    return write_tree(root, {"a": b"hello\n", "d/b": b"world\n"})


def _big(root: Path, mb: int = 4) -> Path:
    return write_tree(root, {"r1": os.urandom(mb << 19), "r2": os.urandom(mb << 19)})


# ---------------------------------------------------------------------------------------------- paths


def _deep(base: Path, levels: int) -> None:
    """``base``/ddd.../ddd.../f, ``levels`` directories of 240-byte names (made relative to descriptors:
    the absolute path may be longer than the system allows)."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d" * 240, dir_fd=fd)
            sub = os.open("d" * 240, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_build_path_longer_than_the_format_allows(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    _deep(tree, 17)  # 17 x 241 bytes > 4096
    line = _fail(run_shoal(tmp_path / "s", "build", tree, "long:1", check=False), FORMAT, "4096")
    assert "d..." in line  # the path, cut to a sane length


def test_build_path_longer_than_the_system_allows(tmp_path: Path) -> None:
    """Relative paths within the format's limit, but the absolute path exceeds PATH_MAX (ENAMETOOLONG)."""
    base = tmp_path / ("b" * 200)
    _deep(base, 16)  # 16 x 241 = 3856 bytes relative, > 4096 absolute
    _fail(run_shoal(tmp_path / "s", "build", base, "long:1", check=False), FORMAT, "too long")


# ---------------------------------------------------------------------------------------------- permission


@needs_root
def test_build_unreadable_file_names_it_on_one_line(shared: Path) -> None:
    tree = _small(shared / "t")
    bad = tree / "se\ncret\x1b[31m"
    bad.write_bytes(b"no")
    os.chmod(bad, 0)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(shared)], check=True)
    p = run_shoal(shared / "s", "build", tree, "x:1", check=False, user=NOBODY)
    line = _fail(p, PERMISSION, "permission denied")
    assert "se cret" in line and "\\x1b" in line


@needs_root
def test_build_into_a_store_we_cannot_write(shared: Path) -> None:
    tree = _small(shared / "t")
    run_shoal(shared / "s", "build", tree, "x:1")  # root's store, 0755
    _fail(run_shoal(shared / "s", "build", tree, "y:1", check=False, user=NOBODY), PERMISSION,
          "permission denied")
    _fail(run_shoal(shared / "s", "rm", "x:1", check=False, user=NOBODY), PERMISSION, "permission denied")
    _fail(run_shoal(shared / "s", "gc", check=False, user=NOBODY), PERMISSION, "permission denied")
    # reading another user's store still works
    run_shoal(shared / "s", "images", user=NOBODY)


@needs_root
def test_unpack_into_a_target_we_cannot_write(shared: Path) -> None:
    run_shoal(shared / "s", "build", _small(shared / "t"), "x:1")
    line = _fail(run_shoal(shared / "s", "unpack", "x:1", shared / "out", check=False, user=NOBODY),
                 PERMISSION, "permission denied")
    assert str(shared / "out") in line


@needs_root
def test_immutable_store(shared: Path) -> None:
    tree = _small(shared / "t")
    run_shoal(shared / "s", "build", tree, "x:1")
    subprocess.run(["chattr", "-R", "+i", str(shared / "s")], check=True)
    _fail(run_shoal(shared / "s", "build", tree, "y:1", check=False), PERMISSION, "permission denied")
    _fail(run_shoal(shared / "s", "rm", "x:1", check=False), PERMISSION, "permission denied")
    _fail(run_shoal(shared / "s", "gc", check=False), PERMISSION, "permission denied")


# ---------------------------------------------------------------------------------------------- read-only


@needs_root
def test_store_on_a_read_only_bind_mount(shared: Path) -> None:
    tree = _small(shared / "t")
    run_shoal(shared / "s", "build", tree, "x:1")
    ro = shared / "ro"
    ro.mkdir()
    _mount("--bind", str(shared / "s"), str(ro))
    try:
        _mount("-o", "remount,bind,ro", str(ro))
        for args in (("build", tree, "y:1"), ("rm", "x:1"), ("gc",)):
            _fail(run_shoal(ro, *args, check=False), STORE, "read-only")
        run_shoal(ro, "unpack", "x:1", shared / "out")  # reading works
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@needs_root
def test_store_on_a_read_only_filesystem(shared: Path) -> None:
    tree = _small(shared / "t")
    with _tmpfs(shared / "fs", "16m") as fs:
        run_shoal(fs / "s", "build", tree, "x:1")
        _mount("-o", "remount,ro", str(fs))
        for args in (("build", tree, "y:1"), ("rm", "x:1"), ("gc",)):
            _fail(run_shoal(fs / "s", *args, check=False), STORE, "read-only")
        run_shoal(fs / "s", "images")


# ---------------------------------------------------------------------------------------------- disk full


@needs_root
def test_build_into_a_full_store(shared: Path) -> None:
    tree = _big(shared / "t")
    with _tmpfs(shared / "fs") as fs:
        line = _fail(run_shoal(fs / "s", "build", tree, "x:1", check=False), NO_SPACE, "no space left")
        assert str(fs / "s") in line


@needs_root
def test_unpack_into_a_full_target(shared: Path) -> None:
    run_shoal(shared / "s", "build", _big(shared / "t"), "x:1")
    with _tmpfs(shared / "fs") as fs:
        line = _fail(run_shoal(shared / "s", "unpack", "x:1", fs / "out", check=False), NO_SPACE,
                     "no space left")
        assert str(fs / "out") in line
        assert not (fs / "out").exists()


@needs_root
def test_pull_and_convert_into_a_full_store(shared: Path) -> None:
    run_shoal(shared / "s", "build", _big(shared / "t"), "x:1")
    run_shoal(shared / "s", "copy", "x:1", f"oci:{shared / 'shoal-layout'}:x")
    run_shoal(shared / "s", "export", "x:1", f"oci:{shared / 'classic-layout'}:x", "--compression", "none")
    with _tmpfs(shared / "fs") as fs:
        _fail(run_shoal(fs / "s", "pull", f"oci:{shared / 'shoal-layout'}:x", "x:1", check=False), NO_SPACE,
              "no space left")
        _fail(run_shoal(fs / "s2", "convert", f"oci:{shared / 'classic-layout'}:x", "x:1", check=False),
              NO_SPACE, "no space left")


# ---------------------------------------------------------------------------------------------- setuid


@needs_root
def test_unprivileged_unpack_clears_setuid_and_setgid(shared: Path) -> None:
    tree = _small(shared / "t")
    os.chmod(tree / "a", 0o6755)
    os.chmod(tree / "d", 0o2755)
    run_shoal(shared / "s", "build", tree, "x:1")
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    run_shoal(shared / "s", "unpack", "x:1", out, user=NOBODY)
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "d").stat().st_mode) == 0o755
    run_shoal(shared / "s", "unpack", "x:1", shared / "as-root")  # root keeps them, like tar
    assert stat.S_IMODE((shared / "as-root" / "a").stat().st_mode) == 0o6755
    assert stat.S_IMODE((shared / "as-root" / "d").stat().st_mode) == 0o2755


# ---------------------------------------------------------------------------------------------- names


RESERVED = ["oci:latest", "dir:1", "docker-archive", "oci-archive:x", "docker:1"]


def test_transport_names_are_refused_as_store_names(tmp_path: Path) -> None:
    tree = _small(tmp_path / "t")
    run_shoal(tmp_path / "s", "build", tree, "x:1")
    run_shoal(tmp_path / "s", "copy", "x:1", f"oci:{tmp_path / 'lay'}:x")
    for name in RESERVED:
        _fail(run_shoal(tmp_path / "s", "build", tree, name, check=False), USAGE, "transport prefix")
    for name in RESERVED[:2]:
        _fail(run_shoal(tmp_path / "s", "pull", f"oci:{tmp_path / 'lay'}:x", name, check=False), USAGE,
              "transport prefix")
        _fail(run_shoal(tmp_path / "s", "convert", f"oci:{tmp_path / 'lay'}:x", name, check=False), USAGE,
              "transport prefix")


def test_reserved_names_are_the_transport_names() -> None:
    from shoal.store import RESERVED_NAMES
    from shoal.transports.base import all_transports

    assert RESERVED_NAMES == set(all_transports()) - {""}


def test_every_listed_name_parses_back_to_the_same_image(tmp_path: Path) -> None:
    import json

    from shoal.transports.base import parse_reference
    from shoal.transports.local import LocalReference

    tree = _small(tmp_path / "t")
    names = ["oci-x:1", "dir2:latest", "oci/dir:1", "docker-archive-2:t"]
    for n in names:
        run_shoal(tmp_path / "s", "build", tree, n)
    listed = [i["ref"] for i in json.loads(run_shoal(tmp_path / "s", "images", "--json").stdout)["images"]]
    assert sorted(listed) == sorted(names)
    for n in listed:
        ref = parse_reference(n)
        assert isinstance(ref, LocalReference) and ref.name == n and str(ref) == n
    for n in names[:2]:  # and through the CLI
        run_shoal(tmp_path / "s", "copy", n, f"oci:{tmp_path / 'lay'}:{n.replace(':', '-')}")


@pytest.mark.parametrize("hint", ["sha256:abc:1", "sha256:" + "a" * 64, "sha256:" + "a" * 64 + ":x", "md5:1:2"])
def test_a_malformed_index_hint_is_a_usage_error(tmp_path: Path, hint: str) -> None:
    """``mount --index-hint`` (the snapshotter's label, passed on) is checked before anything is opened."""
    (tmp_path / "mp").mkdir()
    p = run_shoal(tmp_path / "s", "mount", "--index-hint", hint, "docker://127.0.0.1:1/x@sha256:" + "b" * 64,
                  tmp_path / "mp", check=False)
    _fail(p, USAGE, "--index-hint", "sha256:<64 hex digits>:<size>")
    assert not (tmp_path / "s").exists()  # nothing opened, no store made
