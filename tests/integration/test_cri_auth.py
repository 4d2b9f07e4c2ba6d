"""CRI per-pull credentials through the snapshotter's CRI image-service proxy (issue 11; docs/containerd.md
"Credentials").

The fixtures of test_cri.py, with the application image on a second, htpasswd registry and a
snapshotter started with ``--cri-keychain-image-service <containerd's socket>`` and NO auth file in
its environment: a CRI client pulls through the snapshotter's socket with ``PullImageRequest.auth``,
as a kubelet with ``--image-service-endpoint`` does, then runs the image through containerd's socket.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from containerd_fix import Containerd, gets, mounts_under, pack_digests, pids_with, published, tiny_tree, wait_for  # noqa: E402
from test_cri import cri_config, push_pause, pytestmark, remove_pod, run_in_pod  # noqa: E402,F401

from cri import CriClient  # noqa: E402
from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401


def _no_auth_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which the snapshotter (and the ``shoal mount`` it runs) finds no auth file."""
    home = tmp_path / "snap-home"
    (home / "run").mkdir(parents=True)
    return {"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "XDG_CONFIG_HOME": str(home / "config"),
            "DOCKER_CONFIG": str(home / "docker"), "REGISTRY_AUTH_FILE": str(home / "none.json")}


def test_cri_pull_credentials_reach_the_lazy_mount(tmp_path: Path, registry_factory: Callable[..., Registry]
                                                   ) -> None:
    plain = registry_factory()
    reg = registry_factory(auth="htpasswd", access_log=True)
    pause = push_pause(tmp_path, plain)
    tree = tmp_path / "tree"
    tiny_tree(tree)
    (tree / "etc" / "name").write_text("secret-app\n")
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "app:1")
    run_shoal(store, "push", "--creds", f"{reg.username}:{reg.password}", "app:1", f"docker://{reg.host}/app:1")
    shoal_digest, stub = published(reg, "app", "1", auth=(reg.username, reg.password))
    packs = pack_digests(reg, "app", shoal_digest, auth=(reg.username, reg.password))
    ref = f"{reg.host}/app:1"

    work = tmp_path / "c"
    work.mkdir()
    config = cri_config(work, plain, pause)
    hosts = work / "certs.d" / reg.host
    hosts.mkdir(parents=True)
    hosts.joinpath("hosts.toml").write_text(f'server = "http://{reg.host}"\n'
                                            f'[host."http://{reg.host}"]\n  capabilities = ["pull", "resolve"]\n')
    cd_sock = work / "cd" / "containerd.sock"
    cd = Containerd(work, cri_config=config, snap_env=_no_auth_env(tmp_path),
                    snap_args=("--cri-keychain-image-service", str(cd_sock)))
    keyfile = cd.snap_root / "cri-auth.json"
    mp = cd.snap_root / "mounts" / shoal_digest.removeprefix("sha256:")
    cri: CriClient | None = None
    proxy: CriClient | None = None
    try:
        cd.start()
        cri = CriClient(cd.sock, tmp_path / "stubs")  # the runtime service: containerd itself
        proxy = CriClient(cd.snap_sock, tmp_path / "stubs")  # the image service: the snapshotter's proxy
        pb = cri.pb
        spec = pb.ImageSpec(image=ref)

        # a wrong password: one clean error from containerd, passed on; nothing kept, nothing mounted
        with pytest.raises(grpc.RpcError) as ei:
            proxy.images.PullImage(pb.PullImageRequest(
                image=spec, auth=pb.AuthConfig(username=reg.username, password="wrong")), timeout=30)
        assert ei.value.code() == grpc.StatusCode.UNKNOWN and "401" in (ei.value.details() or ""), ei.value
        assert not keyfile.exists() or reg.host not in keyfile.read_text()
        assert mounts_under(str(cd.snap_root / "mounts")) == []

        # the right one, as a kubelet sends an imagePullSecret: base64 user:password and the server
        before = len(gets(reg))
        token = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
        auth = pb.AuthConfig(auth=token, server_address=f"http://{reg.host}")
        image_ref = proxy.images.PullImage(pb.PullImageRequest(image=spec, auth=auth), timeout=60).image_ref
        assert image_ref.startswith("sha256:")
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert json.loads(keyfile.read_text()) == {"auths": {f"{reg.host}/app": {"auth": token}}}
        snap_cmds = Path(work / "snap.log").read_text()
        assert reg.password not in snap_cmds
        # the rest of the image service is forwarded too
        assert proxy.images.ImageStatus(pb.ImageStatusRequest(image=spec)).image.id == image_ref
        assert any(i.id == image_ref for i in proxy.images.ListImages(pb.ListImagesRequest()).images)
        assert proxy.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems

        pod, cid, lines = run_in_pod(cri, cd, tmp_path / "pod-logs", spec.image, "app", "read n </etc/name; echo $n")
        assert [ln.split(" ", 3)[1:] for ln in lines] == [["stdout", "F", "secret-app"]], lines
        assert str(mp) in mounts_under(str(mp))
        got = gets(reg)[before:]
        assert not [(p, s) for p, s in got if s == 200 and any(d in p for d in packs)], got
        assert any(s == 206 for _, s in got), got
        assert not any(p.endswith(stub) for p, _ in got), got
        remove_pod(cri, pod, cid)

        # the mount is lost while the snapshotter is down; restarted (same --root), it mounts the image
        # again with the kept credentials
        proxy.close()
        proxy = None
        cd.kill_snapshotter()
        subprocess.run(["umount", "-l", str(mp)], check=True)
        wait_for(lambda: pids_with(str(mp)) == [], "the FUSE daemon of the lazy mount to exit")
        shutil.rmtree(work / "store")  # the snapshotter's $SHOAL_STORE: nothing cached, all from the registry
        before = len(gets(reg))
        cd.start_snapshotter()
        assert mounts_under(str(mp)) == [str(mp)], cd.log_tail()
        assert (mp / "etc" / "name").read_text() == "secret-app\n"
        got = gets(reg)[before:]  # the registry answers nothing without the password
        assert (f"/v2/app/manifests/{shoal_digest}", 200) in got, got
        assert any(s == 206 and any(d in p for d in packs) for p, s in got), got

        # a wrong password later does not replace the working one
        proxy = CriClient(cd.snap_sock, tmp_path / "stubs")
        with pytest.raises(grpc.RpcError):
            proxy.images.PullImage(pb.PullImageRequest(
                image=pb.ImageSpec(image=f"{reg.host}/app:2"),
                auth=pb.AuthConfig(username=reg.username, password="wrong")), timeout=30)
        assert json.loads(keyfile.read_text()) == {"auths": {f"{reg.host}/app": {"auth": token}}}

        # removing the image through the proxy releases the lazy mount
        proxy.images.RemoveImage(pb.RemoveImageRequest(image=spec))
        assert not proxy.images.ImageStatus(pb.ImageStatusRequest(image=spec)).HasField("image")
        wait_for(lambda: mounts_under(str(mp)) == [], "the lazy mount to be released", timeout=10)
    finally:
        for c in (cri, proxy):
            if c is not None:
                c.close()
        cd.stop()
    assert os.path.exists(keyfile)
