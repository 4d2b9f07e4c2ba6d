"""store/forkgate.py: a child forked while a thread holds a store flock does not inherit it held."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from shoal.store import forkgate


def _child_can_lock(path: Path) -> bool:
    """Fork; the child tries a non-blocking flock of ``path`` on a new open and reports."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                ok = True
            except BlockingIOError:
                pass
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _hold(path: Path, gated: bool, entered: threading.Event, seconds: float) -> None:
    def section() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entered.set()
            time.sleep(seconds)
        finally:
            os.close(fd)

    if gated:
        with forkgate.held():
            section()
    else:
        section()


def _fork_during_section(path: Path, gated: bool) -> tuple[bool, float]:
    entered = threading.Event()
    t = threading.Thread(target=_hold, args=(path, gated, entered, 0.5))
    t.start()
    assert entered.wait(10)
    t0 = time.monotonic()
    ok = _child_can_lock(path)
    waited = time.monotonic() - t0
    t.join()
    return ok, waited


def test_fork_waits_for_a_gated_section(tmp_path: Path) -> None:
    ok, waited = _fork_during_section(tmp_path / "lock", gated=True)
    assert ok  # the section had closed its descriptor before the fork
    assert waited > 0.2


def test_the_hazard_is_real_without_the_gate(tmp_path: Path) -> None:
    """Without the gate the child inherits the held lock: it cannot take it (the bug the gate fixes)."""
    ok, _ = _fork_during_section(tmp_path / "lock", gated=False)
    assert not ok


def test_gate_is_usable_after_fork(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            with forkgate.held():
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with forkgate.held():
        pass
