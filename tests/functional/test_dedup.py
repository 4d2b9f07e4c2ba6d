"""Acceptance 4: dedup.  Adding a 50 MiB file grows the store by about that file plus one index;
two trees that share most files share most pack blobs (content-defined packing, --no-reuse); a build
takes every chunk the store holds from where it is, with no flag (format.md §5), and --reuse names
the images to take them from."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from helpers import blob_bytes, clone_tree, layer_digests
from shoal.build import BuildOptions, build
from shoal.store import Store

MiB = 1 << 20


def _regular_files(root: Path) -> list[Path]:
    out = []
    for dp, _, fns in os.walk(root):
        for n in fns:
            p = Path(dp) / n
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                out.append(p)
    return sorted(out)


def _few_changes(root: Path, seed: int = 11) -> None:
    """5 files appended to, 2 removed, 3 added (5000-byte random files): ~0.2% of the files."""
    rng = random.Random(seed)
    files = _regular_files(root)
    for p in rng.sample(files, 5):
        with open(p, "ab") as f:
            f.write(b"changed")
    for p in rng.sample(files, 2):
        p.unlink(missing_ok=True)
    for i in range(3):
        (rng.choice(files).parent / f"added{i}").write_bytes(rng.randbytes(5000))


def test_new_50mb_file_costs_its_size_plus_an_index(generated_tree: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    before = blob_bytes(tmp_path / "s")
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    size = 50 * MiB
    (tree / "d000" / "new50.bin").write_bytes(random.Random(3).randbytes(size))  # incompressible
    r = build(store, tree, "g:2", BuildOptions(workers=2))
    growth = blob_bytes(tmp_path / "s") - before
    assert growth == r.added_bytes
    index = r.manifest.index.size
    # random data compresses to its own size (+ zstd framing); on top: one index, one config, one
    # manifest, and the pack(s) around the insertion point that were re-cut
    assert growth >= size + index
    assert growth <= size * 1.10 and growth - size - index <= 4 * MiB, (growth, size, index)


def test_trees_sharing_most_files_share_most_packs(generated_tree: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    _few_changes(tree)
    build(store, tree, "g:2", BuildOptions(workers=2, reuse_store=False))  # content-defined packing alone
    a, b = set(layer_digests(store, "g:1")[1:]), set(layer_digests(store, "g:2")[1:])
    assert len(b) >= 40
    shared = len(a & b) / len(b)
    assert shared >= 0.80, f"only {len(a & b)} of {len(b)} packs shared"


def test_independent_stores_produce_the_same_shared_packs(generated_tree: Path, tmp_path: Path) -> None:
    """Pack sharing needs no reference image: a second store building the edited tree writes
    byte-identical pack blobs for the untouched regions."""
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    _few_changes(tree, seed=12)
    s1, s2 = Store.open(tmp_path / "s1"), Store.open(tmp_path / "s2")
    build(s1, generated_tree, "g:1", BuildOptions(workers=1))
    build(s2, tree, "g:2", BuildOptions(workers=2))
    b1 = {p.name for p in (tmp_path / "s1" / "blobs" / "sha256").iterdir()}
    packs2 = {d[7:] for d in layer_digests(s2, "g:2")[1:]}
    assert len(packs2 & b1) / len(packs2) >= 0.80


def test_reuse_adds_only_new_chunks(generated_tree: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    r1 = build(store, generated_tree, "g:1", BuildOptions(workers=2))
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    _few_changes(tree, seed=13)
    before = blob_bytes(tmp_path / "s")
    r2 = build(store, tree, "g:2", BuildOptions(workers=2, reuse=("g:1",)))
    growth = blob_bytes(tmp_path / "s") - before
    assert r2.new_chunks <= 10, r2.new_chunks
    # new chunks are ~5 x 7 bytes appended + 3 x 5000 random bytes, well under 1 MiB, plus the index
    assert growth <= r2.manifest.index.size + MiB, growth
    assert set(layer_digests(store, "g:2")[1:]) - set(layer_digests(store, "g:1")[1:]) != set()
    assert r2.unique_chunks == len(store.load_index(store.resolve("g:2")).chunk_ids)
    # the image is complete and correct on its own: fsck verifies every chunk of both
    from shoal.store.maintenance import fsck

    rep = fsck(store)
    assert rep.ok, rep.errors
    assert rep.images == 2
    del r1


def test_duplicate_files_are_stored_once(tmp_path: Path) -> None:
    from helpers import write_tree

    data = random.Random(1).randbytes(3 * MiB)
    tree = write_tree(tmp_path / "t", {"a/one": data, "b/two": data, "c/three": data + b"x"})
    r = build(Store.open(tmp_path / "s"), tree, "dup:1", BuildOptions(workers=2))
    assert r.unique_chunks < r.chunks
    assert r.added_bytes < 3.3 * MiB + r.manifest.index.size + 4096


@pytest.mark.slow
def test_debian_rebuild_with_one_package_more_shares_packs(debian_rootfs: Path, tmp_path: Path) -> None:
    """A realistic small change on a real tree: one extra 'package' (a directory of new files) and one
    changed config file.  Most packs are shared with --no-reuse; with reuse only new chunks are added."""
    tree = tmp_path / "t2"
    clone_tree(debian_rootfs, tree)
    pkg = tree / "usr" / "share" / "doc" / "zz-new-package"
    pkg.mkdir()
    for i in range(5):
        (pkg / f"file{i}").write_bytes(random.Random(i).randbytes(20000))
    with open(tree / "etc" / "hostname", "ab") as f:
        f.write(b"changed\n")
    store = Store.open(tmp_path / "s")
    build(store, debian_rootfs, "deb:1", BuildOptions(workers=2))
    build(store, tree, "deb:2", BuildOptions(workers=2, reuse_store=False))
    a, b = set(layer_digests(store, "deb:1")[1:]), set(layer_digests(store, "deb:2")[1:])
    assert len(a & b) / len(b) >= 0.80, f"{len(a & b)} of {len(b)}"
    before = blob_bytes(tmp_path / "s")
    r = build(store, tree, "deb:3", BuildOptions(workers=2, reuse=("deb:1",)))
    assert blob_bytes(tmp_path / "s") - before <= r.manifest.index.size + MiB


def test_a_build_takes_stored_chunks_with_no_flag(generated_tree: Path, tmp_path: Path) -> None:
    """The default reuse set is the store: the same image as naming the one related image with --reuse,
    and the store grows by the new chunks plus an index, a config and a manifest."""
    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    _few_changes(tree, seed=14)
    before = blob_bytes(tmp_path / "s")
    r = build(store, tree, "g:2", BuildOptions(workers=2))
    growth = blob_bytes(tmp_path / "s") - before
    assert growth == r.added_bytes
    assert r.new_chunks <= 10, r.new_chunks
    assert growth <= r.manifest.index.size + MiB, growth
    named = build(store, tree, None, BuildOptions(workers=2, reuse=("g:1",)))
    assert named.manifest.digest == r.manifest.digest
    from shoal.store.maintenance import fsck

    rep = fsck(store)
    assert rep.ok, rep.errors


def test_deleting_a_directory_adds_only_an_index(generated_tree: Path, tmp_path: Path) -> None:
    """No new chunk, no new pack: the store grows by the new index, config and manifest alone
    (with --no-reuse the same tree re-forms the packs around the deleted files)."""
    import shutil

    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    tree = tmp_path / "t2"
    clone_tree(generated_tree, tree)
    shutil.rmtree(tree / "d167")
    before = blob_bytes(tmp_path / "s")
    r = build(store, tree, "g:2", BuildOptions(workers=2))
    assert r.new_chunks == 0 and r.new_packs == 0
    m = r.manifest
    manifest_size = len(store.layout.get(m.digest))
    assert blob_bytes(tmp_path / "s") - before == m.index.size + m.config.size + manifest_size
    assert set(layer_digests(store, "g:2")[1:]) <= set(layer_digests(store, "g:1")[1:])
    fresh = build(Store.open(tmp_path / "s2"), tree, "g:2", BuildOptions(workers=2))
    alone = build(store, tree, None, BuildOptions(workers=2, reuse_store=False))
    assert alone.manifest.digest == fresh.manifest.digest != m.digest  # --no-reuse: the store is not consulted
    assert alone.new_chunks == alone.unique_chunks


def test_rebuilding_a_stored_tree_gives_the_same_image(generated_tree: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    r1 = build(store, generated_tree, "g:1", BuildOptions(workers=2))
    r2 = build(store, generated_tree, "g:2", BuildOptions(workers=1))
    assert r2.manifest.digest == r1.manifest.digest
    assert r2.added_bytes == 0 and r2.new_chunks == 0


def test_chunks_of_a_pack_the_store_lacks_are_new(generated_tree: Path, tmp_path: Path) -> None:
    """The catalogue may place a chunk in a pack whose blob is gone (or held only in part): such a
    chunk is built anew, never referenced from a pack the store could not push."""
    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    gone = layer_digests(store, "g:1")[1]
    idx = store.load_index(store.resolve("g:1"))
    pi = next(i for i, p in enumerate(idx.packs) if "sha256:" + p.hex() == gone)
    in_gone = {idx.chunk_ids[c] for c, fi in enumerate(idx.chunk_frames) if idx.frames[fi].pack == pi}
    os.unlink(tmp_path / "s" / "blobs" / "sha256" / gone[7:])
    r = build(store, generated_tree, "g:2", BuildOptions(workers=2))
    assert r.new_chunks == len(in_gone)
    assert gone in layer_digests(store, "g:2")  # re-made from the tree: the same content-defined pack
    assert store.layout.has(gone)


def test_cli_reuse_and_no_reuse_together_is_a_usage_error(tmp_path: Path) -> None:
    from helpers import assert_one_line_error, run_shoal, write_tree

    tree = write_tree(tmp_path / "t", {"a": b"x"})
    p = run_shoal(tmp_path / "s", "build", tree, "a:1", "--reuse", "b:1", "--no-reuse", check=False)
    line = assert_one_line_error(p, "--reuse", "--no-reuse")
    assert p.returncode == 2, (p.returncode, line)
    ok = run_shoal(tmp_path / "s", "build", "--no-reuse", tree, "a:1", check=False)
    assert ok.returncode == 0, ok.stderr


def test_a_convert_takes_stored_chunks_with_no_flag(generated_tree: Path, tmp_path: Path) -> None:
    """A classic image of a tree already built in the store converts into no new chunk and no new pack."""
    from shoal.convert import convert, export_to_layout
    from shoal.transports.base import parse_reference

    store = Store.open(tmp_path / "s")
    build(store, generated_tree, "g:1", BuildOptions(workers=2))
    export_to_layout(store, "g:1", tmp_path / "oci", "g")
    before = blob_bytes(tmp_path / "s")
    with parse_reference(f"oci:{tmp_path / 'oci'}:g").new_source() as src:
        r = convert(src, store, "c:1")
    built = r.images[0].build
    assert built.new_chunks == 0 and built.new_packs == 0
    m = built.manifest
    assert blob_bytes(tmp_path / "s") - before <= m.index.size + m.config.size + 4096
