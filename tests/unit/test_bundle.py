"""Profile bundles (docs/spec/bundle.md): encoding goldens, the checks against the root, hostile input."""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable

import pytest
import zstandard
from test_index import _random_index

from shoal.errors import FormatError, HostileInput, IntegrityError
from shoal.format import bundle as fb
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.model import Entry, Frame, Index, Kind

T = 1_700_000_000 * 10**9
CHUNKS = [bytes([i]) * (1000 + 37 * i) + b"chunk %d" % i for i in range(6)]
IDS = [hashlib.sha256(c).digest() for c in CHUNKS]


def _tree() -> Index:
    """usr/bin/tool (chunks 0, 1, 2), usr/lib/libx.so (3, 4), etc/conf (5), a symlink, a hardlink, a device."""
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"bin", Kind.SYMLINK, 0o777, 0, 0, T, target=b"usr/bin"),
         Entry(b"dev", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"dev/null", Kind.CHAR, 0o666, 0, 0, T, rdev=(1, 3)),
         Entry(b"etc", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"etc/conf", Kind.FILE, 0o644, 0, 0, T, ((b"user.k", b"v"),), len(CHUNKS[5]), chunks=(5,)),
         Entry(b"usr", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"usr/bin", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"usr/bin/tool", Kind.FILE, 0o755, 0, 0, T, size=sum(map(len, CHUNKS[:3])), chunks=(0, 1, 2)),
         Entry(b"usr/bin/tool2", Kind.HARDLINK, 0o755, 0, 0, T, target=b"usr/bin/tool"),
         Entry(b"usr/lib", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"usr/lib/libx.so", Kind.FILE, 0o644, 0, 0, T, size=sum(map(len, CHUNKS[3:5])), chunks=(3, 4))]
    return fidx.make_index(e, IDS, [0] * 6, [0] * 6, [len(c) for c in CHUNKS], [Frame(0, 0, 1, 1)], [b"\0" * 32])


def _read(ci: int) -> bytes:
    return CHUNKS[ci]


def _make(idx: Index | None = None, **kw: Any) -> bytes:
    """The workload: lists /usr/bin, reads usr/bin/tool2 (its primary's chunks 1 then 0) and libx.so (4)."""
    idx = idx or _tree()
    return fb.make(idx, kw.pop("dirs", [7]), kw.pop("files", [9, 11]), kw.pop("chunks", [1, 0, 4]), _read,
                   **kw)


def test_golden_bytes() -> None:
    blob = _make()
    doc, _ = fb.read_header(blob)
    # the format first (the header's canonical CBOR), then the bytes, which also depend on the zstd
    # library's exact output at level 19 (bundle.md §2.3), as the tiny-tree manifest does
    assert hashlib.sha256(cbor.encode(doc)).hexdigest() == GOLDEN_HEADER
    assert blob[:8] == b"SHOALBD1"
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_BLOB
    assert _make() == blob


GOLDEN_HEADER = "3c602cbe2e721521beacd5c5e9621bef5559021ee37368d9a20cb9ddf00293a4"
GOLDEN_BLOB = "2331be0752186ed00c686fdc613bee37343a211f854e223ae12cb06255cb8f2e"


def test_golden_header() -> None:
    idx = _tree()
    doc, start = fb.read_header(_make(idx))
    assert doc["root"] == idx.root
    assert [d[0] for d in doc["dirs"]] == [b"", b"usr", b"usr/bin", b"usr/lib"]  # ancestors, index order
    assert [d[1] for d in doc["dirs"]] == [0, 6, 7, 10]
    assert doc["dirs"][2][3] == [[b"tool", 1, 0o755, 0, 0, T, {}, 3132, hashlib.sha256(b"".join(IDS[:3])).digest()],
                                 [b"tool2", 3, b"usr/bin/tool"]]
    assert doc["dirs"][2][4] == struct.pack(">II", 8, 9)
    assert [f[0] for f in doc["files"]] == [b"usr/bin/tool", b"usr/lib/libx.so"]  # the hardlink's primary
    assert doc["chunks"] == struct.pack(">6I", 0, 1, 0, 0, 1, 1)  # first-read order: tool#1, tool#0, libx#1
    assert doc["frames"] == struct.pack(">II", 3, len(_make(idx)) - start)


def test_open_returns_the_verified_chunks_in_first_read_order() -> None:
    idx = _tree()
    b = fb.open_bundle(_make(idx), idx.root)
    assert list(b.chunks) == [IDS[1], IDS[0], IDS[4]]
    assert b.chunks[IDS[4]] == CHUNKS[4]
    assert [f.path for f in b.files] == [b"usr/bin/tool", b"usr/lib/libx.so"]
    assert b.files[0].ids == tuple(IDS[:3])


def test_small_frames_and_other_levels_read_the_same() -> None:
    idx = _tree()
    a = fb.open_bundle(_make(idx, frame_target=1, level=3), idx.root)
    assert len(a.frames) == 3
    assert a.chunks == fb.open_bundle(_make(idx), idx.root).chunks


def test_the_first_frames_are_small_then_four_times_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """§2.3: frame n closes at min(FRAME_TARGET, FIRST_FRAME * 4^n): the first reads (a runtime's
    /etc/passwd) wait for one small frame, not a whole 1 MiB one."""
    assert [fb.frame_target_of(n) for n in range(5)] == [64 << 10, 256 << 10, 1 << 20, 1 << 20, 1 << 20]
    assert fb.frame_target_of(40) == fb.FRAME_TARGET and fb.frame_target_of(1, 100_000) == 100_000
    idx = _tree()
    monkeypatch.setattr(fb, "FIRST_FRAME", 1000)  # the chunks here are 1,000-1,200 bytes
    blob = fb.make(idx, [], [5, 8, 11], [5, 1, 0, 4, 3, 2], _read)
    doc, _ = fb.read_header(blob)
    rows = [struct.unpack_from(">II", doc["frames"], 8 * i) for i in range(len(doc["frames"]) // 8)]
    assert [n for n, _ in rows] == [1, 4, 1]  # >= 1,000 bytes, then >= 4,000, then the rest
    assert fb.open_bundle(blob, idx.root).chunks == {IDS[c]: CHUNKS[c] for c in (5, 1, 0, 4, 3, 2)}


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_check_against_their_root(seed: int) -> None:
    """Every kind of record (devices, fifos, symlinks, hardlinks, xattrs, non-UTF-8 names) hashes as the
    index's Merkle code does: a bundle of any directories and files checks against the root."""
    idx = _random_index(seed)
    dirs = [i for i, e in enumerate(idx.entries) if e.kind == Kind.DIR][::3]
    files = [i for i, e in enumerate(idx.entries) if e.kind in (Kind.FILE, Kind.HARDLINK)][::2]
    chunks = sorted({c for i in files for c in idx.entries[idx.primary(i)].chunks}, reverse=True)
    raw = _chunks_of(seed)
    b = fb.open_bundle(fb.make(idx, dirs, files, chunks, raw.__getitem__, level=3), idx.root)
    assert list(b.chunks) == [idx.chunk_ids[c] for c in chunks]
    assert all(hashlib.sha256(v).digest() == k for k, v in b.chunks.items())


def _chunks_of(seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)  # the chunks _random_index draws first
    return [rng.randbytes(rng.randrange(1, 5000)) for _ in range(40)]


# ------------------------------------------------------------------------------------ hostile bundles


def _rewrite(blob: bytes, mutate: Callable[[dict[str, Any]], None], data: bytes | None = None) -> bytes:
    """``blob`` with its header changed by ``mutate`` (re-encoded canonically) and, if given, other data."""
    doc, start = fb.read_header(blob)
    mutate(doc)
    hz = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(cbor.encode(doc))
    return b"SHOALBD1" + struct.pack(">I", len(hz)) + hz + (blob[start:] if data is None else data)


def _refused(blob: bytes, err: type[Exception], words: str, root: bytes | None = None) -> None:
    with pytest.raises(err) as info:
        fb.open_bundle(blob, _tree().root if root is None else root)
    assert words in str(info.value)


def test_a_wrong_chunk_is_refused() -> None:
    blob = _make()
    _, start = fb.read_header(blob)
    bad = bytearray(zstandard.ZstdDecompressor().decompress(blob[start:]))
    bad[5] ^= 1  # a bit of the first chunk (usr/bin/tool's chunk 1)
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(bad))

    def frames(doc: dict[str, Any]) -> None:
        doc["frames"] = struct.pack(">II", 3, len(z))

    _refused(_rewrite(blob, frames, z), IntegrityError, f"chunk sha256:{IDS[1].hex()} failed verification")


def test_a_chunk_swapped_for_another_file_s_is_refused() -> None:
    def swap(doc: dict[str, Any]) -> None:  # data says tool#1, the table now says etc/conf's... not listed
        doc["chunks"] = struct.pack(">6I", 0, 2, 0, 0, 1, 1)

    _refused(_rewrite(_make(), swap), IntegrityError, "data frame 0 declares 3206 bytes, its chunks hold 3243")


def test_a_wrong_record_is_refused() -> None:
    def setuid(doc: dict[str, Any]) -> None:
        doc["dirs"][2][3][0][2] = 0o4755  # usr/bin/tool made setuid: usr/bin's digest no longer matches

    _refused(_rewrite(_make(), setuid), IntegrityError, "Merkle digest mismatch at b'usr/bin'")


def test_a_wrong_directory_metadata_is_refused() -> None:
    def mode(doc: dict[str, Any]) -> None:
        doc["dirs"][0][2][0] = 0o777

    _refused(_rewrite(_make(), mode), IntegrityError, "Merkle digest mismatch at the root")


def test_wrong_chunk_ids_of_a_file_are_refused() -> None:
    def ids(doc: dict[str, Any]) -> None:
        f = doc["files"][0]
        f[1] = f[1][32:64] + f[1][:32] + f[1][64:]  # two chunks swapped: same bytes, another file

    _refused(_rewrite(_make(), ids), IntegrityError, "chunk ids of b'usr/bin/tool' do not match its record")


def test_wrong_lengths_are_refused() -> None:
    def lengths(doc: dict[str, Any]) -> None:
        doc["files"][1][2] = struct.pack(">II", 1, 1)

    _refused(_rewrite(_make(), lengths), IntegrityError, "do not add up to its size")


def test_a_file_outside_the_listed_tree_is_refused() -> None:
    def outside(doc: dict[str, Any]) -> None:
        doc["files"].append([b"zz/file", b"", b""])

    _refused(_rewrite(_make(), outside), FormatError, "is not a listed directory's file")


def test_absolute_spellings_of_listed_paths_are_refused() -> None:
    """``/usr`` splits into the root and ``usr`` as ``usr`` does: it was accepted with usr's records,
    a second spelling of the tree (and of its files) beside the canonical one."""
    def dirs(doc: dict[str, Any]) -> None:
        for d in doc["dirs"][1:]:
            d[0] = b"/" + d[0]

    def files(doc: dict[str, Any]) -> None:
        doc["files"][0][0] = b"/" + doc["files"][0][0]
        doc["files"].sort(key=lambda f: f[0].split(b"/"))

    _refused(_rewrite(_make(), dirs), FormatError, "directory b'/usr' is not a listed directory's child")
    _refused(_rewrite(_make(), files), FormatError, "file b'/usr/bin/tool' is not a listed directory's file")


def test_a_truncated_bundle_is_refused() -> None:
    blob = _make()
    for cut in (len(blob) - 1, len(blob) - 200, 40, 11, 5):
        with pytest.raises(IntegrityError, match="truncated"):
            fb.open_bundle(blob[:cut], _tree().root)
    _refused(blob + b"\0", IntegrityError, "truncated?")


def test_another_image_s_bundle_is_refused() -> None:
    _refused(_make(), IntegrityError, "made for another root", root=b"\1" * 32)


def test_bad_magic_and_bombs_are_refused() -> None:
    _refused(b"SHOALBD2" + _make()[8:], FormatError, "bad magic")
    big = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"\0" * (17 << 20))
    _refused(b"SHOALBD1" + struct.pack(">I", len(big)) + big, HostileInput, "limit")
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(cbor.encode({}))
    _refused(b"SHOALBD1" + struct.pack(">I", len(nosize)) + nosize, HostileInput, "declares")


def test_a_header_of_many_tiny_items_is_refused_before_it_is_decoded() -> None:
    """A few hundred bytes of zstd inflating to 16 MiB of empty arrays (16M Python lists: 39 s and
    1.2 GB to decode) are refused by the item budget, not after decoding them (bundle.md §4)."""
    n = (16 << 20) - 200
    items = b"\x9a" + struct.pack(">I", n) + b"\x80" * n  # an array of n empty arrays
    doc = {"chunks": b"", "dirs": [], "files": [], "format": 1, "frames": b"", "root": _tree().root}
    raw = cbor.encode(doc).replace(b"ddirs\x80", b"ddirs" + items)
    hz = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    assert len(hz) < 4096
    blob = b"SHOALBD1" + struct.pack(">I", len(hz)) + hz
    _refused(blob, HostileInput, "more CBOR items than")
    # the budget grows with the header's compressed bytes: a real header is far within it
    doc, _ = fb.read_header(_make(), fb.Limits(header_items=0))
    assert doc["root"] == _tree().root
    with pytest.raises(HostileInput, match="more CBOR items"):
        fb.read_header(_make(), fb.Limits(header_items=0, items_per_byte=0))


def test_chunk_tables_longer_than_the_files_are_refused_before_unpacking() -> None:
    def long_refs(doc: dict[str, Any]) -> None:
        doc["chunks"] = b"\0" * 8 * 6  # 6 references, the listed files have 5 chunks

    def long_frames(doc: dict[str, Any]) -> None:
        doc["frames"] = b"\0" * 8 * 4  # 4 frames for 3 chunks

    _refused(_rewrite(_make(), long_refs), FormatError, "more chunk references than the files' chunks")
    _refused(_rewrite(_make(), long_frames), FormatError, "more frames than chunks")


def test_a_data_frame_declaring_another_size_is_refused() -> None:
    blob = _make()
    _, start = fb.read_header(blob)
    data = zstandard.ZstdDecompressor().decompress(blob[start:])
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data + b"x" * 100_000)

    def frames(doc: dict[str, Any]) -> None:
        doc["frames"] = struct.pack(">II", 3, len(z))

    _refused(_rewrite(blob, frames, z), IntegrityError, "declares 103206 bytes, its chunks hold 3206")


def test_duplicate_and_out_of_range_chunks_are_refused() -> None:
    def dup(doc: dict[str, Any]) -> None:
        doc["chunks"] = struct.pack(">6I", 0, 1, 0, 1, 1, 1)

    def out(doc: dict[str, Any]) -> None:
        doc["chunks"] = struct.pack(">6I", 0, 1, 0, 9, 1, 1)

    _refused(_rewrite(_make(), dup), FormatError, "a chunk twice")
    _refused(_rewrite(_make(), out), FormatError, "out of range")


def test_limits_apply() -> None:
    blob = _make()
    with pytest.raises(HostileInput, match="larger than"):
        fb.open_bundle(blob, _tree().root, fb.Limits(blob=len(blob) - 1))
    with pytest.raises(HostileInput, match="too many chunk references"):
        fb.open_bundle(blob, _tree().root, fb.Limits(chunks=4))
    with pytest.raises(HostileInput, match="too many child records"):
        fb.open_bundle(blob, _tree().root, fb.Limits(children=5))


# ------------------------------------------------------------------------------------ the partial tree


@pytest.mark.parametrize("seed", range(12))
def test_partial_tree_gives_the_index_s_entries(seed: int) -> None:
    """What a mount could serve before the index arrives is exactly what the index says, where it says
    anything: entries (but chunk numbers), listings, positions, and each read file's chunk ids."""
    import dataclasses

    idx = _random_index(seed)
    dirs = [i for i, e in enumerate(idx.entries) if e.kind == Kind.DIR][::2]
    files = [i for i, e in enumerate(idx.entries) if e.kind in (Kind.FILE, Kind.HARDLINK)][::3]
    raw = _chunks_of(seed)
    b = fb.open_bundle(fb.make(idx, dirs, files, [], raw.__getitem__, level=3), idx.root)
    t = fb.PartialTree(b)
    t.check_positions(idx)
    known = 0
    for pos, e in enumerate(idx.entries):
        got = t.entry(pos)
        if got is not None:
            assert got == dataclasses.replace(e, chunks=()), e.path
            known += 1
        if e.kind == Kind.DIR and pos in {d.pos for d in b.dirs}:
            assert t.children(pos) == idx.names_and_kinds(pos)
        elif e.kind == Kind.DIR:
            assert t.children(pos) is None
    assert known > len(b.dirs)
    for p in files:
        f = idx.entries[idx.primary(p)]
        assert t.file_ids(f.path) == (tuple(idx.chunk_ids[c] for c in f.chunks),
                                      tuple(idx.chunk_lengths[c] for c in f.chunks))


def test_partial_tree_of_the_example() -> None:
    idx = _tree()
    t = fb.PartialTree(fb.open_bundle(_make(idx), idx.root))
    assert t.entry(1) == idx.entries[1]  # the root's symlink "bin"
    assert t.entry(2) is None  # "dev": a child of the root, its own metadata unknown (not listed)
    assert t.entry(3) is None  # "dev/null": under a directory not listed
    assert t.entry(9) == idx.entries[9]  # usr/bin/tool2, a hardlink: its primary's metadata
    assert t.position(b"usr/lib/libx.so") == 11 and t.position(b"dev/null") is None


def test_wrong_position_hints_are_caught_against_the_index() -> None:
    """Positions are not bound by the root (§3.4): a bundle with a wrong one checks, and the index
    comparison refuses it."""
    def shift(doc: dict[str, Any]) -> None:
        doc["dirs"][2][4] = struct.pack(">II", 8, 10)  # usr/bin/tool2 said to be entry 10

    idx = _tree()
    t = fb.PartialTree(fb.open_bundle(_rewrite(_make(idx), shift), idx.root))
    with pytest.raises(IntegrityError, match="position hint of b'usr/bin/tool2'"):
        t.check_positions(idx)
