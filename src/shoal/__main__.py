"""The ``shoal`` command's entry point (also ``python -m shoal``).

A ``shoal run`` is handed to a ``shoal service`` of the same user when one listens
(``$SHOAL_SERVICE_SOCKET``, else ``RUN/service.sock``; docs/architecture.md, Warm start): the service
forks a child that already has the command's modules imported, gives it this process's standard input,
output and error (passed as file descriptors), arguments, environment, working directory and umask, and
answers its exit code.  This process waits, forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the child, and
exits with its code.  It imports nothing but the standard library to do so (no click, no Shoal module
but ``shoal.rundir``): that is the point.  Of the standard library it takes the C modules ``_socket``
and ``_signal``, not ``socket`` and ``signal``, whose enums (``enum``, ``functools``, ``collections``,
``selectors``) took 12 of the client's 25 ms of imports with a cold page cache, and ``shoal.rundir``'s
string paths, not ``pathlib`` (8 ms more): a served ``shoal run`` reaches the service ~20 ms sooner.

Everything else runs here, in-process, as before: any other command; a run with a terminal on its
standard streams (job control and the terminal stay with the process the user started), or with one of
them closed; no socket, one not owned by this user, or a service that refuses (a different user,
namespaces, cgroup, root, limits, capabilities, code or interpreter state: ``sys.path``, ``sys.flags``,
warning options, stream encodings; ``shoal service`` logs why); ``SHOAL_SERVICE=0``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no typeshed stub: the C half of ``signal``
import _socket
import os
import stat
import struct
import sys

__all__ = ["main", "delegate", "command_of", "encode_request", "interpreter_state", "signal_state", "SERVED", "MAGIC"]

SERVED = ("run",)  # commands a service may run
MAGIC = b"SHOAL-SERVICE-2"
_GLOBAL_WITH_VALUE = ("--store",)
_SECRET_OPTIONS = ("--creds", "--src-creds", "--dest-creds", "--password")
_MAX_LINE = 1 << 16


def encode_request(argv: list[str], env: dict[str, str], cwd: str, umask: int, exe: str, prefix: str,
                   pkg: str, state: bytes = b"", signals: tuple[bytes, bytes] = (b"", b"")) -> bytes:
    """The request a client sends (docs/architecture.md, Warm start): ``LENGTH:`` then NUL-separated
    fields: the magic, exe, prefix, pkg, the interpreter state (``interpreter_state``), cwd, umask, the
    ignored and the blocked signals (``signal_state``), argc, the arguments, then ``K=V`` environment
    entries (none of which can hold a NUL).  Plain bytes, so that the client imports no decoder."""
    fields = [MAGIC, *(os.fsencode(x) for x in (exe, prefix, pkg)), state, os.fsencode(cwd), b"%d" % umask,
              *signals, b"%d" % len(argv), *(os.fsencode(a) for a in argv),
              *(os.fsencode(f"{k}={v}") for k, v in env.items())]
    body = b"\0".join(fields)
    return b"%d:" % len(body) + body


def interpreter_state() -> bytes:
    """What, beyond the environment, decides how this interpreter runs Shoal's code and that a child of
    the service would inherit from the service instead: where imports come from, the ``-X``/``-W``/``-O``
    style flags, and the encodings of file names and of the standard streams.  A service serves only a
    client whose state equals its own."""
    streams = tuple(None if s is None else (s.encoding, s.errors) for s in (sys.stdin, sys.stdout, sys.stderr))
    return os.fsencode(repr((tuple(sys.flags), sys.path, sys.warnoptions, sys._xoptions,
                             sys.getfilesystemencoding(), sys.getfilesystemencodeerrors(), streams)).replace("\0", ""))


def signal_state() -> tuple[bytes, bytes]:
    """The signals this process ignores and those it blocks (comma-separated numbers): what a command run
    here would start with, and its child, with them, in the service."""
    ignored = []
    for s in _signal.valid_signals():
        try:
            if _signal.getsignal(s) == _signal.SIG_IGN:
                ignored.append(int(s))
        except (OSError, ValueError):
            pass
    blocked = _signal.pthread_sigmask(_signal.SIG_BLOCK, [])
    return (b",".join(b"%d" % s for s in sorted(ignored)), b",".join(b"%d" % s for s in sorted(map(int, blocked))))


def command_of(args: list[str]) -> str | None:
    """The command name in ``args`` (``shoal [GLOBAL OPTIONS] COMMAND ...``), None for help/version."""
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in _GLOBAL_WITH_VALUE:
            skip = True
        elif a in ("-h", "--help", "--version"):
            return None
        elif not a.startswith("-"):
            return a
    return None


def _socket_path() -> str | None:
    if os.environ.get("SHOAL_SERVICE", "1") == "0":
        return None
    from shoal.rundir import service_socket_path

    path = service_socket_path()
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        return None
    return path


def delegate(args: list[str]) -> int | None:
    """Run ``shoal ARGS`` in a child of the listening service and return its exit code; None when it
    must run in this process (see the module text)."""
    if command_of(args) not in SERVED:
        return None
    try:
        for fd in (0, 1, 2):  # a closed one would be taken by the socket below and passed as a stream
            os.fstat(fd)
        if any(os.isatty(fd) for fd in (0, 1, 2)):
            return None
    except OSError:
        return None
    path = _socket_path()
    if path is None:
        return None
    if any(a.startswith(_SECRET_OPTIONS) for a in args):  # this process waits for the run: as the run would
        from shoal.mount.proctitle import scrub_argv  # (cli.common.parse_creds), keep them out of ps

        scrub_argv()
    umask = os.umask(0o22)
    os.umask(umask)
    try:
        request = encode_request(args, dict(os.environ), os.getcwd(), umask, os.path.realpath(sys.executable),
                                 sys.prefix, os.path.dirname(os.path.realpath(__file__)), interpreter_state(),
                                 signal_state())
    except (OSError, ValueError):
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.settimeout(5.0)
        conn.connect(path)
        sent = conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))])
        conn.sendall(request[sent:])
        f = _Lines(conn)
        pid = _number(f.readline(), b"pid ")
    except OSError:
        conn.close()
        return None
    if pid is None or pid <= 0:
        conn.close()
        return None  # refused: run it here
    return _wait(conn, f, pid)


class _Lines:
    """The service's reply lines, read from the bare socket (``_socket`` has no ``makefile``)."""

    def __init__(self, conn: _socket.socket) -> None:
        self.conn, self.buf = conn, b""

    def readline(self) -> bytes:
        """The next line with its newline, or what came before the end (at most ``_MAX_LINE`` bytes)."""
        while b"\n" not in self.buf and len(self.buf) < _MAX_LINE:
            got = self.conn.recv(4096)
            if not got:
                break
            self.buf += got
        end = self.buf.find(b"\n") + 1 or min(len(self.buf), _MAX_LINE)
        line, self.buf = self.buf[:end], self.buf[end:]
        return line


def _number(line: bytes, tag: bytes) -> int | None:
    """N of a reply line ``TAG N``, else None."""
    if not line.startswith(tag):
        return None
    try:
        return int(line[len(tag):])
    except ValueError:
        return None


def _wait(conn: _socket.socket, f: _Lines, pid: int) -> int:
    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
        _signal.signal(s, forward)
    conn.settimeout(None)
    while True:
        try:
            line = f.readline()
            break
        except InterruptedError:
            continue
        except OSError:
            line = b""
            break
    rc = _number(line, b"rc ")
    if rc is None:
        sys.stderr.write(f"shoal: error: the service ended before its child {pid} did (see its log)\n")
        return 1
    return rc


def main() -> int | None:
    rc = delegate(sys.argv[1:])
    if rc is not None:
        sys.stdout.flush()
        sys.exit(rc)
    from shoal.cli import main as cli_main

    return cli_main()  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
