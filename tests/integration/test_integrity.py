"""The Merkle root binds every byte, and the store believes no claim it has not verified (issue 8).

- A crafted index that reorders, replaces, drops or repeats a file's chunk references has another
  root (or is refused), and ``diff``/``fsck``/``cat``/``unpack`` agree with what that root covers.
- An index served by an honest registry that claims another image's chunk ids cannot poison the
  catalogue: the other image stays pullable and exact, before and after ``rm`` + ``gc``.
- A hostile ``oci:`` layout that claims a frame inside another image's partial pack changes nothing
  of it.
- ``fsck`` re-hashes catalogue rows and drops the ones that lie.
"""

from __future__ import annotations

import hashlib
import random
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401
from shoal import mediatypes as mt  # noqa: E402
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.format import index as fidx  # noqa: E402
from shoal.format.manifest import Descriptor, ImageConfig, build_config, build_manifest, parse_manifest  # noqa: E402
from shoal.format.model import Frame, Index, Kind  # noqa: E402
from shoal.store import Store  # noqa: E402

__all__ = ["registry"]

T = 1_600_000_000_000_000_000


def shoal(store: Path | None, *args: str, check: bool = True) -> Any:
    return helpers.run_shoal(store, *args, check=check, timeout=120)


def make_tree(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    files = {f"etc/f{i:02d}.txt": b"line %d %d\n" % (seed, i) * rng.randint(10, 400) for i in range(30)}
    files["usr/bin/big"] = rng.randbytes(1_200_000)  # ~18 chunks
    files["usr/lib/lib.so"] = rng.randbytes(300_000)
    return helpers.write_tree(root, files)


def rebuilt(idx: Index, entries: list[Any] | None = None, ids: list[bytes] | None = None) -> Index:
    """``idx`` with other entries or chunk ids, Merkle digests recomputed (what an attacker can do)."""
    return fidx.make_index(list(entries if entries is not None else idx.entries),
                           list(ids if ids is not None else idx.chunk_ids), list(idx.chunk_frames),
                           list(idx.chunk_offsets), list(idx.chunk_lengths), list(idx.frames), list(idx.packs))


def put(store: Store, ref: str, idx: Index, root: str | None = None, packs: list[Descriptor] | None = None) -> str:
    """Tag an image made of ``idx`` (compressed) and the given pack descriptors (default: the index's
    packs, which must be in the store); ``root`` defaults to the index's own."""
    blob = fidx.compress(fidx.encode(idx))
    lay = store.layout
    root = root or "sha256:" + idx.root.hex()
    idx_desc = Descriptor(mt.INDEX, lay.put(blob), len(blob))
    cfg = build_config(ImageConfig(architecture="amd64", os="linux", root=root))
    cfg_desc = Descriptor(mt.CONFIG, lay.put(cfg), len(cfg))
    if packs is None:
        packs = [Descriptor(mt.PACK, "sha256:" + p.hex(), lay.size("sha256:" + p.hex())) for p in idx.packs]
    raw, digest = build_manifest(cfg_desc, idx_desc, packs, root)
    lay.put(raw)
    store.tag(ref, parse_manifest(raw, digest))
    return digest


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("integrity")
    a, b = make_tree(d / "a", 1), make_tree(d / "b", 2)
    s = d / "store"
    for tree, ref in ((a, "a:1"), (b, "b:1")):
        build(Store.open(s), tree, ref, BuildOptions(workers=2))
    return s, a, b


# ------------------------------------------------------------------------------ the root binds content

def _mutations(idx: Index) -> dict[str, list[Any]]:
    big = next(e for e in idx.entries if e.path == b"usr/bin/big")
    i = idx.entries.index(big)
    ln = idx.chunk_lengths
    c = list(big.chunks)
    other = next(x for x in range(len(idx.chunk_ids)) if x not in c)

    def with_chunks(chunks: list[int]) -> list[Any]:
        es = list(idx.entries)
        es[i] = replace(big, chunks=tuple(chunks), size=sum(ln[x] for x in chunks))
        return es

    out = {
        "swap": with_chunks([c[1], c[0]] + c[2:]),
        "replace": with_chunks([other] + c[1:]),
        "drop": with_chunks(c[1:]),
        "duplicate": with_chunks([c[0]] + c),
        "mode": list(idx.entries[:i]) + [replace(big, mode=0o4755)] + list(idx.entries[i + 1:]),
    }
    es = list(idx.entries)
    es[i] = replace(big, size=big.size + 1)
    out["size-only"] = es
    return out


def test_every_change_to_a_files_chunks_changes_the_root_or_is_refused(images: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    s, _, _ = images
    store = Store.open(s)
    idx = store.load_index(store.resolve("a:1"))
    seen = {idx.root}
    for name, entries in _mutations(idx).items():
        evil = rebuilt(idx, entries)
        raw = fidx.encode(evil)
        if name == "size-only":
            with pytest.raises(Exception, match="add up"):
                fidx.decode(raw)
            continue
        assert fidx.decode(raw).root not in seen, name  # a valid index, and another root
        seen.add(evil.root)
        # keeping the original root is refused at decode
        doc = fidx.cbor.decode(raw)
        doc["root"] = idx.root
        with pytest.raises(Exception, match="root digest mismatch"):
            fidx.decode(fidx.cbor.encode(doc))


def test_swapped_chunks_are_a_different_image_for_every_command(images: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    """The attack of issue 8, end to end: what the crafted root covers is what every command serves."""
    s, a_tree, _ = images
    store = Store.open(s)
    idx = store.load_index(store.resolve("a:1"))
    evil = rebuilt(idx, _mutations(idx)["swap"])
    put(store, "evil:swap", evil)
    # the same bytes, under the original root: refused everywhere
    put(store, "evil:sameroot", evil, root="sha256:" + idx.root.hex())

    ins_a = helpers.run_shoal(s, "inspect", "a:1", "--json").stdout
    ins_e = helpers.run_shoal(s, "inspect", "evil:swap", "--json").stdout
    assert b'"root"' in ins_a and ins_a != ins_e
    d = shoal(s, "diff", "a:1", "evil:swap", check=False)
    assert d.returncode == 0 and b"usr/bin/big" in d.stdout, d.stdout
    big = (a_tree / "usr/bin/big").read_bytes()
    got = shoal(s, "cat", "evil:swap", "usr/bin/big").stdout
    chunks = [idx.chunk_lengths[c] for c in idx.lookup(b"usr/bin/big").chunks]  # type: ignore[union-attr]
    want = big[chunks[0]:chunks[0] + chunks[1]] + big[:chunks[0]] + big[chunks[0] + chunks[1]:]
    assert got == want != big
    for args in (("cat", "evil:sameroot", "usr/bin/big"), ("ls", "evil:sameroot"),
                 ("unpack", "evil:sameroot", str(tmp_path / "u"))):
        p = shoal(s, *args, check=False)
        helpers.assert_one_line_error(p, "root")
        assert p.returncode == 4, args
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())
    f = shoal(s, "fsck", check=False)
    assert f.returncode == 5 and b"evil:sameroot" in f.stderr and b"evil:swap" not in f.stderr
    shoal(s, "rm", "evil:sameroot")
    shoal(s, "rm", "evil:swap")
    shoal(s, "fsck")


# ------------------------------------------------------------------------------ no claim unverified

def _liar(store: Store, victim: str, donor: str) -> Index:
    """``donor``'s index and packs, with its chunk ids replaced by ``victim``'s: a valid, consistent
    index whose every chunk claim is false."""
    v = store.load_index(store.resolve(victim))
    d = store.load_index(store.resolve(donor))
    assert len(v.chunk_ids) >= len(d.chunk_ids)
    return rebuilt(d, ids=list(v.chunk_ids[: len(d.chunk_ids)]))


def test_a_lying_index_cannot_poison_the_catalogue(registry: Registry, images: tuple[Path, Path, Path],
                                                   tmp_path: Path) -> None:
    s, a_tree, _ = images
    store = Store.open(s)
    put(store, "liar:1", _liar(store, "a:1", "b:1"))
    repo = f"integrity/{uuid.uuid4().hex[:8]}"
    a_ref, liar_ref = f"docker://{registry.host}/{repo}:a", f"docker://{registry.host}/{repo}:liar"
    shoal(s, "push", "a:1", a_ref)
    shoal(s, "push", "liar:1", liar_ref)
    shoal(s, "rm", "liar:1")  # the module's store stays honest for the other tests

    # an empty store: the liar's packs come whole (digests fine), its chunk claims are false
    t = tmp_path / "t"
    p = shoal(t, "pull", liar_ref, "liar:1", check=False)
    helpers.assert_one_line_error(p, "digest mismatch", "failed verification", "hash otherwise")
    assert p.returncode == 5
    assert shoal(t, "images", "--json").stdout.strip() in (b"[]", b"{}") or b"liar" not in shoal(
        t, "images", "--json").stdout
    shoal(t, "fsck")
    # the same with the tree written while it is pulled: refused as well, and no file of it is left
    p = shoal(tmp_path / "tu", "pull", liar_ref, "liar:1", "--unpack", str(tmp_path / "tree"), check=False)
    helpers.assert_one_line_error(p, "digest mismatch", "failed verification", "hash otherwise")
    assert p.returncode == 5 and not (tmp_path / "tree").exists()
    for rnd in range(2):  # then the honest image: pullable and exact, before and after rm + gc
        shoal(t, "pull", a_ref, "a:1")
        out = tmp_path / f"a{rnd}"
        shoal(t, "unpack", "a:1", str(out))
        helpers.assert_same_tree(helpers.tree_snapshot(a_tree), helpers.tree_snapshot(out))
        shoal(t, "fsck")
        shoal(t, "rm", "a:1")
        shoal(t, "gc")

    # the other order: the honest image first, then the liar; rm + gc of the honest one
    u = tmp_path / "u"
    shoal(u, "pull", a_ref, "a:1")
    shoal(u, "pull", liar_ref, "liar:1", check=False)  # its chunk ids are the honest ones: nothing new
    shoal(u, "rm", "a:1")
    shoal(u, "gc")
    shoal(u, "pull", a_ref, "a:1")
    shoal(u, "unpack", "a:1", str(tmp_path / "ua"))
    helpers.assert_same_tree(helpers.tree_snapshot(a_tree), helpers.tree_snapshot(tmp_path / "ua"))
    shoal(u, "fsck")


def test_a_hostile_layout_cannot_touch_another_images_partial_pack(registry: Registry, tmp_path: Path) -> None:
    base = make_tree(tmp_path / "base", 5)
    upd = tmp_path / "upd"
    import shutil

    shutil.copytree(base, upd, symlinks=True)
    with open(upd / "usr/bin/big", "r+b") as f:  # an edit inside the big file: its pack is new, most frames not
        f.seek(600_000)
        f.write(b"edited" * 100)
    helpers.fix_times(upd, T)
    src = tmp_path / "src"
    build(Store.open(src), base, "base:1", BuildOptions(workers=2))
    build(Store.open(src), upd, "upd:1", BuildOptions(workers=2, reuse_store=False))  # alone: new packs, shared chunks
    repo = f"integrity/{uuid.uuid4().hex[:8]}"
    for ref in ("base", "upd"):
        shoal(src, "push", f"{ref}:1", f"docker://{registry.host}/{repo}:{ref}")
    s = tmp_path / "s"
    shoal(s, "pull", f"docker://{registry.host}/{repo}:base", "base:1")
    shoal(s, "pull", f"docker://{registry.host}/{repo}:upd", "upd:1")
    store = Store.open(s)
    frames = store.catalog._conn().execute("SELECT pack, off, clen FROM frames ORDER BY pack, off").fetchall()
    if not frames:
        pytest.skip("the update was not pulled with range reads")
    pack, off, clen = frames[0]
    before = store.partial.path(pack).read_bytes()

    # the layout: one file whose chunks sit in a frame the layout places at pack@off
    evil_data = b"not the honest bytes " * 500
    cid = hashlib.sha256(evil_data).digest()
    frame = zstandard.ZstdCompressor(level=3).compress(evil_data)
    size = store.catalog.frame_bytes(pack)  # any size past the frame will do for the descriptor
    size = max(size, off + len(frame)) + 1000
    entries = [fidx.Entry(b"", Kind.DIR, 0o755, 0, 0, T),
               fidx.Entry(b"x", Kind.FILE, 0o644, 0, 0, T, size=len(evil_data), chunks=(0,))]
    evil = fidx.make_index(entries, [cid], [0], [0], [len(evil_data)],
                           [Frame(0, off, len(frame), len(evil_data))], [bytes.fromhex(pack[7:])])
    lay = Store.open(tmp_path / "layout")
    blob = bytearray(size)
    blob[off:off + len(frame)] = frame
    lay.layout.path(pack).write_bytes(bytes(blob))  # a file named as the pack, with other bytes
    put(lay, "evil:1", evil, packs=[Descriptor(mt.PACK, pack, size)])

    p = shoal(s, "copy", f"oci:{tmp_path / 'layout'}:evil:1", "evil:1", check=False)
    helpers.assert_one_line_error(p, "digest", "verification")
    assert p.returncode == 5
    assert store.partial.path(pack).read_bytes() == before
    assert store.catalog._conn().execute("SELECT pack, off, clen FROM frames ORDER BY pack, off").fetchall() == frames
    shoal(s, "fsck")
    shoal(s, "unpack", "upd:1", str(tmp_path / "out"))
    helpers.assert_same_tree(helpers.tree_snapshot(upd), helpers.tree_snapshot(tmp_path / "out"))


def test_fsck_rehashes_catalogue_rows_and_drops_the_ones_that_lie(images: tuple[Path, Path, Path],
                                                                   tmp_path: Path) -> None:
    import shutil

    s = tmp_path / "copy"
    shutil.copytree(images[0], s)
    store = Store.open(s)
    idx = store.load_index(store.resolve("b:1"))
    f = idx.frames[0]
    pack = "sha256:" + idx.packs[f.pack].hex()
    fake = hashlib.sha256(b"a chunk that is not there").digest()
    store.catalog.add([(fake, pack, f.offset, f.clen, f.ulen, 0, 100)])  # as an older Shoal might have
    p = shoal(s, "fsck", check=False)
    assert p.returncode == 5 and fake.hex().encode() in p.stderr
    assert shoal(s, "fsck", "--blobs-only").returncode == 0
    shoal(s, "fsck")  # the row was dropped
    assert fake not in store.catalog.locate([fake])
