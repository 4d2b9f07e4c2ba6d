"""The FUSE kernel protocol over ``/dev/fuse``, spoken without libfuse (docs/spec/mount.md §2).

A read-only image needs a dozen of the protocol's requests.  Speaking them here, in plain threads that
each read a request, answer it and write the reply, costs a fraction of a request through pyfuse3 and
trio's scheduler (mount.md §7), and gives what that binding cannot:

- **no OPEN, RELEASE, OPENDIR or RELEASEDIR**: OPEN and OPENDIR are answered ENOSYS once, and the
  kernel stops sending all four (``FUSE_NO_OPEN_SUPPORT``); it then opens files with ``FOPEN_KEEP_CACHE`` and
  directories with ``FOPEN_CACHE_DIR`` by itself.  Every request names its inode in its header, so a
  ``read`` without a file handle still knows its file;
- **cached directory listings and symlink targets** (``FOPEN_CACHE_DIR``, ``FUSE_CACHE_SYMLINKS``);
- **1 MiB reads** (``FUSE_MAX_PAGES``) and ``notify_store`` from any thread.

``mount`` opens the device and mounts it (``mount(2)`` as root, else ``fusermount3``, which hands the
descriptor back over a socket); ``Session.serve`` answers requests until the file system is unmounted.
The file system behind it implements ``FileSystem`` and raises ``FuseError`` for an errno reply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import math
import mmap
import os
import queue
import select
import socket
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

__all__ = ["FuseError", "FileSystem", "StatFs", "Session", "entry_bytes", "negative_entry", "mount",
           "ATTR_MODE_AT"]

log = logging.getLogger(__name__)

# opcodes (linux/fuse.h)
_LOOKUP, _FORGET, _GETATTR, _READLINK, _READ, _STATFS, _RELEASE = 1, 2, 3, 5, 15, 17, 18
_GETXATTR, _LISTXATTR, _INIT, _READDIR, _RELEASEDIR = 22, 23, 26, 28, 29  # OPEN (14), OPENDIR (27): ENOSYS
_INTERRUPT, _DESTROY, _BATCH_FORGET, _READDIRPLUS = 36, 38, 42, 44
_WRITES = frozenset({4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45, 47, 51})  # setattr, mkdir, ... (fsync: ENOSYS)
# INIT flags
_ASYNC_READ, _EXPORT_SUPPORT, _DO_READDIRPLUS = 1 << 0, 1 << 4, 1 << 13
_PARALLEL_DIROPS, _POSIX_ACL, _MAX_PAGES, _CACHE_SYMLINKS = 1 << 18, 1 << 20, 1 << 22, 1 << 23
# READDIRPLUS always, not FUSE_READDIRPLUS_AUTO (1 << 14): every listed entry comes with its attributes,
# so a walker's stat of it needs no LOOKUP (mount.md §2)
_WANTED = (_ASYNC_READ | _EXPORT_SUPPORT | _DO_READDIRPLUS | _PARALLEL_DIROPS
           | _MAX_PAGES | _CACHE_SYMLINKS)
_NOTIFY_STORE = 4

_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header
_OUT = struct.Struct("<IiQ")  # fuse_out_header
_ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (times before 1970 are negative)
_ENTRY = struct.Struct("<QQQQII")  # fuse_entry_out before its fuse_attr
_ATTR_OUT = struct.Struct("<QII")  # fuse_attr_out before its fuse_attr
_READ_IN = struct.Struct("<QQI")  # fuse_read_in: fh, offset, size
_XATTR_IN = struct.Struct("<II")  # fuse_getxattr_in
_XATTR_OUT = struct.Struct("<II")
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out (minor >= 23)
_KSTATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs
_DIRENT = struct.Struct("<QQII")
_STORE = struct.Struct("<QQII")  # fuse_notify_store_out
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")
ATTR_MODE_AT = _ENTRY.size + 60  # where st_mode sits in an entry's bytes

MAX_PAGES = 256  # 1 MiB per read request, as libfuse asks
_MAX_WRITE = 128 * 1024  # nothing is written to a read-only mount, but the kernel sizes buffers by it
_BUFSIZE = _MAX_WRITE + 4096  # >= header + fuse_write_in + max_write, as the kernel requires of a read


Piece = bytes | memoryview  # a part of a reply (os.writev takes both)
_T = TypeVar("_T")


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code


@dataclass(frozen=True)
class StatFs:
    blocks: int
    files: int
    bsize: int = 4096
    namelen: int = 255


def entry_bytes(ino: int, mode: int, nlink: int, uid: int, gid: int, size: int, rdev: int, mtime_ns: int,
                timeout: float, blksize: int = 4096) -> bytes:
    """A ``fuse_entry_out`` for an inode: its attributes and how long the kernel may keep name and
    attributes (``getattr`` answers with the same bytes)."""
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    tsec, tnsec = int(timeout), int((timeout % 1) * 1e9)
    return (_ENTRY.pack(ino, 0, tsec, tsec, tnsec, tnsec)
            + _ATTR.pack(ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, mode, nlink, uid, gid,
                         rdev & 0xFFFFFFFF, blksize, 0))


def negative_entry(timeout: float) -> bytes:
    """A lookup's answer that caches "no such name" for ``timeout`` s (inode 0)."""
    return _ENTRY.pack(0, 0, int(timeout), 0, int((timeout % 1) * 1e9), 0) + bytes(_ATTR.size)


class FileSystem(Protocol):
    """What a ``Session`` serves.  Inodes are the kernel's node ids (1 is the root).  Every method may
    raise ``FuseError``; anything else is answered EIO.  Calls come from several threads at once."""

    acl: bool  # POSIX ACLs in system.posix_acl_* xattrs are enforced by the kernel

    def init(self, session: "Session") -> None: ...
    def lookup(self, parent: int, name: bytes) -> bytes: ...  # entry_bytes() or negative_entry()
    def getattr(self, ino: int) -> bytes: ...  # entry_bytes()
    def readlink(self, ino: int) -> bytes: ...
    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, bytes]]: ...  # (name, entry), from start
    # a read's bytes come as the pieces they are held in (written to the kernel as one reply, not joined)
    def read_now(self, ino: int, off: int, size: int) -> Sequence[Piece] | None: ...  # None: it would wait
    def read(self, ino: int, off: int, size: int) -> Sequence[Piece]: ...  # on a worker: may fetch, decompress
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def listxattr(self, ino: int) -> Iterable[bytes]: ...
    def statfs(self) -> StatFs: ...


class Session:
    """One mounted FUSE connection: one thread reads and answers requests, ``threads`` more the reads
    that have to wait.

    ``busy_poll`` (seconds): after each request, the reading thread asks for the next one without
    sleeping for this long before it sleeps in ``poll(2)``.  Requests come in bursts (a walk, a start-up's
    opens and reads) whose next request follows the last reply within tens of microseconds; a reader
    that slept meanwhile has to be woken on another CPU for it, which costs more than the request
    (mount.md §2, §7).  0 turns it off (the default on a single CPU, where the spin would hold the
    CPU the requesting process needs)."""

    def __init__(self, fd: int, fs: FileSystem, threads: int = 16, busy_poll: float = 0.0) -> None:
        self.fd = fd
        self.fs = fs
        self._threads = max(1, threads)
        self._busy_poll = max(0.0, busy_poll)
        self._handed = False  # the request just read went to a worker (only the reading thread uses this)
        self._closed = False
        self.requests = 0  # every request read from the kernel (shoal status)
        self._slow: queue.SimpleQueue[tuple[int, int, int, int] | None] = queue.SimpleQueue()
        self._ops = {_LOOKUP: self._lookup, _GETATTR: self._getattr, _READLINK: self._readlink,
                     _READ: self._read, _STATFS: self._statfs, _GETXATTR: self._getxattr,
                     _LISTXATTR: self._listxattr, _READDIR: self._readdir, _READDIRPLUS: self._readdirplus,
                     _INIT: self._init, _RELEASE: self._ok, _RELEASEDIR: self._ok, _DESTROY: self._ok}

    # ------------------------------------------------------------------------------------ serving

    def serve(self) -> None:
        """Answer requests until the file system is unmounted (or ``close``).

        One thread (the caller) reads every request and answers it at once, unless it is a read the
        file system cannot answer without waiting (``read_now`` gives None): that goes to one of the
        ``threads`` workers.  One reader is what makes a request cheap: several threads reading
        /dev/fuse hand the GIL to each other on every request (mount.md §7: the small-file pass at
        about 4,500 files/s with 16 readers, 6,000-8,000 with one)."""
        workers = [threading.Thread(target=self._work, name=f"shoal-fuse-{i}", daemon=True)
                   for i in range(1, self._threads + 1)]
        for w in workers:
            w.start()
        try:
            self._loop()
        finally:
            for _ in workers:
                self._slow.put(None)
        deadline = time.monotonic() + 1.0
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if not any(w.is_alive() for w in workers):
            os.close(self.fd)  # nothing writes to it any more

    def _work(self) -> None:
        """A worker: the reads that wait for a fetch or a decompression."""
        while (job := self._slow.get()) is not None:
            unique, ino, off, size = job
            self._answer_read(unique, self.fs.read, ino, off, size)

    def _loop(self) -> None:
        buf = mmap.mmap(-1, _BUFSIZE)  # untouched pages stay unallocated: a request is usually < 1 KiB
        view = memoryview(buf)
        fd, ops, header, spin, clock = self.fd, self._ops, _IN.unpack_from, self._busy_poll, time.perf_counter
        idle = select.poll()
        idle.register(fd, select.POLLIN)
        if spin:
            os.set_blocking(fd, False)
        since = clock()
        while not self._closed:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:  # nothing yet: ask again until ``spin`` has passed, then sleep
                if clock() - since > spin:
                    idle.poll()
                    since = clock()
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: interrupted before read
                    continue
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("reading /dev/fuse: %s", exc.strerror)
                return
            if n < _IN.size:  # end of file: never from /dev/fuse, which fails with ENODEV instead
                return
            _, op, unique, ino, _, _, _, _, _ = header(buf)
            self.requests += 1  # only this thread reads requests
            handler = ops.get(op)
            if handler is not None:
                handler(unique, ino, view[_IN.size:n])
            elif op == _FORGET or op == _BATCH_FORGET:
                pass  # no reply; inode numbers are positions and never go away
            elif op == _INTERRUPT:
                self._error(unique, errno.ENOSYS)  # the kernel stops sending them
            elif op in _WRITES:
                self._error(unique, errno.EROFS)
            else:  # OPEN, OPENDIR, FLUSH, ACCESS, STATX, ...: ENOSYS, which the kernel remembers where it can
                self._error(unique, errno.ENOSYS)
            # a request handed to a worker: the next one waits for its reply, so sleep at once and leave
            # the CPU to the worker
            since = -math.inf if self._handed else clock()
            self._handed = False

    def close(self) -> None:
        """Stop answering once the current requests are done (the caller unmounts, which ends ``serve``)."""
        self._closed = True

    # ------------------------------------------------------------------------------------ replies

    def _reply(self, unique: int, *parts: Piece) -> None:
        size = _OUT.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [_OUT.pack(size, 0, unique), *parts])
        except OSError as exc:  # ENOENT: the request was interrupted; ENODEV: unmounted meanwhile
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("replying to FUSE request %d: %s", unique, exc.strerror)

    def _error(self, unique: int, code: int) -> None:
        try:
            os.write(self.fd, _OUT.pack(_OUT.size, -code, unique))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("replying to FUSE request %d: %s", unique, exc.strerror)

    def _answer(self, unique: int, fn: Callable[..., bytes | None], *args: object) -> None:
        """Reply with what ``fn(*args)`` returns (None: someone else replies), or with the errno it raises."""
        out = self._call(unique, fn, *args)
        if out is not None:
            self._reply(unique, out)

    def _answer_read(self, unique: int, fn: Callable[..., Sequence[Piece] | None], *args: object) -> None:
        """``_answer`` for a read: its bytes come in pieces, written as one reply without joining them."""
        parts = self._call(unique, fn, *args)
        if parts is not None:
            self._reply(unique, *parts)

    def _call(self, unique: int, fn: Callable[..., _T | None], *args: object) -> _T | None:
        """``fn(*args)``; or None, once the request is answered with the errno that it raised."""
        try:
            return fn(*args)
        except FuseError as exc:
            self._error(unique, exc.errno)
        except Exception:  # noqa: BLE001 - one failed request must not end the session
            log.exception("FUSE request %d failed", unique)
            self._error(unique, errno.EIO)
        return None

    def notify_store(self, ino: int, off: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache for ``ino`` at ``off`` (``FUSE_NOTIFY_STORE``).
        Raises OSError if the kernel refuses (e.g. the inode is not cached)."""
        head = _STORE.pack(ino, off, len(data), 0)
        os.writev(self.fd, [_OUT.pack(_OUT.size + len(head) + len(data), _NOTIFY_STORE, 0), head, data])

    # ------------------------------------------------------------------------------------ requests

    def _ok(self, unique: int, ino: int, arg: memoryview) -> None:
        self._reply(unique)

    def _init(self, unique: int, ino: int, arg: memoryview) -> None:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(arg)
        if major != 7:
            log.error("the kernel speaks FUSE %d.%d; this needs 7", major, minor)
            self._error(unique, errno.EPROTO)
            return
        want = _WANTED | (_POSIX_ACL if self.fs.acl else 0)
        out = _INIT_OUT.pack(7, min(minor, 38), max_readahead, flags & want, 0, 0, _MAX_WRITE, 1, MAX_PAGES, 0, 0)
        self._reply(unique, out if minor >= 23 else out[:24])
        self.fs.init(self)  # after the reply: the kernel has applied it (a read-ahead set now stays)

    def _lookup(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self.fs.lookup, ino, bytes(arg[:-1]))  # the name ends in NUL

    def _getattr(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self._attr_out, ino)

    def _attr_out(self, ino: int) -> bytes:
        entry = self.fs.getattr(ino)
        valid, = _U64.unpack_from(entry, 24)  # the entry's attr_valid and attr_valid_nsec
        nsec, = _U32.unpack_from(entry, 36)
        return _ATTR_OUT.pack(valid, nsec, 0) + entry[_ENTRY.size:]

    def _read(self, unique: int, ino: int, arg: memoryview) -> None:
        _, off, size = _READ_IN.unpack_from(arg)
        self._answer_read(unique, self._read_now, unique, ino, off, size)

    def _read_now(self, unique: int, ino: int, off: int, size: int) -> Sequence[Piece] | None:
        data = self.fs.read_now(ino, off, size)
        if data is None:  # a worker answers it
            self._slow.put((unique, ino, off, size))
            self._handed = True
        return data

    def _readlink(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self.fs.readlink, ino)

    def _statfs(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self._statfs_out)

    def _statfs_out(self) -> bytes:
        s = self.fs.statfs()
        return _KSTATFS.pack(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize, 0)

    @staticmethod
    def _sized(value: bytes, want: int) -> bytes:
        """The getxattr/listxattr convention: size 0 asks for the length only."""
        if want == 0:
            return _XATTR_OUT.pack(len(value), 0)
        if want < len(value):
            raise FuseError(errno.ERANGE)
        return value

    def _getxattr(self, unique: int, ino: int, arg: memoryview) -> None:
        want, _ = _XATTR_IN.unpack_from(arg)
        name = bytes(arg[_XATTR_IN.size:]).split(b"\0", 1)[0]
        self._answer(unique, lambda: self._sized(self.fs.getxattr(ino, name), want))

    def _listxattr(self, unique: int, ino: int, arg: memoryview) -> None:
        want, _ = _XATTR_IN.unpack_from(arg)
        self._answer(unique, lambda: self._sized(b"".join(n + b"\0" for n in self.fs.listxattr(ino)), want))

    def _readdir(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self._dir, ino, arg, False)

    def _readdirplus(self, unique: int, ino: int, arg: memoryview) -> None:
        self._answer(unique, self._dir, ino, arg, True)

    def _dir(self, ino: int, arg: memoryview, plus: bool) -> bytes:
        """As many of the directory's entries from the request's offset as fit its size; each entry's
        offset is the position after it."""
        _, start, size = _READ_IN.unpack_from(arg)
        out: list[bytes] = []
        used = 0
        for k, (name, entry) in enumerate(self.fs.readdir(ino, start), start + 1):
            rec = _DIRENT.size + len(name)
            pad = -rec % 8
            need = rec + pad + (len(entry) if plus else 0)
            if used + need > size:
                break
            child, = _U64.unpack_from(entry, 0)
            mode, = _U32.unpack_from(entry, ATTR_MODE_AT)
            if plus:
                out.append(entry)
            out.append(_DIRENT.pack(child, k, len(name), stat.S_IFMT(mode) >> 12) + name + b"\0" * pad)
            used += need
        return b"".join(out)


# ---------------------------------------------------------------------------------------------- mounting

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4


def mount(mountpoint: str, options: Iterable[str]) -> int:
    """Mount a FUSE file system at ``mountpoint`` and return the open ``/dev/fuse`` descriptor.

    ``options`` are libfuse's spellings: ``fsname=``, ``subtype=``, ``ro``, ``default_permissions``,
    ``allow_other``, ``suid``, ``dev`` (without the last two the mount is nosuid and nodev).  Raises
    OSError with the reason when the mount fails."""
    opts = set(options)
    named = dict(o.split("=", 1) for o in opts if "=" in o)
    flags = {o for o in opts if "=" not in o}
    if os.geteuid() != 0:
        return _fusermount(mountpoint, opts)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = [f"fd={fd}", f"rootmode={stat.S_IFMT(os.stat(mountpoint).st_mode):o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", *sorted(flags & {"default_permissions", "allow_other"})]
        mflags = ((_MS_RDONLY if "ro" in flags else 0) | (0 if "suid" in flags else _MS_NOSUID)
                  | (0 if "dev" in flags else _MS_NODEV))
        subtype = named.get("subtype")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        rc = libc.mount(named.get("fsname", "fuse").encode(), os.fsencode(mountpoint),
                        (f"fuse.{subtype}" if subtype else "fuse").encode(), ctypes.c_ulong(mflags),
                        ",".join(data).encode())
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), mountpoint)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fusermount(mountpoint: str, opts: set[str]) -> int:
    """As a user: ``fusermount3`` mounts and sends the device descriptor back over a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.set_inheritable(True)
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        names = sorted(o for o in opts if o not in ("suid", "dev"))  # fusermount3 forces nosuid,nodev for users
        proc = subprocess.Popen(["fusermount3", "-o", ",".join(names), "--", mountpoint], env=env,
                                pass_fds=(theirs.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        _, err = proc.communicate()
        if proc.returncode != 0 or not fds:
            for f in fds:
                os.close(f)
            msg = err.decode("utf-8", "replace").strip()
            raise OSError(errno.EIO, msg.splitlines()[-1] if msg else "fusermount3 failed", mountpoint)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()
