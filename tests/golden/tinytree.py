"""The fixed inputs of the format golden tests (shared by the test and by anyone regenerating values)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from shoal.format import index as fidx
from shoal.format.model import Entry, Frame, Index, Kind

T0 = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z


def counter_sha256(n_bytes: int) -> bytes:
    """sha256(0) || sha256(1) || ... over 8-byte big-endian counters, cut to ``n_bytes``."""
    out = bytearray()
    i = 0
    while len(out) < n_bytes:
        out += hashlib.sha256(i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n_bytes])


def text_like(n_bytes: int) -> bytes:
    """``counter_sha256`` mapped onto 13 letters, space and newline: low-entropy, text-like bytes."""
    table = bytes((b"etaoin shrdlu\n" * 19)[:256])
    return counter_sha256(n_bytes).translate(table)


def hand_index() -> Index:
    """A small index written by hand: every entry kind, one chunk in one frame in one pack."""
    chunk = b"#!/bin/sh\necho shoal\n"
    cid = hashlib.sha256(chunk).digest()
    entries = [
        Entry(b"", Kind.DIR, 0o755, 0, 0, T0),
        Entry(b"bin", Kind.DIR, 0o755, 0, 0, T0 + 1),
        Entry(b"bin/link", Kind.SYMLINK, 0o777, 0, 0, T0 + 2, target=b"sh"),
        Entry(b"bin/sh", Kind.FILE, 0o4755, 0, 0, T0 + 3, xattrs=((b"user.k", b"v\x00\xff"),),
              size=len(chunk), chunks=(0,)),
        Entry(b"bin/sh2", Kind.HARDLINK, 0o4755, 0, 0, T0 + 3, xattrs=((b"user.k", b"v\x00\xff"),),
              target=b"bin/sh"),
        Entry(b"caf\xe9", Kind.FILE, 0o644, 1000, 1000, -5),
        Entry(b"dev", Kind.DIR, 0o1777, 0, 0, T0 + 4),
        Entry(b"dev/fifo", Kind.FIFO, 0o600, 0, 0, T0 + 5),
        Entry(b"dev/null", Kind.CHAR, 0o666, 0, 0, T0 + 6, rdev=(1, 3)),
        Entry(b"dev/sda", Kind.BLOCK, 0o660, 0, 6, T0 + 7, rdev=(8, 0)),
    ]
    return fidx.make_index(entries, [cid], [0], [0], [len(chunk)], [Frame(0, 0, 30, len(chunk))],
                           [hashlib.sha256(b"pack").digest()])


def make_tiny_tree(root: Path) -> None:
    """A fixed tree with fixed metadata (needs root for the owners)."""
    root.mkdir()
    for d in ("bin", "etc", "var", "var/empty", "var/tmp"):
        (root / d).mkdir()
    files = {
        "etc/hostname": (b"shoal\n", 0o644, (0, 0)),
        "bin/tool": (text_like(70_000), 0o755, (0, 0)),
        "bin/big": (counter_sha256(300_000), 0o4755, (0, 0)),
        "empty": (b"", 0o600, (1000, 1000)),
    }
    for rel, (data, mode, (uid, gid)) in files.items():
        p = root / rel
        p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    os.setxattr(root / "etc/hostname", "user.shoal", b"golden")
    os.link(root / "bin/tool", root / "bin/tool2")
    os.symlink("tool", root / "bin/sh")
    os.mkfifo(root / "var/fifo", 0o600)
    os.chmod(root / "var/fifo", 0o640)
    os.chmod(root / "var/tmp", 0o1777)
    os.chmod(root / "var/empty", 0o555)
    os.chmod(root, 0o755)
    i = 0
    for dp, dns, fns in sorted(os.walk(root, topdown=False)):
        for n in sorted(fns) + sorted(dns):
            i += 1
            os.utime(os.path.join(dp, n), ns=(T0 + i * 1000, T0 + i * 1000), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))
    assert stat.S_IMODE(os.stat(root / "bin/big").st_mode) == 0o4755
