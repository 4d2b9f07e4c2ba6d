"""Referrer helpers (docs/spec/trust.md §6): the kind of a referrer, ``subject`` added where missing, the
merge of two cosign attachments at a ``.sig`` tag, and an ``oci:`` layout listing referrers beside its image."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from shoal.errors import FormatError
from shoal.transports.base import BlobInfo, Referrer, parse_reference, referrer_kind, subject_of, with_subject
from shoal.transports.registry.referrers import merge_signature_manifests

SIG = "application/vnd.dev.cosign.simplesigning.v1+json"


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _sig_manifest(payloads: list[bytes], subject: dict[str, object] | None = None) -> bytes:
    doc: dict[str, object] = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                         "digest": _sha(b"{}"), "size": 2},
                              "layers": [{"mediaType": SIG, "digest": _sha(p), "size": len(p),
                                          "annotations": {"dev.cosignproject.cosign/signature": f"s{i}"}}
                                         for i, p in enumerate(payloads)]}
    if subject:
        doc["subject"] = subject
    return json.dumps(doc).encode()


SUBJ = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(b"image"), "size": 5}


def test_kind_and_subject() -> None:
    assert referrer_kind(_sig_manifest([b"a"])) == "signature"
    assert referrer_kind(json.dumps({"layers": [{"mediaType": "application/spdx+json"}]}).encode()) == "artifact"
    assert referrer_kind(json.dumps({"layers": []}).encode()) == "artifact"
    assert referrer_kind(b"not json") == "artifact"
    raw = _sig_manifest([b"a"])
    assert subject_of(raw) is None
    added = with_subject(raw, {**SUBJ, "extra": 1})
    assert subject_of(added) == SUBJ["digest"] and json.loads(added)["subject"] == SUBJ
    assert with_subject(added, {**SUBJ, "digest": _sha(b"other")}) == added  # one named already: unchanged
    with pytest.raises(FormatError):
        with_subject(b"[1]", SUBJ)


def test_descriptor_never_names_a_tag() -> None:
    doc = {"schemaVersion": 2, "artifactType": "application/spdx+json", "layers": [],
           "annotations": {"org.opencontainers.image.ref.name": "latest", "a": "b"}}
    d = Referrer(SUBJ["digest"], json.dumps(doc).encode(), "application/vnd.oci.image.manifest.v1+json").descriptor()
    assert d["annotations"] == {"a": "b"} and d["artifactType"] == "application/spdx+json"


def test_merge_keeps_existing_and_appends_new_once() -> None:
    have = _sig_manifest([b"p1"], SUBJ)
    new = _sig_manifest([b"p1", b"p2"])
    raw, config = merge_signature_manifests(have, new)
    doc = json.loads(raw)
    assert [ly["digest"] for ly in doc["layers"]] == [_sha(b"p1"), _sha(b"p2")]
    assert doc["subject"] == SUBJ
    assert json.loads(config)["rootfs"]["diff_ids"] == [_sha(b"p1"), _sha(b"p2")]
    assert doc["config"]["digest"] == _sha(config)
    again, _ = merge_signature_manifests(raw, new)
    assert again == raw  # merging what is there already changes nothing
    with pytest.raises(FormatError):
        merge_signature_manifests(have, b'{"layers": 3}')


def test_oci_layout_lists_referrers_and_still_has_one_image(tmp_path: Path) -> None:
    lay = tmp_path / "lay"
    image = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": _sha(b"{}"), "size": 2}, "layers": []}).encode()
    ref = parse_reference(f"oci:{lay}")
    with ref.new_destination() as dst:
        dst.put_blob(io.BytesIO(b"{}"), BlobInfo(_sha(b"{}"), 2))
        dst.put_manifest(image, "application/vnd.oci.image.manifest.v1+json")
        dst.commit()
        subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(image),
                   "size": len(image)}
        sig = _sig_manifest([b"p"])  # cosign's own: no subject
        dst.put_blob(io.BytesIO(b"p"), BlobInfo(_sha(b"p"), 1))
        assert dst.keeps_referrers
        dst.put_referrer(Referrer(_sha(image), sig, "application/vnd.oci.image.manifest.v1+json", "signature"),
                         subject)
        dst.put_referrer(Referrer(_sha(image), sig, "application/vnd.oci.image.manifest.v1+json", "signature"),
                         subject)  # listed once
    entries = json.loads((lay / "index.json").read_text())["manifests"]
    assert len(entries) == 2
    with parse_reference(f"oci:{lay}").new_source() as src:  # the image, not the referrer
        top, _ = src.get_manifest()
        assert top == image
        refs = src.referrers(_sha(image))
        assert len(refs) == 1 and refs[0].kind == "signature" and subject_of(refs[0].manifest) == _sha(image)
        assert src.referrers(_sha(b"nothing")) == []
