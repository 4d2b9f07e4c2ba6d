"""Materialize an image's tree in a directory, metadata exact: one thread writes the files, in index
order, while ``workers`` threads read, decompress and hash the frames ahead of it.

Safety (docs/spec/format.md §7): the index was validated on decode, so every
path is canonical and every parent is a directory created here.  All file
system calls are relative to a descriptor of the target, never follow a
symlink in the last component, and create with O_EXCL; the target must be
new or empty.  Nothing is ever written outside it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import shutil
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from shoal.errors import PermissionDenied, UsageError, from_oserror
from shoal.format.model import Entry, Index, Kind
from shoal.progress import NULL, Sink
from shoal.reader import Reader

__all__ = ["UnpackOptions", "UnpackRequest", "UnpackResult", "check_target", "unpack"]

log = logging.getLogger(__name__)

AHEAD = 24  # frames read and decompressed ahead of the writing thread


@dataclass(frozen=True)
class UnpackOptions:
    workers: int = field(default_factory=lambda: min(8, (os.cpu_count() or 1) * 2))
    same_owner: bool = field(default_factory=lambda: os.geteuid() == 0)
    #: keep setuid/setgid bits (as root, like GNU tar); else they are cleared (format.md §7)
    same_special: bool = field(default_factory=lambda: os.geteuid() == 0)


@dataclass(frozen=True)
class UnpackRequest:
    """Unpack the image into ``dest`` while it is pulled (``shoal pull --unpack``, pull.py)."""

    dest: str
    options: UnpackOptions = field(default_factory=UnpackOptions)


@dataclass(frozen=True)
class UnpackResult:
    entries: int
    files: int
    bytes: int
    seconds: float


class _Unpacker:
    def __init__(self, reader: Reader, rootfd: int, opts: UnpackOptions, sink: Sink) -> None:
        self.reader = reader
        self.fd = rootfd
        self.opts = opts
        self.sink = sink
        self.xattr_warned = False
        self.ids = (os.geteuid(), os.getegid())
        self.umask = _umask()
        self.mode_mask = 0o7777 if opts.same_special else 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)

    @staticmethod
    def rel(e: Entry) -> bytes:
        return e.path if e.path else b"."

    def set_xattrs(self, target: int | bytes, e: Entry) -> None:
        for k, v in e.xattrs:
            try:
                if isinstance(target, int):
                    os.setxattr(target, k, v)
                else:
                    # xattrs on a symlink: resolve through the root descriptor without following it
                    os.setxattr(f"/proc/self/fd/{self.fd}/".encode() + target, k, v, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
                if not self.xattr_warned:
                    log.warning("cannot set xattr %r on %r: %s (further failures not reported)",
                                k, e.path, exc.strerror)
                    self.xattr_warned = True

    def meta_fd(self, fd: int, e: Entry, created: int | None = None) -> None:
        """Owner, mode, xattrs (after chown, which clears security.capability), then times.  For a file
        this process just created with mode ``created``, calls that would change nothing are skipped."""
        if self.opts.same_owner and (created is None or (e.uid, e.gid) != self.ids):
            os.fchown(fd, e.uid, e.gid)
        mode = e.mode & self.mode_mask
        if created is None or mode != created or self.umask is None or created & self.umask:
            os.fchmod(fd, mode)
        self.set_xattrs(fd, e)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def create_file(self, e: Entry) -> int:
        """Create ``e`` (empty) and return a descriptor for ``fill_file``.  One thread creates every
        file: ext4 serializes inode allocation per block group, and several creating threads spin on
        that lock (after a large delete, most of the CPU time of an unpack went there)."""
        return os.open(e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       e.mode & 0o777, dir_fd=self.fd)

    def fill_file(self, fd: int, e: Entry) -> int:
        """Write ``e``'s verified bytes and metadata through ``fd``, then close it."""
        try:
            for data in self.reader.iter_file(e):
                view = data
                while view:
                    view = view[os.write(fd, view):]
            self.meta_fd(fd, e, e.mode & 0o777)  # special bits always go through fchmod, after fchown
        except OSError as exc:
            if exc.filename is None:  # calls on a descriptor: name the file
                raise OSError(exc.errno, exc.strerror, e.path) from None
            raise
        finally:
            os.close(fd)
        self.sink.advance("unpack", e.size)
        return e.size

    def write_files(self, files: list[Entry]) -> int:
        """Write the files in order on this thread; ``workers`` threads read, decompress and hash the frames
        ahead of it, in the order the files need them (``AHEAD`` frames, within the Reader's cache).

        One thread does every file system call: small files are most of an image, and handing each one
        to another thread cost more than writing it (a GIL hand-off per call: 22 futex calls per file, with
        4 filling threads); the frame work, which holds no GIL, is what runs beside it."""
        idx = self.reader.index
        cf = idx.chunk_frames
        order: list[int] = []  # frames in the order of their first use
        upto: list[int] = []  # per file: how far into ``order`` its frames go
        seen: set[int] = set()
        for e in files:
            for ci in e.chunks:
                fi = cf[ci]
                if fi not in seen:
                    seen.add(fi)
                    order.append(fi)
            upto.append(len(order))
        ahead = max(1, min(AHEAD, self.reader.cache_frames // 2))
        written = 0
        started = 0
        warming: collections.deque[Future[None]] = collections.deque()
        with ThreadPoolExecutor(max(1, self.opts.workers), thread_name_prefix="shoal-unpack") as pool:
            try:
                for e, need in zip(files, upto):
                    while started < min(len(order), need + ahead):
                        if not self.reader.ready(order[started]):  # a pull beside offered most frames
                            warming.append(pool.submit(self.warm, order[started]))
                        started += 1
                    while warming and warming[0].done():
                        warming.popleft()
                    written += self.fill_file(self.create_file(e), e)
            finally:
                for f in warming:
                    f.cancel()
        return written

    def warm(self, fi: int) -> None:
        """Frame ``fi`` read, decompressed and every chunk of it hashed, into the Reader's cache; a failure
        is left for the writing thread to meet (its read tries again and raises)."""
        with contextlib.suppress(Exception):
            for ci in self.reader.index.frame_chunks(fi):
                self.reader.chunk(ci)

    def special(self, e: Entry) -> None:
        p = e.path
        if e.kind == Kind.SYMLINK:
            os.symlink(e.target, p, dir_fd=self.fd)
        elif e.kind == Kind.FIFO:
            os.mkfifo(p, 0o600, dir_fd=self.fd)
        else:
            kind = stat.S_IFCHR if e.kind == Kind.CHAR else stat.S_IFBLK
            os.mknod(p, 0o600 | kind, os.makedev(*e.rdev), dir_fd=self.fd)
        if self.opts.same_owner:
            os.chown(p, e.uid, e.gid, dir_fd=self.fd, follow_symlinks=False)
        if e.kind != Kind.SYMLINK:
            os.chmod(p, e.mode & self.mode_mask, dir_fd=self.fd, follow_symlinks=False)
        self.set_xattrs(p, e)
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def dir_meta(self, e: Entry) -> None:
        fd = os.open(self.rel(e), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            self.meta_fd(fd, e)
        finally:
            os.close(fd)


def _umask() -> int | None:
    """This process's umask, read without changing it (Linux >= 4.7); None if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_target(dest: str) -> None:
    """UsageError unless ``dest`` is a new or an empty directory (``unpack`` checks again)."""
    try:
        if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
            raise UsageError(f"{dest} exists and is not a directory")
        if os.path.isdir(dest) and os.listdir(dest):
            raise UsageError(f"{dest} is not empty")
    except OSError as exc:
        raise from_oserror(exc, "cannot read the target", dest) from None


def _prepare(dest: str) -> bool:
    """Make sure ``dest`` is a new or empty directory; return True if we created it."""
    try:
        try:
            os.mkdir(dest, 0o700)
            return True
        except FileExistsError:
            if not os.path.isdir(dest) or os.path.islink(dest):
                raise UsageError(f"{dest} exists and is not a directory") from None
            if os.listdir(dest):
                raise UsageError(f"{dest} is not empty") from None
            return False
    except OSError as exc:
        raise from_oserror(exc, "cannot create the target", dest) from None


def unpack(index: Index, reader: Reader, dest: str, opts: UnpackOptions | None = None,
           sink: Sink = NULL) -> UnpackResult:
    opts = opts or UnpackOptions()
    t0 = time.monotonic()
    if os.geteuid() != 0 and any(e.kind in (Kind.CHAR, Kind.BLOCK) for e in index.entries):
        raise PermissionDenied("the image holds device nodes, which only root can create; run as root")
    created = _prepare(dest)
    try:
        rootfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise from_oserror(exc, "cannot open the target", dest) from None
    u = _Unpacker(reader, rootfd, opts, sink)
    files = [e for e in index.entries if e.kind == Kind.FILE]
    sink.start("unpack", sum(e.size for e in files))
    try:
        for e in index.entries[1:]:
            if e.kind == Kind.DIR:
                os.mkdir(e.path, 0o700, dir_fd=rootfd)
        written = u.write_files(files)
        for e in index.entries:
            if e.kind in (Kind.SYMLINK, Kind.CHAR, Kind.BLOCK, Kind.FIFO):
                u.special(e)
            elif e.kind == Kind.HARDLINK:
                os.link(e.target, e.path, src_dir_fd=rootfd, dst_dir_fd=rootfd, follow_symlinks=False)
        for e in reversed(index.entries):
            if e.kind == Kind.DIR:
                u.dir_meta(e)
    except BaseException as exc:
        # leave nothing behind: remove what we created, and only that
        if created:
            os.close(rootfd)
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for name in os.listdir(rootfd):
                try:
                    shutil.rmtree(name, dir_fd=rootfd)
                except NotADirectoryError:
                    os.unlink(name, dir_fd=rootfd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=rootfd)
            os.close(rootfd)
        if isinstance(exc, OSError):
            # a path relative to the target (dir_fd calls) is shown under it
            shown: object = exc.filename
            if isinstance(shown, (str, bytes)) and not os.path.isabs(shown):
                shown = os.path.join(os.fsencode(dest), os.fsencode(shown))
            raise from_oserror(exc, "unpack failed", shown) from None
        raise
    os.close(rootfd)
    sink.finish("unpack")
    return UnpackResult(len(index.entries), len(files), written, time.monotonic() - t0)
