"""The runtime view and the image index a registry tag holds (docs/spec/oci-mapping.md §4)."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import validate_oci  # noqa: E402
from shoal import mediatypes as mt  # noqa: E402
from shoal.format.manifest import Descriptor, build_manifest  # noqa: E402
from shoal.format.platform import choose  # noqa: E402
from shoal.format.runtime_view import (  # noqa: E402
    ANN_INDEX,
    ANN_VIEW_OF,
    HIDDEN_PLATFORM,
    STUB_MEDIA_TYPE,
    VIEW_INDEX_ANNOTATION,
    VIEW_LAYER_ANNOTATION,
    for_readers,
    index_hint,
    index_of,
    is_view_entry,
    registry_index,
    runtime_index,
    runtime_view,
    stub_layer,
    view_of,
)
from shoal.snapshotter.remote import SHOAL_IMAGE_LABEL, SHOAL_INDEX_LABEL, RemoteMounts  # noqa: E402
from shoal.snapshotter.runner import Runner  # noqa: E402

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


def test_the_view_names_the_index_for_the_snapshotter() -> None:
    """A view made from a Shoal manifest carries its index blob (digest:size) as a second layer annotation,
    which containerd forwards as a Prepare label; the view stays byte-reproducible and valid OCI."""
    index = ("sha256:" + "cd" * 32, 756112)
    shoal_raw, _ = build_manifest(Descriptor(mt.CONFIG, _sha(CONFIG), len(CONFIG)), Descriptor(mt.INDEX, *index),
                                  [Descriptor(mt.PACK, "sha256:" + "ef" * 32, 9)], "sha256:" + "12" * 32)
    assert index_of(shoal_raw) == index
    assert index_of(b'{"layers": [{"mediaType": "x", "digest": "sha256:00", "size": 1}]}') is None  # not Shoal
    _, view = registry_index(shoal_raw, CONFIG)
    assert view == runtime_view(_sha(shoal_raw), CONFIG, index)
    doc = json.loads(view.manifest)
    validate_oci(doc, "image-manifest-schema")
    (layer,) = doc["layers"]
    assert layer["annotations"] == {VIEW_LAYER_ANNOTATION: _sha(shoal_raw), VIEW_INDEX_ANNOTATION: f"{index[0]}:756112"}
    assert VIEW_INDEX_ANNOTATION == SHOAL_INDEX_LABEL
    assert view.stub == runtime_view(_sha(shoal_raw), CONFIG).stub  # the stub (diff id) does not depend on it
    # the tag's image index names it too, on the Shoal manifest's entry, which readers by tag choose
    idx = json.loads(registry_index(shoal_raw, CONFIG)[0])
    validate_oci(idx, "image-index-schema")
    assert idx["manifests"][1]["annotations"] == {ANN_INDEX: f"{index[0]}:756112"}
    kid = choose(for_readers(idx["manifests"]), "linux/arm64", "x")
    assert kid["digest"] == _sha(shoal_raw) and index_hint(kid["annotations"][ANN_INDEX]) == index


@pytest.mark.parametrize("value", [None, 5, "", "sha256:" + "cd" * 32, "sha256:" + "cd" * 32 + ":",
                                   "sha256:" + "cd" * 32 + ":1\n", "sha256:" + "cd" * 31 + ":1",
                                   "sha512:" + "cd" * 32 + ":1", "sha256:" + "cd" * 32 + ":1234567890123"])
def test_a_malformed_index_hint_is_no_hint(value: object) -> None:
    assert index_hint(value) is None
    assert index_hint("sha256:" + "cd" * 32 + ":0") == ("sha256:" + "cd" * 32, 0)


class _Recorder(Runner):
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, args: object, timeout: float) -> tuple[int, str]:
        self.calls.append(list(args))  # type: ignore[call-overload]
        return 0, ""


@pytest.mark.parametrize("label,passed", [
    ("sha256:" + "cd" * 32 + ":756112", True),
    (None, False),
    ("sha256:" + "cd" * 32, False),  # no size
    ("sha256:" + "CD" * 32 + ":1", False),
    ("sha256:" + "cd" * 32 + ":1 --suid", False),
    ("sha256:" + "cd" * 32 + ":-1", False),
])
def test_the_snapshotter_passes_a_well_formed_index_label_to_the_mount(tmp_path: Path, label: str | None,
                                                                      passed: bool) -> None:
    runner = _Recorder()
    labels = {SHOAL_IMAGE_LABEL: SHOAL, "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/app:1"}
    if label is not None:
        labels[SHOAL_INDEX_LABEL] = label
    RemoteMounts(tmp_path, runner=runner).mount(labels)
    (args,) = runner.calls
    assert args[-2:] == [f"docker://127.0.0.1:5000/app@{SHOAL}", str(tmp_path / "mounts" / SHOAL[7:])]
    if passed:
        assert args[args.index("--index-hint") + 1] == label
    else:
        assert "--index-hint" not in args  # a malformed label is ignored: the mount goes on without it
