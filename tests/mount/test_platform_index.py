"""Multi-platform images: every command picks an image index's image by ONE rule
(``shoal.format.platform.choose``): this machine's platform by default, ``--platform`` to override,
and a one-line NotFound (exit 3) naming what the index has when nothing fits.

A real two-platform index in a real registry: two small, different, runnable trees (dash and its
libraries, plus ``/etc/which`` naming the platform) are built into a store, tagged as an OCI image
index with the *foreign* platform listed first (the old bug took the first child), and pushed.
A second index lists only foreign platforms.
"""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mountkit import mounts_under, shoal  # noqa: E402

import helpers  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401
from shoal.format.platform import Platform  # noqa: E402
from shoal.store import Store  # noqa: E402

HOST = Platform.host()
pytestmark = pytest.mark.skipif(HOST.architecture != "amd64", reason="the trees hold this machine's x86-64 dash")

CMD = ("sh", "-c", "read x < /etc/which; echo $x")


def _runnable_tree(root: Path, name: str) -> None:
    """``/bin/sh`` (dash) with the libraries it loads, and ``/etc/which`` = ``name``."""
    dash = shutil.which("dash") or "/bin/dash"
    libs = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", dash], capture_output=True, text=True).stdout)
    for src, rel in [(dash, "bin/sh")] + [(lib, lib.lstrip("/")) for lib in libs]:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "which").write_text(name + "\n")
    (root / "data").mkdir()
    (root / "data" / f"only-{name}").write_bytes(name.encode() * 100)


@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from shoal.build import BuildOptions, build
    from shoal.convert.platforms import index_bytes
    from shoal.format.manifest import ImageConfig
    from shoal.store import Store

    d = tmp_path_factory.mktemp("platforms")
    st = Store.open(d / "store")
    conf = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}
    built = {}
    for arch in ("amd64", "arm64", "s390x"):
        _runnable_tree(d / arch, arch)
        r = build(st, d / arch, f"one:{arch}", BuildOptions(workers=2, config=ImageConfig(architecture=arch,
                                                                                           config=conf)))
        built[arch] = r.manifest
    arm = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    st.tag_index("app:1", index_bytes([(arm, built["arm64"]), ({"os": "linux", "architecture": "amd64"},
                                                                built["amd64"])]))
    st.tag_index("noamd:1", index_bytes([(arm, built["arm64"]), ({"os": "linux", "architecture": "s390x"},
                                                                  built["s390x"])]))
    base = f"docker://{registry.host}/plat"
    for name in ("app:1", "noamd:1"):
        shoal(d / "store", "push", name, f"{base}/{name}")
    return {"store": d / "store", "app": f"{base}/app:1", "noamd": f"{base}/noamd:1",
            "digests": {a: m.digest for a, m in built.items()}}


def _no_host_image(p: subprocess.CompletedProcess[bytes], what: str) -> None:
    line = helpers.assert_one_line_error(p)
    assert p.returncode == 3, line
    assert line == (f"shoal: error: {what} has no image for linux/amd64 (it has linux/arm64, linux/s390x); "
                    "choose one with --platform"), line


def test_inspect_ls_cat_pick_the_host(images: dict[str, Any]) -> None:
    app, noamd = images["app"], images["noamd"]
    doc = json.loads(shoal(None, "inspect", "--json", app).stdout)
    assert (doc["os"], doc["architecture"], doc["digest"]) == ("linux", "amd64", images["digests"]["amd64"])
    doc = json.loads(shoal(None, "inspect", "--json", "--platform", "linux/arm64", app).stdout)
    assert (doc["architecture"], doc["digest"]) == ("arm64", images["digests"]["arm64"])
    assert shoal(None, "ls", app, "/data").stdout == b"/data/only-amd64\n"
    assert shoal(None, "ls", "--platform", "linux/arm64/v8", app, "/data").stdout == b"/data/only-arm64\n"
    assert shoal(None, "cat", app, "/etc/which").stdout == b"amd64\n"
    assert shoal(None, "cat", "--platform", "linux/aarch64", app, "/etc/which").stdout == b"arm64\n"  # normalized
    for args in (("inspect", noamd), ("ls", noamd, "/"), ("cat", noamd, "/etc/which")):
        _no_host_image(shoal(None, *args, check=False), noamd)
    p = shoal(None, "cat", "--platform", "linux", app, "/etc/which", check=False)
    assert p.returncode == 2 and "invalid platform 'linux'" in helpers.assert_one_line_error(p)


def test_the_registry_index_has_a_runtime_view_per_platform(images: dict[str, Any], registry: Registry) -> None:
    """oci-mapping.md §4.1: before each Shoal entry its view, with the platform; the Shoal entry hidden."""
    from shoal.transports.registry import RegistryClient

    with RegistryClient(registry.host, lookup_credentials=False) as c:
        index = json.loads(c.get_manifest("plat/app", "1")[0])
        helpers.validate_oci(index, "image-index-schema")
        entries = index["manifests"]
        assert len(entries) == 4
        for view, shoal_e, arch in zip(entries[::2], entries[1::2], ("arm64", "amd64")):
            assert view["annotations"]["dev.shoal.image"] == shoal_e["digest"] == images["digests"][arch]
            assert view["platform"]["architecture"] == arch
            assert shoal_e["platform"] == {"architecture": "unknown", "os": "unknown"}
            helpers.validate_oci(c.get_manifest("plat/app", view["digest"])[0], "image-manifest-schema")


def test_pull_unpack_and_the_local_index(images: dict[str, Any], tmp_path: Path) -> None:
    st = tmp_path / "st"
    doc = json.loads(shoal(st, "pull", "--json", images["app"], "app:1").stdout)
    assert doc["digest"] == images["digests"]["amd64"]  # the image, not the index, is pulled and tagged
    doc = json.loads(shoal(st, "pull", "--json", "--platform", "linux/arm64", images["app"], "app:arm").stdout)
    assert doc["digest"] == images["digests"]["arm64"]
    for tag, want in (("app:1", "amd64"), ("app:arm", "arm64")):
        shoal(st, "unpack", tag, tmp_path / tag)
        assert (tmp_path / tag / "etc" / "which").read_text() == want + "\n"
    _no_host_image(shoal(st, "pull", images["noamd"], "x:1", check=False), images["noamd"])
    assert sorted(Store.open(st).layout.refs()) == ["app:1", "app:arm"]
    # copy carries the whole index; the local index then resolves by the same rule
    doc = json.loads(shoal(st, "copy", "--json", images["noamd"], "whole:1").stdout)
    assert doc["media_type"] == "application/vnd.oci.image.index.v1+json"
    shoal(st, "unpack", "--platform", "linux/s390x", "whole:1", tmp_path / "s390x")
    assert (tmp_path / "s390x" / "etc" / "which").read_text() == "s390x\n"
    _no_host_image(shoal(st, "unpack", "whole:1", tmp_path / "none", check=False), "whole:1")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    shoal(images["store"], "unpack", "app:1", tmp_path / "local")
    assert (tmp_path / "local" / "etc" / "which").read_text() == "amd64\n"
    # export keeps an index for destinations that hold one (tests/convert), and gives a one-image
    # destination this machine's image
    shoal(images["store"], "export", "app:1", f"docker-archive:{tmp_path}/one.tar:ex/app:1")
    with tarfile.open(tmp_path / "one.tar") as tar:
        listing = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        cfg = json.loads(tar.extractfile(listing[0]["Config"]).read())  # type: ignore[union-attr]
    assert cfg["architecture"] == "amd64"


def test_mount_docker_index(images: dict[str, Any], mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    cold = tmp_path / "cold"
    for extra, want in (((), "amd64"), (("--platform", "linux/arm64"), "arm64")):
        shoal(cold, "mount", *extra, images["app"], mnt)
        try:
            assert (mnt / "etc" / "which").read_text() == want + "\n"
            assert os.listdir(mnt / "data") == [f"only-{want}"]
        finally:
            shoal(None, "umount", mnt)
    _no_host_image(shoal(cold, "mount", images["noamd"], mnt, check=False), images["noamd"])
    shoal(images["store"], "mount", "noamd:1", "--platform", "linux/s390x", mnt)  # a local index, too
    try:
        assert (mnt / "etc" / "which").read_text() == "s390x\n"
    finally:
        shoal(None, "umount", mnt)
    _no_host_image(shoal(images["store"], "mount", "noamd:1", mnt, check=False), "noamd:1")
    assert not mounts_under(run_dir, mnt)


def test_run_docker_index(images: dict[str, Any], run_dir: Path, tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    cold = tmp_path / "cold"
    for extra, want in (((), "amd64"), (("--platform", "linux/arm64"), "arm64")):
        p = shoal(cold, "run", "--rm", *extra, images["app"], *CMD, stdin=open(os.devnull, "rb"))
        assert p.stdout == want.encode() + b"\n"
    _no_host_image(shoal(cold, "run", "--rm", images["noamd"], *CMD, check=False, stdin=open(os.devnull, "rb")),
                   images["noamd"])
    assert not mounts_under(run_dir)
