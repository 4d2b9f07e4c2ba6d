"""Mount an image with FUSE (optionally under a writable overlay), serve it, and unmount it.

``mount`` resolves the reference in the calling process (so a bad reference is an ordinary
one-line error), then either serves in the foreground or forks a daemon.  The daemon detaches
(setsid, double fork, stdio to /dev/null and its log), mounts, and writes one JSON line to a pipe
once the mount is live (or why it failed); the caller returns then.  The daemon exits when its
file system is unmounted (``shoal umount``, ``umount``, ``fusermount3 -u``) or on SIGTERM/SIGINT,
and removes its state on the way out.  See docs/spec/mount.md §3.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from shoal import errors as shoal_errors
from shoal.errors import NotFound, PermissionDenied, ShoalError, StoreError, UsageError
from shoal.format.model import Index
from shoal.mount import state as ms
from shoal.mount.image import CountingSource, OpenedImage, OpenOptions, StorePath, open_image
from shoal.mount.state import MountOptions

__all__ = ["MountOptions", "MountStatus", "mount", "start", "serve", "umount", "status"]

log = logging.getLogger(__name__)

PREFETCH_MODES = ("auto", "none", "all")
Notify = Callable[[BaseException | None], None]


@dataclass(frozen=True)
class MountStatus:
    state: ms.MountState
    alive: bool
    mounted: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.state.to_json(), "alive": self.alive, "mounted": self.mounted}


# ---------------------------------------------------------------------------------------------- mount


def mount(ref: str, mountpoint: str, opts: MountOptions = MountOptions(), store_root: StorePath = None,
          notify: Notify | None = None, open_opts: OpenOptions | None = None) -> ms.MountState | None:
    """Mount image ``ref`` at ``mountpoint``.  Background: returns the live mount's state.
    Foreground: serves until unmounted, calls ``notify(None)`` once live, and returns None."""
    _check_target(mountpoint, opts)  # before any network traffic
    image = open_image(ref, store_root, open_opts)
    if opts.foreground:
        serve(image, mountpoint, opts, notify)
        return None
    st = start(image, mountpoint, opts)
    image.source.handover_wait()  # return once the daemon holds what was fetched ahead for it
    return st


def _check_target(mountpoint: str, opts: MountOptions) -> str:
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


def start(image: OpenedImage, mountpoint: str, opts: MountOptions = MountOptions()) -> ms.MountState:
    """Fork a daemon serving ``image`` at ``mountpoint``; return once the mount is live."""
    mp = _check_target(mountpoint, opts)
    paths = ms.paths_for(mp)
    paths.state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # a source holding sqlite handles or threads closes them now (FrameSource contract, mount.md §1)
    image.source.before_fork()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            code = _daemon_child(image, mp, opts, w)
        finally:
            os._exit(code)
    os.close(w)
    image.source.after_fork_parent()  # e.g. hand frames that are still being fetched to the daemon
    os.waitpid(pid, 0)
    try:
        reply = _read_reply(r, opts.ready_timeout)
    finally:
        os.close(r)
    if reply is None:
        _abandon(mp)
        raise ShoalError(f"mount daemon did not report within {opts.ready_timeout:.0f}s; log: {paths.log}")
    if not reply:
        raise ShoalError(f"mount daemon exited during start-up: {_last_log_line(paths.log)} (log: {paths.log})")
    if not reply.get("ok"):
        cls = getattr(shoal_errors, str(reply.get("error", "")), ShoalError)
        if not (isinstance(cls, type) and issubclass(cls, ShoalError)):
            cls = ShoalError
        raise cls(str(reply.get("message", "mount failed")))
    st = ms.load_state(paths.state)
    if st is None:
        raise ShoalError(f"mount daemon reported success but left no state; log: {paths.log}")
    return st


def _read_reply(fd: int, timeout: float) -> dict[str, Any] | None:
    """The daemon's JSON line; {} if it closed the pipe without one; None on timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    line = buf.split(b"\n", 1)[0]
    if not line:
        return {}
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _last_log_line(path: os.PathLike[str] | str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no log output"


def _abandon(mp: str) -> None:
    """A daemon that never reported: kill it and undo its mounts."""
    st = ms.load_state(ms.paths_for(mp).state)
    if st is None:
        return
    if ms.pid_alive(st.pid, st.start_time):
        os.kill(st.pid, signal.SIGKILL)
    _force_unmount(st)
    ms.remove_state(st)


def _setup_daemon_logging() -> None:
    root = logging.getLogger()
    fmt = logging.Formatter("%(asctime)s shoal[%(process)d] %(levelname)s %(name)s: %(message)s")
    for h in root.handlers:
        h.setFormatter(fmt)
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    logging.getLogger("shoal").setLevel(min(logging.getLogger("shoal").getEffectiveLevel(), logging.INFO))


def _daemon_child(image: OpenedImage, mp: str, opts: MountOptions, wfd: int) -> int:  # pragma: no cover
    """The daemon process: detach stdio, serve, report readiness on ``wfd``.  Returns the exit code."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    logfd = os.open(ms.paths_for(mp).log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(logfd, 2)
    os.close(logfd)
    os.close(devnull)
    os.chdir("/")
    os.umask(0o022)
    _setup_daemon_logging()
    from shoal.mount.proctitle import scrub_argv

    scrub_argv()  # the CLI did so when it read --creds; a daemon lives long: never show a secret in ps
    # a source holding connections or threads re-creates them here (FrameSource contract, mount.md §5)
    image.source.after_fork()
    sent = False

    def notify(exc: BaseException | None) -> None:
        nonlocal sent
        if sent:
            return
        sent = True
        if exc is None:
            doc: dict[str, Any] = {"ok": True}
        else:
            doc = {"ok": False, "error": type(exc).__name__ if isinstance(exc, ShoalError) else "ShoalError",
                   "message": str(exc) if isinstance(exc, ShoalError) else f"internal error: {exc!r}"}
        try:
            os.write(wfd, json.dumps(doc).encode() + b"\n")
            os.close(wfd)
        except OSError:
            pass

    try:
        serve(image, mp, opts, notify)
        return 0
    except ShoalError as exc:
        log.error("%s", exc)
        notify(exc)
        return exc.exit_code
    except BaseException as exc:
        log.error("mount daemon failed", exc_info=exc)
        notify(exc)
        return 70


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
    """State shared by the trio tasks of one mount."""

    def __init__(self, image: OpenedImage, mp: str, opts: MountOptions, paths: ms.MountPaths,
                 st: ms.MountState, notify: Notify | None) -> None:
        from shoal.mount.fs import MountReader, ServeStats, ShoalFS

        self.image, self.mp, self.opts, self.paths, self.st, self.notify = image, mp, opts, paths, st, notify
        self.recorder: Any = None
        inner = image.source
        if opts.record_to:
            from shoal.mount.profile import RecordingSource

            inner = self.recorder = RecordingSource(image.source, image.index)
        self.source = CountingSource(inner)
        self.reader = MountReader(image.index, self.source, opts.cache_frames)
        self.stats = ServeStats()
        # the source's ensure/readahead hooks (a lazy source) go around the recorder: never recorded
        self.fs = ShoalFS(self.reader, stats=self.stats, hooks=image.source)
        self.overlay = False
        self.prefetched = 0
        self.prefetch_state = "none"  # none, pending, profile, rest, done, failed, stopped
        self.prefetch_planned = 0
        self.stop = threading.Event()
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

    def counters(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), **self.source.snapshot(), "prefetched_frames": self.prefetched,
                "prefetch_state": self.prefetch_state, "prefetch_planned": self.prefetch_planned,
                "profile_frames": len(self.image.prefetch), "chunks_total": len(self.image.index.chunk_ids),
                "chunks_cached": self._chunks_cached(), "source": self._source_stats()}

    def save(self, counters: dict[str, Any] | None = None) -> None:
        self.st.stats = counters if counters is not None else self.counters()
        self.st.updated_at = time.time()
        ms.save_state(self.paths.state, self.st)

    # tasks ----------------------------------------------------------------------------------

    async def run(self) -> None:
        import pyfuse3
        import trio

        async with trio.open_nursery() as nursery:
            async def fuse_loop() -> None:
                try:
                    await pyfuse3.main(min_tasks=self.opts.min_tasks, max_tasks=self.opts.max_tasks)
                    log.info("file system at %s was unmounted", self.st.lower)
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(fuse_loop)
            phases = self._prefetch_phases()
            if phases:  # at once: the network works while the overlay is mounted and the caller starts up
                self.prefetch_state = "pending"
                self.prefetch_planned = sum(len(p) for _, p in phases)
                nursery.start_soon(self._prefetch, phases)
            if self.opts.writable:
                await trio.to_thread.run_sync(ms.mount_overlay, str(self.paths.lower), str(self.paths.upper),
                                              str(self.paths.work), self.mp, self.opts.expose)
                self.overlay = True
            self.st.ready = True
            self.save()
            log.info("serving %s (%s) at %s%s", self.image.name, self.image.digest, self.mp,
                     " (writable overlay)" if self.opts.writable else "")
            if self.notify is not None:
                self.notify(None)
            nursery.start_soon(self._stats_loop)

    async def _signals(self, scope: Any) -> None:
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: unmounting %s", signum, self.mp)
                scope.cancel()
                return

    async def _stats_loop(self) -> None:
        import trio

        last: dict[str, Any] = {}
        while True:
            await trio.sleep(1.0)
            now = self.counters()
            if now != last:
                self.save(now)
                last = now

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

    async def _prefetch(self, phases: list[tuple[str, list[int]]]) -> None:
        import trio

        try:
            await trio.to_thread.run_sync(self._prefetch_sync, phases, abandon_on_cancel=True)
        finally:
            self.stop.set()

    def _prefetch_sync(self, phases: list[tuple[str, list[int]]]) -> None:
        for label, frames in phases:
            if self.stop.is_set():
                self.prefetch_state = "stopped"
                return
            self.prefetch_state = label
            if not self._prefetch_phase(frames):
                return
        self.prefetch_state = "done"

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
    """Mount ``image`` at ``mountpoint`` in this process and serve until unmounted or signalled."""
    import pyfuse3
    import trio

    from shoal.mount.fs import fuse_options

    mp = _check_target(mountpoint, opts)
    paths = ms.paths_for(mp)
    pid = os.getpid()
    st = ms.MountState(mountpoint=mp, ref=image.ref, name=image.name, digest=image.digest, pid=pid,
                       start_time=ms.proc_start_time(pid), writable=opts.writable,
                       lower=str(paths.lower) if opts.writable else mp,
                       upper=str(paths.upper) if opts.writable else "", work=str(paths.work) if opts.writable else "",
                       log=str(paths.log), prefetch=opts.prefetch, started_at=time.time(),
                       cleanup=list(opts.cleanup), options=opts.expose.names())
    server = _Server(image, mp, opts, paths, st, notify)
    if opts.writable:
        _prepare_writable(image, paths, mp)
    ms.save_state(paths.state, st)
    fuse_up = ok = False
    try:
        try:
            pyfuse3.init(server.fs, st.lower, fuse_options(ms.PRIVATE if opts.writable else opts.expose))
        except RuntimeError as exc:
            raise StoreError(f"cannot mount FUSE at {st.lower}: {exc}") from None
        fuse_up = True
        try:
            trio.run(server.run)
        except BaseExceptionGroup as group:
            raise _single(group) from None
        ok = True
    finally:
        server.stop.set()
        _finish_source(server, opts)
        if server.overlay:
            _quiet_umount(mp, lazy=True)
        server.fs.close()  # its page-cache pushes stop before the FUSE session goes away
        if fuse_up:
            pyfuse3.close(unmount=ms.is_mounted(st.lower))
        mine = ms.load_state(paths.state)
        if mine is None or mine.pid == pid:
            ms.remove_state(st, keep_log=not ok)  # a failed daemon's log stays for a post-mortem
        log.info("stopped serving %s", mp)


def _finish_source(server: _Server, opts: MountOptions) -> None:
    """Hand over the recording (shoal profile) and stop the source's background work."""
    if opts.record_to and server.recorder is not None:
        from shoal.mount.profile import write_recording

        try:
            write_recording(opts.record_to, server.recorder.frames())
        except OSError as exc:
            log.error("cannot write the recording to %s: %s", opts.record_to, exc.strerror)
    try:
        server.image.source.close()
    except Exception as exc:  # the mount is going away anyway
        log.warning("closing the frame source: %s", exc)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside a (nested) exception group from trio, or the group itself."""
    leaves: list[BaseException] = []

    def walk(g: BaseException) -> None:
        if isinstance(g, BaseExceptionGroup):
            for e in g.exceptions:
                walk(e)
        else:
            leaves.append(g)

    walk(group)
    shoal_errs = [e for e in leaves if isinstance(e, ShoalError)]
    return shoal_errs[0] if shoal_errs else (leaves[0] if len(leaves) == 1 else group)


# ---------------------------------------------------------------------------------------------- umount


def _quiet_umount(path: str, lazy: bool, fuse: bool = False) -> None:
    try:
        ms.umount(path, lazy=lazy, fuse=fuse)
    except ShoalError as exc:
        log.warning("%s", exc)


def _force_unmount(st: ms.MountState) -> None:
    _quiet_umount(st.mountpoint, lazy=True, fuse=not st.writable)
    if st.writable:
        _quiet_umount(st.lower, lazy=True, fuse=True)


def _wait_gone(st: ms.MountState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ms.pid_alive(st.pid, st.start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def umount(mountpoint: str, lazy: bool = False, timeout: float = 10.0) -> ms.MountState | None:
    """Unmount the overlay (if any) and the FUSE file system at ``mountpoint``, stop its daemon and
    remove its state.  Works when the daemon is dead.  With ``lazy``, busy mounts are detached and
    their daemon keeps serving the processes still using them, then exits by itself."""
    mp = ms.canonical_mountpoint(mountpoint)
    st = ms.load_state(ms.paths_for(mp).state)
    if st is None:
        if ms.mounts().get(mp) == "fuse.shoal":  # a mount whose state was lost
            ms.umount(mp, lazy=True, fuse=True)
            return None
        raise NotFound(f"{mp} is not a shoal mount")
    alive = ms.pid_alive(st.pid, st.start_time)
    if not alive:
        log.warning("the daemon of %s (pid %d) had died; cleaning up (its log stays at %s)", mp, st.pid, st.log)
        _force_unmount(st)
        ms.remove_state(st, keep_log=True)
        return st
    ms.umount(mp, lazy=lazy, fuse=not st.writable)
    if st.writable:
        ms.umount(st.lower, lazy=lazy, fuse=True)
    if not _wait_gone(st, 2.0 if lazy else timeout):
        if lazy:
            log.info("daemon %d keeps serving until the last user of %s leaves", st.pid, mp)
            return st
        log.warning("daemon %d did not exit after unmount; terminating it", st.pid)
        os.kill(st.pid, signal.SIGTERM)
        if not _wait_gone(st, 5.0):
            os.kill(st.pid, signal.SIGKILL)
            _wait_gone(st, 5.0)
    _force_unmount(st)
    ms.remove_state(st)
    return st


# ---------------------------------------------------------------------------------------------- status


def status(mountpoint: str | None = None) -> list[MountStatus]:
    table = ms.mounts()
    if mountpoint is not None:
        mp = ms.canonical_mountpoint(mountpoint)
        st = ms.load_state(ms.paths_for(mp).state)
        if st is None:
            raise NotFound(f"{mp} is not a shoal mount")
        states = [st]
    else:
        states = ms.list_states()
    return [MountStatus(s, ms.pid_alive(s.pid, s.start_time), s.mountpoint in table) for s in states]
