"""The snapshotter's fork server (shoal.cli.forkserver; docs/containerd.md "Start-up"): each call runs
``shoal ARGS`` in a child of one warm interpreter, with the command's exit code and standard error,
its own command line in ``ps``, and a mount daemon that outlives the call."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from shoal.cli.forkserver import ForkServer
from shoal.snapshotter.runner import SubprocessRunner


@pytest.fixture
def server() -> ForkServer:
    fs = ForkServer()
    try:
        yield fs  # type: ignore[misc]
    finally:
        fs.close()


def _cmdline(pid: int | str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return []
    return [a for a in raw.decode(errors="replace").split("\0") if a]


def test_answers_like_the_command_line(server: ForkServer, tmp_path: Path) -> None:
    rc, err = server.run(["--version"], 60)
    assert rc == 0
    for runner in (server, SubprocessRunner()):
        rc, err = runner.run(["--store", str(tmp_path / "s"), "inspect", "nosuch:1"], 60)
        assert rc == 3, err
        assert err.startswith("shoal: error: ") and len(err.strip().splitlines()) == 1, err


def test_start_returns_once_the_server_has_imported_what_a_mount_needs(server: ForkServer) -> None:
    """A snapshotter serves only after this: its first mount must not wait behind the server's imports."""
    server.start()
    pid = server.pid
    assert pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "_cbor2" in maps and "zstandard" in maps  # C extensions of preloaded modules, mapped already
    ctl = server._ctl
    assert ctl is not None
    with pytest.raises(BlockingIOError):  # the ready byte was taken: nothing else is ever sent there
        ctl.recv(1, socket.MSG_DONTWAIT)
    assert server.run(["--version"], 60)[0] == 0


def test_a_dead_server_is_started_again(server: ForkServer) -> None:
    assert server.run(["--version"], 60)[0] == 0
    pid = server.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert server.run(["--version"], 60)[0] == 0
    assert server.pid not in (None, pid)


def test_mount_daemon_outlives_the_call_and_shows_its_command(server: ForkServer, sample: dict[str, object],
                                                             mnt: Path, run_dir: Path) -> None:
    rc, err = server.run(["--store", str(sample["store"]), "mount", str(sample["ref"]), str(mnt)], 120)
    assert rc == 0, err
    try:
        assert sorted(p.name for p in mnt.iterdir()) == sorted(p.name for p in Path(str(sample["tree"])).iterdir())
        daemons = [int(p) for p in os.listdir("/proc") if p.isdigit() and str(mnt) in _cmdline(p)]
        assert daemons, "no process shows the mount's command line"
        for pid in daemons:
            assert _cmdline(pid)[:2] == ["shoal", "--store"], _cmdline(pid)
    finally:
        rc, err = server.run(["umount", str(mnt)], 60)
        assert rc == 0, err
