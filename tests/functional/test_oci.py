"""Acceptance 9 and 10: everything the store writes is valid OCI (image-spec JSON schemas), and
skopeo can read and copy Shoal images as plain OCI content."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from helpers import assert_same_tree, oci_schema_dir, run_shoal, tree_snapshot, validate_oci, write_tree
from shoal import mediatypes as mt


@pytest.fixture(scope="module")
def oci_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two images (one via --reuse, one with every config option) and one removed."""
    d = tmp_path_factory.mktemp("oci")
    t1 = write_tree(d / "t1", {"etc/os-release": b"NAME=shoal\n", "bin/x": bytes(range(256)) * 400})
    t2 = write_tree(d / "t2", {"etc/os-release": b"NAME=shoal 2\n", "bin/x": bytes(range(256)) * 400})
    s = d / "store"
    run_shoal(s, "build", t1, "demo:1")
    run_shoal(s, "build", "--reuse", "demo:1", "--env", "A=1", "--entrypoint", "/bin/sh -c", "--cmd", "echo hi",
              "--workdir", "/w", "--user", "1000:1000", "--label", "org.example=yes", "--arch", "arm64",
              t2, "demo:2")
    run_shoal(s, "build", t2, "gone:1")
    run_shoal(s, "rm", "gone:1")
    return s


def _manifests(store: Path) -> list[tuple[str, bytes]]:
    idx = json.loads((store / "index.json").read_bytes())
    return [(m["annotations"]["org.opencontainers.image.ref.name"],
             (store / "blobs" / "sha256" / m["digest"][7:]).read_bytes()) for m in idx["manifests"]]


def test_schemas_are_found() -> None:
    d = oci_schema_dir()
    assert (d / "image-manifest-schema.json").is_file() and (d / "config-schema.json").is_file()


def test_validator_rejects_invalid_documents() -> None:
    """The helper itself can fail: broken documents do not validate."""
    with pytest.raises(jsonschema.ValidationError):
        validate_oci({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {"mediaType": "x"}, "layers": []},
                     "image-manifest-schema")
    with pytest.raises(jsonschema.ValidationError):
        validate_oci({"schemaVersion": 2, "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": "no-colon",
                                                         "size": 1}]}, "image-index-schema")
    with pytest.raises(jsonschema.ValidationError):
        validate_oci({"imageLayoutVersion": "2.0.0"}, "image-layout-schema")
    with pytest.raises(jsonschema.ValidationError):
        validate_oci({"architecture": "amd64", "os": "linux"}, "config-schema")  # no rootfs


def test_layout_files_validate(oci_store: Path) -> None:
    validate_oci((oci_store / "oci-layout").read_bytes(), "image-layout-schema.json")
    index = json.loads((oci_store / "index.json").read_bytes())
    validate_oci(index, "image-index-schema.json")
    assert index["mediaType"] == mt.OCI_INDEX
    assert sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]) == [
        "demo:1", "demo:2"]


def test_manifests_and_configs_validate(oci_store: Path) -> None:
    found = _manifests(oci_store)
    assert len(found) == 2
    for _ref, raw in found:
        doc = json.loads(raw)
        validate_oci(doc, "image-manifest-schema.json")
        assert doc["mediaType"] == mt.OCI_MANIFEST and doc["artifactType"] == mt.ARTIFACT_TYPE
        assert doc["config"]["mediaType"] == mt.CONFIG
        assert doc["layers"][0]["mediaType"] == mt.INDEX
        assert all(layer["mediaType"] == mt.PACK for layer in doc["layers"][1:])
        # Shoal never claims OCI media types for its own content
        assert not any(layer["mediaType"].startswith("application/vnd.oci.") for layer in doc["layers"])
        for desc in [doc["config"]] + doc["layers"]:
            validate_oci(desc, "content-descriptor.json")
            blob = oci_store / "blobs" / "sha256" / desc["digest"][7:]
            assert blob.stat().st_size == desc["size"]
        cfg = json.loads((oci_store / "blobs" / "sha256" / doc["config"]["digest"][7:]).read_bytes())
        validate_oci(cfg, "config-schema.json")
        assert cfg["shoal"]["root"] == doc["annotations"]["dev.shoal.root"]
    demo2 = json.loads(dict(found)["demo:2"])
    cfg2 = json.loads((oci_store / "blobs" / "sha256" / demo2["config"]["digest"][7:]).read_bytes())
    assert cfg2["architecture"] == "arm64"
    assert cfg2["config"]["Entrypoint"] == ["/bin/sh", "-c"] and cfg2["config"]["Cmd"] == ["echo", "hi"]
    assert cfg2["config"]["Env"] == ["A=1"] and cfg2["config"]["WorkingDir"] == "/w"
    assert cfg2["config"]["Labels"] == {"org.example": "yes"}


def test_every_manifest_blob_in_the_store_validates(generated_image) -> None:  # type: ignore[no-untyped-def]
    """Also for a big image: every JSON blob the store holds is a valid manifest or config."""
    store_dir = generated_image[0]
    n = 0
    for p in (store_dir / "blobs" / "sha256").iterdir():
        head = p.open("rb").read(1)
        if head != b"{":
            continue
        doc = json.loads(p.read_bytes())
        if "schemaVersion" in doc:
            validate_oci(doc, "image-manifest-schema.json")
        else:
            validate_oci(doc, "config-schema.json")
        n += 1
    assert n == 2
    validate_oci((store_dir / "index.json").read_bytes(), "image-index-schema")


# ------------------------------------------------------------------------------------ skopeo

skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def _skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(["skopeo", *args], capture_output=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


@skopeo
def test_skopeo_inspect_raw_reads_the_manifest(oci_store: Path) -> None:
    for ref, raw in _manifests(oci_store):
        p = _skopeo("inspect", "--raw", f"oci:{oci_store}:{ref}")
        assert p.stdout == raw
        cfg = _skopeo("inspect", "--config", "--raw", f"oci:{oci_store}:{ref}")
        digest = json.loads(raw)["config"]["digest"]
        assert cfg.stdout == (oci_store / "blobs" / "sha256" / digest[7:]).read_bytes()


@skopeo
def test_skopeo_inspect_without_raw(oci_store: Path) -> None:
    """Plain ``skopeo inspect`` (and ``--config`` without ``--raw``) parse the config as an OCI image
    config; skopeo 1.9 refuses any config media type but OCI's ("unsupported image-specific operation
    on artifact").  If it works (a newer skopeo), it must report the right digest."""
    raw = dict(_manifests(oci_store))["demo:1"]
    import hashlib

    for args in (("inspect",), ("inspect", "--config")):
        p = _skopeo(*args, f"oci:{oci_store}:demo:1", check=False)
        if p.returncode == 0:
            doc = json.loads(p.stdout)
            if "Digest" in doc:
                assert doc["Digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
        else:
            err = p.stderr.decode()
            assert "unsupported image-specific operation on artifact" in err and mt.CONFIG in err, err


@skopeo
def test_skopeo_copy_gives_a_working_shoal_store(oci_store: Path, tmp_path: Path) -> None:
    """``skopeo copy`` moves a Shoal image as plain OCI content; the copy is a store Shoal can read."""
    dst = tmp_path / "copy"
    _skopeo("copy", "--preserve-digests", f"oci:{oci_store}:demo:2", f"oci:{dst}:demo:2")
    validate_oci((dst / "index.json").read_bytes(), "image-index-schema")
    orig = json.loads(run_shoal(oci_store, "inspect", "--json", "demo:2").stdout)
    copied = json.loads(run_shoal(dst, "inspect", "--json", "demo:2").stdout)
    assert copied["digest"] == orig["digest"] and copied["root"] == orig["root"]
    assert json.loads(run_shoal(dst, "fsck", "--json").stdout)["ok"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_shoal(oci_store, "unpack", "demo:2", a)
    run_shoal(dst, "unpack", "demo:2", b)
    assert_same_tree(tree_snapshot(a), tree_snapshot(b))
