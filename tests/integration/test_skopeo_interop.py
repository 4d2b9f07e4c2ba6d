"""Interop with the real skopeo and umoci (issue 3, item 2).

- ``skopeo copy`` moves a Shoal image between two registries and into an ``oci:`` layout, and Shoal
  then pulls and unpacks it with the same Merkle root and tree.
- A classic image made by umoci and pushed by skopeo is copied by Shoal between registries and
  layouts byte-identically (same manifest digest, same blobs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_transfer import build_image, fresh_store, make_tree, shoal  # noqa: E402

import helpers  # noqa: E402
from regfix import Registry, registry, registry_factory  # noqa: E402,F401
from shoal.store import Store  # noqa: E402
from shoal.transports.base import all_transports  # noqa: E402
from shoal.transports.registry import RegistryClient  # noqa: E402

__all__ = ["registry", "registry_factory"]

pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="skopeo and umoci are needed")

PLAIN = ["--src-tls-verify=false", "--dest-tls-verify=false"]


@pytest.fixture(autouse=True)
def _isolated_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for v in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(v, raising=False)


def run(*cmd: str) -> bytes:
    p = subprocess.run(cmd, capture_output=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(cmd)}: {p.stderr.decode(errors='replace')[-2000:]}"
    return p.stdout


def skopeo_copy(src: str, dst: str, *opts: str) -> None:
    run("skopeo", "copy", "-q", *PLAIN, *opts, src, dst)


def remote_digest(host: str, repo: str, tag: str) -> str:
    with RegistryClient(host, lookup_credentials=False) as c:
        raw, _, digest = c.get_manifest(repo, tag)
    return digest


def layout_entry(layout: Path, name: str) -> dict[str, object]:
    idx = json.loads((layout / "index.json").read_text())
    for m in idx["manifests"]:
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == name:
            return m  # type: ignore[no-any-return]
    raise AssertionError(f"{name} not in {layout}/index.json")


def layout_blobs(layout: Path) -> dict[str, bytes]:
    return {"sha256:" + p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def into_store(src: str, store: Path, name: str, via: Registry, tmp: str) -> None:
    """Get ``src`` (an oci: layout skopeo wrote) into the store: Shoal's oci: transport if it exists, else
    skopeo pushes it to a registry first."""
    if "oci" in all_transports():
        shoal(store, "copy", src, name)
    else:
        skopeo_copy(src, f"docker://{via.host}/{tmp}")
        shoal(store, "pull", f"docker://{via.host}/{tmp}", name)


@pytest.fixture(scope="module")
def shoal_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("interop")
    tree = make_tree(d / "tree")
    build_image(d / "store", tree, "a:1")
    return d / "store", tree


def test_skopeo_moves_a_shoal_image(registry: Registry, registry_factory: Callable[..., Registry],
                                    shoal_image: tuple[Path, Path], tmp_path: Path) -> None:
    store, tree = shoal_image
    m = Store.open(store).resolve("a:1")
    reg2 = registry_factory()
    shoal(store, "push", "a:1", f"docker://{registry.host}/interop/shoal:1")
    # the tag is an image index: the runtime view, then the Shoal manifest (oci-mapping.md §4)
    tagged = remote_digest(registry.host, "interop/shoal", "1")
    # registry -> registry with skopeo --all (as for any multi-image index): the manifests stay the same
    # bytes; skopeo 1.9 writes the index again (its key order, without the entries' artifactType)
    skopeo_copy(f"docker://{registry.host}/interop/shoal:1", f"docker://{reg2.host}/moved/shoal:2", "--all")
    with RegistryClient(registry.host, lookup_credentials=False) as c:
        before = json.loads(c.get_manifest("interop/shoal", "1")[0])
    with RegistryClient(reg2.host, lookup_credentials=False) as c:
        after = json.loads(c.get_manifest("moved/shoal", "2")[0])
    assert [e["digest"] for e in after["manifests"]] == [e["digest"] for e in before["manifests"]]
    assert before["manifests"][1]["digest"] == m.digest
    moved = remote_digest(reg2.host, "moved/shoal", "2")
    s2 = fresh_store(tmp_path)
    shoal(s2, "pull", f"docker://{reg2.host}/moved/shoal:2", "got:1")
    assert Store.open(s2).resolve("got:1").root == m.root
    shoal(s2, "unpack", "got:1", str(tmp_path / "u1"))
    helpers.assert_same_tree(helpers.tree_snapshot(tree), helpers.tree_snapshot(tmp_path / "u1"))
    assert shoal(s2, "fsck").returncode == 0

    # registry -> oci: layout with skopeo, then into Shoal
    layout = tmp_path / "layout"
    skopeo_copy(f"docker://{reg2.host}/moved/shoal:2", f"oci:{layout}:v1", "--all")
    entry = layout_entry(layout, "v1")
    assert entry["digest"] in (tagged, moved)
    s3 = fresh_store(tmp_path)
    into_store(f"oci:{layout}:v1", s3, "fromoci:1", registry, "interop/via-oci:1")
    assert Store.open(s3).resolve("fromoci:1").root == m.root
    shoal(s3, "unpack", "fromoci:1", str(tmp_path / "u2"))
    helpers.assert_same_tree(helpers.tree_snapshot(tree), helpers.tree_snapshot(tmp_path / "u2"))
    assert shoal(s3, "fsck").returncode == 0


@pytest.fixture(scope="module")
def classic_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classic OCI image (two gzip tar layers) made with umoci."""
    d = tmp_path_factory.mktemp("umoci")
    layout, bundle = d / "layout", d / "bundle"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", str(bundle))
    helpers.write_tree(bundle / "rootfs", {"etc/hello.txt": b"hello from umoci\n",
                                           "usr/share/data.bin": hashlib.sha256(b"x").digest() * 40000})
    run("umoci", "repack", "--image", f"{layout}:base", str(bundle))
    bundle2 = d / "bundle2"  # a repack diffs against the bundle's unpack: a second layer needs a new unpack
    run("umoci", "unpack", "--image", f"{layout}:base", str(bundle2))
    (bundle2 / "rootfs" / "etc" / "second.txt").write_bytes(b"second layer\n")
    run("umoci", "repack", "--image", f"{layout}:base", str(bundle2))
    run("umoci", "config", "--image", f"{layout}:base", "--config.cmd", "/bin/true")
    return layout


def test_shoal_copies_a_classic_image_byte_identically(registry: Registry,
                                                       registry_factory: Callable[..., Registry],
                                                       classic_layout: Path, tmp_path: Path) -> None:
    skopeo_copy(f"oci:{classic_layout}:base", f"docker://{registry.host}/interop/classic:1")
    digest = remote_digest(registry.host, "interop/classic", "1")
    raw = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false",
                         f"docker://{registry.host}/interop/classic:1"))
    assert len(raw["layers"]) == 2 and "artifactType" not in raw
    reg2 = registry_factory()
    # registry -> registry
    shoal(None, "copy", f"docker://{registry.host}/interop/classic:1", f"docker://{reg2.host}/c/classic:1")
    assert remote_digest(reg2.host, "c/classic", "1") == digest
    # registry -> layout: same manifest digest, same blobs as a skopeo copy of it
    if "oci" not in all_transports():
        pytest.skip("shoal's oci: transport is not there yet")
    out, ref_layout = tmp_path / "out", tmp_path / "ref"
    shoal(None, "copy", f"docker://{reg2.host}/c/classic:1", f"oci:{out}:c")
    skopeo_copy(f"docker://{reg2.host}/c/classic:1", f"oci:{ref_layout}:c")
    assert layout_entry(out, "c")["digest"] == layout_entry(ref_layout, "c")["digest"] == digest
    assert layout_blobs(out) == layout_blobs(ref_layout)
    # layout -> registry -> skopeo sees the same image
    shoal(None, "copy", f"oci:{out}:c", f"docker://{reg2.host}/c/back:2")
    assert remote_digest(reg2.host, "c/back", "2") == digest
    # skopeo reads back what Shoal wrote
    skopeo_copy(f"docker://{reg2.host}/c/back:2", f"oci:{tmp_path / 'final'}:f")
    assert layout_entry(tmp_path / "final", "f")["digest"] == digest


def test_skopeo_without_all_moves_only_the_runtime_view(registry: Registry, shoal_image: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """skopeo's default copies this machine's entry of an index: the runtime view, not the Shoal image;
    ``shoal pull`` of it says so in one line."""
    store, _ = shoal_image
    m = Store.open(store).resolve("a:1")
    shoal(store, "push", "a:1", f"docker://{registry.host}/interop/view:1")
    skopeo_copy(f"docker://{registry.host}/interop/view:1", f"docker://{registry.host}/interop/viewonly:1")
    for args in (("pull", f"docker://{registry.host}/interop/viewonly:1"),
                 ("inspect", f"docker://{registry.host}/interop/viewonly:1")):
        p = shoal(fresh_store(tmp_path), *args, check=False)
        line = helpers.assert_one_line_error(p)
        assert "is the runtime view of the Shoal image " + m.digest in line and "--all" in line, line
    # where the repository holds the Shoal manifest, the view named by digest stands for it
    view = remote_digest(registry.host, "interop/viewonly", "1")
    out = shoal(None, "inspect", "--json", f"docker://{registry.host}/interop/view@{view}").stdout
    assert json.loads(out)["digest"] == m.digest
