"""Unmount a shoal mount and report the state of mounts (docs/spec/mount.md §3): works whether or not
the daemon is alive.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from shoal.errors import NotFound, ShoalError
from shoal.mount import state as ms

__all__ = ["MountStatus", "umount", "status", "quiet_umount", "force_unmount"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountStatus:
    state: ms.MountState
    alive: bool
    mounted: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.state.to_json(), "alive": self.alive, "mounted": self.mounted}


# ---------------------------------------------------------------------------------------------- umount


def quiet_umount(path: str, lazy: bool, fuse: bool = False) -> None:
    """Unmount ``path``, logging (not raising) a failure: for clean-up paths."""
    try:
        ms.umount(path, lazy=lazy, fuse=fuse)
    except ShoalError as exc:
        log.warning("%s", exc)


def force_unmount(st: ms.MountState) -> None:
    quiet_umount(st.mountpoint, lazy=True, fuse=not st.writable)
    if st.writable:
        quiet_umount(st.lower, lazy=True, fuse=True)


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
        force_unmount(st)
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
    force_unmount(st)
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
