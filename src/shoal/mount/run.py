"""``shoal run``: a writable lazy mount, an OCI bundle over it, and ``runc run`` (docs/spec/mount.md §4).

The container's stdin, stdout and stderr are this process's own, passed through untouched (no
terminal unless stdin is a TTY); the return value is the container's exit code.  Shoal's own
messages go to the log (stderr).  A missing runtime is an error; only with ``--unsafe-chroot`` does a
chroot in a private mount namespace stand in, with a warning: it isolates nothing else.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, TypeVar

from shoal.errors import NotFound, PermissionDenied, UsageError
from shoal.format.model import Kind
from shoal.mount import control, daemon, netns, seccomp
from shoal.mount import state as ms
from shoal.mount.image import OpenedImage, OpenOptions, StorePath, open_image
from shoal.mount.runtime_spec import (
    CAPABILITIES,
    PIDS_LIMIT,
    Bind,
    ProcessSpec,
    build_spec,
    container_args,
    container_env,
    parse_volume,
    resolve_user,
)
from shoal.reader import Reader

__all__ = ["RunOptions", "run", "run_image", "container_process", "bundle_dir"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_ETC = 4 * 1024 * 1024
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


@dataclass(frozen=True)
class RunOptions:
    command: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    name: str | None = None
    rm: bool = False
    entrypoint: str | None = None
    workdir: str | None = None
    user: str | None = None
    runtime: str = "runc"
    unsafe_chroot: bool = False  # no runtime: a bare chroot, no isolation (only when asked, by this name)
    security_opt: tuple[str, ...] = ()  # podman's spelling: seccomp=unconfined|FILE
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()  # "all" drops every capability
    pids_limit: int = PIDS_LIMIT  # 0: none
    network: str = "auto"  # podman's --network: auto|slirp4netns|pasta|none|host (mount/netns.py)
    read_only: bool = False  # a read-only root, with tmpfs on /tmp, /var/tmp and /run
    tty: bool | None = None  # None: a terminal iff stdin is a TTY
    prefetch: str = "auto"
    timeout: float | None = None  # stop the container after this many seconds (exit code 124)
    record_to: str | None = None  # the mount daemon writes the frames it served, in first-touch order, here


def bundle_dir(name: str) -> Path:
    return ms.run_dir() / "containers" / name


def _image_file(reader: Reader, root: str | None) -> Callable[[str], bytes | None]:
    """A file of the image, resolved through the index as the container would (symlinks stay inside
    the image); its bytes come from the mount at ``root`` if given (so the mount daemon fetches,
    prefetches and records them), else from the Reader."""

    def read(path: str) -> bytes | None:
        e = reader.resolve(path.lstrip("/").encode())
        if e is not None and e.kind == Kind.HARDLINK:
            e = reader.index.lookup(e.target)
        if e is None or e.kind != Kind.FILE or e.size > _MAX_ETC:
            return None
        if root is None:
            return reader.read(e, 0, e.size)
        fd = os.open(os.path.join(os.fsencode(root), e.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read(_MAX_ETC)

    return read


def container_process(image: OpenedImage, opts: RunOptions, hostname: str, terminal: bool,
                      root: str | None = None) -> ProcessSpec:
    """The container's process from the image config and the run options (image files read through
    the mount at ``root`` if given)."""
    conf = image.config.config
    user = resolve_user(opts.user if opts.user is not None else str(conf.get("User") or ""),
                        _image_file(Reader(image.index, image.source), root))
    env = container_env([str(x) for x in (conf.get("Env") or [])], opts.env, os.environ, hostname, user, terminal)
    cwd = opts.workdir or str(conf.get("WorkingDir") or "/")
    if not cwd.startswith("/"):
        raise UsageError(f"working directory {cwd!r} must be absolute")
    return ProcessSpec(container_args(conf, opts.command, opts.entrypoint), env, cwd, user, terminal)


def _host_binds(binds: list[Bind], resolv: str | None = None) -> list[Bind]:
    """The host's hosts file, and its resolver file or ``resolv`` (a file of the bundle written for the
    container's own network), read-only, as podman does."""
    taken = {b.destination for b in binds}
    extra = [Bind(p, p, True) for p in ("/etc/resolv.conf", "/etc/hosts") if p not in taken and os.path.isfile(p)]
    if resolv is not None:
        extra = [Bind(resolv, b.destination, True) if b.destination == "/etc/resolv.conf" else b for b in extra]
    return extra + binds


def capabilities(opts: RunOptions) -> list[str]:
    """podman's default set, then ``--cap-drop`` (``all`` drops every one), then ``--cap-add``."""
    def norm(c: str) -> str:
        c = c.strip().upper()
        if not re.fullmatch(r"[A-Z_]+", c):
            raise UsageError(f"bad capability {c!r}")
        return c if c.startswith("CAP_") or c == "ALL" else "CAP_" + c

    drop = {norm(c) for c in opts.cap_drop}
    caps = [] if "ALL" in drop else [c for c in CAPABILITIES if c not in drop]
    for c in map(norm, opts.cap_add):
        if c == "ALL":
            raise UsageError("--cap-add all is not supported: name the capabilities")
        if c not in caps:
            caps.append(c)
    return caps


def seccomp_for(opts: RunOptions, caps: list[str]) -> dict[str, Any] | None:
    """The ``linux.seccomp`` object: containers-common's profile by default, ``--security-opt
    seccomp=FILE`` for another, ``seccomp=unconfined`` for none."""
    path: str = str(seccomp.DEFAULT_PROFILE)
    for o in opts.security_opt:
        key, sep, value = o.partition("=")
        if key != "seccomp" or not sep or not value:
            raise UsageError(f"unsupported --security-opt {o!r} (seccomp=unconfined|FILE)")
        path = value
    if path == "unconfined":
        return None
    # a profile the user names is taken as it is; the default one without x32 (mount/seccomp.py)
    return seccomp.oci_profile(seccomp.load_profile(path), caps, x32=path != str(seccomp.DEFAULT_PROFILE))


def find_runtime(opts: RunOptions) -> str | None:
    """The OCI runtime's path; None only with ``unsafe_chroot``.  A missing or misspelled runtime is an
    error before anything is mounted, never a silent fall back to a chroot (which would give the
    container every capability, the host's PID namespace, ``/dev`` and a writable ``/sys``)."""
    found = shutil.which(opts.runtime)
    if found is None and not opts.unsafe_chroot:
        raise NotFound(f"OCI runtime {opts.runtime!r} not found in PATH (install runc, or name one with --runtime; "
                       "--unsafe-chroot runs without any isolation)")
    return found


def _check_run(opts: RunOptions) -> str:
    if os.geteuid() != 0:
        raise PermissionDenied("shoal run needs root (overlay mount and container runtime)")
    find_runtime(opts)
    if opts.network not in netns.NETWORKS:  # run_image checks the rest (installed tools) before mounting
        raise UsageError(f"unsupported --network {opts.network!r} ({', '.join(netns.NETWORKS)})")
    name = opts.name or f"shoal-{secrets.token_hex(6)}"
    if not _NAME.match(name):
        raise UsageError(f"bad container name {name!r} (letters, digits, '_', '.', '-')")
    return name


def run(ref: str, opts: RunOptions = RunOptions(), store_root: StorePath = None,
        open_opts: OpenOptions | None = None) -> int:
    """Run a container of image ``ref``; return its exit code."""
    _check_run(opts)
    return run_image(open_image(ref, store_root, open_opts), opts)


def run_image(image: OpenedImage, opts: RunOptions = RunOptions()) -> int:
    """Run a container of an opened image; return its exit code."""
    name = _check_run(opts)
    caps = capabilities(opts)
    sec = seccomp_for(opts, caps)  # before anything is mounted: a bad profile or option fails first
    binds = [parse_volume(v) for v in opts.volumes]
    network = netns.check_network(opts.network)
    terminal = (sys.stdin is not None and sys.stdin.isatty()) if opts.tty is None else opts.tty  # stdin may be closed
    bundle = bundle_dir(name)
    bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # the root is mounted suid and dev (an image's setuid binaries work in the container, as under
    # podman): only because no one but root can reach it
    os.chmod(bundle.parent, 0o700)
    try:
        bundle.mkdir()
    except FileExistsError:
        raise UsageError(f"a container named {name} exists ({bundle}); pick another --name") from None
    rootfs = bundle / "rootfs"
    started = False
    mounted = False
    net: netns.ContainerNetwork | None = None
    try:
        rootfs.mkdir()
        daemon.start(image, str(rootfs), daemon.MountOptions(writable=True, expose=ms.Exposure(suid=True, dev=True),
                                                             prefetch=opts.prefetch, cleanup=(str(bundle),),
                                                             record_to=opts.record_to))
        mounted = True
        runtime = find_runtime(opts)
        if runtime is None:
            proc = container_process(image, opts, name, terminal, str(rootfs))
            started = True
            log.warning("--unsafe-chroot: %s not found, running in a bare chroot with no isolation (every "
                        "capability, the host's PID namespace and devices)", opts.runtime)
            return _run_chroot(str(rootfs), proc, _host_binds(binds), opts.timeout)
        # after the mount: /etc/passwd and /etc/group are read through it (fetched, prefetched,
        # recorded), while the container's network is set up
        net_f = _in_thread(netns.open_network, network, bundle)
        try:
            proc = container_process(image, opts, name, terminal, str(rootfs))
        except BaseException:
            net = net_f.result() if net_f.exception() is None else None  # closed below; this error is reported
            raise
        net = net_f.result()
        resolv = None
        if net.resolv is not None:
            (bundle / "resolv.conf").write_text(net.resolv)
            resolv = str(bundle / "resolv.conf")
        spec = build_spec(proc, name, _host_binds(binds, resolv), caps=caps, seccomp=sec,
                          pids_limit=opts.pids_limit, netns=net.path, read_only=opts.read_only)
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        started = True
        return _run_runtime(runtime, bundle, name, terminal, opts.timeout)
    finally:
        if net is not None:
            net.close()
        if opts.rm or not started:
            _remove(bundle, rootfs, mounted)
        else:
            log.info("container %s stopped; its root stays at %s (shoal umount %s removes it)", name, rootfs, rootfs)


def _in_thread(fn: Callable[..., _T], *args: Any) -> "Future[_T]":
    """``fn(*args)`` in a thread of its own (it waits on child processes and pipes, so it runs beside
    the caller's reads instead of after them); its result or error through the future."""
    fut: Future[_T] = Future()

    def work() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=work, name="shoal-run", daemon=True).start()
    return fut


def _remove(bundle: Path, rootfs: Path, mounted: bool) -> None:
    if mounted:
        try:
            control.umount(str(rootfs))
        except ms.MountBusy:
            log.warning("%s is still busy; detaching it", rootfs)
            control.umount(str(rootfs), lazy=True)
        except NotFound:
            pass
    if not any(m == str(rootfs) or m.startswith(str(bundle) + "/") for m in ms.mounts()):
        shutil.rmtree(bundle, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- runc


def _run_runtime(runtime: str, bundle: Path, name: str, terminal: bool, timeout: float | None = None) -> int:
    cmd = [runtime, "run", "--bundle", str(bundle), name]
    log.debug("timeline: runtime: %s", " ".join(cmd))
    child = subprocess.Popen(cmd)
    # A terminal's ^C and ^\ reach runc through the process group; forward the rest to runc,
    # which forwards them to the container.
    forwarded = [signal.SIGTERM, signal.SIGHUP] + ([] if terminal else [signal.SIGINT, signal.SIGQUIT])
    ignored = [signal.SIGINT, signal.SIGQUIT] if terminal else []

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in forwarded}
    old.update({s: signal.signal(s, signal.SIG_IGN) for s in ignored})
    try:
        try:
            rc = child.wait(timeout)
        except subprocess.TimeoutExpired:
            log.info("stopping container %s after %gs", name, timeout)
            _stop_runtime(runtime, name, child)
            return 124
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _runtime_delete(runtime, name)
    return rc if rc >= 0 else 128 - rc


def _stop_runtime(runtime: str, name: str, child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the container (its pid 1 may ignore it), then SIGKILL after 2 s."""
    for sig, grace in (("TERM", 2.0), ("KILL", 10.0)):
        subprocess.run([runtime, "kill", name, sig], capture_output=True)
        try:
            child.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
    child.kill()
    child.wait()


def _runtime_delete(runtime: str, name: str) -> None:
    """``runc run`` removes its container on exit; make sure, quietly."""
    r = subprocess.run([runtime, "state", name], capture_output=True)
    if r.returncode == 0:
        subprocess.run([runtime, "delete", "--force", name], capture_output=True)


# ---------------------------------------------------------------------------------------------- chroot


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _sys_mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), None), f"mount {target}")


def inside(rootfs: str, path: str) -> str:
    """Host path of the container's ``path``, resolving symlinks as the chrooted process would."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = rootfs
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            cur = os.path.dirname(cur) if cur != rootfs else rootfs
            continue
        nxt = os.path.join(cur, name)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many levels of symbolic links in {path}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = rootfs
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        cur = nxt
    return cur


def _chroot_child(rootfs: str, proc: ProcessSpec, binds: list[Bind]) -> None:  # pragma: no cover - child
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _sys_mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    for src, dst, fstype, flags in (("proc", "/proc", "proc", 0), ("/dev", "/dev", None, MS_BIND | MS_REC),
                                    ("/sys", "/sys", None, MS_BIND | MS_REC)):
        target = inside(rootfs, dst)
        if os.path.isdir(target):
            _sys_mount(libc, src, target, fstype, flags)
    for b in binds:
        target = inside(rootfs, b.destination)
        if os.path.isdir(b.source):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "ab").close()
        _sys_mount(libc, b.source, target, None, MS_BIND | MS_REC)
        if b.readonly:
            _sys_mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.chroot(rootfs)
    os.chdir(proc.cwd)
    os.setgroups(list(proc.user.groups))
    os.setgid(proc.user.gid)
    os.setuid(proc.user.uid)
    env = dict(kv.split("=", 1) for kv in proc.env)
    os.execvpe(proc.args[0], list(proc.args), env)


def _run_chroot(rootfs: str, proc: ProcessSpec, binds: list[Bind], timeout: float | None = None) -> int:
    rootfs = os.path.realpath(rootfs)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 127
        try:
            _chroot_child(rootfs, proc, binds)
        except OSError as exc:
            log.error("cannot start %s in the chroot: %s", proc.args[0], exc.strerror or exc)
            code = 126 if isinstance(exc, PermissionError) else 127
        except BaseException as exc:
            log.error("cannot start %s in the chroot: %s", proc.args[0], exc)
        finally:
            logging.shutdown()
            os._exit(code)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        status = _wait_pid(pid, timeout)
        if status is None:
            return 124
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _wait_pid(pid: int, timeout: float | None) -> int | None:
    """The wait status of ``pid``; after ``timeout`` seconds it is killed and None is returned."""
    if timeout is None:
        return os.waitpid(pid, 0)[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
