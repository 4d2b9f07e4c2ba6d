"""Hostile layers and images: each ends in one clear shoal.errors exception, no tag, nothing left behind."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import pytest
import zstandard
from convtools import Tar, apply, files_under, gz, sha, source, write_index, write_layout, zst

from shoal.convert import ConvertLimits, convert
from shoal.convert.layers import LayerApplier
from shoal.errors import FormatError, HostileInput, IntegrityError, ShoalError, UsageError
from shoal.store import Store

BASE = Tar().dir("etc").file("etc/passwd", b"root\n").dir("d").bytes()


def _zero_file_tar_header(size: int) -> bytes:
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    return ti.tobuf(tarfile.PAX_FORMAT)


def gzip_bomb(size: int) -> bytes:
    """A gzip layer holding one file of ``size`` zero bytes (~1000:1)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(_zero_file_tar_header(size))]
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        out.append(z.compress(chunk))
    out.append(z.compress(bytes(1024)))
    out.append(z.flush())
    return b"".join(out)


def zstd_bomb(size: int) -> bytes:
    z = zstandard.ZstdCompressor(level=19).compressobj()
    out = [z.compress(_zero_file_tar_header(size))]
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        out.append(z.compress(chunk))
    out.append(z.compress(bytes(1024)))
    out.append(z.flush())
    return b"".join(out)


# (name, layers on top of BASE, exception, words in the message)
LAYER_CASES: list[tuple[str, Callable[[], list[bytes]], type[ShoalError], str]] = [
    ("dotdot", lambda: [Tar().file("a/../../etc/shadow", b"x").bytes()], HostileInput, "'..'"),
    ("dotdot-link", lambda: [Tar().hardlink("x", "../../etc/passwd").bytes()], HostileInput, "'..'"),
    ("link-missing", lambda: [Tar().hardlink("x", "etc/shadow").bytes()], HostileInput, "does not exist"),
    ("link-to-dir", lambda: [Tar().hardlink("x", "etc").bytes()], HostileInput, "directory"),
    ("link-to-self", lambda: [Tar().hardlink("etc/passwd", "etc/passwd").bytes()], HostileInput, "does not exist"),
    ("write-through-symlink", lambda: [Tar().symlink("evil", "/etc").file("evil/passwd", b"x").bytes()],
     HostileInput, "symlink"),
    ("symlink-chain", lambda: [Tar().symlink("a", "b").symlink("b", "c").symlink("c", "/").file("a/x", b"").bytes()],
     HostileInput, "symlink"),
    ("symlink-lower-layer", lambda: [Tar().symlink("lnk", "d").bytes(), Tar().file("lnk/f", b"").bytes()],
     HostileInput, "symlink"),
    ("whiteout-through-symlink", lambda: [Tar().symlink("lnk", "etc").bytes(), Tar().whiteout("lnk/passwd").bytes()],
     HostileInput, "symlink"),
    ("link-through-symlink", lambda: [Tar().symlink("lnk", "etc").hardlink("x", "lnk/passwd").bytes()],
     HostileInput, "symlink"),
    ("whiteout-dotdot", lambda: [Tar().file("d/.wh..", b"").bytes()], HostileInput, ".."),
    ("root-to-symlink", lambda: [Tar().symlink("./", "/etc").bytes()], HostileInput, "root"),
    ("root-to-file", lambda: [Tar().file("/", b"x").bytes()], HostileInput, "root"),
    ("file-parent", lambda: [Tar().file("etc/passwd/x", b"").bytes()], FormatError, "not a directory"),
    ("empty-symlink", lambda: [Tar().symlink("s", "").bytes()], FormatError, "target"),
    ("huge-pax", lambda: [Tar().file("a", b"", pax={"comment": "x" * (2 << 20)}).bytes()], HostileInput, "header"),
    ("huge-longname", lambda: [Tar(tarfile.GNU_FORMAT).file("n" * (2 << 20), b"").bytes()], HostileInput, "header"),
    ("xattr-flood", lambda: [Tar().file("a", b"", pax={f"SCHILY.xattr.user.{i}": "v" * 1000 for i in range(70)})
                             .bytes()], HostileInput, "xattrs"),
    ("not-a-tar", lambda: [b"\x00garbage" * 100 + b"\xff" * 512], FormatError, "tar"),
    ("gzip-garbage", lambda: [gz(Tar().bytes()) + b"trailing junk"], FormatError, "trailing garbage"),
    ("gzip-corrupt", lambda: [gz(BASE)[:20] + b"\xff" * 64 + gz(BASE)[84:]], FormatError, "gzip"),
    ("gzip-truncated", lambda: [gz(Tar().file("big", bytes(range(256)) * 4000).bytes())[:-100]], FormatError,
     "truncated"),
    ("zstd-truncated", lambda: [zst(Tar().file("big", bytes(range(256)) * 4000).bytes())[:-100]], FormatError,
     "truncated"),
    ("tar-truncated", lambda: [Tar().file("big", b"x" * 100_000).bytes()[:50_000]], FormatError, "end of data"),
]


@pytest.mark.parametrize("name,layers,exc,words", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_hostile_layer(tmp_path: Path, name: str, layers: Callable[[], list[bytes]], exc: type[ShoalError],
                       words: str) -> None:
    with pytest.raises(exc) as info:
        apply(tmp_path, BASE, *layers())
    msg = str(info.value)
    assert words.lower() in msg.lower(), msg
    assert "\n" not in msg and len(msg) < 600


def test_gzip_bomb_total_limit(tmp_path: Path) -> None:
    bomb = gzip_bomb(64 << 20)
    assert len(bomb) < 100_000
    with pytest.raises(HostileInput, match="limit"):
        apply(tmp_path, bomb, limits=ConvertLimits(max_total_bytes=16 << 20))


def test_limit_counts_all_layers(tmp_path: Path) -> None:
    layer = gz(Tar().file("f", bytes(6 << 20)).bytes())
    apply(tmp_path / "ok", layer, limits=ConvertLimits(max_total_bytes=8 << 20))
    with pytest.raises(HostileInput, match="limit"):
        apply(tmp_path / "no", layer, layer, limits=ConvertLimits(max_total_bytes=8 << 20))


def test_zstd_bomb_ratio(tmp_path: Path) -> None:
    bomb = zstd_bomb(256 << 20)
    assert len(bomb) < 20_000
    with pytest.raises(HostileInput, match="bomb"):
        apply(tmp_path, bomb, limits=ConvertLimits(ratio_floor=8 << 20, max_layer_ratio=1000))


def test_too_many_entries(tmp_path: Path) -> None:
    t = Tar()
    for i in range(20):
        t.file(f"f{i}", b"")
    with pytest.raises(HostileInput, match="entries"):
        apply(tmp_path, t.bytes(), limits=ConvertLimits(max_entries=10))


def test_sparse_map_limit(tmp_path: Path) -> None:
    # a GNU sparse 1.0 header announcing more map entries than allowed
    data = b"99999999\n" + b"0\n" * 100
    data += bytes(-len(data) % 512)
    layer = Tar().file("s", data, pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
                                       "GNU.sparse.realsize": "10"}).bytes()
    with pytest.raises(HostileInput, match="sparse"):
        apply(tmp_path, layer, limits=ConvertLimits(max_sparse_blocks=1000))


def test_blob_digest_mismatch(tmp_path: Path) -> None:
    blob = gz(BASE)
    (tmp_path / "s").mkdir()
    ap = LayerApplier(tmp_path / "s")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        ap.apply(io.BytesIO(blob), digest=sha(blob + b"x"), size=len(blob))
    ap.close()


def test_blob_longer_or_shorter_than_descriptor(tmp_path: Path) -> None:
    blob = gz(BASE)
    (tmp_path / "s").mkdir()
    for size, words in ((len(blob) - 5, "longer"), (len(blob) + 5, "truncated")):
        ap = LayerApplier(tmp_path / "s")
        with pytest.raises(IntegrityError, match=words):
            ap.apply(io.BytesIO(blob), digest=sha(blob), size=size)
        ap.close()


def test_corruption_reported_as_integrity_error(tmp_path: Path) -> None:
    """A blob cut short makes the tar reader fail first; the error names the real cause."""
    blob = gz(Tar().file("big", bytes(range(256)) * 4000).bytes())
    (tmp_path / "s").mkdir()
    ap = LayerApplier(tmp_path / "s")
    with pytest.raises(IntegrityError, match="truncated"):
        ap.apply(io.BytesIO(blob[: len(blob) // 2]), digest=sha(blob), size=len(blob))
    ap.close()


def test_diff_id_mismatch(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="diff_id"):
        apply(tmp_path, gz(BASE), diff_ids=[sha(BASE + b"x")])


def test_unsupported_layer_media_type(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    ap = LayerApplier(tmp_path / "s")
    with pytest.raises(FormatError, match="media type"):
        ap.apply(io.BytesIO(BASE), digest=sha(BASE), size=len(BASE),
                 media_type="application/vnd.oci.image.layer.v1.tar+bzip2")
    ap.close()


# ------------------------------------------------------------------------------ through convert()


def _tamper_layer(root: Path) -> str:
    b = write_layout(root, "t", [BASE, Tar().file("x", b"x" * 5000).bytes()])
    blob = b.layers[1]
    (root / "blobs" / "sha256" / sha(blob)[7:]).write_bytes(blob[:30] + bytes([blob[30] ^ 1]) + blob[31:])
    return b.ref


def _bad_diff_id(root: Path) -> str:
    return write_layout(root, "t", [BASE, Tar().file("x", b"").bytes()], diff_ids=[sha(BASE), sha(b"")]).ref


def _truncated(root: Path) -> str:
    cut = gz(Tar().file("big", bytes(range(256)) * 4000).bytes())[:-50]
    return write_layout(root, "t", [BASE, b""], blobs=[gz(BASE), cut]).ref


def _config_tampered(root: Path) -> str:
    b = write_layout(root, "t", [BASE])
    cfg = json.loads(b.manifest)["config"]["digest"]
    (root / "blobs" / "sha256" / cfg[7:]).write_bytes(b.config.replace(b"amd64", b"arm64"))
    return b.ref


def _child_tampered(root: Path) -> str:
    b1 = write_layout(root, None, [BASE])
    b2 = write_layout(root, None, [BASE], arch="arm64")
    ref = write_index(root, "t", [(b1, {"os": "linux", "architecture": "amd64"}),
                                  (b2, {"os": "linux", "architecture": "arm64"})])
    (root / "blobs" / "sha256" / b2.digest[7:]).write_bytes(b2.manifest + b" ")
    return ref


def _diff_id_count(root: Path) -> str:
    return write_layout(root, "t", [BASE], diff_ids=[sha(BASE), sha(BASE)]).ref


def _bomb(root: Path) -> str:
    tar_sha = "sha256:" + "0" * 64  # never reached: the limit trips first
    return write_layout(root, "t", [b""], blobs=[gzip_bomb(40 << 20)], diff_ids=[tar_sha]).ref


def _hostile_path(root: Path) -> str:
    return write_layout(root, "t", [BASE, Tar().symlink("x", "/").file("x/etc/evil", b"").bytes()]).ref


def _not_an_image(root: Path) -> str:
    b = write_layout(root, "t", [BASE])
    doc = json.loads(b.manifest)
    doc["config"]["mediaType"] = "application/vnd.example.thing+json"
    raw = json.dumps(doc).encode()
    (root / "blobs" / "sha256" / sha(raw)[7:]).write_bytes(raw)
    idx = json.loads((root / "index.json").read_text())
    idx["manifests"][0].update(digest=sha(raw), size=len(raw))
    (root / "index.json").write_text(json.dumps(idx))
    return b.ref


CONVERT_CASES: list[tuple[str, Callable[[Path], str], type[ShoalError], str]] = [
    ("layer-digest", _tamper_layer, IntegrityError, "digest mismatch"),
    ("diff-id", _bad_diff_id, IntegrityError, "diff_id"),
    ("truncated", _truncated, FormatError, "truncated"),
    ("config-digest", _config_tampered, IntegrityError, "config"),
    ("child-manifest", _child_tampered, IntegrityError, "manifest"),
    ("diff-id-count", _diff_id_count, FormatError, "diff_ids"),
    ("bomb", _bomb, HostileInput, "limit"),
    ("symlink-escape", _hostile_path, HostileInput, "symlink"),
    ("artifact", _not_an_image, FormatError, "config media type"),
]


@pytest.mark.parametrize("name,make,exc,words", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_hostile_image_leaves_store_untouched(tmp_path: Path, store: Store, name: str, make: Callable[[Path], str],
                                              exc: type[ShoalError], words: str) -> None:
    ref = make(tmp_path / "layout")
    before = files_under(tmp_path)
    refs_before = store.layout.refs()
    with source(ref) as src, pytest.raises(exc) as info:
        convert(src, store, "victim:1", limits=ConvertLimits(max_total_bytes=16 << 20))
    assert words.lower() in str(info.value).lower(), str(info.value)
    assert store.layout.refs() == refs_before == {}
    assert not any(store.layout.tmp.iterdir())
    new = [p for p in files_under(tmp_path) if p not in before and not p.startswith("store/")]
    assert new == []


def test_shoal_image_is_not_converted(tmp_path: Path, store: Store) -> None:
    from shoal.build import build
    from shoal.convert import export_to_layout  # noqa: F401  (a Shoal image in an OCI layout, via copy)
    from shoal.transports.base import parse_reference

    d = tmp_path / "tree"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    build(store, d, "s:1")
    dst = parse_reference(f"oci:{tmp_path / 'lay'}:s")
    m = store.resolve("s:1")
    with dst.new_destination() as w:
        from shoal.transports.base import BlobInfo
        for desc in (m.config, m.index, *m.packs):
            w.put_blob(open(store.layout.path(desc.digest), "rb"), BlobInfo(desc.digest, desc.size, desc.media_type))
        w.put_manifest(m.raw, "application/vnd.oci.image.manifest.v1+json")
        w.commit()
    with source(f"oci:{tmp_path / 'lay'}:s") as src, pytest.raises(UsageError, match="already a Shoal image"):
        convert(src, Store.open(tmp_path / "other"), "x:1")
