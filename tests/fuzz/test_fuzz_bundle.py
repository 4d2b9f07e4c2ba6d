"""Fuzz the profile-bundle reader (docs/spec/bundle.md §3, §4).

Oracle: only ShoalError subclasses escape, within a CPU-time bound; and a bundle that is accepted after
a mutation still holds only chunks that hash to their ids, under a tree that checks against the root
(a mutation may only be accepted where it changes nothing the root binds: another zstd encoding, say).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path
from typing import Any

import indexgen as ig
import zstandard
from fuzzkit import budget, only_shoal_errors
from hypothesis import given
from hypothesis import strategies as st

from shoal.format import bundle as fb
from shoal.format import cbor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_bundle import _make, _tree  # noqa: E402

ROOT = _tree().root
PATHS = {e.path for e in _tree().entries}
BASE = _make()
_, START = fb.read_header(BASE)


def _accepted(b: fb.Bundle | None) -> None:
    if b is not None:
        assert b.root == ROOT
        assert all(hashlib.sha256(v).digest() == k for k, v in b.chunks.items())
        assert b.dirs[0].digest() == ROOT
        # the root binds the paths too: no second spelling (``/usr`` for ``usr``) gets through
        assert {d.path for d in b.dirs} | {f.path for f in b.files} <= PATHS


@budget(150)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    _accepted(only_shoal_errors(fb.open_bundle, data, ROOT))
    _accepted(only_shoal_errors(fb.open_bundle, b"SHOALBD1" + struct.pack(">I", len(data)) + data, ROOT))


@st.composite
def _byte_mutants(draw: st.DrawFn) -> bytes:
    return ig.byte_mutation(draw, BASE)


@budget(80)
@given(_byte_mutants())
def test_byte_mutants(blob: bytes) -> None:
    _accepted(only_shoal_errors(fb.open_bundle, blob, ROOT))


@st.composite
def _header_mutants(draw: st.DrawFn) -> bytes | None:
    doc, _ = fb.read_header(BASE)
    raw = ig.encode_or_none(ig.cbor_mutation(draw, doc))
    if raw is None:
        return None
    hz = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw)
    return fb.MAGIC + struct.pack(">I", len(hz)) + hz + BASE[START:]


@budget(120)
@given(_header_mutants())
def test_header_mutants(blob: bytes | None) -> None:
    if blob is not None:
        _accepted(only_shoal_errors(fb.open_bundle, blob, ROOT))


@budget(60)
@given(ig.cbor_values)
def test_arbitrary_headers(value: Any) -> None:
    hz = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(cbor.encode(value))
    _accepted(only_shoal_errors(fb.open_bundle, fb.MAGIC + struct.pack(">I", len(hz)) + hz, ROOT))
