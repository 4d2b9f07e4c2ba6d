"""The index model, encoding, validation and Merkle digests (docs/spec/format.md §4, §6)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from shoal.errors import FormatError, HostileInput
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.model import Entry, Frame, Kind, name_of, parent_of, path_key

T = 1_600_000_000_000_000_000


def _random_index(seed: int, n: int = 200):  # type: ignore[no-untyped-def]
    """A random but valid index: nested dirs, files with 0-3 chunks, symlinks, hardlinks, devices, fifos."""
    rng = random.Random(seed)
    chunks = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(40)]
    ids = [hashlib.sha256(c).digest() for c in chunks]
    paths: set[bytes] = set()
    dirs = [b""]
    for i in range(n // 5):
        parent = rng.choice(dirs)
        p = (parent + b"/" if parent else b"") + b"d%d" % i
        dirs.append(p)
        paths.add(p)
    specs = []
    for i in range(n):
        parent = rng.choice(dirs)
        name = rng.choice([b"f%d" % i, b"caf\xe9%d" % i, b"x-%d" % i, b"%d.so" % i])
        specs.append(((parent + b"/" if parent else b"") + name, rng.randrange(5)))
    entries = [Entry(d, Kind.DIR, rng.choice([0o755, 0o1777]), 0, 0, T + rng.randrange(10**9)) for d in dirs]
    files: list[bytes] = []
    for p, kind in sorted(specs, key=lambda s: path_key(s[0])):
        if p in paths:
            continue
        paths.add(p)
        x = ((b"user.a", rng.randbytes(3)),) if rng.random() < 0.2 else ()
        if kind == 0 or (kind == 1 and not files):
            cis = tuple(rng.sample(range(40), rng.randrange(0, 4)))
            data = b"".join(chunks[c] for c in cis)
            entries.append(Entry(p, Kind.FILE, 0o644, rng.randrange(3), 0, T, x, len(data), chunks=cis))
            files.append(p)
        elif kind == 1:
            target = rng.choice(files)
            prim = next(e for e in entries if e.path == target)
            entries.append(Entry(p, Kind.HARDLINK, prim.mode, prim.uid, prim.gid, prim.mtime_ns, prim.xattrs,
                                 target=prim.path))
        elif kind == 2:
            entries.append(Entry(p, Kind.SYMLINK, 0o777, 0, 0, T, x, target=rng.choice([b"/etc", b"../x", b"y"])))
        elif kind == 3:
            entries.append(Entry(p, rng.choice([Kind.CHAR, Kind.BLOCK]), 0o600, 0, 0, T, rdev=(rng.randrange(300),
                                                                                            rng.randrange(70000))))
        else:
            entries.append(Entry(p, Kind.FIFO, 0o644, 0, 0, T, x))
    entries.sort(key=lambda e: path_key(e.path))
    # hardlinks must follow their primary: drop any that sorted before it
    seen: set[bytes] = set()
    kept = []
    for e in entries:
        if e.kind == Kind.HARDLINK and e.target not in seen:
            continue
        seen.add(e.path)
        kept.append(e)
    offs, o = [], 0
    for c in chunks:
        offs.append(o)
        o += len(c)
    frames = [Frame(0, 0, 100, o)]
    return fidx.make_index(kept, ids, [0] * 40, offs, [len(c) for c in chunks], frames, [bytes(32)])


@pytest.mark.parametrize("seed", range(5))
def test_encode_decode_round_trip(seed: int) -> None:
    idx = (_random_index(seed))
    assert {e.kind for e in idx.entries} == set(Kind)
    assert any(len(e.chunks) > 1 for e in idx.entries) and any(len(e.chunks) == 1 for e in idx.entries)
    raw = fidx.encode(idx)
    back = fidx.decode(raw)
    assert back == idx
    assert fidx.encode(back) == raw
    assert fidx.decode(fidx.decompress(fidx.compress(raw))) == idx


def test_encoding_is_deterministic_across_construction_order() -> None:
    a = (_random_index(1))
    b = (_random_index(1))
    assert fidx.encode(a) == fidx.encode(b) and a.root == b.root


def test_path_order_is_component_wise() -> None:
    paths = [b"a-b", b"a/x", b"a", b"a/x/y", b"b", b"a.b", b"a/\xff", b"A", b""]
    assert sorted(paths, key=path_key) == [b"", b"A", b"a", b"a/x", b"a/x/y", b"a/\xff", b"a-b", b"a.b", b"b"]
    assert parent_of(b"a/b/c") == b"a/b" and parent_of(b"a") == b"" and name_of(b"a/b/c") == b"c"


@pytest.mark.parametrize("path", [b"..", b"a/..", b"../a", b".", b"a/./b", b"/a", b"a/", b"a//b", b"a\0b",
                                  b"x" * 4097])
def test_validate_path_refuses(path: bytes) -> None:
    with pytest.raises(HostileInput):
        fidx.validate_path(path)


@pytest.mark.parametrize("path", [b"a", b"a/b", b"...", b"..a", b"a..", b".hidden", b"caf\xe9", b"new\nline",
                                  b"x" * 255])
def test_validate_path_accepts(path: bytes) -> None:
    fidx.validate_path(path)


def test_merkle_changes_only_ancestors() -> None:
    """Changing one file changes the digests of its ancestors and of nothing else."""
    idx = (_random_index(3))
    victim = next(e for e in idx.entries if e.kind == Kind.FILE and e.path.count(b"/") >= 2)
    entries = [replace(e, mtime_ns=e.mtime_ns + 1) if e.path == victim.path else e for e in idx.entries]
    after = fidx.merkle(entries, idx.chunk_ids)
    ancestors = set()
    p = victim.path
    while p:
        p = parent_of(p)
        ancestors.add(p)
    for a, b in zip(idx.entries, after):
        if a.kind == Kind.DIR:
            assert (a.digest != b.digest) == (a.path in ancestors), a.path


def test_merkle_binds_the_chunk_sequence_not_the_table_layout() -> None:
    """The same chunk ids in the same order give the same digest wherever they sit in the chunk table;
    swapping, replacing, dropping or repeating a chunk reference changes it (format.md §6)."""
    ids = tuple(hashlib.sha256(b"%d" % i).digest() for i in range(4))
    base = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"f", Kind.FILE, 0o644, 0, 0, T, size=10, chunks=(0, 1))]
    r = fidx.merkle(base, ids)[0].digest
    moved = (ids[2], ids[3], ids[0], ids[1])
    assert fidx.merkle([base[0], replace(base[1], chunks=(2, 3))], moved)[0].digest == r
    for chunks in [(1, 0), (0, 2), (0,), (0, 1, 1), (0, 0, 1)]:
        assert fidx.merkle([base[0], replace(base[1], chunks=chunks)], ids)[0].digest != r, chunks


def test_decompress_limits() -> None:
    raw = b"\x00" * 10_000
    blob = fidx.compress(raw)
    assert fidx.decompress(blob) == raw
    with pytest.raises(HostileInput):
        fidx.decompress(blob, limit=9_999)
    with pytest.raises(FormatError):
        fidx.decompress(b"not zstd at all")
    with pytest.raises(FormatError):
        fidx.decompress(blob[:-3])


def _raw_doc(idx) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return cbor.decode(fidx.encode(idx))


@pytest.mark.parametrize("mutate,word", [
    (lambda d: d.pop("frames"), "top-level keys"),
    (lambda d: d.update(extra=1), "top-level keys"),
    (lambda d: d.update(chunks=d["chunks"][:-1]), "table sizes"),
    (lambda d: d.update(chunks=d["chunks"][:32] * (len(d["chunks"]) // 32)), "duplicate chunk ids"),
    (lambda d: d.update(frames=d["frames"] + bytes(20)), "frame record"),
    (lambda d: d.update(chunklocs=b"\xff" * 4 + d["chunklocs"][4:]), "chunk location"),
    (lambda d: d.update(packs=[b"x"]), "pack table"),
    (lambda d: d.update(entries=[]), "no entries"),
    (lambda d: d["entries"][1].append(0), "8 items"),
    (lambda d: d["entries"][1].__setitem__(1, 9), "kind"),
    (lambda d: d["entries"][1].__setitem__(3, -1), "uid"),
    (lambda d: d["entries"][1].__setitem__(4, 1 << 32), "gid"),
    (lambda d: d["entries"][1].__setitem__(5, 1 << 63), "mtime"),
    (lambda d: d["entries"][1].__setitem__(6, {"user.x": b""}), "xattr"),
    (lambda d: d["entries"][1].__setitem__(0, "text"), "byte string"),
], ids=["missing-key", "extra-key", "short-chunk-table", "dup-chunk-ids", "bad-frame", "bad-chunkloc",
        "bad-pack", "no-entries", "entry-9-items", "bad-kind", "negative-uid", "big-gid", "big-mtime",
        "text-xattr-key", "text-path"])
def test_decode_refuses_malformed(mutate, word: str) -> None:  # type: ignore[no-untyped-def]
    idx = (_random_index(0, n=30))
    d = _raw_doc(idx)
    mutate(d)
    with pytest.raises(FormatError) as ei:
        fidx.decode(cbor.encode(d))
    assert word.lower() in str(ei.value).lower()


def test_decode_refuses_a_v1_file_payload() -> None:
    """Format 1's file payload carried a whole-file sha256 the root never checked; v2 has none."""
    idx = _random_index(0, n=30)
    d = _raw_doc(idx)
    for e in d["entries"]:
        if e[1] == int(Kind.FILE):
            e[7] = [e[7][0], b"", e[7][1]]
            break
    with pytest.raises(FormatError, match="file payload"):
        fidx.decode(cbor.encode(d))


@pytest.mark.parametrize("value", [1, True, "2", b"\x02", -2, 3, None])
def test_decode_refuses_any_format_but_the_integer_2(value: object) -> None:
    d = _raw_doc(_random_index(0, n=30))
    d["format"] = value
    with pytest.raises(FormatError, match="format"):
        fidx.decode(cbor.encode(d))


def test_hardlink_metadata_must_match_primary() -> None:
    entries = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"a", Kind.FILE, 0o644, 0, 0, T),
               Entry(b"b", Kind.HARDLINK, 0o600, 0, 0, T, target=b"a")]
    idx = fidx.make_index(entries, [], [], [], [], [], [])
    with pytest.raises(FormatError, match="metadata"):
        fidx.decode(fidx.encode(idx))


def test_lookup_and_children() -> None:
    idx = (_random_index(2))
    for e in idx.entries:
        assert idx.lookup(e.path) is e
    assert idx.lookup(b"no/such") is None
    total = sum(len(idx.children(e.path)) for e in idx.entries if e.kind == Kind.DIR)
    assert total == len(idx.entries) - 1
    for e in idx.entries:
        if e.kind == Kind.DIR:
            kids = idx.children(e.path)
            assert [k.path for k in kids] == sorted((k.path for k in kids), key=path_key)
            assert all(parent_of(k.path) == e.path for k in kids)


@pytest.mark.parametrize("seed", range(4))
def test_hand_built_merkle_records_equal_the_generic_encoding(seed: int) -> None:
    idx = _random_index(seed)
    rng = random.Random(seed)
    extra = [replace(e, mtime_ns=-rng.randrange(1, 1 << 62), uid=rng.choice([0, 23, 255, 65536, (1 << 32) - 1]),
                     xattrs=((b"security.capability", rng.randbytes(20)), (b"user.x" * 5, b"")))
             for e in idx.entries]
    kinds = {e.kind for e in idx.entries}
    assert kinds == set(Kind), kinds  # every kind is covered
    for e in list(idx.entries) + extra:
        assert fidx.child_bytes(e, idx.chunk_ids) == cbor.encode(fidx.child_record(e, idx.chunk_ids)), e
        kids = [fidx.child_bytes(x, idx.chunk_ids) for x in idx.entries[:5]]
        want = hashlib.sha256(cbor.encode([fidx._DIR_TAG, fidx.meta_record(e),
                                           [fidx.child_record(x, idx.chunk_ids) for x in idx.entries[:5]]])).digest()
        assert fidx.dir_digest(e, kids) == want


def test_a_million_copies_of_one_frame_record_cost_one_frame() -> None:
    """A hostile frame table repeating one record is checked and built once per distinct record (the
    mount of such an index took minutes): every copy decodes to the same Frame object."""
    data = b"z" * 1000
    cid = hashlib.sha256(data).digest()
    n = 1_000_000
    entries = [Entry(b"", Kind.DIR, 0o755, 0, 0, 0), Entry(b"f", Kind.FILE, 0o644, 0, 0, 0, size=1000, chunks=(0,))]
    idx = fidx.make_index(entries, [cid], [0], [0], [1000], [Frame(0, 0, 20, 1000)] * n, [bytes(32)])
    got = fidx.decode(fidx.encode(idx))
    assert len(got.frames) == n and len({id(f) for f in got.frames}) == 1


def _with_two_xattrs():  # type: ignore[no-untyped-def]
    """A valid index with a file carrying two xattrs (Merkle digests computed for them)."""
    idx = _random_index(0, n=30)
    entries = list(idx.entries)
    linked = {e.target for e in entries if e.kind == Kind.HARDLINK}
    i = next(k for k, e in enumerate(entries) if e.kind == Kind.FILE and e.path not in linked)
    entries[i] = replace(entries[i], xattrs=((b"user.a", b"1"), (b"user.bb", b"2")))
    return fidx.make_index(entries, idx.chunk_ids, list(idx.chunk_frames), list(idx.chunk_offsets),
                           list(idx.chunk_lengths), list(idx.frames), list(idx.packs)), i


@pytest.mark.parametrize("case", ["top-level-order", "xattr-order", "float-mtime", "undefined-payload"])
def test_fast_decoder_leaves_no_hole(case: str) -> None:
    """What cbor2 decodes but the canonical form forbids, and the Merkle walk would not notice (it
    re-encodes canonically): refused, whichever decoder answered (cbor.decode_fast then index checks)."""
    cbor2 = pytest.importorskip("cbor2")
    idx, i = _with_two_xattrs()
    assert fidx.decode(fidx.encode(idx)) == idx
    d = _raw_doc(idx)
    if case == "top-level-order":
        d = dict(reversed(list(d.items())))
    elif case == "xattr-order":
        xa = d["entries"][i][6]
        d["entries"][i][6] = dict(reversed(list(xa.items())))
    elif case == "float-mtime":
        d["entries"][i][5] = float(d["entries"][i][5])
    else:
        fifo = next(k for k, e in enumerate(idx.entries) if e.kind == Kind.FIFO)
        d["entries"][fifo][7] = cbor2.undefined
    with pytest.raises(FormatError):
        fidx.decode(cbor2.dumps(d))
