"""Acceptance 5: the store survives SIGKILL and concurrent writers, and corruption is found and refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, assert_same_tree, clone_tree, run_shoal, shoal_cmd, tree_snapshot, write_tree
from shoal.format.model import Kind
from shoal.store import Store


def _fsck(store_dir: Path) -> dict:  # type: ignore[type-arg]
    p = run_shoal(store_dir, "fsck", "--json", check=False)
    doc = json.loads(p.stdout)
    assert (p.returncode == 0) == doc["ok"], (p.returncode, doc)
    return doc


def _tmp_files(store_dir: Path) -> int:
    try:
        return len(os.listdir(store_dir / "tmp"))
    except FileNotFoundError:
        return 0


def _blob_files(store_dir: Path) -> int:
    try:
        return len(os.listdir(store_dir / "blobs" / "sha256"))
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("when", ["tmp-files", 0.3, "commit"])
def test_sigkill_mid_build_then_fsck_and_rebuild(generated_tree: Path, tmp_path: Path, when: str | float) -> None:
    """Kill -9 ``shoal build`` while it writes packs to tmp/ ("tmp-files"), at a fixed time, or as soon as
    the first blob is published ("commit": the batch rename, best effort)."""
    store_dir = tmp_path / "s"
    run_shoal(store_dir, "images")  # initialise the store, so the build's start-up is all that's left
    proc = subprocess.Popen(shoal_cmd(store_dir, "build", "--workers", "2", generated_tree, "big:1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 30:
            if when == "tmp-files" and _tmp_files(store_dir) >= 3:
                break
            if when == "commit" and _blob_files(store_dir) > 0:
                break
            if isinstance(when, float) and time.monotonic() - t0 >= when:
                break
            time.sleep(0.002)
        if when != "commit":
            assert proc.poll() is None, "the build finished before it could be killed; use a bigger tree"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode in ((-signal.SIGKILL, 0) if when == "commit" else (-signal.SIGKILL,))
    # whatever the moment, the store is consistent (fsck deeply checks any image that did get tagged)
    doc = _fsck(store_dir)
    assert doc["ok"], doc["errors"]
    # a re-run succeeds and gives the image a clean build gives
    p = run_shoal(store_dir, "build", "--json", "--workers", "2", generated_tree, "big:1")
    clean = run_shoal(tmp_path / "clean", "build", "--json", "--workers", "1", generated_tree, "big:1")
    assert json.loads(p.stdout)["digest"] == json.loads(clean.stdout)["digest"]
    doc = _fsck(store_dir)
    assert doc["ok"] and doc["images"] == 1, doc
    # gc cleans what the killed build left in tmp/, and keeps the image whole
    json.loads(run_shoal(store_dir, "gc", "--json").stdout)
    assert _tmp_files(store_dir) == 0
    assert _fsck(store_dir)["ok"]


def test_two_concurrent_builds_into_one_store(generated_tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    clone_tree(generated_tree, other)
    (other / "d000" / "extra").write_bytes(b"x" * 100_000)
    store_dir = tmp_path / "s"
    procs = [subprocess.Popen(shoal_cmd(store_dir, "build", "--json", "--workers", "2", src, ref),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for src, ref in ((generated_tree, "a:1"), (other, "b:1"), (generated_tree, "c:1"))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
    # the default build reuses what the store holds when it reads the catalogue (format.md §5), so
    # which packs a:1 and c:1 are made of depends on the race; their trees, and so roots, do not
    docs = [json.loads(o) for o, _ in outs]
    assert docs[0]["root"] == docs[2]["root"] != docs[1]["root"]
    doc = _fsck(store_dir)
    assert doc["ok"] and doc["images"] == 3, doc
    assert _tmp_files(store_dir) == 0
    imgs = json.loads(run_shoal(store_dir, "images", "--json").stdout)["images"]
    assert sorted(i["ref"] for i in imgs) == ["a:1", "b:1", "c:1"]


def test_gc_during_build_keeps_the_new_image(generated_tree: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    write_tree(tmp_path / "old", {"x": b"old" * 1000})
    run_shoal(store_dir, "build", tmp_path / "old", "old:1")
    run_shoal(store_dir, "rm", "old:1")
    proc = subprocess.Popen(shoal_cmd(store_dir, "build", "--workers", "2", generated_tree, "new:1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while _tmp_files(store_dir) == 0 and proc.poll() is None and time.monotonic() - t0 < 30:
        time.sleep(0.005)
    gc = run_shoal(store_dir, "gc", "--json")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert json.loads(gc.stdout)["removed"] >= 1  # old:1's blobs
    doc = _fsck(store_dir)
    assert doc["ok"] and doc["images"] == 1, doc
    out = tmp_path / "out"
    run_shoal(store_dir, "unpack", "new:1", out)
    assert_same_tree(tree_snapshot(generated_tree), tree_snapshot(out))


# ------------------------------------------------------------------------------ corruption


@pytest.fixture
def small_image(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A store with one image of a few files: random (stored raw by zstd) and text (compressed)."""
    import random

    rng = random.Random(8)
    files = {f"dir/f{i}": rng.randbytes(rng.randrange(1000, 300_000)) for i in range(8)}
    files.update({f"text/t{i}": (b"hello shoal %d\n" % i) * 20000 for i in range(4)})
    tree = write_tree(tmp_path / "tree", files)
    store_dir = tmp_path / "s"
    run_shoal(store_dir, "build", tree, "img:1")
    store = Store.open(store_dir)
    m = store.resolve("img:1")
    return store_dir, store, m, store.load_index(m), tree


def _file_in_frame(idx, fi: int) -> bytes:  # type: ignore[no-untyped-def]
    for e in idx.entries:
        if e.kind == Kind.FILE and any(idx.chunk_frames[c] == fi for c in e.chunks):
            return e.path
    raise AssertionError("no file in that frame")


def _damaged_file(store: Store, idx, fi: int) -> bytes:  # type: ignore[no-untyped-def]
    """A file with a chunk of frame ``fi`` that no longer decompresses or verifies."""
    import hashlib

    import zstandard

    f = idx.frames[fi]
    raw = store.layout.read_range("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen)
    try:
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=f.ulen)
    except zstandard.ZstdError:
        return _file_in_frame(idx, fi)  # the whole frame is unreadable
    bad = {c for c in range(len(idx.chunk_ids)) if idx.chunk_frames[c] == fi
           and hashlib.sha256(data[idx.chunk_offsets[c]:idx.chunk_offsets[c] + idx.chunk_lengths[c]]).digest()
           != idx.chunk_ids[c]}
    assert bad, "the flipped byte changed no chunk"
    return next(e.path for e in idx.entries if e.kind == Kind.FILE and bad & set(e.chunks))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize("which", ["random", "text"])
def test_flipped_byte_in_pack(small_image, tmp_path: Path, which: str) -> None:  # type: ignore[no-untyped-def]
    store_dir, store, m, idx, _ = small_image
    # pick a frame holding the kind of data we want (random data is stored raw, text is compressed)
    want = b"dir/" if which == "random" else b"text/"
    fi = next(i for i in range(len(idx.frames)) if _file_in_frame(idx, i).startswith(want))
    f = idx.frames[fi]
    pack = "sha256:" + idx.packs[f.pack].hex()
    _flip(store.layout.path(pack), f.offset + f.clen // 2)
    victim = _damaged_file(store, idx, fi)

    p = run_shoal(store_dir, "fsck", check=False)
    assert p.returncode != 0
    assert pack in p.stderr.decode()

    p = run_shoal(store_dir, "cat", "img:1", victim.decode(), check=False)
    assert_one_line_error(p, "verification", "corrupt")

    dest = tmp_path / "out"
    p = run_shoal(store_dir, "unpack", "img:1", dest, check=False)
    assert_one_line_error(p, "verification", "corrupt")
    assert not dest.exists(), "unpack left a partial target behind"


def test_failed_unpack_into_existing_empty_dir_leaves_it_empty(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, store, m, idx, _ = small_image
    last = idx.frames[-1]
    _flip(store.layout.path("sha256:" + idx.packs[last.pack].hex()), last.offset + last.clen // 2)
    dest = tmp_path / "out"
    dest.mkdir()
    p = run_shoal(store_dir, "unpack", "img:1", dest, check=False)
    assert_one_line_error(p, "verification", "corrupt")
    assert dest.is_dir() and os.listdir(dest) == [], f"partial unpack left behind: {sorted(os.listdir(dest))}"


def test_corrupt_index_blob(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, store, m, _, _ = small_image
    _flip(store.layout.path(m.index.digest), m.index.size // 2)
    assert run_shoal(store_dir, "fsck", check=False).returncode != 0
    for args in (("ls", "img:1"), ("cat", "img:1", "/text/t0"), ("unpack", "img:1", tmp_path / "out")):
        assert_one_line_error(run_shoal(store_dir, *args, check=False), "corrupt", "mismatch")
    assert not (tmp_path / "out").exists()


def test_truncated_and_missing_pack(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_dir, store, m, idx, _ = small_image
    assert len(m.packs) >= 1
    first = store.layout.path(m.packs[0].digest)
    os.truncate(first, first.stat().st_size // 2)
    doc = _fsck(store_dir)
    assert not doc["ok"] and any(m.packs[0].digest in e for e in doc["errors"])
    p = run_shoal(store_dir, "unpack", "img:1", tmp_path / "out", check=False)
    assert_one_line_error(p, "truncated", "corrupt", "verification")
    assert not (tmp_path / "out").exists()
    first.unlink()
    doc = _fsck(store_dir)
    assert not doc["ok"], doc
    assert any(m.packs[0].digest in e or "missing" in e for e in doc["errors"]), doc["errors"]
    p = run_shoal(store_dir, "unpack", "img:1", tmp_path / "out", check=False)
    assert_one_line_error(p, "not in the store", "missing")
    assert not (tmp_path / "out").exists()


def test_fsck_clean_store_and_idempotent_gc(small_image) -> None:  # type: ignore[no-untyped-def]
    store_dir, *_ = small_image
    doc = _fsck(store_dir)
    assert doc["ok"] and doc["images"] == 1 and doc["chunks"] > 0 and not doc["errors"]
    assert json.loads(run_shoal(store_dir, "gc", "--json").stdout)["removed"] == 0
    run_shoal(store_dir, "rm", "img:1")
    assert json.loads(run_shoal(store_dir, "gc", "--json").stdout)["removed"] >= 3
    assert os.listdir(store_dir / "blobs" / "sha256") == []
    assert _fsck(store_dir)["ok"]


def test_scoped_gc_removes_only_its_scope(small_image) -> None:  # type: ignore[no-untyped-def]
    """gc(scope=...) (the containerd snapshotter's release of one image): only the untagged blobs in
    the scope go; other untagged blobs, tmp/ and everything a tag reaches stay."""
    from shoal.store.maintenance import gc

    store_dir, store, m, _, _ = small_image
    other = store.layout.put(b"an untagged blob someone else owns")
    (store_dir / "tmp" / "in-flight").write_bytes(b"x")
    own = {m.digest, m.config.digest, m.index.digest, *(p.digest for p in m.packs)}
    assert gc(store, scope=own).removed == 0  # tagged: all kept
    run_shoal(store_dir, "rm", "img:1")
    rep = gc(store, scope=own)
    assert rep.removed == len(own) and rep.tmp_removed == 0
    assert set(store.layout.all_blobs()) == {other} and store.catalog.count() == 0
    assert (store_dir / "tmp" / "in-flight").exists()


def _save_profile(store_dir: Path, store: Store, m) -> list[Path]:  # type: ignore[no-untyped-def]
    """A recorded profile of ``m`` and its bundle, as ``shoal profile`` saves them (mount.md §6)."""
    from shoal.mount import bundle
    from shoal.mount.profile import Profile, save_local

    idx = store.load_index(m)
    prof = Profile.of_frames(m.digest, idx, list(range(min(3, len(idx.frames)))), 0.5, ("true",))
    return [save_local(store_dir, prof), bundle.save_local(store_dir, m.digest, b"a bundle (gc never reads it)")]


def test_gc_removes_the_profiles_of_images_gone(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``shoal rm`` + ``shoal gc``: the removed image's profile and bundle go with its blobs; a tagged
    image's stay, and so does a profile being written (its temp file); a scoped gc only touches the
    profiles of manifests in its scope."""
    from shoal.store.maintenance import gc

    store_dir, store, m, _, _ = small_image
    run_shoal(store_dir, "build", write_tree(tmp_path / "other", {"etc/motd": b"still here\n"}), "other:1")
    other = store.resolve("other:1")
    gone, kept = _save_profile(store_dir, store, m), _save_profile(store_dir, store, other)
    writing = store_dir / "profiles" / f".{m.digest.removeprefix('sha256:')}.json.abc123.tmp"
    writing.write_bytes(b"{")
    doc = json.loads(run_shoal(store_dir, "gc", "--json").stdout)
    assert doc["removed"] == 0 and doc["profiles_removed"] == 0 and all(p.exists() for p in gone + kept)
    run_shoal(store_dir, "rm", "img:1")
    assert gc(store, scope={other.digest}).profiles_removed == 0 and all(p.exists() for p in gone)
    size = sum(p.stat().st_size for p in gone)
    doc = json.loads(run_shoal(store_dir, "gc", "--json").stdout)
    assert doc["profiles_removed"] == 2 and doc["freed"] > size and doc["removed"] >= 3
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept) and writing.exists()
    p = run_shoal(store_dir, "gc")
    assert b"profile" not in p.stdout  # nothing more to remove
    assert _fsck(store_dir)["ok"]


def test_gc_waits_for_a_writer_that_saves_a_profile_before_its_tag(small_image) -> None:  # type: ignore[no-untyped-def]
    """A pull saves the image's profile before it tags the image, holding the shared gc lock (as it
    does for the blobs): a gc started meanwhile waits, then keeps the profile of the image now tagged."""
    store_dir, store, m, _, _ = small_image
    run_shoal(store_dir, "rm", "img:1")  # the blobs are there, untagged: as a pull has them before commit
    with store.layout.writing():
        files = _save_profile(store_dir, store, m)
        proc = subprocess.Popen(shoal_cmd(store_dir, "gc", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(0.5)
            assert proc.poll() is None, "gc ran while a writer held the shared gc lock"
            store.tag("img:2", m)
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["profiles_removed"] == 0 and all(p.exists() for p in files)


def test_missing_pack_is_reported_by_the_first_fsck(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A pack deleted from a healthy store: the catalogue still names it, and must not vouch for it."""
    store_dir, store, m, idx, _ = small_image
    gone = m.packs[0].digest
    store.layout.path(gone).unlink()
    doc = _fsck(store_dir)
    assert not doc["ok"], doc
    assert any(gone in e or "missing" in e for e in doc["errors"]), doc["errors"]
    p = run_shoal(store_dir, "unpack", "img:1", tmp_path / "out", check=False)
    assert_one_line_error(p, "not in the store", "missing")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ partial packs


def _complete_partial(store: Store, data: bytes, frame: int = 256 * 1024) -> str:
    import hashlib

    pack = "sha256:" + hashlib.sha256(data).hexdigest()
    for off in range(0, len(data), frame):
        store.partial.put_frame(pack, off, data[off : off + frame])
    return pack


def test_partial_pack_promoted_by_another_process_meanwhile(tmp_path: Path) -> None:
    """Every frame is recorded but the partial file is gone: another process promoted the pack and
    dropped it between this one's checks.  Not an error (it was an internal error, exit 70)."""
    store = Store.open(tmp_path / "s")
    data = os.urandom(1 << 20)
    pack = _complete_partial(store, data)
    store.partial.path(pack).unlink()
    assert store.partial.try_promote(pack, len(data)) is False  # nothing to promote here, and no crash
    store.layout.put(data)  # what the other process left
    assert store.partial.try_promote(pack, len(data)) is True
    assert not store.partial.path(pack).exists() and store.partial.present(pack) == 0


def test_concurrent_promotions_of_one_partial_pack(tmp_path: Path) -> None:
    """Four stores (as four pulls of one image would) promote the same complete partial pack at once."""
    import threading

    data = os.urandom(2 << 20)
    for i in range(10):
        root = tmp_path / f"s{i}"
        stores = [Store.open(root) for _ in range(4)]
        pack = _complete_partial(stores[0], data)
        barrier = threading.Barrier(len(stores))
        errors: list[BaseException] = []
        results: list[bool] = []

        def promote(s: Store, pack: str, barrier: threading.Barrier, results: list[bool],
                    errors: list[BaseException]) -> None:
            barrier.wait()
            try:
                results.append(s.partial.try_promote(pack, len(data)))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=promote, args=(s, pack, barrier, results, errors)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(results) and stores[0].layout.get(pack) == data
        assert not stores[0].partial.path(pack).exists() and stores[0].partial.present(pack) == 0
    assert _fsck(tmp_path / "s0")["ok"]
