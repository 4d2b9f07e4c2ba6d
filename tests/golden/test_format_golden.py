"""Golden bytes of the format (docs/spec/format.md §3-§6): any change to the index encoding, the
Merkle rules, packing, compression, the manifest or the config shows up here.

How the values were made: by running the code once (tests/golden/tinytree.py holds the inputs),
checking the CBOR by hand against the spec (map keys in length-then-bytewise order: root, packs,
chunks, format, frames, entries, chunklocs; shortest-form integers), and pasting them here.

After an intended format change, take the new values from the assertion message (it prints what the
code produced), re-check them, and paste them here in the same commit as the spec change.

The tiny-tree manifest digest also depends on the zstd library's exact output (packs and index are
zstd frames); the Merkle root and the uncompressed index digest do not.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from tinytree import hand_index, make_tiny_tree

from shoal.build import BuildOptions, build
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.manifest import ImageConfig
from shoal.store import Store

HAND_INDEX_HEX = (
    "a764726f6f7458203f10043b72760c2bea73aa639d4b2c2cc857f9335fef2fb1d7ac1cdfcdbb9a71657061636b7381582048"
    "62f447f2c7f272fa2f4aaf89dadb3b1ac09105bd5864f8d1a0c9452bb0a226666368756e6b73582022895c55e2bbc29b4049"
    "5f434c35f2838d68bc6eee154bdc2047079b21ac6c4166666f726d617402666672616d657354000000000000000000000000"
    "0000001e0000001567656e74726965738a8840001901ed00001b17979cfe3d85cd15a058203f10043b72760c2bea73aa639d"
    "4b2c2cc857f9335fef2fb1d7ac1cdfcdbb9a71884362696e001901ed00001b17979cfe3d85cd16a058207e2e3de1574ff0c0"
    "68a588cb76cfc4f2725d562bd7816985ebee011dccdb41f6884862696e2f6c696e6b021901ff00001b17979cfe3d85cd17a0"
    "427368884662696e2f7368011909ed00001b17979cfe3d85cd18a146757365722e6b437600ff82158100884762696e2f7368"
    "32031909ed00001b17979cfe3d85cd18a146757365722e6b437600ff4662696e2f73688844636166e9011901a41903e81903"
    "e824a08200808843646576001903ff00001b17979cfe3d85cd19a058208b261421052bf664b667df25527b1aea2e3661525e"
    "577ded8a6cb999b771814188486465762f6669666f0619018000001b17979cfe3d85cd1aa0f688486465762f6e756c6c0419"
    "01b600001b17979cfe3d85cd1ba082010388476465762f736461051901b000061b17979cfe3d85cd1ca0820800696368756e"
    "6b6c6f63734c000000000000000000000015"
)
HAND_ROOT = "3f10043b72760c2bea73aa639d4b2c2cc857f9335fef2fb1d7ac1cdfcdbb9a71"

TINY = {
    "manifest": "sha256:07d7d2006d290d7dcca5de599cac214ba4079c8f6bd92eb7f368003e4b84deac",
    "root": "sha256:24e6341dceb7a4714cce7e0c858dc149bb1b1e520fc425fc296d981442fdb79b",
    "index": "sha256:b95a72b7cffc5b75920d00ed524db85d8d42f1efc78a9fd2e27a583de65260ba",
    "config": "sha256:b5e75de021f8aad8bbe48f484fbef706c8a938c9d7e074e2dc9a0d5c1a838159",
    "packs": ["sha256:ce350a29114a8b243426ff44066dfb54a8cfb98d760231d78f0ae2a6e87b4728"],
    "index_cbor_sha256": "65a43526759776d71fc67fdf5777cef75ac3d87ec919a1e087f5bbd5204c084d",
    "chunk_lengths": [88202, 124454, 46965, 40379, 70000, 6],
}


def test_hand_index_encoding() -> None:
    idx = hand_index()
    raw = fidx.encode(idx)
    assert raw.hex() == HAND_INDEX_HEX
    assert idx.root.hex() == HAND_ROOT
    # the bytes decode to the same index, and are the canonical CBOR of what they decode to
    back = fidx.decode(bytes.fromhex(HAND_INDEX_HEX))
    assert back == idx
    assert cbor.encode(cbor.decode(raw)) == raw
    # the top-level map keys in canonical (length-first, then bytewise) order
    assert list(cbor.decode(raw)) == ["root", "packs", "chunks", "format", "frames", "entries", "chunklocs"]


def test_hand_index_survives_compression() -> None:
    raw = bytes.fromhex(HAND_INDEX_HEX)
    assert fidx.decompress(fidx.compress(raw)) == raw


def test_merkle_root_covers_every_field() -> None:
    """Changing any one field of any entry changes the root."""
    from dataclasses import replace

    idx = hand_index()
    base = idx.entries
    seen = {idx.root}
    for i, e in enumerate(base):
        for change in ({"mode": e.mode ^ 0o1}, {"uid": e.uid + 1}, {"gid": e.gid + 1}, {"mtime_ns": e.mtime_ns + 1},
                       {"xattrs": e.xattrs + ((b"user.z", b""),)}):
            if e.kind.name == "HARDLINK":
                continue  # a hardlink's metadata is its primary's
            entries = list(base)
            entries[i] = replace(e, **change)
            root = fidx.merkle(entries, idx.chunk_ids)[0].digest
            assert root not in seen, (e.path, change)
            seen.add(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="the tiny tree has files owned by uid 1000 (needs root)")
def test_tiny_tree_image(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tiny_tree(tree)
    opts = BuildOptions(workers=2, config=ImageConfig(architecture="amd64", os="linux"))
    r = build(Store.open(tmp_path / "s"), tree, "tiny:1", opts)
    store = Store.open(tmp_path / "s")
    idx = store.load_index(store.resolve("tiny:1"))
    got = {
        "manifest": r.manifest.digest,
        "root": r.manifest.root,
        "index": r.manifest.index.digest,
        "config": r.manifest.config.digest,
        "packs": [p.digest for p in r.manifest.packs],
        "index_cbor_sha256": hashlib.sha256(fidx.encode(idx)).hexdigest(),
        "chunk_lengths": list(idx.chunk_lengths),
    }
    # compare the format-only values first, so a zstd-only change is told apart from a format change
    assert (got["root"], got["index_cbor_sha256"], got["chunk_lengths"]) == (
        TINY["root"], TINY["index_cbor_sha256"], TINY["chunk_lengths"])
    assert got == TINY
