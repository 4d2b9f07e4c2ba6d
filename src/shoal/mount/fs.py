"""A read-only FUSE file system over a ``Reader`` (docs/spec/mount.md §2), served by ``mount/kernel.py``.

A thin adapter: the index gives every attribute, the Reader gives verified bytes, and the
FrameSource behind the Reader decides where bytes come from (the local store today, HTTP range
reads for a lazy image).  Nothing here touches the network or the store.

- Inode numbers come from entry positions: entry ``i`` is inode ``i + 1`` (the root, entry 0, is
  inode 1 = FUSE_ROOT_ID).  A hardlink shows its primary's inode; ``st_nlink`` counts the group.
- The image is immutable, so attribute and entry timeouts are long and negative lookups are cached.
  There is no ``open``: the kernel opens files with ``keep_cache`` by itself (kernel.py), so the page
  cache keeps file data across opens.
- One thread answers every request whose bytes are in the Reader's memory (``read_now``), or within one
  frame whose compressed bytes the source has at once (``Reader.frame_now``: a local pack in the page
  cache, decompressed on that thread); a read that must wait for a disk or the network, or decompress
  several frames, goes to a worker thread (``read``), so it never blocks other requests.
- With a source that fetches ahead (``hooks.fetches_ahead``), a read that needs several frames
  fetches them in one parallel batch (``ensure``), and queues the frames holding the next bytes of the same file
  for a background fetch that the read does not wait for.  The window adapts per file: 4 MiB after
  a first read at offset 0 (an executable being mapped, a file read from the start), doubling up to
  8 MiB while reads stay sequential, and 256 KiB (about the next frame) after a jump.
- A small read (random access: kernel read-ahead asks for more) also hands the kernel the rest of
  that file's bytes in the frames it just decompressed (FUSE ``notify_store``), as squashfs fills the
  page cache with a whole block: later reads there never reach the daemon.  A ``PageCachePusher``
  thread does the stores, because a store waits on pages the kernel has locked for a read in flight
  and the thread that answers that read must not be the one waiting.  (Small files are no longer
  pushed at lookup: without OPEN, their READ is cheaper than the push's GIL contention, mount.md §7.)
- ``_fuse_errors`` is the one place errors become errnos (``FuseError``): a ``ShoalError`` gives its
  ``errno``, an ``IntegrityError`` gives EIO with one clear log line, anything unexpected EIO plus a traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from shoal.errors import IntegrityError, NotFound, ShoalError
from shoal.format.model import Entry, Index, Kind, parent_of
from shoal.mount.kernel import FuseError, Piece, Session, StatFs, entry_bytes, negative_entry
from shoal.mount.state import PRIVATE, Exposure
from shoal.reader import FrameSource, Reader

__all__ = ["ShoalFS", "ServeStats", "MountReader", "FUSE_OPTIONS", "Exposure", "fuse_options"]

log = logging.getLogger(__name__)

# fsname/subtype show up in /proc/self/mountinfo as "shoal" / "fuse.shoal".  libfuse mounts nosuid,nodev
# unless "suid"/"dev" are given, and only the mounting user may enter without "allow_other": an image is
# untrusted, so a mount gives none of these unless asked (docs/spec/mount.md §1, like podman's defaults).
FUSE_OPTIONS = frozenset({"fsname=shoal", "subtype=shoal", "ro", "default_permissions"})
_READ_ERRNOS = frozenset({errno.EIO, errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.EACCES, errno.ETIMEDOUT,
                          errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH})


def fuse_options(expose: Exposure = PRIVATE) -> set[str]:
    """The FUSE mount options: read-only, nosuid, nodev and private to the mounting user, unless asked."""
    return set(FUSE_OPTIONS) | set(expose.names())


_TYPE = {Kind.DIR: stat.S_IFDIR, Kind.FILE: stat.S_IFREG, Kind.SYMLINK: stat.S_IFLNK,
         Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}
_BLOCK = 4096
READAHEAD_JUMP, READAHEAD_FIRST, READAHEAD_MAX = 256 * 1024, 4 * 1024 * 1024, 8 * 1024 * 1024
_IOV_PARTS = 512  # at most this many pieces in a read's reply (IOV_MAX is 1024, with the header)
PUSH_MAX_READ = 64 * 1024  # reads up to this size trigger a page-cache push of their frames' bytes
_PAGE = 4096


class MountReader(Reader):
    """The Reader, addressed by entry position as the FUSE layer knows files."""

    def frames_for(self, pos: int, e: Entry, off: int, size: int) -> set[int]:  # type: ignore[override]
        return super().frames_for(e, off, size)


@dataclass
class ServeStats:
    """What the file system did (exposed by ``shoal status``).  Updated under ``lock``."""

    lookups: int = 0
    reads: int = 0
    bytes_served: int = 0
    inline_reads: int = 0  # answered from the Reader's frame cache, without a thread hop
    errors: int = 0
    integrity_errors: int = 0
    pushed_bytes: int = 0  # handed to the kernel page cache ahead of any read

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"lookups": self.lookups, "reads": self.reads, "bytes_served": self.bytes_served,
                    "inline_reads": self.inline_reads, "errors": self.errors,
                    "integrity_errors": self.integrity_errors, "pushed_bytes": self.pushed_bytes}


class PageCachePusher:
    """Stores file bytes the Reader already holds into the kernel page cache, from its own thread.

    ``offer`` never blocks (a full queue drops the offer: pushing is only an optimization); the thread
    reads the bytes from frames still in the Reader's cache (never fetching for a push) and hands them
    to ``store`` (the session's ``notify_store``, set once the kernel's INIT is answered).  ``close``
    must run before the file system is unmounted.
    """

    def __init__(self, reader: Reader, stats: ServeStats, depth: int = 16) -> None:
        self._reader = reader
        self._stats = stats
        self._queue: queue.Queue[tuple[int, Entry, int, int, set[int]] | None] = queue.Queue(depth)
        self._closed = False
        self.store: Callable[[int, int, bytes], None] | None = None
        self._thread = threading.Thread(target=self._run, name="shoal-push", daemon=True)
        self._thread.start()

    def offer(self, inode: int, e: Entry, start: int, end: int, frames: set[int]) -> None:
        """Push bytes ``[start, end)`` of ``e`` (inode ``inode``) if ``frames``, which hold them, are
        still in the Reader's cache when the thread gets to it."""
        if not self._closed and end > start:
            try:
                self._queue.put_nowait((inode, e, start, end, frames))
            except queue.Full:
                pass

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            inode, e, start, end, frames = item
            store = self.store
            if self._closed or store is None or not self._reader.has_frames(frames):
                continue
            try:
                data = self._reader.read(e, start, end - start)
                store(inode, start, data)
            except Exception as exc:  # noqa: BLE001 - an optimization that failed: the read path still works
                log.debug("page-cache push of inode %d [%d, %d) failed: %s", inode, start, end, exc)
                continue
            with self._stats.lock:
                self._stats.pushed_bytes += len(data)

    def close(self, timeout: float = 2.0) -> None:
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)


_F = TypeVar("_F", bound=Callable[..., Any])


def _fuse_errors(fn: _F) -> _F:
    """Map every failure of an operation to a FuseError (the only place that does so)."""

    @functools.wraps(fn)
    def wrapper(self: "ShoalFS", *args: Any) -> Any:
        try:
            return fn(self, *args)
        except FuseError:
            raise
        except Exception as exc:
            raise self._to_fuse(exc, fn.__name__, args[0] if args else None) from None

    return wrapper  # type: ignore[return-value]


class ShoalFS:
    """The image as a ``kernel.FileSystem``."""

    acl = True  # POSIX ACLs stored as system.posix_acl_* xattrs are enforced by the kernel

    def __init__(self, reader: MountReader, timeout: float = 24 * 3600.0, stats: ServeStats | None = None,
                 hooks: FrameSource | None = None, push: bool = True,
                 listed: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.reader = reader
        self._listed = listed  # told each directory's position when it is first listed (shoal profile)
        ahead = hooks if hooks is not None and hooks.fetches_ahead else None  # plan ensure/readahead for it
        self._ensure: Callable[[list[int]], None] | None = ahead.ensure if ahead else None
        self._readahead: Callable[[list[int]], None] | None = ahead.readahead if ahead else None
        self._window: dict[int, tuple[int, int]] = {}  # entry -> (where a sequential read continues, window)
        self.index: Index = reader.index
        self.timeout = timeout
        self.stats = stats or ServeStats()
        self.pusher = PageCachePusher(reader, self.stats) if push else None
        self.initialized = threading.Event()  # set once the kernel's INIT request is answered
        # The tree is learnt as the kernel walks it, one directory at a time: a lazily decoded index
        # verifies a directory's entries when the first of them is used (format.md §6.2).
        self._kids: dict[int, list[tuple[bytes, int]]] = {}  # directory -> its children (name, position)
        self._by_name: dict[int, dict[bytes, int]] = {}
        self._subdirs: dict[int, int] = {}  # directory -> how many of its children are directories
        self._node: dict[int, int] = {}  # position -> position whose attributes it shows (hardlink -> primary)
        self._attrs: dict[int, bytes] = {}  # position -> its fuse_entry_out
        self._xattrs: bool | None = None  # whether the image has any extended attribute (first getxattr)
        self._negative = negative_entry(timeout)

    def init(self, session: Session) -> None:
        """Called once the kernel has the reply to its INIT request (its settings are final)."""
        if self.pusher is not None:
            self.pusher.store = session.notify_store
        self.initialized.set()

    def close(self) -> None:
        """Stop background work; call before unmounting."""
        if self.pusher is not None:
            self.pusher.close()

    # ------------------------------------------------------------------------------------ errors

    def _describe(self, arg: object) -> str:
        if isinstance(arg, int) and 1 <= arg <= len(self.index.entries):
            p = self.index.shape().paths[arg - 1]  # as stated: an error message must not verify anything
            return "/" + p.decode("utf-8", "backslashreplace")
        return repr(arg)

    def _to_fuse(self, exc: Exception, op: str, arg: object) -> FuseError:
        with self.stats.lock:
            self.stats.errors += 1
            if isinstance(exc, IntegrityError):
                self.stats.integrity_errors += 1
        if isinstance(exc, IntegrityError):
            log.error("integrity failure (digest mismatch) in %s of %s: %s; returning EIO", op,
                      self._describe(arg), exc)
            return FuseError(errno.EIO)
        if isinstance(exc, ShoalError) or (isinstance(exc, OSError) and exc.errno):
            code = exc.errno if isinstance(exc, ShoalError) else exc.errno or errno.EIO
            if op == "read" and code not in _READ_ERRNOS:
                code = errno.EIO  # e.g. a missing pack blob: read(2) never fails with ENOENT
            log.warning("%s of %s failed: %s; returning %s", op, self._describe(arg), exc, errno.errorcode.get(code))
            return FuseError(code)
        log.error("internal error in %s of %s", op, self._describe(arg), exc_info=exc)
        return FuseError(errno.EIO)

    # ------------------------------------------------------------------------------------ helpers

    def _pos(self, inode: int) -> int:
        if not 1 <= inode <= len(self.index.entries):
            raise NotFound(f"no inode {inode}")
        pos = inode - 1
        node = self._node.get(pos)
        if node is None:
            node = self._node[pos] = self.index.primary(pos)
        return node

    def _entry(self, inode: int) -> Entry:
        return self.index.entries[self._pos(inode)]

    def _children(self, pos: int) -> list[tuple[bytes, int]] | None:
        """The children (name, position) of the directory at ``pos``; None if it is not a directory."""
        kids = self._kids.get(pos)
        if kids is None:
            if self.index.entries[pos].kind != Kind.DIR:
                return None
            named = self.index.names_and_kinds(pos)  # not each subdirectory's own check: only what pos binds
            if self._listed is not None:
                self._listed(pos)
            self._subdirs[pos] = sum(1 for _, kind, _ in named if kind == Kind.DIR)
            kids = [(name, k) for name, _, k in named]
            self._by_name[pos] = dict(kids)
            self._kids[pos] = kids
        return kids

    def _nlink(self, pos: int, e: Entry) -> int:
        if e.kind == Kind.DIR:
            self._children(pos)
            return 2 + self._subdirs.get(pos, 0)
        if e.kind == Kind.FILE:
            return 1 + sum(1 for h in self.index.hardlinks_to(e.path) if self.index.primary(h) == pos)
        return 1

    def _attr(self, pos: int) -> bytes:
        """The entry (inode, attributes, timeouts) the kernel gets for position ``pos``."""
        a = self._attrs.get(pos)
        if a is not None:
            return a
        e = self.index.entries[pos]
        if e.kind == Kind.FILE:
            size = e.size
        elif e.kind == Kind.SYMLINK:
            size = len(e.target)
        elif e.kind == Kind.DIR:
            size = _BLOCK
        else:
            size = 0
        rdev = os.makedev(*e.rdev) if e.kind in (Kind.CHAR, Kind.BLOCK) else 0
        a = self._attrs[pos] = entry_bytes(pos + 1, _TYPE[e.kind] | e.mode, self._nlink(pos, e), e.uid, e.gid,
                                           size, rdev, e.mtime_ns, self.timeout, _BLOCK)
        return a

    # ------------------------------------------------------------------------------------ operations

    @_fuse_errors
    def lookup(self, parent_inode: int, name: bytes) -> bytes:
        p = self._pos(parent_inode)
        with self.stats.lock:
            self.stats.lookups += 1
        if name == b".":
            return self._attr(p)
        if name == b"..":
            return self._attr(self.index.position(parent_of(self.index.entries[p].path)) or 0)
        if self._children(p) is None:
            raise FuseError(errno.ENOTDIR)
        child = self._by_name[p].get(name)
        if child is None:
            return self._negative  # cached by the kernel for entry_timeout
        return self._attr(self._pos(child + 1))

    @_fuse_errors
    def getattr(self, inode: int) -> bytes:
        return self._attr(self._pos(inode))

    @_fuse_errors
    def readlink(self, inode: int) -> bytes:
        e = self._entry(inode)
        if e.kind != Kind.SYMLINK:
            raise FuseError(errno.EINVAL)
        return e.target

    @_fuse_errors
    def readdir(self, inode: int, start: int) -> Iterator[tuple[bytes, bytes]]:
        kids = self._children(self._pos(inode))
        if kids is None:
            raise FuseError(errno.ENOTDIR)
        # lazily: the kernel takes only what fits its buffer (~25 entries of 4 KiB), then asks again; indexed
        # from ``start`` (islice would step over the first ``start`` entries on every request)
        return ((kids[i][0], self._attr(self._pos(kids[i][1] + 1))) for i in range(start, len(kids)))

    def _file(self, inode: int) -> tuple[int, Entry]:
        pos = self._pos(inode)
        e = self.index.entries[pos]
        if e.kind != Kind.FILE:
            raise FuseError(errno.EISDIR if e.kind == Kind.DIR else errno.EINVAL)
        return pos, e

    @_fuse_errors
    def read_now(self, inode: int, off: int, size: int) -> list[Piece] | None:
        """The bytes if every frame they are in is in the Reader's memory, or if they lie in one frame the
        source has without waiting (``frame_now``); else None (``read`` then runs on a worker thread)."""
        pos, e = self._file(inode)
        frames = self.reader.frames_for(pos, e, off, size)
        if not self.reader.has_frames(frames) and (len(frames) != 1 or self.reader.frame_now(min(frames)) is None):
            return None
        data = self._pieces(e, off, size)
        last = self._window.get(pos)
        if last is not None and off == last[0]:  # still sequential: the next fetching read grows the window
            self._window[pos] = (off + size, last[1])
        self._served(pos, e, off, size, frames, sum(len(p) for p in data), True)
        return data

    @_fuse_errors
    def read(self, inode: int, off: int, size: int) -> list[Piece]:
        """A read that may fetch: read-ahead queued first (never waited for), the read's own frames
        fetched as one batch, then the bytes from the Reader."""
        pos, e = self._file(inode)
        frames = self.reader.frames_for(pos, e, off, size)
        if self._readahead is not None and off + size < e.size:
            ahead = self.reader.frames_for(pos, e, off + size, self._ahead(pos, off, size)) - frames
            if ahead:
                self._readahead(sorted(ahead))
        if self._ensure is not None and len(frames) > 1:
            self._ensure(sorted(frames))
        data = self._pieces(e, off, size)
        self._served(pos, e, off, size, frames, sum(len(p) for p in data), False)
        return data

    def _pieces(self, e: Entry, off: int, size: int) -> list[Piece]:
        """A read's bytes as views of the Reader's chunks, which the reply hands to the kernel as they are
        (one copy fewer of every byte read); joined when they are more than one ``writev`` takes."""
        parts: list[Piece] = list(self.reader.read_parts(e, off, size))
        return parts if len(parts) <= _IOV_PARTS else [b"".join(parts)]

    def _served(self, pos: int, e: Entry, off: int, size: int, frames: set[int], n: int, inline: bool) -> None:
        with self.stats.lock:
            self.stats.reads += 1
            self.stats.bytes_served += n
            self.stats.inline_reads += inline
        # not for a read wholly from chunks the source holds (a profile bundle): the bundle was recorded
        # without pushes, and pushed pages change the kernel's read-ahead, which then asks for pages the
        # profile never saw read (git --version fetched two frames, 0.65 MB, for them: bundle.md §6)
        if self.pusher is not None and frames and size <= PUSH_MAX_READ and size < e.size:
            self._push_around(pos, e, off, size, frames)

    def _push_around(self, pos: int, e: Entry, off: int, size: int, frames: set[int]) -> None:
        """Offer the whole pages of ``e`` that the read's frames hold, on both sides of the read."""
        lo, hi = self.reader.span_in_frames(e, off, size, frames)
        lo = -(-lo // _PAGE) * _PAGE
        hi = hi if hi >= e.size else hi // _PAGE * _PAGE
        assert self.pusher is not None
        self.pusher.offer(pos + 1, e, lo, off // _PAGE * _PAGE, frames)
        self.pusher.offer(pos + 1, e, -(-(off + size) // _PAGE) * _PAGE, hi, frames)

    def _ahead(self, pos: int, off: int, size: int) -> int:
        """How many bytes past this read of entry ``pos`` to fetch in the background."""
        last = self._window.get(pos)
        if last is None:
            window = READAHEAD_FIRST if off == 0 else READAHEAD_JUMP
        elif off == last[0]:
            window = min(READAHEAD_MAX, 2 * last[1])
        else:
            window = READAHEAD_JUMP
        self._window[pos] = (off + size, window)
        return window

    @_fuse_errors
    def listxattr(self, inode: int) -> Sequence[bytes]:
        return [k for k, _ in self._entry(inode).xattrs]

    @_fuse_errors
    def getxattr(self, inode: int, name: bytes) -> bytes:
        if self._xattrs is None:
            self._xattrs = self.index.has_xattrs()
        if not self._xattrs:
            # an image without any: the kernel answers every getxattr of this mount itself from now on
            # (EOPNOTSUPP), where each was a round trip here (mount.md §2)
            raise FuseError(errno.ENOSYS)
        for k, v in self._entry(inode).xattrs:
            if k == name:
                return v
        raise FuseError(errno.ENODATA)

    @_fuse_errors
    def statfs(self) -> StatFs:
        # the image's data, each chunk once, and its entries: both known before a lazy index's entries are
        # decoded, so an overlay's mount(2) does not wait for that (format.md §6.2, mount.md §2)
        return StatFs(blocks=(self.index.data_bytes + _BLOCK - 1) // _BLOCK, files=len(self.index.entries),
                      bsize=_BLOCK)
