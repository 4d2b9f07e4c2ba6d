"""Fuzz the CBOR decoder and the index decoder (docs/spec/format.md §3, §4).

Oracle: only ShoalError subclasses escape, within a CPU-time bound; and what decodes re-encodes to
the same bytes (the decoder accepts exactly the encoder's output).
"""

from __future__ import annotations

from typing import Any

import indexgen as ig
from fuzzkit import budget, only_shoal_errors
from hypothesis import given
from hypothesis import strategies as st

from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.lazyindex import decode_lazy
from shoal.format.model import Kind


@budget(200)
@given(st.binary(max_size=300))
def test_cbor_decode_arbitrary_bytes(data: bytes) -> None:
    value = only_shoal_errors(cbor.decode, data)
    if value is not None or data == b"\xf6":
        assert cbor.encode(value) == data  # canonical: one encoding per value


@budget(40)
@given(ig.cbor_values)
def test_cbor_round_trip(value: Any) -> None:
    raw = cbor.encode(value)
    back = cbor.decode(raw)
    assert cbor.encode(back) == raw


@st.composite
def _cbor_byte_mutants(draw: st.DrawFn) -> bytes:
    return ig.byte_mutation(draw, cbor.encode(draw(ig.cbor_values)))


@budget(50)
@given(_cbor_byte_mutants())
def test_cbor_decode_mutated(mutated: bytes) -> None:
    back = only_shoal_errors(cbor.decode, mutated)
    if back is not None or mutated == b"\xf6":
        assert cbor.encode(back) == mutated


@budget(150)
@given(st.binary(max_size=300))
def test_index_decode_arbitrary_bytes(data: bytes) -> None:
    only_shoal_errors(fidx.decode, data)


@budget(150)
@given(st.binary(max_size=300))
def test_index_decompress_arbitrary_bytes(data: bytes) -> None:
    raw = only_shoal_errors(fidx.decompress, data, 1 << 20)
    if raw is not None:
        only_shoal_errors(fidx.decode, raw)


@budget(15)
@given(ig.indexes())
def test_built_index_round_trips(idx: fidx.Index) -> None:
    raw = fidx.encode(idx)
    assert fidx.decode(raw) == idx
    assert fidx.decode(fidx.decompress(fidx.compress(raw))) == idx


@st.composite
def _byte_mutants(draw: st.DrawFn) -> bytes:
    return ig.byte_mutation(draw, fidx.encode(draw(ig.indexes())))


@st.composite
def _cbor_mutants(draw: st.DrawFn) -> bytes | None:
    return ig.encode_or_none(ig.cbor_mutation(draw, cbor.decode(fidx.encode(draw(ig.indexes())))))


@st.composite
def _compressed_mutants(draw: st.DrawFn) -> bytes:
    return ig.byte_mutation(draw, fidx.compress(fidx.encode(draw(ig.indexes()))))


def _decode_checked(raw: bytes) -> None:
    idx = only_shoal_errors(fidx.decode, raw)
    if idx is not None:
        assert fidx.encode(idx) == raw, "index decoded from non-canonical bytes"


@budget(40)
@given(_byte_mutants())
def test_index_decode_byte_mutants(raw: bytes) -> None:
    _decode_checked(raw)


@budget(50)
@given(_cbor_mutants())
def test_index_decode_cbor_mutants(raw: bytes | None) -> None:
    if raw is not None:
        _decode_checked(raw)


@budget(40)
@given(_compressed_mutants())
def test_index_decompress_mutants(blob: bytes) -> None:
    raw = only_shoal_errors(fidx.decompress, blob, 1 << 20)
    if raw is not None:
        _decode_checked(raw)


def _walk_lazy(raw: bytes) -> list[Any] | None:
    """Every entry of the lazily decoded index, and every hardlink resolved (None if any is refused)."""
    lz = decode_lazy(raw)
    out = list(lz.entries)
    for i, e in enumerate(out):
        if e.kind == Kind.HARDLINK:
            lz.primary(i)
    return out


def _lazy_agrees(raw: bytes) -> None:
    """A mount's lazy decoder serves exactly what ``decode`` accepts: where both accept, the same
    entries; where only the lazy one does, the bytes are merely a non-canonical encoding (a mount
    leaves that check to fsck and pull, format.md §6.2)."""
    eager = only_shoal_errors(fidx.decode, raw)
    walked = only_shoal_errors(_walk_lazy, raw)
    if eager is not None:
        assert walked == list(eager.entries)
    elif walked is not None:
        assert cbor.decode_fast(raw) is None, "the lazy decoder served an index decode refuses"


@budget(40)
@given(_cbor_mutants())
def test_lazy_index_agrees_on_cbor_mutants(raw: bytes | None) -> None:
    if raw is not None:
        _lazy_agrees(raw)


@budget(30)
@given(_byte_mutants())
def test_lazy_index_agrees_on_byte_mutants(raw: bytes) -> None:
    _lazy_agrees(raw)
