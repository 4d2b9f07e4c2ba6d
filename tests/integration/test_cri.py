"""Shoal images through containerd's CRI plugin (issue 11; docs/containerd.md "CRI").

A private containerd 1.6 with the CRI plugin (the config of docs/containerd.md: restrict_oom_score_adj,
a sandbox image from the loopback registry, ``disable_snapshot_annotations = false``, hosts.toml),
``shoal snapshotter`` and a loopback docker-registry with its access log.  A small CRI v1 client
(tests/cri, stubs generated at test time) pulls a Shoal image's containerd view, runs a host-network
pod and a container in it, and reads the container's CRI log.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from containerd_fix import Containerd, gets, mounts_under, pack_digests, pids_with, published, tiny_tree  # noqa: E402

from cri import CriClient  # noqa: E402
from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401

pytestmark = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
    reason="needs root and containerd (apt-get install containerd)")


def cri_config(work: Path, reg: Registry, sandbox_image: str) -> str:
    """The CRI section of docs/containerd.md, with a hosts.toml for the plain-HTTP loopback registry."""
    hosts = work / "certs.d" / reg.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{reg.host}"\n'
                                      f'[host."http://{reg.host}"]\n  capabilities = ["pull", "resolve"]\n')
    return f"""[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{sandbox_image}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "shoal"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{work / 'certs.d'}"
"""


def push_pause(tmp_path: Path, reg: Registry) -> str:
    """A classic sandbox image: dash, sleep and their libraries; its command blocks (``sleep infinity``)."""
    tree = tmp_path / "pause-tree"
    tiny_tree(tree, extra=("/usr/bin/sleep",))
    store = tmp_path / "pause-store"
    run_shoal(store, "build", "--cmd", "/usr/bin/sleep infinity", tree, "pause:1")
    run_shoal(store, "export", "pause:1", f"oci:{tmp_path / 'pause-oci'}:pause")
    ref = f"{reg.host}/pause:1"
    run_shoal(store, "copy", f"oci:{tmp_path / 'pause-oci'}:pause", f"docker://{ref}")
    return ref


@pytest.fixture()
def cri_env(tmp_path: Path, registry_factory: Callable[..., Registry]
            ) -> Iterator[tuple[Containerd, CriClient, Registry]]:
    reg = registry_factory(access_log=True)
    pause = push_pause(tmp_path, reg)
    work = tmp_path / "c"
    work.mkdir()
    cd = Containerd(work, cri_config=cri_config(work, reg, pause))
    cri: CriClient | None = None
    try:
        cd.start()
        cri = CriClient(cd.sock, tmp_path / "stubs")
        yield cd, cri, reg
    finally:
        if cri is not None:
            cri.close()
        cd.stop()


def _sandbox_config(pb: Any, logs: Path) -> Any:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="shoal-pod", uid="shoal-pod-uid", namespace="default", attempt=0),
        log_directory=str(logs),  # no hostname: a host-network pod has no UTS namespace of its own
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE))))


def run_in_pod(cri: CriClient, cd: Containerd, logs: Path, image: str, name: str,
               script: str) -> tuple[str, str, list[str]]:
    """A host-network pod with one container running ``sh -c script`` of ``image``, through CRI's
    RunPodSandbox, CreateContainer and StartContainer; waits for it to exit 0.  Returns the pod and
    container ids and the lines of the container's CRI log."""
    pb = cri.pb
    logs.mkdir()
    sb_cfg = _sandbox_config(pb, logs)
    pod = cri.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sb_cfg)).pod_sandbox_id
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=0), image=pb.ImageSpec(image=image),
                             command=["/bin/sh", "-c", script], log_path=f"{name}.log")
    cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=cfg,
                                                                sandbox_config=sb_cfg)).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    end = time.monotonic() + 20
    while True:
        st = cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        if st.state == pb.CONTAINER_EXITED or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 0, (st, cd.log_tail())
    return pod, cid, (logs / f"{name}.log").read_text().splitlines()


def remove_pod(cri: CriClient, pod: str, cid: str) -> None:
    pb = cri.pb
    cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_cri_runs_a_shoal_image_lazily(cri_env: tuple[Containerd, CriClient, Registry], tmp_path: Path) -> None:
    cd, cri, reg = cri_env
    pb = cri.pb
    tree = tmp_path / "tree"
    tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "push", "tiny:1", f"docker://{reg.host}/app:1")  # the tag runtimes pull
    shoal_digest, stub = published(reg, "app", "1")
    packs = pack_digests(reg, "app", shoal_digest)
    ref = f"{reg.host}/app:1"
    before = len(gets(reg))

    t0 = time.monotonic()
    image_ref = cri.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref))).image_ref
    assert image_ref.startswith("sha256:")
    pulled = time.monotonic() - t0
    pod, cid, lines = run_in_pod(cri, cd, tmp_path / "pod-logs", ref, "hello", "echo hello-cri")
    # CRI log format: "<time> stdout F hello-cri"
    assert [ln.split(" ", 3)[1:] for ln in lines] == [["stdout", "F", "hello-cri"]], lines

    # the container's rootfs was an overlay on the lazy Shoal mount; only manifest, config, index and
    # range reads of packs were fetched: no whole pack, never the stub layer
    mp = cd.snap_root / "mounts" / shoal_digest.removeprefix("sha256:")
    assert str(mp) in mounts_under(str(mp))
    got = [(p, s) for p, s in gets(reg)[before:] if "/pause/" not in p]
    assert not [(p, s) for p, s in got if s == 200 and any(d in p for d in packs)], got
    assert any(s == 206 for _, s in got), got
    assert not any(p.endswith(stub) for p, _ in got), got
    kinds = {p.split("/")[3] for p, _ in got}
    assert kinds <= {"manifests", "blobs", "referrers"}, got  # referrers: the prefetch-profile lookup
    print(f"CRI PullImage {pulled:.2f} s, {len(got)} GETs")

    # clean up through CRI; removing the image releases the lazy mount
    remove_pod(cri, pod, cid)
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
    assert not cri.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))).HasField("image")
    end = time.monotonic() + 10
    while mounts_under(str(mp)) and time.monotonic() < end:
        time.sleep(0.1)
    assert mounts_under(str(mp)) == [], cd.log_tail()
    assert pids_with(str(mp)) == []
