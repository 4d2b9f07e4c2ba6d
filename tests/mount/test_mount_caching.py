"""The mount's caching for an immutable image (docs/spec/mount.md §2): long entry and attribute timeouts,
negative entries, ``keep_cache``, the kernel read-ahead window, and small files handed to the page cache
as they are looked up, with the bytes the kernel then serves checked under a real FUSE mount."""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from pathlib import Path

import pytest
from mountkit import shoal

from shoal.mount import state as ms
from shoal.mount.fs import MountReader, ShoalFS
from shoal.mount.kernel import ATTR_MODE_AT, FuseError
from shoal.reader import LayoutSource
from shoal.store import Store

DAY = 24 * 3600.0


def _stats(mnt: Path) -> dict[str, int]:
    import json

    rows = [r for r in json.loads(shoal(None, "status", "--json").stdout)["mounts"] if r["mountpoint"] == str(mnt)]
    return rows[0]["stats"] if rows and rows[0].get("stats") else {}


def _fs(sample: dict[str, object]) -> ShoalFS:
    store = Store.open(sample["store"])  # type: ignore[arg-type]
    idx = store.load_index(store.resolve("sample:1"))
    return ShoalFS(MountReader(idx, LayoutSource(store.layout)), push=False)


def _entry(raw: bytes) -> tuple[int, float, float, int, int]:
    """A fuse_entry_out's inode, entry and attribute timeouts, size and mode."""
    ino, _, ev, av, evn, avn = struct.unpack_from("<QQQQII", raw)
    size = struct.unpack_from("<Q", raw, 40 + 8)[0]
    mode = struct.unpack_from("<I", raw, ATTR_MODE_AT)[0]
    return ino, ev + evn / 1e9, av + avn / 1e9, size, mode


def test_answers_carry_the_caching_of_an_immutable_image(sample: dict[str, object]) -> None:
    fs = _fs(sample)
    sub, ev, av, _, mode = _entry(fs.lookup(1, b"sub"))
    assert ev >= DAY and av >= DAY and stat.S_ISDIR(mode)
    f, ev, av, size, mode = _entry(fs.lookup(sub, b"rand11"))
    assert ev >= DAY and av >= DAY and size > 0 and stat.S_ISREG(mode)
    assert fs.getattr(f) == fs.lookup(sub, b"rand11")  # the same attributes and timeouts
    missing, ev, _, _, _ = _entry(fs.lookup(sub, b"no-such-name"))
    assert missing == 0 and ev >= DAY  # a negative entry, cached by the kernel
    assert len(b"".join(fs.read(f, 0, 10))) == 10
    with pytest.raises(FuseError) as exc:
        fs.read(sub, 0, 10)
    assert exc.value.errno == errno.EISDIR
    with pytest.raises(FuseError) as exc:
        fs.lookup(f, b"x")
    assert exc.value.errno == errno.ENOTDIR
    fs.close()


def test_the_kernel_opens_nothing_through_the_daemon(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    """OPEN and OPENDIR are answered ENOSYS once, so the kernel opens with keep_cache (and caches directory
    listings) by itself: reading a file twice, and listing a directory twice, reaches the daemon once."""
    shoal(sample["store"], "mount", sample["ref"], mnt)  # type: ignore[arg-type]
    tree = sample["tree"]
    assert isinstance(tree, Path)
    name = sorted(n for n in os.listdir(tree / "sub") if (tree / "sub" / n).is_file())[0]
    want = (tree / "sub" / name).read_bytes()
    assert (mnt / "sub" / name).read_bytes() == want
    assert sorted(os.listdir(mnt / "many")) == sorted(os.listdir(tree / "many"))
    time.sleep(1.3)
    before = _stats(mnt)
    for _ in range(3):
        fd = os.open(mnt / "sub" / name, os.O_RDONLY)  # not Python's open(): its isatty() is an IOCTL request
        try:
            assert os.read(fd, len(want) + 1) == want
        finally:
            os.close(fd)
        assert sorted(os.listdir(mnt / "many")) == sorted(os.listdir(tree / "many"))
    time.sleep(1.3)
    after = _stats(mnt)
    # no request at all: with pyfuse3, each open and each listing was OPEN/OPENDIR, READDIRPLUS, RELEASE...
    assert after["fuse_requests"] == before["fuse_requests"] > 0, (before, after)
    assert after["reads"] == before["reads"] and after["lookups"] == before["lookups"], (before, after)
    shoal(sample["store"], "umount", mnt)  # type: ignore[arg-type]


def test_a_listing_brings_every_entry_so_stat_asks_nothing(sample: dict[str, object], mnt: Path,
                                                           run_dir: Path) -> None:
    """READDIRPLUS for the whole listing (mount.md §2): after one listing of a directory of 1,500 entries,
    an lstat of each entry sends no LOOKUP.  With the kernel's adaptive mode only the first reply of a
    listing carried attributes, and the entries after it cost a LOOKUP each (1,322 measured)."""
    shoal(sample["store"], "mount", sample["ref"], mnt)  # type: ignore[arg-type]
    tree = sample["tree"]
    assert isinstance(tree, Path)
    names = [e.name for e in os.scandir(mnt / "many")]  # one pass, no stat between the replies
    assert sorted(names) == sorted(os.listdir(tree / "many")) and len(names) == 1500
    time.sleep(1.3)  # counters are published once a second
    before = _stats(mnt)
    for n in names:
        assert os.lstat(mnt / "many" / n).st_size == os.lstat(tree / "many" / n).st_size
    time.sleep(1.3)
    after = _stats(mnt)
    assert after["lookups"] == before["lookups"], (before, after)
    shoal(sample["store"], "umount", mnt)  # type: ignore[arg-type]


def test_device_of_reads_mountinfo_without_touching_the_mount() -> None:
    st = os.stat("/")
    assert ms.device_of("/") == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert ms.device_of("/no/such/mount/point") is None
    assert not ms.set_readahead("/no/such/mount/point", 1024)


@pytest.mark.skipif(os.geteuid() != 0, reason="the read-ahead window is set through sysfs, as root")
def test_mount_reads_ahead_one_max_size_request(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    shoal(sample["store"], "mount", sample["ref"], mnt)  # type: ignore[arg-type]
    st = os.stat(mnt)
    kib = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").read_text().strip()
    assert kib == str(ms.MountOptions().readahead_kib) == "1024"
    big = sorted((p for p in (sample["tree"] / "sub").iterdir() if p.is_file()),  # type: ignore[operator]
                 key=lambda p: p.stat().st_size)[-1]
    before = _stats(mnt)
    assert (mnt / "sub" / big.name).read_bytes() == big.read_bytes()
    time.sleep(1.3)  # counters are published once a second
    after = _stats(mnt)
    # sequential reads arrive in requests of up to 1 MiB, not the kernel's default 128 KiB
    assert after["reads"] - before["reads"] <= -(-big.stat().st_size // (512 << 10)) + 2
    shoal(sample["store"], "umount", mnt)  # type: ignore[arg-type]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("busy_poll", ["2000", "0"])
def test_a_busy_polling_daemon_serves_and_costs_nothing_idle(sample: dict[str, object], mnt: Path,
                                                             run_dir: Path, busy_poll: str) -> None:
    """``--busy-poll`` (mount.md §2): the FUSE reader asks for the next request for a while before it
    sleeps.  Under a real mount, a walk is answered right either way, and once idle the daemon takes no
    CPU (a reader that kept spinning would take a whole CPU: ~100 ticks a second)."""
    shoal(sample["store"], "mount", sample["ref"], mnt, "--busy-poll", busy_poll)  # type: ignore[arg-type]
    tree = sample["tree"]
    assert isinstance(tree, Path)
    got = sorted(os.path.relpath(os.path.join(d, n), mnt) for d, ds, fs in os.walk(mnt) for n in ds + fs)
    want = sorted(os.path.relpath(os.path.join(d, n), tree) for d, ds, fs in os.walk(tree) for n in ds + fs)
    assert got == want
    st = ms.load_state(ms.paths_for(str(mnt)).state)
    assert st is not None
    pid = st.pid
    time.sleep(0.5)
    before = _cpu_ticks(pid)
    time.sleep(1.0)
    assert _cpu_ticks(pid) - before <= 5  # the once-a-second state file, nothing more
    shoal(sample["store"], "umount", mnt)  # type: ignore[arg-type]


def test_busy_poll_is_off_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert ms.default_busy_poll_us() == 0 and ms.MountOptions().busy_poll_us == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ms.default_busy_poll_us() == ms.BUSY_POLL_US == 50 == ms.MountOptions().busy_poll_us


def test_a_frame_in_the_page_cache_is_read_on_the_reader_thread(sample: dict[str, object], mnt: Path,
                                                                 run_dir: Path) -> None:
    """mount.md §2: a read within one frame whose compressed bytes the store has in the page cache
    (``preadv2(RWF_NOWAIT)``; the packs were just built) is decompressed and answered by the thread that
    read the request, not handed to a worker: the very first read of the mount is an inline one."""
    shoal(sample["store"], "mount", sample["ref"], mnt)  # type: ignore[arg-type]
    tree = sample["tree"]
    assert isinstance(tree, Path)
    packs = list(Path(str(sample["store"])).glob("blobs/sha256/*"))
    for p in packs:
        p.read_bytes()  # in the page cache, whatever ran before
    if Store.open(sample["store"]).layout.read_range_nowait("sha256:" + packs[0].name, 0, 1) is None:  # type: ignore[arg-type]
        pytest.skip("this file system does not answer preadv2(RWF_NOWAIT): every such read goes to a worker")
    assert (mnt / "text11").read_bytes() == (tree / "text11").read_bytes()
    time.sleep(1.3)  # counters are published once a second
    s = _stats(mnt)
    assert s["reads"] >= 1 and s["inline_reads"] == s["reads"], s
    shoal(sample["store"], "umount", mnt)  # type: ignore[arg-type]
