"""``shoal service``: a warm process that starts ``shoal run`` without an interpreter's start-up and
imports (docs/architecture.md, Warm start).

A ``shoal run`` spends 0.3–0.6 s starting Python and importing the CLI, the registry client
and the file system before its first registry request; a stargz snapshotter or containerd is a
resident process that pays this once.  The service pays it once too: it imports what a run needs, then
for each client (``shoal/__main__.py``) forks a child that runs the client's command line with the
client's standard streams (passed as file descriptors), environment, working directory and umask, and
answers the child's exit code when it ends.

The child is the client's equal or there is no child: the service serves only a peer (``SO_PEERCRED``)
with its own user and group, running the same interpreter and Shoal package, in the same namespaces,
cgroup, root directory, with the same capabilities, no-new-privileges and seccomp state, security
label, login uid, resource limits, OOM score, nice value and CPU set, with the same interpreter state
(``sys.path``, ``sys.flags``, stream encodings); its own code must be unchanged since it started.  The
process checked is the one that connected (a pidfd from ``SO_PEERPIDFD``), alive until the check is done,
so a peer cannot exit and let its pid be taken by a process that would pass.  Anything else is refused
(logged), and the client runs the command itself.  The socket is made mode 0600 in a directory of mode
0700.
"""

from __future__ import annotations

import fcntl
import gc
import importlib
import io
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from shoal.__main__ import MAGIC, SERVED, command_of, interpreter_state
from shoal.errors import UsageError
from shoal.mount.proctitle import mask_args, set_title

__all__ = ["service", "context_of", "serve", "Request", "decode_request"]

log = logging.getLogger(__name__)

# what a run imports before its container starts: loaded once, by the service
_WARM = ("shoal.cli.mount_cmds", "shoal.mount.run", "shoal.mount.image", "shoal.mount.remote", "shoal.mount.daemon",
         "shoal.mount.serve", "shoal.mount.fs", "shoal.mount.control", "shoal.mount.bundle", "shoal.lazy",
         "shoal.transports.docker", "shoal.transports.registry.client", "shoal.transports.registry.blobs",
         "shoal.transports.resolve", "shoal.store", "shoal.trust.image", "shoal.mount.kernel", "httpx", "cbor2",
         "difflib", "encodings.idna", "stringprep")
_MAX_REQUEST = 1 << 20
_REQUEST_TIME = 5.0  # for the whole request to arrive
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; not named by Python 3.11


def _peer_pidfd(conn: socket.socket) -> int:
    """A pidfd of the process that connected ``conn``: from the kernel where it can say (Linux 6.5),
    else of the process that has the peer's pid now, just after the connection was accepted."""
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except OSError:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        return os.pidfd_open(pid)


@dataclass(frozen=True)
class Request:
    """What a client asks (``shoal.__main__.encode_request``)."""

    exe: str
    prefix: str
    pkg: str
    state: bytes
    cwd: str
    umask: int
    ignored: tuple[int, ...]
    blocked: tuple[int, ...]
    argv: tuple[str, ...]
    env: dict[str, str]


def decode_request(data: bytes) -> Request | str:
    """The request in ``data`` (``LENGTH:BODY``), or why it is not one."""
    head, sep, body = data.partition(b":")
    if not sep or not head.isdigit() or int(head) != len(body):
        return "not a complete request"
    f = body.split(b"\0")
    if len(f) < 10 or f[0] != MAGIC:
        return "not a version 2 request"
    exe, prefix, pkg, cwd = (os.fsdecode(x) for x in (*f[1:4], f[5]))
    if not (f[6].isdigit() and int(f[6]) <= 0o777 and f[9].isdigit() and 10 + int(f[9]) <= len(f)):
        return "malformed request"
    sigs: list[tuple[int, ...]] = []
    for raw in (f[7], f[8]):
        nums = raw.split(b",") if raw else []
        if not all(n.isdigit() and 0 < int(n) < signal.NSIG for n in nums):
            return "malformed request"
        sigs.append(tuple(int(n) for n in nums))
    argc = int(f[9])
    env: dict[str, str] = {}
    for kv in f[10 + argc:]:
        k, eq, v = os.fsdecode(kv).partition("=")
        if not eq or not k:
            return "malformed request"
        env[k] = v
    return Request(exe, prefix, pkg, f[4], cwd, int(f[6]), sigs[0], sigs[1],
                   tuple(os.fsdecode(a) for a in f[10:10 + argc]), env)


_STATUS_KEYS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:",
                b"NoNewPrivs:", b"Seccomp:")
_NAMESPACES = ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup", "time")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError:
        return b""


def context_of(pid: int) -> dict[str, object]:
    """What a process's command would run under, as far as a child of the service must match it."""
    proc = f"/proc/{pid}"
    ctx: dict[str, object] = {}
    for ns in _NAMESPACES:
        try:
            ctx[f"ns:{ns}"] = os.stat(f"{proc}/ns/{ns}").st_ino
        except OSError:
            ctx[f"ns:{ns}"] = None
    try:
        st = os.stat(f"{proc}/root")
        ctx["root"] = (st.st_dev, st.st_ino)
    except OSError:
        ctx["root"] = None
    ctx["status"] = [ln for ln in _read(f"{proc}/status").splitlines() if ln.startswith(_STATUS_KEYS)]
    for name in ("cgroup", "limits", "loginuid", "oom_score_adj", "attr/current"):
        ctx[name] = _read(f"{proc}/{name}")
    try:
        ctx["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
        ctx["cpus"] = sorted(os.sched_getaffinity(pid))
    except OSError:
        ctx["nice"] = ctx["cpus"] = None
    return ctx


def _code_stamp(pkg: Path) -> tuple[tuple[str, int], ...]:
    """The Shoal package's source files and their change times (a changed file: the service is stale)."""
    out = []
    for p in sorted(pkg.rglob("*.py")):
        try:
            out.append((str(p), p.stat().st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


# inotify(7) masks: what, in a watched directory of the package, makes the service stale
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_FLAGS = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
             | _IN_DELETE_SELF | _IN_MOVE_SELF)
_IN_IGNORED, _IN_Q_OVERFLOW, _IN_ISDIR = 0x8000, 0x4000, 0x40000000
_IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class _CodeWatch:
    """Whether the package's source changed since the service started, asked before each run.

    inotify on each directory of the package (but ``__pycache__``): a request costs one read of a
    non-blocking descriptor, where stamping every file's change time cost 3–6 ms of each run's start
    (147 files, page cache cold).  A ``.py`` name, a new directory (not ``__pycache__``), a watched
    directory removed or moved, or a lost event makes it stale for good.  Without inotify (no ctypes
    libc, no watches left), each request compares the stamp of ``_code_stamp``."""

    def __init__(self, pkg: Path) -> None:
        self.pkg = pkg
        self.stamp = _code_stamp(pkg)
        self.fd = -1
        self.stale = False
        try:
            self.fd = _inotify(pkg)
        except OSError as exc:
            log.info("no inotify watch of %s (%s): each request stamps its files", pkg, exc)

    def changed(self) -> bool:
        if self.fd < 0:
            return _code_stamp(self.pkg) != self.stamp
        while not self.stale:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            self.stale = _stale(data)
        return self.stale


def _inotify(pkg: Path) -> int:
    """A non-blocking inotify descriptor watching every directory of ``pkg`` but ``__pycache__``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(_IN_NONBLOCK_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        for d in [pkg, *(p for p in sorted(pkg.rglob("*")) if p.is_dir() and "__pycache__" not in p.parts)]:
            if libc.inotify_add_watch(fd, os.fsencode(d), _IN_FLAGS) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stale(data: bytes) -> bool:
    """Whether inotify events ``data`` name a change of the package's code."""
    at = 0
    while at + _EVENT.size <= len(data):
        _, mask, _, n = _EVENT.unpack_from(data, at)
        name = data[at + _EVENT.size:at + _EVENT.size + n].rstrip(b"\0")
        at += _EVENT.size + n
        if mask & (_IN_Q_OVERFLOW | _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):  # events lost, a directory gone
            return True
        if name.endswith(b".py") or (mask & _IN_ISDIR and name != b"__pycache__"):
            return True
    return False


@dataclass
class _Service:
    path: Path
    idle_timeout: float
    pkg: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent)
    exe: str = field(default_factory=lambda: os.path.realpath(sys.executable))
    children: dict[int, socket.socket] = field(default_factory=dict)
    code: _CodeWatch | None = None
    own: dict[str, object] = field(default_factory=dict)
    state: bytes = b""
    stopping: bool = False
    inherited: list[int] = field(default_factory=list)  # the listener's and the wake-up pipe's: not a child's

    def refusal(self, conn: socket.socket, pidfd: int, req: Request | str) -> str | None:
        """Why the peer of ``conn`` (the process ``pidfd`` refers to) may not be served (None: it may)."""
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        if uid != os.geteuid() or gid != os.getegid():
            return f"peer {pid} runs as {uid}:{gid}, the service as {os.geteuid()}:{os.getegid()}"
        if isinstance(req, str):
            return req
        if command_of(list(req.argv)) not in SERVED:
            return f"peer {pid} asks for a command the service does not run: {command_of(list(req.argv))}"
        if req.exe != self.exe or req.pkg != str(self.pkg) or req.prefix != sys.prefix:
            return f"peer {pid} runs another interpreter or Shoal ({req.exe}, {req.pkg})"
        if req.state != self.state:
            return f"peer {pid} runs its interpreter with other sys.path, flags or encodings"
        if self.code is not None and self.code.changed():
            return "Shoal's code changed since the service started: restart it"
        theirs = context_of(pid)
        try:  # /proc/PID was the connecting process's only if that process is still alive now
            signal.pidfd_send_signal(pidfd, 0)
        except OSError:
            return f"peer {pid} exited before its request was checked"
        diff = sorted(k for k in self.own if self.own[k] != theirs.get(k))
        if diff:
            return f"peer {pid} differs from the service in {', '.join(diff)}"
        return None

    def serve_one(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + _REQUEST_TIME
        fds: list[int] = []
        pidfd = -1
        try:
            pidfd = _peer_pidfd(conn)
            conn.settimeout(_REQUEST_TIME)
            msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
            data = msg
            head = data.partition(b":")[0]
            want = len(head) + 1 + int(head) if head.isdigit() and len(head) < 8 else 0
            while len(data) < min(want, _MAX_REQUEST):
                left = deadline - time.monotonic()  # the whole request within the deadline, not each read
                if left <= 0:
                    break
                conn.settimeout(left)
                more = conn.recv(_MAX_REQUEST - len(data))
                if not more:
                    break
                data += more
            req = decode_request(data)
            why = "not three standard streams" if len(fds) != 3 else self.refusal(conn, pidfd, req)
            os.close(pidfd)
            pidfd = -1
            if why is not None or isinstance(req, str):
                log.info("refused: %s", why)
                conn.sendall(b"refused %s\n" % str(why).encode())
                conn.close()
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child runs the command and never returns
                self._child(conn, fds, req)
            self.children[pid] = conn
            log.info("pid %d: shoal %s", pid, " ".join(mask_args(req.argv)))
            conn.sendall(b"pid %d\n" % pid)
        except OSError as exc:
            log.info("a client's request failed: %s", exc)
            conn.close()
        finally:
            for fd in fds:
                os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)

    def _child(self, conn: socket.socket, fds: list[int], req: Request) -> None:  # pragma: no cover
        code = 70
        try:
            for n in signal.valid_signals():  # the client's dispositions, as a process it started would have
                if n in (signal.SIGKILL, signal.SIGSTOP):
                    continue
                handler: object = signal.SIG_DFL
                if n in req.ignored:
                    handler = signal.SIG_IGN
                elif n == signal.SIGINT:
                    handler = signal.default_int_handler  # what Python installs: KeyboardInterrupt, cleanup
                try:
                    signal.signal(n, handler)  # type: ignore[arg-type]
                except (OSError, ValueError):
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, req.blocked)
            signal.set_wakeup_fd(-1)
            for c in self.children.values():
                c.close()
            conn.close()
            for fd in self.inherited:
                os.close(fd)
            os.setsid()  # out of the service's session and process group
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in fds]  # none of them may be 0-2 already
            for fd in fds:
                os.close(fd)
            for i, fd in enumerate(high):
                os.dup2(fd, i)
                os.close(fd)
            if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.line_buffering:
                sys.stdout.reconfigure(line_buffering=False)  # the service's stdout was a terminal; the client's is not
            os.chdir(req.cwd)
            os.umask(req.umask)
            os.environ.clear()
            os.environ.update(req.env)
            tempfile.tempdir = None  # found again from the client's TMPDIR
            args = list(req.argv)
            sys.argv = ["shoal", *args]
            set_title(["shoal", *args])  # in ps, what it runs (masked; cut to the service's own length)
            for h in list(logging.root.handlers):  # the command sets up its own logging
                logging.root.removeHandler(h)
            logging.root.setLevel(logging.WARNING)
            from shoal.cli import main as cli_main

            try:
                ret = cli_main(args)
                code = ret if type(ret) is int else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except OSError as exc:
            sys.stderr.write(f"shoal: error: the service cannot start the command: {exc}\n")
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            rc = code if code >= 0 else 128 - code
            log.info("pid %d: exit %d", pid, rc)
            if conn is not None:
                try:
                    conn.sendall(b"rc %d\n" % rc)
                except OSError:
                    pass
                conn.close()


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.parent.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UsageError(f"{path.parent}: must be owned by this user and writable by nobody else")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        raise UsageError(f"{path}: a service already listens there")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    if path.is_socket():
        path.unlink()  # a dead service's
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(64)
    return s


def serve(path: Path, idle_timeout: float = 0.0, ready: object = None) -> None:
    """Import, listen on ``path`` and serve until SIGTERM/SIGINT (or ``idle_timeout`` s without a client
    or a child), then wait for the running children."""
    state = interpreter_state()  # before any import could change sys.path
    for name in _WARM:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("cannot preload %s: %s", name, exc)
    from shoal.transports.registry.transport import warm_up

    warm_up()
    svc = _Service(path, idle_timeout, state=state)
    svc.code = _CodeWatch(svc.pkg)
    svc.own = context_of(os.getpid())
    listener = _listen(path)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    svc.inherited = [listener.fileno(), rfd, wfd, *([svc.code.fd] if svc.code.fd >= 0 else [])]
    signal.set_wakeup_fd(wfd)

    def stop(signum: int, frame: object) -> None:
        svc.stopping = True

    signal.signal(signal.SIGCHLD, lambda s, f: None)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gc.collect()
    gc.freeze()  # what is imported now is shared with every child, untouched by their collections
    sel = selectors.EpollSelector()
    svc.inherited.append(sel.fileno())
    sel.register(listener, selectors.EVENT_READ)
    sel.register(rfd, selectors.EVENT_READ)
    log.info("listening on %s (pid %d)", path, os.getpid())
    last = time.monotonic()
    try:
        while True:
            if svc.stopping and listener.fileno() >= 0:
                sel.unregister(listener)
                listener.close()
                path.unlink(missing_ok=True)
            if svc.stopping and not svc.children:
                return
            if (svc.idle_timeout > 0 and not svc.children and not svc.stopping
                    and time.monotonic() - last > svc.idle_timeout):
                log.info("idle for %gs: ending", svc.idle_timeout)
                svc.stopping = True
                continue
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is listener and not svc.stopping:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    last = time.monotonic()
                    svc.serve_one(conn)
                elif key.fileobj == rfd:
                    try:
                        os.read(rfd, 4096)
                    except BlockingIOError:
                        pass
            svc.reap()
            if svc.children:
                last = time.monotonic()
    finally:
        signal.set_wakeup_fd(-1)
        if listener.fileno() >= 0:
            listener.close()
            path.unlink(missing_ok=True)


@click.command()
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Listen here (default $SHOAL_SERVICE_SOCKET, else RUN/service.sock: /run/shoal as root).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="End after this long without a client or a running command (0: never).")
def service(sock: Path | None, idle_timeout: float) -> None:
    """Keep a warm process that starts `shoal run` fast (for clients of this user and context only)."""
    from shoal.rundir import service_socket

    path = (sock or service_socket()).absolute()
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    serve(path, idle_timeout)
