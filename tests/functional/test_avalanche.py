"""Acceptance 3: a small edit changes a handful of chunks and at most 2 pack blobs plus the index.

The tree: 300 files of 100 B-300 KB (half random, half low-entropy) in 7 directories, plus one
20 MiB random file, all from random.Random(5), every mtime 2020-09-13.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from helpers import layer_digests, write_tree
from shoal.build import BuildOptions, build
from shoal.store import Store

BIG = "m/big.bin"
MAX_NEW_CHUNKS = 3


def _files() -> dict[str, bytes]:
    rng = random.Random(5)
    files = {}
    low_entropy = bytes(range(0, 256, 16)) * 16
    for i in range(300):
        n = int(100 * 3000 ** rng.random())
        data = rng.randbytes(n)
        files[f"d{i % 7}/f{i:03d}"] = data if i % 2 else data.translate(low_entropy)
    files[BIG] = rng.randbytes(20 << 20)
    return files


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("avalanche")
    files = _files()
    build(Store.open(d / "store"), write_tree(d / "v1", files), "t:v1", BuildOptions(workers=2))
    return d, files


def _compare(base: tuple[Path, dict[str, bytes]], tmp_path: Path, files: dict[str, bytes]) -> None:
    d, _ = base
    store = Store.open(d / "store")
    build(store, write_tree(tmp_path / "v2", files), "t:v2", BuildOptions(workers=2))
    i1 = store.load_index(store.resolve("t:v1"))
    i2 = store.load_index(store.resolve("t:v2"))
    assert len(i1.chunk_ids) > 300  # the comparison means something
    new, gone = set(i2.chunk_ids) - set(i1.chunk_ids), set(i1.chunk_ids) - set(i2.chunk_ids)
    assert 1 <= len(new) <= MAX_NEW_CHUNKS, (len(new), len(gone))
    assert len(gone) <= MAX_NEW_CHUNKS
    l1, l2 = layer_digests(store, "t:v1"), layer_digests(store, "t:v2")
    assert len(l1) >= 10
    fresh = [x for x in l2 if x not in l1]
    assert l2[0] in fresh  # the index changed
    assert len(fresh) <= 3, f"{len(fresh) - 1} new packs of {len(l2) - 1}"
    store.untag("t:v2")


@pytest.mark.parametrize("path", ["d3/f010", "d0/f000", BIG])
def test_append_one_byte(base, tmp_path: Path, path: str) -> None:  # type: ignore[no-untyped-def]
    files = dict(base[1])
    files[path] = files[path] + b"!"
    _compare(base, tmp_path, files)


@pytest.mark.parametrize("where", ["middle", 1, 2, 3])
def test_insert_1k_into_20mb_file(base, tmp_path: Path, where: str | int) -> None:  # type: ignore[no-untyped-def]
    files = dict(base[1])
    data = files[BIG]
    pos = len(data) // 2 if where == "middle" else random.Random(where).randrange(len(data))
    files[BIG] = data[:pos] + random.Random(99).randbytes(1024) + data[pos:]
    _compare(base, tmp_path, files)


def test_unchanged_tree_shares_everything(base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Control: rebuilding the same content from a new directory gives the very same layers."""
    d, files = base
    store = Store.open(d / "store")
    build(store, write_tree(tmp_path / "same", files), "t:same", BuildOptions(workers=1))
    assert layer_digests(store, "t:same") == layer_digests(store, "t:v1")
    store.untag("t:same")
