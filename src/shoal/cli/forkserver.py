"""A fork server for the snapshotter's ``shoal`` calls (docs/containerd.md "Start-up").

It lives with the CLI because its children run the CLI; the snapshotter knows only
:class:`shoal.snapshotter.runner.Runner`.

A lazy layer is mounted by ``shoal mount`` in a process of its own, whose FUSE daemon outlives the
gRPC server (remote.py).  Starting a fresh interpreter for each one costs its start-up and imports
(0.3–0.7 s before the first registry request, issue 12) on the critical path of every container
start.  The fork server is that interpreter, started once (``subprocess``, so it is never forked
from a process with gRPC threads) with the modules a mount needs already imported; each call forks
a child of it, which runs ``shoal ARGS`` exactly as the command line does.

Protocol: the snapshotter holds one end of a socketpair that is the server's standard input; per
call it sends the server one end of a fresh socketpair (SCM_RIGHTS).  The server forks a child for
it, which reads one JSON line (the argument list), answers ``{"pid": N}``, runs the command with
stdin on /dev/null and stdout/stderr in an anonymous file, and answers ``{"rc": N, "stderr": TEXT}``.
The server is single-threaded, sends one byte on its standard input once its imports are done
(``ForkServer.start`` waits for it), and exits when the snapshotter's end closes.  Its argument area is
padded (``TITLE_ROOM``), so each child shows its own command line in ``ps`` and ``/proc/PID/cmdline``
(``proctitle.set_title``), as a ``shoal mount`` started by exec would; its daemon inherits that.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from shoal.errors import TransportError
from shoal.snapshotter.runner import Runner, timed_out

__all__ = ["ForkServer", "main", "TITLE_ROOM"]

log = logging.getLogger(__name__)

TITLE_ROOM = 4096  # bytes of argument area a child may write its command line into
_MAX_LINE = 1 << 20
# what a mount imports, down to the modules it imported lazily (``shoal.mount.proctitle`` and ``difflib`` were
# imported by each child until stop 23: 2-3 ms each with the page faults of a fresh import)
_PRELOAD = ("shoal.cli", "shoal.cli.mount_cmds", "shoal.mount.daemon", "shoal.mount.remote", "shoal.mount.serve",
            "shoal.mount.control", "shoal.transports.docker", "shoal.transports.registry.client", "shoal.lazy",
            "shoal.store", "shoal.mount.kernel", "httpx", "shoal.mount.fs", "shoal.mount.bundle",
            "shoal.transports.resolve", "shoal.trust.image", "shoal.mount.proctitle", "cbor2", "difflib",
            "encodings.idna", "stringprep")


class ForkServer(Runner):
    """The client end (see the module text); started on first use, and again if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None

    def _ensure(self) -> socket.socket:
        if self._proc is not None and self._proc.poll() is None and self._ctl is not None:
            return self._ctl
        if self._ctl is not None:
            self._ctl.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from shoal.cli.forkserver import main; main()", " " * TITLE_ROOM],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self._ctl = ours
        log.info("fork server for lazy mounts started (pid %d)", self._proc.pid)
        _await_ready(ours)
        return ours

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the server now, not on the first call, and return once it has imported what a mount
        needs (~0.5 s): a snapshotter that serves before then makes its first mount wait behind those
        imports (a cold node's first container: CRI's CreateContainer waited ~90 ms for them)."""
        with self._lock:
            self._ensure()

    def run(self, args: Sequence[str], timeout: float) -> tuple[int, str]:
        try:
            return self._call(args, timeout)
        except _NotTaken:  # the server died before a child took the call: once more with a new one
            log.warning("the fork server died; starting it again")
            with self._lock:
                self._proc = None
            return self._call(args, timeout)

    def _call(self, args: Sequence[str], timeout: float) -> tuple[int, str]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                try:
                    socket.send_fds(self._ensure(), [b"r"], [theirs.fileno()])
                except OSError:
                    raise _NotTaken() from None
            theirs.close()
            ours.settimeout(timeout)
            try:
                ours.sendall(json.dumps(list(args)).encode() + b"\n")
            except OSError:
                raise _NotTaken() from None
            return _answer(ours, timeout, args)
        finally:
            theirs.close()
            ours.close()

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                self._ctl.close()  # the server sees EOF and exits; running children finish their call
                self._ctl = None
            if self._proc is not None:
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


class _NotTaken(Exception):
    """No child of the server took the call (the server is gone)."""


_READY_TIME = 60.0  # longest wait for a new server's imports


def _await_ready(ctl: socket.socket) -> None:
    """Wait for a new server's one byte on the control socket: its imports are done.  A server that
    ends or stays silent is logged; the next call finds it dead, or waits in its queue."""
    ctl.settimeout(_READY_TIME)
    try:
        if not ctl.recv(1):
            log.warning("the fork server ended while it started")
    except OSError as exc:
        log.warning("the fork server did not report ready within %gs: %s", _READY_TIME, exc)
    finally:
        ctl.settimeout(None)


def _answer(conn: socket.socket, timeout: float, args: Sequence[str]) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    f = conn.makefile("rb")
    pid = 0
    try:
        while True:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                line = f.readline(_MAX_LINE)
            except ConnectionError:
                line = b""
            if not line and not pid:
                raise _NotTaken()
            if not line:
                raise TransportError(f"the fork server's child {pid} ended without an answer")
            doc = json.loads(line)
            if "pid" in doc:
                pid = int(doc["pid"])
                continue
            return int(doc["rc"]), str(doc.get("stderr", ""))
    except (TimeoutError, socket.timeout):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return 124, timed_out(args, timeout)
    finally:
        f.close()


# ------------------------------------------------------------------------------------------ the server


def main() -> None:  # pragma: no cover - runs in the fork server process
    import importlib

    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    for name in _PRELOAD:  # what every mount imports, once
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("fork server: cannot preload %s: %s", name, exc)
    from shoal.transports.registry.transport import warm_up

    warm_up()
    try:
        ctl.sendall(b"r")  # ready: the snapshotter waits for this before it serves (ForkServer.start)
    except OSError:
        return  # the snapshotter is gone
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the snapshotter's Ctrl-C: end by EOF, after it
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 16, 4)
        except InterruptedError:
            continue
        if not msg and not fds:
            return  # the snapshotter is gone
        for fd in fds:
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    ctl.close()
                    for other in fds:  # only its own call's socket: a daemon must hold no other
                        if other != fd:
                            os.close(other)
                    code = _child(fd)
                finally:
                    os._exit(code)
        for fd in fds:
            os.close(fd)


def _child(fd: int) -> int:  # pragma: no cover - runs in a child of the fork server
    from shoal.mount.proctitle import set_title

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    conn = socket.socket(fileno=fd)
    # a daemon the command forks must not hold this connection (the object is closed in the copy)
    os.register_at_fork(after_in_child=conn.close)
    f = conn.makefile("rb")
    line = f.readline(_MAX_LINE)
    f.close()
    args = json.loads(line) if line else []
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        return 2
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    set_title(["shoal", *args])
    out = open(os.memfd_create("shoal-stderr"), "w+b")  # noqa: SIM115  (closed by os._exit, or in a daemon)
    os.register_at_fork(after_in_child=out.close)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.argv = ["shoal", *args]
    from shoal.cli import main as cli_main

    try:
        ret = cli_main(args)
        rc = ret if type(ret) is int else 0  # as sys.exit(main()) would
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    size = os.fstat(out.fileno()).st_size
    out.seek(max(0, size - 65536))
    err = out.read(65536).decode("utf-8", "replace")
    conn.sendall(json.dumps({"rc": rc, "stderr": err}).encode() + b"\n")
    conn.close()
    return 0
