"""Where mounts keep their state, and the kernel facts about them (docs/spec/mount.md §3).

    RUN/                         $SHOAL_RUN_DIR, else /run/shoal (root) or $XDG_RUNTIME_DIR/shoal
      mounts/<id>.json           MountState of the mount at a mountpoint; <id> = sha256(mountpoint)[:16]
      mounts/<id>.log            the daemon's log (stderr)
      mounts/<id>/lower          --writable: where the FUSE file system is mounted
      mounts/<id>/upper, work    --writable: overlayfs upper and work directories
      containers/<name>/         ``shoal run`` bundles (config.json, rootfs/)

The daemon writes its state file before it mounts anything and rewrites it (atomically) about once
a second with its counters; it removes the file and the <id> directory when it exits.  Whoever
finds a state file whose daemon is dead (``alive`` false) may clean up after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.atomicfile import Durability, write_atomic
from shoal.errors import PermissionDenied, ShoalError, StoreError, UsageError
from shoal.rundir import run_dir

__all__ = [
    "MountState", "MountOptions", "Exposure", "PRIVATE", "MountPaths", "run_dir", "mount_id", "paths_for",
    "load_state", "save_state", "list_states", "remove_state", "proc_start_time", "pid_alive", "mounts",
    "is_mounted", "device_of", "set_readahead", "umount", "mount_overlay", "canonical_mountpoint", "MountBusy",
]

log = logging.getLogger(__name__)


class MountBusy(UsageError):
    """The mount is in use (a process has a file open or its cwd there)."""

    errno = errno.EBUSY

MNT_DETACH = 2


def canonical_mountpoint(path: str | os.PathLike[str]) -> str:
    """An absolute path without symlinks, computed without stat-ing a (possibly dead) mount itself."""
    p = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def mount_id(mountpoint: str) -> str:
    return hashlib.sha256(canonical_mountpoint(mountpoint).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MountPaths:
    state: Path
    log: Path
    data: Path  # per-mount directory (lower/upper/work); removed on cleanup

    @property
    def lower(self) -> Path:
        return self.data / "lower"

    @property
    def upper(self) -> Path:
        return self.data / "upper"

    @property
    def work(self) -> Path:
        return self.data / "work"


def paths_for(mountpoint: str) -> MountPaths:
    d = run_dir() / "mounts"
    i = mount_id(mountpoint)
    return MountPaths(state=d / f"{i}.json", log=d / f"{i}.log", data=d / i)


@dataclass
class MountState:
    mountpoint: str
    ref: str
    name: str
    digest: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a live daemon from a reused pid
    writable: bool
    lower: str  # where the FUSE file system is mounted (== mountpoint unless writable)
    options: list[str] = field(default_factory=list)  # opt-ins given: allow_other, suid, dev
    upper: str = ""
    work: str = ""
    log: str = ""
    prefetch: str = "none"
    started_at: float = 0.0
    updated_at: float = 0.0
    ready: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    cleanup: list[str] = field(default_factory=list)  # extra directories to remove with the mount

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: dict[str, Any]) -> "MountState":
        known = {k: v for k, v in doc.items() if k in MountState.__dataclass_fields__}
        return MountState(**known)


def save_state(path: Path, st: MountState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(st.to_json(), sort_keys=True).encode(), durability=Durability.PROCESS)


def load_state(path: Path) -> MountState | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        log.warning("ignoring unreadable mount state %s: %s", path, exc)
        return None
    try:
        return MountState.from_json(doc)
    except TypeError as exc:
        log.warning("ignoring malformed mount state %s: %s", path, exc)
        return None


def list_states() -> list[MountState]:
    d = run_dir() / "mounts"
    if not d.is_dir():
        return []
    out = [load_state(p) for p in sorted(d.glob("*.json"))]
    return [s for s in out if s is not None]


def remove_state(st: MountState, keep_log: bool = False) -> None:
    """Remove a mount's state file, log and directories (call only once nothing is mounted there).
    ``keep_log`` keeps the log of a daemon that died, for a post-mortem."""
    p = paths_for(st.mountpoint)
    table = mounts()
    for d in [p.data] + [Path(c) for c in st.cleanup]:
        if d.exists() and not any(m.startswith(str(d) + "/") or m == str(d) for m in table):
            shutil.rmtree(d, ignore_errors=True)
    p.state.unlink(missing_ok=True)
    if not keep_log:
        p.log.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- processes


def proc_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot, or -1 if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return -1
    fields = raw[raw.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # zombie or dead: not serving
        return -1
    return int(fields[19])


def pid_alive(pid: int, start_time: int) -> bool:
    return pid > 0 and proc_start_time(pid) == start_time


# ---------------------------------------------------------------------------------------------- mounts


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out = bytearray()
    b = s.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(b):
        if b[i] == 0x5C and i + 4 <= len(b) and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts() -> dict[str, str]:
    """Mount point -> file system type for this mount namespace (the last mount wins)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) < 5 or not right:
                continue
            out[_unescape(parts[4])] = right.split()[0]
    return out


def is_mounted(path: str) -> bool:
    return path in mounts()


def device_of(path: str) -> str | None:
    """The ``major:minor`` of the file system mounted at ``path`` (the last mount there), from
    mountinfo: no stat, so a FUSE daemon can ask about its own mount before it serves requests."""
    dev = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split(" - ", 1)[0].split()
            if len(parts) >= 5 and _unescape(parts[4]) == path:
                dev = parts[2]
    return dev


def set_readahead(path: str, kib: int) -> bool:
    """Set the kernel read-ahead window of the file system mounted at ``path`` to ``kib`` KiB
    (``/sys/class/bdi/MAJ:MIN/read_ahead_kb``, root only); False if it could not be set."""
    dev = device_of(path)
    if dev is None:
        return False
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("cannot set the read-ahead of %s (%s): %s", path, dev, exc.strerror)
        return False
    return True


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def umount(path: str, lazy: bool = False, fuse: bool = False) -> bool:
    """Unmount ``path``; True if something was unmounted, False if nothing was mounted there.

    Raises ShoalError(EBUSY) if the mount is busy and ``lazy`` is False.  As non-root, FUSE
    mounts go through ``fusermount3 -u [-z]``.
    """
    if not is_mounted(path):
        return False
    if os.geteuid() != 0:
        if not fuse:
            raise PermissionDenied(f"unmounting {path} needs root")
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"cannot unmount {path}: {r.stderr.strip() or 'fusermount3 failed'}"
            raise MountBusy(msg + "; use --lazy to detach it now") if "busy" in r.stderr else ShoalError(msg)
        return True
    rc = _lib().umount2(os.fsencode(path), MNT_DETACH if lazy else 0)
    if rc != 0:
        e = ctypes.get_errno()
        if e == errno.EINVAL and not is_mounted(path):
            return False
        if e == errno.EBUSY:
            raise MountBusy(f"{path} is busy (a process uses it); use --lazy to detach it now")
        if e == errno.EPERM:
            raise PermissionDenied(f"unmounting {path} needs root")
        raise ShoalError(f"cannot unmount {path}: {os.strerror(e)}")
    return True


@dataclass(frozen=True)
class Exposure:
    """What a mount gives beyond its mounting user, all off by default (an image is untrusted): other
    users may enter it, its setuid bits and its device nodes take effect (docs/spec/mount.md §2)."""

    allow_other: bool = False
    suid: bool = False
    dev: bool = False

    def names(self) -> list[str]:
        """The mount options these opt-ins are, as libfuse and mount(8) spell them."""
        return [n for n, on in (("allow_other", self.allow_other), ("suid", self.suid), ("dev", self.dev)) if on]


PRIVATE = Exposure()  # the default: nothing beyond the mounting user

_MS_NOSUID, _MS_NODEV = 2, 4


BUSY_POLL_US = 50  # microseconds the FUSE reader waits for the next request before it sleeps (mount.md §2)


def default_busy_poll_us() -> int:
    """``BUSY_POLL_US`` where this process may run on two CPUs or more, else 0 (the spin would take the
    one CPU from the process whose next request it waits for)."""
    return BUSY_POLL_US if len(os.sched_getaffinity(0)) >= 2 else 0


@dataclass(frozen=True)
class MountOptions:
    """How ``shoal mount``/``run`` mount an image (the daemon serves by these)."""

    writable: bool = False
    foreground: bool = False
    prefetch: str = "auto"  # auto: the image's recorded profile (if any); all: every frame; none
    cache_frames: int = 64  # decompressed frames the Reader keeps in memory (<= 1 MiB each)
    readahead_kib: int = 1024  # the kernel's read-ahead window for the mount (one max-size FUSE read; mount.md §2)
    fuse_threads: int = 16  # worker threads for FUSE reads that fetch or decompress (mount.md §2)
    busy_poll_us: int = field(default_factory=default_busy_poll_us)  # kernel.Session's busy_poll
    ready_timeout: float = 120.0
    cleanup: tuple[str, ...] = ()  # more directories to remove when this mount goes away
    record_to: str | None = None  # write the frames served, in first-touch order, here at exit (shoal profile)
    expose: Exposure = PRIVATE  # for what the mount point shows: the overlay if writable, else FUSE


def mount_overlay(lower: str, upper: str, work: str, target: str, expose: Exposure = PRIVATE) -> None:
    """Mount a kernel overlayfs of ``lower`` (read-only) and ``upper`` at ``target``: nosuid and nodev
    unless asked (``shoal run`` asks, for a root only root can reach)."""
    for p in (lower, upper, work):
        if any(c in p for c in ",:\\\n"):
            raise StoreError(f"overlay paths may not contain ',', ':' or '\\\\': {p}")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    flags = (0 if expose.suid else _MS_NOSUID) | (0 if expose.dev else _MS_NODEV)
    rc = _lib().mount(b"shoal", os.fsencode(target), b"overlay", flags, opts)
    if rc != 0:
        e = ctypes.get_errno()
        if e == errno.EPERM:
            raise PermissionDenied(f"mounting an overlay at {target} needs root")
        raise StoreError(f"cannot mount overlay at {target}: {os.strerror(e)}")
