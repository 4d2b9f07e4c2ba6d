"""``shoal service``: a ``shoal run`` handed to a warm process of the same user and context, with the
client's streams, environment, working directory, umask and signals; anything else runs in-process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountkit import mounts_under, wait_for

import helpers
from shoal.__main__ import MAGIC, encode_request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debian_store(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shoal.build import BuildOptions, build
    from shoal.format.manifest import ImageConfig
    from shoal.store import Store

    d = tmp_path_factory.mktemp("svc-store")
    conf = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]}
    build(Store.open(d), debian_rootfs, "debian:12", BuildOptions(workers=2, config=ImageConfig(config=conf)))
    return d


class Service:
    def __init__(self, sock: Path, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sock, self.log, self.proc = sock, log, proc

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    sock = tmp_path / "svc" / "s.sock"
    log = tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_SERVICE_SOCKET"}
    proc = subprocess.Popen([*helpers.shoal_exe(), "service", "--socket", str(sock)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 60, "the service's socket")
        assert proc.poll() is None, log.read_text()
        monkeypatch.setenv("SHOAL_SERVICE_SOCKET", str(sock))
        yield Service(sock, log, proc)
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0 and not sock.exists()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("SHOAL_RUN_DIR", str(d))
    yield d
    assert not mounts_under(d)


def _needs_runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")


def _served(svc: Service) -> list[str]:
    return [ln for ln in svc.text().splitlines() if ": shoal " in ln]


def test_run_is_served_with_the_clients_streams_cwd_umask_and_env(debian_store: Path, service: Service,
                                                                   run_dir: Path, tmp_path: Path) -> None:
    _needs_runc()
    work = tmp_path / "cwd"
    work.mkdir()
    os.symlink(debian_store, work / "store")
    cmd = [*helpers.shoal_exe(), "--store", "store", "run", "--rm", "debian:12", "--", "sh", "-c",
           "echo hi; cat; echo err >&2; exit 3"]  # a relative --store: the client's working directory
    p = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", *cmd], cwd=work, input=b"from stdin\n",
                       capture_output=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, b"hi\nfrom stdin\n", b"err\n")
    served = _served(service)
    assert len(served) == 1 and "run --rm debian:12" in served[0], service.text()
    assert "exit 3" in service.text()
    containers = run_dir / "containers"  # the client's SHOAL_RUN_DIR was used, and cleaned
    assert containers.exists() and not list(containers.iterdir())


def test_signals_are_forwarded_to_the_served_command(debian_store: Path, service: Service, run_dir: Path) -> None:
    _needs_runc()
    cmd = helpers.shoal_cmd(debian_store, "run", "--rm", "--creds", "alice:s3cret", "debian:12", "--", "sh", "-c",
                            'trap "echo got-term; exit 7" TERM; echo ready; sleep 60 & wait')
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    assert len(_served(service)) == 1
    # the secret is in neither the client's command line (it waits for the run), nor the service's log
    assert b"s3cret" not in Path(f"/proc/{p.pid}/cmdline").read_bytes()
    assert "s3cret" not in service.text() and "alice:***" in service.text()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (7, b"got-term\n"), err


def test_another_mount_namespace_runs_in_process(debian_store: Path, service: Service, run_dir: Path) -> None:
    _needs_runc()
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    p = subprocess.run(["unshare", "-m", "--propagation", "private",
                        *helpers.shoal_cmd(debian_store, "run", "--rm", "debian:12", "--", "echo", "here")],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert (p.returncode, p.stdout) == (0, b"here\n"), p.stderr
    assert not _served(service)
    assert "refused" in service.text() and "ns:mnt" in service.text()


def _request(sock: Path, payload: bytes, nfds: int = 3) -> str:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(30)
    c.connect(str(sock))
    fds = [os.open(os.devnull, os.O_RDWR) for _ in range(nfds)]
    try:
        socket.send_fds(c, [payload], fds)
        line = c.makefile("rb").readline()
    finally:
        for fd in fds:
            os.close(fd)
        c.close()
    return line.decode(errors="replace")


def test_bad_requests_are_refused_and_the_service_lives_on(service: Service, tmp_path: Path) -> None:
    other = encode_request(["run", "--help"], {}, "/", 0o22, "/not/this/python", "/x", "/x")
    assert _request(service.sock, other).startswith("refused peer ")
    assert "another interpreter" in _request(service.sock, other)
    body = b"\0".join([MAGIC, b"a", b"b", b"c", b"s", b"/", b"999", b"", b"", b"1"])  # umask 999, argc past the end
    assert "malformed" in _request(service.sock, b"%d:" % len(body) + body)
    bad_env = encode_request(["run"], {"": "x"}, "/", 0o22, "a", "b", "c")
    assert "malformed" in _request(service.sock, bad_env)
    bad_sig = encode_request(["run"], {}, "/", 0o22, "a", "b", "c", signals=(b"2,999", b""))
    assert "malformed" in _request(service.sock, bad_sig)
    assert "version 2" in _request(service.sock, b"5:hello")
    assert _request(service.sock, b"99:short") == ""  # waited for the rest 5 s, then dropped
    assert "not a complete request" in _request(service.sock, b"\xff\xfe junk")
    assert "three standard streams" in _request(service.sock, other, nfds=1)
    # a same-user client never gets a command but `run` from it, nor one run under another sys.path
    assert "does not run: rm" in _request(service.sock, encode_request(["rm", "x"], {}, "/", 0o22, "a", "b", "c"))
    # a client that sends its request a byte at a time is dropped after 5 s in all, not 5 s per byte
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(service.sock))
    t = time.monotonic()
    with pytest.raises(OSError):
        for b in b"99999:" * 20:
            slow.send(bytes([b]))
            time.sleep(0.5)
    assert time.monotonic() - t < 8
    slow.close()
    # a client that connects and says nothing is dropped after the service's 5 s read deadline
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(service.sock))
    t = time.monotonic()
    assert idle.recv(1) == b"" and time.monotonic() - t < 30
    idle.close()
    assert service.proc.poll() is None
    assert (service.sock.stat().st_mode & 0o777) == 0o600
    assert (service.sock.parent.stat().st_mode & 0o777) == 0o700


def test_a_second_service_on_the_same_socket_is_refused(service: Service) -> None:
    p = helpers.run_shoal(None, "service", "--socket", str(service.sock), check=False, timeout=120)
    helpers.assert_one_line_error(p, "already listens")
    assert p.returncode == 2 and service.proc.poll() is None


def test_no_service_or_a_foreign_socket_runs_in_process(debian_store: Path, run_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_runc()
    sock = tmp_path / "other.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.listen(1)  # listens, but is not owned by... this user: chown it away, the client must not use it
    os.chown(sock, 65534, 65534)
    monkeypatch.setenv("SHOAL_SERVICE_SOCKET", str(sock))
    p = helpers.run_shoal(debian_store, "run", "--rm", "debian:12", "--", "echo", "alone", stdin=subprocess.DEVNULL,
                          timeout=120)
    assert p.stdout == b"alone\n"
    s.settimeout(0.1)
    with pytest.raises(OSError):
        s.accept()  # nobody connected
    s.close()
    monkeypatch.setenv("SHOAL_SERVICE_SOCKET", str(tmp_path / "missing.sock"))
    p = helpers.run_shoal(debian_store, "run", "--rm", "debian:12", "--", "echo", "alone", stdin=subprocess.DEVNULL,
                          timeout=120)
    assert p.stdout == b"alone\n"


def _script(sock: Path, body: str) -> list[str]:
    """A Python client that can build a request the service accepts (its sys.path the console script's)."""
    pre = f"""
        import os, socket, sys
        sys.path[0] = {os.path.dirname(helpers.shoal_exe()[0])!r}
        from shoal.__main__ import encode_request, interpreter_state, signal_state
        import shoal.__main__ as m
        def request(argv):
            return encode_request(argv, dict(os.environ), os.getcwd(), 0o22, os.path.realpath(sys.executable),
                                  sys.prefix, os.path.dirname(os.path.realpath(m.__file__)), interpreter_state(),
                                  signal_state())
        sock = {str(sock)!r}
    """
    return [sys.executable, "-c", textwrap.dedent(pre) + textwrap.dedent(body)]


def test_a_peer_that_exits_and_whose_pid_is_taken_is_refused(service: Service) -> None:
    """The peer checked is the process that connected: one that is not the service's equal (here: another OOM
    score) connects, hands the connection to its child and exits; a process that is the service's equal is
    given its pid; the request that follows must not be served."""
    if shutil.which("sleep") is None or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("cannot choose the next pid")
    body = """
        open("/proc/self/oom_score_adj", "w").write("500")
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock)
        if os.fork():
            os._exit(0)
        sys.stdin.readline()
        socket.send_fds(c, [request(["run", "--help"])], [0, 1, 2])
        sys.stdout.write(c.makefile("rb").readline().decode() + "\\n")
        sys.stdout.flush()
    """
    for _ in range(20):
        s = subprocess.Popen(_script(service.sock, body), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        assert s.stdin is not None and s.stdout is not None
        s.wait(30)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(s.pid - 1))
        taker = subprocess.Popen(["sleep", "30"])
        try:
            if taker.pid != s.pid:
                s.stdin.close()
                s.stdout.close()
                continue
            s.stdin.write("go\n")
            s.stdin.flush()
            reply = s.stdout.readline()
            assert not reply.startswith("pid"), service.text()
            assert "exited before its request was checked" in service.text() or "request failed" in service.text()
            return
        finally:
            taker.kill()
            taker.wait()
    pytest.skip("another process kept taking the pid")


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _sigset(status: str, key: str) -> int:
    m = re.search(rf"^{key}:\s*([0-9a-f]+)$", status, re.M)
    assert m is not None
    return int(m.group(1), 16)


def test_the_served_child_has_no_fd_of_the_service_and_the_clients_signal_state(
        debian_store: Path, service: Service, run_dir: Path) -> None:
    _needs_runc()

    def client_state() -> None:  # what the user's shell may have left: one signal ignored, one blocked
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGURG])

    cmd = helpers.shoal_cmd(debian_store, "run", "--rm", "debian:12", "--", "sh", "-c",
                            'trap "exit 0" TERM; echo ready; sleep 60 & wait')
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=client_state)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        served = _served(service)
        assert len(served) == 1, service.text()
        child = int(re.search(r"pid (\d+): shoal ", served[0]).group(1))  # type: ignore[union-attr]
        theirs, ours = _fd_targets(child), _fd_targets(service.proc.pid)
        shared = {t for fd, t in theirs.items() if fd > 2} & set(ours.values())
        assert not {t for t in shared if t.startswith(("socket:", "pipe:", "/"))}, (theirs, ours)
        assert str(service.log) not in theirs.values()
        assert theirs[1] == os.readlink(f"/proc/{p.pid}/fd/1")  # the client's own stdout
        status = Path(f"/proc/{child}/status").read_text()
        assert _sigset(status, "SigIgn") & (1 << (signal.SIGUSR2 - 1))
        assert _sigset(status, "SigBlk") & (1 << (signal.SIGURG - 1))
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)


def test_a_closed_stream_or_another_sys_path_runs_in_process(debian_store: Path, service: Service,
                                                             run_dir: Path, tmp_path: Path) -> None:
    _needs_runc()
    cmd = helpers.shoal_cmd(debian_store, "run", "--rm", "debian:12", "--", "echo", "alone")
    p = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *cmd], capture_output=True, timeout=120)
    assert (p.returncode, p.stdout) == (0, b"alone\n"), p.stderr
    assert not _served(service) and "refused" not in service.text()
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{extra}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, env=env)
    assert (p.returncode, p.stdout) == (0, b"alone\n"), p.stderr
    assert not _served(service) and "other sys.path" in service.text()
