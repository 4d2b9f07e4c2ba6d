"""Deterministic CBOR (docs/spec/format.md §3): exact encodings, round trips, and every rejection."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shoal.errors import FormatError
from shoal.format import cbor

# RFC 8949 Appendix A examples that fall inside Shoal's subset
RFC_VECTORS: list[tuple[Any, str]] = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"), (100, "1864"), (1000, "1903e8"),
    (1000000, "1a000f4240"), (1000000000000, "1b000000e8d4a51000"), (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"), (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (False, "f4"), (True, "f5"), (None, "f6"), (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"), ("", "60"),
    ("a", "6161"), ("IETF", "6449455446"), ("\"\\", "62225c"), ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"), ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"), ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}, "a56161614161626142616361436164614461656145"),
]

# boundaries of every argument width
BOUNDARIES = [23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]


@pytest.mark.parametrize("value,hexstr", RFC_VECTORS, ids=[h for _, h in RFC_VECTORS])
def test_rfc_vectors(value: Any, hexstr: str) -> None:
    assert cbor.encode(value).hex() == hexstr
    assert cbor.decode(bytes.fromhex(hexstr)) == value


@pytest.mark.parametrize("n", BOUNDARIES)
def test_argument_widths(n: int) -> None:
    for v in (n, -1 - n):
        enc = cbor.encode(v)
        assert cbor.decode(enc) == v
        assert len(enc) == (1 if n < 24 else 2 if n < 2**8 else 3 if n < 2**16 else 5 if n < 2**32 else 9)
    for v in (b"x" * min(n, 70000), "y" * min(n, 70000)):
        assert cbor.decode(cbor.encode(v)) == v


def test_map_keys_sorted_bytewise_by_encoding() -> None:
    # shorter encodings first ("b" before "aa"), ints (major 0) before text (major 3), bytes before text
    assert cbor.encode({"aa": 1, "b": 2}).hex() == "a261620262616101"
    assert cbor.encode({"a": 1, 10: 2}).hex() == "a20a02616101"
    assert cbor.encode({"a": 1, b"a": 2}).hex() == "a2416102616101"
    assert cbor.encode({-1: 0, 0: 0}).hex() == "a200002000"
    assert list(cbor.decode(cbor.encode({"z": 1, "a": 2, "mm": 3}))) == ["a", "z", "mm"]


def test_encode_is_independent_of_insertion_order() -> None:
    a = {"x": 1, "y": {"b": 2, "a": 3}, 5: [1]}
    b = {5: [1], "y": {"a": 3, "b": 2}, "x": 1}
    assert cbor.encode(a) == cbor.encode(b)


def test_tuples_and_bytearrays_encode_like_lists_and_bytes() -> None:
    assert cbor.encode((1, 2)) == cbor.encode([1, 2])
    assert cbor.encode(bytearray(b"ab")) == cbor.encode(memoryview(b"ab")) == cbor.encode(b"ab")


@pytest.mark.parametrize("value", [1.0, 0.5, float("nan"), 2**64, -(2**64) - 1, {1, 2}, object(), complex(1, 1)],
                         ids=["float1", "float.5", "nan", "2^64", "-2^64-1", "set", "object", "complex"])
def test_encode_refuses(value: Any) -> None:
    with pytest.raises(FormatError):
        cbor.encode(value)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 4 or r < 0.4:
        k = rng.randrange(7)
        if k == 0:
            return rng.choice(BOUNDARIES) * rng.choice([1, -1]) + rng.choice([0, -1])
        if k == 1:
            return rng.randrange(-1000, 1000)
        if k == 2:
            return rng.randbytes(rng.choice([0, 1, 23, 24, 300]))
        if k == 3:
            return "".join(chr(rng.choice([0x41, 0xE9, 0x6C34, 0x1F600, 0x7F])) for _ in range(rng.randrange(30)))
        return [None, True, False][k - 4]
    if r < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = [rng.choice([rng.randrange(-50, 50), rng.randbytes(3), "k%d" % rng.randrange(100)]) for _ in range(5)]
    return {k: _random_value(rng, depth + 1) for k in keys}


def test_round_trip_random_values() -> None:
    rng = random.Random(2024)
    for _ in range(2000):
        v = _random_value(rng)
        enc = cbor.encode(v)
        back = cbor.decode(enc)
        assert back == v
        assert cbor.encode(back) == enc


# ------------------------------------------------------------------------------------- rejections

REJECT: dict[str, tuple[str, str]] = {
    # non-shortest arguments, for every major type that has one
    "uint-1byte": ("1801", "shortest"),
    "uint-2bytes": ("190001", "shortest"),
    "uint-4bytes": ("1a0000ffff", "shortest"),
    "uint-8bytes": ("1b00000000ffffffff", "shortest"),
    "nint-1byte": ("3817", "shortest"),
    "bytes-len": ("580161", "shortest"),
    "text-len": ("780161", "shortest"),
    "array-len": ("980100", "shortest"),
    "map-len": ("b8010000", "shortest"),
    # indefinite lengths
    "indef-bytes": ("5f4161ff", "indefinite"),
    "indef-text": ("7f6161ff", "indefinite"),
    "indef-array": ("9f01ff", "indefinite"),
    "indef-map": ("bf0101ff", "indefinite"),
    "break": ("ff", ""),
    # map keys out of order, duplicated, or not scalars
    "unsorted-keys": ("a2616202616101", "unsorted"),
    "duplicate-keys": ("a2616101616102", "duplicated"),
    "length-first-order": ("a262616101616202", "unsorted"),
    "int-after-text": ("a261610100", "unsorted"),
    "non-scalar-key": ("a18000", "key"),
    "map-key-map": ("a1a000", "key"),
    # floats and other simple values
    "half-float": ("f93c00", "float"),
    "single-float": ("fa3f800000", "float"),
    "double-float": ("fb3ff0000000000000", "float"),
    "undefined": ("f7", ""),
    "simple-0": ("e0", ""),
    "simple-32": ("f820", ""),
    # tags
    "tag-0": ("c074323031332d30332d32315432303a30343a30305a", "tag"),
    "tag-bignum": ("c249010000000000000000", "tag"),
    "tag-self-describe": ("d9d9f700", "tag"),
    # trailing bytes
    "trailing": ("0000", "trailing"),
    "trailing-after-map": ("a0ff", "trailing"),
    # lengths past the end, truncation
    "bytes-past-end": ("4301", "end"),
    "text-past-end": ("7a0fffffff61", "end"),
    "array-past-end": ("9a7fffffff00", "input"),
    "map-past-end": ("bb00000001000000000000", "input"),
    "huge-bytes": ("5bffffffffffffffff00", "end"),
    "truncated-arg": ("1901", "truncated"),
    "empty": ("", "truncated"),
    "truncated-array": ("8301", "input"),
    # reserved additional information, bad UTF-8
    "reserved-28": ("1c", ""),
    "reserved-30": ("3e", ""),
    "bad-utf8": ("62c328", "utf-8"),
    "surrogate-utf8": ("63eda080", "utf-8"),
}


@pytest.mark.parametrize("name", sorted(REJECT))
def test_decode_rejects(name: str) -> None:
    hexstr, word = REJECT[name]
    with pytest.raises(FormatError) as ei:
        cbor.decode(bytes.fromhex(hexstr))
    assert word.lower() in str(ei.value).lower()
    assert "\n" not in str(ei.value)


def test_nesting_limit() -> None:
    ok = bytes([0x81]) * (cbor.MAX_DEPTH) + b"\x00"
    assert cbor.decode(ok) is not None
    for prefix in (0x81, 0xA1):
        deep = bytes([0x81]) * cbor.MAX_DEPTH + (bytes([prefix]) + (b"\x00" if prefix == 0xA1 else b"")) + b"\x00"
        with pytest.raises(FormatError, match="deep"):
            cbor.decode(deep)
    # far too deep: must be a FormatError, never a RecursionError
    with pytest.raises(FormatError):
        cbor.decode(bytes([0x81]) * 100_000 + b"\x00")


def test_map_keys_that_python_conflates_are_rejected() -> None:
    """``1`` and ``true`` (or ``0`` and ``false``) are different CBOR keys but one Python dict key: the
    decoder must refuse rather than silently drop one, else two inputs decode to the same value."""
    for hexstr in ("a20100f500", "a20000f400"):
        with pytest.raises(FormatError):
            cbor.decode(bytes.fromhex(hexstr))


def test_decoder_accepts_only_canonical_bytes() -> None:
    """Property: whatever decodes re-encodes to exactly the input (so every value has one encoding).
    Checked on mutations of valid encodings and on random bytes."""
    rng = random.Random(7)
    tried = accepted = 0
    for _ in range(600):
        enc = bytearray(cbor.encode(_random_value(rng)))
        for _ in range(10):
            m = bytearray(enc)
            op = rng.randrange(4)
            if op == 0 and m:
                m[rng.randrange(len(m))] = rng.randrange(256)
            elif op == 1:
                m.insert(rng.randrange(len(m) + 1), rng.randrange(256))
            elif op == 2 and m:
                del m[rng.randrange(len(m))]
            else:
                m = bytearray(rng.randbytes(rng.randrange(1, 12)))
            tried += 1
            try:
                v = cbor.decode(bytes(m))
            except FormatError:
                continue
            accepted += 1
            assert cbor.encode(v) == bytes(m), f"{bytes(m).hex()} decoded to {v!r} which encodes differently"
    assert tried == 6000 and accepted > 100


# ------------------------------------------------------------------------------------- decode_fast


def test_decode_fast_agrees_with_decode() -> None:
    """``decode_fast`` (cbor2 and a byte-exact re-encode) returns exactly what ``decode`` returns, or None;
    on bytes ``decode`` refuses it returns None unless its contract leaves the refusal to the caller
    (floats, simple values, tags, key order)."""
    rng = random.Random(11)
    fast_hits = 0
    for _ in range(600):
        enc = cbor.encode(_random_value(rng))
        for m in [enc] + [bytes(rng.randbytes(1)) + enc[1:], enc[:-1], enc + b"\x00", rng.randbytes(8)]:
            fast = cbor.decode_fast(m)
            try:
                ref = cbor.decode(m)
            except FormatError:
                continue
            if fast is not None:
                fast_hits += 1
                assert fast == ref and cbor.encode(fast) == m
    assert fast_hits > 500


@pytest.mark.parametrize("name", sorted(REJECT))
def test_decode_fast_leaves_only_type_and_order_checks_to_the_caller(name: str) -> None:
    hexstr, _ = REJECT[name]
    v = cbor.decode_fast(bytes.fromhex(hexstr))
    if v is not None:  # then the refusal is one a reader that checks types and key order makes
        assert name.startswith(("half-", "single-", "double-", "simple-", "undefined", "tag-", "unsorted",
                                "length-first", "int-after", "non-scalar-key", "map-key-map")), (name, v)
