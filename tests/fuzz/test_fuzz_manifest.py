"""Fuzz the JSON parsers of manifests, image indexes, descriptors and configs, and platform parsing.

Inputs: arbitrary bytes, arbitrary JSON documents, and valid documents (a Shoal manifest made by
``build_manifest``, a classic OCI manifest and config, an image index) with JSON-level mutations.
Oracle: only ShoalError subclasses escape, within a CPU-time bound.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fuzzkit import budget, only_shoal_errors
from hypothesis import given
from hypothesis import strategies as st
from indexgen import doc_paths

from shoal import mediatypes as mt
from shoal.convert import importer
from shoal.copier import _children, descriptors_of
from shoal.format import manifest as mf
from shoal.format.platform import Platform, platform_json, select


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=20),
              st.sampled_from(["sha256:" + "0" * 64, mt.INDEX, mt.PACK, mt.CONFIG, mt.OCI_INDEX, mt.OCI_MANIFEST,
                               mt.ARTIFACT_TYPE, "1", "linux", "amd64", "linux/amd64", "//", ""])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)

_KEYS = ["schemaVersion", "mediaType", "artifactType", "config", "layers", "manifests", "annotations", "digest",
         "size", "platform", "os", "architecture", "variant", "rootfs", "diff_ids", "type", "shoal", "root",
         mt.ANN_FORMAT, mt.ANN_ROOT]


def _seeds() -> list[Any]:
    desc = mf.Descriptor(mt.CONFIG, _d(b"c"), 1)
    shoal_raw, _ = mf.build_manifest(desc, mf.Descriptor(mt.INDEX, _d(b"i"), 2),
                                     [mf.Descriptor(mt.PACK, _d(b"p"), 3)], _d(b"r"))
    cfg = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
           "rootfs": {"type": "layers", "diff_ids": [_d(b"l")]}}
    classic = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
               "config": {"mediaType": mt.OCI_CONFIG, "digest": _d(b"cfg"), "size": 10},
               "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": _d(b"l"), "size": 5}]}
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
             "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": _d(b"m1"), "size": 7,
                            "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                           {"mediaType": mt.OCI_MANIFEST, "digest": _d(b"m2"), "size": 8,
                            "platform": {"os": "linux", "architecture": "amd64"}}]}
    return [json.loads(shoal_raw), json.loads(mf.build_config(mf.ImageConfig(root=_d(b"r")))), cfg, classic, index]


SEEDS = _seeds()




@st.composite
def mutated_docs(draw: st.DrawFn) -> Any:
    doc = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))  # a private copy
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(doc_paths(doc)))
        parent, node = None, doc
        for p in path:
            parent, node = node, node[p]
        op = draw(st.sampled_from(["replace", "remove", "add", "nest", "dup"]))
        if op == "replace" or (op == "remove" and parent is None):
            new = draw(_json)
            if parent is None:
                doc = new
            else:
                parent[path[-1]] = new
        elif op == "remove":
            assert parent is not None
            del parent[path[-1]]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.sampled_from(_KEYS))] = draw(_json)
        elif op == "nest":
            v = node
            for _ in range(draw(st.integers(1, 60))):
                v = [v] if draw(st.booleans()) else {"a": v}
            if parent is None:
                doc = v
            else:
                parent[path[-1]] = v
        elif op == "dup" and isinstance(node, list) and node:
            node.append(node[0])
    return doc


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _all_byte_parsers(raw: bytes) -> None:
    only_shoal_errors(mf.json_object, raw, "manifest")
    only_shoal_errors(mf.parse_manifest, raw)
    only_shoal_errors(mf.parse_manifest, raw, _d(raw))
    only_shoal_errors(mf.parse_config, raw)
    only_shoal_errors(descriptors_of, raw)
    only_shoal_errors(_children, raw)
    only_shoal_errors(importer._parse_manifest, raw, "", _d(raw))
    only_shoal_errors(importer._parse_manifest, raw, mt.OCI_INDEX, _d(raw))
    m = importer._Manifest(_d(b"m"), mt.OCI_MANIFEST, mf.Descriptor(mt.OCI_CONFIG, _d(raw), len(raw)),
                           (mf.Descriptor(mt.OCI_LAYER_GZIP, _d(b"l"), 5),))
    only_shoal_errors(importer._image_config, raw, m, None)


def _all_doc_parsers(doc: Any) -> None:
    only_shoal_errors(mf.Descriptor.from_json, doc)
    only_shoal_errors(Platform.of, doc)
    only_shoal_errors(platform_json, doc)
    for key in ("manifests", "layers"):
        sub = doc.get(key) if isinstance(doc, dict) else doc
        only_shoal_errors(select, sub, None)
        only_shoal_errors(select, sub, "linux/amd64")
        only_shoal_errors(select, sub, "linux/arm64/v8")


@budget(150)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(raw: bytes) -> None:
    _all_byte_parsers(raw)


@budget(80)
@given(_json)
def test_arbitrary_json(doc: Any) -> None:
    _all_byte_parsers(_dump(doc))
    _all_doc_parsers(doc)


@budget(150)
@given(mutated_docs())
def test_mutated_documents(doc: Any) -> None:
    _all_byte_parsers(_dump(doc))
    _all_doc_parsers(doc)


@budget(10)
@given(st.sampled_from([b"[", b"{\"a\":", b"[{\"a\":"]), st.integers(900, 200_000))
def test_deep_nesting(open_: bytes, depth: int) -> None:
    _all_byte_parsers(b'{"schemaVersion":2,"manifests":' + open_ * depth + b"1")
    _all_byte_parsers(b'{"schemaVersion":2,"layers":' + open_ * depth + b"]" * depth + b"}")


@budget(150)
@given(st.text(max_size=40) | st.sampled_from(["linux/amd64", "linux/arm64/v8", "/", "a//b", "a/b/c/d"]))
def test_platform_parse(text: str) -> None:
    p = only_shoal_errors(Platform.parse, text)
    if p is not None:
        assert Platform.parse(str(p)) == p  # the string form parses back
