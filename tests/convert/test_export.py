"""export(): one canonical layer, deterministic bytes, valid OCI, readable by skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard
from convtools import Tar, have, sha, source, write_index, write_layout

from helpers import validate_oci
from shoal import mediatypes as mt
from shoal.build import BuildOptions, build
from shoal.convert import convert, export_to_layout
from shoal.convert.tarwriter import GZIP_BLOCK, GzipWriter, entry_header, pax_record
from shoal.format.model import Entry, Kind
from shoal.store import Store

# (size, sha256) of the gzip of _mixed(3 * GZIP_BLOCK + 12345): zlib-ng 2.3.3, level 6 (convert.md §7.3)
GOLDEN_GZIP = (2741337, "3186d5a0dadf37d8087945e838840f4b20d466abd807d6f9476d2252c015bc94")
CAP = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)

LAYER = (Tar().dir("./", mode=0o755, mtime=1).dir("etc", uid=1, gid=2).file("etc/hostname", b"box\n", mode=0o600)
         .file("bin/ping", b"\x7fELF" * 1000, mode=0o4755, pax={"SCHILY.xattr.security.capability":
                                                                CAP.decode("utf-8", "surrogateescape"),
                                                                "mtime": "1600000000.5"})
         .hardlink("bin/z-ping", "bin/ping").symlink("bin/sh", "busybox")
         .add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
         .add("dev/fifo", tarfile.FIFOTYPE)
         .file("d/" + "n" * 150, b"long", uid=3_000_000)
         .file(b"caf\xe9", b"latin1").bytes())
CONFIG = {"config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"x": "y"}},
          "history": [{"created_by": "one"}, {"created_by": "two"}], "created": "2024-01-01T00:00:00Z"}


@pytest.fixture
def converted(tmp_path: Path, store: Store) -> Store:
    b = write_layout(tmp_path / "src", "v1", [LAYER, Tar().whiteout("etc/hostname").bytes()], config=CONFIG)
    with source(b.ref) as src:
        convert(src, store, "img:1")
    return store


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest[7:]).read_bytes()


def _layer_tar(layout: Path, manifest: bytes) -> bytes:
    layer = json.loads(manifest)["layers"][0]
    blob = _blob(layout, layer["digest"])
    if layer["mediaType"] == mt.OCI_LAYER_GZIP:
        return gzip.decompress(blob)
    if layer["mediaType"] == mt.OCI_LAYER_ZSTD:
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_export_is_deterministic_and_valid(tmp_path: Path, converted: Store, compression: str) -> None:
    r1 = export_to_layout(converted, "img:1", tmp_path / "o1", "t", compression)
    r2 = export_to_layout(converted, "img:1", tmp_path / "o2", "t", compression)
    assert r1.digest == r2.digest and r1.raw == r2.raw
    for p in (tmp_path / "o1" / "blobs" / "sha256").iterdir():
        assert p.read_bytes() == (tmp_path / "o2" / "blobs" / "sha256" / p.name).read_bytes()
    out = tmp_path / "o1"
    validate_oci(r1.raw, "image-manifest-schema")
    man = json.loads(r1.raw)
    cfg_raw = _blob(out, man["config"]["digest"])
    validate_oci(cfg_raw, "config-schema")
    validate_oci((out / "index.json").read_bytes(), "image-index-schema")
    validate_oci((out / "oci-layout").read_bytes(), "image-layout-schema")
    tar = _layer_tar(out, r1.raw)
    cfg = json.loads(cfg_raw)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [sha(tar)]}
    assert r1.images[0].diff_id == sha(tar) and r1.images[0].tar_bytes == len(tar)
    assert man["layers"][0]["mediaType"] == {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD,
                                             "none": mt.OCI_LAYER_TAR}[compression]
    assert man["annotations"] == {mt.ANN_ROOT: converted.resolve("img:1").root}


def test_config_carried_back(tmp_path: Path, converted: Store) -> None:
    r = export_to_layout(converted, "img:1", tmp_path / "o", "t")
    cfg = json.loads(_blob(tmp_path / "o", json.loads(r.raw)["config"]["digest"]))
    assert cfg["config"] == CONFIG["config"]
    assert (cfg["architecture"], cfg["os"], cfg["created"]) == ("amd64", "linux", "2024-01-01T00:00:00Z")
    assert cfg["history"] == [{"created_by": "one", "empty_layer": True}, {"created_by": "two", "empty_layer": True},
                              {"created_by": "shoal export",
                               "comment": f"flattened from Shoal root {converted.resolve('img:1').root}"}]


def test_no_timestamps_unless_the_shoal_config_has_them(tmp_path: Path, store: Store) -> None:
    d = tmp_path / "tree"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    build(store, d, "plain:1")
    r = export_to_layout(store, "plain:1", tmp_path / "o", "t")
    cfg = json.loads(_blob(tmp_path / "o", json.loads(r.raw)["config"]["digest"]))
    assert set(cfg) == {"architecture", "os", "config", "rootfs"}


def test_tar_normalization(tmp_path: Path, converted: Store) -> None:
    r = export_to_layout(converted, "img:1", tmp_path / "o", "t", "none")
    tar = _layer_tar(tmp_path / "o", r.raw)
    assert tar.endswith(bytes(1024)) and len(tar) % 512 == 0
    members = list(tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape"))
    names = [m.name for m in members]
    assert names == [".", "bin", "bin/ping", "bin/sh", "bin/z-ping", "caf\udce9", "d", "d/" + "n" * 150, "dev",
                     "dev/fifo", "dev/null", "etc"]
    by = {m.name: m for m in members}
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert by["bin/z-ping"].type == tarfile.LNKTYPE and by["bin/z-ping"].linkname == "bin/ping"
    assert by["bin/ping"].pax_headers == {"mtime": "1600000000.5",
                                          "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}
    assert by["bin/ping"].mode == 0o4755
    assert by["dev/null"].type == tarfile.CHRTYPE and (by["dev/null"].devmajor, by["dev/null"].devminor) == (1, 3)
    assert by["d/" + "n" * 150].pax_headers == {"path": "d/" + "n" * 150, "uid": "3000000"}
    assert by["etc"].mtime == 1600000000 and (by["etc"].uid, by["etc"].gid) == (1, 2)
    assert by["."].mtime == 1
    assert tar[:2] == b"./"  # the root entry comes first
    # the gzip variant: fixed header (no name, mtime 0, OS 255)
    rg = export_to_layout(converted, "img:1", tmp_path / "g", "t", "gzip")
    blob = _blob(tmp_path / "g", json.loads(rg.raw)["layers"][0]["digest"])
    assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    assert gzip.decompress(blob) == tar


def test_entry_header_bytes() -> None:
    e = Entry(b"a", Kind.FILE, 0o644, 0, 0, 10**9, size=5)
    h = entry_header(e)
    assert len(h) == 512
    assert h[:1] == b"a" and h[100:108] == b"0000644\0" and h[124:136] == b"00000000005\0"
    assert h[136:148] == b"00000000001\0" and h[156:157] == b"0" and h[257:265] == b"ustar\x0000"
    assert h[265:329] == bytes(64)  # no user or group names
    assert int(h[148:154], 8) == sum(h[:148]) + 8 * 32 + sum(h[156:])
    neg = entry_header(Entry(b"old", Kind.DIR, 0o755, 0, 0, -1_500_000_000))
    assert neg[:512].startswith(b"././@PaxHeader") and pax_record(b"mtime", b"-1.5") in neg[512:1024]
    assert neg[1024 + 136 : 1024 + 148] == b"00000000000\0"
    assert pax_record(b"path", b"x" * 91) == b"101 path=" + b"x" * 91 + b"\n"  # the length gains a digit


def test_round_trip_keeps_the_tree(tmp_path: Path, converted: Store) -> None:
    root = converted.resolve("img:1").root
    for comp in ("gzip", "zstd"):
        export_to_layout(converted, "img:1", tmp_path / comp, "t", comp)
        other = Store.open(tmp_path / f"store-{comp}")
        with source(f"oci:{tmp_path / comp}:t") as src:
            r = convert(src, other, "back:1")
        assert other.manifest(r.digest).root == root


def test_same_tree_exports_identically_from_two_stores(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"hello" * 1000)
    raws = []
    for i in range(2):
        st = Store.open(tmp_path / f"s{i}")
        build(st, tree, "t:1", BuildOptions(workers=1 + i))
        raws.append(export_to_layout(st, "t:1", tmp_path / f"o{i}", "t").raw)
    assert raws[0] == raws[1]


def test_export_index(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "src"
    a = write_layout(root, None, [LAYER])
    b = write_layout(root, None, [LAYER, Tar().file("arm", b"1").bytes()], arch="arm64")
    ref = write_index(root, "multi", [(a, {"os": "linux", "architecture": "amd64"}),
                                      (b, {"os": "linux", "architecture": "arm64"})])
    with source(ref) as src:
        convert(src, store, "multi:1")
    r = export_to_layout(store, "multi:1", tmp_path / "o", "t")
    assert r.media_type == mt.OCI_INDEX and len(r.images) == 2
    validate_oci(r.raw, "image-index-schema")
    assert [m["platform"] for m in json.loads(r.raw)["manifests"]] == [
        {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}]
    one = export_to_layout(store, "multi:1", tmp_path / "o1", "t", platform="linux/arm64")
    assert one.media_type == mt.OCI_MANIFEST and one.digest == r.images[1].manifest_digest
    if have("skopeo"):
        out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'o'}:t"], capture_output=True,
                             check=True).stdout
        assert hashlib.sha256(out).hexdigest() == r.digest[7:]


@pytest.mark.skipif(not have("skopeo"), reason="skopeo is not installed")
def test_skopeo_accepts_the_export(tmp_path: Path, converted: Store) -> None:
    for comp in ("gzip", "zstd"):
        r = export_to_layout(converted, "img:1", tmp_path / comp, "t", comp)
        p = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / comp}:t"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["Digest"] == r.digest and doc["Layers"] == [r.images[0].layer.digest]
        assert doc["Env"] == ["A=1"] and doc["Created"].startswith("2024-01-01")
        # and skopeo can copy it (reading and verifying every blob)
        c = subprocess.run(["skopeo", "copy", f"oci:{tmp_path / comp}:t", f"oci:{tmp_path / (comp + '-copy')}:t"],
                           capture_output=True, text=True)
        assert c.returncode == 0, c.stderr
    shutil.rmtree(tmp_path / "gzip-copy")


def test_generated_tree_survives_export_and_convert(tmp_path: Path, generated_image: tuple[Path, str, object]) -> None:
    """Every kind of entry and metadata of the generated tree (odd names, devices, big ids, negative and
    sub-second mtimes, xattrs on symlinks, empty xattr values) goes out as a tar and comes back with
    the same Merkle root."""
    store_dir, ref, _ = generated_image
    st = Store.open(store_dir)
    root = st.resolve(ref).root
    export_to_layout(st, ref, tmp_path / "out", "gen", "zstd")
    back = Store.open(tmp_path / "back")
    with source(f"oci:{tmp_path / 'out'}:gen") as src:
        r = convert(src, back, "gen:1")
    assert back.manifest(r.digest).root == root


def _mixed(n: int) -> bytes:
    """``n`` bytes that compress like a filesystem: text, repeats and incompressible runs."""
    rnd = random.Random(13)
    parts: list[bytes] = []
    size = 0
    i = 0
    while size < n:
        i += 1
        part = (b"line %d of %d: %x\n" % (i, i * i % 9973, i * 2654435761 % 2**32) if i % 40
                else rnd.randbytes(rnd.randrange(1, 5000)))
        parts.append(part)
        size += len(part)
    return b"".join(parts)[:n]


@pytest.mark.parametrize("n", [0, 100, GZIP_BLOCK, 3 * GZIP_BLOCK + 12345])
def test_gzip_bytes_do_not_depend_on_workers(n: int) -> None:
    """convert.md §7.3: one member of blocks deflated apart; the bytes are the same for any number of
    workers and any way the input is cut into writes."""
    data = _mixed(n)
    blobs = []
    for workers, step in ((1, 1 << 20), (2, 65_537), (3, 511), (8, 3 << 20)):
        out: list[bytes | memoryview] = []
        w = GzipWriter(out.append, workers=workers)
        for i in range(0, len(data), step):
            w.write(memoryview(data)[i : i + step])
        w.close()
        blobs.append(b"".join(out))
    assert all(b == blobs[0] for b in blobs)
    d = zlib.decompressobj(31)
    assert d.decompress(blobs[0]) == data and d.eof and d.unused_data == b""  # one member, nothing after it
    assert blobs[0][:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    if n == 3 * GZIP_BLOCK + 12345:  # pinned: a change here is a change of the exported bytes (convert.md §9)
        assert (len(blobs[0]), hashlib.sha256(blobs[0]).hexdigest()) == GOLDEN_GZIP


def test_export_gzip_is_the_same_for_any_workers(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(_mixed(2 * GZIP_BLOCK + 999))
    (tree / "small").write_bytes(b"x" * 10)
    st = Store.open(tmp_path / "s")
    build(st, tree, "t:1")
    rs = [export_to_layout(st, "t:1", tmp_path / f"o{w}", "t", workers=w) for w in (1, 2, 5)]
    assert len({r.raw for r in rs}) == 1
    layer = rs[0].images[0].layer
    blob = _blob(tmp_path / "o1", layer.digest)
    assert hashlib.sha256(gzip.decompress(blob)).hexdigest() == rs[0].images[0].diff_id[7:]
    if have("gzip"):
        subprocess.run(["gzip", "-t"], input=blob, check=True)
