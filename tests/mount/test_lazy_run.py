"""A real Debian image straight from a registry: lazy mount equals ``unpack``, ``shoal run docker://``
runs it, ``shoal profile`` records a start-up profile and its bundle as a referrer, ``--prefetch auto``
in a cold store serves the workload from the bundle, and without the bundle fetches exactly the
profiled frames."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mountkit import mounts_under, pid_alive, shoal, wait_for  # noqa: E402

import helpers  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401

pytestmark = pytest.mark.slow

PROFILE, BUNDLE = "application/vnd.shoal.profile.v1+json", "application/vnd.shoal.bundle.v1"
WORKLOAD = ("sh", "-c", "cat /etc/os-release > /dev/null; ls -l /usr/bin > /dev/null; echo hi")


@pytest.fixture(scope="module")
def debian_remote(debian_rootfs: Path, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """bookworm minbase built, pushed as docker://HOST/lazy/debian:12, and unpacked for comparison."""
    from shoal.build import BuildOptions, build
    from shoal.format.manifest import ImageConfig
    from shoal.store import Store

    d = tmp_path_factory.mktemp("lazy-debian")
    conf = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]}
    st = Store.open(d / "store")
    build(st, debian_rootfs, "debian:12", BuildOptions(workers=2, config=ImageConfig(config=conf)))
    ref = f"docker://{registry.host}/lazy/debian:12"
    shoal(d / "store", "push", "debian:12", ref)
    shoal(d / "store", "unpack", "debian:12", d / "unpacked")
    m = st.resolve("debian:12")
    return {"ref": ref, "unpacked": d / "unpacked", "manifest": m, "index": st.load_index(m), "dir": d}


def _stats(mnt: Path) -> dict[str, Any]:
    time.sleep(1.2)
    rows = json.loads(shoal(None, "status", "--json", mnt).stdout)["mounts"]
    assert len(rows) == 1
    s = rows[0]["stats"]
    assert isinstance(s, dict)
    return s


def _clean(run_dir: Path) -> None:
    assert not mounts_under(run_dir)
    assert not list((run_dir / "mounts").glob("*.json")) if (run_dir / "mounts").exists() else True
    containers = run_dir / "containers"
    assert not containers.exists() or not list(containers.iterdir())


def test_lazy_debian_matches_unpack(debian_remote: dict[str, Any], mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    st = json.loads(shoal(tmp_path / "cold", "mount", "--json", debian_remote["ref"], mnt).stdout)
    helpers.assert_same_tree(helpers.tree_snapshot(mnt), helpers.tree_snapshot(debian_remote["unpacked"]))
    s = _stats(mnt)
    assert s["errors"] == 0 and s["source"]["failures"] == 0
    assert s["source"]["frames_cached"] == s["source"]["frames_total"] == len(debian_remote["index"].frames)
    shoal(None, "umount", mnt)
    wait_for(lambda: not pid_alive(st["pid"]), 5, "daemon exit")
    _clean(run_dir)


def _needs_runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")


def test_run_docker_ref_prints_hi(debian_remote: dict[str, Any], run_dir: Path, tmp_path: Path) -> None:
    _needs_runc()
    p = shoal(tmp_path / "cold", "run", "--rm", debian_remote["ref"], "--", "sh", "-c", "echo hi",
              stdin=open(os.devnull, "rb"), check=False)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"hi\n", b"")
    _clean(run_dir)


def test_profile_then_prefetch_auto(debian_remote: dict[str, Any], mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    _needs_runc()
    from shoal.mount.profile import Profile
    from shoal.transports.registry import RegistryClient, referrers_tag

    ref, m, idx = debian_remote["ref"], debian_remote["manifest"], debian_remote["index"]
    p = shoal(tmp_path / "s1", "profile", "--json", ref, "--", *WORKLOAD, stdin=open(os.devnull, "rb"))
    out = p.stdout.decode().splitlines()
    assert out[0] == "hi"  # the workload's own output comes through
    summary = json.loads(out[1])
    helpers.check_json_shape("profile", summary)
    assert summary["exit_code"] == 0 and summary["image"] == m.digest and summary["pushed"]
    assert 0 < summary["frames"] < len(idx.frames) and 0 < summary["bytes"] < summary["image_bytes"] / 4
    local = Path(summary["local"])
    assert local == tmp_path / "s1" / "profiles" / f"{m.digest[7:]}.json"
    prof = Profile.decode(local.read_bytes(), m.digest, len(idx.packs))
    assert prof.command == WORKLOAD and len(prof.frames) == summary["frames"]
    frames = prof.frame_indices(idx)
    assert frames is not None
    # the referrer artifact: subject = the image, listed in the tag-schema index (no referrers API)
    host, repo = ref[len("docker://"):].split("/", 1)
    repo = repo.rsplit(":", 1)[0]
    with RegistryClient(host) as c:
        index_type = "application/vnd.oci.image.index.v1+json"
        entries = json.loads(c.get_manifest(repo, referrers_tag(m.digest), [index_type])[0])
        assert summary["pushed"] in [e["digest"] for e in entries["manifests"]]
        art = json.loads(c.get_manifest(repo, summary["pushed"])[0])
        assert art["subject"]["digest"] == m.digest and art["artifactType"] == "application/vnd.shoal.profile.v1+json"
        assert helpers.published_shoal_digest(host, repo, "12") == m.digest  # the image itself is unchanged
        # its bundle (docs/spec/bundle.md) is a second layer, named by an annotation
        assert [ly["mediaType"] for ly in art["layers"]] == [PROFILE, BUNDLE]
        assert art["annotations"]["dev.shoal.bundle.blob"] == f"{art['layers'][1]['digest']}:{summary['bundle_bytes']}"
    assert 0 < summary["bundle_bytes"] < summary["bytes"] and summary["bundle_chunks"] > 0
    assert (tmp_path / "s1" / "profiles" / f"{m.digest[7:]}.bundle").stat().st_size == summary["bundle_bytes"]
    _clean(run_dir)
    # a cold store: the profile and its bundle come from the registry; the bundle holds a chunk of every
    # profiled frame, so nothing is fetched (the prefetch leaves them all out once the daemon checked it)
    cold = tmp_path / "s2"
    st = json.loads(shoal(cold, "mount", "--json", "--prefetch", "auto", ref, mnt).stdout)
    wait_for(lambda: _stats(mnt)["bundle_state"] == "checked", 30, "bundle check")
    s = _stats(mnt)
    assert s["profile_frames"] == s["prefetched_frames"] == len(frames) and s["reads"] == 0
    assert s["source"]["frames_cached"] == 0 and s["source"]["bytes_fetched"] == 0
    shoal(None, "umount", mnt)
    wait_for(lambda: not pid_alive(st["pid"]), 5, "daemon exit")
    assert (cold / "profiles" / f"{m.digest[7:]}.bundle").stat().st_size == summary["bundle_bytes"]
    # and the workload runs from the bundle: not one frame is fetched
    p = shoal(cold, "run", "--rm", ref, "--", *WORKLOAD, stdin=open(os.devnull, "rb"))
    assert p.stdout == b"hi\n"
    from shoal.store import Store

    store = Store.open(cold)
    have = {fi for fi, f in enumerate(idx.frames) if store.has_frame("sha256:" + idx.packs[f.pack].hex(), f.offset)}
    assert have == set()
    _clean(run_dir)
    # without the bundle (a store holding the profile alone), exactly the profile's frames are prefetched
    bare = tmp_path / "s3"
    (bare / "profiles").mkdir(parents=True)
    shutil.copy(local, bare / "profiles" / local.name)
    st = json.loads(shoal(bare, "mount", "--json", "--prefetch", "auto", ref, mnt).stdout)
    wait_for(lambda: _stats(mnt)["prefetch_state"] == "done", 60, "prefetch")
    s = _stats(mnt)
    assert s["profile_frames"] == s["prefetched_frames"] == len(prof.frames) and s["reads"] == 0
    assert s["source"]["frames_cached"] == len(prof.frames) and s["source"]["bytes_cached"] == prof.nbytes
    assert s["source"]["early_frames"] == len(prof.frames)  # fetched during start-up, handed to the daemon
    shoal(None, "umount", mnt)
    wait_for(lambda: not pid_alive(st["pid"]), 5, "daemon exit")
    # and the workload now runs without fetching anything the profile did not hold
    p = shoal(bare, "run", "--rm", "--prefetch", "none", ref, "--", *WORKLOAD, stdin=open(os.devnull, "rb"))
    assert p.stdout == b"hi\n"
    store = Store.open(bare)
    have = {fi for fi, f in enumerate(idx.frames) if store.has_frame("sha256:" + idx.packs[f.pack].hex(), f.offset)}
    assert set(frames) <= have
    extra = have - set(frames)
    assert len(extra) <= max(2, len(prof.frames) // 10), sorted(extra)  # at most a little read-ahead
    _clean(run_dir)
