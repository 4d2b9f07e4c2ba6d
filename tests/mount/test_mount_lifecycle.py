"""Mount lifecycle: --writable overlays, umount (clean, busy, lazy, dead daemon), foreground mode,
errors, and a corrupt pack byte."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mountkit import mounts_under, pid_alive, shoal, state_of, wait_for

import helpers


def _mounted(path: Path | str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _assert_gone(run_dir: Path, mnt: Path, pid: int, *paths: str) -> None:
    assert not _mounted(mnt)
    for p in paths:
        assert not _mounted(p), p
    assert not mounts_under(run_dir)
    wait_for(lambda: not pid_alive(pid), 5, "daemon exit")
    assert not list((run_dir / "mounts").glob("*.json"))
    assert not [p for p in (run_dir / "mounts").iterdir() if p.is_dir()]


def _store_digest(store: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((store / "blobs").rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_writable_writes_land_in_upper_only(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store, tree = sample["store"], sample["tree"]
    assert isinstance(store, Path) and isinstance(tree, Path)
    before = _store_digest(store)
    shoal(store, "mount", "--writable", sample["ref"], mnt)
    st = state_of(run_dir)
    lower, upper = Path(str(st["lower"])), Path(str(st["upper"]))
    assert st["writable"] and _mounted(mnt) and _mounted(lower)
    assert (mnt / "text09").read_bytes() == (tree / "text09").read_bytes()
    # the overlay root shows the image root's attributes
    assert os.stat(mnt).st_mode == os.stat(tree).st_mode and os.stat(mnt).st_mtime_ns == os.stat(tree).st_mtime_ns
    (mnt / "new.txt").write_bytes(b"new file\n")
    with open(mnt / "text03", "ab") as f:
        f.write(b"appended")
    os.unlink(mnt / "sub" / "rand01")
    os.mkdir(mnt / "newdir")
    os.chmod(mnt / "text04", 0o600)
    assert (upper / "new.txt").read_bytes() == b"new file\n"
    assert (upper / "text03").read_bytes() == (tree / "text03").read_bytes() + b"appended"
    assert (upper / "newdir").is_dir()
    assert stat_is_whiteout(upper / "sub" / "rand01")
    # the FUSE lower and the store are untouched
    assert not (lower / "new.txt").exists()
    assert (lower / "text03").read_bytes() == (tree / "text03").read_bytes()
    assert (lower / "sub" / "rand01").exists() and os.stat(lower / "text04").st_mode & 0o777 == 0o644
    pid = int(st["pid"])  # type: ignore[call-overload]
    shoal(store, "umount", mnt)
    _assert_gone(run_dir, mnt, pid, str(lower))
    assert _store_digest(store) == before
    # a new mount starts from the image again
    shoal(store, "mount", "--writable", sample["ref"], mnt)
    assert not (mnt / "new.txt").exists() and (mnt / "sub" / "rand01").exists()
    shoal(store, "umount", mnt)


def stat_is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0


def test_umount_leaves_no_mount_and_no_process(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    out = shoal(store, "mount", "--json", sample["ref"], mnt)
    st = json.loads(out.stdout)
    assert out.stderr == b""
    pid = st["pid"]
    assert pid_alive(pid) and _mounted(mnt)
    log = Path(st["log"])
    assert log.exists()
    p = shoal(store, "umount", mnt)
    assert p.stdout == b"" and p.stderr == b""
    _assert_gone(run_dir, mnt, pid)
    assert not log.exists()
    helpers.assert_one_line_error(shoal(store, "umount", mnt, check=False), "not a shoal mount")


def test_background_mount_hands_its_opened_image_to_keep(sample: dict[str, object], mnt: Path,
                                                         run_dir: Path) -> None:
    """A caller that ends at once keeps the parent's copy of the image instead of freeing it (the
    snapshotter's fork-server child: ~15 ms on the path of CreateContainer); the CLI does so."""
    from shoal.mount.daemon import MountOptions, mount
    from shoal.mount.image import OpenedImage

    kept: list[OpenedImage] = []
    st = mount(str(sample["ref"]), str(mnt), MountOptions(), str(sample["store"]), keep=kept.append)
    assert st is not None
    try:
        assert [k.digest for k in kept] == [st.digest] and kept[0].index.entries
    finally:
        p = shoal(sample["store"], "umount", mnt)
        assert p.returncode == 0, p.stderr
    _assert_gone(run_dir, mnt, st.pid)


def test_umount_after_daemon_died(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    shoal(store, "mount", "--writable", sample["ref"], mnt)
    st = state_of(run_dir)
    pid = int(st["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 5, "daemon death")
    with pytest.raises(OSError) as ei:
        os.listdir(mnt)
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    rows = json.loads(shoal(None, "status", "--json").stdout)["mounts"]
    assert rows[0]["alive"] is False and rows[0]["mounted"] is True
    helpers.assert_one_line_error(shoal(store, "mount", sample["ref"], mnt, check=False), "dead", "umount")
    p = shoal(store, "umount", mnt)
    assert b"died" in p.stderr
    assert not _mounted(mnt) and not _mounted(str(st["lower"]))
    assert not mounts_under(run_dir) and not list((run_dir / "mounts").glob("*.json"))
    shoal(store, "mount", sample["ref"], mnt)  # the mount point is usable again
    shoal(store, "umount", mnt)


def test_umount_busy_then_lazy(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    shoal(store, "mount", sample["ref"], mnt)
    pid = int(state_of(run_dir)["pid"])  # type: ignore[call-overload]
    f = open(mnt / "text10", "rb")
    try:
        helpers.assert_one_line_error(shoal(store, "umount", mnt, check=False), "busy")
        assert _mounted(mnt) and pid_alive(pid)
        shoal(store, "umount", "--lazy", mnt)
        assert not _mounted(mnt)
        assert f.read(5) == (Path(str(sample["tree"])) / "text10").read_bytes()[:5]  # still served
    finally:
        f.close()
    wait_for(lambda: not pid_alive(pid), 10, "daemon exit after the last user left")
    wait_for(lambda: not list((run_dir / "mounts").glob("*.json")), 5, "state removal")


def test_foreground_mount_and_signal(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    env = dict(os.environ)
    proc = subprocess.Popen(helpers.shoal_cmd(store, "mount", "--foreground", sample["ref"], mnt),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: _mounted(mnt), 15, "foreground mount")
        assert (mnt / "text02").read_bytes() == (Path(str(sample["tree"])) / "text02").read_bytes()
        assert state_of(run_dir)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"serving" in err and out == b""
    assert not _mounted(mnt) and not list((run_dir / "mounts").glob("*.json"))


def test_mount_errors(sample: dict[str, object], mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    store = sample["store"]
    assert isinstance(store, Path)
    p = shoal(store, "mount", "nosuch:1", mnt, check=False)
    helpers.assert_one_line_error(p, "no image")
    assert p.returncode == 3
    helpers.assert_one_line_error(shoal(store, "mount", "docker://example.com/x:1", mnt, check=False), "docker")
    helpers.assert_one_line_error(shoal(store, "mount", sample["ref"], tmp_path / "nowhere", check=False),
                                  "not a directory")
    shoal(store, "mount", sample["ref"], mnt)
    helpers.assert_one_line_error(shoal(store, "mount", sample["ref"], mnt, check=False), "already")
    shoal(store, "umount", mnt)
    helpers.assert_one_line_error(shoal(store, "status", mnt, check=False), "not a shoal mount")
    assert not list((run_dir / "mounts").glob("*.json"))


def _flip_inside_chunk(store_dir: Path, ref: str, path: bytes) -> None:
    """Flip one byte of ``path``'s first chunk inside its (raw, incompressible) zstd frame."""
    from shoal.store import Store

    st = Store.open(store_dir)
    idx = st.load_index(st.resolve(ref))
    e = idx.lookup(path)
    assert e is not None and e.chunks
    ci = e.chunks[0]
    f = idx.frames[idx.chunk_frames[ci]]
    blob = st.layout.path("sha256:" + idx.packs[f.pack].hex())
    data = bytearray(blob.read_bytes())
    frame = bytes(data[f.offset:f.offset + f.clen])
    from shoal.reader import LayoutSource, Reader

    chunk = bytes(Reader(idx, LayoutSource(st.layout)).chunk(ci))
    probe = chunk[len(chunk) // 2:len(chunk) // 2 + 32]
    at = frame.find(probe)
    assert at >= 0 and frame.find(probe, at + 1) < 0, "random data should be stored raw in the frame"
    data[f.offset + at + 5] ^= 0x40
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))


def test_corrupt_pack_byte_gives_eio_and_others_read(sample: dict[str, object], mnt: Path, run_dir: Path,
                                                     tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(Path(str(sample["store"])), store)
    _flip_inside_chunk(store, "sample:1", b"sub/rand09")
    shoal(store, "mount", sample["ref"], mnt)
    with pytest.raises(OSError) as ei:
        (mnt / "sub" / "rand09").read_bytes()
    assert ei.value.errno == errno.EIO
    randoms = sample["randoms"]
    assert isinstance(randoms, dict)
    tree = Path(str(sample["tree"]))
    for rel, data in randoms.items():
        if rel != "sub/rand09":
            assert (mnt / rel).read_bytes() == data, rel
    for name in [f"text{i:02d}" for i in range(12)] + ["sub/hl-a", "pair1"]:
        assert (mnt / name).read_bytes() == (tree / name).read_bytes()
    with pytest.raises(OSError) as ei:  # and it keeps failing: never served, never cached
        (mnt / "sub" / "rand09").read_bytes()
    assert ei.value.errno == errno.EIO
    log = Path(str(state_of(run_dir)["log"])).read_text()
    lines = [ln for ln in log.splitlines() if "digest mismatch" in ln]
    assert lines and "/sub/rand09" in lines[0] and "EIO" in lines[0], log[-2000:]
    time.sleep(1.2)
    s = json.loads(shoal(None, "status", "--json").stdout)["mounts"][0]["stats"]
    assert s["integrity_errors"] >= 2
    shoal(store, "umount", mnt)


def test_daemon_start_failure_is_one_line_and_leaves_nothing(sample: dict[str, object], mnt: Path, run_dir: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay is refused after the FUSE lower is already mounted: the parent gets the daemon's
    error as one line and the same exit code, and the daemon undoes its FUSE mount."""
    bad = tmp_path / "run,dir"
    bad.mkdir()
    monkeypatch.setenv("SHOAL_RUN_DIR", str(bad))
    try:
        p = shoal(Path(str(sample["store"])), "mount", "--writable", sample["ref"], mnt, check=False)
        helpers.assert_one_line_error(p, "overlay")
        assert p.returncode == 6  # StoreError, raised in the daemon, re-raised in the parent
        assert not mounts_under(bad) and not _mounted(mnt)
        assert not list((bad / "mounts").glob("*.json"))
        assert [x.suffix for x in (bad / "mounts").iterdir()] == [".log"]  # kept for a post-mortem
    finally:
        from mountkit import teardown_mounts

        teardown_mounts(bad, tmp_path)


def test_an_index_whose_entries_are_bad_serves_nothing(mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    """format.md §6.2: a mount decodes its index's entries in the daemon once the mount is live, so an
    index whose tables are sound but whose entries are not (here the root directory's mode changed, its
    digest kept) mounts, then answers every request that needs an entry with EIO, and its log says why."""
    from shoal.format import cbor
    from shoal.format import index as fidx
    from shoal.format.model import Entry, Kind
    from shoal.store import Store

    t = 1_600_000_000_000_000_000
    idx = fidx.make_index([Entry(b"", Kind.DIR, 0o755, 0, 0, t), Entry(b"etc", Kind.DIR, 0o755, 0, 0, t),
                           Entry(b"etc/motd", Kind.SYMLINK, 0o777, 0, 0, t, target=b"x")], [], [], [], [], [], [])
    doc = cbor.decode(fidx.encode(idx))
    doc["entries"][0][2] = 0o4777
    store = tmp_path / "store"
    helpers.put_image(Store.open(store), "bad:1", fidx.compress(cbor.encode(doc)), "sha256:" + idx.root.hex())
    shoal(store, "mount", "bad:1", mnt)
    for _ in range(2):
        for use in (lambda: os.listdir(mnt), lambda: os.lstat(mnt / "etc" / "motd")):
            with pytest.raises(OSError) as ei:
                use()
            assert ei.value.errno == errno.EIO
    st = state_of(run_dir)
    log = Path(str(st["log"])).read_text()
    assert any("the index of" in ln and "is bad" in ln and "digest mismatch" in ln for ln in log.splitlines()), log
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, int(st["pid"]))  # type: ignore[call-overload]
