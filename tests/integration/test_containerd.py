"""shoal snapshotter under a private containerd 1.6 (issue 11; docs/containerd.md).

A fixture starts ``shoal snapshotter`` and a containerd with its own root, state, socket and
namespace whose proxy plugin ``shoal`` points at the snapshotter; a loopback docker-registry holds
a classic image (``shoal export`` of a tiny tree: dash and its libraries).  Every process, mount and
directory is cleaned up.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from containerd_fix import NS, Containerd, gets, mounts_under, pids_with, published, tiny_tree, wait_for  # noqa: E402
from containerd_fix import tiny_tree as _tiny_tree  # noqa: E402

from helpers import run_shoal, validate_oci  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401
from shoal.mediatypes import ARTIFACT_TYPE, OCI_INDEX, OCI_MANIFEST  # noqa: E402
from shoal.snapshotter.remote import SHOAL_INDEX_LABEL  # noqa: E402
from shoal.snapshotter.view import STUB_MEDIA_TYPE  # noqa: E402
from shoal.store import Store  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
    reason="needs root and containerd (apt-get install containerd)")



@pytest.fixture()
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    cd = Containerd(tmp_path / "c")
    try:
        cd.start()
        yield cd
    finally:
        cd.stop()


@pytest.fixture()
def classic_image(tmp_path: Path, registry_factory: Callable[..., Registry]) -> tuple[Registry, str]:
    reg = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    _tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "export", "tiny:1", f"oci:{tmp_path / 'oci'}:tiny")
    ref = f"{reg.host}/classic:1"
    run_shoal(store, "copy", f"oci:{tmp_path / 'oci'}:tiny", f"docker://{ref}")
    return reg, ref


def test_classic_image_through_the_shoal_snapshotter(containerd: Containerd,
                                                     classic_image: tuple[Registry, str]) -> None:
    _, ref = classic_image
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "shoal", ref)
    out = containerd.ctr("run", "--snapshotter", "shoal", "--rm", ref, "t1", "/bin/sh", "-c", "echo hello-shoal")
    assert out.stdout.strip() == "hello-shoal"
    snaps = containerd.ctr("snapshots", "--snapshotter", "shoal", "ls").stdout
    assert "Committed" in snaps
    # remove the image; containerd's GC removes the snapshots through the snapshotter
    containerd.ctr("images", "rm", "--sync", ref)
    left = containerd.ctr("snapshots", "--snapshotter", "shoal", "ls").stdout.strip().splitlines()
    assert left[1:] == []
    assert sorted(os.listdir(containerd.snap_root / "snapshots")) == []


def _published(reg: Registry, repo: str, tag: str) -> tuple[str, dict, dict]:  # type: ignore[type-arg]
    """What ``shoal push`` wrote at ``repo:tag`` (oci-mapping.md §4): an image index listing the runtime
    view first, then the Shoal manifest.  Returns (Shoal manifest digest, Shoal manifest, view manifest)."""
    base = f"http://{reg.host}/v2/{repo}"
    with httpx.Client() as c:
        r = c.get(f"{base}/manifests/{tag}", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
        r.raise_for_status()
        index = json.loads(r.content)
        assert index["mediaType"] == OCI_INDEX, index
        validate_oci(index, "image-index-schema")
        view_e, shoal_e = index["manifests"]
        assert shoal_e["artifactType"] == ARTIFACT_TYPE and view_e["platform"]["os"] == "linux"
        assert shoal_e["platform"] == {"architecture": "unknown", "os": "unknown"}  # no runtime takes it
        docs = [json.loads(c.get(f"{base}/manifests/{e['digest']}", headers={"Accept": OCI_MANIFEST})
                           .raise_for_status().content) for e in (shoal_e, view_e)]
    for d in docs:
        validate_oci(d, "image-manifest-schema")
    return shoal_e["digest"], docs[0], docs[1]


_gets = gets


@pytest.mark.skipif(shutil.which("ctr-remote") is None, reason="needs ctr-remote (apt-get install stargz-snapshotter)")
def test_shoal_image_runs_lazily(containerd: Containerd, tmp_path: Path,
                                 registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    _tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "push", "tiny:1", f"docker://{reg.host}/app:1")  # the tag runtimes pull
    shoal_digest, shoal_doc, view_doc = _published(reg, "app", "1")
    packs = {d["digest"] for d in shoal_doc["layers"][1:]}
    (stub,) = view_doc["layers"]
    assert stub["mediaType"] == STUB_MEDIA_TYPE
    assert packs
    # the index, as a label for the snapshotter (it requests that blob beside the manifest)
    index = shoal_doc["layers"][0]
    assert stub["annotations"][SHOAL_INDEX_LABEL] == f"{index['digest']}:{index['size']}"
    ref = f"{reg.host}/app:1"
    # without the Shoal snapshotter (overlayfs): a fast, clear failure, and no pack is fetched
    before = len(_gets(reg))
    p = containerd.ctr("images", "pull", "--plain-http", ref, check=False)
    assert p.returncode != 0
    assert ("failed to get stream processor for application/vnd.oci.image.layer.shoal.v1: "
            "no processor for media-type") in p.stderr, p.stderr
    assert not any(d in path for path, _ in _gets(reg)[before:] for d in packs)
    assert not any(shoal_digest in path for path, _ in _gets(reg)[before:])  # not even the Shoal manifest
    containerd.ctr("images", "rm", "--sync", ref)
    before = len(_gets(reg))
    p = subprocess.run(["ctr-remote", "-a", str(containerd.sock), "-n", NS, "image", "rpull", "--plain-http",
                        "--snapshotter", "shoal", ref], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr + (containerd.work / "snap.log").read_text()[-3000:]
    out = containerd.ctr("run", "--snapshotter", "shoal", "--rm", ref, "t1", "/bin/sh", "-c", "echo hello-lazy")
    assert out.stdout.strip() == "hello-lazy"
    mp = containerd.snap_root / "mounts" / shoal_digest.removeprefix("sha256:")
    assert str(mp) in Path("/proc/mounts").read_text()
    # the lazy mounts are suid,dev and allow_other (any container uid): only root may reach them
    assert os.stat(mp.parent).st_mode & 0o777 == 0o700 and os.stat(containerd.snap_root).st_mode & 0o077 == 0
    gets = _gets(reg)[before:]
    whole = [(path, st) for path, st in gets if st == 200 and any(d in path for d in packs)]
    assert whole == [], gets  # packs are read by range (206) only, never whole
    assert any(st == 206 for _, st in gets), gets
    # the stub layer was never downloaded
    assert not any(path.endswith(stub["digest"]) for path, _ in gets)
    # removing the image releases the lazy mount, and what it cached in the store
    assert f"shoal-snapshotter:{shoal_digest.removeprefix('sha256:')}" in _store_holds(containerd.work / "store").tags
    containerd.ctr("images", "rm", "--sync", ref)
    assert str(mp) not in Path("/proc/mounts").read_text()
    _wait_empty(lambda: _store_holds(containerd.work / "store").problems(), "the store to empty")


@dataclass(frozen=True)
class _Held:
    """What a Shoal store holds: tags, blobs, partial packs, catalogued frames and chunks, profiles."""
    tags: set[str]
    blobs: set[str]
    partial: set[str]
    frames: set[tuple[str, int]]
    chunks: set[bytes]
    profiles: set[str]

    def problems(self) -> list[str]:
        return [f"{k}: {v}" for k, v in vars(self).items() if v]


def _store_holds(root: Path) -> _Held:
    s = Store.open(root)
    frames = {(p, off) for p in s.catalog.frame_packs() for off, _ in s.catalog.frames_overlapping(p, 0, 1 << 62)}
    profiles = root / "profiles"
    return _Held(set(s.layout.refs()), set(s.layout.all_blobs()), s.partial.packs(), frames,
                 {cid for cid, _ in s.catalog.rows()}, set(os.listdir(profiles)) if profiles.is_dir() else set())


def _wait_empty(problems: Callable[[], list[str]], what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while (left := problems()) and time.monotonic() < end:
        time.sleep(0.1)
    assert not left, f"{what}: {left}"


def _running(cd: Containerd, task: str) -> bool:
    return any(line.split()[:1] == [task] and "RUNNING" in line for line in cd.ctr("tasks", "ls").stdout.splitlines())


@pytest.mark.skipif(shutil.which("ctr-remote") is None, reason="needs ctr-remote (apt-get install stargz-snapshotter)")
def test_snapshotter_restart_and_cleanup_with_credentials(tmp_path: Path,
                                                          registry_factory: Callable[..., Registry],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 item 3 with an htpasswd registry: SIGKILL the gRPC server while a container runs;
    the container keeps running (its FUSE daemon is a separate process); a restarted snapshotter
    (same --root) still knows the old snapshots and serves new containers, mounting a new image
    with the credentials of ``shoal pull`` ($REGISTRY_AUTH_FILE); a lazy mount lost while it was
    down is mounted again on start; image removal + containerd's GC leave no mount and no daemon."""
    reg = registry_factory(auth="htpasswd", access_log=True)
    creds = (reg.username, reg.password)
    authfile = tmp_path / "auth.json"
    token = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    store = tmp_path / "store"
    digests = {}
    for name in ("one", "two"):
        tree = tmp_path / f"tree-{name}"
        tiny_tree(tree, extra=("/usr/bin/sleep",))
        (tree / "etc" / "name").write_text(name + "\n")
        run_shoal(store, "build", tree, f"{name}:1")
        run_shoal(store, "push", f"{name}:1", f"docker://{reg.host}/{name}:1")
        digests[name] = published(reg, name, "1", auth=creds)[0]
    ref1, ref2 = f"{reg.host}/one:1", f"{reg.host}/two:1"
    mp1, mp2 = (tmp_path / "c" / "snap" / "root" / "mounts" / digests[n].removeprefix("sha256:")
                for n in ("one", "two"))
    cd = Containerd(tmp_path / "c", snap_env={"REGISTRY_AUTH_FILE": str(authfile)})
    user = f"--user={reg.username}:{reg.password}"
    try:
        cd.start()
        cd.rpull(ref1, user)
        cd.ctr("run", "-d", "--snapshotter", "shoal", ref1, "sleeper", "/usr/bin/sleep", "30")
        wait_for(lambda: _running(cd, "sleeper"), "the sleeper task")
        cd.kill_snapshotter()
        # the container keeps running and its rootfs is still served by the FUSE daemon
        assert _running(cd, "sleeper")
        out = cd.ctr("tasks", "exec", "--exec-id", "e1", "sleeper", "/bin/sh", "-c",
                     "echo alive; read n </etc/name; echo $n")
        assert out.stdout.split() == ["alive", "one"]
        cd.start_snapshotter()
        wait_for(lambda: cd.ctr("snapshots", "--snapshotter", "shoal", "ls", check=False).returncode == 0,
                 "containerd reconnecting to the snapshotter")
        snaps = cd.ctr("snapshots", "--snapshotter", "shoal", "ls").stdout
        assert "sleeper" in snaps and "Committed" in snaps, snaps
        # a new container of the old image, and a new image mounted with the auth file's credentials
        out = cd.ctr("run", "--snapshotter", "shoal", "--rm", ref1, "t1", "/bin/sh", "-c", "read n </etc/name; echo $n")
        assert out.stdout.strip() == "one"
        cd.rpull(ref2, user)
        out = cd.ctr("run", "--snapshotter", "shoal", "--rm", ref2, "t2", "/bin/sh", "-c", "read n </etc/name; echo $n")
        assert out.stdout.strip() == "two"
        assert any(s == 206 and "/two/blobs/" in p for p, s in gets(reg)), gets(reg)
        # a lazy mount lost while the snapshotter is down (a reboot, a dead daemon) comes back on start
        cd.ctr("tasks", "kill", "-s", "KILL", "sleeper")
        wait_for(lambda: not _running(cd, "sleeper"), "the sleeper to stop")
        cd.ctr("tasks", "rm", "sleeper")
        cd.ctr("containers", "rm", "sleeper")
        cd.kill_snapshotter()
        subprocess.run(["umount", "-l", str(mp1)], check=True)
        wait_for(lambda: pids_with(str(mp1)) == [], "the FUSE daemon of the first image to exit")
        cd.start_snapshotter()
        assert mounts_under(str(mp1)) == [str(mp1)], (cd.work / "snap.log").read_text()[-2000:]
        wait_for(lambda: cd.ctr("snapshots", "--snapshotter", "shoal", "ls", check=False).returncode == 0,
                 "containerd reconnecting to the snapshotter")
        out = cd.ctr("run", "--snapshotter", "shoal", "--rm", ref1, "t3", "/bin/sh", "-c", "read n </etc/name; echo $n")
        assert out.stdout.strip() == "one"
        # image removal and containerd's GC release every lazy mount, its daemon and its store data;
        # the other image, still mounted, keeps its cache
        two = Store.open(cd.work / "store")
        m2 = two.manifest(digests["two"])
        idx2 = two.load_index(m2)
        own2 = {m2.digest, m2.config.digest, m2.index.digest, *(p.digest for p in m2.packs)}
        before = _store_holds(cd.work / "store")
        assert before.tags == {f"shoal-snapshotter:{d.removeprefix('sha256:')}" for d in digests.values()}, before
        assert digests["one"] in before.blobs and before.frames, before
        cd.ctr("images", "rm", "--sync", ref1)
        cd.ctr("content", "prune", "references")
        assert mounts_under(str(mp1)) == [], cd.log_tail()
        assert mounts_under(str(mp2)) == [str(mp2)]
        wait_for(lambda: pids_with(str(mp1)) == [], "the FUSE daemon of the first image to exit", timeout=10)

        def one_left() -> list[str]:
            now = _store_holds(cd.work / "store")
            locs2 = two.catalog.locate(idx2.chunk_ids).values()
            borrowed = {loc.pack for loc in locs2}
            # a pack the second image reads stays whole (its manifest lists it, or it lends it chunks), and
            # so do the rows of the first image's frames in it
            kept = own2 | borrowed
            return [f"{what}: {extra}" for what, extra in (
                ("tags", now.tags - {f"shoal-snapshotter:{digests['two'].removeprefix('sha256:')}"}),
                ("blobs", now.blobs - own2), ("partial packs", now.partial - own2 - borrowed),
                ("catalogue rows", [(cid.hex(), loc) for cid, loc in two.catalog.rows()
                                    if cid not in set(idx2.chunk_ids) and loc.pack not in kept]),
                ("lost frames of the second image", {f for f in before.frames if f[0] in own2} - now.frames),
                ("lost chunks of the second image", len((before.chunks & set(idx2.chunk_ids)) - now.chunks)),
            ) if extra]

        _wait_empty(one_left, "the first image's store data to go")
        assert digests["two"] in _store_holds(cd.work / "store").blobs
        cd.ctr("images", "rm", "--sync", ref2)
        cd.ctr("content", "prune", "references")
        assert mounts_under(str(mp2)) == [], cd.log_tail()
        wait_for(lambda: pids_with(str(mp2)) == [], "the FUSE daemon of the second image to exit", timeout=10)
        _wait_empty(lambda: _store_holds(cd.work / "store").problems(), "the store to empty")
        assert cd.ctr("snapshots", "--snapshotter", "shoal", "ls").stdout.strip().splitlines()[1:] == []
    finally:
        cd.stop()


@pytest.mark.skipif(shutil.which("ctr-remote") is None or shutil.which("runc") is None,
                    reason="needs ctr-remote (apt-get install stargz-snapshotter) and runc")
def test_recorded_profile_is_prefetched_on_the_containerd_path(containerd: Containerd, tmp_path: Path,
                                                                registry_factory: Callable[..., Registry]) -> None:
    """``shoal profile`` pushes a start-up profile as a referrer of the image; the snapshotter's lazy
    mount finds it and fetches its frames before the container reads anything."""
    from shoal.mount.profile import Profile

    reg = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    _tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "push", "tiny:1", f"docker://{reg.host}/prof:1")
    ref = f"{reg.host}/prof:1"
    workload = ("/bin/sh", "-c", "echo hello-profile")
    p = run_shoal(tmp_path / "pstore", "profile", "--json", f"docker://{ref}", "--", *workload,
                  stdin=subprocess.DEVNULL)
    summary = json.loads(p.stdout.decode().splitlines()[-1])
    assert summary["pushed"] and summary["frames"] > 0, summary
    m = Store.open(store).resolve("tiny:1")
    prof = Profile.decode(Path(summary["local"]).read_bytes(), m.digest, len(m.packs))
    before = len(gets(reg))
    containerd.rpull(ref)
    mp = containerd.snap_root / "mounts" / m.digest.removeprefix("sha256:")
    # the pull's Prepare started the lazy mount and answered; the mount comes up meanwhile
    wait_for(lambda: str(mp) in Path("/proc/mounts").read_text(), "the lazy mount the pull started")
    pulled = gets(reg)[before:]
    assert any("/prof/manifests/sha256-" in path for path, _ in pulled), pulled  # the referrers lookup

    def stats() -> dict:  # type: ignore[type-arg]
        rows = json.loads(run_shoal(None, "status", "--json", mp).stdout)["mounts"]
        return rows[0]["stats"]  # type: ignore[no-any-return]

    # the profile carries a bundle (docs/spec/bundle.md): the workload's chunks come with it, so only the
    # profile's frames holding none of them are fetched ahead (none for this tree), once the mount daemon
    # checked it (§6.1)
    assert summary["bundle_bytes"] > 0 and summary["bundle_chunks"] > 0, summary
    wait_for(lambda: stats().get("bundle_state") == "checked", "the bundle's check")
    wait_for(lambda: stats().get("prefetch_state") == "done", "the profile's prefetch")
    s = stats()
    assert s["prefetched_frames"] == s["profile_frames"] == len(prof.frames) and s["reads"] == 0, s
    assert s["source"]["bytes_fetched"] == 0, s
    ranges = len([1 for path, st in gets(reg) if st == 206])
    out = containerd.ctr("run", "--snapshotter", "shoal", "--rm", ref, "t1", *workload)
    assert out.stdout.strip() == "hello-profile"
    # the container read what the profile held: no range read of a pack while it ran
    assert len([1 for path, st in gets(reg) if st == 206]) == ranges, gets(reg)[before:]
    hexd = m.digest.removeprefix("sha256:")
    assert _store_holds(containerd.work / "store").profiles == {f"{hexd}.json", f"{hexd}.bundle"}
    containerd.ctr("images", "rm", "--sync", ref)  # the cached profile goes with the image's data
    _wait_empty(lambda: _store_holds(containerd.work / "store").problems(), "the store to empty")


@pytest.mark.skipif(shutil.which("ctr-remote") is None, reason="needs ctr-remote (apt-get install stargz-snapshotter)")
def test_hosts_toml_mirror_serves_the_lazy_mounts_range_reads(tmp_path: Path,
                                                               registry_factory: Callable[..., Registry]) -> None:
    """``--hosts-dir`` (containerd's config_path): DIR/<host>/hosts.toml names a pull-through mirror B of
    the image's registry A; the lazy mount reads its ranges from B, A serves no range."""
    a = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    _tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "push", "tiny:1", f"docker://{a.host}/app:1")
    b = registry_factory(proxy_remote=a.url, access_log=True)
    hosts = tmp_path / "certs.d"
    (hosts / a.host).mkdir(parents=True)
    (hosts / a.host / "hosts.toml").write_text(f'server = "http://{a.host}"\n[host."http://{b.host}"]\n'
                                               '  capabilities = ["pull", "resolve"]\n')
    cd = Containerd(tmp_path / "c", snap_args=("--hosts-dir", str(hosts)))
    try:
        cd.start()
        ref = f"{a.host}/app:1"
        cd.rpull(ref)
        out = cd.ctr("run", "--snapshotter", "shoal", "--rm", ref, "t1", "/bin/sh", "-c", "echo via-mirror")
        assert out.stdout.strip() == "via-mirror"
        assert any(st == 206 and "/app/blobs/" in path for path, st in gets(b)), gets(b)
        assert not any(st == 206 for _, st in gets(a)), gets(a)  # the mirror fetched whole blobs from A
        cd.ctr("images", "rm", "--sync", ref)
    finally:
        cd.stop()
