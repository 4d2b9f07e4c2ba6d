"""``shoal mount docker://...``: a real registry, real FUSE.  Bytes and metadata equal ``unpack``'s; a
lying registry gives EIO and caches nothing; a dead or hung one gives EIO within --fetch-timeout;
credentials outlive the auth file; --prefetch all and a registry profile fill the store, and
``shoal status`` says so."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import base64
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mountkit import lstat_fields, mount_stats, mounts_under, pid_alive, shoal, state_of, wait_for  # noqa: E402

import helpers  # noqa: E402
from regfix import (  # noqa: E402,F401
    Registry,
    _token_registry_session,
    proxy_factory,
    registry,
    registry_factory,
    token_registry,
)


def _push(sample: dict[str, object], host: str, repo: str, *extra: str) -> str:
    ref = f"docker://{host}/{repo}:1"
    shoal(Path(str(sample["store"])), "push", "sample:1", ref, *extra)
    return ref


@pytest.fixture(scope="module")
def remote(sample: dict[str, object], registry: Registry) -> str:
    return _push(sample, registry.host, "lazy/mount")


def _assert_gone(run_dir: Path, mnt: Path, pid: int) -> None:
    assert not mounts_under(run_dir, mnt.parent)
    wait_for(lambda: not pid_alive(pid), 5, "daemon exit")
    assert not list((run_dir / "mounts").glob("*.json"))


def _paths(root: Path) -> list[bytes]:
    base = os.fsencode(root)
    out = []
    for dp, dns, fns in os.walk(base):
        out += [os.path.relpath(os.path.join(dp, n), base) for n in dns + fns]
    return sorted(out)


def _index(sample: dict[str, object]) -> Any:
    from shoal.store import Store

    st = Store.open(Path(str(sample["store"])))
    m = st.resolve("sample:1")
    return m, st.load_index(m)


def test_lazy_mount_matches_unpack(sample: dict[str, object], remote: str, mnt: Path, run_dir: Path,
                                   tmp_path: Path) -> None:
    cold = tmp_path / "cold"
    st = json.loads(shoal(cold, "mount", "--json", "--prefetch", "none", remote, mnt).stdout)
    assert st["name"] == remote and st["ref"] == remote
    unpacked = Path(str(sample["unpacked"]))
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), helpers.tree_snapshot(unpacked))
    assert _paths(mnt) == _paths(unpacked)
    for p in [b""] + _paths(unpacked):
        m, u = os.path.join(os.fsencode(mnt), p), os.path.join(os.fsencode(unpacked), p)
        assert lstat_fields(m) == lstat_fields(u), p
    s = mount_stats(mnt)
    src = s["source"]
    m, idx = _index(sample)
    assert src["bytes_total"] == sum(p.size for p in m.packs) and src["frames_total"] == len(idx.frames)
    assert src["frames_cached"] == len(idx.frames) and src["bytes_cached"] == src["bytes_total"]
    assert 0 < src["bytes_fetched"] and src["requests"] > 0 and src["failures"] == 0 and s["errors"] == 0
    assert s["chunks_cached"] == s["chunks_total"] and s["prefetch_state"] == "none"
    human = shoal(None, "status", mnt).stdout.decode()
    assert "network" in human and f"frames {len(idx.frames)}/{len(idx.frames)}" in human
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, st["pid"])
    # the frames stayed in the store: a second mount reads everything without a range request
    st = json.loads(shoal(cold, "mount", "--json", "--prefetch", "none", remote, mnt).stdout)
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), helpers.tree_snapshot(unpacked))
    s = mount_stats(mnt)
    assert s["source"]["requests"] == 0 and s["source"]["frames_local"] > 0
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, st["pid"])
    assert b"error" not in shoal(cold, "fsck").stdout.lower()
    from shoal.store import Store

    assert Store.open(cold).layout.refs() == {}  # nothing was tagged


def test_eight_processes_reading_one_uncached_file_fetch_each_byte_once(
        sample: dict[str, object], registry: Registry, proxy_factory: Any, mnt: Path, run_dir: Path,
        tmp_path: Path) -> None:
    import hashlib
    import subprocess

    proxy = proxy_factory(registry.url)
    ref = _push(sample, registry.host, "lazy/eight").replace(registry.host, proxy.host)
    shoal(tmp_path / "cold", "mount", "--prefetch", "none", ref, mnt)
    if os.geteuid() == 0:  # a lazy image keeps the kernel's read-ahead window: 1 MiB is for local images
        dev = os.stat(mnt).st_dev
        assert int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()) < 1024
    randoms = sample["randoms"]
    assert isinstance(randoms, dict)
    want = hashlib.sha256(randoms["sub/rand11"]).hexdigest()  # 3 MB: several frames, several packs' ranges
    before = len(proxy.ranges)
    procs = [subprocess.Popen(["sha256sum", str(mnt / "sub" / "rand11")], stdout=subprocess.PIPE) for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].split()[0].decode() for p in procs]
    assert outs == [want] * 8 and all(p.returncode == 0 for p in procs)
    seen: dict[str, list[tuple[int, int]]] = {}
    for path, rng in proxy.ranges[before:]:
        assert rng.startswith("bytes="), rng
        for part in rng[6:].split(","):
            a, b = (int(x) for x in part.split("-"))
            for c, d in seen.get(path, []):
                assert b < c or a > d, f"bytes {a}-{b} of {path} fetched twice (also {c}-{d})"
            seen.setdefault(path, []).append((a, b))
    assert seen, "no range reads went through the proxy"
    pid = int(state_of(run_dir)["pid"])  # type: ignore[call-overload]
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, pid)


def test_corrupting_registry_gives_eio_and_caches_nothing(sample: dict[str, object], registry: Registry,
                                                          proxy_factory: Any, mnt: Path, run_dir: Path,
                                                          tmp_path: Path) -> None:
    from shoal.store import Store

    proxy = proxy_factory(registry.url)
    ref = _push(sample, registry.host, "lazy/corrupt").replace(registry.host, proxy.host)
    cold = tmp_path / "cold"
    shoal(cold, "mount", "--prefetch", "none", ref, mnt)
    proxy.corrupt = True  # from now on every blob answer has its first byte flipped
    for _ in range(2):
        with pytest.raises(OSError) as ei:
            (mnt / "sub" / "rand09").read_bytes()
        assert ei.value.errno == errno.EIO
    log = Path(str(state_of(run_dir)["log"])).read_text()
    fs_lines = [ln for ln in log.splitlines() if "integrity failure (digest mismatch)" in ln]
    assert fs_lines and "/sub/rand09" in fs_lines[0] and "EIO" in fs_lines[0], log[-3000:]
    assert any("digest mismatch" in ln and "not cached" in ln for ln in log.splitlines()), log[-3000:]
    store = Store.open(cold)
    assert store.catalog.count() == 0 and not store.catalog.frame_packs()  # nothing unverified was kept
    assert shoal(cold, "fsck").returncode == 0
    s = mount_stats(mnt)
    assert s["integrity_errors"] >= 2 and s["source"]["failures"] >= 2 and s["source"]["frames_cached"] == 0
    proxy.corrupt = False  # an honest registry again: the same read now succeeds
    randoms = sample["randoms"]
    assert isinstance(randoms, dict)
    assert (mnt / "sub" / "rand09").read_bytes() == randoms["sub/rand09"]
    pid = int(state_of(run_dir)["pid"])  # type: ignore[call-overload]
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, pid)


def _eio_within(path: Path, limit: float) -> float:
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        path.read_bytes()
    dt = time.monotonic() - t0
    assert ei.value.errno == errno.EIO
    assert dt < limit, f"EIO took {dt:.1f}s"
    return dt


def test_dead_or_hung_registry_gives_eio_within_the_timeout(sample: dict[str, object],
                                                            registry_factory: Any,
                                                            mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    reg = registry_factory()
    ref = _push(sample, reg.host, "lazy/dies")
    shoal(tmp_path / "cold", "mount", "--prefetch", "none", "--fetch-timeout", "2", ref, mnt)
    randoms = sample["randoms"]
    assert isinstance(randoms, dict)
    assert (mnt / "sub" / "rand05").read_bytes() == randoms["sub/rand05"]
    reg.kill()  # connection refused from now on
    _eio_within(mnt / "sub" / "rand11", 5.0)
    assert (mnt / "sub" / "rand05").read_bytes() == randoms["sub/rand05"]  # cached data is still served
    reg.start()
    assert (mnt / "sub" / "rand11").read_bytes() == randoms["sub/rand11"]
    assert reg.proc is not None
    os.kill(reg.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        # within --fetch-timeout, not twice it: the kernel's retry of the failed read fails at once
        dt = _eio_within(mnt / "sub" / "rand10", 3.0)
        assert dt >= 1.5  # it did wait for the timeout
    finally:
        os.kill(reg.proc.pid, signal.SIGCONT)
    assert (mnt / "sub" / "rand10").read_bytes() == randoms["sub/rand10"]
    st = state_of(run_dir)
    log = Path(str(st["log"])).read_text()
    lines = [ln for ln in log.splitlines() if "read of /sub/rand10" in ln or "read of /sub/rand11" in ln]
    assert len(lines) >= 2 and all("returning EIO" in ln for ln in lines), log[-3000:]
    assert any("within 2s" in ln for ln in lines), log[-3000:]
    assert mount_stats(mnt)["source"]["timeouts"] >= 1
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, int(st["pid"]))  # type: ignore[call-overload]


def test_credentials_outlive_the_auth_file(sample: dict[str, object], token_registry: Registry,
                                           mnt: Path, run_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    reg = token_registry
    assert reg.token_server is not None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no auth file but the one given
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    creds = f"{reg.username}:{reg.password}"
    ref = _push(sample, reg.host, "lazy/auth", "--creds", creds)
    p = shoal(tmp_path / "c0", "mount", ref, mnt, check=False)
    helpers.assert_one_line_error(p, "auth", "denied", "401", "credentials")
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(creds.encode()).decode()}}}))
    shoal(tmp_path / "cold", "mount", "--prefetch", "none", "--authfile", authfile, ref, mnt)
    authfile.unlink()  # the daemon holds the credentials it was started with
    reg.token_server.log.clear()
    randoms = sample["randoms"]
    assert isinstance(randoms, dict)
    for rel, data in randoms.items():
        assert (mnt / rel).read_bytes() == data, rel
    assert any(e.get("account") == reg.username for e in reg.token_server.log)  # the daemon's own token
    pid = int(state_of(run_dir)["pid"])  # type: ignore[call-overload]
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, pid)


def test_prefetch_all_fills_the_store(sample: dict[str, object], remote: str, mnt: Path, run_dir: Path,
                                      tmp_path: Path) -> None:
    m, idx = _index(sample)
    cold = tmp_path / "cold"
    st = json.loads(shoal(cold, "mount", "--json", "--prefetch", "all", remote, mnt).stdout)
    wait_for(lambda: mount_stats(mnt)["prefetch_state"] == "done", 30, "prefetch")
    s = mount_stats(mnt)
    src = s["source"]
    assert s["prefetched_frames"] == s["prefetch_planned"] == len(idx.frames) and s["reads"] == 0
    assert src["frames_cached"] == len(idx.frames) and src["bytes_cached"] == src["bytes_total"]
    assert src["requests"] <= len(m.packs)  # back-to-back frames of a pack share one range request
    assert "prefetch done" in shoal(None, "status", mnt).stdout.decode()
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), helpers.tree_snapshot(Path(str(sample["unpacked"]))))
    assert mount_stats(mnt)["source"]["requests"] == src["requests"]  # every read came from the store
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, st["pid"])


def test_prefetch_auto_uses_the_registry_profile(sample: dict[str, object], registry: Registry,
                                                 mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    """A profile pushed as a referrer is found from a cold store, and exactly its frames are fetched."""
    from shoal.mount.profile import Profile, push_remote

    m, idx = _index(sample)
    ref = _push(sample, registry.host, "lazy/auto")
    prof = Profile.of_frames(m.digest, idx, [len(idx.frames) - 1, 0, len(idx.frames) // 2], 0.1, ("true",))
    push_remote(ref, {}, prof)
    cold = tmp_path / "cold"
    st = json.loads(shoal(cold, "mount", "--json", ref, mnt).stdout)
    wait_for(lambda: mount_stats(mnt)["prefetch_state"] == "done", 30, "prefetch")
    s = mount_stats(mnt)
    assert (s["profile_frames"], s["prefetched_frames"], s["reads"]) == (3, 3, 0)
    assert s["source"]["frames_cached"] == 3 and s["source"]["bytes_cached"] == prof.nbytes
    # fetched by `shoal mount` as soon as the profile was known, verified and stored by the daemon
    assert s["source"]["early_frames"] == 3 and s["source"]["requests"] == 0
    assert (cold / "profiles" / f"{m.digest[7:]}.json").exists()  # kept beside the image for next time
    shoal(None, "umount", mnt)
    _assert_gone(run_dir, mnt, st["pid"])
    # --prefetch none ignores it
    shoal(tmp_path / "cold2", "mount", "--prefetch", "none", ref, mnt)
    s = mount_stats(mnt)
    assert s["prefetch_state"] == "none" and s["source"]["frames_cached"] == 0
    shoal(None, "umount", mnt)
