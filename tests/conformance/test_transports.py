"""One conformance suite for all six transports: ``oci:``, ``oci-archive:``, ``dir:``, ``docker-archive:``,
``docker://`` (a real registry: tests/regfix.py) and the store (``NAME:TAG``).

Every test that takes ``kind`` runs against each transport (``KINDS``); ``FILE_KINDS`` are the four
file transports, for the tests about files on disk.  Fixtures are made here, in memory: two tiny layers
built with ``tarfile`` (one plain, one gzip with mtime 0), an OCI config whose ``rootfs.diff_ids``
match them, and an OCI manifest.  ``docker-archive:`` cannot keep a manifest byte for byte (it stores
uncompressed layers and synthesises a Docker schema2 manifest), so for it the suite checks the config
bytes and the layers' uncompressed content instead.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from regfix import registry  # noqa: F401  (the session registry the docker:// kind uses)
from shoal import mediatypes as mt
from shoal.errors import FormatError, HostileInput, IntegrityError, NotFound, ShoalError, UsageError
from shoal.transports.base import BlobInfo, ImageReference, ImageSource, SystemContext, parse_reference


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Image:
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes]  # digest -> bytes (config and layers)
    config: bytes
    uncompressed: list[bytes]  # each layer's uncompressed tar
    children: dict[str, bytes] = field(default_factory=dict)  # for an index: child digest -> manifest


def small_image(seed: str = "a", arch: str = "amd64") -> Image:
    plain = make_tar({"etc/hello": f"hello {seed}\n".encode(), "bin/tool": seed.encode() * 100})
    inner = make_tar({"usr/share/doc": f"doc {seed} {arch}\n".encode() * 50})
    zipped = gzip.compress(inner, mtime=0)
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Env": [f"SEED={seed}"]},
                         "rootfs": {"type": "layers", "diff_ids": [sha(plain), sha(inner)]}},
                        separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": sha(plain), "size": len(plain)},
                   {"mediaType": mt.OCI_LAYER_GZIP, "digest": sha(zipped), "size": len(zipped)}],
    }, separators=(",", ":")).encode()
    return Image(manifest, mt.OCI_MANIFEST, {sha(config): config, sha(plain): plain, sha(zipped): zipped}, config,
                 [plain, inner])


def multi_arch_image() -> Image:
    kids = [small_image("m", "amd64"), small_image("m", "arm64")]
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": sha(k.manifest), "size": len(k.manifest),
         "platform": {"architecture": arch, "os": "linux"}} for k, arch in zip(kids, ("amd64", "arm64"))]},
        separators=(",", ":")).encode()
    blobs = {d: b for k in kids for d, b in k.blobs.items()}
    return Image(index, mt.OCI_INDEX, blobs, b"", [], {sha(k.manifest): k.manifest for k in kids})


@dataclass(frozen=True)
class Kind:
    name: str
    ref: Callable[[Path, str], str]  # (tmp dir, tag or "") -> reference text
    keeps_bytes: bool  # manifests and blobs come back byte-identical
    holds_index: bool


_REGISTRY: list[str] = []  # the session registry's host, once a docker:// test asked for it


def _repo(d: Path) -> str:
    return "conf/r" + hashlib.sha256(str(d).encode()).hexdigest()[:16]


FILE_KINDS = [
    Kind("oci", lambda d, t: f"oci:{d}/layout" + (f":{t}" if t else ""), True, True),
    Kind("oci-archive", lambda d, t: f"oci-archive:{d}/image.tar" + (f":{t}" if t else ""), True, True),
    Kind("dir", lambda d, t: f"dir:{d}/dir", True, True),
    Kind("docker-archive", lambda d, t: f"docker-archive:{d}/docker.tar" + (f":ex/{t}:1" if t else ""), False, False),
]
KINDS = FILE_KINDS + [
    Kind("docker", lambda d, t: f"docker://{_REGISTRY[0]}/{_repo(d)}:{t or 'latest'}", True, True),
    Kind("store", lambda d, t: f"conf/{t or 'latest'}:1", True, True),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kind:
    k: Kind = request.param
    if k.name == "docker" and not _REGISTRY:
        _REGISTRY.append(request.getfixturevalue("registry").host)
    if k.name == "store":  # new_source()/new_destination() without a context: the default store
        monkeypatch.setenv("SHOAL_STORE", str(tmp_path / "store"))
    return k


@pytest.fixture(params=FILE_KINDS, ids=[k.name for k in FILE_KINDS])
def file_kind(request: pytest.FixtureRequest) -> Kind:
    return request.param  # type: ignore[no-any-return]


def write_image(ref: ImageReference, img: Image, commit: bool = True) -> None:
    """A test-only copy: blobs first (skipping those the destination has), child manifests, top, commit."""
    with ref.new_destination() as dst:
        for d, data in img.blobs.items():
            info = BlobInfo(d, len(data))
            if not dst.has_blob(info):
                dst.put_blob(io.BytesIO(data), info)
                assert dst.has_blob(info)
        for d, raw in img.children.items():
            dst.put_manifest(raw, mt.OCI_MANIFEST, d)
        dst.put_manifest(img.manifest, img.media_type)
        if commit:
            dst.commit()


def read_blob(src: ImageSource, digest: str, size: int = -1) -> bytes:
    stream, n = src.get_blob(BlobInfo(digest, size))
    with stream:
        data: bytes = stream.read()
    assert n in (-1, len(data))
    return data


# ---------------------------------------------------------------------------------------- round trips


def test_round_trip(kind: Kind, tmp_path: Path) -> None:
    img = small_image()
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, img)
    with ref.new_source() as src:
        raw, media = src.get_manifest()
        doc = json.loads(raw)
        if kind.keeps_bytes:
            assert (raw, media) == (img.manifest, img.media_type)
            for d, data in img.blobs.items():
                assert read_blob(src, d, len(data)) == data
                assert src.has_blob(BlobInfo(d, len(data)))
        else:  # docker-archive: schema2 manifest, uncompressed layers named by their diff_ids
            assert media == mt.DOCKER_MANIFEST == doc["mediaType"]
            assert doc["config"] == {"mediaType": mt.DOCKER_CONFIG, "size": len(img.config), "digest": sha(img.config)}
            assert read_blob(src, sha(img.config)) == img.config
            assert [lay["digest"] for lay in doc["layers"]] == json.loads(img.config)["rootfs"]["diff_ids"]
            assert {lay["mediaType"] for lay in doc["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar"}
            assert [read_blob(src, lay["digest"]) for lay in doc["layers"]] == img.uncompressed
        for desc in [doc["config"], *doc["layers"]]:  # every descriptor is served and hashes to its digest
            assert sha(read_blob(src, desc["digest"], desc["size"])) == desc["digest"]
        missing = BlobInfo(sha(b"not here"), 8)
        assert not src.has_blob(missing)
        with pytest.raises(NotFound):
            src.get_blob(missing)


def test_index_round_trip(kind: Kind, tmp_path: Path) -> None:
    img = multi_arch_image()
    ref = parse_reference(kind.ref(tmp_path, "multi"))
    if not kind.holds_index:
        with pytest.raises(UsageError, match="index"):
            write_image(ref, img)
        assert not Path(ref.details().split(":")[0]).exists()
        return
    write_image(ref, img)
    with ref.new_source() as src:
        raw, media = src.get_manifest()
        assert raw == img.manifest
        assert media == mt.OCI_INDEX
        for d, child in img.children.items():
            assert src.get_manifest(d) == (child, mt.OCI_MANIFEST)
        with pytest.raises(NotFound):
            src.get_manifest(sha(b"no such manifest"))
        for d, data in img.blobs.items():
            assert read_blob(src, d) == data


def test_deterministic_output(file_kind: Kind, tmp_path: Path) -> None:
    """The same image written twice, in a different blob order, gives the same bytes on disk."""
    img = small_image()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_image(parse_reference(file_kind.ref(a, "v1")), img)
    img.blobs = dict(reversed(list(img.blobs.items())))
    write_image(parse_reference(file_kind.ref(b, "v1")), img)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(a) == files(b)
    assert files(a)  # something was written


def test_nothing_visible_before_commit(kind: Kind, tmp_path: Path) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, small_image(), commit=False)
    with pytest.raises(NotFound):
        _open_and_read(ref)
    assert not [p for p in tmp_path.rglob("*") if ".shoal-" in p.name or ".tmp-" in p.name]


def test_replacing_an_image(kind: Kind, tmp_path: Path) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    first, second = small_image("first"), small_image("second")
    write_image(ref, first)
    if kind.name == "docker-archive":  # as skopeo: never modifies an existing archive
        with pytest.raises(UsageError, match="exists"):
            write_image(ref, second)
        return
    write_image(ref, second)
    with ref.new_source() as src:
        assert json.loads(src.get_manifest()[0])["config"]["digest"] == sha(second.config)
        if kind.name in ("dir", "oci-archive"):  # the directory/archive holds only the new image
            assert not src.has_blob(BlobInfo(sha(first.config), -1))


# ---------------------------------------------------------------------------------------- blobs


def test_destination_has_blob_and_put(kind: Kind, tmp_path: Path) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    data = b"some blob bytes\n"
    info = BlobInfo(sha(data), len(data))
    with ref.new_destination() as dst:
        assert not dst.has_blob(info)
        dst.put_blob(io.BytesIO(data), info)
        assert dst.has_blob(info)
        dst.put_blob(io.BytesIO(data), BlobInfo(sha(data), -1))  # again, size unknown: fine
        assert dst.has_blob(info)


@pytest.mark.parametrize("how", ["wrong-bytes", "short", "long", "wrong-size"])
def test_destination_refuses_bad_blob(kind: Kind, tmp_path: Path, how: str) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    data = b"the real content of the blob\n"
    sent, info = {
        "wrong-bytes": (b"the fake content of the blob\n", BlobInfo(sha(data), len(data))),
        "short": (data[:-5], BlobInfo(sha(data), len(data))),
        "long": (data + b"more", BlobInfo(sha(data), len(data))),
        "wrong-size": (data, BlobInfo(sha(data), len(data) + 1)),
    }[how]
    with ref.new_destination() as dst:
        with pytest.raises(IntegrityError) as exc:
            dst.put_blob(io.BytesIO(sent), info)
        assert "\n" not in str(exc.value)
        assert not dst.has_blob(info)
        leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".shoal-blob-")]
        assert leftovers == []


def test_refuses_manifest_not_matching_its_digest(kind: Kind, tmp_path: Path) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    img = small_image()
    with ref.new_destination() as dst:
        with pytest.raises((IntegrityError, UsageError)):
            dst.put_manifest(img.manifest, mt.OCI_MANIFEST, sha(b"something else"))


HOSTILE_DIGESTS = [
    "sha256:../../../../etc/passwd",
    "sha256:" + "../" * 21 + "a",
    "../../etc/passwd",
    "sha256:/etc/passwd",
    "sha256:" + "a" * 64 + "/../../x",
    "sha256:" + "a" * 64 + "\n",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha512:" + "a" * 128,
    "sha256:" + "a" * 64 + "\0",
    "",
]


@pytest.mark.parametrize("digest", HOSTILE_DIGESTS, ids=range(len(HOSTILE_DIGESTS)))
def test_hostile_digests_are_refused(kind: Kind, tmp_path: Path, digest: str) -> None:
    if kind.name == "docker" and digest.startswith("sha512:"):
        pytest.skip("a registry may hold sha512 blobs (the distribution spec allows them): docker:// asks, "
                    "the file transports and the store, which only hold sha256 blobs, refuse")
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, small_image())
    info = BlobInfo(digest, 4)
    with ref.new_source() as src:
        for call in (lambda: src.get_blob(info), lambda: src.has_blob(info), lambda: src.get_manifest(digest)):
            with pytest.raises(FormatError) as exc:
                call()
            assert "\n" not in str(exc.value)
            if "/" in digest:
                assert isinstance(exc.value, HostileInput)
    if kind.name == "docker-archive":
        os.unlink(ref.details().split(":")[0])
    with ref.new_destination() as dst:
        with pytest.raises(FormatError):
            dst.has_blob(info)
        with pytest.raises(FormatError):
            dst.put_blob(io.BytesIO(b"evil"), info)
    assert not (tmp_path.parent / "etc").exists()


# ---------------------------------------------------------------------------------------- references

ROUND_TRIP = [
    "oci:/tmp/layout", "oci:/tmp/layout:latest", "oci:relative/dir:name:tag", "oci:/l:example.com/ns/img:v1.2",
    "oci:/l:a@b", "oci:/l:a+b--c_d.e", "oci:/l:@0", "oci:/l:@12", "oci:.:x",
    "oci-archive:/tmp/i.tar", "oci-archive:/tmp/i.tar:v1", "oci-archive:i.tar:repo/name:tag", "oci-archive:/x:@3",
    "docker-archive:/tmp/d.tar", "docker-archive:/tmp/d.tar:busybox:latest", "docker-archive:d.tar:busybox",
    "docker-archive:/d.tar:docker.io/library/busybox:1.36", "docker-archive:/d.tar:localhost:5000/ns/img:v1",
    "docker-archive:/d.tar:Registry.Example.com/a/b:T_1", "docker-archive:/d.tar:@0", "docker-archive:/d.tar:@7",
    "dir:/tmp/d", "dir:relative", "dir:/path/with:colons:in:it", "dir:.",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_reference_round_trip(text: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref
    hash(ref)  # immutable, usable as a key


INVALID = [
    "oci:", "oci::tag", "oci:/l:bad name", "oci:/l:-leading", "oci:/l:trailing-", "oci:/l:a//b", "oci:/l:@",
    "oci:/l:@-1", "oci:/l:@x", "oci:/l:é",
    "oci-archive:", "oci-archive:/x:has space",
    "docker-archive:", "docker-archive::busybox:latest", "docker-archive:/d.tar:UPPER:latest",
    "docker-archive:/d.tar:busybox@sha256:" + "a" * 64, "docker-archive:/d.tar:", "docker-archive:/d.tar:@-1",
    "docker-archive:/d.tar:busybox:bad tag", "docker-archive:/d.tar:" + "a" * 64,
    "dir:",
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_references(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_reference(text)
    assert "\n" not in str(exc.value)


def test_index_positions_are_not_destinations(tmp_path: Path) -> None:
    for text in (f"oci:{tmp_path}/l:@0", f"oci-archive:{tmp_path}/a.tar:@0", f"docker-archive:{tmp_path}/d.tar:@0"):
        with pytest.raises(UsageError):
            parse_reference(text).new_destination()


# ---------------------------------------------------------------------------------------- hostile archives

ARCHIVES = [k for k in KINDS if k.name.endswith("archive")]


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info


def _good_members(tmp_path: Path, kind: Kind) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of a valid archive of ``kind`` (written by us, read back with tarfile)."""
    ref = parse_reference(kind.ref(tmp_path / "good", "v1"))
    (tmp_path / "good").mkdir()
    write_image(ref, small_image())
    with tarfile.open(ref.details().split(":")[0]) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]  # type: ignore[union-attr]


ESCAPES = {
    "dotdot": [(_member("../escaped"), b"x")],
    "dotdot-deep": [(_member("blobs/../../escaped"), b"x")],
    "absolute": [(_member("/tmp/escaped-abs"), b"x")],
    "symlink-out": [(_member("blobs/sha256/link", tarfile.SYMTYPE, "/etc/passwd"), b"")],
    "symlink-up": [(_member("manifest.json", tarfile.SYMTYPE, "../../../etc/passwd"), b"")],
    "hardlink-out": [(_member("blobs/hl", tarfile.LNKTYPE, "../../etc/passwd"), b"")],
    "chardev": [(_member("dev-null", tarfile.CHRTYPE), b"")],
    "fifo": [(_member("fifo", tarfile.FIFOTYPE), b"")],
}


@pytest.mark.parametrize("kind", ARCHIVES, ids=[k.name for k in ARCHIVES])
@pytest.mark.parametrize("attack", sorted(ESCAPES))
def test_archive_members_escaping(kind: Kind, tmp_path: Path, attack: str) -> None:
    good = _good_members(tmp_path, kind)
    bad = ESCAPES[attack] + good if attack == "symlink-up" else good + ESCAPES[attack]
    if attack == "symlink-up":  # replaces the real manifest.json / index.json with a link
        bad = [m for m in bad if m[0].name != "manifest.json" or m[0].issym()]
    path = tmp_path / "evil.tar"
    path.write_bytes(_tar_with(bad))
    with pytest.raises(HostileInput) as exc:
        with parse_reference(f"{kind.name}:{path}").new_source() as src:
            src.get_manifest()
    assert "\n" not in str(exc.value)
    assert not (tmp_path.parent / "escaped").exists() and not Path("/tmp/escaped-abs").exists()


@pytest.mark.parametrize("type_", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_oci_archive_refuses_any_link(tmp_path: Path, type_: bytes) -> None:
    """Even a link that stays inside the archive: an OCI layout has no business holding one."""
    good = _good_members(tmp_path, KINDS[1])
    target = "index.json" if type_ == tarfile.LNKTYPE else "../../index.json"
    path = tmp_path / "links.tar"
    path.write_bytes(_tar_with(good + [(_member("blobs/sha256/" + "f" * 64, type_, target), b"")]))
    with pytest.raises(HostileInput, match="link"):
        parse_reference(f"oci-archive:{path}").new_source()


def test_docker_archive_follows_links_inside(tmp_path: Path) -> None:
    """skopeo writes ``<id>/layer.tar`` symlinks; links that stay inside the archive are followed."""
    good = _good_members(tmp_path, KINDS[3])
    listing = json.loads(next(data for m, data in good if m.name == "manifest.json"))
    layers = listing[0]["Layers"]
    listing[0]["Layers"] = ["one/layer.tar", "two/layer.tar"]
    links = [(_member("one/layer.tar", tarfile.SYMTYPE, "../" + layers[0]), b""),
             (_member("two/layer.tar", tarfile.LNKTYPE, layers[1]), b"")]
    info = tarfile.TarInfo("manifest.json")
    members = [m for m in good if m[0].name != "manifest.json"] + links + [(info, json.dumps(listing).encode())]
    path = tmp_path / "links.tar"
    path.write_bytes(_tar_with(members))
    with parse_reference(f"docker-archive:{path}").new_source() as src:
        doc = json.loads(src.get_manifest()[0])
        assert [sha(read_blob(src, lay["digest"])) for lay in doc["layers"]] == [lay["digest"] for lay in doc["layers"]]


@pytest.mark.parametrize("kind", ARCHIVES, ids=[k.name for k in ARCHIVES])
@pytest.mark.parametrize("cut", ["empty", "header", "0.3", "0.5", "0.9", "last-byte", "between-members",
                                 "no-end-block"])
def test_truncated_archive(kind: Kind, tmp_path: Path, cut: str) -> None:
    """Cut anywhere inside the content (even exactly between members): one-line error, never a partial image."""
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, small_image())
    path = Path(ref.details().split(":")[0])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    content_end = max(m.offset_data + m.size for m in members)
    fixed = {"empty": 0, "header": 100, "last-byte": content_end - 1, "between-members": members[-1].offset,
             "no-end-block": -(-content_end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE}
    at = fixed[cut] if cut in fixed else int(content_end * float(cut))
    path.write_bytes(data[:at])
    with pytest.raises(ShoalError) as exc:
        with ref.new_source() as src:
            raw, _ = src.get_manifest()
            for desc in [json.loads(raw)["config"], *json.loads(raw)["layers"]]:
                assert sha(read_blob(src, desc["digest"])) == desc["digest"]
    assert isinstance(exc.value, FormatError)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400


@pytest.mark.parametrize("kind", ARCHIVES, ids=[k.name for k in ARCHIVES])
def test_archive_size_cap(kind: Kind, tmp_path: Path) -> None:
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, small_image())
    with pytest.raises(HostileInput, match="more than 100 bytes"):
        ref.new_source(SystemContext(max_size=100))
    with pytest.raises(HostileInput, match="more than 2 members"):
        ref.new_source(SystemContext(max_members=2))
    ref.new_source(SystemContext(max_size=1 << 20)).close()


@pytest.mark.parametrize("kind", ARCHIVES, ids=[k.name for k in ARCHIVES])
@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_archive_is_read(kind: Kind, tmp_path: Path, compress: str) -> None:
    """``docker save | gzip`` (and zstd) archives are accepted, as containers/image accepts them."""
    import zstandard

    img = small_image()
    ref = parse_reference(kind.ref(tmp_path, "v1"))
    write_image(ref, img)
    path = Path(ref.details().split(":")[0])
    data = path.read_bytes()
    path.write_bytes(gzip.compress(data) if compress == "gzip" else zstandard.ZstdCompressor().compress(data))
    with ref.new_source() as src:
        raw, _ = src.get_manifest()
        assert sha(read_blob(src, sha(img.config))) == sha(img.config)
        if kind.keeps_bytes:
            assert raw == img.manifest


# ---------------------------------------------------------------------------------------- per transport


def test_oci_index_entries(tmp_path: Path) -> None:
    """Same name replaces its entry, other entries stay; no name adds an unnamed entry; delete."""
    layout = tmp_path / "l"
    a, b, c = small_image("a"), small_image("b"), small_image("c")
    write_image(parse_reference(f"oci:{layout}:one"), a)
    write_image(parse_reference(f"oci:{layout}:two"), b)
    write_image(parse_reference(f"oci:{layout}:one"), c)
    write_image(parse_reference(f"oci:{layout}"), a)
    write_image(parse_reference(f"oci:{layout}"), a)  # same digest, still one unnamed entry
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    names = [e.get("annotations", {}).get(mt.ANN_REF_NAME) for e in entries]
    assert names == ["two", "one", None]
    assert [e["digest"] for e in entries] == [sha(b.manifest), sha(c.manifest), sha(a.manifest)]
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    with pytest.raises(UsageError, match="3 images"):
        parse_reference(f"oci:{layout}").new_source()
    with parse_reference(f"oci:{layout}:@1").new_source() as src:
        assert src.get_manifest()[0] == c.manifest
    with pytest.raises(NotFound):
        parse_reference(f"oci:{layout}:three").new_source()

    parse_reference(f"oci:{layout}:one").delete()
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert [e["digest"] for e in entries] == [sha(b.manifest), sha(a.manifest)]
    blobs = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    assert sha(c.config)[7:] not in blobs and sha(c.manifest)[7:] not in blobs  # only c reached them
    assert sha(a.config)[7:] in blobs and sha(b.config)[7:] in blobs


def test_oci_reads_layout_without_media_types(tmp_path: Path) -> None:
    """Old image-spec layouts (umoci) omit mediaType in index.json and in manifests: it is guessed."""
    img = small_image()
    doc = json.loads(img.manifest)
    del doc["mediaType"]
    img.manifest = json.dumps(doc).encode()
    layout = tmp_path / "l"
    write_image(parse_reference(f"oci:{layout}:t"), img)
    index = json.loads((layout / "index.json").read_bytes())
    del index["manifests"][0]["mediaType"]
    (layout / "index.json").write_text(json.dumps(index))
    with parse_reference(f"oci:{layout}:t").new_source() as src:
        assert src.get_manifest() == (img.manifest, mt.OCI_MANIFEST)


def test_oci_broken_index_json(tmp_path: Path) -> None:
    layout = tmp_path / "l"
    layout.mkdir()
    for text in ("{", '{"manifests": 3}', '{"manifests": [{"digest": "sha256:../x"}]}', "[" * 100000):
        (layout / "index.json").write_text(text)
        with pytest.raises(FormatError) as exc:
            parse_reference(f"oci:{layout}").new_source()
        assert "\n" not in str(exc.value)


def test_oci_source_refuses_corrupt_manifest(tmp_path: Path) -> None:
    img = small_image()
    layout = tmp_path / "l"
    write_image(parse_reference(f"oci:{layout}:t"), img)
    (layout / "blobs" / "sha256" / sha(img.manifest)[7:]).write_bytes(img.manifest + b" ")
    with parse_reference(f"oci:{layout}:t").new_source() as src:
        with pytest.raises(IntegrityError):
            src.get_manifest()


def test_oci_blob_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    img = small_image()
    layout = tmp_path / "l"
    write_image(parse_reference(f"oci:{layout}:t"), img)
    blob = layout / "blobs" / "sha256" / sha(img.config)[7:]
    blob.unlink()
    os.mkfifo(blob)
    with parse_reference(f"oci:{layout}:t").new_source() as src:
        with pytest.raises(FormatError):
            src.get_blob(BlobInfo(sha(img.config), -1))


def test_dir_refuses_foreign_directory(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "precious.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a dir: image"):
        parse_reference(f"dir:{d}").new_destination()
    assert (d / "precious.txt").read_text() == "mine"


def test_dir_format_on_disk(tmp_path: Path) -> None:
    img = multi_arch_image()
    d = tmp_path / "d"
    write_image(parse_reference(f"dir:{d}"), img)
    assert (d / "version").read_bytes() == b"Directory Transport Version: 1.1\n"
    assert (d / "manifest.json").read_bytes() == img.manifest
    for digest, raw in img.children.items():
        assert (d / f"{digest[7:]}.manifest.json").read_bytes() == raw
    for digest, data in img.blobs.items():
        assert (d / digest[7:]).read_bytes() == data


def test_docker_archive_format_on_disk(tmp_path: Path) -> None:
    img = small_image()
    path = tmp_path / "d.tar"
    write_image(parse_reference(f"docker-archive:{path}:busybox"), img)
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar}
        listing = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        diff_ids = json.loads(img.config)["rootfs"]["diff_ids"]
        assert listing == [{"Config": sha(img.config)[7:] + ".json", "RepoTags": ["docker.io/library/busybox:latest"],
                            "Layers": [d[7:] + ".tar" for d in diff_ids]}]
        for d, data in zip(diff_ids, img.uncompressed):
            assert tar.extractfile(d[7:] + ".tar").read() == data  # type: ignore[union-attr]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.pax_headers for m in members.values())
    assert list(members) == sorted(members)
    for alias in ("busybox:latest", "docker.io/library/busybox", "index.docker.io/library/busybox:latest"):
        with parse_reference(f"docker-archive:{path}:{alias}").new_source() as src:
            assert json.loads(src.get_manifest()[0])["config"]["digest"] == sha(img.config)
    with pytest.raises(NotFound):
        parse_reference(f"docker-archive:{path}:busybox:other").new_source()


def test_docker_archive_checks_diff_ids(tmp_path: Path) -> None:
    img = small_image()
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"].reverse()
    img.config = json.dumps(cfg).encode()
    doc = json.loads(img.manifest)
    doc["config"].update(digest=sha(img.config), size=len(img.config))
    img.manifest = json.dumps(doc).encode()
    img.blobs = {d: b for d, b in img.blobs.items() if d != doc["config"]["digest"]} | {sha(img.config): img.config}
    with pytest.raises(IntegrityError, match="diff_id"):
        write_image(parse_reference(f"docker-archive:{tmp_path}/d.tar"), img)
    assert not (tmp_path / "d.tar").exists()


def test_docker_archive_refuses_non_tar_layers(tmp_path: Path) -> None:
    img = small_image()
    doc = json.loads(img.manifest)
    doc["layers"][0]["mediaType"] = mt.PACK
    img.manifest = json.dumps(doc).encode()
    with pytest.raises(FormatError, match="tar layers"):
        write_image(parse_reference(f"docker-archive:{tmp_path}/d.tar"), img)


def test_docker_archive_several_images(tmp_path: Path) -> None:
    """An archive with two images: a source needs NAME:TAG or @N (as skopeo)."""
    a, b = small_image("a"), small_image("b")
    for name, img in (("a.tar", a), ("b.tar", b)):
        write_image(parse_reference(f"docker-archive:{tmp_path}/{name}:img/{name[0]}:1"), img)
    members: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    listing = []
    for name in ("a.tar", "b.tar"):
        with tarfile.open(tmp_path / name) as tar:
            for m in tar:
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if m.name == "manifest.json":
                    listing += json.loads(data)
                else:
                    members[m.name] = (m, data)
    info = tarfile.TarInfo("manifest.json")
    both = _tar_with(list(members.values()) + [(info, json.dumps(listing).encode())])
    (tmp_path / "both.tar").write_bytes(both)
    with pytest.raises(UsageError, match="2 images"):
        parse_reference(f"docker-archive:{tmp_path}/both.tar").new_source()
    for text, img in ((":img/b:1", b), (":@0", a), (":docker.io/img/a:1", a)):
        with parse_reference(f"docker-archive:{tmp_path}/both.tar{text}").new_source() as src:
            assert read_blob(src, sha(img.config)) == img.config
    with pytest.raises(NotFound):
        parse_reference(f"docker-archive:{tmp_path}/both.tar:@2").new_source()


def _open_and_read(ref: ImageReference) -> None:
    """A source may find out at once (a file) or at its first read (a registry): both are NotFound."""
    with ref.new_source() as src:
        src.get_manifest()


def test_missing_images(kind: Kind, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as exc:
        _open_and_read(parse_reference(kind.ref(tmp_path / "nowhere", "v1")))
    assert "\n" not in str(exc.value)
