"""Acceptance 1: the same tree gives the same manifest digest and Merkle root, whatever the worker
count and whatever order its files were created in (docs/spec/format.md: reproducibility)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_same_tree, clone_tree, tree_snapshot
from shoal.build import BuildOptions, build
from shoal.store import Store


def _build(tree: Path, store_dir: Path, workers: int) -> tuple[str, str, str]:
    r = build(Store.open(store_dir), tree, "repro:1", BuildOptions(workers=workers))
    idx_digest = r.manifest.index.digest
    return r.manifest.digest, r.manifest.root, idx_digest


def _check_reproducible(tree: Path, tmp: Path, order: str) -> None:
    clone = tmp / "clone"
    clone_tree(tree, clone, seed=7, order=order)
    # the copy really is the same tree, created in another order
    assert_same_tree(tree_snapshot(tree), tree_snapshot(clone))
    results = {
        ("orig", 1): _build(tree, tmp / "s-orig-1", 1),
        ("orig", 2): _build(tree, tmp / "s-orig-2", 2),
        ("clone", 1): _build(clone, tmp / "s-clone-1", 1),
        ("clone", 2): _build(clone, tmp / "s-clone-2", 2),
    }
    assert len(set(results.values())) == 1, results
    # different stores really were used, and each holds identical blobs
    blobs = [sorted(p.name for p in (tmp / f"s-{k}-{w}" / "blobs" / "sha256").iterdir()) for k, w in results]
    assert all(b == blobs[0] for b in blobs)


def test_generated_tree_reproducible(generated_tree: Path, tmp_path: Path) -> None:
    _check_reproducible(generated_tree, tmp_path, order="shuffle")


@pytest.mark.slow
def test_debian_rootfs_reproducible(debian_rootfs: Path, tmp_path: Path) -> None:
    _check_reproducible(debian_rootfs, tmp_path, order="reverse")


def test_source_date_epoch_changes_only_clamped_mtimes(tmp_path: Path) -> None:
    """SOURCE_DATE_EPOCH clamps mtimes: a tree whose mtimes are all older than it builds identically;
    a newer mtime is clamped, so touching a file to 'now' does not change the image."""
    import os

    from helpers import write_tree

    tree = write_tree(tmp_path / "t", {"a": b"1" * 100, "d/b": b"2" * 5000})
    epoch = 1_700_000_000
    a = build(Store.open(tmp_path / "s1"), tree, "x:1", BuildOptions(workers=1, source_date_epoch=epoch))
    os.utime(tree / "a", ns=((epoch + 10**6) * 10**9 + 5,) * 2)
    b = build(Store.open(tmp_path / "s2"), tree, "x:1", BuildOptions(workers=1, source_date_epoch=epoch))
    c = build(Store.open(tmp_path / "s3"), tree, "x:1", BuildOptions(workers=1))
    assert a.manifest.root != b.manifest.root  # 'a' went from 1.6e9 to the clamp value
    os.utime(tree / "a", ns=((epoch + 2 * 10**6) * 10**9,) * 2)
    d = build(Store.open(tmp_path / "s4"), tree, "x:1", BuildOptions(workers=1, source_date_epoch=epoch))
    assert d.manifest.digest == b.manifest.digest and d.manifest.root == b.manifest.root
    assert c.manifest.root != b.manifest.root
