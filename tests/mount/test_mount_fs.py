"""Read-only FUSE mounts: every byte and every piece of metadata equals ``shoal unpack``'s."""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
from pathlib import Path

import pytest
from mountkit import lstat_fields, shoal, state_of, wait_for

import helpers


def _stats(mnt: Path) -> dict[str, int]:
    import json

    rows = [r for r in json.loads(shoal(None, "status", "--json").stdout)["mounts"] if r["mountpoint"] == str(mnt)]
    return rows[0]["stats"] if rows and rows[0].get("stats") else {}


def _all_paths(root: Path) -> list[bytes]:
    base = os.fsencode(root)
    out = []
    for dp, dns, fns in os.walk(base):
        for n in dns + fns:
            out.append(os.path.relpath(os.path.join(dp, n), base))
    return sorted(out)


def test_tree_and_metadata_match_unpack(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store, unpacked = sample["store"], sample["unpacked"]
    assert isinstance(store, Path) and isinstance(unpacked, Path)
    shoal(store, "mount", sample["ref"], mnt)  # type: ignore[arg-type]
    # contents (sha256 of every file), types, modes, owners, mtimes, xattrs, link targets,
    # device numbers and hardlink groups
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), helpers.tree_snapshot(unpacked))
    paths = _all_paths(unpacked)
    assert paths == _all_paths(mnt)
    m, u = os.fsencode(mnt), os.fsencode(unpacked)
    for p in [b""] + paths:
        mp, up = os.path.join(m, p) if p else m, os.path.join(u, p) if p else u
        assert lstat_fields(mp) == lstat_fields(up), p
        if os.path.islink(up):
            assert os.readlink(mp) == os.readlink(up)
    # hardlinks share one inode number, and distinct files have distinct ones
    a, b, c = (os.lstat(os.path.join(m, p)) for p in (b"sub/hl-a", b"hl-b", b"sub/deeper/hl-c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    assert len({os.lstat(os.path.join(m, p)).st_ino for p in paths}) == len(paths) - 3  # hl group of 3 + pair
    assert os.getxattr(os.path.join(m, b"text06"), "security.capability") == helpers.VFS_CAP_NET_BIND
    assert os.getxattr(os.path.join(m, b"ln-rel"), "trusted.link", follow_symlinks=False) == b"on a symlink"
    with pytest.raises(OSError) as ei:
        os.getxattr(os.path.join(m, b"text05"), "user.missing")
    assert ei.value.errno == errno.ENODATA
    # the big directory lists completely through several readdir calls
    assert sorted(os.listdir(mnt / "many")) == sorted(os.listdir(unpacked / "many"))
    with os.scandir(mnt / "many") as it:
        assert len([e.name for e in it]) == 1500
    shoal(store, "umount", mnt)


def test_random_reads_and_concurrency(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store, tree = sample["store"], sample["tree"]
    assert isinstance(store, Path) and isinstance(tree, Path)
    shoal(store, "mount", sample["ref"], mnt)
    rng = random.Random(5)
    names = [f"sub/rand{i:02d}" for i in range(12)] + [f"text{i:02d}" for i in range(12)] + ["sub/hl-a"]
    for name in names:
        want = (tree / name).read_bytes()
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for _ in range(40):
                off = rng.randrange(0, len(want) + 10)
                size = rng.choice([1, 7, 4096, 65536, 300_000])
                assert os.pread(fd, size, off) == want[off:off + size], (name, off, size)
            assert os.pread(fd, 10, len(want) + 100) == b""
        finally:
            os.close(fd)
    # small random reads hand the rest of their frames to the page cache; what the kernel serves from
    # there must be the file's bytes too
    wait_for(lambda: _stats(mnt).get("pushed_bytes", 0) > 0, 10, "a page-cache push")
    for name in names:
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            want = (tree / name).read_bytes()
            assert b"".join(os.pread(fd, 4096, o) for o in range(0, len(want), 4096)) == want, name
        finally:
            os.close(fd)
    errors: list[BaseException] = []

    def reader(name: str) -> None:
        try:
            for _ in range(3):
                assert (mnt / name).read_bytes() == (tree / name).read_bytes()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    shoal(store, "umount", mnt)


def test_read_only_and_errnos(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    shoal(store, "mount", sample["ref"], mnt)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as ei:
            os.open(mnt / "text03", flags)
        assert ei.value.errno == errno.EROFS
    for op in (lambda: (mnt / "newfile").write_bytes(b"x"), lambda: os.mkdir(mnt / "d"),
               lambda: os.unlink(mnt / "text03"), lambda: os.chmod(mnt / "text03", 0o600),
               lambda: os.setxattr(mnt / "text03", "user.x", b"1")):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.lstat(mnt / "does-not-exist")
    with pytest.raises(FileNotFoundError):  # negative entries are cached, and stay correct
        os.lstat(mnt / "does-not-exist")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "text03")
    assert os.readlink(mnt / "ln-long") == "x" * 1000
    assert (mnt / "ln-dir" / "hl-c").read_bytes() == (mnt / "hl-b").read_bytes()
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    assert os.major(os.lstat(mnt / "loop").st_rdev) == 7
    sv = os.statvfs(mnt)
    assert sv.f_files >= 1500 and sv.f_bfree == 0 and sv.f_namemax == 255
    st = state_of(run_dir)
    assert st["mountpoint"] == str(mnt) and st["ready"] is True and st["writable"] is False
    shoal(store, "umount", mnt)


def test_status_counters_and_prefetch(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    import json
    import time

    store = sample["store"]
    assert isinstance(store, Path)
    shoal(store, "mount", "--prefetch", "all", sample["ref"], mnt)
    data = (mnt / "sub" / "rand11").read_bytes()
    # "all" waits for 1 s without reads (mount.md §3), then fetches; the daemon publishes every second
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.5)
        rows = json.loads(shoal(None, "status", "--json").stdout)["mounts"]
        if rows and rows[0]["stats"].get("prefetch_state") == "done" or time.monotonic() > deadline:
            break
    assert len(rows) == 1
    row = rows[0]
    assert row["alive"] and row["mounted"] and row["name"] == "sample:1" and row["mountpoint"] == str(mnt)
    s = row["stats"]
    assert s["bytes_served"] >= len(data) and s["reads"] > 0 and s["errors"] == 0
    assert s["chunks_cached"] == s["chunks_total"] > 0
    from shoal.store import Store

    st = Store.open(store)
    frames = len(st.load_index(st.resolve("sample:1")).frames)
    assert s["prefetched_frames"] == frames and s["fetches"] >= frames
    human = shoal(None, "status", mnt).stdout.decode()
    assert str(mnt) in human and "alive" in human and "served" in human
    shoal(store, "umount", mnt)
    assert json.loads(shoal(None, "status", "--json").stdout)["mounts"] == []


def test_generated_tree_through_fuse(generated_image: tuple[Path, str, object],
                                     generated_snapshot: dict[bytes, dict[str, object]], mnt: Path,
                                     run_dir: Path) -> None:
    """The shared 5,200-file generated tree (odd names, every entry kind) reads back exactly."""
    store, ref, _ = generated_image
    shoal(store, "mount", ref, mnt)
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), generated_snapshot)
    shoal(store, "umount", mnt)


def test_prefetch_all_waits_while_the_workload_reads(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    """--prefetch all fetches the frames beyond the profile only after 1 s without lookups or reads
    (mount.md §3): while the workload keeps reading, nothing is fetched ahead; once it stops, all is."""
    import json
    import time

    store = sample["store"]
    assert isinstance(store, Path)
    shoal(store, "mount", "--prefetch", "all", sample["ref"], mnt)

    def stats() -> dict[str, object]:
        rows = json.loads(shoal(None, "status", "--json").stdout)["mounts"]
        assert len(rows) == 1
        s = rows[0]["stats"]
        assert isinstance(s, dict)
        return s

    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # a busy workload: a read reaching the daemon every 0.2 s
        fd = os.open(mnt / "sub" / "rand11", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not from the page cache: from the daemon
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        time.sleep(0.2)
    s = stats()
    assert s["prefetch_state"] == "waiting" and s["prefetched_frames"] == 0, s
    deadline = time.monotonic() + 30
    while (s := stats())["prefetch_state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert s["prefetch_state"] == "done" and s["prefetched_frames"] > 0, s
    shoal(store, "umount", mnt)


def test_an_image_without_xattrs_lets_the_kernel_answer_getxattr(tmp_path: Path, mnt: Path, run_dir: Path) -> None:
    """The first getxattr of a mount whose image has no extended attribute gets ENOSYS, after which the
    kernel answers every getxattr of the mount itself (EOPNOTSUPP, as a file system without xattrs):
    overlayfs asks the lower layer for ``trusted.overlay.*`` after most lookups, and exec asks for
    ``security.capability``, each a round trip (mount.md §2).  An image with one is served as before
    (``test_tree_and_metadata_match_unpack``)."""
    from shoal.build import BuildOptions, build
    from shoal.store import Store

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "group").write_bytes(b"root:x:0:\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    for p in (tree, tree / "etc", tree / "etc" / "group", tree / "bin", tree / "bin" / "tool"):
        for name in os.listxattr(p):
            os.removexattr(p, name)
    store = tmp_path / "store"
    build(Store.open(store), tree, "plain:1", BuildOptions(workers=1))
    shoal(store, "mount", "plain:1", mnt)
    for _ in range(2):  # the handler's answer, then the kernel's own
        for path, name in ((mnt / "etc" / "group", "trusted.overlay.origin"),
                           (mnt / "bin" / "tool", "security.capability"), (mnt, "user.x")):
            with pytest.raises(OSError) as ei:
                os.getxattr(path, name)
            assert ei.value.errno == errno.EOPNOTSUPP
    assert os.listxattr(mnt / "etc" / "group") == []
    assert (mnt / "etc" / "group").read_bytes() == b"root:x:0:\n"
    shoal(store, "umount", mnt)
