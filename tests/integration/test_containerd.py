"""shoal snapshotter under a private containerd 1.6 (issue 11; docs/containerd.md).

A fixture starts ``shoal snapshotter`` and a containerd with its own root, state, socket and
namespace whose proxy plugin ``shoal`` points at the snapshotter; a loopback docker-registry holds
a classic image (``shoal export`` of a tiny tree: dash and its libraries).  Every process, mount and
directory is cleaned up.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import run_shoal, validate_oci  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401
from shoal.mediatypes import ARTIFACT_TYPE, OCI_INDEX, OCI_MANIFEST  # noqa: E402
from shoal.snapshotter.view import STUB_MEDIA_TYPE  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
    reason="needs root and containerd (apt-get install containerd)")

SHOAL = str(Path(sys.executable).parent / "shoal")
NS = "shoaltest"


def _tiny_tree(root: Path) -> None:
    """/bin/sh (dash) and the libraries it loads: enough for ``sh -c 'echo …'``."""
    out = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True, check=True).stdout
    libs = [p for line in out.splitlines() for p in line.split() if p.startswith("/")]
    for src in ["/bin/dash", *libs]:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dst)
    (root / "bin" / "dash").rename(root / "bin" / "sh")
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(exist_ok=True)


class Containerd:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.sock = work / "cd" / "containerd.sock"
        self.snap_sock = work / "snap" / "shoal.sock"
        self.snap_root = work / "snap" / "root"
        (work / "cd").mkdir(parents=True)
        (work / "snap").mkdir(parents=True)
        self.config = work / "cd" / "config.toml"
        self.config.write_text(f"""version = 2
root = "{work}/cd/lib"
state = "{work}/cd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[proxy_plugins.shoal]
  type = "snapshot"
  address = "{self.snap_sock}"
""")
        self.snap: subprocess.Popen[bytes] | None = None
        self.cd: subprocess.Popen[bytes] | None = None

    def start_snapshotter(self) -> None:
        env = dict(os.environ, SHOAL_STORE=str(self.work / "store"))
        self.snap = subprocess.Popen([SHOAL, "-vv", "snapshotter", "--address", str(self.snap_sock),
                                      "--root", str(self.snap_root)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.work / "snap.log", "ab"))
        _wait(lambda: self.snap_sock.exists(), "snapshotter socket")

    def start(self) -> None:
        self.start_snapshotter()
        self.cd = subprocess.Popen(["containerd", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=open(self.work / "containerd.log", "ab"))
        _wait(lambda: subprocess.run(["ctr", "-a", str(self.sock), "version"], capture_output=True).returncode == 0,
              "containerd")

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ctr", "-a", str(self.sock), "-n", NS, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr}\n"
                                 f"snapshotter log: {(self.work / 'snap.log').read_text()[-3000:]}")
        return p

    def stop(self) -> None:
        for p in (self.cd, self.snap):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid in os.listdir("/proc"):  # shims of this containerd (their command line has our socket)
            if pid.isdigit():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"containerd-shim" in cmd and str(self.sock).encode() in cmd:
                    os.kill(int(pid), signal.SIGKILL)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mp = line.split()[1]
            if mp.startswith(str(self.work)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(f"/run/containerd/runc/{NS}", ignore_errors=True)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come up in {timeout} s")


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


def _gets(reg: Registry) -> list[tuple[str, int]]:
    text = reg.log_path.read_text(errors="replace")
    return [(m[1], int(m[2])) for m in re.finditer(r'"GET (\S+) HTTP/[\d.]+" (\d+)', text)]


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
    gets = _gets(reg)[before:]
    whole = [(path, st) for path, st in gets if st == 200 and any(d in path for d in packs)]
    assert whole == [], gets  # packs are read by range (206) only, never whole
    assert any(st == 206 for _, st in gets), gets
    # the stub layer was never downloaded
    assert not any(path.endswith(stub["digest"]) for path, _ in gets)
    # removing the image releases the lazy mount
    containerd.ctr("images", "rm", "--sync", ref)
    assert str(mp) not in Path("/proc/mounts").read_text()
