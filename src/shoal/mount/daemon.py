"""Mount an image with FUSE in a daemon: ``mount`` and ``start`` (docs/spec/mount.md §3).

``mount`` resolves the reference in the calling process (so a bad reference is an ordinary
one-line error), then either serves in the foreground (``mount/serve.py``) or forks a daemon.  The
daemon detaches (setsid, double fork, stdio to /dev/null and its log), mounts, and writes one JSON
line to a pipe once the mount is live (or why it failed); the caller returns then.  The daemon exits
when its file system is unmounted (``shoal umount``, ``umount``, ``fusermount3 -u``) or on
SIGTERM/SIGINT, and removes its state on the way out.  Unmounting and status are
``mount/control.py``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any, Callable

from shoal import errors as shoal_errors
from shoal.errors import ShoalError
from shoal.mount import state as ms
from shoal.mount.control import force_unmount
from shoal.mount.image import OpenedImage, OpenOptions, StorePath, open_image
from shoal.mount.serve import Notify, check_target, serve
from shoal.mount.state import MountOptions

__all__ = ["MountOptions", "mount", "start"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- mount


def mount(ref: str, mountpoint: str, opts: MountOptions = MountOptions(), store_root: StorePath = None,
          notify: Notify | None = None, open_opts: OpenOptions | None = None,
          keep: Callable[[OpenedImage], object] | None = None) -> ms.MountState | None:
    """Mount image ``ref`` at ``mountpoint``.  Background: returns the live mount's state, and hands
    this process's copy of the opened image to ``keep`` if given (a caller that ends at once keeps it
    rather than free it: a decoded index takes ~15 ms to free, on the path of whoever waits for the
    mount).  Foreground: serves until unmounted, calls ``notify(None)`` once live, and returns None."""
    check_target(mountpoint, opts)  # before any network traffic
    image = open_image(ref, store_root, open_opts)  # a docker:// open imports the serving modules meanwhile
    if opts.foreground:
        serve(image, mountpoint, opts, notify)
        return None
    st = start(image, mountpoint, opts)
    image.source.handover_wait()  # return once the daemon holds what was fetched ahead for it
    if keep is not None:
        keep(image)
    return st


def start(image: OpenedImage, mountpoint: str, opts: MountOptions = MountOptions()) -> ms.MountState:
    """Fork a daemon serving ``image`` at ``mountpoint``; return once the mount is live."""
    mp = check_target(mountpoint, opts)
    paths = ms.paths_for(mp)
    paths.state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # a source holding sqlite handles or threads closes them now (FrameSource contract, mount.md §1)
    image.source.before_fork()
    r, w = os.pipe()
    log.debug("timeline: forking the mount daemon for %s", mp)
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
    log.debug("timeline: mount live at %s", mp)
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
    force_unmount(st)
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
    gc.unfreeze()  # the caller may have frozen its objects before it forked (cli mount): a daemon lives on
    _setup_daemon_logging()
    from shoal.mount.proctitle import scrub_argv

    scrub_argv()  # the CLI did so when it read --creds; a daemon lives long: never show a secret in ps
    # a source holding connections or threads re-creates them here (FrameSource contract, mount.md §5)
    image.source.after_fork()
    log.debug("timeline: daemon after_fork done")
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
