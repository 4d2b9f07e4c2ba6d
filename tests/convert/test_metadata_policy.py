"""One metadata policy for build and convert (format.md §4.7), and a platform that does not follow the
build machine (oci-mapping.md §2.1).

- build of one tree, then again after the host labelled its files (security.selinux, security.ima,
  security.evm, security.apparmor, trusted.overlay.*, a POSIX ACL): same root, same manifest digest;
- a recorded xattr (user.*, security.capability) changes the root;
- convert of a tar layer carrying the same entries and xattrs as PAX records (SCHILY and LIBARCHIVE
  forms, SCHILY.acl) gives the same index entries and root as build of the directory;
- the recorded platform comes from the options or the tree's ELF binaries, never from the machine.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest
from convtools import MTIME, Tar, write_layout

from helpers import IS_ROOT, VFS_CAP_NET_BIND, assert_one_line_error, run_shoal
from shoal.format.metadata import keep_xattr
from shoal.store import Store

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (security.* and trusted.* xattrs)")
T_NS = MTIME * 1_000_000_000
U32 = 0xFFFFFFFF
# system.posix_acl_access (version 2): user::rw-, user:1000:r--, group::r--, mask::r--, other::r-- (mode stays 0644)
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in
                                      ((1, 6, U32), (2, 4, 1000), (4, 4, U32), (0x10, 4, U32), (0x20, 4, U32)))
HOST_LABELS = {"security.selinux": b"system_u:object_r:foo_t:s0", "security.ima": b"\x03\x02ima",
               "security.evm": b"\x05evm", "security.apparmor": b"unconfined",
               "trusted.overlay.origin": b"\x00\xfb"}


def test_keep_xattr_table() -> None:
    kept = [b"user.foo", b"user.mime_type", b"trusted.foo", b"security.capability"]
    dropped = [b"security.selinux", b"security.ima", b"security.evm", b"security.apparmor", b"security.SMACK64",
               b"trusted.overlay.opaque", b"system.nfs4_acl", b"system.posix_acl_access",
               b"system.posix_acl_default", b"", b"user", b"other.x"]
    assert [n for n in kept if keep_xattr(n)] == kept
    assert [n for n in dropped if keep_xattr(n)] == []


def _root_and_digest(store: Path, ref: str) -> tuple[str, str]:
    m = Store.open(store).resolve(ref)
    return m.root, m.digest


def _tree(root: Path) -> None:
    """d/ (user.d), d/ping (user.k, security.capability), plain, link -> plain; root:root, MTIME."""
    (root / "d").mkdir(parents=True)
    (root / "d/ping").write_bytes(b"\x7fELF not really")
    (root / "plain").write_bytes(b"plain text\n")
    os.symlink("plain", root / "link")
    for p, mode in (("d/ping", 0o755), ("plain", 0o644), ("d", 0o755), ("", 0o755)):
        os.chown(root / p, 0, 0)
        os.chmod(root / p, mode)
    os.setxattr(root / "d", "user.d", b"1")
    os.setxattr(root / "d/ping", "user.k", b"v\x00\xff")
    os.setxattr(root / "d/ping", "security.capability", VFS_CAP_NET_BIND)
    _times(root)


def _times(root: Path) -> None:
    for p in ("link", "plain", "d/ping", "d", ""):
        os.utime(root / p, ns=(T_NS, T_NS), follow_symlinks=False)


def _label(root: Path) -> None:
    """What a host adds: LSM labels, integrity data, overlayfs bookkeeping, an ACL that leaves the mode alone."""
    for p in ("d/ping", "plain", "d", ""):
        for k, v in HOST_LABELS.items():
            os.setxattr(root / p, k, v)
    os.setxattr(root / "plain", "system.posix_acl_access", ACL)
    os.setxattr(root / "link", "security.selinux", b"system_u:object_r:link_t:s0", follow_symlinks=False)
    _times(root)


@needs_root
def test_build_ignores_host_labels(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    _tree(src)
    run_shoal(store, "build", src, "t:1")
    before = _root_and_digest(store, "t:1")
    _label(src)
    assert "security.selinux" in os.listxattr(src / "plain")  # the filesystem kept the labels
    run_shoal(store, "build", src, "t:2")
    assert _root_and_digest(store, "t:2") == before  # same root and same manifest digest

    os.setxattr(src / "plain", "user.foo", b"bar")
    _times(src)
    run_shoal(store, "build", src, "t:3")
    with_user = _root_and_digest(store, "t:3")
    assert with_user[0] != before[0]

    os.setxattr(src / "plain", "security.capability", VFS_CAP_NET_BIND)
    _times(src)
    run_shoal(store, "build", src, "t:4")
    assert _root_and_digest(store, "t:4")[0] not in (before[0], with_user[0])


def _layer() -> bytes:
    """The tree of ``_tree`` + ``_label`` as a tar layer, xattrs in PAX records (both spellings)."""
    def b64(v: bytes) -> str:
        return base64.b64encode(v).decode().rstrip("=")

    def s(v: bytes) -> str:
        return v.decode("utf-8", "surrogateescape")

    labels = {f"SCHILY.xattr.{k}": s(v) for k, v in HOST_LABELS.items()}
    return (Tar()
            .dir(".", pax=labels)
            .dir("d", pax={"SCHILY.xattr.user.d": "1", **labels})
            .file("d/ping", b"\x7fELF not really", mode=0o755,
                  pax={"SCHILY.xattr.user.k": s(b"v\x00\xff"),
                       "LIBARCHIVE.xattr.security.capability": b64(VFS_CAP_NET_BIND),
                       "LIBARCHIVE.xattr.security.selinux": b64(b"system_u:object_r:foo_t:s0"),
                       **labels})
            .file("plain", b"plain text\n",
                  pax={"SCHILY.acl.access": "user::rw-,user:1000:r--,group::r--,mask::r--,other::r--",
                       "SCHILY.xattr.system.posix_acl_access": s(ACL), **labels})
            .symlink("link", "plain", pax={"SCHILY.xattr.security.selinux": "system_u:object_r:link_t:s0"})
            .bytes())


@needs_root
def test_convert_records_what_build_records(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    _tree(src)
    _label(src)
    run_shoal(store, "build", src, "built:1")
    layout = tmp_path / "layout"
    built = write_layout(layout, "x", [_layer()])
    run_shoal(store, "convert", built.ref, "conv:1")
    st = Store.open(store)
    a, b = st.resolve("built:1"), st.resolve("conv:1")
    ia, ib = st.load_index(a), st.load_index(b)
    assert [(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs) for e in ib.entries] == \
           [(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs) for e in ia.entries]
    assert dict(ia.entries[2].xattrs) == {b"security.capability": VFS_CAP_NET_BIND, b"user.k": b"v\x00\xff"}
    assert a.root == b.root


# ---------------------------------------------------------------------------------------------- platform


def _config(store: Path, ref: str) -> dict[str, object]:
    st = Store.open(store)
    m = st.resolve(ref)
    cfg: dict[str, object] = json.loads(st.layout.get(m.config.digest))
    return cfg


def _elf(machine: int, cls: int = 2, data: int = 1) -> bytes:
    return b"\x7fELF" + bytes([cls, data, 1]) + bytes(9) + (2).to_bytes(2, "little") + \
        machine.to_bytes(2, "little" if data == 1 else "big") + bytes(40)


def test_platform_from_options_or_tree_not_host(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"x")
    os.utime(data / "f", ns=(T_NS, T_NS))
    os.utime(data, ns=(T_NS, T_NS))

    run_shoal(store, "build", data, "d:default")
    cfg = _config(store, "d:default")
    assert (cfg["os"], cfg["architecture"], cfg.get("variant")) == ("linux", "amd64", None)
    run_shoal(store, "build", data, "d:explicit", "--platform", "linux/amd64")
    assert Store.open(store).resolve("d:default").digest == Store.open(store).resolve("d:explicit").digest

    run_shoal(store, "build", data, "d:arm", "--platform", "linux/arm/v7")
    cfg = _config(store, "d:arm")
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm", "v7")
    run_shoal(store, "build", data, "d:over", "--platform", "linux/arm/v7", "--arch", "arm64", "--variant", "v8")
    cfg = _config(store, "d:over")
    assert (cfg["architecture"], cfg.get("variant")) == ("arm64", None)  # arm64/v8 normalizes to arm64 (containerd)

    from shoal.format.platform import host_arch
    run_shoal(store, "build", data, "d:host", "--platform", "host")
    assert _config(store, "d:host")["architecture"] == host_arch()

    # the tree's own /bin/sh decides, through an absolute symlink resolved inside the tree
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/busybox").write_bytes(_elf(183))  # EM_AARCH64
    os.symlink("usr/bin", rootfs / "bin")
    os.symlink("/usr/bin/busybox", rootfs / "usr/bin/sh")
    run_shoal(store, "build", rootfs, "r:1")
    assert _config(store, "r:1")["architecture"] == "arm64"
    (rootfs / "usr/bin/busybox").write_bytes(_elf(21, data=1))  # EM_PPC64, little-endian
    run_shoal(store, "build", rootfs, "r:2")
    assert _config(store, "r:2")["architecture"] == "ppc64le"
    run_shoal(store, "build", rootfs, "r:3", "--arch", "s390x")
    assert _config(store, "r:3")["architecture"] == "s390x"

    p = run_shoal(store, "build", data, "d:bad", "--platform", "linux", check=False)
    assert p.returncode == 2
    assert_one_line_error(p, "platform")
