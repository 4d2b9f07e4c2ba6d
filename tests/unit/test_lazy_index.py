"""The index a mount decodes lazily (format/lazyindex.py, docs/spec/format.md §6.2): it serves exactly
what ``decode`` does, verifies each directory against its Merkle digest before any of its entries is
handed out, and refuses a tampered directory when it is first used."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_index import _random_index

from shoal.errors import FormatError, HostileInput, IntegrityError
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.lazyindex import LazyEntries, decode_lazy
from shoal.format.model import Entry, Index, Kind, parent_of

T = 1_600_000_000_000_000_000


def _lazy(idx: Index) -> tuple[Index, LazyEntries]:
    lz = decode_lazy(fidx.encode(idx))
    assert isinstance(lz.entries, LazyEntries)
    return lz, lz.entries


@pytest.mark.parametrize("seed", range(6))
def test_lazy_serves_exactly_what_decode_does(seed: int) -> None:
    idx = _random_index(seed)
    eager = fidx.decode(fidx.encode(idx))
    lz, entries = _lazy(idx)
    assert entries.verified() == 0  # the entries are not even decoded yet: the first use does that
    lz.prepare()
    assert entries.verified() == 1  # the root
    assert list(entries) == list(eager.entries)
    assert len(lz.entries) == len(eager.entries) and lz.root == eager.root
    assert (lz.files, lz.logical_bytes) == (eager.files, eager.logical_bytes)
    for i, e in enumerate(eager.entries):
        assert lz.position(e.path) == eager.position(e.path) == i
        assert lz.child_positions(i) == eager.child_positions(i)
        assert [c.path for c in lz.children(e.path)] == [c.path for c in eager.children(e.path)]
        assert [c.path for c in eager.children(e.path)] == [c.path for c in eager.entries if c.path
                                                           and parent_of(c.path) == e.path]
        assert lz.hardlinks_to(e.path) == eager.hardlinks_to(e.path)
        assert lz.primary(i) == eager.primary(i)
    assert {e.kind for e in eager.entries} >= {Kind.HARDLINK}


def test_whether_any_entry_has_xattrs_is_known_without_decoding_the_tree() -> None:
    plain = _two_branches()
    lz, entries = _lazy(plain)
    assert not lz.has_xattrs() and not fidx.decode(fidx.encode(plain)).has_xattrs()
    assert entries.verified() == 1  # from the undecoded rows: no directory was decoded for it
    e = list(plain.entries)
    e[5] = Entry(b"b/h", Kind.FILE, 0o644, 0, 0, T, xattrs=((b"user.x", b"1"),))
    one = fidx.make_index(e, [], [], [], [], [], [])
    assert _lazy(one)[0].has_xattrs() and fidx.decode(fidx.encode(one)).has_xattrs()


def test_only_the_directories_on_the_way_are_verified() -> None:
    idx = _random_index(3, n=400)
    deep = max((e for e in idx.entries if e.kind == Kind.FILE), key=lambda e: e.path.count(b"/"))
    lz, entries = _lazy(idx)
    assert lz.lookup(deep.path) == deep
    assert entries.verified() == deep.path.count(b"/") + 1  # the root and each directory down to it
    assert entries.verified() < sum(1 for e in idx.entries if e.kind == Kind.DIR)


def _doc(idx: Index) -> dict[str, Any]:
    return cbor.decode(fidx.encode(idx))  # type: ignore[no-any-return]


def _two_branches() -> Index:
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"a", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"a/f", Kind.FILE, 0o644, 0, 0, T), Entry(b"a/g", Kind.SYMLINK, 0o777, 0, 0, T, target=b"f"),
         Entry(b"b", Kind.DIR, 0o755, 0, 0, T), Entry(b"b/h", Kind.FILE, 0o644, 0, 0, T)]
    return fidx.make_index(e, [], [], [], [], [], [])


def test_a_tampered_directory_fails_when_used_and_the_rest_serves() -> None:
    d = _doc(_two_branches())
    d["entries"][2][2] = 0o4755  # a/f made setuid, no digest updated
    raw = cbor.encode(d)
    with pytest.raises(FormatError, match="Merkle digest mismatch"):
        fidx.decode(raw)
    lz = decode_lazy(raw)
    assert lz.lookup(b"b/h") is not None  # the untouched branch serves
    for _ in range(2):  # and the tampered one fails every time, for each of its entries
        for p in (b"a/f", b"a/g"):
            with pytest.raises(IntegrityError, match="Merkle digest mismatch at b'a'"):
                lz.lookup(p)
    with pytest.raises(IntegrityError):  # nor is the directory's own metadata served: its digest binds it
        lz.lookup(b"a")


def test_a_directory_s_own_metadata_is_verified_before_it_is_served() -> None:
    d = _doc(_two_branches())
    d["entries"][4][2] = 0o777  # b's mode: its parent's record holds only its name and digest
    lz = decode_lazy(cbor.encode(d))
    assert lz.lookup(b"a/f") is not None
    with pytest.raises(IntegrityError, match="at b'b'"):
        lz.lookup(b"b")
    d = _doc(fidx.make_index([Entry(b"", Kind.DIR, 0o755, 0, 0, T)], [], [], [], [], [], []))
    d["entries"][0][2] = 0o777  # the root alone: checked with the shape
    with pytest.raises(FormatError, match="digest mismatch"):
        decode_lazy(cbor.encode(d)).prepare()


def test_a_tampered_stated_digest_fails_at_its_parent() -> None:
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"a", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"a/d", Kind.DIR, 0o755, 0, 0, T), Entry(b"a/d/x", Kind.FILE, 0o644, 0, 0, T),
         Entry(b"a/f", Kind.FILE, 0o644, 0, 0, T), Entry(b"b", Kind.FILE, 0o644, 0, 0, T)]
    d = _doc(fidx.make_index(e, [], [], [], [], [], []))
    d["entries"][2][7] = bytes(32)  # a/d's stated digest
    lz = decode_lazy(cbor.encode(d))
    assert lz.lookup(b"b") is not None
    for p in (b"a", b"a/f", b"a/d", b"a/d/x"):  # a's record of a/d is wrong: a and all under it refused
        with pytest.raises(IntegrityError, match="at b'a'"):
            lz.lookup(p)
    d["entries"][1][7] = bytes(32)  # a stated digest the root's record binds: refused with the shape
    with pytest.raises(FormatError, match="digest mismatch"):
        decode_lazy(cbor.encode(d)).prepare()


@pytest.mark.parametrize("mutate,err,word", [
    (lambda d: d.update(root=bytes(32)), FormatError, "root digest"),
    (lambda d: d["entries"].__setitem__(0, d["entries"][0][:7] + [bytes(32)]), FormatError, "digest mismatch"),
    (lambda d: d["entries"].insert(3, d["entries"].pop(1)), FormatError, "unsorted|is not a directory"),
    (lambda d: d["entries"].insert(2, list(d["entries"][2])), FormatError, "unsorted or duplicated"),
    (lambda d: d["entries"][0].__setitem__(0, b"x"), FormatError, "root directory"),
    (lambda d: d["entries"][3].__setitem__(0, 7), FormatError, "byte string"),
], ids=["root", "root-entry-digest", "unsorted", "duplicate", "root-path", "int-path"])
def test_shape_is_checked_up_front(mutate: Any, err: type[Exception], word: str) -> None:
    """Before any entry is served (``prepare``, which a mount daemon calls once it is live), and again at
    every later use: nothing of a badly shaped index is ever served."""
    d = _doc(_two_branches())
    mutate(d)
    lz = decode_lazy(cbor.encode(d))
    with pytest.raises(err, match=word):
        lz.prepare()
    for use in (lambda: lz.lookup(b"b/h"), lambda: lz.entries[0], lambda: lz.files, lz.prepare):
        with pytest.raises(err, match=word):
            use()


def test_an_entry_under_a_file_is_refused_up_front() -> None:
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"f", Kind.FILE, 0o644, 0, 0, T)]
    d = _doc(fidx.make_index(e, [], [], [], [], [], []))
    d["entries"].append([b"f/x", 1, 0o644, 0, 0, T, {}, [0, []]])
    with pytest.raises(HostileInput, match="not a directory"):
        decode_lazy(cbor.encode(d)).prepare()


def test_an_entry_whose_parent_is_missing_is_refused_when_its_branch_is_used() -> None:
    """``s/a`` renamed ``s/x/a``: ``s``'s digest still matches (a record holds only the name), but the
    entry's path has no parent entry."""
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"f", Kind.FILE, 0o644, 0, 0, T),
         Entry(b"s", Kind.DIR, 0o755, 0, 0, T), Entry(b"s/a", Kind.FILE, 0o644, 0, 0, T)]
    d = _doc(fidx.make_index(e, [], [], [], [], [], []))
    d["entries"][3][0] = b"s/x/a"
    raw = cbor.encode(d)
    with pytest.raises(HostileInput, match="not a directory"):
        fidx.decode(raw)
    lz = decode_lazy(raw)
    assert lz.lookup(b"f") is not None
    with pytest.raises(HostileInput, match="not a directory"):
        lz.lookup(b"s")


def test_hardlinks_are_checked_when_resolved() -> None:
    def tree(*kids: Entry) -> bytes:
        e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"a", Kind.FILE, 0o644, 0, 0, T),
             Entry(b"s", Kind.DIR, 0o755, 0, 0, T), *kids]
        return fidx.encode(fidx.make_index(e, [], [], [], [], [], []))

    lz = decode_lazy(tree(Entry(b"s/b", Kind.HARDLINK, 0o600, 0, 0, T, target=b"a")))
    assert lz.lookup(b"s/b") is not None
    with pytest.raises(FormatError, match="metadata differs"):
        lz.primary(3)
    lz = decode_lazy(tree(Entry(b"s/c", Kind.HARDLINK, 0o644, 0, 0, T, target=b"s/d"),
                          Entry(b"s/d", Kind.FILE, 0o644, 0, 0, T)))
    assert lz.lookup(b"a") is not None
    with pytest.raises(HostileInput, match="earlier file"):
        lz.lookup(b"s/d")  # a hardlink to a later file: its whole directory is refused


def test_the_hardlink_table_looks_only_at_the_hardlink_rows() -> None:
    """The first st_nlink of a mount builds the hardlink table: from the rows the up-front pass found to be
    hardlinks, not from a scan of every row (2-8 ms on a container's first lookup of a file)."""
    e = [Entry(b"", Kind.DIR, 0o755, 0, 0, T), Entry(b"a", Kind.FILE, 0o644, 0, 0, T),
         *(Entry(b"f%03d" % i, Kind.FILE, 0o644, 0, 0, T) for i in range(200)),
         Entry(b"s", Kind.DIR, 0o755, 0, 0, T),
         Entry(b"s/b", Kind.HARDLINK, 0o644, 0, 0, T, target=b"a"),
         Entry(b"s/c", Kind.HARDLINK, 0o644, 0, 0, T, target=b"a")]
    lz, entries = _lazy(fidx.make_index(e, [], [], [], [], [], []))
    lz.prepare()

    class Rows(list[Any]):
        touched = 0

        def __getitem__(self, i: Any) -> Any:
            Rows.touched += 1
            return super().__getitem__(i)

        def __iter__(self) -> Any:
            for r in super().__iter__():
                Rows.touched += 1
                yield r

    entries._raw = Rows(entries._raw)
    assert lz.hardlinks_to(b"a") == (203, 204)
    assert Rows.touched == 2
    assert lz.hardlinks_to(b"f001") == ()


def test_threads_see_one_verified_tree() -> None:
    idx = _random_index(4, n=600)
    lz, _ = _lazy(idx)
    seen: list[list[Entry]] = []
    errors: list[BaseException] = []

    def walk() -> None:
        try:
            seen.append(list(lz.entries))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=walk) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(s == list(idx.entries) for s in seen)


def test_names_and_kinds_check_the_directory_not_its_subdirectories() -> None:
    idx = _random_index(5, n=400)
    eager = fidx.decode(fidx.encode(idx))
    lz, entries = _lazy(idx)
    assert lz.names_and_kinds(0) == eager.names_and_kinds(0)
    assert entries.verified() == 1  # the root only, though some of its children are directories
    assert any(kind == Kind.DIR for _, kind, _ in lz.names_and_kinds(0))
    assert (lz.files, lz.logical_bytes) == (eager.files, eager.logical_bytes)


def test_the_entries_are_located_not_decoded_until_first_use() -> None:
    """format.md §6.2: a mount decodes the tables at once and the entries (~90% of the work) in its daemon,
    after the mount is live; the split finds exactly the bytes a whole decode would read as entries."""
    idx = _random_index(2, n=300)
    raw = fidx.encode(idx)
    split = fidx.split_tables(raw)
    assert split is not None
    t, start, end = split
    assert raw[start:end] == cbor.encode(_doc(idx)["entries"]) and t.entries == []
    assert (t.root, t.ids, t.frames, t.packs) == (idx.root, idx.chunk_ids, idx.frames, idx.packs)
    assert fidx.entries_at(raw, start, end) == _doc(idx)["entries"]
    assert fidx.entries_at(raw, start, end - 1) is None and fidx.entries_at(raw, start + 1, end) is None
    lz = decode_lazy(raw)  # statfs's figures come without the entries: from the array's head, the chunk table
    assert len(lz.entries) == len(idx.entries) and lz.data_bytes == sum(idx.chunk_lengths) > 0
    assert isinstance(lz.entries, LazyEntries) and lz.entries.verified() == 0

    d = _doc(idx)
    d["entries"] = 7  # not an array: the tables are fine, the entries are refused at their first use
    lz = decode_lazy(cbor.encode(d))
    assert lz.root == idx.root and lz.chunk_ids == idx.chunk_ids
    for use in (lz.prepare, lambda: lz.lookup(b""), lambda: len(lz.entries)):
        with pytest.raises(FormatError, match="no entries"):  # decode's words
            use()


@pytest.mark.parametrize("change", ["trailing", "long-head"])
def test_bytes_laid_out_otherwise_are_decoded_whole_at_once(change: str) -> None:
    d = _doc(_two_branches())
    raw = cbor.encode(d)
    if change == "trailing":  # bytes after the document
        bad = raw + b"\x00"
    else:  # the chunk locations' key as a text string with a non-shortest length head
        key = cbor.encode("chunklocs")
        at = raw.rindex(key)
        bad = raw[:at] + b"\x78\x09chunklocs" + raw[at + len(key):]
    assert fidx.split_tables(bad) is None
    lz = decode_lazy(bad)  # a mount's digest binds its bytes: decode_fast(exact=False) reads them whole now
    assert isinstance(lz.entries, LazyEntries) and lz.entries.verified() == 1
    assert lz.lookup(b"b/h") is not None
