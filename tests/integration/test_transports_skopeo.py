"""Interop of Shoal's file transports with the real ``skopeo`` and ``umoci``.

The fixture image is made with umoci, the way a classic OCI image is made by hand::

    umoci init --layout L; umoci new --image L:t
    umoci unpack --image L:t B; (add files to B/rootfs); umoci repack --image L:t B   # twice: 2 layers

Shoal's own copy engine (``shoal.copier``) is not used here: ``mini_copy`` below is a test-only
stand-in that moves blobs, then child manifests, then the top manifest, then commits.

What "the same" means per format: ``oci:``, ``dir:`` and ``oci-archive:`` keep the manifest (and so
its digest) and every blob byte for byte; ``docker-archive:`` stores uncompressed layers and gets a
synthesised Docker schema2 manifest, so there the config bytes and the layer diff_ids must match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shoal import mediatypes as mt
from shoal.transports.base import BlobInfo, ImageDestination, ImageSource, parse_reference

pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="needs skopeo and umoci")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(*cmd: str | os.PathLike[str], cwd: Path | None = None) -> bytes:
    argv = [os.fspath(c) for c in cmd]
    p = subprocess.run(argv, capture_output=True, timeout=300, cwd=cwd)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    return p.stdout


def skopeo(*args: str | os.PathLike[str]) -> bytes:
    return run("skopeo", "--insecure-policy", *args)


def skopeo_raw(ref: str) -> bytes:
    return skopeo("inspect", "--raw", ref)


def skopeo_config(ref: str) -> bytes:
    return skopeo("inspect", "--config", "--raw", ref)


# ---------------------------------------------------------------------------------------- the test-only copy


def _move_blobs(src: ImageSource, dst: ImageDestination, manifest: bytes) -> None:
    doc = json.loads(manifest)
    for desc in [doc["config"], *doc["layers"]]:
        info = BlobInfo(desc["digest"], desc["size"], desc["mediaType"])
        if dst.has_blob(info):
            continue
        stream, _ = src.get_blob(info)
        with stream:
            dst.put_blob(stream, info)


def mini_copy(src_text: str, dst_text: str) -> tuple[bytes, str]:
    """Blobs first (skipping those the destination has), then child manifests, the top one, commit."""
    with parse_reference(src_text).new_source() as src, parse_reference(dst_text).new_destination() as dst:
        raw, media = src.get_manifest()
        doc = json.loads(raw)
        if "manifests" in doc:
            for child in doc["manifests"]:
                craw, cmedia = src.get_manifest(child["digest"])
                _move_blobs(src, dst, craw)
                dst.put_manifest(craw, cmedia, child["digest"])
        else:
            _move_blobs(src, dst, raw)
        dst.put_manifest(raw, media)
        dst.commit()
    return raw, media


def read_all(text: str) -> tuple[bytes, str, dict[str, bytes]]:
    """(manifest, media type, every blob it names) read with Shoal's source; blobs checked against digests."""
    blobs: dict[str, bytes] = {}
    with parse_reference(text).new_source() as src:
        raw, media = src.get_manifest()
        doc = json.loads(raw)
        for desc in [doc["config"], *doc["layers"]]:
            stream, size = src.get_blob(BlobInfo(desc["digest"], desc["size"]))
            with stream:
                data = stream.read()
            assert (sha(data), len(data), size) == (desc["digest"], desc["size"], desc["size"])
            blobs[desc["digest"]] = data
    return raw, media, blobs


def diff_ids(config: bytes) -> list[str]:
    ids: list[str] = json.loads(config)["rootfs"]["diff_ids"]
    return ids


# ---------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An OCI layout made by umoci with two gzip layers; returns its path, ref and skopeo's view of it."""
    work = tmp_path_factory.mktemp("umoci")
    layout, bundle = work / "L", work / "B"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    for i, files in enumerate(({"etc/hello": b"hello from umoci\n", "usr/bin/tool": bytes(range(256)) * 64},
                               {"etc/hello": b"changed in layer 2\n", "var/lib/data.bin": os.urandom(1) * 5000})):
        run("umoci", "unpack", *rootless, "--image", f"{layout}:t", bundle)
        for name, data in files.items():
            p = bundle / "rootfs" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        if i == 0:
            (bundle / "rootfs" / "usr" / "bin" / "link").symlink_to("tool")
        run("umoci", "repack", "--image", f"{layout}:t", bundle)
        shutil.rmtree(bundle)
    ref = f"oci:{layout}:t"
    raw = skopeo_raw(ref)
    assert len(json.loads(raw)["layers"]) == 2
    return {"layout": layout, "ref": ref, "manifest": raw, "config": skopeo_config(ref)}


# ---------------------------------------------------------------------------------------- tests


def test_read_umoci_layout(umoci_image: dict[str, Any]) -> None:
    raw, media, blobs = read_all(umoci_image["ref"])
    assert raw == umoci_image["manifest"]
    assert media == mt.OCI_MANIFEST
    assert blobs[json.loads(raw)["config"]["digest"]] == umoci_image["config"]


def test_chain_oci_dir_ociarchive_dockerarchive_oci(umoci_image: dict[str, Any], tmp_path: Path) -> None:
    """oci: -> dir: -> oci-archive: -> docker-archive: -> oci:, each hop checked with skopeo."""
    manifest, config = umoci_image["manifest"], umoci_image["config"]
    hops = [f"dir:{tmp_path}/D", f"oci-archive:{tmp_path}/A.tar:t", f"docker-archive:{tmp_path}/X.tar:ex/chain:1",
            f"oci:{tmp_path}/O"]  # no REF: skopeo 1.9 only finds Docker-typed index.json entries that way
    src = umoci_image["ref"]
    for dst in hops:
        mini_copy(src, dst)
        assert skopeo_config(dst) == config
        if dst.startswith(("dir:", "oci-archive:")):
            assert skopeo_raw(dst) == manifest  # byte-identical, so the same manifest digest
        src = dst

    assert json.loads(skopeo("inspect", hops[2]))["Layers"] == diff_ids(config)
    listing = json.loads(run("tar", "-xOf", f"{tmp_path}/X.tar", "manifest.json"))
    assert listing[0]["RepoTags"] == ["docker.io/ex/chain:1"]

    raw, media, blobs = read_all(hops[3])
    assert media == mt.DOCKER_MANIFEST and skopeo_raw(hops[3]) == raw
    assert [lay["digest"] for lay in json.loads(raw)["layers"]] == diff_ids(config)
    assert blobs[sha(config)] == config
    skopeo("copy", hops[3], f"oci:{tmp_path}/S:t")  # skopeo verifies every blob it moves
    assert diff_ids(skopeo_config(f"oci:{tmp_path}/S:t")) == diff_ids(config)


def _target(tmp: Path, fmt: str) -> str:
    return {"oci": f"oci:{tmp}/L2:t", "dir": f"dir:{tmp}/D", "oci-archive": f"oci-archive:{tmp}/a.tar:t",
            "docker-archive": f"docker-archive:{tmp}/d.tar:ex/img:2"}[fmt]


@pytest.mark.parametrize("fmt", ["oci", "dir", "oci-archive", "docker-archive"])
def test_skopeo_writes_shoal_reads(umoci_image: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    target = _target(tmp_path, fmt)
    skopeo("copy", umoci_image["ref"], target)
    raw, media, blobs = read_all(target)
    config = umoci_image["config"]
    assert blobs[sha(config)] == config
    if fmt == "docker-archive":
        # skopeo wrote uncompressed <hex>.tar layers plus <id>/layer.tar symlinks; its own view calls
        # them tar.gzip, Shoal's calls them what they are
        doc = json.loads(raw)
        assert media == mt.DOCKER_MANIFEST
        assert [lay["digest"] for lay in doc["layers"]] == diff_ids(config)
        assert {lay["mediaType"] for lay in doc["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar"}
        theirs = json.loads(skopeo_raw(target))
        assert [(lay["digest"], lay["size"]) for lay in theirs["layers"]] == \
               [(lay["digest"], lay["size"]) for lay in doc["layers"]]
        for alias in ("ex/img:2", "docker.io/ex/img:2"):
            read_all(f"docker-archive:{tmp_path}/d.tar:{alias}")
    else:
        assert raw == skopeo_raw(target) == umoci_image["manifest"]
        assert media == mt.OCI_MANIFEST


@pytest.mark.parametrize("fmt", ["oci", "dir", "oci-archive", "docker-archive"])
def test_shoal_writes_skopeo_reads(umoci_image: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    target = _target(tmp_path, fmt)
    mini_copy(umoci_image["ref"], target)
    config = umoci_image["config"]
    assert skopeo_config(target) == config
    if fmt == "docker-archive":
        assert json.loads(skopeo("inspect", target))["Layers"] == diff_ids(config)
        assert json.loads(skopeo("inspect", f"docker-archive:{tmp_path}/d.tar:docker.io/ex/img:2"))["Digest"]
    else:
        assert skopeo_raw(target) == umoci_image["manifest"]
    back = f"oci:{tmp_path}/back:t"
    skopeo("copy", target, back)  # skopeo verifies each blob's digest while copying
    assert diff_ids(skopeo_config(back)) == diff_ids(config)
    if fmt != "docker-archive":
        assert skopeo_raw(back) == umoci_image["manifest"]
        mini_copy(back, f"oci:{tmp_path}/again:t")
        assert read_all(f"oci:{tmp_path}/again:t")[0] == umoci_image["manifest"]


def test_multi_arch_index_both_ways(umoci_image: dict[str, Any], tmp_path: Path) -> None:
    """An image index written by Shoal is copied whole by ``skopeo copy --all``, and back."""
    layout = tmp_path / "I"
    mini_copy(umoci_image["ref"], f"oci:{layout}:amd")
    base = json.loads(umoci_image["manifest"])
    cfg = json.loads(umoci_image["config"])
    cfg["architecture"] = "arm64"
    arm_config = json.dumps(cfg).encode()
    arm = dict(base, config=dict(base["config"], digest=sha(arm_config), size=len(arm_config)))
    arm_raw = json.dumps(arm).encode()
    kids = [(umoci_image["manifest"], "amd64"), (arm_raw, "arm64")]
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": sha(raw), "size": len(raw),
         "platform": {"architecture": arch, "os": "linux"}} for raw, arch in kids]}).encode()
    with parse_reference(f"oci:{layout}:multi").new_destination() as dst:
        dst.put_blob(io.BytesIO(arm_config), BlobInfo(sha(arm_config), len(arm_config)))
        for raw, _ in kids:
            dst.put_manifest(raw, mt.OCI_MANIFEST, sha(raw))
        dst.put_manifest(index, mt.OCI_INDEX)
        dst.commit()

    assert skopeo_raw(f"oci:{layout}:multi") == index
    assert skopeo_raw(f"oci:{layout}:amd") == umoci_image["manifest"]  # the other entry is kept
    skopeo("copy", "--all", f"oci:{layout}:multi", f"dir:{tmp_path}/D")
    with parse_reference(f"dir:{tmp_path}/D").new_source() as src:
        assert src.get_manifest() == (index, mt.OCI_INDEX)
        for raw, _ in kids:
            assert src.get_manifest(sha(raw))[0] == raw
    mini_copy(f"dir:{tmp_path}/D", f"oci-archive:{tmp_path}/m.tar:multi")
    skopeo("copy", "--all", f"oci-archive:{tmp_path}/m.tar:multi", f"oci:{tmp_path}/S:multi")
    assert skopeo_raw(f"oci:{tmp_path}/S:multi") == index
    assert skopeo_raw(f"oci:{tmp_path}/S:multi") == read_all_index(f"oci:{tmp_path}/S:multi")


def read_all_index(text: str) -> bytes:
    with parse_reference(text).new_source() as src:
        raw, media = src.get_manifest()
        assert media == mt.OCI_INDEX
        for child in json.loads(raw)["manifests"]:
            craw, _ = src.get_manifest(child["digest"])
            assert sha(craw) == child["digest"]
    return raw


def test_shoal_archives_are_deterministic(umoci_image: dict[str, Any], tmp_path: Path) -> None:
    for fmt, name in (("oci-archive", "t"), ("docker-archive", "ex/img:1")):
        a, b = tmp_path / f"{fmt}-1.tar", tmp_path / f"{fmt}-2.tar"
        mini_copy(umoci_image["ref"], f"{fmt}:{a}:{name}")
        mini_copy(umoci_image["ref"], f"{fmt}:{b}:{name}")
        assert a.read_bytes() == b.read_bytes()
        listing = run("tar", "--numeric-owner", "-tvf", a).decode()
        assert "1970-01-01 00:00" in listing and " 0/0 " in listing
