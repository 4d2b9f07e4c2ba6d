"""Helpers of the convert tests (a uniquely named module: ``conftest`` is taken by tests/conftest.py).

How the fixtures are made:
- hand-made layers: ``Tar`` (Python's ``tarfile``, PAX format unless asked otherwise), in memory;
  sparse layers come from GNU ``tar --sparse`` over a file with holes made in ``tmp_path``.
- classic images: ``write_layout`` writes an OCI image layout (blobs, manifest, config, index.json)
  by hand, so a test controls every byte (and can tamper with it); it is read back through the real
  ``oci:`` transport.
- ``umoci_debian``: a real three-layer image made by ``umoci repack`` from the ``debian_rootfs``
  fixture (debootstrap bookworm minbase), cached under $SHOAL_TEST_CACHE; see ``make_umoci_debian``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from shoal import mediatypes as mt
from shoal.convert.layers import LayerApplier
from shoal.convert.stream import ConvertLimits
from shoal.convert.tree import ConvertedTree
from shoal.format.model import Kind
from shoal.transports.base import ImageSource, parse_reference

MTIME = 1_600_000_000  # seconds: the default mtime of hand-made entries


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Tar:
    """A tar built entry by entry: ``Tar().file("a", b"x").dir("d").bytes()``."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt, encoding="utf-8",
                               errors="surrogateescape")

    def add(self, name: str | bytes, type: bytes, data: bytes = b"", *, mode: int = 0o644, uid: int = 0,
            gid: int = 0, mtime: int = MTIME, linkname: str | bytes = "", pax: dict[str, str] | None = None,
            devmajor: int = 0, devminor: int = 0) -> "Tar":
        ti = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type, mode, uid, gid, mtime
        ti.linkname = os.fsdecode(linkname) if isinstance(linkname, bytes) else linkname
        ti.devmajor, ti.devminor = devmajor, devminor
        ti.pax_headers = dict(pax or {})
        ti.size = len(data) if type == tarfile.REGTYPE else 0
        self.tf.addfile(ti, io.BytesIO(data) if type == tarfile.REGTYPE else None)
        return self

    def file(self, name: str | bytes, data: bytes = b"", **kw: Any) -> "Tar":
        return self.add(name, tarfile.REGTYPE, data, **kw)

    def dir(self, name: str | bytes, **kw: Any) -> "Tar":
        kw.setdefault("mode", 0o755)
        return self.add(name, tarfile.DIRTYPE, **kw)

    def symlink(self, name: str | bytes, target: str | bytes, **kw: Any) -> "Tar":
        kw.setdefault("mode", 0o777)
        return self.add(name, tarfile.SYMTYPE, linkname=target, **kw)

    def hardlink(self, name: str | bytes, target: str | bytes, **kw: Any) -> "Tar":
        return self.add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def whiteout(self, name: str) -> "Tar":
        d, _, base = name.rpartition("/")
        return self.file((d + "/" if d else "") + ".wh." + base, mode=0)

    def opaque(self, dirname: str) -> "Tar":
        return self.file(dirname.rstrip("/") + "/.wh..wh..opq", mode=0)

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def apply(tmp_path: Path, *layers: bytes, limits: ConvertLimits | None = None,
          diff_ids: list[str | None] | None = None) -> ConvertedTree:
    """Apply blobs (tar, gzip or zstd, sniffed) in order; return the merged tree."""
    tmp = tmp_path / "spill"
    tmp.mkdir(parents=True, exist_ok=True)
    ap = LayerApplier(tmp, limits)
    for i, blob in enumerate(layers):
        ap.apply(io.BytesIO(blob), digest=sha(blob), size=len(blob),
                 diff_id=diff_ids[i] if diff_ids else None, media_type=mt.OCI_LAYER_GZIP)
    tree = ap.finish()
    return tree


def flat(tree: ConvertedTree) -> dict[bytes, tuple[Any, ...]]:
    """path -> (kind, mode, uid, gid, mtime_ns, xattrs, payload): payload is the content of a file,
    the target of a symlink or hardlink, (major, minor) of a device."""
    out: dict[bytes, tuple[Any, ...]] = {}
    for e in tree.entries:
        if e.kind == Kind.FILE:
            payload: Any = tree.read(e)
        elif e.kind in (Kind.SYMLINK, Kind.HARDLINK):
            payload = e.target
        elif e.kind in (Kind.CHAR, Kind.BLOCK):
            payload = e.rdev
        else:
            payload = None
        out[e.path] = (e.kind.name, e.mode, e.uid, e.gid, e.mtime_ns, dict(e.xattrs), payload)
    return out


def D(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = MTIME, xattrs: dict[bytes, bytes] | None = None
      ) -> tuple[Any, ...]:
    return ("DIR", mode, uid, gid, mtime * 10**9, xattrs or {}, None)


def F(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = MTIME,
      xattrs: dict[bytes, bytes] | None = None) -> tuple[Any, ...]:
    return ("FILE", mode, uid, gid, mtime * 10**9, xattrs or {}, data)


IMPLICIT: tuple[Any, ...] = ("DIR", 0o755, 0, 0, 0, {}, None)  # convert.md §4.3


# ------------------------------------------------------------------------------------------ OCI layouts


@dataclass
class Built:
    ref: str  # oci:PATH:TAG
    manifest: bytes
    config: bytes
    layers: list[bytes]  # blobs as stored

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def _put(root: Path, data: bytes) -> str:
    d = sha(data)
    p = root / "blobs" / "sha256" / d[7:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return d


def _tag(root: Path, tag: str, media: str, raw: bytes) -> None:
    idx_path = root / "index.json"
    doc: dict[str, Any] = (json.loads(idx_path.read_text()) if idx_path.exists()
                           else {"schemaVersion": 2, "manifests": []})
    doc["manifests"] = [m for m in doc["manifests"]
                        if m.get("annotations", {}).get(mt.ANN_REF_NAME) != tag]
    doc["manifests"].append({"mediaType": media, "digest": sha(raw), "size": len(raw),
                             "annotations": {mt.ANN_REF_NAME: tag}})
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    idx_path.write_text(json.dumps(doc))


def write_layout(root: Path, tag: str | None, tars: list[bytes], *, compression: str | list[str] = "gzip",
                 config: dict[str, Any] | None = None, arch: str = "amd64", variant: str = "",
                 docker: bool = False, diff_ids: list[str] | None = None, blobs: list[bytes] | None = None,
                 layer_types: list[str] | None = None) -> Built:
    """An image over the uncompressed layer ``tars``, written into the OCI layout ``root`` (tagged ``tag``).

    ``blobs`` replaces the stored layer bytes (to tamper with them); ``diff_ids`` replaces the config's."""
    comps = [compression] * len(tars) if isinstance(compression, str) else compression
    stored = []
    for t, c in zip(tars, comps):
        stored.append(gz(t) if c == "gzip" else zst(t) if c == "zstd" else t)
    stored = blobs if blobs is not None else stored
    if layer_types is None:
        table = ({"gzip": mt.DOCKER_LAYER_GZIP, "none": "application/vnd.docker.image.rootfs.diff.tar"} if docker
                 else {"gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD, "none": mt.OCI_LAYER_TAR})
        layer_types = [table[c] for c in comps]
    cfg: dict[str, Any] = {"architecture": arch, "os": "linux", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in tars]}}
    if variant:
        cfg["variant"] = variant
    cfg.update(config or {})
    cfg_raw = json.dumps(cfg, separators=(",", ":")).encode()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST,
        "config": {"mediaType": mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG, "digest": _put(root, cfg_raw),
                   "size": len(cfg_raw)},
        "layers": [{"mediaType": lt, "digest": _put(root, b), "size": len(b)} for lt, b in zip(layer_types, stored)],
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    _put(root, raw)
    if tag is not None:
        _tag(root, tag, manifest["mediaType"], raw)
    return Built(f"oci:{root}:{tag}", raw, cfg_raw, stored)


def write_index(root: Path, tag: str, children: list[tuple[Built, dict[str, Any]]], docker: bool = False) -> str:
    media = mt.DOCKER_LIST if docker else mt.OCI_INDEX
    doc = {"schemaVersion": 2, "mediaType": media, "manifests": [
        {"mediaType": json.loads(b.manifest)["mediaType"], "digest": b.digest, "size": len(b.manifest),
         "platform": plat} for b, plat in children]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    _put(root, raw)
    _tag(root, tag, media, raw)
    return f"oci:{root}:{tag}"


def source(ref: str) -> ImageSource:
    return parse_reference(ref).new_source()


def files_under(path: Path) -> list[str]:
    """Every path below ``path`` (to check that nothing was written somewhere it should not be)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def store_tmp_is_empty(store: Any) -> bool:
    return not any(store.layout.tmp.iterdir())


# ------------------------------------------------------------------------------------------ umoci


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


needs_umoci = pytest.mark.skipif(not have("umoci"), reason="umoci is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (devices, ownership, xattrs)")


def run(*cmd: str | os.PathLike[str], cwd: Path | None = None) -> None:
    p = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, cwd=cwd, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack`` into the bundle ``dest``; returns its rootfs."""
    run("umoci", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"
