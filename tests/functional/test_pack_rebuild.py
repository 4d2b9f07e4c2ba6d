"""A pack the store holds only in part is rebuilt byte for byte to be pushed (transports/local.py):
its present frames as they are, the missing ones recompressed from chunks the store has elsewhere,
at whichever frame level (format.md §5.3: 5 now, 3 before) gives the pack its digest."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_transfer import build_image, make_tree  # noqa: E402

from shoal.format import packing  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.transports.base import BlobInfo, parse_reference  # noqa: E402
from shoal.transports.context import SystemContext  # noqa: E402


@pytest.mark.parametrize("level", [3, 5])
def test_partly_held_pack_is_rebuilt_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    tree = make_tree(tmp_path / "tree")
    other = tmp_path / "other"
    build_image(other, tree, "b:1")  # the same chunks in packs of its own (today's level)
    store_dir = tmp_path / "store"
    monkeypatch.setattr(packing, "ZSTD_LEVEL", level)
    m = build_image(store_dir, tree, "a:1")
    monkeypatch.undo()
    store = Store.open(store_dir)
    idx = store.load_index(m)
    # a pack with compressible frames (an incompressible frame is the same bytes at every level)
    def squeezed(pi: int) -> int:
        return sum(1 for f in idx.frames if f.pack == pi and f.clen < 0.9 * f.ulen)

    pi = max(range(len(m.packs)), key=squeezed)
    pack = m.packs[pi]
    frames = sorted((f.offset, f.clen, f.ulen) for f in idx.frames if f.pack == pi)
    missing = [(off, clen) for off, clen, ulen in frames if clen < 0.9 * ulen][::2]
    assert missing and len(missing) < len(frames), "the test needs a pack with compressible frames"
    raw = store.layout.get(pack.digest)
    # the store keeps the other frames of the pack; the chunks of the missing ones live in b's packs only
    for off, clen, _ in frames:
        if (off, clen) not in missing:
            store.partial.put_frame(pack.digest, off, raw[off:off + clen])
    store.layout.path(pack.digest).unlink()
    store.catalog.drop_packs({pack.digest})
    b = Store.open(other)
    bm = b.resolve("b:1")
    for d in (bm.digest, bm.config.digest, bm.index.digest, *(p.digest for p in bm.packs)):
        store.layout.put(b.layout.get(d), d)
    store.register_chunks(bm)

    src = parse_reference("a:1").new_source(SystemContext(store=str(store_dir)))
    try:
        stream, size = src.get_blob(BlobInfo(pack.digest, pack.size, pack.media_type))
        with stream:
            data = stream.read()
    finally:
        src.close()
    assert size == pack.size and data == raw
    assert "sha256:" + hashlib.sha256(data).hexdigest() == pack.digest
