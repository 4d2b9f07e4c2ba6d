"""convert(): manifests, configs, indexes and platforms, through the real ``oci:`` transport."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from convtools import Tar, sha, source, write_index, write_layout

from shoal import mediatypes as mt
from shoal.convert import Platform, convert, resolve_images
from shoal.convert.platforms import ANN_SOURCE
from shoal.errors import NotFound, UsageError
from shoal.format.manifest import parse_config
from shoal.format.model import Kind
from shoal.reader import Reader, StoreSource
from shoal.store import Store
from shoal.unpack import unpack

L1 = Tar().dir("etc").file("etc/os-release", b"ID=test\n").dir("usr").dir("usr/bin").file("usr/bin/a", b"a" * 5000,
                                                                                             mode=0o755).bytes()
L2 = Tar().file("usr/bin/b", b"b" * 7000, mode=0o755).hardlink("usr/bin/b2", "usr/bin/b").whiteout("etc").bytes()
L3 = Tar().dir("etc").file("etc/hostname", b"box\n").bytes()

RUNTIME = {
    "User": "1000:1000", "Env": ["PATH=/usr/bin", "A=b"], "Entrypoint": ["/usr/bin/a"], "Cmd": ["--help"],
    "WorkingDir": "/srv", "Labels": {"org.example": "yes"}, "ExposedPorts": {"80/tcp": {}},
    "Volumes": {"/data": {}}, "StopSignal": "SIGTERM",
}
HISTORY = [{"created": "2024-01-01T00:00:00Z", "created_by": "base"}, {"created_by": "RUN x", "empty_layer": True},
           {"created_by": "ADD b"}, {"created_by": "ADD c"}]


def _paths(store: Store, digest: str) -> dict[bytes, Kind]:
    idx = store.load_index(store.manifest(digest))
    return {e.path: e.kind for e in idx.entries}


def test_convert_carries_config_and_provenance(tmp_path: Path, store: Store) -> None:
    b = write_layout(tmp_path / "lay", "v1", [L1, L2, L3], compression=["gzip", "zstd", "none"], variant="v8",
                     arch="arm64", config={"config": {**RUNTIME, "Memory": 5}, "history": HISTORY,
                                           "created": "2024-02-02T00:00:00Z", "author": "me"})
    with source(b.ref) as src:
        r = convert(src, store, "img:1")
    assert r.media_type == mt.OCI_MANIFEST and r.source_digest == b.digest
    m = store.resolve("img:1")
    assert m.digest == r.digest
    cfg = parse_config(store.layout.get(m.config.digest))
    assert (cfg.os, cfg.architecture, cfg.variant) == ("linux", "arm64", "v8")
    assert cfg.config == RUNTIME  # unknown keys dropped
    diff_ids = json.loads(b.config)["rootfs"]["diff_ids"]
    assert cfg.extra["source"] == {"manifest": b.digest, "mediaType": mt.OCI_MANIFEST,
                                   "config": sha(b.config), "diff_ids": diff_ids}
    assert cfg.extra["history"] == HISTORY
    assert (cfg.extra["created"], cfg.extra["author"]) == ("2024-02-02T00:00:00Z", "me")
    assert [layer.compression for layer in r.images[0].layers] == ["gzip", "zstd", "none"]
    assert [layer.diff_id for layer in r.images[0].layers] == diff_ids
    assert _paths(store, m.digest) == {b"": Kind.DIR, b"etc": Kind.DIR, b"etc/hostname": Kind.FILE,
                                       b"usr": Kind.DIR, b"usr/bin": Kind.DIR, b"usr/bin/a": Kind.FILE,
                                       b"usr/bin/b": Kind.FILE, b"usr/bin/b2": Kind.HARDLINK}


def test_convert_then_unpack(tmp_path: Path, store: Store) -> None:
    b = write_layout(tmp_path / "lay", "v1", [L1, L2, L3])
    with source(b.ref) as src:
        convert(src, store, "img:1")
    m = store.resolve("img:1")
    idx = store.load_index(m)
    out = tmp_path / "out"
    unpack(idx, Reader(idx, StoreSource(store)), str(out))
    assert sorted(p.name for p in (out / "usr" / "bin").iterdir()) == ["a", "b", "b2"]
    assert (out / "usr/bin/b").read_bytes() == b"b" * 7000
    assert (out / "usr/bin/b").stat().st_ino == (out / "usr/bin/b2").stat().st_ino
    assert [p.name for p in (out / "etc").iterdir()] == ["hostname"]


def test_docker_schema2(tmp_path: Path, store: Store) -> None:
    b = write_layout(tmp_path / "lay", "v1", [L1, L2], compression=["gzip", "none"], docker=True)
    with source(b.ref) as src:
        r = convert(src, store, "d:1")
    cfg = parse_config(store.layout.get(store.resolve("d:1").config.digest))
    assert cfg.extra["source"]["mediaType"] == mt.DOCKER_MANIFEST
    assert r.images[0].source_manifest == b.digest


def test_same_tree_same_root_whatever_the_layering(tmp_path: Path, store: Store) -> None:
    flat = Tar().dir("usr").dir("usr/bin").file("usr/bin/a", b"a" * 5000, mode=0o755) \
        .file("usr/bin/b", b"b" * 7000, mode=0o755).hardlink("usr/bin/b2", "usr/bin/b") \
        .dir("etc").file("etc/hostname", b"box\n").dir("./", mode=0o755, mtime=0).bytes()
    layered = write_layout(tmp_path / "lay", "layered", [L1, L2, L3])
    single = write_layout(tmp_path / "lay", "single", [flat])
    with source(layered.ref) as s1, source(single.ref) as s2:
        r1 = convert(s1, store, "a:1")
        r2 = convert(s2, store, "b:1")
    m1, m2 = store.manifest(r1.digest), store.manifest(r2.digest)
    assert m1.root == m2.root  # the tree is the same ...
    assert m1.digest != m2.digest  # ... its provenance is not


def test_reproducible(tmp_path: Path) -> None:
    b = write_layout(tmp_path / "lay", "v1", [L1, L2, L3], config={"config": RUNTIME})
    digests = []
    for i in range(2):
        with source(b.ref) as src:
            digests.append(convert(src, Store.open(tmp_path / f"s{i}"), "x:1", workers=1 + i).digest)
    assert digests[0] == digests[1]


def _multi(root: Path) -> tuple[str, list[str]]:
    amd = write_layout(root, None, [L1])
    arm = write_layout(root, None, [L1, L3], arch="arm64", variant="v8")
    att = write_layout(root, None, [Tar().file("sbom.json", b"{}").bytes()])
    ref = write_index(root, "multi", [
        (amd, {"os": "linux", "architecture": "amd64"}),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (att, {"os": "unknown", "architecture": "unknown"}),
    ])
    return ref, [amd.digest, arm.digest]


def test_index_converts_every_platform(tmp_path: Path, store: Store) -> None:
    ref, children = _multi(tmp_path / "lay")
    with source(ref) as src:
        r = convert(src, store, "multi:1")
    assert r.media_type == mt.OCI_INDEX
    assert [i.source_manifest for i in r.images] == children
    assert store.layout.refs()["multi:1"]["mediaType"] == mt.OCI_INDEX
    assert store.layout.refs()["multi:1"]["digest"] == r.digest
    doc = json.loads(store.layout.get(r.digest))
    assert doc["mediaType"] == mt.OCI_INDEX and doc["annotations"] == {ANN_SOURCE: r.source_digest}
    assert [d["platform"] for d in doc["manifests"]] == [
        {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64", "variant": "v8"}]
    assert all(d["artifactType"] == mt.ARTIFACT_TYPE for d in doc["manifests"])
    kind, items = resolve_images(store, "multi:1")
    assert kind == mt.OCI_INDEX and [m.digest for _, m in items] == [i.build.manifest.digest for i in r.images]
    kind, items = resolve_images(store, "multi:1", Platform.parse("linux/arm64"))
    assert [p for p, _ in items] == [{"os": "linux", "architecture": "arm64", "variant": "v8"}]
    assert b"etc/hostname" in _paths(store, items[0][1].digest)
    cfg = parse_config(store.layout.get(items[0][1].config.digest))
    assert cfg.extra["source"]["index"] == r.source_digest


def test_index_one_platform(tmp_path: Path, store: Store) -> None:
    ref, children = _multi(tmp_path / "lay")
    with source(ref) as src:
        r = convert(src, store, "one:1", platform="linux/arm64/v8")
    assert r.media_type == mt.OCI_MANIFEST and [i.source_manifest for i in r.images] == [children[1]]
    assert store.resolve("one:1").digest == r.digest
    with source(ref) as src:
        r2 = convert(src, store, "two:1", platform=Platform("linux", "amd64"))
    assert [i.source_manifest for i in r2.images] == [children[0]]


def test_docker_manifest_list(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "lay"
    a = write_layout(root, None, [L1], docker=True)
    b = write_layout(root, None, [L1, L3], docker=True, arch="ppc64le")
    ref = write_index(root, "list", [(a, {"os": "linux", "architecture": "amd64"}),
                                     (b, {"os": "linux", "architecture": "ppc64le"})], docker=True)
    with source(ref) as src:
        r = convert(src, store, "l:1")
    assert [str(i.platform) for i in r.images] == ["linux/amd64", "linux/ppc64le"]


@pytest.mark.parametrize("plat", ["linux/s390x", "windows/amd64", "linux/arm64/v7"])
def test_missing_platform_tags_nothing(tmp_path: Path, store: Store, plat: str) -> None:
    ref, _ = _multi(tmp_path / "lay")
    with source(ref) as src, pytest.raises(NotFound, match=r"no image for .*it has linux/amd64, linux/arm64"):
        convert(src, store, "none:1", platform=plat)
    assert store.layout.refs() == {}


def test_single_manifest_platform_mismatch(tmp_path: Path, store: Store) -> None:
    b = write_layout(tmp_path / "lay", "v1", [L1])
    with source(b.ref) as src, pytest.raises(UsageError, match="linux/amd64, not linux/arm64"):
        convert(src, store, "x:1", platform="linux/arm64")
    assert store.layout.refs() == {}


def test_bad_platform_syntax() -> None:
    for bad in ("linux", "linux/", "/amd64", "a/b/c/d"):
        with pytest.raises(UsageError):
            Platform.parse(bad)


def test_untagged_convert(tmp_path: Path, store: Store) -> None:
    ref, _ = _multi(tmp_path / "lay")
    with source(ref) as src:
        r = convert(src, store, None)
    assert store.layout.refs() == {}
    assert len(r.images) == 2 and r.digest.startswith("sha256:")


def test_reuse_is_passed_to_the_build(tmp_path: Path, store: Store) -> None:
    b1 = write_layout(tmp_path / "lay", "v1", [L1])
    b2 = write_layout(tmp_path / "lay", "v2", [L1, L3])
    with source(b1.ref) as src:
        convert(src, store, "base:1")
    with source(b2.ref) as src:
        r = convert(src, store, "next:1", reuse=["base:1"])
    base_packs = {p.digest for p in store.resolve("base:1").packs}
    assert base_packs and base_packs <= {p.digest for p in store.resolve("next:1").packs}
    assert r.images[0].build.new_chunks < r.images[0].build.unique_chunks
