"""Shared fixture code for the containerd tests (test_containerd.py, test_cri.py; docs/containerd.md).

``Containerd`` is a private containerd 1.6 (own root, state, sockets; CRI off unless asked) whose
proxy plugin ``shoal`` points at a ``shoal snapshotter`` it starts; ``stop`` ends every process it
started (containerd, the snapshotter, the shims of this containerd, the FUSE daemons of its lazy
mounts) and unmounts everything under its work directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regfix import Registry  # noqa: E402
from shoal.mediatypes import ARTIFACT_TYPE, OCI_INDEX, OCI_MANIFEST  # noqa: E402

SHOAL = str(Path(sys.executable).parent / "shoal")
NS = f"shoaltest-{os.getpid()}"  # one per test process: xdist workers must not share runc state
CRI_NS = "k8s.io"


def tiny_tree(root: Path, extra: tuple[str, ...] = ()) -> None:
    """/bin/sh (dash), the ``extra`` binaries and the libraries they load: enough for ``sh -c 'echo …'``."""
    bins = ["/bin/dash", *extra]
    libs: list[str] = []
    for b in bins:
        out = subprocess.run(["ldd", b], capture_output=True, text=True, check=True).stdout
        libs += [p for line in out.splitlines() for p in line.split() if p.startswith("/")]
    for src in [*bins, *libs]:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dst)
    (root / "bin" / "dash").rename(root / "bin" / "sh")
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(exist_ok=True)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come up in {timeout} s")


def pids_with(needle: str) -> list[int]:
    """Processes whose command line contains ``needle``."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmd:
                out.append(int(pid))
    return out


def mounts_under(prefix: str) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)]


class Containerd:
    def __init__(self, work: Path, cri_config: str = "", snap_env: dict[str, str] | None = None,
                 snap_args: tuple[str, ...] = ()) -> None:
        self.work = work
        self.sock = work / "cd" / "containerd.sock"
        self.snap_sock = work / "snap" / "shoal.sock"
        self.snap_root = work / "snap" / "root"
        self.snap_env = snap_env or {}
        self.snap_args = snap_args  # more `shoal snapshotter` options
        (work / "cd").mkdir(parents=True)
        (work / "snap").mkdir(parents=True)
        self.config = work / "cd" / "config.toml"
        disabled = "" if cri_config else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        self.config.write_text(f"""version = 2
root = "{work}/cd/lib"
state = "{work}/cd/state"
{disabled}[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[proxy_plugins.shoal]
  type = "snapshot"
  address = "{self.snap_sock}"
{cri_config}""")
        self.snap: subprocess.Popen[bytes] | None = None
        self.cd: subprocess.Popen[bytes] | None = None

    def start_snapshotter(self) -> None:
        env = dict(os.environ, SHOAL_STORE=str(self.work / "store"), **self.snap_env)
        if self.snap_sock.exists():
            self.snap_sock.unlink()
        self.snap = subprocess.Popen([SHOAL, "-vv", "snapshotter", "--address", str(self.snap_sock),
                                      "--root", str(self.snap_root), *self.snap_args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.work / "snap.log", "ab"))
        wait_for(lambda: self.snap_sock.exists(), "snapshotter socket")
        if self.cd is not None:
            # a restart: containerd redials the proxy snapshotter with gRPC's backoff, and a call made
            # before it has (e.g. the snapshot gc after RemoveImage) fails with "connection refused".
            # Preparing a snapshot reaches the snapshotter (`ls` and `usage` are answered from containerd's
            # metadata).
            wait_for(self._snapshotter_reached, "containerd to reach the snapshotter again")

    def _snapshotter_reached(self) -> bool:
        key = f"shoal-test-probe-{time.monotonic_ns()}"
        if self.ctr("snapshots", "--snapshotter", "shoal", "prepare", key, check=False, timeout=10).returncode:
            return False
        self.ctr("snapshots", "--snapshotter", "shoal", "rm", key, timeout=10)
        return True

    def kill_snapshotter(self) -> None:
        assert self.snap is not None
        self.snap.send_signal(signal.SIGKILL)
        self.snap.wait()

    def start(self) -> None:
        self.start_snapshotter()
        self.cd = subprocess.Popen(["containerd", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=open(self.work / "containerd.log", "ab"))
        wait_for(lambda: subprocess.run(["ctr", "-a", str(self.sock), "version"],
                                        capture_output=True).returncode == 0, "containerd")

    def log_tail(self) -> str:
        def tail(name: str) -> str:  # a log the test did not make (the quickstart starts its own processes)
            f = self.work / name
            return f.read_text(errors="replace")[-3000:] if f.exists() else "(none)"

        return f"snapshotter log: {tail('snap.log')}\ncontainerd log: {tail('containerd.log')}"

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, ns: str = NS
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ctr", "-a", str(self.sock), "-n", ns, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr}\n{self.log_tail()}")
        return p

    def rpull(self, ref: str, *extra: str) -> None:
        p = subprocess.run(["ctr-remote", "-a", str(self.sock), "-n", NS, "image", "rpull", "--plain-http",
                            "--snapshotter", "shoal", *extra, ref], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr + self.log_tail()

    def stop(self) -> None:
        for p in (self.cd, self.snap):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid in pids_with(str(self.sock)):  # shims of this containerd (their command line has our socket)
            os.kill(pid, signal.SIGKILL)
        for mp in reversed(mounts_under(str(self.work))):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        for pid in pids_with(str(self.snap_root / "mounts")):  # FUSE daemons of lazy mounts left behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(f"/run/containerd/runc/{NS}", ignore_errors=True)
        try:
            os.rmdir(f"/run/containerd/runc/{CRI_NS}")  # only if empty: other containerds may use k8s.io
        except OSError:
            pass


def published(reg: Registry, repo: str, tag: str, auth: tuple[str, str] | None = None) -> tuple[str, str]:
    """What ``shoal push`` wrote at ``repo:tag`` (oci-mapping.md §4), an image index: the digests of the
    Shoal manifest and of the runtime view's stub layer."""
    base = f"http://{reg.host}/v2/{repo}"
    with httpx.Client(auth=auth) as c:
        r = c.get(f"{base}/manifests/{tag}", headers={"Accept": OCI_INDEX})
        r.raise_for_status()
        entries = json.loads(r.content)["manifests"]
        shoal = next(e["digest"] for e in entries if e.get("artifactType") == ARTIFACT_TYPE)
        view = next(e["digest"] for e in entries if e.get("artifactType") != ARTIFACT_TYPE)
        r = c.get(f"{base}/manifests/{view}", headers={"Accept": OCI_MANIFEST})
        r.raise_for_status()
        return shoal, json.loads(r.content)["layers"][0]["digest"]


def pack_digests(reg: Registry, repo: str, shoal_digest: str, auth: tuple[str, str] | None = None) -> set[str]:
    r = httpx.get(f"http://{reg.host}/v2/{repo}/manifests/{shoal_digest}", headers={"Accept": OCI_MANIFEST},
                  auth=auth)
    return {d["digest"] for d in json.loads(r.content)["layers"][1:]}


def gets(reg: Registry) -> list[tuple[str, int]]:
    """(path, status) of every GET in the registry's access log."""
    text = reg.log_path.read_text(errors="replace")
    return [(m[1], int(m[2])) for m in re.finditer(r'"GET (\S+) HTTP/[\d.]+" (\d+)', text)]
