"""The runtime view and the image index a registry tag holds (docs/spec/oci-mapping.md §4)."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import validate_oci  # noqa: E402
from shoal import mediatypes as mt  # noqa: E402
from shoal.format.platform import choose  # noqa: E402
from shoal.format.runtime_view import (  # noqa: E402
    ANN_VIEW_OF,
    HIDDEN_PLATFORM,
    STUB_MEDIA_TYPE,
    VIEW_LAYER_ANNOTATION,
    for_readers,
    is_view_entry,
    runtime_index,
    runtime_view,
    stub_layer,
    view_of,
)
from shoal.snapshotter.remote import SHOAL_IMAGE_LABEL  # noqa: E402

SHOAL = "sha256:" + "ab" * 32
CONFIG = json.dumps({"architecture": "arm64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                     "rootfs": {"type": "layers", "diff_ids": []}, "shoal": {"format": 2}}).encode()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_view_is_reproducible_and_valid_oci() -> None:
    v = runtime_view(SHOAL, CONFIG)
    assert v == runtime_view(SHOAL, CONFIG)
    doc = json.loads(v.manifest)
    validate_oci(doc, "image-manifest-schema")
    validate_oci(v.config, "config-schema")
    (layer,) = doc["layers"]
    assert layer["mediaType"] == STUB_MEDIA_TYPE and layer["annotations"] == {VIEW_LAYER_ANNOTATION: SHOAL}
    assert VIEW_LAYER_ANNOTATION == SHOAL_IMAGE_LABEL  # what the snapshotter reads
    assert layer["digest"] == _sha(stub_layer(SHOAL)) == v.stub_digest
    assert json.loads(v.config)["rootfs"] == {"type": "layers", "diff_ids": [v.stub_digest]}
    with tarfile.open(fileobj=io.BytesIO(v.stub)) as tf:
        assert tf.extractfile(".shoal-image").read() == (SHOAL + "\n").encode()  # type: ignore[union-attr]
    assert view_of(doc) == SHOAL
    assert view_of({"artifactType": mt.ARTIFACT_TYPE, **doc}) is None


def test_index_shows_runtimes_the_view_and_readers_the_shoal_manifest() -> None:
    shoal_raw = b'{"artifactType":"application/vnd.shoal.image.v1"}'
    d = _sha(shoal_raw)
    v = runtime_view(d, CONFIG)
    idx = json.loads(runtime_index(None, {d: v}, (shoal_raw, {"architecture": "arm64", "os": "linux"})))
    validate_oci(idx, "image-index-schema")
    view_e, shoal_e = idx["manifests"]
    assert view_e["digest"] == v.digest and is_view_entry(view_e) and view_e["annotations"][ANN_VIEW_OF] == d
    assert shoal_e["digest"] == d and shoal_e["artifactType"] == mt.ARTIFACT_TYPE
    assert view_e["platform"] == {"architecture": "arm64", "os": "linux"}
    assert shoal_e["platform"] == HIDDEN_PLATFORM  # no runtime's platform matcher takes (and fetches) it
    assert [e["digest"] for e in for_readers(idx["manifests"])] == [d]
    # a runtime's matcher sees only the view; Shoal's readers only the Shoal manifest, with the platform
    assert choose(idx["manifests"], "linux/arm64", "x")["digest"] == v.digest
    kid = choose(for_readers(idx["manifests"]), "linux/arm64", "x")
    assert (kid["digest"], kid["platform"], kid["artifactType"]) == (d, view_e["platform"], mt.ARTIFACT_TYPE)
    # an index of several platforms gets a view before each Shoal entry; other fields stay
    other = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "cd" * 32, "size": 3,
             "platform": {"architecture": "amd64", "os": "linux"}}
    multi = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "annotations": {"a": "b"},
             "manifests": [other, {**shoal_e, "platform": view_e["platform"]}]}
    out = json.loads(runtime_index(multi, {d: v}))
    assert [e["digest"] for e in out["manifests"]] == [other["digest"], v.digest, d]
    assert out["annotations"] == {"a": "b"}
    assert for_readers(out["manifests"]) == [other, {**shoal_e, "platform": view_e["platform"]}]
    assert for_readers(multi["manifests"]) is multi["manifests"]  # no views: unchanged
