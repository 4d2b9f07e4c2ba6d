"""The manifest/config (docs/spec/oci-mapping.md) and the layout's blob rules (docs/spec/store.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import validate_oci
from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound, UsageError
from shoal.format.manifest import (
    Descriptor,
    ImageConfig,
    build_config,
    build_manifest,
    canonical_json,
    parse_config,
    parse_manifest,
)
from shoal.store import Store, normalize_ref
from shoal.store.layout import Layout


def _d(data: bytes, media: str) -> Descriptor:
    return Descriptor(media, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def _manifest() -> tuple[bytes, str]:
    cfg = build_config(ImageConfig(root="sha256:" + "1" * 64))
    return build_manifest(_d(cfg, mt.CONFIG), _d(b"index", mt.INDEX), [_d(b"p1", mt.PACK), _d(b"p2", mt.PACK)],
                          "sha256:" + "1" * 64)


def test_manifest_round_trip_and_schema() -> None:
    raw, digest = _manifest()
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert raw == canonical_json(json.loads(raw))  # sorted keys, no whitespace
    validate_oci(raw, "image-manifest-schema")
    m = parse_manifest(raw, digest)
    assert m.digest == digest and m.root == "sha256:" + "1" * 64 and m.format == 2
    assert m.index.media_type == mt.INDEX and [p.media_type for p in m.packs] == [mt.PACK, mt.PACK]
    assert m.size == len(raw) + m.config.size + 5 + 2 + 2


def test_config_round_trip_and_schema() -> None:
    cfg = ImageConfig(architecture="arm64", os="linux", variant="v8", config={"Env": ["A=1"], "Cmd": ["sh"]},
                      root="sha256:" + "2" * 64, extra={"source": "test"})
    raw = build_config(cfg)
    validate_oci(raw, "config-schema")
    assert parse_config(raw) == cfg


@pytest.mark.parametrize("edit,word", [
    (lambda d: d.update(schemaVersion=1), "schemaVersion"),
    (lambda d: d.update(artifactType="application/x"), "not a shoal image"),
    (lambda d: d.update(layers=[]), "no layers"),
    (lambda d: d["layers"].reverse(), "index, then packs"),
    (lambda d: d["config"].update(mediaType="application/vnd.example.config+json"), "config media type"),
    (lambda d: d["annotations"].update({mt.ANN_FORMAT: "1"}), "format"),
    (lambda d: d["annotations"].update({mt.ANN_ROOT: "md5:00"}), "digest"),
    (lambda d: d["layers"][1].update(size=-1), "size"),
    (lambda d: d["layers"][1].update(digest="sha256:XYZ"), "digest"),
    (lambda d: d["layers"][1].update(annotations={"a": 1}), "annotations"),
], ids=["version", "artifact", "no-layers", "order", "config-type", "format", "root", "size", "digest", "ann"])
def test_parse_manifest_refuses(edit, word: str) -> None:  # type: ignore[no-untyped-def]
    raw, _ = _manifest()
    doc = json.loads(raw)
    edit(doc)
    with pytest.raises(FormatError) as ei:
        parse_manifest(canonical_json(doc))
    assert word.lower() in str(ei.value).lower()


def test_parse_manifest_checks_digest_and_size() -> None:
    raw, digest = _manifest()
    with pytest.raises(FormatError, match="mismatch"):
        parse_manifest(raw, "sha256:" + "0" * 64)
    with pytest.raises(FormatError):
        parse_manifest(b"{" + b" " * (4 << 20) + b"}")
    with pytest.raises(FormatError):
        parse_manifest(b"not json")


@pytest.mark.parametrize("ref,want", [("a", "a:latest"), ("a:1", "a:1"), ("reg/x/y:v1.2-rc_3", "reg/x/y:v1.2-rc_3"),
                                      ("a.b-c__d:t", "a.b-c__d:t")])
def test_normalize_ref(ref: str, want: str) -> None:
    assert normalize_ref(ref) == want


@pytest.mark.parametrize("ref", ["A:1", "a:", ":t", "a:-t", "a b", "a:" + "t" * 129, "../x", "a/:t", ""])
def test_normalize_ref_refuses(ref: str) -> None:
    with pytest.raises(UsageError):
        normalize_ref(ref)


def test_layout_put_get_verify(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "s")
    lay.init()
    d = lay.put(b"hello")
    assert d == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert lay.get(d) == b"hello" and lay.size(d) == 5 and lay.has(d)
    assert lay.held([d, "sha256:" + "0" * 64]) == {d}
    assert lay.put(b"hello") == d  # idempotent
    with pytest.raises(IntegrityError):
        lay.put(b"hello", expected="sha256:" + "0" * 64)
    with pytest.raises(NotFound):
        lay.get("sha256:" + "0" * 64)
    with pytest.raises(FormatError):
        lay.path("sha256:../../etc/passwd")
    lay.path(d).write_bytes(b"hellO")
    with pytest.raises(IntegrityError):
        lay.get(d)
    assert os.listdir(lay.tmp) == []


def test_layout_put_stream_verifies_before_publishing(tmp_path: Path) -> None:
    import io

    lay = Layout(tmp_path / "s")
    lay.init()
    data = os.urandom(3 << 20)
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(IntegrityError):
        lay.put_stream(io.BytesIO(data[:-1]), good, size=len(data))
    with pytest.raises(IntegrityError):
        lay.put_stream(io.BytesIO(data + b"x"), good, size=len(data))
    with pytest.raises(IntegrityError):
        lay.put_stream(io.BytesIO(data[::-1]), good)
    assert not lay.has(good) and os.listdir(lay.tmp) == []
    assert lay.put_stream(io.BytesIO(data), good, size=len(data)) == good
    assert lay.get(good) == data


def test_store_layout_files(tmp_path: Path) -> None:
    Store.open(tmp_path / "s")
    root = tmp_path / "s"
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    validate_oci((root / "oci-layout").read_bytes(), "image-layout-schema")
    validate_oci((root / "index.json").read_bytes(), "image-index-schema")
    # opening again changes nothing
    before = {p.name: p.read_bytes() for p in (root / "index.json", root / "oci-layout")}
    Store.open(root)
    assert before == {p.name: p.read_bytes() for p in (root / "index.json", root / "oci-layout")}
