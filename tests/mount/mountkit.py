"""Helpers for the mount tests (importable as ``mountkit``)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import helpers


def mounts_under(*roots: Path) -> list[str]:
    prefixes = [str(r.resolve()) + "/" for r in roots]
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if any(mp.startswith(p) for p in prefixes):
                out.append(mp)
    return out


def teardown_mounts(run_dir: Path, *roots: Path) -> None:
    """Kill recorded daemons, then detach every mount under ``roots`` (deepest first)."""
    for p in (run_dir / "mounts").glob("*.json") if (run_dir / "mounts").is_dir() else []:
        try:
            pid = json.loads(p.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
    for mp in sorted(mounts_under(run_dir, *roots), key=len, reverse=True):
        r = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def shoal(store: Path | None, *args: str | os.PathLike[str], check: bool = True,
          **kw: object) -> subprocess.CompletedProcess[bytes]:
    return helpers.run_shoal(store, *args, check=check, **kw)  # type: ignore[arg-type]


@pytest.fixture(name="run_dir")
def run_dir_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's own ``SHOAL_RUN_DIR``; teardown kills its daemons and unmounts everything under
    ``tmp_path``, even when the test failed."""
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("SHOAL_RUN_DIR", str(d))
    try:
        yield d
    finally:
        teardown_mounts(d, tmp_path)


def state_of(run_dir: Path) -> dict[str, object]:
    files = list((run_dir / "mounts").glob("*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert isinstance(doc, dict)
    return doc


def mount_stats(mnt: Path) -> dict[str, object]:
    """The ``stats`` of the one live mount at ``mnt`` (``shoal status --json``), after the daemon's next
    publication of its counters (every second)."""
    time.sleep(1.2)
    rows = json.loads(shoal(None, "status", "--json", mnt).stdout)["mounts"]
    assert len(rows) == 1 and rows[0]["alive"] and rows[0]["mounted"]
    s = rows[0]["stats"]
    assert isinstance(s, dict)
    return s


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- sample tree

SIZES = (0, 1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 200_000, 1_000_000, 3_000_000)
NS = 123_456_789


def _mt(i: int) -> int:
    return (1_600_000_000 + 1000 * i) * 1_000_000_000 + NS + i


def make_sample_tree(root: Path, seed: int = 7) -> dict[str, bytes]:
    """A small tree with every kind of entry and metadata; returns {relative path: bytes} of the
    regular files with random (incompressible) content, for the corruption test."""
    import random

    rng = random.Random(seed)
    r = os.fsencode(root)
    os.mkdir(r)
    j = os.path.join
    os.makedirs(j(r, b"sub/deeper/deepest"))
    os.mkdir(j(r, b"many"))
    os.mkdir(j(r, b"empty"))
    os.mkdir(j(r, b"sticky"))
    randoms: dict[str, bytes] = {}
    for i, n in enumerate(SIZES):
        text = bytes(rng.choice(b"abcdefgh \n") for _ in range(min(n, 5000))) * (n // 5000 + 1)
        with open(j(r, f"text{i:02d}".encode()), "wb") as f:
            f.write(text[:n])
        data = rng.randbytes(n)
        with open(j(r, f"sub/rand{i:02d}".encode()), "wb") as f:
            f.write(data)
        randoms[f"sub/rand{i:02d}"] = data
    for i in range(1500):  # a directory big enough for several readdir calls
        with open(j(r, b"many/" + f"file-with-a-longish-name-{i:05d}".encode()), "wb") as f:
            f.write(rng.randbytes(rng.randrange(0, 3000)))
    for name in helpers.ODD_NAMES:
        with open(j(r, b"sub/" + name), "wb") as f:
            f.write(name * 3)
    os.mkdir(j(r, b"caf\xe9-dir"))
    with open(j(r, b"caf\xe9-dir/\xff"), "wb") as f:
        f.write(b"latin-1 names\n")
    # hardlinks: a group of three across directories and a pair
    with open(j(r, b"sub/hl-a"), "wb") as f:
        f.write(rng.randbytes(70_000))
    os.link(j(r, b"sub/hl-a"), j(r, b"hl-b"))
    os.link(j(r, b"sub/hl-a"), j(r, b"sub/deeper/hl-c"))
    with open(j(r, b"pair1"), "wb") as f:
        f.write(b"pair\n")
    os.link(j(r, b"pair1"), j(r, b"pair2"))
    # symlinks
    for name, target in ((b"ln-rel", b"sub/rand05"), (b"ln-abs", b"/etc/passwd"), (b"ln-dangling", b"nowhere"),
                         (b"ln-dir", b"sub/deeper"), (b"ln-long", b"x" * 1000), (b"sub/ln-up", b"../text03")):
        os.symlink(target, j(r, name))
    os.mkfifo(j(r, b"fifo"))
    os.mknod(j(r, b"null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(j(r, b"loop"), 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    # metadata: owners, modes, xattrs, mtimes (files first, directories deepest first)
    meta = [
        (b"text05", dict(uid=1000, gid=1000, mode=0o640, xattrs={"user.comment": b"hello", "user.empty": b""})),
        (b"text06", dict(uid=0, gid=0, mode=0o4755, xattrs={"security.capability": helpers.VFS_CAP_NET_BIND})),
        (b"text07", dict(uid=65534, gid=65534, mode=0o000, xattrs={})),
        (b"text08", dict(uid=0, gid=42, mode=0o2711, xattrs={"trusted.shoal": b"\x00\xff" * 10})),
        (b"sub/hl-a", dict(uid=7, gid=8, mode=0o600, xattrs={"user.hl": b"group"})),
        (b"fifo", dict(uid=0, gid=0, mode=0o622, xattrs={})),
        (b"null", dict(uid=0, gid=0, mode=0o666, xattrs={})),
        (b"loop", dict(uid=0, gid=6, mode=0o660, xattrs={})),
    ]
    done = {p for p, _ in meta} | {b"hl-b", b"sub/deeper/hl-c"}
    for i, (p, m) in enumerate(meta):
        helpers._meta(j(r, p), mtime_ns=_mt(i), **m)  # type: ignore[arg-type]
    files = []
    for dp, dns, fns in os.walk(r):
        for n in fns + [d for d in dns if os.path.islink(j(dp, d))]:
            rel = os.path.relpath(j(dp, n), r)
            if rel not in done:
                files.append(rel)
    for i, rel in enumerate(sorted(files)):
        full = j(r, rel)
        is_link = os.path.islink(full)
        xa = {"trusted.link": b"on a symlink"} if rel == b"ln-rel" else {}
        helpers._meta(full, uid=0, gid=0, mode=None if is_link else 0o644, xattrs=xa, mtime_ns=_mt(100 + i),
                      is_link=is_link)
    dirs = sorted((os.path.relpath(dp, r) for dp, _, _ in os.walk(r)), key=lambda d: -d.count(b"/"))
    for i, d in enumerate(dirs):
        mode = 0o1777 if d == b"sticky" else 0o755
        xa = {"user.dir": b"yes"} if d == b"sub" else {}
        helpers._meta(j(r, d) if d != b"." else r, uid=0, gid=0, mode=mode, xattrs=xa, mtime_ns=_mt(5000 + i))
    return randoms


def lstat_fields(path: bytes) -> dict[str, int]:
    st = os.lstat(path)
    size = -1 if stat.S_ISDIR(st.st_mode) else st.st_size  # directory sizes are not part of an image
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": size, "mtime_ns": st.st_mtime_ns,
            "nlink": st.st_nlink, "rdev": st.st_rdev}
