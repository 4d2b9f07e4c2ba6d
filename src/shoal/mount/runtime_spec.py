"""The OCI runtime bundle's config.json for ``shoal run`` (docs/spec/mount.md §4).  Pure: no I/O.

The process comes from the image config the way Docker reads it: args are Entrypoint + Cmd
(a command given on the command line replaces Cmd), Env is merged with ``-e``, WorkingDir is the
cwd, and User (``name``, ``uid``, ``name:group``, ``uid:gid``) is resolved through the image's own
/etc/passwd and /etc/group.  Namespaces: pid, ipc, uts, mount, cgroup, and the network namespace ``mount/netns.py`` made
(or the host's network with ``--network host``).
"""

from __future__ import annotations

import os
import posixpath
import resource
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from shoal.errors import UsageError

__all__ = ["Bind", "ProcessSpec", "UserIds", "build_spec", "resolve_user", "parse_volume", "container_env",
           "container_args", "DEFAULT_PATH", "CAPABILITIES", "PIDS_LIMIT"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# podman's default capability set (containers.conf default_capabilities): Docker's without CAP_MKNOD,
# CAP_NET_RAW (packet sockets: sniffing the host's loopback traffic) and CAP_AUDIT_WRITE.
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
                "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT")
PIDS_LIMIT = 2048  # podman's default pids_limit: a fork bomb stops here
NOFILE = 1048576  # podman's RLIMIT_NOFILE for rootful containers, or the host's hard limit if lower

_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
           "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi")
_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Bind:
    source: str  # absolute host path
    destination: str  # absolute path in the container
    readonly: bool = False


@dataclass(frozen=True)
class UserIds:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


@dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: UserIds
    terminal: bool = False


def parse_volume(spec: str) -> Bind:
    """``HOST:CTR[:ro|rw]`` -> Bind (HOST must exist; CTR must be absolute)."""
    parts = spec.split(":")
    mode = ""
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(f"bad volume {spec!r} (want HOST:CONTAINER[:ro|rw])")
    host, ctr = parts
    if not posixpath.isabs(ctr) or ".." in ctr.split("/"):
        raise UsageError(f"volume target {ctr!r} must be an absolute path without '..'")
    if not os.path.exists(host):
        raise UsageError(f"volume source {host!r} does not exist")
    return Bind(os.path.realpath(host), posixpath.normpath(ctr), mode == "ro")


def _table(data: bytes | None, min_fields: int) -> list[list[str]]:
    if not data:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        f = line.split(":")
        if len(f) >= min_fields:
            rows.append(f)
    return rows


def _num(s: str) -> int | None:
    return int(s) if s.isdigit() and int(s) < 2**32 else None


def resolve_user(spec: str, read_file: Callable[[str], bytes | None]) -> UserIds:
    """Resolve an image's ``User`` the way runc's libcontainer/user does.

    ``read_file(path)`` returns a file of the image (``/etc/passwd``, ``/etc/group``) or None.
    Unknown names are an error; unknown numeric ids are used as they are (gid 0 by default).
    """
    spec = spec.strip()
    user, _, group = spec.partition(":")
    passwd = _table(read_file("/etc/passwd"), 7)
    groups = _table(read_file("/etc/group"), 4)
    name = ""
    home = "/"
    uid = 0
    gid = 0
    if user:
        n = _num(user)
        row = next((r for r in passwd if (r[2] == user if n is not None else r[0] == user)), None)
        if row is None and n is None:
            raise UsageError(f"user {user!r} is not in the image's /etc/passwd")
        if row is not None:
            name, uid, gid, home = row[0], _num(row[2]) or 0, _num(row[3]) or 0, row[5] or "/"
        else:
            uid = n or 0
    else:
        row = next((r for r in passwd if r[2] == "0"), None)
        if row is not None:
            name, home = row[0], row[5] or "/"
    if group:
        n = _num(group)
        if n is not None:
            gid = n
        else:
            grow = next((r for r in groups if r[0] == group), None)
            if grow is None or _num(grow[2]) is None:
                raise UsageError(f"group {group!r} is not in the image's /etc/group")
            gid = _num(grow[2]) or 0
    extra: list[int] = []
    if name:
        for r in groups:
            g = _num(r[2])
            if g is not None and g != gid and name in r[3].split(",") and g not in extra:
                extra.append(g)
    return UserIds(uid, gid, tuple(extra), home)


def container_env(image_env: Sequence[str], overrides: Sequence[str], host_env: Mapping[str, str],
                  hostname: str, user: UserIds, terminal: bool) -> tuple[str, ...]:
    """Image Env, then ``-e K=V`` (``-e K`` copies K from the host, if set), then defaults
    for PATH, HOSTNAME, HOME and TERM as Docker sets them."""
    env: dict[str, str] = {}
    for kv in image_env:
        k, sep, v = str(kv).partition("=")
        if k and sep:
            env[k] = v
    for kv in overrides:
        k, sep, v = kv.partition("=")
        if not k:
            raise UsageError(f"bad environment variable {kv!r} (want KEY=VALUE)")
        if sep:
            env[k] = v
        elif k in host_env:
            env[k] = host_env[k]
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    env.setdefault("HOME", user.home)
    if terminal:
        env.setdefault("TERM", "xterm")
    return tuple(f"{k}={v}" for k, v in env.items())


def container_args(config: Mapping[str, Any], command: Sequence[str], entrypoint: str | None) -> tuple[str, ...]:
    """Entrypoint + (``command`` or Cmd).  ``entrypoint`` overrides the image's ("" removes it)."""
    ep: list[str]
    if entrypoint is not None:
        ep = [entrypoint] if entrypoint else []
    else:
        ep = [str(a) for a in (config.get("Entrypoint") or [])]
    cmd = list(command) if command else [str(a) for a in (config.get("Cmd") or [])]
    args = tuple(ep + cmd)
    if not args:
        raise UsageError("the image has no Entrypoint or Cmd; give a command after --")
    return args


def _mounts(binds: Sequence[Bind], read_only: bool = False) -> list[dict[str, Any]]:
    m: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if read_only:  # podman's --read-only-tmpfs (its default): the usual scratch places stay writable
        m += [{"destination": d, "type": "tmpfs", "source": "tmpfs",
               "options": ["rw", "rprivate", "nosuid", "nodev", "tmpcopyup"]} for d in ("/tmp", "/var/tmp", "/run")]
    for b in binds:
        m.append({"destination": b.destination, "type": "bind", "source": b.source,
                  "options": ["rbind", "rprivate", "ro" if b.readonly else "rw"]})
    return m


def build_spec(proc: ProcessSpec, hostname: str, binds: Sequence[Bind], rootfs: str = "rootfs", *,
               caps: Sequence[str] = CAPABILITIES, seccomp: dict[str, Any] | None = None,
               pids_limit: int | None = PIDS_LIMIT, netns: str | None = None,
               read_only: bool = False) -> dict[str, Any]:
    """An OCI runtime-spec 1.0.2 config.json document: podman's defaults for a rootful container
    (its capabilities, ``noNewPrivileges``, the seccomp filter given, a pids limit, its own cgroup
    namespace), in the network namespace pinned at ``netns`` (None: the host's network)."""
    caps = list(caps)
    mine = caps if proc.user.uid == 0 else []
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if pids_limit:
        resources["pids"] = {"limit": pids_limit}
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
        + ([{"type": "network", "path": netns}] if netns is not None else []),
        "resources": resources,
        "maskedPaths": list(_MASKED),
        "readonlyPaths": list(_READONLY),
    }
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": proc.terminal,
            "user": {"uid": proc.user.uid, "gid": proc.user.gid,
                     **({"additionalGids": list(proc.user.groups)} if proc.user.groups else {})},
            "args": list(proc.args),
            "env": list(proc.env),
            "cwd": proc.cwd,
            "capabilities": {"bounding": caps, "effective": mine, "permitted": mine},
            "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        },
        "root": {"path": rootfs, "readonly": read_only},
        "hostname": hostname,
        "mounts": _mounts(binds, read_only),
        "linux": linux,
    }
