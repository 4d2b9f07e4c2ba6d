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
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from containerd_fix import NS, Containerd, gets, push_view  # noqa: E402
from containerd_fix import tiny_tree as _tiny_tree  # noqa: E402

from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401
from shoal.snapshotter.view import OCI_MANIFEST, containerd_view  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
    reason="needs root and containerd (apt-get install containerd)")

_push_view = push_view
_gets = gets


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


@pytest.mark.skipif(shutil.which("ctr-remote") is None, reason="needs ctr-remote (apt-get install stargz-snapshotter)")
def test_shoal_image_runs_lazily(containerd: Containerd, tmp_path: Path,
                                 registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    _tiny_tree(tree)
    store = tmp_path / "store"
    run_shoal(store, "build", tree, "tiny:1")
    run_shoal(store, "push", "tiny:1", f"docker://{reg.host}/app:shoal")
    shoal_digest = _push_view(reg, "app", "shoal", "1")
    packs = {d["digest"] for d in json.loads(httpx.get(f"http://{reg.host}/v2/app/manifests/shoal",
                                                       headers={"Accept": OCI_MANIFEST}).content)["layers"][1:]}
    assert packs
    ref = f"{reg.host}/app:1"
    # without the Shoal snapshotter (overlayfs): a fast, clear failure, and no pack is fetched
    before = len(_gets(reg))
    p = containerd.ctr("images", "pull", "--plain-http", ref, check=False)
    assert p.returncode != 0
    assert ("failed to get stream processor for application/vnd.oci.image.layer.shoal.v1: "
            "no processor for media-type") in p.stderr, p.stderr
    assert not any(d in path for path, _ in _gets(reg)[before:] for d in packs)
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
    assert not any(path.endswith(json.loads(containerd_view(shoal_digest, b"{}").manifest)["layers"][0]["digest"])
                   for path, _ in gets)
    # removing the image releases the lazy mount
    containerd.ctr("images", "rm", "--sync", ref)
    assert str(mp) not in Path("/proc/mounts").read_text()
