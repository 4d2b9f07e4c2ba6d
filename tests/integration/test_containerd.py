"""shoal snapshotter under a private containerd 1.6 (issue 11; docs/containerd.md).

A fixture starts ``shoal snapshotter`` and a containerd with its own root, state, socket and
namespace whose proxy plugin ``shoal`` points at the snapshotter; a loopback docker-registry holds
a classic image (``shoal export`` of a tiny tree: dash and its libraries).  Every process, mount and
directory is cleaned up.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401

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
