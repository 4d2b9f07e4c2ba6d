"""Serve a mounted image: the FUSE session, the writable overlay, prefetch and the frame source's
lifetime (docs/spec/mount.md §2, §3).  ``serve`` runs in the foreground or in the daemon that
``mount/daemon.py`` forks.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from shoal.errors import PermissionDenied, ShoalError, StoreError, UsageError
from shoal.format.model import Index
from shoal.mount import state as ms
from shoal.mount.control import quiet_umount
from shoal.mount.image import CountingSource, OpenedImage
from shoal.mount.kernel import Session, mount
from shoal.mount.state import MountOptions

__all__ = ["PREFETCH_MODES", "Notify", "check_target", "serve"]

log = logging.getLogger(__name__)

PREFETCH_MODES = ("auto", "none", "all")
# --prefetch all: the frames beyond the profile are fetched once the file system has been idle this long,
# so that they never compete with the workload's own start-up reads (bench/estargz.py shoal-all: started
# at once, they took print(1) from 0.65 s to 0.86 s on loopback, 12.8 MB fetched by its output)
QUIET_BEFORE_REST = 1.0
# the counters in the mount's state (shoal status) are published every STATS_EVERY s while they change; the
# first time (STATS_EVERY after the mount went live) with what a lazy source counts from the catalogue
STATS_EVERY = 1.0
Notify = Callable[[BaseException | None], None]


def check_target(mountpoint: str, opts: MountOptions) -> str:
    """The canonical mount point, checked: a directory, not a live mount, root for --writable."""
    if opts.prefetch not in PREFETCH_MODES:
        raise UsageError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}")
    mp = ms.canonical_mountpoint(mountpoint)
    if opts.writable and os.geteuid() != 0:
        raise PermissionDenied("--writable mounts an overlay file system, which needs root")
    old = ms.load_state(ms.paths_for(mp).state)
    if old is not None:
        if ms.pid_alive(old.pid, old.start_time):
            raise UsageError(f"{mp} is already a shoal mount of {old.name} (pid {old.pid})")
        if ms.is_mounted(mp) or (old.writable and ms.is_mounted(old.lower)):
            raise UsageError(f"{mp} holds a dead shoal mount; run: shoal umount {mp}")
        ms.remove_state(old)
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mp} is not a directory")
    return mp


# ---------------------------------------------------------------------------------------------- serve


def _prepare_writable(image: OpenedImage, paths: ms.MountPaths, mp: str) -> None:
    if paths.data.exists():  # left by a daemon that died: never resurrect its writes
        if any(m == str(paths.data) or m.startswith(str(paths.data) + "/") for m in ms.mounts()):
            raise UsageError(f"{paths.data} still has mounts; run: shoal umount {mp}")
        import shutil

        shutil.rmtree(paths.data)
    paths.data.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(paths.data, 0o700)
    for d in (paths.lower, paths.upper, paths.work):
        d.mkdir(exist_ok=True)
    # the overlay's root directory shows the upper root's attributes: make them the image root's
    root = image.index.entries[0]
    os.chown(paths.upper, root.uid, root.gid)
    os.chmod(paths.upper, root.mode)
    os.utime(paths.upper, ns=(root.mtime_ns, root.mtime_ns))
    os.chmod(paths.work, 0o700)


class _Server:
    """State shared by the threads of one mount."""

    def __init__(self, image: OpenedImage, mp: str, opts: MountOptions, paths: ms.MountPaths,
                 st: ms.MountState, notify: Notify | None) -> None:
        from shoal.mount.fs import MountReader, ServeStats, ShoalFS

        self.image, self.mp, self.opts, self.paths, self.st, self.notify = image, mp, opts, paths, st, notify
        self.recorder: Any = None
        self.reads: Any = None
        inner = image.source
        if opts.record_to:
            from shoal.mount.profile import RecordingSource

            inner = self.recorder = RecordingSource(image.source, image.index)
        self.source = CountingSource(inner)
        self.stats = ServeStats()
        self.reader: MountReader
        if opts.record_to:  # the chunks, files and directories the workload uses, for its bundle
            from shoal.mount.bundlerec import ReadRecord, RecordingReader

            self.reads = ReadRecord()
            self.reader = RecordingReader(image.index, self.source, opts.cache_frames, self.reads)
            # no page-cache push: the kernel then asks for every page the workload needs, and nothing else
            self.fs = ShoalFS(self.reader, stats=self.stats, hooks=image.source, push=False, listed=self.reads.dir)
        else:
            self.reader = MountReader(image.index, self.source, opts.cache_frames)
            # the source's ensure/readahead hooks (a lazy source) go around the recorder: never recorded
            self.fs = ShoalFS(self.reader, stats=self.stats, hooks=image.source)
        self.overlay = False
        self.prefetched = 0
        self.prefetch_state = "none"  # none, pending, profile, rest, done, failed, stopped
        self.prefetch_planned = 0
        self.stop = threading.Event()  # the prefetch stops
        self.done = threading.Event()  # the mount ends: unmounted, or a signal
        self.session: Session | None = None
        self._frame_of: dict[tuple[str, int], int] | None = None
        self._per_frame: collections.Counter[int] | None = None

    # counters -------------------------------------------------------------------------------

    def _chunks_cached(self) -> int:
        idx: Index = self.image.index
        cached = self.image.source.cached_chunks()
        if cached is not None:
            return cached
        if self.image.local:
            return len(idx.chunk_ids)
        if self._frame_of is None or self._per_frame is None:
            self._frame_of = {("sha256:" + idx.packs[f.pack].hex(), f.offset): i for i, f in enumerate(idx.frames)}
            self._per_frame = collections.Counter(idx.chunk_frames)
        return sum(self._per_frame[self._frame_of[k]] for k in self.source.fetched_frames() if k in self._frame_of)

    def _source_stats(self) -> dict[str, int | float]:
        """The frame source's own counters (e.g. a lazy source's network bytes), if it keeps a dataclass."""
        st = self.image.source.stats
        if st is None or not dataclasses.is_dataclass(st):
            return {}
        vals = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
        return {k: v for k, v in vals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def counters(self, *, scan: bool = True) -> dict[str, Any]:
        """The mount's counters.  ``scan=False`` leaves out ``chunks_cached`` and ``source``, which a lazy
        source counts from the store's catalogue on first use (4–19 ms for bookworm + python3 + git): the
        state written as the mount goes live is on the path of whoever waits for it (mount.md §5.3)."""
        out = {**self.stats.as_dict(), **self.source.snapshot(), "prefetched_frames": self.prefetched,
               "prefetch_state": self.prefetch_state, "prefetch_planned": self.prefetch_planned,
               "profile_frames": len(self.image.prefetch), "bundle_state": self.image.source.bundle_state,
               "chunks_total": len(self.image.index.chunk_ids),
               "fuse_requests": self.session.requests if self.session is not None else 0}
        if scan:
            out |= {"chunks_cached": self._chunks_cached(), "source": self._source_stats()}
        return out

    def save(self, counters: dict[str, Any] | None = None) -> None:
        self.st.stats = counters if counters is not None else self.counters()
        self.st.updated_at = time.time()
        ms.save_state(self.paths.state, self.st)

    # tasks ----------------------------------------------------------------------------------

    def run(self, session: Session) -> None:
        """Serve until the file system is unmounted or a signal comes (this must be the main thread)."""
        self.session = session
        fuse = threading.Thread(target=self._answer, args=(session,), name="shoal-fuse-0", daemon=True)
        fuse.start()
        phases = self._prefetch_phases()
        if phases:  # at once: the network works while the overlay is mounted and the caller starts up
            self.prefetch_state = "pending"
            self.prefetch_planned = sum(len(p) for _, p in phases)
            threading.Thread(target=self._prefetch, args=(phases,), name="shoal-prefetch", daemon=True).start()
        # the kernel has the INIT reply: its settings are final
        deadline = time.monotonic() + self.opts.ready_timeout
        while not self.fs.initialized.wait(0.05) and not self.done.is_set() and time.monotonic() < deadline:
            pass
        if self.done.is_set():
            return
        # a local image's sequential reads in 1 MiB requests instead of 128 KiB: after INIT, which caps
        # the window at the kernel's default (root only; a lazy source has its own window; mount.md §2)
        if self.opts.readahead_kib and self.image.local and not ms.set_readahead(self.st.lower,
                                                                                 self.opts.readahead_kib):
            log.info("kept the kernel's default read-ahead for %s", self.st.lower)
        if self.opts.writable:
            ms.mount_overlay(str(self.paths.lower), str(self.paths.upper), str(self.paths.work), self.mp,
                             self.opts.expose)
            self.overlay = True
        log.debug("timeline: overlay mounted at %s", self.mp)
        self.st.ready = True
        self.save(self.counters(scan=False))  # the full counters follow within STATS_EVERY
        log.info("serving %s (%s) at %s%s", self.image.name, self.image.digest, self.mp,
                 " (writable overlay)" if self.opts.writable else "")
        if self.notify is not None:
            self.notify(None)
        self.image.source.serving()
        try:  # the index's entries, decoded now that the caller has its mount (format.md §6.2)
            self.image.index.prepare()
        except ShoalError as exc:  # every request that needs them fails with EIO, and the log says why
            log.error("the index of %s is bad: %s", self.image.digest, exc)
        last: dict[str, Any] = {}
        while not self.done.wait(STATS_EVERY):
            # the first count of a lazy source reads the catalogue (4-19 ms): this thread answers no request
            now = self.counters()
            if now != last:
                self.save(now)
                last = now

    def _answer(self, session: Session) -> None:
        try:
            session.serve()
            log.info("file system at %s was unmounted", self.st.lower)
        except Exception:  # noqa: BLE001 - logged; the mount ends
            log.exception("serving the file system at %s failed", self.st.lower)
        finally:
            self.done.set()

    def on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: unmounting %s", signum, self.mp)
        self.done.set()

    def _prefetch_phases(self) -> list[tuple[str, list[int]]]:
        """auto: the recorded profile; all: the profile, then every other frame in pack order."""
        idx = self.image.index
        if self.opts.prefetch == "none":
            return []
        profile = list(dict.fromkeys(i for i in self.image.prefetch if 0 <= i < len(idx.frames)))
        if self.opts.prefetch == "auto":
            return [("profile", profile)] if profile else []
        seen = set(profile)
        rest = sorted((i for i in range(len(idx.frames)) if i not in seen),
                      key=lambda i: (idx.frames[i].pack, idx.frames[i].offset))
        return [(label, p) for label, p in (("profile", profile), ("rest", rest)) if p]

    def _prefetch(self, phases: list[tuple[str, list[int]]]) -> None:
        try:
            self._prefetch_sync(phases)
        finally:
            self.stop.set()

    def _prefetch_sync(self, phases: list[tuple[str, list[int]]]) -> None:
        for label, frames in phases:
            if self.stop.is_set():
                self.prefetch_state = "stopped"
                return
            if label == "rest":
                self.prefetch_state = "waiting"
                if not self._quiet(QUIET_BEFORE_REST):
                    self.prefetch_state = "stopped"
                    return
            self.prefetch_state = label
            if not self._prefetch_phase(frames):
                return
        self.prefetch_state = "done"

    def _quiet(self, seconds: float) -> bool:
        """Wait until the file system has answered no lookup and no read for ``seconds`` (the workload's
        start-up is over); False if the mount stops first."""
        def activity() -> tuple[int, int]:
            return self.stats.lookups, self.stats.reads

        last, since = activity(), time.monotonic()
        while not self.stop.wait(0.1):
            now = activity()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return True
        return False

    def _prefetch_phase(self, frames: list[int]) -> bool:
        """Fetch ``frames``: in one call to the source's bulk ``prefetch`` (it merges ranges and runs
        requests in parallel), else frame by frame.  Prefetch never takes the mount down."""
        idx = self.image.index
        t0 = time.monotonic()
        try:
            bulk = self.image.source.prefetch(frames)
            if bulk is not None:
                n = bulk
                self.prefetched += len(frames)
            else:
                n = 0
                for fi in frames:
                    if self.stop.is_set():
                        self.prefetch_state = "stopped"
                        return False
                    f = idx.frames[fi]
                    n += len(self.source.fetch("sha256:" + idx.packs[f.pack].hex(), f.offset, f.clen))
                    self.prefetched += 1
        except Exception as exc:
            log.warning("prefetch stopped: %s", exc)
            self.prefetch_state = "failed"
            return False
        log.info("prefetched %d %s frames (%d bytes) in %.2fs", len(frames), self.prefetch_state, n,
                 time.monotonic() - t0)
        return True


def serve(image: OpenedImage, mountpoint: str, opts: MountOptions = MountOptions(),
          notify: Notify | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` in this process and serve until unmounted or signalled (from
    the main thread: it takes SIGTERM, SIGINT and SIGHUP while it serves)."""
    from shoal.mount.fs import fuse_options

    mp = check_target(mountpoint, opts)
    paths = ms.paths_for(mp)
    pid = os.getpid()
    st = ms.MountState(mountpoint=mp, ref=image.ref, name=image.name, digest=image.digest, pid=pid,
                       start_time=ms.proc_start_time(pid), writable=opts.writable,
                       lower=str(paths.lower) if opts.writable else mp,
                       upper=str(paths.upper) if opts.writable else "", work=str(paths.work) if opts.writable else "",
                       log=str(paths.log), prefetch=opts.prefetch, started_at=time.time(),
                       cleanup=list(opts.cleanup), options=opts.expose.names())
    server = _Server(image, mp, opts, paths, st, notify)
    log.debug("timeline: daemon serving %s", mp)
    if opts.writable:
        _prepare_writable(image, paths, mp)
    ms.save_state(paths.state, st)
    session: Session | None = None
    ok = False
    try:
        try:
            fd = mount(st.lower, fuse_options(ms.PRIVATE if opts.writable else opts.expose))
        except OSError as exc:
            raise StoreError(f"cannot mount FUSE at {st.lower}: {exc.strerror}") from None
        session = Session(fd, server.fs, threads=opts.fuse_threads, busy_poll=opts.busy_poll_us / 1e6)
        log.debug("timeline: FUSE mounted at %s", st.lower)
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        before = {sig: signal.signal(sig, server.on_signal) for sig in signals}
        try:
            server.run(session)
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        ok = True
    finally:
        server.stop.set()
        _finish_source(server, opts)
        if server.overlay:
            quiet_umount(mp, lazy=True)
        server.fs.close()  # its page-cache pushes stop before the FUSE session goes away
        if session is not None:
            session.close()
            quiet_umount(st.lower, lazy=True, fuse=True)
        mine = ms.load_state(paths.state)
        if mine is None or mine.pid == pid:
            ms.remove_state(st, keep_log=not ok)  # a failed daemon's log stays for a post-mortem
        log.info("stopped serving %s", mp)


def _finish_source(server: _Server, opts: MountOptions) -> None:
    """Hand over the recording (shoal profile) and stop the source's background work."""
    if opts.record_to and server.recorder is not None:
        from shoal.mount.profile import write_recording

        try:
            write_recording(opts.record_to, server.reads.recording(server.recorder.frames()))
        except OSError as exc:
            log.error("cannot write the recording to %s: %s", opts.record_to, exc.strerror)
    try:
        server.image.source.close()
    except Exception as exc:  # the mount is going away anyway
        log.warning("closing the frame source: %s", exc)
