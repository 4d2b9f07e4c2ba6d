"""Acceptance 2: build then unpack reproduces the tree exactly, entry by entry (type, content, mode
incl. setuid/setgid/sticky, uid/gid, xattrs, symlink targets, hardlink groups, device numbers, mtime_ns
of everything incl. directories and symlinks)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from helpers import IS_ROOT, assert_same_tree, run_shoal, tree_snapshot, write_tree
from shoal.build import BuildOptions, build
from shoal.format.model import Kind, path_key
from shoal.reader import LayoutSource, Reader
from shoal.store import Store
from shoal.unpack import UnpackOptions, unpack


def test_generated_tree_has_everything(generated_snapshot: dict[bytes, dict[str, object]]) -> None:
    """The fixture really contains what the round trip is meant to exercise."""
    snap = generated_snapshot
    types = [r["type"] for r in snap.values()]
    assert types.count("file") >= 5000
    assert {"dir", "file", "symlink", "fifo"} <= set(types)
    modes = {int(str(r["mode"]), 8) for r in snap.values()}
    assert any(m & stat.S_ISUID for m in modes) and any(m & stat.S_ISVTX for m in modes)
    assert any(len(r.get("links", ())) > 1 for r in snap.values())
    assert any(k.startswith("user.") for r in snap.values() for k in r["xattrs"])  # type: ignore[attr-defined]
    assert any(r["mtime_ns"] % 1_000_000_000 for r in snap.values())  # type: ignore[operator]
    assert any(r["mtime_ns"] < 0 for r in snap.values())  # type: ignore[operator]
    assert any(p.endswith(b"caf\xe9") or b"caf\xe9.f" in p for p in snap)
    sizes = [r["size"] for r in snap.values() if r["type"] == "file"]
    assert 0 in sizes and max(sizes) > 1 << 20  # type: ignore[operator]
    if IS_ROOT:
        assert {"char", "block"} <= set(types)
        assert any("security.capability" in r["xattrs"] for r in snap.values())  # type: ignore[operator]
        assert any(r["uid"] == 4294967294 for r in snap.values())
        assert any(r["type"] == "symlink" and r["xattrs"] for r in snap.values())


def test_roundtrip_generated_cli(generated_image, generated_snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, ref, _ = generated_image
    dest = tmp_path / "out"
    run_shoal(store_dir, "unpack", ref, dest)
    assert_same_tree(generated_snapshot, tree_snapshot(dest))


def test_roundtrip_generated_api_one_worker(generated_image, generated_snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, ref, r = generated_image
    store = Store.open(store_dir)
    m = store.resolve(ref)
    assert m.digest == r.manifest.digest
    idx = store.load_index(m)
    dest = tmp_path / "out"
    res = unpack(idx, Reader(idx, LayoutSource(store.layout)), str(dest), UnpackOptions(workers=1))
    assert res.entries == len(idx.entries) == len(generated_snapshot)
    assert_same_tree(generated_snapshot, tree_snapshot(dest))


def test_unpack_into_existing_empty_dir(generated_image, generated_snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, ref, _ = generated_image
    dest = tmp_path / "empty"
    dest.mkdir()
    run_shoal(store_dir, "unpack", ref, dest)
    assert_same_tree(generated_snapshot, tree_snapshot(dest))


@pytest.mark.slow
def test_roundtrip_debian(debian_rootfs: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    run_shoal(store_dir, "build", debian_rootfs, "debian:bookworm")
    dest = tmp_path / "out"
    run_shoal(store_dir, "unpack", "debian:bookworm", dest)
    assert_same_tree(tree_snapshot(debian_rootfs), tree_snapshot(dest))


def test_index_matches_tree(generated_image, generated_snapshot) -> None:  # type: ignore[no-untyped-def]
    """The index alone (no data) describes the tree: kinds, sizes, digests, owners, link targets."""
    import hashlib

    store_dir, ref, _ = generated_image
    store = Store.open(store_dir)
    idx = store.load_index(store.resolve(ref))
    reader = Reader(idx, LayoutSource(store.layout))
    kinds = {Kind.DIR: "dir", Kind.FILE: "file", Kind.HARDLINK: "file", Kind.SYMLINK: "symlink",
             Kind.CHAR: "char", Kind.BLOCK: "block", Kind.FIFO: "fifo"}
    assert {e.path for e in idx.entries} == set(generated_snapshot)
    for e in idx.entries:
        s = generated_snapshot[e.path]
        assert kinds[e.kind] == s["type"], e.path
        assert (oct(e.mode), e.uid, e.gid, e.mtime_ns) == (s["mode"], s["uid"], s["gid"], s["mtime_ns"]), e.path
        assert {os.fsdecode(k): v for k, v in e.xattrs} == s["xattrs"], e.path
        if e.kind == Kind.FILE:
            assert e.size == s["size"]
            assert hashlib.sha256(b"".join(reader.iter_file(e))).hexdigest() == s["sha256"]
            assert sum(idx.chunk_lengths[c] for c in e.chunks) == e.size
            assert e.path == min(s["links"], key=path_key)  # type: ignore[arg-type]  # a hardlink group's primary sorts first
        elif e.kind == Kind.HARDLINK:
            assert e.target in s["links"] and path_key(e.target) < path_key(e.path)  # type: ignore[operator]
        elif e.kind == Kind.SYMLINK:
            assert e.target == s["target"]
        elif e.kind in (Kind.CHAR, Kind.BLOCK):
            assert e.rdev == s["rdev"]
    for cid, ln in zip(idx.chunk_ids, idx.chunk_lengths):
        assert len(cid) == 32 and 0 < ln <= 256 * 1024
    assert len(set(idx.chunk_ids)) == len(idx.chunk_ids)
    del hashlib


def test_cat_every_kind_of_name(generated_image, generated_tree: Path) -> None:  # type: ignore[no-untyped-def]
    """``shoal cat`` returns exact bytes, for non-UTF-8 names, hardlinks and symlinks to files."""
    store_dir, ref, _ = generated_image
    store = Store.open(store_dir)
    idx = store.load_index(store.resolve(ref))
    picks = [e for e in idx.entries if e.kind == Kind.FILE and b"caf\xe9" in e.path][:1]
    picks += [e for e in idx.entries if e.kind == Kind.HARDLINK][:1]
    picks += sorted((e for e in idx.entries if e.kind == Kind.FILE), key=lambda e: -e.size)[:1]
    picks += [e for e in idx.entries if e.kind == Kind.FILE and e.size == 0][:1]
    assert len(picks) == 4
    for e in picks:
        p = run_shoal(store_dir, "cat", ref, b"/" + e.path)  # type: ignore[arg-type]
        assert p.stdout == (generated_tree / os.fsdecode(e.path)).read_bytes(), e.path
    def host_file(e):  # type: ignore[no-untyped-def]
        # an absolute target means the image's root, so resolve it inside the tree
        t = e.target.lstrip(b"/") if e.target.startswith(b"/") else os.path.join(os.path.dirname(e.path), e.target)
        p = os.path.join(os.fsencode(generated_tree), t)
        try:
            return p if os.path.isfile(p) and not os.path.islink(p) else None
        except OSError:
            return None

    links = [(e, host_file(e)) for e in idx.entries if e.kind == Kind.SYMLINK]
    links = [(e, h) for e, h in links if h][:4]
    assert any(e.target.startswith(b"/") for e, _ in links) and any(not e.target.startswith(b"/") for e, _ in links)
    for e, h in links:
        p = run_shoal(store_dir, "cat", ref, e.path)  # type: ignore[arg-type]
        assert p.stdout == Path(os.fsdecode(h)).read_bytes(), e.path


def test_cat_refuses_directories_and_missing(generated_image) -> None:  # type: ignore[no-untyped-def]
    from helpers import assert_one_line_error

    store_dir, ref, _ = generated_image
    assert_one_line_error(run_shoal(store_dir, "cat", ref, "/d000", check=False), "not a regular file")
    assert_one_line_error(run_shoal(store_dir, "cat", ref, "/no/such/file", check=False), "not a regular file")
    assert_one_line_error(run_shoal(store_dir, "cat", "nosuch:tag", "/x", check=False), "no image")


def test_ls_and_inspect_agree_with_tree(generated_image, generated_snapshot) -> None:  # type: ignore[no-untyped-def]
    store_dir, ref, r = generated_image
    p = run_shoal(store_dir, "ls", "-R", ref)
    # depth-first, children in canonical order = the index's order; undecodable bytes as \x escapes
    want = "".join("/" + path.decode("utf-8", "backslashreplace") + "\n"
                   for path in sorted(generated_snapshot, key=path_key) if path)
    assert p.stdout.decode("utf-8") == want
    doc = json.loads(run_shoal(store_dir, "inspect", "--json", ref).stdout)
    assert doc["digest"] == r.manifest.digest and doc["root"] == r.manifest.root
    assert doc["entries"] == len(generated_snapshot)
    assert doc["kinds"]["dir"] == sum(1 for s in generated_snapshot.values() if s["type"] == "dir")
    assert doc["bytes"] == sum(s["size"] for p_, s in generated_snapshot.items()  # type: ignore[misc]
                               if s["type"] == "file" and min(s["links"], key=path_key) == p_)  # type: ignore[index]
    imgs = json.loads(run_shoal(store_dir, "images", "--json").stdout)
    assert [i["ref"] for i in imgs["images"]] == ["gen:1"]
    long = run_shoal(store_dir, "ls", "-l", ref, "/").stdout.decode("utf-8", "replace")
    assert "big0.dat" in long and long.startswith(("d", "-", "l", "p", "c", "b"))


def test_small_tree_metadata_exact(tmp_path: Path) -> None:
    """A hand-made tree with each tricky piece once, so a failure points at one feature."""
    src = write_tree(tmp_path / "src", {"a/setuid": b"#!/bin/sh\n", "a/empty": b"", "b": b"x" * 70000})
    os.chmod(src / "a" / "setuid", 0o4711)
    os.chmod(src / "a", 0o1733)
    os.setxattr(src / "b", "user.k", b"\x00\xffbinary")
    os.symlink("a/setuid", src / "link")
    os.link(src / "b", src / "a" / "b-hard")
    os.mkfifo(src / "pipe", 0o640)
    if IS_ROOT:
        os.chown(src / "b", 1234, 5678)
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for p, ns in ((src / "link", 1_000_000_001), (src / "pipe", 2_000_000_002), (src / "a" / "setuid", 3),
                  (src / "a", 4_000_000_004), (src, 5_999_999_999)):
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
    before = tree_snapshot(src)
    r = build(Store.open(tmp_path / "s"), src, "small:1", BuildOptions(workers=2))
    assert r.files == 4
    dest = tmp_path / "out"
    run_shoal(tmp_path / "s", "unpack", "small:1", dest)
    assert_same_tree(before, tree_snapshot(dest))
