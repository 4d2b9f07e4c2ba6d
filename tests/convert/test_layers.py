"""Applying hand-made classic layers: every case of convert.md §4, trees asserted exactly."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from convtools import IMPLICIT, MTIME, D, F, Tar, apply, flat, gz, sha, zst

from shoal.convert.layers import LayerApplier
from shoal.format.model import Kind, path_key

CAP = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def test_basic_tree_and_implicit_parents(tmp_path: Path) -> None:
    layer = (Tar().dir("etc", mode=0o750, uid=1, gid=2).file("etc/passwd", b"root\n", mode=0o600)
             .file("a/b/c", b"deep").symlink("etc/link", "../a/b/c").bytes())
    t = apply(tmp_path, layer)
    assert flat(t) == {
        b"": IMPLICIT,
        b"a": IMPLICIT,
        b"a/b": IMPLICIT,
        b"a/b/c": F(b"deep"),
        b"etc": D(0o750, 1, 2),
        b"etc/link": ("SYMLINK", 0o777, 0, 0, MTIME * 10**9, {}, b"../a/b/c"),
        b"etc/passwd": F(b"root\n", 0o600),
    }
    paths = [e.path for e in t.entries]
    assert paths == sorted(paths, key=path_key)


def test_root_entry_sets_root_metadata(tmp_path: Path) -> None:
    t = apply(tmp_path, Tar().dir("./", mode=0o700, uid=5, gid=6, mtime=7).file("x", b"1").bytes())
    assert flat(t)[b""] == D(0o700, 5, 6, 7)


def test_leading_slash_dot_and_empty_components(tmp_path: Path) -> None:
    layer = Tar().dir("/abs").file("/abs/f", b"1").file("./rel//g", b"2").file("x/./y", b"3").bytes()
    assert set(flat(apply(tmp_path, layer))) == {b"", b"abs", b"abs/f", b"rel", b"rel/g", b"x", b"x/y"}


def test_whiteouts(tmp_path: Path) -> None:
    base = (Tar().dir("d").file("d/keep", b"k").file("d/gone", b"g").dir("d/sub").file("d/sub/f", b"s")
            .file("top", b"t").dir("e").file("e/old", b"o").dir("w").file("w/lower", b"l").bytes())
    upper = (Tar().whiteout("d/gone").whiteout("d/sub").whiteout("nothing/here").whiteout("top")
             .whiteout("e").file("e/new", b"n")  # whiteout of a dir, and a child of it in the same layer
             .file("w/mine", b"m").whiteout("w/mine")  # same-layer content survives its whiteout
             .whiteout("w/lower").file("w/lower", b"L2")  # hide the lower file, then create a new one
             .bytes())
    assert flat(apply(tmp_path, base, upper)) == {
        b"": IMPLICIT,
        b"d": D(),
        b"d/keep": F(b"k"),
        b"e": IMPLICIT,  # hidden, then made again (implicitly) for its new child, as umoci does
        b"e/new": F(b"n"),
        b"w": D(),
        b"w/lower": F(b"L2"),
        b"w/mine": F(b"m"),
    }


def test_whiteout_order_does_not_matter(tmp_path: Path) -> None:
    base = Tar().dir("d").file("d/a", b"a").file("d/b", b"b").bytes()
    before = Tar().whiteout("d").dir("d", mode=0o700).file("d/c", b"c").bytes()
    after = Tar().dir("d", mode=0o700).file("d/c", b"c").whiteout("d").bytes()
    expected = {b"": IMPLICIT, b"d": D(0o700), b"d/c": F(b"c")}
    assert flat(apply(tmp_path / "1", base, before)) == expected
    assert flat(apply(tmp_path / "2", base, after)) == expected


def test_opaque_directories(tmp_path: Path) -> None:
    base = (Tar().dir("d").file("d/a", b"a").dir("d/sub").file("d/sub/x", b"x").dir("o").file("o/f", b"f")
            .bytes())
    upper = (Tar().dir("d", mode=0o711).file("d/new", b"n").opaque("d")  # opaque after the new child
             .opaque("o").dir("o/sub").file("o/sub/y", b"y")  # opaque before
             .opaque("missing").bytes())
    assert flat(apply(tmp_path, base, upper)) == {
        b"": IMPLICIT,
        b"d": D(0o711),
        b"d/new": F(b"n"),
        b"o": D(),
        b"o/sub": D(),
        b"o/sub/y": F(b"y"),
    }


def test_opaque_root(tmp_path: Path) -> None:
    base = Tar().file("a", b"a").dir("b").bytes()
    upper = Tar().opaque(".").file("c", b"c").bytes()
    assert flat(apply(tmp_path, base, upper)) == {b"": IMPLICIT, b"c": F(b"c")}


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    layer = Tar().file("a", b"a").file(".wh..wh.plnk/1.2", b"").dir(".wh..wh.aufs").bytes()
    assert set(flat(apply(tmp_path, layer))) == {b"", b"a"}


def test_hardlinks_within_and_across_layers(tmp_path: Path) -> None:
    base = Tar().file("z/orig", b"data", mode=0o4755, uid=3, pax={"SCHILY.xattr.user.k": "v"}).bytes()
    upper = (Tar().hardlink("a/link", "z/orig", mode=0o600, uid=9)  # header metadata of a link is ignored
             .file("y/new", b"new").hardlink("y/new2", "y/new").bytes())
    t = apply(tmp_path, base, upper)
    meta = (0o4755, 3, 0, MTIME * 10**9, {b"user.k": b"v"})
    assert flat(t) == {
        b"": IMPLICIT, b"a": IMPLICIT,
        b"a/link": ("FILE", *meta, b"data"),  # the canonically first name is the primary
        b"y": IMPLICIT,
        b"y/new": F(b"new"),
        b"y/new2": ("HARDLINK", 0o644, 0, 0, MTIME * 10**9, {}, b"y/new"),
        b"z": IMPLICIT,
        b"z/orig": ("HARDLINK", *meta, b"a/link"),
    }


def test_hardlink_target_is_normalized_like_names(tmp_path: Path) -> None:
    layer = Tar().file("etc/passwd", b"root").hardlink("/abs", "/etc/passwd").hardlink("./rel", "./etc//passwd").bytes()
    f = flat(apply(tmp_path, layer))
    assert f[b"abs"][6] == b"root" and f[b"etc/passwd"][6] == b"abs" and f[b"rel"][6] == b"abs"


def test_hardlink_survives_whiteout_of_its_primary(tmp_path: Path) -> None:
    l1 = Tar().file("a", b"shared").hardlink("b", "a").hardlink("c", "a").bytes()
    l2 = Tar().whiteout("a").bytes()
    f = flat(apply(tmp_path, l1, l2))
    assert f == {b"": IMPLICIT, b"b": F(b"shared"), b"c": ("HARDLINK", *F(b"")[1:6], b"b")}


def test_rewriting_one_name_breaks_the_link(tmp_path: Path) -> None:
    l1 = Tar().file("a", b"old").hardlink("b", "a").bytes()
    l2 = Tar().file("a", b"new", mode=0o600).bytes()
    assert flat(apply(tmp_path, l1, l2)) == {b"": IMPLICIT, b"a": F(b"new", 0o600), b"b": F(b"old")}


def test_hardlink_to_symlink_device_fifo_becomes_a_copy(tmp_path: Path) -> None:
    layer = (Tar().symlink("s", "target").add("dev", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
             .add("p", tarfile.FIFOTYPE).hardlink("s2", "s").hardlink("dev2", "dev").hardlink("p2", "p").bytes())
    f = flat(apply(tmp_path, layer))
    assert f[b"s2"] == f[b"s"] and f[b"s"][0] == "SYMLINK"
    assert f[b"dev2"] == f[b"dev"] == ("CHAR", 0o666, 0, 0, MTIME * 10**9, {}, (1, 3))
    assert f[b"p2"] == f[b"p"] == ("FIFO", 0o644, 0, 0, MTIME * 10**9, {}, None)


def test_dir_file_dir_replacement(tmp_path: Path) -> None:
    l1 = Tar().dir("x").file("x/a", b"a").dir("x/sub").file("x/sub/b", b"b").bytes()
    l2 = Tar().file("x", b"now a file", mode=0o600).bytes()
    l3 = Tar().dir("x", mode=0o700).file("x/c", b"c").bytes()
    assert flat(apply(tmp_path / "2", l1, l2)) == {b"": IMPLICIT, b"x": F(b"now a file", 0o600)}
    assert flat(apply(tmp_path / "3", l1, l2, l3)) == {b"": IMPLICIT, b"x": D(0o700), b"x/c": F(b"c")}


def test_symlink_replaced_by_directory(tmp_path: Path) -> None:
    l1 = Tar().symlink("lib", "usr/lib").bytes()
    l2 = Tar().dir("lib").file("lib/x", b"x").bytes()
    assert flat(apply(tmp_path, l1, l2))[b"lib"] == D()


def test_duplicate_entries_later_wins(tmp_path: Path) -> None:
    layer = (Tar().file("f", b"first").file("f", b"second", mode=0o600)
             .dir("d", mode=0o700).file("d/child", b"c").dir("d", mode=0o755, uid=7)
             .file("g", b"file").dir("g").file("g/h", b"h").file("g", b"file again").bytes())
    assert flat(apply(tmp_path, layer)) == {
        b"": IMPLICIT,
        b"d": D(0o755, 7), b"d/child": F(b"c"),  # a directory re-declared keeps its children
        b"f": F(b"second", 0o600),
        b"g": F(b"file again"),
    }


def test_long_names_and_targets(tmp_path: Path) -> None:
    deep = "/".join(["d" * 200] * 3)
    long_target = "t" * 300
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        layer = Tar(fmt).file(deep + "/" + "f" * 250, b"x").symlink("s", long_target).bytes()
        f = flat(apply(tmp_path / str(fmt), layer))
        assert f[(deep + "/" + "f" * 250).encode()] == F(b"x")
        assert f[b"s"][6] == long_target.encode()


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        layer = (Tar(fmt).file(b"caf\xe9", b"latin1").file(b"\xff" * 120, b"long").file("café", b"utf8")
                 .symlink(b"ln", b"\xfe\xff").bytes())
        f = flat(apply(tmp_path / str(fmt), layer))
        assert f[b"caf\xe9"][6] == b"latin1"
        assert f[b"\xff" * 120][6] == b"long"
        assert f["café".encode()][6] == b"utf8"
        assert f[b"ln"][6] == b"\xfe\xff"


def test_xattrs(tmp_path: Path) -> None:
    import base64

    capv = CAP.decode("utf-8", "surrogateescape")
    l1 = (Tar().file("bin/ping", b"elf", mode=0o755, pax={"SCHILY.xattr.security.capability": capv,
                                                         "SCHILY.xattr.user.bin": "\udcff\x00\x01",
                                                         "SCHILY.xattr.security.selinux": "system_u:x",
                                                         "SCHILY.xattr.trusted.overlay.opaque": "y"})
          .file("la", b"", pax={"LIBARCHIVE.xattr.user.%61b": base64.b64encode(b"\x00\xff").decode().rstrip("=")})
          .dir("d", pax={"SCHILY.xattr.user.d": "1"}).bytes())
    l2 = Tar().dir("d", pax={"SCHILY.xattr.user.e": "2"}).bytes()
    f = flat(apply(tmp_path, l1, l2))
    assert f[b"bin/ping"][5] == {b"security.capability": CAP, b"user.bin": b"\xff\x00\x01"}
    assert f[b"la"][5] == {b"user.ab": b"\x00\xff"}
    assert f[b"d"][5] == {b"user.e": b"2"}  # re-declaring a directory replaces its xattrs


def test_devices_and_fifos(tmp_path: Path) -> None:
    layer = (Tar().add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
             .add("dev/sda1", tarfile.BLKTYPE, devmajor=8, devminor=1, mode=0o660, gid=6)
             .add("dev/wide", tarfile.CHRTYPE, devmajor=259, devminor=65536)
             .add("run/fifo", tarfile.FIFOTYPE, mode=0o600).bytes())
    f = flat(apply(tmp_path, layer))
    assert f[b"dev/null"] == ("CHAR", 0o666, 0, 0, MTIME * 10**9, {}, (1, 3))
    assert f[b"dev/sda1"] == ("BLOCK", 0o660, 0, 6, MTIME * 10**9, {}, (8, 1))
    assert f[b"dev/wide"][6] == (259, 65536)
    assert f[b"run/fifo"] == ("FIFO", 0o600, 0, 0, MTIME * 10**9, {}, None)


def test_times_and_ids(tmp_path: Path) -> None:
    layer = (Tar().file("frac", b"", pax={"mtime": "1600000000.123456789"})
             .file("neg", b"", pax={"mtime": "-123.456789012"})
             .file("coarse", b"", pax={"mtime": "5.5"})
             .file("big", b"", uid=4294967294, gid=70000000).bytes())
    f = flat(apply(tmp_path, layer))
    assert f[b"frac"][4] == 1600000000_123456789
    assert f[b"neg"][4] == -123_456_789_012
    assert f[b"coarse"][4] == 5_500_000_000
    assert f[b"big"][2:4] == (4294967294, 70000000)


@pytest.mark.parametrize("args", [["--format=gnu"], ["--format=posix"], ["--format=posix", "--sparse-version=0.1"],
                                  ["--format=posix", "--sparse-version=0.0"]],
                         ids=["gnu-old", "pax-1.0", "pax-0.1", "pax-0.0"])
def test_sparse_files(tmp_path: Path, args: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(3 * 1024 * 1024)
    data[100:105] = b"hello"
    data[2_000_000:2_000_005] = b"world"
    with open(src / "sparse", "wb") as fh:
        fh.truncate(len(data))
        for off in (100, 2_000_000):
            fh.seek(off)
            fh.write(bytes(data[off : off + 5]))
    (src / "after").write_bytes(b"after")
    out = tmp_path / "l.tar"
    subprocess.run(["tar", "--sparse", *args, "-C", str(src), "-cf", str(out), "sparse", "after"], check=True)
    f = flat(apply(tmp_path, out.read_bytes()))
    assert f[b"sparse"][6] == bytes(data)
    assert f[b"after"][6] == b"after"


def test_compressions_and_multiple_members(tmp_path: Path) -> None:
    tar = Tar().file("a", b"x" * 100_000).file("b", os.urandom(50_000)).bytes()
    half = len(tar) // 2
    multi_gz = gz(tar[:half]) + gz(tar[half:])
    cz = zstandard.ZstdCompressor(level=3)
    multi_zst = cz.compress(tar[:half]) + cz.compress(tar[half:])
    skippable = (0x184D2A5E).to_bytes(4, "little") + (8).to_bytes(4, "little") + b"metadata"  # as zstd:chunked
    expected = flat(apply(tmp_path / "plain", tar))
    for name, blob in (("gz", gz(tar)), ("zst", zst(tar)), ("mgz", multi_gz), ("mzst", multi_zst),
                       ("skip-after", zst(tar) + skippable), ("skip-before", skippable + zst(tar))):
        assert flat(apply(tmp_path / name, blob, diff_ids=[sha(tar)])) == expected, name


def test_layer_results(tmp_path: Path) -> None:
    tar = Tar().file("a", b"a").bytes()  # Python pads the archive to 10 KiB: all of it counts
    blob = zst(tar)
    (tmp_path / "s").mkdir()
    ap = LayerApplier(tmp_path / "s")
    r = ap.apply(io.BytesIO(blob), digest=sha(blob), size=len(blob), diff_id=sha(tar))
    assert (r.diff_id, r.compression, r.compressed_bytes, r.uncompressed_bytes, r.entries) == \
        (sha(tar), "zstd", len(blob), len(tar), 1)
    ap.close()


def test_empty_layers(tmp_path: Path) -> None:
    base = Tar().file("a", b"a").bytes()
    for empty in (b"", bytes(1024), gz(bytes(1024)), Tar().bytes()):
        assert set(flat(apply(tmp_path / str(len(empty)), base, empty))) == {b"", b"a"}


def test_unsupported_types_are_skipped(tmp_path: Path) -> None:
    t = apply(tmp_path, Tar(tarfile.GNU_FORMAT).add("vol", b"V").file("a", b"a").bytes())
    assert set(flat(t)) == {b"", b"a"}
    assert t.skipped == [b"vol"]


def test_source_date_epoch_clamps(tmp_path: Path) -> None:
    ap = LayerApplier(tmp_path)
    blob = Tar().file("new", b"", mtime=2_000_000_000).file("old", b"", mtime=1000).bytes()
    ap.apply(io.BytesIO(blob), digest=sha(blob), size=len(blob))
    f = {e.path: e.mtime_ns for e in ap.finish(source_date_epoch=1_500_000_000).entries}
    assert f == {b"": 0, b"new": 1_500_000_000 * 10**9, b"old": 1000 * 10**9}
    ap.close()


def test_contents_are_spilled_not_kept(tmp_path: Path) -> None:
    big = os.urandom(3 << 20)
    t = apply(tmp_path, gz(Tar().file("big", big).bytes()))
    assert t.spill.size == len(big)
    e = next(e for e in t.entries if e.kind == Kind.FILE)
    assert t.read(e) == big
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file is unlinked from the start


def _apply_one(tmp_path: Path, blob: bytes, threaded: bool, size: int | None = None,
               diff_id: str | None = None) -> object:
    """The flattened tree, or the (type, message) of the error."""
    tmp = tmp_path / f"spill-{threaded}"
    tmp.mkdir(exist_ok=True)
    ap = LayerApplier(tmp, threaded=threaded)
    try:
        ap.apply(io.BytesIO(blob), digest=sha(blob), size=len(blob) if size is None else size, diff_id=diff_id,
                 what="layer 1")
        return flat(ap.finish())
    except Exception as exc:
        return type(exc).__name__, str(exc)
    finally:
        ap.close()


def test_threaded_stream_is_the_serial_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decompressing and hashing threads (convert.md §5) change nothing: same tree, same errors at the
    same place, and no thread is left behind."""
    import threading

    from shoal.convert import stream

    monkeypatch.setattr(stream, "QUEUE_BYTES", 64 * 1024)  # the queues fill up and the threads wait
    big = os.urandom(1 << 20) + bytes(3 << 20)
    tar = Tar().file("a", big).file("b", b"x" * 70_000).dir("d").file("d/e", b"e").bytes()
    good = gz(tar)
    cases: list[tuple[bytes, dict[str, object]]] = [
        (good, {}), (zst(tar), {}), (tar, {}),
        (good[: len(good) // 2], {}),  # truncated
        (good[:5000] + bytes(100) + good[5100:], {}),  # corrupt
        (good + b"junk", {}),  # trailing garbage
        (good, {"diff_id": sha(b"other")}),
        (good, {"size": len(good) - 10}),  # longer than its descriptor
        (gz(tar[:-1024]), {}),  # no end-of-archive blocks
    ]
    before = threading.active_count()
    for blob, kw in cases:
        serial = _apply_one(tmp_path, blob, False, **kw)  # type: ignore[arg-type]
        threaded = _apply_one(tmp_path, blob, True, **kw)  # type: ignore[arg-type]
        assert threaded == serial
    assert isinstance(_apply_one(tmp_path, good, True), dict)
    assert threading.active_count() == before
