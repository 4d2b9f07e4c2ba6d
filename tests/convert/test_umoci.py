"""Exactness against the real umoci: ``convert`` + ``shoal.unpack`` equals ``umoci unpack`` of the source,
and ``export`` + ``umoci unpack`` equals the original tree.

Images are made by umoci itself (``umoci repack`` of a bundle after each step), so their layers are
what a real tool writes: PAX headers from Go's archive/tar, whiteouts, hardlinks, xattrs, devices.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from convtools import needs_root, needs_umoci, run, source, umoci_unpack

from helpers import VFS_CAP_NET_BIND, assert_same_tree, tree_snapshot
from shoal.convert import convert, export_to_layout
from shoal.reader import Reader, StoreSource
from shoal.store import Store
from shoal.unpack import unpack

pytestmark = [needs_umoci, needs_root]

Step = Callable[[Path], None]
_DEBIAN_VERSION = "umoci-debian-v1"  # bump when make_umoci_debian changes


def make_umoci_image(workdir: Path, steps: list[Step]) -> Path:
    """An OCI layout whose tag ``lN`` has N layers: layer N is ``umoci repack`` after ``steps[N-1]``."""
    layout, bundle = workdir / "img", workdir / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:empty")
    run("umoci", "unpack", "--image", f"{layout}:empty", bundle)
    for i, step in enumerate(steps, 1):
        step(bundle / "rootfs")
        run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:l{i}", bundle)
    shutil.rmtree(bundle)
    return layout


def _write(p: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    return p


def _small_base(r: Path) -> None:
    _write(r / "etc/hostname", b"box\n")
    _write(r / "etc/shadow", b"root:*:\n", 0o640, 0, 42)
    _write(r / "usr/bin/tool", os.urandom(300_000), 0o755)
    os.link(r / "usr/bin/tool", r / "usr/bin/tool-alias")
    _write(r / "usr/bin/ping", b"\x7fELF ping", 0o755)
    os.setxattr(r / "usr/bin/ping", "security.capability", VFS_CAP_NET_BIND)
    _write(r / "usr/share/doc/a/README", b"a" * 10_000)
    _write(r / "usr/share/doc/b/README", b"b" * 10_000)
    _write(r / "srv/x.txt", b"x", 0o600, 1000, 1000)
    os.setxattr(r / "srv/x.txt", "user.comment", b"\x00binary\xff")
    os.symlink("../usr/bin/tool", r / "srv/link")
    os.mkfifo(r / "srv/fifo")
    os.mknod(r / "srv/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _write(r / ("deep/" + "d" * 120 + "/" + "f" * 200), b"long")
    _write(r / os.fsdecode(b"srv/caf\xe9"), b"latin-1 name")
    (r / "tmp").mkdir()
    os.chmod(r / "tmp", 0o1777)
    os.utime(r / "etc/hostname", ns=(1_600_000_000_123_456_789,) * 2)


def _small_change(r: Path) -> None:
    (r / "etc/hostname").unlink()  # a file whiteout
    shutil.rmtree(r / "usr/share/doc/a")  # a directory whiteout
    (r / "usr/bin/tool").unlink()  # the primary name of a hardlink goes; the alias stays
    shutil.rmtree(r / "usr/share/doc/b")
    _write(r / "usr/share/doc/b", b"a file where a directory was")
    (r / "srv/x.txt").unlink()
    _write(r / "srv/x.txt/inside", b"a directory where a file was")
    os.link(r / "usr/bin/ping", r / "srv/ping-hardlink")  # a hardlink to a file of the lower layer
    os.chmod(r / "etc/shadow", 0o600)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_umoci_image(tmp_path_factory.mktemp("umoci-small"), [_small_base, _small_change])


def _shoal_unpack(store: Store, digest: str, dest: Path) -> Path:
    m = store.manifest(digest)
    idx = store.load_index(m)
    unpack(idx, Reader(idx, StoreSource(store)), str(dest))
    return dest


@pytest.mark.parametrize("tag", ["l1", "l2"])
def test_convert_matches_umoci_unpack(tmp_path: Path, small_image: Path, tag: str) -> None:
    store = Store.open(tmp_path / "store")
    with source(f"oci:{small_image}:{tag}") as src:
        r = convert(src, store, "small:1")
    ours = tree_snapshot(_shoal_unpack(store, r.digest, tmp_path / "ours"))
    theirs = tree_snapshot(umoci_unpack(small_image, tag, tmp_path / "bundle"))
    assert_same_tree(ours, theirs)
    if tag == "l2":
        assert ours[b"usr/bin/tool-alias"]["type"] == "file" and b"usr/bin/tool" not in ours
        assert ours[b"srv/ping-hardlink"]["links"] == (b"srv/ping-hardlink", b"usr/bin/ping")
        assert ours[b"srv/x.txt"]["type"] == "dir" and ours[b"usr/share/doc/b"]["type"] == "file"


def test_export_round_trip_through_umoci(tmp_path: Path, small_image: Path) -> None:
    store = Store.open(tmp_path / "store")
    with source(f"oci:{small_image}:l2") as src:
        convert(src, store, "small:1")
    for comp in ("gzip", "zstd"):
        export_to_layout(store, "small:1", tmp_path / "out", comp, comp)
    original = tree_snapshot(umoci_unpack(small_image, "l2", tmp_path / "orig"))
    again = tree_snapshot(umoci_unpack(tmp_path / "out", "gzip", tmp_path / "again"))
    assert_same_tree(again, original)


def _without_empty_xattrs(snap: dict[bytes, dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
    """Go's archive/tar skips PAX records with empty values (golang/go#20698), so umoci cannot restore
    an empty-valued xattr; everything else must survive."""
    return {p: {**rec, "xattrs": {k: v for k, v in rec["xattrs"].items() if v}} for p, rec in snap.items()}


def test_generated_tree_export_round_trip(tmp_path: Path, generated_image: Any,
                                          generated_snapshot: dict[bytes, dict[str, Any]]) -> None:
    """Every kind of entry and metadata Shoal stores survives export -> umoci unpack."""
    store_dir, ref, _ = generated_image
    export_to_layout(Store.open(store_dir), ref, tmp_path / "out", "gen")
    got = tree_snapshot(umoci_unpack(tmp_path / "out", "gen", tmp_path / "bundle"))
    assert_same_tree(got, _without_empty_xattrs(generated_snapshot))


# ----------------------------------------------------------------------------- the debootstrap image


def _deb_add(r: Path) -> None:
    _write(r / "usr/local/bin/hello", b"#!/bin/sh\necho hello\n", 0o755)
    os.link(r / "usr/local/bin/hello", r / "usr/local/bin/hello-again")
    os.link(r / "usr/bin/env", r / "usr/local/bin/env-link")  # a hardlink to a file of the base layer
    shutil.copyfile(r / "usr/bin/true", r / "usr/local/bin/suid")
    os.chmod(r / "usr/local/bin/suid", 0o4755)
    _write(r / "usr/local/bin/cap", b"\x7fELF cap", 0o750, 0, 4)
    os.setxattr(r / "usr/local/bin/cap", "security.capability", VFS_CAP_NET_BIND)
    _write(r / "usr/local/share/notes.txt", b"notes\n" * 100, 0o640, 1000, 1000)
    os.setxattr(r / "usr/local/share/notes.txt", "user.origin", b"shoal test")
    os.mkfifo(r / "usr/local/share/fifo")
    os.mknod(r / "usr/local/share/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink("hello", r / "usr/local/bin/hi")
    _write(r / ("usr/local/share/" + "long-" * 30 + "name"), b"long")
    (r / "etc/motd").write_bytes(b"changed\n")


def _deb_change(r: Path) -> None:
    (r / "usr/local/bin/hello").unlink()
    (r / "etc/motd").unlink()
    shutil.rmtree(r / "usr/share/doc/apt")
    shutil.rmtree(r / "usr/share/man")
    _write(r / "usr/share/man", b"the manual directory is now a file\n")
    (r / "usr/local/share/notes.txt").unlink()
    _write(r / "usr/local/share/notes.txt/now-a-dir", b"x")
    (r / "usr/local/share/fifo").unlink()


def make_umoci_debian(rootfs: Path, workdir: Path) -> Path:
    def base(r: Path) -> None:
        run("cp", "-a", f"{rootfs}/.", f"{r}/")

    return make_umoci_image(workdir, [base, _deb_add, _deb_change])


@pytest.fixture(scope="session")
def umoci_debian(debian_rootfs: Path, cache_dir: Path) -> tuple[Path, Path]:
    """(layout with tags l1 l2 l3, ``umoci unpack`` of l3), cached under $SHOAL_TEST_CACHE (read-only)."""
    work = cache_dir / _DEBIAN_VERSION
    marker = cache_dir / f"{_DEBIAN_VERSION}.complete"
    fd = os.open(cache_dir / f"{_DEBIAN_VERSION}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not marker.exists():
            if work.exists():
                shutil.rmtree(work)
            work.mkdir()
            layout = make_umoci_debian(debian_rootfs, work)
            umoci_unpack(layout, "l3", work / "ref")
            marker.write_text("umoci image of debian_rootfs, 3 layers\n")
    finally:
        os.close(fd)
    return work / "img", work / "ref" / "rootfs"


def test_debian_convert_is_exact(tmp_path: Path, umoci_debian: tuple[Path, Path]) -> None:
    layout, reference = umoci_debian
    store = Store.open(tmp_path / "store")
    t0 = time.monotonic()
    with source(f"oci:{layout}:l3") as src:
        r = convert(src, store, "debian:1")
    seconds = time.monotonic() - t0
    img = r.images[0]
    tar_mb = sum(layer.uncompressed_bytes for layer in img.layers) / 1e6
    print(f"\nconvert: {len(img.layers)} layers, {tar_mb:.1f} MB of tar in {seconds:.2f}s "
          f"({tar_mb / seconds:.1f} MB/s; apply {img.apply_seconds:.2f}s, build {img.build.seconds:.2f}s)")
    ours = tree_snapshot(_shoal_unpack(store, r.digest, tmp_path / "ours"))
    theirs = tree_snapshot(reference)
    assert_same_tree(ours, theirs)
    assert ours[b"usr/local/bin/hello-again"]["type"] == "file"
    assert ours[b"usr/share/man"]["type"] == "file" and ours[b"usr/local/share/notes.txt"]["type"] == "dir"
    assert b"etc/motd" not in ours and b"usr/share/doc/apt" not in ours
    assert ours[b"usr/bin/env"]["links"] == (b"usr/bin/env", b"usr/local/bin/env-link")
