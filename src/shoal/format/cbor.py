"""Deterministic CBOR (RFC 8949 §4.2.1 core deterministic encoding), the subset Shoal uses.

Spec: docs/spec/format.md §3.  Allowed items: unsigned and negative integers
(< 2**64), byte strings, UTF-8 text strings, arrays, maps, ``null``, ``true``
and ``false``.  Arguments use the shortest form, lengths are definite, and map
keys are sorted by the bytewise order of their encodings.  The decoder accepts
exactly the encoder's output and nothing else, so every value has one encoding.
"""

from __future__ import annotations

import struct
from typing import Any

from shoal.errors import FormatError, HostileInput

__all__ = ["encode", "encode_fast", "decode", "decode_fast", "decode_items", "array_length", "decode_canonical", "head",
           "MAX_DEPTH"]

MAX_DEPTH = 16

_PACK_B = struct.Struct(">B").pack
_PACK_H = struct.Struct(">H").pack
_PACK_I = struct.Struct(">I").pack
_PACK_Q = struct.Struct(">Q").pack


_SMALL = [[bytes([(m << 5) | n]) for n in range(24)] for m in range(8)]


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return _SMALL[major][n]
    mt = major << 5
    if n < 0x100:
        return _PACK_B(mt | 24) + _PACK_B(n)
    if n < 0x10000:
        return _PACK_B(mt | 25) + _PACK_H(n)
    if n < 0x100000000:
        return _PACK_B(mt | 26) + _PACK_I(n)
    if n < 0x10000000000000000:
        return _PACK_B(mt | 27) + _PACK_Q(n)
    raise FormatError("integer out of CBOR range")


head = _head  # the head of an item of major type ``major`` with argument ``n``, for hand-built encodings


def _enc(v: Any, out: bytearray) -> None:
    t = type(v)  # exact-type fast paths first: this runs for every item of every index
    if t is bytes:
        out += _head(2, len(v))
        out += v
    elif t is int:
        out += _head(0, v) if v >= 0 else _head(1, -1 - v)
    elif t is list or t is tuple:
        out += _head(4, len(v))
        for item in v:
            _enc(item, out)
    elif t is dict:
        _enc_map(v, out)
    elif t is str:
        b = v.encode("utf-8")
        out += _head(3, len(b))
        out += b
    elif v is None:
        out.append(0xF6)
    elif v is True:
        out.append(0xF5)
    elif v is False:
        out.append(0xF4)
    elif isinstance(v, int):
        _enc(int(v), out)
    elif isinstance(v, (bytearray, memoryview)):
        _enc(bytes(v), out)
    else:
        raise FormatError(f"cannot encode {type(v).__name__} in CBOR")


def _enc_map(v: dict[Any, Any], out: bytearray) -> None:
    pairs: list[tuple[bytes, Any]] = []
    for k, val in v.items():
        kbuf = bytearray()
        _enc(k, kbuf)
        pairs.append((bytes(kbuf), val))
    pairs.sort(key=lambda p: p[0])
    for i in range(1, len(pairs)):
        if pairs[i][0] == pairs[i - 1][0]:
            raise FormatError("duplicate map key")
    out += _head(5, len(pairs))
    for kb, val in pairs:
        out += kb
        _enc(val, out)


def encode(value: Any) -> bytes:
    """The one deterministic encoding of ``value``."""
    out = bytearray()
    _enc(value, out)
    return bytes(out)


class _Decoder:
    __slots__ = ("buf", "pos", "end", "left")

    def __init__(self, buf: bytes, max_items: int | None = None) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.left = max_items  # array elements and map keys and values still allowed; None: no limit

    def take(self, n: int) -> None:
        """Charge ``n`` items to the budget before they are decoded (HostileInput when it runs out)."""
        if self.left is not None:
            self.left -= n
            if self.left < 0:
                raise HostileInput(f"CBOR at byte {self.pos}: more items than the limit")

    def fail(self, why: str) -> FormatError:
        return FormatError(f"malformed CBOR at byte {self.pos}: {why}")

    def arg(self, info: int) -> int:
        buf, pos = self.buf, self.pos
        if info < 24:
            return info
        if info == 24:
            size, minimum = 1, 24
        elif info == 25:
            size, minimum = 2, 0x100
        elif info == 26:
            size, minimum = 4, 0x10000
        elif info == 27:
            size, minimum = 8, 0x100000000
        else:
            raise self.fail("indefinite length or reserved argument")
        if pos + size > self.end:
            raise self.fail("truncated")
        n = int.from_bytes(buf[pos : pos + size], "big")
        if n < minimum:
            raise self.fail("argument not in shortest form")
        self.pos = pos + size
        return n

    def item(self, depth: int) -> Any:
        pos = self.pos
        if pos >= self.end:
            raise self.fail("truncated")
        ib = self.buf[pos]
        self.pos = pos + 1
        major, info = ib >> 5, ib & 31
        if major > 5:
            if major == 7:
                if info == 20:
                    return False
                if info == 21:
                    return True
                if info == 22:
                    return None
                raise self.fail("floats and other simple values are not allowed")
            raise self.fail("tags are not allowed")
        n = info if info < 24 else self.arg(info)  # every item of majors 0-5 has an argument
        if major == 0:
            return n
        if major == 2 or major == 3:
            start = self.pos
            if n > self.end - start:
                raise self.fail("string runs past the end")
            self.pos = start + n
            raw = self.buf[start : start + n]
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("text string is not UTF-8") from None
        if major == 4:
            if depth >= MAX_DEPTH:
                raise self.fail("nested too deeply")
            if n > self.end - self.pos:
                raise self.fail("array longer than the input")
            self.take(n)
            item, d = self.item, depth + 1
            return [item(d) for _ in range(n)]
        if major == 5:
            if depth >= MAX_DEPTH:
                raise self.fail("nested too deeply")
            if 2 * n > self.end - self.pos:
                raise self.fail("map longer than the input")
            self.take(2 * n)
            out: dict[Any, Any] = {}
            prev = b""
            for i in range(n):
                kstart = self.pos
                k = self.item(depth + 1)
                kraw = self.buf[kstart : self.pos]
                if i and kraw <= prev:
                    raise self.fail("map keys unsorted or duplicated")
                prev = kraw
                if isinstance(k, (list, dict)):
                    raise self.fail("map key must be a scalar")
                if k in out:  # e.g. 1 and true are equal keys in Python
                    raise self.fail("map keys unsorted or duplicated")
                out[k] = self.item(depth + 1)
            return out
        return -1 - n  # major 1


def decode(data: bytes, max_items: int | None = None) -> Any:
    """Decode one canonical item that fills ``data`` exactly, or raise FormatError; with ``max_items``,
    HostileInput as soon as the arrays and maps hold more items (elements, keys and values) in all:
    a decoded item costs ~60 bytes and ~2 us where its encoding may cost one byte."""
    d = _Decoder(bytes(data), max_items)
    value = d.item(0)
    if d.pos != d.end:
        raise FormatError(f"malformed CBOR: {d.end - d.pos} trailing bytes")
    return value


def decode_fast(data: bytes, exact: bool = True) -> Any | None:
    """A quick decode for large documents whose reader checks every value it uses (the index):
    ``cbor2``'s C decoder, then proof that ``data`` is exactly the encoding of what it decoded.

    Returns the value, or None when cbor2 refuses the bytes or they are not exactly its encoding; the
    caller then decodes with ``decode``, which refuses them in its own words.  What a returned value
    guarantees: definite lengths, shortest arguments, no duplicate map keys, at most ``MAX_DEPTH``
    levels, and nothing in ``data`` but the encoding of the value.  What it does not: cbor2 decodes
    floats, simple values, tagged items (a bignum is an ``int`` of 2**64 or more) and array or map keys
    (as immutable objects), and keeps map keys in input order, so the caller MUST check the exact type
    and range of every value and the order of every map's keys, as ``index.decode`` does.  Re-encoding
    with cbor2 and comparing bytes costs less than either decoder's own checks: 12 + 21 ms against
    115 ms for the 778 KB index of bookworm minbase (docs/spec/format.md §8).

    ``exact=False`` skips the re-encoding: the value is still what cbor2 decodes with definite lengths
    and no duplicate map keys, but ``data`` may be a non-canonical encoding of it (for a reader whose
    bytes a digest already binds and that checks every value it uses: a mount, format.md §6.2).
    """
    import cbor2

    try:
        value = cbor2.loads(data, max_depth=MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False)
        same = not exact or cbor2.dumps(value) == data
    except (cbor2.CBORError, ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return None
    return value if same else None


def array_length(data: bytes, at: int) -> int | None:
    """The item count in the head of the definite-length array at ``data[at]``, or None if no such head
    is there (the array itself is not read)."""
    if not 0 <= at < len(data) or data[at] >> 5 != 4:
        return None
    ai = data[at] & 31
    if ai < 24:
        return ai
    width = {24: 1, 25: 2, 26: 4, 27: 8}.get(ai)
    if width is None or at + 1 + width > len(data):
        return None
    return int.from_bytes(data[at + 1 : at + 1 + width], "big")


def decode_items(data: bytes, start: int, count: int, depth: int = MAX_DEPTH) -> tuple[list[Any], int] | None:
    """``count`` consecutive items of ``data`` from offset ``start`` (e.g. a map's first keys and values,
    after its head), by cbor2's C decoder as ``decode_fast(exact=False)`` decodes, each at most ``depth``
    levels deep; with the offset after the last.  None if cbor2 refuses them or they run past the end.

    A document's parts decoded this way are what decoding it whole gives (every CBOR item is
    self-delimiting), so a reader may decode a large part only when it needs it (the index's entries,
    format.md §6.2); the caller checks every value, as for ``decode_fast``."""
    import io

    import cbor2

    if not 0 <= start <= len(data):
        return None
    fp = io.BytesIO(data)
    fp.seek(start)
    dec = cbor2.CBORDecoder(fp, max_depth=depth, allow_indefinite=False, allow_duplicate_keys=False)
    try:
        items = [dec.decode() for _ in range(count)]
    except (cbor2.CBORError, ValueError, TypeError, RecursionError, MemoryError, OverflowError, EOFError):
        return None
    end = fp.tell()  # cbor2 seeks back over what it read ahead: exactly the bytes of the items
    return (items, end) if end <= len(data) else None


def decode_canonical(data: bytes, max_items: int) -> Any:
    """``decode(data, max_items)``, quicker: cbor2's C decoder when ``data`` cannot hold more than
    ``max_items`` items (each takes at least a byte), accepted only if cbor2's canonical re-encoding is
    exactly ``data`` (keys sorted, as ``decode`` demands, in every map whose keys share one type;
    a map mixing key types is sorted differently by cbor2 and goes to ``decode``); else ``decode``.
    The caller checks the exact type of every value it uses (cbor2 also decodes floats, tags and
    simple values: their encodings may be canonical, but they are outside Shoal's subset)."""
    if len(data) <= max_items:
        import cbor2

        try:
            value = cbor2.loads(data, max_depth=MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False)
            if cbor2.dumps(value, canonical=True) == data:
                return value
        except (cbor2.CBORError, ValueError, TypeError, RecursionError, MemoryError, OverflowError):
            pass
    return decode(data, max_items)


def encode_fast(value: Any) -> bytes:
    """``encode(value)`` by cbor2's C encoder, for values of Shoal's subset whose maps each have keys of
    one type (there cbor2's canonical order is the bytewise order of §3) and whose integers are in
    range; the values of a checked bundle or index are."""
    import cbor2

    return cbor2.dumps(value, canonical=True)
