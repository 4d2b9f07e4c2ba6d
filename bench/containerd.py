#!/usr/bin/env python3
"""Lazy start under containerd: time to a container's first output and registry bytes fetched by then,
Shoal's snapshotter against overlayfs with the classic image and against the stargz snapshotter with
optimized eStargz, all of the same tree, measured in one run, through CRI (the kubelet's calls) by default.

Usage: python bench/containerd.py [--via cri|ctr] [--tree DIR] [--reps N] [--links loopback,throttled]
                                  [--mbit 100] [--latency-ms 20] [--modes shoal,overlayfs,stargz]

The tree is debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE).  One loopback
docker-registry (its storage cached in $SHOAL_BENCH_CACHE/containerd/registry) holds:
- the classic image: one gzip layer made by umoci from the tree, pushed with skopeo (made once);
- the optimized eStargz image: ``ctr-remote image optimize --oci --period 10 --entrypoint
  '["python3","-c","print(1)"]'`` of the classic one (made once; ../shared/recipes/estargz-peer.md §4);
- the CRI sandbox image ``pause:1`` (made once, as tests/integration/test_cri.py makes its own: dash,
  ``sleep`` and their libraries, ``shoal build`` + ``shoal export`` + ``shoal copy``, a classic image);
- the Shoal image: ``shoal build`` + ``shoal push`` (every run), its containerd view
  (docs/spec/oci-mapping.md §4) and a ``shoal profile`` of the workload pushed as a referrer (the
  counterpart of eStargz's optimization; the snapshotter's ``shoal mount`` uses it, ``--prefetch auto``).
Every workload image is pulled through bench/throttle.py: on "loopback" with no limit and no added
latency (it only counts), then ("throttled") at ``--mbit`` + ``--latency-ms`` per request.

The stargz snapshotter daemon (0.12.0) is built on demand, offline, from bench/peers/stargz-grpc/main.go
and Debian's library sources into $SHOAL_BENCH_CACHE/stargz-grpc (needs golang-go and
golang-github-containerd-stargz-snapshotter-dev); it takes the layer source from CRI's labels or from
ctr-remote's; its defaults apply (background fetch on, which starts after 5 s without reads, so after
the output).

Each run is cold: a fresh containerd root and state, a fresh snapshotter root (Shoal: and store cache),
``sync`` and ``echo 3 > /proc/sys/vm/drop_caches`` just before the clock starts.

``--via cri`` (default): containerd 1.6 with its CRI plugin (docs/containerd.md "CRI": restrict_oom_score_adj,
``sandbox_image`` = the registry's pause:1, ``snapshotter`` = "shoal" | "overlayfs" | "stargz",
``disable_snapshot_annotations = false``, ``registry.config_path`` with a plain-HTTP hosts.toml for the
registry and for the throttle proxy), driven by the CRI v1 client of tests/cri (stubs generated at run
time).  Untimed, before the caches are dropped: the sandbox image is pulled with CRI PullImage straight
from the registry (not through the proxy), so it is warm, and not counted, in every mode.  Timed: from
just before ``PullImage(REF)`` through ``RunPodSandbox`` (host network, no hostname), ``CreateContainer``
(command ``python3 -c 'print(1)'``, a CRI log file) and ``StartContainer`` to the moment the container's
CRI log file is first non-empty (its size polled every 2 ms from StartContainer's return; containerd
writes the line ``<time> stdout F 1`` as it reads the shim's stdout).  "pull" is the PullImage call.
Untimed after: the container's exit (code 0 and the log line checked), StopPodSandbox, RemovePodSandbox.
The image refs go through the proxy (``PROXY/shoal/py:1``, ``PROXY/classic/py:1``, ``PROXY/esgz/py:opt``).

``--via ctr``: containerd without CRI (namespace ``shoalbench``), timed to the first byte on the
container's stdout (the ``ctr run`` pipe):
- shoal:     ``ctr-remote image rpull --plain-http --snapshotter shoal REF`` + ``ctr run --snapshotter shoal``
- overlayfs: ``ctr images pull --plain-http REF`` + ``ctr run`` (the classic image)
- stargz:    ``ctr-remote image rpull --plain-http REF`` + ``ctr run --snapshotter stargz`` (optimized eStargz)

Bytes are every response body (and request body) that crossed the proxy by the first output: manifests,
configs, blobs, ranges, referrers.  The modes alternate within each repetition; the median is shown.
Every process started here (containerd, shims, their containers, the snapshotters, their FUSE daemons)
and every mount under the work directory is gone at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, compile_bytecode, rootfs, row, sh, tree_bytes  # noqa: E402
from pull import SKOPEO_HTTP, Registry  # noqa: E402
from throttle import Throttle  # noqa: E402

# every `shoal` started here runs this checkout's src (a worktree's) with this interpreter, not whatever
# checkout the venv's console script was installed from
SHOAL = str(Path(__file__).resolve().parent / "shoal.sh")
_SRC = str(Path(__file__).resolve().parent.parent / "src")
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _SRC:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)
os.environ["SHOAL_BENCH_PYTHON"] = sys.executable
SNAPSHOTTER_VERBOSE = os.environ.get("SHOAL_BENCH_SNAPSHOTTER_V", "")  # e.g. "-vv": its timeline in logs/shoal.log
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CMD = ["python3", "-c", "print(1)"]
NS = "shoalbench"
CRI_NS = "k8s.io"
HERE = Path(__file__).parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS / "integration"))
from containerd_fix import pids_with, tiny_tree  # noqa: E402  (the tests' process finder and pause tree)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
STUB_MEDIA_TYPE = "application/vnd.oci.image.layer.shoal.v1"
MODES = ("shoal", "overlayfs", "stargz")


@dataclass(frozen=True)
class Sample:
    seconds: float  # to the first byte of output
    bytes: int  # through the proxy by then
    requests: int
    pull: float  # of which the pull (rpull, images pull or CRI PullImage)
    pod: float = 0.0  # CRI: from the start to RunPodSandbox's return
    create: float = 0.0  # CRI: from the start to CreateContainer's return
    started: float = 0.0  # CRI: from the start to StartContainer's return
    wall0: float = 0.0  # time.time() at the start (to place the snapshotter's log lines)


# ------------------------------------------------------------------------------------ the peer daemon


def stargz_daemon() -> Path:
    """containerd-stargz-grpc built from bench/peers/stargz-grpc/main.go (offline, GOPATH mode), cached."""
    d = CACHE / "stargz-grpc"
    binary = d / "bin" / "containerd-stargz-grpc"
    src = HERE / "peers" / "stargz-grpc" / "main.go"
    built = d / "gobuild" / "src" / "stargz-grpc" / "main.go"
    if binary.exists() and built.exists() and built.read_bytes() == src.read_bytes():
        return binary
    lib = Path("/usr/share/gocode/src/github.com/containerd/stargz-snapshotter")
    if not shutil.which("go") or not lib.is_dir():
        sys.exit("the stargz peer needs: apt-get install golang-go golang-github-containerd-stargz-snapshotter-dev")
    print("[setup] go build containerd-stargz-grpc (1-3 min) ...", file=sys.stderr)
    built.parent.mkdir(parents=True, exist_ok=True)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, built)
    env = {**os.environ, "GOPATH": f"{d / 'gobuild'}:/usr/share/gocode", "GO111MODULE": "off", "GOFLAGS": "",
           "GOPROXY": "off", "GOCACHE": str(d / "gocache")}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=built.parent, env=env, check=True)
    return binary


# ------------------------------------------------------------------------------------ private containerd


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise SystemExit(f"{what} did not come up in {timeout:g} s")


class Node:
    """containerd 1.6 with proxy plugins ``shoal`` and ``stargz``, and at most one of those daemons,
    all under ``root``; with ``cri``, its CRI plugin set to one snapshotter; ``reset`` makes everything
    cold (../shared/recipes/estargz-peer.md §5)."""

    def __init__(self, root: Path, stargz: Path, cri: bool = False, pause: str = "") -> None:
        self.root, self.stargz, self.cri, self.pause = root, stargz, cri, pause
        self.sock = root / "cd" / "containerd.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = root.parent / "logs"
        self.logs.mkdir(exist_ok=True)
        self.hosts: tuple[str, ...] = ()  # registries CRI reaches over plain HTTP (hosts.toml)

    def _cri_config(self, snapshotter: str) -> str:
        """docs/containerd.md "CRI", with a hosts.toml per plain-HTTP registry."""
        certs = self.root / "certs.d"
        for host in self.hosts:
            (certs / host).mkdir(parents=True, exist_ok=True)
            (certs / host / "hosts.toml").write_text(
                f'server = "http://{host}"\n[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n')
        return f"""[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{self.pause}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"""

    def _config(self, snapshotter: str) -> Path:
        cfg = self.root / "cd" / "config.toml"
        cri = self._cri_config(snapshotter) if self.cri else ""
        disabled = "" if self.cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        cfg.write_text(f"""version = 2
root = "{self.root}/cd/lib"
state = "{self.root}/cd/state"
{disabled}[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[proxy_plugins.shoal]
  type = "snapshot"
  address = "{self.root}/snap/shoal.sock"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "{self.root}/sgz/stargz.sock"
{cri}""")
        return cfg

    def _log(self, name: str) -> Any:
        return open(self.logs / name, "ab")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SHOAL_STORE": str(self.root / "store"), "SHOAL_RUN_DIR": str(self.root / "run")}

    def start(self, snapshotter: str) -> None:
        """Start the snapshotter's daemon (none for "overlayfs"), then containerd."""
        for d in ("cd", "snap", "sgz"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if snapshotter == "shoal":
            sock = self.root / "snap" / "shoal.sock"
            self.procs.append(subprocess.Popen(
                [SHOAL, *([SNAPSHOTTER_VERBOSE] if SNAPSHOTTER_VERBOSE else []), "snapshotter", "--address", str(sock),
                 "--root", str(self.root / "snap" / "root")],
                env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log("shoal.log")))
            _wait(sock.exists, "shoal snapshotter")
        elif snapshotter == "stargz":
            sock = self.root / "sgz" / "stargz.sock"
            self.procs.append(subprocess.Popen(
                [str(self.stargz), "--address", str(sock), "--root", str(self.root / "sgz" / "lib"),
                 "--log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log("stargz.log")))
            _wait(sock.exists, "stargz snapshotter")
        self.procs.append(subprocess.Popen(["containerd", "--config", str(self._config(snapshotter))],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=self._log("containerd.log")))
        _wait(lambda: subprocess.run(["ctr", "-a", str(self.sock), "version"], capture_output=True).returncode == 0,
              "containerd")

    def _runc_leftovers(self) -> None:
        """CRI's pods and containers of this containerd still known to runc (a failed or interrupted run),
        killed and deleted by id: those with a bundle in our state directory (also half-created ones,
        which runc holds as a bare directory with ``exec.fifo``) or whose runc state names it."""
        rroot = Path("/run/containerd/runc") / CRI_NS
        if not rroot.is_dir():
            return
        bundles = self.root / "cd" / "state" / "io.containerd.runtime.v2.task" / CRI_NS
        ids = {b.name for b in bundles.iterdir()} if bundles.is_dir() else set()
        for st in rroot.glob("*/state.json"):
            try:
                if str(self.root).encode() in st.read_bytes():
                    ids.add(st.parent.name)
            except OSError:
                continue
        for cid in sorted(ids):
            subprocess.run(["runc", "--root", str(rroot), "delete", "--force", cid], capture_output=True)
            if (rroot / cid).is_dir() and not (rroot / cid / "state.json").exists():
                shutil.rmtree(rroot / cid, ignore_errors=True)
        try:
            rroot.rmdir()  # only if empty: another containerd may use k8s.io
        except OSError:
            pass

    def stop(self) -> None:
        for p in reversed(self.procs):  # containerd first, then the snapshotter
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        for pid in pids_with(str(self.sock)):  # shims of this containerd (their command line has our socket)
            os.kill(pid, signal.SIGKILL)
        self._runc_leftovers()
        umount_all(self.root)
        for pid in pids_with(str(self.root)):  # FUSE daemons of lazy mounts (shoal mount) left behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(f"/run/containerd/runc/{NS}", ignore_errors=True)

    def reset(self, snapshotter: str) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        self.start(snapshotter)

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "-a", str(self.sock), "-n", NS, *args]

    def ctr_remote(self, *args: str) -> list[str]:
        return ["ctr-remote", "-a", str(self.sock), "-n", NS, *args]


def run_marks(run_dir: Path, bundle: str, t0: float, marks: dict[str, float]) -> None:
    """One look (for a watcher thread): the time since ``t0`` when a mount under ``run_dir`` first appears
    ("mount") and when runc first runs the container whose bundle path is ``bundle`` ("runtime")."""
    if "mount" not in marks:
        with open("/proc/self/mountinfo") as f:
            if any(ln.split()[4].startswith(str(run_dir) + "/") for ln in f):
                marks["mount"] = time.perf_counter() - t0
    if "runtime" not in marks:
        for pid in pids_with(bundle):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"runc"):
                    marks["runtime"] = time.perf_counter() - t0
            except OSError:
                pass


def umount_all(root: Path) -> None:
    for _ in range(3):
        with open("/proc/self/mountinfo") as f:
            mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root) + "/")]
        if not mps:
            return
        for mp in sorted(mps, key=len, reverse=True):
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)


# ------------------------------------------------------------------------------------ images


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(cmd, capture_output=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")
    return p


def has_image(reg: Registry, ref: str) -> bool:
    """Whether the registry holds ``ref`` (``repo:tag``)."""
    import httpx

    repo, tag = ref.rsplit(":", 1)
    return httpx.head(f"http://{reg.host}/v2/{repo}/manifests/{tag}",
                      headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}).is_success


def classic_image(tree: Path, reg: Registry, work: Path) -> str:
    """The classic image (one gzip layer, umoci + skopeo) in the cached registry, made once; its ref."""
    ref = "classic/py:1"
    if has_image(reg, ref):
        return ref
    print("[setup] classic image (umoci) ...", file=sys.stderr)
    lay, b1 = work / "classic", work / "classic-bundle"
    sh(f"umoci init --layout {lay} && umoci new --image {lay}:py && umoci unpack --image {lay}:py {b1}")
    sh(f"rmdir {b1}/rootfs && cp -a {tree} {b1}/rootfs && umoci repack --image {lay}:py {b1}")
    sh(f"umoci config --image {lay}:py --config.env {PATH_ENV} --config.cmd /bin/sh")
    sh(f"skopeo copy -q {' '.join(SKOPEO_HTTP)} oci:{lay}:py docker://{reg.host}/{ref}")
    shutil.rmtree(b1)
    return ref


def estargz_image(reg: Registry, node: Node, tag: str, cmd: list[str] | None) -> str:
    """``esgz/py:TAG``, the classic image converted by ``ctr-remote image optimize --oci``: optimized for
    ``cmd`` (``--period 10 --entrypoint CMD``), or with ``cmd`` None not optimized (``--no-optimize``);
    made once into the cached registry (../shared/recipes/estargz-peer.md §4); its ref."""
    ref = f"esgz/py:{tag}"
    if has_image(reg, ref):
        return ref
    what = f"optimized for {' '.join(cmd)}" if cmd else "not optimized"
    print(f"[setup] eStargz {ref}, {what} (ctr-remote image optimize, 1-6 min) ...", file=sys.stderr)
    node.reset("overlayfs")
    src, dst = f"{reg.host}/classic/py:1", f"{reg.host}/{ref}"
    run(node.ctr("content", "fetch", "--plain-http", src))
    how = ["--period", "10", "--entrypoint", json.dumps(cmd)] if cmd else ["--no-optimize"]
    run(node.ctr_remote("image", "optimize", "--oci", *how, src, dst), timeout=1800)
    run(node.ctr("images", "push", "--plain-http", dst))
    node.stop()
    return ref


def peer_images(tree: Path, reg: Registry, node: Node, work: Path) -> None:
    """The classic image and its optimized eStargz (for CMD), made once into the cached registry storage."""
    classic_image(tree, reg, work)
    estargz_image(reg, node, "opt", CMD)


def shoal_image(tree: Path, reg: Registry, work: Path, cmd: list[str] | None = CMD) -> str:
    """Build and push the Shoal image, publish its containerd view, record a profile of ``cmd`` (none
    if None); the view's ref."""
    import httpx

    from shoal.snapshotter.view import containerd_view

    store = work / "s0"
    run([SHOAL, "--store", str(store), "build", str(tree), "py:1", "--env", PATH_ENV, "--cmd", "python3"])
    run([SHOAL, "--store", str(store), "push", "py:1", f"docker://{reg.host}/shoal/py:1"])
    base = f"http://{reg.host}/v2/shoal/py"
    with httpx.Client() as c:
        r = c.get(f"{base}/manifests/1", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}).raise_for_status()
        doc = json.loads(r.content)
        if doc.get("mediaType") == OCI_INDEX or doc["layers"][0]["mediaType"] == STUB_MEDIA_TYPE:
            tag = "1"  # `shoal push` published it (an index of the Shoal manifest and the view; or the view)
        else:  # publish it the way tests/integration/test_containerd.py does
            tag = "ctr"
            cfg = c.get(f"{base}/blobs/{json.loads(r.content)['config']['digest']}").raise_for_status().content
            view = containerd_view(r.headers["Docker-Content-Digest"], cfg)
            for digest, blob in view.blobs().items():
                loc = c.post(f"{base}/blobs/uploads/").raise_for_status().headers["Location"]
                c.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", content=blob).raise_for_status()
            c.put(f"{base}/manifests/{tag}", content=view.manifest,
                  headers={"Content-Type": OCI_MANIFEST}).raise_for_status()
    if cmd is not None:
        record_profile(reg, work, cmd)
    return f"shoal/py:{tag}"


def record_profile(reg: Registry, work: Path, cmd: list[str]) -> dict[str, Any]:
    """``shoal profile`` of ``cmd`` on shoal/py:1, pushed as a referrer (the newest profile is the one
    ``shoal run`` and the snapshotter use); its JSON summary."""
    env = {**os.environ, "SHOAL_RUN_DIR": str(work / "run0")}
    store = work / "prof"
    shutil.rmtree(store, ignore_errors=True)
    out = run([SHOAL, "--store", str(store), "profile", "--json", f"docker://{reg.host}/shoal/py:1", "--", *cmd],
              env=env, stdin=subprocess.DEVNULL).stdout
    umount_all(work)
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def pause_image(reg: Registry, work: Path) -> str:
    """CRI's sandbox image in the cached registry, made once the way tests/integration/test_cri.py makes
    its own: dash, ``sleep`` and their libraries; its command blocks (``sleep infinity``)."""
    import httpx

    ref = f"{reg.host}/pause:1"
    if httpx.head(f"http://{reg.host}/v2/pause/manifests/1", headers={"Accept": OCI_MANIFEST}).is_success:
        return ref
    print("[setup] pause image ...", file=sys.stderr)
    tree, store, oci = work / "pause-tree", work / "pause-store", work / "pause-oci"
    tiny_tree(tree, extra=("/usr/bin/sleep",))
    run([SHOAL, "--store", str(store), "build", "--cmd", "/usr/bin/sleep infinity", str(tree), "pause:1"])
    run([SHOAL, "--store", str(store), "export", "pause:1", f"oci:{oci}:pause"])
    run([SHOAL, "--store", str(store), "copy", f"oci:{oci}:pause", f"docker://{ref}"])
    return ref


# ------------------------------------------------------------------------------------ one cold run


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cri_client(node: Node, stubs: Path) -> Any:
    """tests/cri's CriClient on ``node``'s socket, once CRI answers."""
    sys.path.insert(0, str(TESTS))
    from cri import CriClient

    cri = CriClient(node.sock, stubs)
    try:
        cri.runtime.Version(cri.pb.VersionRequest(), timeout=30, wait_for_ready=True)
    except BaseException:
        cri.close()
        raise
    return cri


def cold_run_cri(node: Node, mode: str, host: str, refs: dict[str, str], link: Any, n: int, stubs: Path,
                 cmd: list[str] = CMD, expect: str = "1", snapshotter: str = "") -> Sample:
    """PullImage, RunPodSandbox, CreateContainer, StartContainer to the first byte in the CRI log, with
    ``refs[mode]`` under ``snapshotter`` (default: ``mode``); the log must be the one line ``expect``."""
    ref = f"{host}/{refs[mode]}"
    node.hosts = (node.pause.split("/")[0], host)
    node.reset(snapshotter or mode)
    cri = cri_client(node, stubs)
    pb = cri.pb
    try:
        cri.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=node.pause)), timeout=120)  # warm
        logs = node.root / f"pod-logs-{n}"
        logs.mkdir()
        log = logs / "c.log"
        sb = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=f"bench-{n}", uid=f"bench-{n}-uid", namespace="default", attempt=0),
            log_directory=str(logs),  # no hostname: a host-network pod has no UTS namespace of its own
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE))))
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c", attempt=0), image=pb.ImageSpec(image=ref),
                                 command=cmd, log_path=log.name)
        drop_caches()
        b0, r0 = link.bytes, link.requests
        t0, wall0 = time.perf_counter(), time.time()
        cri.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=600)
        tp = time.perf_counter()
        pod = cri.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb), timeout=120).pod_sandbox_id
        ts = time.perf_counter()
        cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=cfg, sandbox_config=sb),
                                          timeout=300).container_id
        tc = time.perf_counter()
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=300)
        tst = time.perf_counter()
        end = time.monotonic() + 120
        while True:
            try:
                if log.stat().st_size > 0:
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > end:
                raise SystemExit(f"{mode}: no output in the CRI log {log} in 120 s")
            time.sleep(0.002)
        t1 = time.perf_counter()
        b1, r1 = link.bytes, link.requests
        while True:
            st = cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
            if st.state == pb.CONTAINER_EXITED or time.monotonic() > end:
                break
            time.sleep(0.05)
        lines = [ln.split(" ", 3)[1:] for ln in log.read_text().splitlines()]
        if st.state != pb.CONTAINER_EXITED or st.exit_code != 0 or lines != [["stdout", "F", expect]]:
            raise SystemExit(f"{mode}: the container ended {pb.ContainerState.Name(st.state)} ({st.exit_code}), "
                             f"log {lines[:5]!r}; see {node.logs}")
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    finally:
        cri.close()
    return Sample(t1 - t0, b1 - b0, r1 - r0, tp - t0, ts - t0, tc - t0, tst - t0, wall0)


def cold_run(node: Node, mode: str, host: str, refs: dict[str, str], link: Any, n: int) -> Sample:
    ref = f"{host}/{refs[mode]}"
    node.reset(mode)
    if mode == "shoal":
        cmds = [node.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "shoal", ref),
                node.ctr("run", "--rm", "--snapshotter", "shoal", ref, f"b{n}", *CMD)]
    elif mode == "stargz":
        cmds = [node.ctr_remote("image", "rpull", "--plain-http", ref),
                node.ctr("run", "--rm", "--snapshotter", "stargz", ref, f"b{n}", *CMD)]
    else:
        cmds = [node.ctr("images", "pull", "--plain-http", ref), node.ctr("run", "--rm", ref, f"b{n}", *CMD)]
    drop_caches()
    b0, r0 = link.bytes, link.requests
    t0 = time.perf_counter()
    run(cmds[0], env=node.env())
    tp = time.perf_counter()
    p = subprocess.Popen(cmds[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=node.env())
    assert p.stdout is not None
    got = os.read(p.stdout.fileno(), 1)
    t1 = time.perf_counter()
    b1, r1 = link.bytes, link.requests
    rest, err = p.communicate(timeout=120)
    if p.returncode != 0 or got + rest != b"1\n":
        raise SystemExit(f"{mode}: {' '.join(cmds[1])} failed ({p.returncode}): {(got + rest)[:200]!r} "
                         f"{err.decode(errors='replace')[-2000:]}")
    return Sample(t1 - t0, b1 - b0, r1 - r0, tp - t0)


def median(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.seconds for s in samples), int(statistics.median(s.bytes for s in samples)),
                  int(statistics.median(s.requests for s in samples)), statistics.median(s.pull for s in samples),
                  statistics.median(s.pod for s in samples))


def _term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every ``finally`` below runs


LABELS = {  # mode: (row label, what it runs), per --via
    "cri": {"shoal": "shoal snapshotter (CRI)", "overlayfs": "overlayfs, classic (CRI)",
            "stargz": "stargz snapshotter, optimized eStargz (CRI)"},
    "ctr": {"shoal": "shoal snapshotter (ctr-remote rpull + run)", "overlayfs": "overlayfs, classic (ctr pull + run)",
            "stargz": "stargz snapshotter, optimized eStargz"},
}


def remove_run_dirs() -> None:
    """containerd's empty directories under /run, for a machine that had none before the benchmark."""
    for d in ("/run/containerd/runc", "/run/containerd/io.containerd.runtime.v2.task", "/run/containerd"):
        try:
            os.rmdir(d)
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--via", choices=("cri", "ctr"), default="cri",
                    help="drive containerd through its CRI plugin (the kubelet's calls) or with ctr/ctr-remote")
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3, help="cold runs per mode and link (the median is shown)")
    ap.add_argument("--links", default="loopback,throttled", help="a subset, comma-separated")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--modes", default=",".join(MODES), help="a subset, comma-separated (for diagnosis)")
    args = ap.parse_args()
    compile_bytecode()
    modes = [m for m in MODES if m in args.modes.split(",")]
    links = [lk for key, lk in (("loopback", ("loopback", 1e6, 0.0)),
                                ("throttled", (f"{args.mbit:g} Mbit/s + {args.latency_ms:g} ms/request",
                                               args.mbit, args.latency_ms)))
             if key in args.links.split(",")]
    if not modes or not links:
        sys.exit(f"nothing to run: --modes from {','.join(MODES)}, --links from loopback,throttled")
    for tool in ("containerd", "ctr", "ctr-remote", "runc", "umoci", "skopeo", "docker-registry"):
        if not shutil.which(tool):
            sys.exit(f"bench/containerd.py needs {tool} (apt-get install containerd runc stargz-snapshotter "
                     "umoci skopeo docker-registry)")
    if os.geteuid() != 0:
        sys.exit("bench/containerd.py needs root")
    signal.signal(signal.SIGTERM, _term)
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    stargz = stargz_daemon()
    (CACHE / "containerd").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-containerd-", dir="/var/tmp"))
    run_dirs_before = Path("/run/containerd").exists()
    reg = Registry(CACHE / "containerd")  # storage persists: the peers' images are made once
    node = Node(work / "node", stargz)
    try:
        peer_images(tree, reg, node, work)
        if args.via == "cri":
            node = Node(work / "node", stargz, cri=True, pause=pause_image(reg, work))
        refs = {"shoal": shoal_image(tree, reg, work), "overlayfs": "classic/py:1", "stargz": "esgz/py:opt"}
        sizes = {}
        for mode, ref in (("overlayfs", refs["overlayfs"]), ("stargz", refs["stargz"])):
            out = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/{ref}"]).stdout
            sizes[mode] = sum(x["size"] for x in json.loads(out)["layers"])
        how = ("CRI (PullImage + RunPodSandbox + CreateContainer + StartContainer, to the first byte of the CRI log; "
               "sandbox image pre-pulled)" if args.via == "cri" else "ctr (not CRI)")
        print(f"tree {tree}: {tree_bytes(tree) / 1e6:.1f} MB, {os.cpu_count()} cores; classic layer "
              f"{sizes['overlayfs'] / 1e6:.1f} MB, optimized eStargz layer {sizes['stargz'] / 1e6:.1f} MB; "
              f"{how}, cold runs (fresh roots, page cache dropped), median of {args.reps}")
        results: dict[str, dict[str, Sample]] = {}
        n = 0
        for link_name, mbit, lat in links:
            with Throttle(f"http://{reg.host}", mbit, lat) as t:
                samples: dict[str, list[Sample]] = {m: [] for m in modes}
                for _ in range(args.reps):
                    for mode in modes:
                        n += 1
                        samples[mode].append(cold_run_cri(node, mode, t.host, refs, t.link, n, work / "stubs")
                                             if args.via == "cri" else cold_run(node, mode, t.host, refs, t.link, n))
                node.stop()
            results[link_name] = {m: median(s) for m, s in samples.items()}
            if args.via == "cri":
                raw = "; ".join(f"{m} " + " ".join(f"{s.seconds:.2f} ({s.pull:.2f}, {s.pod:.2f})" for s in samples[m])
                                for m in modes)
                print(f"  [{link_name}] every run, s to output (PullImage returned; RunPodSandbox returned): {raw}")
            else:
                raw = "; ".join(f"{m} " + " ".join(f"{s.seconds:.2f} ({s.pull:.2f})" for s in samples[m])
                                for m in modes)
                print(f"  [{link_name}] every run, s to output (of which pull): {raw}")
        if modes != list(MODES):
            return
        label = LABELS[args.via]
        print(f"time to first output of `python3 -c 'print(1)'` and bytes fetched by then (lower is better), "
              f"{'CRI' if args.via == 'cri' else 'ctr'}")
        for link_name, res in results.items():
            s, o, z = res["shoal"], res["overlayfs"], res["stargz"]
            print(f"  link: {link_name}")
            row(label["shoal"], f"{s.seconds:.2f} s",
                f"{s.bytes / 1e6:.2f} MB, {s.requests} requests; pull {s.pull:.2f} s")
            row(label["overlayfs"], f"{o.seconds:.2f} s",
                f"{o.bytes / 1e6:.2f} MB, {o.requests} requests; pull {o.pull:.2f} s; "
                f"shoal: {s.seconds / o.seconds:.3f}x the time, "
                f"{s.bytes / o.bytes:.3f}x the bytes")
            row(label["stargz"], f"{z.seconds:.2f} s",
                f"{z.bytes / 1e6:.2f} MB, {z.requests} requests; pull {z.pull:.2f} s; "
                f"shoal: {s.seconds / z.seconds:.2f}x the time, "
                f"{s.bytes / z.bytes:.2f}x the bytes (goal < 1, < 1)")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        node.stop()
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
        if not run_dirs_before:
            remove_run_dirs()


if __name__ == "__main__":
    main()
