"""The FUSE kernel protocol of ``mount/kernel.py``, spoken over a SOCK_SEQPACKET pair (one message per
request and reply, as on /dev/fuse) against a small file system; the real kernel is in the mount tests."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
import time
from typing import Iterable, Iterator

import pytest

from shoal.mount.kernel import FuseError, Session, StatFs, entry_bytes, negative_entry

IN = struct.Struct("<IIQQIIIHH")
OUT = struct.Struct("<IiQ")
DAY = 24 * 3600.0


class TinyFS:
    acl = False

    def __init__(self) -> None:
        self.files = {b"a": (2, b"hello"), b"bb": (3, b"x" * 5000)}
        self.inited = threading.Event()

    def _entry(self, ino: int) -> bytes:
        if ino == 1:
            return entry_bytes(1, stat.S_IFDIR | 0o755, 2, 0, 0, 4096, 0, -5_000_000_001, DAY)
        data = [d for i, d in self.files.values() if i == ino][0]
        return entry_bytes(ino, stat.S_IFREG | 0o644, 1, 1000, 1000, len(data), 0, 1_700_000_000_123456789, DAY)

    def init(self, session: Session) -> None:
        self.inited.set()

    def lookup(self, parent: int, name: bytes) -> bytes:
        if parent != 1:
            raise FuseError(errno.ENOTDIR)
        hit = self.files.get(name)
        return self._entry(hit[0]) if hit else negative_entry(DAY)

    def getattr(self, ino: int) -> bytes:
        return self._entry(ino)

    def readlink(self, ino: int) -> bytes:
        raise FuseError(errno.EINVAL)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, bytes]]:
        return iter([(n, self._entry(i)) for n, (i, _) in sorted(self.files.items())][start:])

    def read_now(self, ino: int, off: int, size: int) -> list[bytes] | None:
        if ino == 3:
            return None  # "would wait": answered by a worker thread
        return self.read(ino, off, size)

    def read(self, ino: int, off: int, size: int) -> list[bytes]:
        if ino == 3:
            assert threading.current_thread().name.startswith("shoal-fuse-")
        if ino == 99:
            raise RuntimeError("a bug")
        data = [d for i, d in self.files.values() if i == ino][0]
        return [data[off:off + size][:3], data[off:off + size][3:]]  # in pieces, as the Reader holds them

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name != b"user.k":
            raise FuseError(errno.ENODATA)
        return b"value"

    def listxattr(self, ino: int) -> Iterable[bytes]:
        return [b"user.k", b"user.other"]

    def statfs(self) -> StatFs:
        return StatFs(blocks=10, files=3)


class Wire:
    def __init__(self, busy_poll: float = 0.0) -> None:
        self.kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fs = TinyFS()
        self.session = Session(daemon.detach(), self.fs, threads=2, busy_poll=busy_poll)
        self.thread = threading.Thread(target=self.session.serve, daemon=True)
        self.thread.start()
        self.unique = 0

    def ask(self, op: int, ino: int, payload: bytes = b"") -> tuple[int, int, bytes]:
        self.unique += 2
        self.kernel.sendall(IN.pack(IN.size + len(payload), op, self.unique, ino, 0, 0, 0, 0, 0) + payload)
        return self.reply()

    def reply(self) -> tuple[int, int, bytes]:
        msg = self.kernel.recv(1 << 20)
        size, err, unique = OUT.unpack_from(msg)
        assert size == len(msg)
        return unique, err, msg[OUT.size:]

    def close(self) -> None:
        self.session.close()
        self.kernel.close()  # the daemon's end then reads EOF and gets an error on its next write
        self.thread.join(5)


@pytest.fixture(params=[0.0, 50e-6], ids=["sleeping", "busy-poll"])
def wire(request: pytest.FixtureRequest) -> Iterator[Wire]:
    w = Wire(request.param)
    yield w
    w.close()


def test_init_asks_for_big_reads_and_cached_symlinks(wire: Wire) -> None:
    flags = (1 << 0) | (1 << 13) | (1 << 14) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 17) | (1 << 12)
    _, err, out = wire.ask(26, 0, struct.pack("<IIII", 7, 38, 131072, flags) + bytes(48))
    major, minor, readahead, got, _, _, max_write, gran, max_pages = struct.unpack_from("<IIIIHHIIH", out)
    assert err == 0 and len(out) == 64 and (major, minor, readahead, gran) == (7, 38, 131072, 1)
    assert got & (1 << 22) and max_pages == 256  # 1 MiB reads
    assert got & (1 << 23) and got & (1 << 13)  # cached symlinks, readdirplus
    assert not got & (1 << 14)  # readdirplus always, not adaptive: a walker's stat needs no lookup
    assert not got & (1 << 20)  # no POSIX ACLs for this file system
    assert not got & (1 << 12)  # no auto data invalidation: nothing changes
    assert got & ~flags == 0  # never a flag the kernel did not offer
    assert max_write >= 4096 and wire.fs.inited.wait(5)  # told after the reply


def test_lookup_getattr_and_negative_entries(wire: Wire) -> None:
    _, err, out = wire.ask(1, 1, b"bb\0")
    ino, gen, ev, av, _, _ = struct.unpack_from("<QQQQII", out)
    assert err == 0 and len(out) == 128 and ino == 3 and ev == av == int(DAY)
    assert struct.unpack_from("<Q", out, 48)[0] == 5000
    _, err, out = wire.ask(3, 3, bytes(16))
    valid, _, _ = struct.unpack_from("<QII", out)
    assert err == 0 and len(out) == 104 and valid == int(DAY) and struct.unpack_from("<Q", out, 16)[0] == 3
    _, err, out = wire.ask(1, 1, b"nope\0")
    assert err == 0 and struct.unpack_from("<QQQ", out) == (0, 0, int(DAY))  # cached "no such name"
    assert wire.ask(1, 2, b"x\0")[1] == -errno.ENOTDIR
    _, err, out = wire.ask(3, 1, bytes(16))  # a time before 1970 is negative, not an error
    assert err == 0 and struct.unpack_from("<q", out, 16 + 32)[0] == -6


def test_reads_and_errors(wire: Wire) -> None:
    _, err, out = wire.ask(15, 2, struct.pack("<QQIIQII", 0, 1, 3, 0, 0, 0, 0))
    assert (err, out) == (0, b"ell")
    assert wire.ask(15, 99, struct.pack("<QQIIQII", 0, 0, 3, 0, 0, 0, 0))[1] == -errno.EIO  # a bug is EIO
    _, err, out = wire.ask(15, 3, struct.pack("<QQIIQII", 0, 4998, 10, 0, 0, 0, 0))  # on a worker
    assert (err, out) == (0, b"xx")
    assert wire.ask(14, 2, bytes(8))[1] == -errno.ENOSYS  # OPEN: the kernel opens by itself from now on
    assert wire.ask(27, 1, bytes(8))[1] == -errno.ENOSYS  # OPENDIR likewise
    assert wire.ask(16, 2, bytes(40) + b"x")[1] == -errno.EROFS  # WRITE
    assert wire.ask(9, 1, bytes(8) + b"d\0")[1] == -errno.EROFS  # MKDIR
    assert wire.ask(40, 2, bytes(24))[1] == -errno.ENOSYS  # POLL: not known here
    _, err, out = wire.ask(17, 1)
    assert err == 0 and len(out) == 80 and struct.unpack_from("<Q", out)[0] == 10


def test_forget_gets_no_reply(wire: Wire) -> None:
    wire.unique += 2
    wire.kernel.sendall(IN.pack(IN.size + 8, 2, wire.unique, 3, 0, 0, 0, 0, 0) + struct.pack("<Q", 1))
    unique, err, _ = wire.ask(17, 1)  # the next reply is the STATFS's
    assert unique == wire.unique and err == 0


def test_xattrs_follow_the_size_convention(wire: Wire) -> None:
    assert wire.ask(22, 2, struct.pack("<II", 0, 0) + b"user.k\0")[2] == struct.pack("<II", 5, 0)
    assert wire.ask(22, 2, struct.pack("<II", 64, 0) + b"user.k\0")[2] == b"value"
    assert wire.ask(22, 2, struct.pack("<II", 2, 0) + b"user.k\0")[1] == -errno.ERANGE
    assert wire.ask(22, 2, struct.pack("<II", 64, 0) + b"user.zz\0")[1] == -errno.ENODATA
    names = b"user.k\0user.other\0"
    assert wire.ask(23, 2, struct.pack("<II", 0, 0))[2] == struct.pack("<II", len(names), 0)
    assert wire.ask(23, 2, struct.pack("<II", 100, 0))[2] == names


def _dirents(buf: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    out, at = [], 0
    while at < len(buf):
        if plus:
            at += 128
        ino, off, namelen, typ = struct.unpack_from("<QQII", buf, at)
        out.append((buf[at + 24:at + 24 + namelen], ino, off, typ))
        at += (24 + namelen + 7) // 8 * 8
    return out


@pytest.mark.parametrize("plus", [False, True])
def test_directory_listings_fit_the_buffer_and_resume(wire: Wire, plus: bool) -> None:
    op = 44 if plus else 28
    _, err, out = wire.ask(op, 1, struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0))
    assert err == 0 and _dirents(out, plus) == [(b"a", 2, 1, 8), (b"bb", 3, 2, 8)]
    one = 128 + 32 if plus else 32
    _, err, out = wire.ask(op, 1, struct.pack("<QQIIQII", 0, 0, one, 0, 0, 0, 0))
    assert _dirents(out, plus) == [(b"a", 2, 1, 8)]  # only what fits
    _, err, out = wire.ask(op, 1, struct.pack("<QQIIQII", 0, 1, 4096, 0, 0, 0, 0))
    assert _dirents(out, plus) == [(b"bb", 3, 2, 8)]  # resumes at the offset it was given
    _, err, out = wire.ask(op, 1, struct.pack("<QQIIQII", 0, 2, 4096, 0, 0, 0, 0))
    assert err == 0 and out == b""  # the end


def test_notify_store_is_one_message(wire: Wire) -> None:
    wire.session.notify_store(3, 4096, b"data")
    size, code, unique = OUT.unpack_from(msg := wire.kernel.recv(4096))
    assert (size, code, unique) == (len(msg), 4, 0)
    assert struct.unpack_from("<QQII", msg, 16) == (3, 4096, 4, 0) and msg[40:] == b"data"


def test_unmount_ends_the_session() -> None:
    w = Wire()
    w.kernel.close()
    w.thread.join(5)
    assert not w.thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(w.session.fd)  # closed once no thread reads it


def _state(tid: int) -> tuple[str, int]:
    """A thread's scheduler state (R running, S sleeping) and its CPU time in clock ticks."""
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


def test_a_busy_polling_reader_waits_awake_then_sleeps() -> None:
    """After a reply the reader keeps asking for the next request for ``busy_poll`` (it runs), then sleeps
    in poll(2) (no CPU while idle), and a request then still wakes it."""
    w = Wire(busy_poll=0.3)
    try:
        assert w.ask(3, 1)[1] == 0
        tid = w.thread.native_id
        assert tid is not None
        awake = [_state(tid)[0] for _ in range(20)]
        assert awake.count("R") >= 15, awake  # spinning within the window
        time.sleep(0.5)
        state, ticks = _state(tid)
        time.sleep(0.5)
        assert state == "S" and _state(tid) == ("S", ticks)  # asleep: no CPU at all over half a second
        assert w.ask(3, 2)[1] == 0
    finally:
        w.close()
    w2 = Wire(busy_poll=0.0)
    try:
        assert w2.ask(3, 1)[1] == 0
        tid = w2.thread.native_id
        assert tid is not None
        time.sleep(0.05)
        assert _state(tid)[0] == "S"  # off: it sleeps in read(2) at once
    finally:
        w2.close()
