"""Golden FastCDC cut points (docs/spec/chunking.md).  These values are pinned forever: a change to the
parameters, the gear table or the library that moves any cut point is a new format version.

How the values were made: by running ``shoal.chunking.get_chunker().cut`` once on the buffers below
(pyfastcdc 0.3.1), checking them for plausibility (every chunk 16 KiB..256 KiB except the last,
lengths summing to the buffer), and pasting them here.

Buffers:
- A: ``counter_sha256(1.5 MiB)``: sha256 of the 8-byte big-endian counters 0, 1, 2, ... concatenated.
- B: ``text_like(4 MiB)``: the same bytes mapped onto "etaoin shrdlu\\n" (low entropy).
- Z: 1 MiB of zero bytes (no content boundary: every cut is at the maximum size).
"""

from __future__ import annotations

import hashlib

import pytest
from tinytree import counter_sha256, text_like

from shoal.chunking import PARAMS_V1, get_chunker

MIN, MAX = 16 * 1024, 256 * 1024

GOLDEN = {
    "A": (
        3 * 512 * 1024,
        "63b9ab2ba24e40d9b5dc51b7409f34eb3c525a0041ea21ca0c9cdb7a59dea3db",
        [88202, 212656, 259621, 300369, 356875, 487458, 580554, 625443, 671603, 780442, 803939, 851615,
         1005110, 1071145, 1201259, 1368021, 1435767, 1468967, 1562567, 1572864],
    ),
    "B": (
        4 << 20,
        "6aa2e7a461c39c6e11db0d466c58a708fa700044acdc31b94065f7b6254b94d3",
        [129236, 195127, 227907, 269203, 347029, 399325, 499766, 610872, 684027, 805565, 959675, 1032260,
         1110455, 1187662, 1221072, 1242889, 1357277, 1426384, 1494635, 1538171, 1597310, 1676078, 1809740,
         1829949, 1871811, 1959890, 2037527, 2063344, 2153033, 2268509, 2294411, 2386485, 2457916, 2537753,
         2720077, 2814986, 2925359, 2998620, 3096252, 3169116, 3235730, 3301669, 3331875, 3358466, 3506345,
         3579815, 3646803, 3676254, 3801375, 3867993, 3959774, 4044084, 4134868, 4194304],
    ),
    "Z": (
        1 << 20,
        "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58",
        [262144, 524288, 786432, 1048576],
    ),
}


def _buffer(name: str) -> bytes:
    n = GOLDEN[name][0]
    return {"A": counter_sha256, "B": text_like, "Z": bytes}[name](n)


def test_parameters_are_v1() -> None:
    assert (PARAMS_V1.min_size, PARAMS_V1.avg_size, PARAMS_V1.max_size, PARAMS_V1.normalization) == (
        16384, 65536, 262144, 1)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_cut_points(name: str) -> None:
    n, sha, ends = GOLDEN[name]
    buf = _buffer(name)
    assert len(buf) == n and hashlib.sha256(buf).hexdigest() == sha, "the test buffer itself changed"
    cuts = list(get_chunker().cut(buf))
    assert [o + ln for o, ln in cuts] == ends
    # contiguous, and every chunk but the last within [min, max]
    assert [o for o, _ in cuts] == [0] + ends[:-1]
    assert all(MIN <= ln <= MAX for _, ln in cuts[:-1]) and 0 < cuts[-1][1] <= MAX


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_cut_points_do_not_depend_on_buffer_type(name: str) -> None:
    buf = _buffer(name)
    c = get_chunker()
    assert list(c.cut(bytearray(buf))) == list(c.cut(memoryview(buf))) == list(c.cut(buf))


def test_boundaries_resynchronise_after_an_edit() -> None:
    """Content-defined: inserting bytes near the start moves only the first cut or two."""
    buf = _buffer("A")
    ends = {o + ln for o, ln in get_chunker().cut(buf)}
    edited = buf[:1000] + b"inserted" + buf[1000:]
    ends2 = {o + ln - 8 for o, ln in get_chunker().cut(edited)}
    assert len(ends & ends2) >= len(ends) - 2


def test_small_and_empty() -> None:
    c = get_chunker()
    assert list(c.cut(b"")) == []
    assert list(c.cut(b"x")) == [(0, 1)]
    assert list(c.cut(counter_sha256(MIN))) == [(0, MIN)]
