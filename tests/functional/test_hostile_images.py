"""Acceptance 6: hostile images.  Each is made by hand (index entries / CBOR / zstd bytes), put into a
store as a real image (blobs, manifest, tag) and then read with the real CLI.  Every one must end in
one ``shoal: error:`` line and a non-zero exit, write nothing outside the target (a sentinel
directory, which some images point at, is checked), and leave no partial target behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard

from helpers import IS_ROOT, assert_one_line_error, put_image, run_shoal, tree_snapshot
from shoal.errors import FormatError, HostileInput
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.model import Entry, Frame, Index, Kind
from shoal.store import Store

T = 1_600_000_000_000_000_000  # every mtime


def D(path: bytes, mode: int = 0o755) -> Entry:
    return Entry(path, Kind.DIR, mode, 0, 0, T)


def F(path: bytes, chunks: tuple[int, ...] = (), size: int = 0) -> Entry:
    return Entry(path, Kind.FILE, 0o644, 0, 0, T, size=size, chunks=chunks)


def L(path: bytes, target: bytes) -> Entry:
    return Entry(path, Kind.SYMLINK, 0o777, 0, 0, T, target=target)


def H(path: bytes, target: bytes) -> Entry:
    return Entry(path, Kind.HARDLINK, 0o644, 0, 0, T, target=target)


class Image:
    """Parts of a hand-made image: entries, chunk data (one frame, one pack), and overrides."""

    def __init__(self, entries: list[Entry], chunks: list[bytes] = (), *,  # type: ignore[assignment]
                 frame_ulen_delta: int = 0, frame_offset: int = 0, chunk_ids: list[bytes] | None = None) -> None:
        self.chunks = list(chunks)
        data = b"".join(self.chunks)
        self.pack = zstandard.ZstdCompressor(level=3).compress(data) if self.chunks else b""
        ids = chunk_ids or [hashlib.sha256(c).digest() for c in self.chunks]
        self.ids = ids
        offs, o = [], 0
        for c in self.chunks:
            offs.append(o)
            o += len(c)
        frames = [Frame(0, frame_offset, len(self.pack), len(data) + frame_ulen_delta)] if self.chunks else []
        packs = [hashlib.sha256(self.pack).digest()] if self.chunks else []
        # hostile chunk references past the table still need a Merkle record: pad the ids for it only
        full = fidx.merkle(entries, tuple(ids) + (bytes(32),) * 16)
        self.index = Index(tuple(full), tuple(ids), (0,) * len(ids), tuple(offs), tuple(len(c) for c in self.chunks),
                           tuple(frames), tuple(packs), full[0].digest)

    def file(self, path: bytes, *cis: int) -> Entry:
        """A file of chunks ``cis``."""
        return F(path, tuple(cis), sum(len(self.chunks[i]) for i in cis))

    def raw(self) -> bytes:
        return fidx.encode(self.index)

    def root(self) -> str:
        r = self.index.root
        return "sha256:" + (r.hex() if len(r) == 32 else "00" * 32)


def _files_image(entries_fn: Callable[[Image], list[Entry]], chunks: list[bytes], **kw: Any) -> Image:
    """An image whose entries may refer to files made from ``chunks``."""
    proto = Image([D(b"")], chunks, **kw)
    return Image(entries_fn(proto), chunks, **kw)


def _noncanonical(raw: bytes) -> bytes:
    """Re-encode ``"format": 2`` with a two-byte argument (0x18 0x02): valid CBOR, not the shortest form."""
    key = cbor.encode("format") + b"\x02"
    assert raw.count(key) == 1
    return raw.replace(key, cbor.encode("format") + b"\x18\x02")


def _unsorted_map(raw: bytes) -> bytes:
    """Swap the first two keys of the top-level map: valid CBOR, keys out of canonical order."""
    d = cbor.decode(raw)
    items = sorted(d.items(), key=lambda kv: cbor.encode(kv[0]))
    items[0], items[1] = items[1], items[0]
    return cbor._head(5, len(items)) + b"".join(cbor.encode(k) + cbor.encode(v) for k, v in items)  # type: ignore[attr-defined]


def _fake_zstd_header(declared: int) -> bytes:
    """A zstd frame header that declares ``declared`` bytes (8-byte FCS, single segment) and an empty
    last raw block: tiny, and a decompression bomb if the declared size is believed."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + declared.to_bytes(8, "little") + b"\x01\x00\x00"


def _lying_size(raw: bytes) -> bytes:
    """A real frame of ``raw`` whose header declares fewer bytes than it holds."""
    blob = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    params = zstandard.get_frame_parameters(blob)
    assert params.content_size == len(raw)
    # single-segment frames with 2-byte FCS store size - 256; rewrite it as 100 bytes smaller
    fhd = blob[4]
    fcs_flag = fhd >> 6
    assert fcs_flag == 1 and fhd & 0x20, hex(fhd)
    fcs = int.from_bytes(blob[5:7], "little") - 100
    return blob[:5] + fcs.to_bytes(2, "little") + blob[7:]


def _real_bomb() -> bytes:
    """1.1 GiB of zeros in a streamed frame that does not declare its size (~40 KB)."""
    c = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(64 << 20)
    parts = [c.compress(zeros) for _ in range(18)]
    return b"".join(parts) + c.flush()


def _chunks() -> list[bytes]:
    rng = random.Random(4)
    return [rng.randbytes(20_000), b"hello\n" * 5000, rng.randbytes(3000)]


# name -> (how to make it, what the error mentions, exit code, does `ls` fail too?)
CASES: dict[str, tuple[Callable[[Path], tuple[bytes, str, list[bytes]]], tuple[str, ...], int, bool]] = {}


def case(name: str, words: tuple[str, ...], code: int, ls_fails: bool = True):  # type: ignore[no-untyped-def]
    def deco(fn):  # type: ignore[no-untyped-def]
        CASES[name] = (fn, words, code, ls_fails)
        return fn
    return deco


def _plain(img: Image) -> tuple[bytes, str, list[bytes]]:
    return fidx.compress(img.raw()), img.root(), [img.pack] if img.chunks else []


@case("dotdot", ("non-canonical path",), 4)
def _dotdot(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), D(b"a"), F(b"a/../../../" + os.fsencode(sentinel).lstrip(b"/") + b"/evil")]))


@case("dotdot-dir", ("non-canonical path",), 4)
def _dotdot_dir(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), D(b".."), F(b"../evil")]))


@case("absolute", ("non-canonical path",), 4)
def _absolute(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(os.fsencode(sentinel) + b"/evil")]))


@case("dot", ("non-canonical path",), 4)
def _dot(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), D(b"a"), F(b"a/./b")]))


@case("nul-byte", ("nul",), 4)
def _nul(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(b"a\0b")]))


@case("path-too-long", ("longer",), 4)
def _long_path(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    parts = [b"d" * 200] * 21
    entries = [D(b"")] + [D(b"/".join(parts[: i + 1])) for i in range(20)] + [F(b"/".join(parts))]
    return _plain(Image(entries))


@case("symlink-parent-escape", ("not a directory",), 4)
def _symlink_parent(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    """``a -> SENTINEL`` then ``a/evil``: unpacking would write through the symlink."""
    return _plain(Image([D(b""), L(b"a", os.fsencode(sentinel)), F(b"a/evil")]))


@case("symlink-parent-escape-relative", ("not a directory",), 4)
def _symlink_parent_rel(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), L(b"a", b"../../../../../../../../.." + os.fsencode(sentinel)),
                         D(b"a/sub"), F(b"a/sub/evil")]))


@case("file-parent", ("not a directory",), 4)
def _file_parent(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(b"a"), F(b"a/b")]))


@case("missing-parent", ("not a directory",), 4)
def _missing_parent(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(b"nodir/b")]))


@case("duplicate", ("unsorted or duplicated",), 4)
def _duplicate(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(b"x"), F(b"x")]))


@case("duplicate-kinds", ("unsorted or duplicated",), 4)
def _duplicate_kinds(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    """A directory and then a symlink of the same name that points at the sentinel."""
    return _plain(Image([D(b""), D(b"x"), L(b"x", os.fsencode(sentinel)), F(b"x/evil")]))


@case("duplicate-root", ("unsorted or duplicated", "first entry"), 4)
def _duplicate_root(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), D(b"")]))


@case("unsorted", ("unsorted or duplicated",), 4)
def _unsorted(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), F(b"b"), F(b"a")]))


@case("unsorted-bytewise", ("unsorted or duplicated",), 4)
def _unsorted_bytewise(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    """Sorted as whole byte strings ("a" < "a-b" < "a/x"), which is not the canonical component order."""
    return _plain(Image([D(b""), D(b"a"), F(b"a-b"), F(b"a/x")]))


@case("root-not-first", ("first entry",), 4)
def _root_not_first(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([F(b"a"), D(b"")]))


@case("hardlink-missing", ("hardlink",), 4)
def _hardlink_missing(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), H(b"a", b"nothere")]))


@case("hardlink-later", ("hardlink",), 4)
def _hardlink_later(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), H(b"a", b"b"), F(b"b")]))


@case("hardlink-outside", ("hardlink",), 4)
def _hardlink_outside(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), H(b"a", os.fsencode(sentinel) + b"/keep")]))


@case("hardlink-dotdot", ("hardlink",), 4)
def _hardlink_dotdot(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    rel = b"../" * 12 + os.fsencode(sentinel).lstrip(b"/") + b"/keep"
    return _plain(Image([D(b""), H(b"a", rel)]))


@case("hardlink-to-symlink", ("hardlink",), 4)
def _hardlink_symlink(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), L(b"a", os.fsencode(sentinel) + b"/keep"), H(b"b", b"a")]))


@case("hardlink-to-dir", ("hardlink",), 4)
def _hardlink_dir(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), D(b"a"), H(b"b", b"a")]))


@case("merkle-mismatch", ("merkle",), 4)
def _merkle(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), D(b"a"), F(b"a/x")])
    d = cbor.decode(img.raw())
    d["entries"][1][7] = bytes(32)  # directory a's digest
    return fidx.compress(cbor.encode(d)), img.root(), []


@case("root-mismatch", ("root",), 4)
def _root_mismatch(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    return fidx.compress(img.raw()), "sha256:" + "ab" * 32, []


@case("chunks-do-not-add-up", ("add up",), 4)
def _size_lie(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = _files_image(lambda p: [D(b""), F(b"x", (0,), 5 << 30)], _chunks()[:1])
    return _plain(img)


@case("chunk-ref-out-of-range", ("chunk reference",), 4)
def _chunk_ref(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = _files_image(lambda p: [D(b""), F(b"x", (7,), 1)], _chunks()[:1])
    return _plain(img)


@case("xattrs-too-large", ("xattr",), 4)
def _xattrs(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    e = Entry(b"x", Kind.FILE, 0o644, 0, 0, T, xattrs=((b"user.big", b"x" * 70_000),))
    return _plain(Image([D(b""), e]))


@case("mode-out-of-range", ("mode",), 4)
def _mode(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _plain(Image([D(b""), Entry(b"x", Kind.FILE, 0o170644, 0, 0, T)]))


@case("truncated-index", ("corrupt", "truncated"), 4)
def _truncated(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b"")] + [F(b"f%04d" % i) for i in range(300)])
    blob = fidx.compress(img.raw())
    return blob[: len(blob) // 2], img.root(), []


@case("garbage-zstd", ("zstd",), 4)
def _garbage(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return random.Random(1).randbytes(5000), "sha256:" + "00" * 32, []


@case("garbage-after-magic", ("corrupt", "truncated", "zstd", "declares"), 4)
def _garbage_magic(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    blob = fidx.compress(img.raw())
    return blob[:6] + random.Random(2).randbytes(len(blob)), img.root(), []


@case("trailing-garbage", ("corrupt", "trailing", "zstd", "wrong size"), 4)
def _trailing(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    return fidx.compress(img.raw()) + b"\x00garbage", img.root(), []


@case("noncanonical-cbor-int", ("shortest",), 4)
def _noncanon(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    return fidx.compress(_noncanonical(img.raw())), img.root(), []


@case("noncanonical-cbor-map-order", ("unsorted",), 4)
def _map_order(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    return fidx.compress(_unsorted_map(img.raw())), img.root(), []


@case("cbor-indefinite", ("indefinite",), 4)
def _indefinite(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    raw = img.raw()
    # the top-level map as an indefinite-length map (0xbf ... 0xff)
    return fidx.compress(b"\xbf" + raw[1:] + b"\xff"), img.root(), []


@case("bomb-declared-size", ("declares", "limit"), 4)
def _bomb_declared(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _fake_zstd_header(2 << 30), "sha256:" + "00" * 32, []


@case("bomb-undeclared-size", ("declares", "limit", "size"), 4)
def _bomb_undeclared(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    return _real_bomb(), "sha256:" + "00" * 32, []


@case("bomb-lying-size", ("corrupt", "size", "truncated"), 4)
def _bomb_lying(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b"")] + [F(b"f%04d" % i) for i in range(50)])
    return _lying_size(img.raw()), img.root(), []


@case("wrong-format-version", ("format",), 4)
def _version(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    img = Image([D(b""), F(b"x")])
    d = cbor.decode(img.raw())
    d["format"] = 99
    return fidx.compress(cbor.encode(d)), img.root(), []


# data-level lies: the index is well-formed, so `ls` works, but no byte may come out of unpack

@case("chunk-data-mismatch", ("verification", "corrupt"), 5, ls_fails=False)
def _data_mismatch(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    ch = _chunks()
    fake_ids = [hashlib.sha256(b"not " + c).digest() for c in ch]
    img = _files_image(lambda p: [D(b""), D(b"a"), F(b"a/ok"), p.file(b"a/x", 0, 1), p.file(b"b", 2)], ch,
                       chunk_ids=fake_ids)
    return _plain(img)


@case("frame-ulen-lie", ("corrupt",), 5, ls_fails=False)
def _ulen(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    ch = _chunks()
    img = _files_image(lambda p: [D(b""), p.file(b"x", 0, 1, 2)], ch, frame_ulen_delta=+1000)
    return _plain(img)


@case("frame-past-pack-end", ("truncated", "corrupt"), 5, ls_fails=False)
def _past_end(sentinel: Path) -> tuple[bytes, str, list[bytes]]:
    ch = _chunks()
    img = _files_image(lambda p: [D(b""), p.file(b"x", 0, 1, 2)], ch, frame_offset=10_000_000)
    return _plain(img)


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hostile")
    sentinel = base / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"precious\n")
    store = Store.open(base / "store")
    for name, (make, *_rest) in CASES.items():
        blob, root, packs = make(sentinel)
        put_image(store, f"hostile:{name}", blob, root, packs)
    # a benign image made the same way: proves the crafting itself is sound
    ch = _chunks()
    good = _files_image(lambda p: [D(b""), D(b"a"), p.file(b"a/x", 0, 1), L(b"a/y", b"x"), p.file(b"b", 2)], ch)
    put_image(store, "hostile:control", *_plain(good))
    return base, sentinel


def test_control_image_unpacks(hostile_store: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = hostile_store
    dest = tmp_path / "out"
    run_shoal(base / "store", "unpack", "hostile:control", dest)
    ch = _chunks()
    assert (dest / "a" / "x").read_bytes() == ch[0] + ch[1]
    assert (dest / "b").read_bytes() == ch[2]
    assert os.readlink(dest / "a" / "y") == "x"
    assert run_shoal(base / "store", "ls", "-R", "hostile:control").stdout.split() == [b"/a", b"/a/x", b"/a/y", b"/b"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_image_refused(hostile_store: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    base, sentinel = hostile_store
    _, words, code, ls_fails = CASES[name]
    before = tree_snapshot(sentinel)
    ref = f"hostile:{name}"
    if ls_fails:
        p = run_shoal(base / "store", "ls", "-R", ref, check=False)
        assert_one_line_error(p, *words)
        assert p.returncode == code, p.stderr
        assert p.stdout == b""
    else:
        run_shoal(base / "store", "ls", "-R", ref)
    dest = tmp_path / "out"
    p = run_shoal(base / "store", "unpack", ref, dest, check=False, timeout=60)
    assert_one_line_error(p, *words)
    assert p.returncode == code, p.stderr
    assert not dest.exists(), f"partial target left: {sorted(os.listdir(dest))}"
    assert tree_snapshot(sentinel) == before
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[3]))
def test_hostile_index_decode_raises_format_error(hostile_store: tuple[Path, Path], name: str) -> None:
    """The same inputs through the library: a FormatError (HostileInput for escapes), nothing else."""
    base, _ = hostile_store
    store = Store.open(base / "store")
    with pytest.raises(FormatError) as ei:
        store.load_index(store.resolve(f"hostile:{name}"))
    if name.startswith(("dotdot", "absolute", "symlink-parent", "hardlink-outside", "hardlink-dotdot")):
        assert isinstance(ei.value, HostileInput)
    assert "\n" not in str(ei.value)


def test_hostile_cat(hostile_store: tuple[Path, Path]) -> None:
    base, _ = hostile_store
    p = run_shoal(base / "store", "cat", "hostile:chunk-data-mismatch", "/b", check=False)
    assert_one_line_error(p, "verification")
    assert p.stdout == b""
    p = run_shoal(base / "store", "cat", "hostile:symlink-parent-escape", "/a/evil", check=False)
    assert_one_line_error(p, "not a directory")


# ------------------------------------------------------------------ targets that are themselves traps


def test_unpack_refuses_symlink_target(hostile_store: tuple[Path, Path], tmp_path: Path) -> None:
    base, sentinel = hostile_store
    before = tree_snapshot(sentinel)
    trap = tmp_path / "trap"
    trap.symlink_to(sentinel)
    assert_one_line_error(run_shoal(base / "store", "unpack", "hostile:control", trap, check=False),
                          "not a directory", "exists")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    trap2 = tmp_path / "trap2"
    trap2.symlink_to(empty)
    assert_one_line_error(run_shoal(base / "store", "unpack", "hostile:control", trap2, check=False),
                          "not a directory", "exists", "symlink")
    assert os.listdir(empty) == []
    assert tree_snapshot(sentinel) == before


def test_unpack_refuses_non_empty_target(hostile_store: tuple[Path, Path]) -> None:
    base, sentinel = hostile_store
    before = tree_snapshot(sentinel)
    assert_one_line_error(run_shoal(base / "store", "unpack", "hostile:control", sentinel, check=False),
                          "not empty")
    assert tree_snapshot(sentinel) == before


def test_oversized_manifest_refused(tmp_path: Path) -> None:
    from shoal import mediatypes as mt

    store = Store.open(tmp_path / "s")
    raw = b'{"schemaVersion":2,"pad":"' + b"x" * (5 << 20) + b'"}'
    d = store.layout.put(raw)
    store.layout.set_ref("big:1", {"mediaType": mt.OCI_MANIFEST, "digest": d, "size": len(raw)})
    for args in (("ls", "big:1"), ("unpack", "big:1", tmp_path / "out")):
        assert_one_line_error(run_shoal(tmp_path / "s", *args, check=False), "larger", "manifest", "4 mib")
    assert not (tmp_path / "out").exists()


def test_non_shoal_manifest_refused(tmp_path: Path) -> None:
    from shoal import mediatypes as mt

    store = Store.open(tmp_path / "s")
    cfg = store.layout.put(b"{}")
    raw = ('{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"%s","digest":"%s","size":2},'
           '"layers":[]}' % (mt.OCI_MANIFEST, mt.OCI_CONFIG, cfg)).encode()
    d = store.layout.put(raw)
    store.layout.set_ref("plain:1", {"mediaType": mt.OCI_MANIFEST, "digest": d, "size": len(raw)})
    # not Shoal's: read as a classic image (converted, untagged), which this one is not either
    p = run_shoal(tmp_path / "s", "ls", "plain:1", check=False)
    assert_one_line_error(p, "not a shoal image", "diff_ids")
    assert p.returncode == 4


def test_logical_size_bomb_is_contained(tmp_path: Path) -> None:
    """A 64 GiB file made of one 256 KiB chunk repeated (a 1 MB index): unpacking into a small file system
    fails with one error line and removes what it wrote."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs")
    chunk = random.Random(9).randbytes(256 * 1024)
    n = (64 << 30) // len(chunk)
    entries = [D(b""), F(b"bomb", (0,) * n, n * len(chunk))]
    img = Image(entries, [chunk])
    store = Store.open(tmp_path / "s")
    put_image(store, "bomb:1", *_plain(img))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = run_shoal(tmp_path / "s", "unpack", "bomb:1", mnt / "out", check=False, timeout=120)
        assert_one_line_error(p, "space", "too large", "bomb", "exceeds")
        assert not (mnt / "out").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------ devices without privileges


def test_device_nodes_refused_when_unprivileged(tmp_path: Path) -> None:
    """Unpack, as an unprivileged user, an image holding a char device: one clear error, exit != 0,
    and no target left."""
    if shutil.which("setpriv") is None and IS_ROOT:
        pytest.skip("setpriv is not installed")
    base = Path(tempfile.mkdtemp(prefix="shoal-nobody-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        store = Store.open(base / "store")
        put_image(store, "dev:1", *_plain(Image([D(b""), D(b"dev"), Entry(b"dev/null", Kind.CHAR, 0o666, 0, 0, T,
                                                                            rdev=(1, 3))])))
        work = base / "work"
        work.mkdir()
        if IS_ROOT:
            for dp, dns, fns in os.walk(base):
                for n in dns + fns + [""]:
                    os.chown(os.path.join(dp, n), 65534, 65534, follow_symlinks=False)
        user = 65534 if IS_ROOT else None
        dest = work / "out"
        p = run_shoal(base / "store", "unpack", "dev:1", dest, check=False, user=user)
        assert_one_line_error(p, "device")
        assert p.returncode == 8, p.stderr
        assert not dest.exists()
        # the same image is fine for root
        if IS_ROOT:
            run_shoal(base / "store", "unpack", "dev:1", base / "asroot")
            st = os.lstat(base / "asroot" / "dev" / "null")
            assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
