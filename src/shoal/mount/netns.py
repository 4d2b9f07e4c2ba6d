"""The container's network for ``shoal run`` (docs/spec/mount.md §4), as podman gives a container.

``--network`` takes podman's values:

- ``slirp4netns`` / ``pasta``: a network namespace of the container's own, with outbound connectivity
  through that user-mode network stack (the Debian packages ``slirp4netns`` and ``passt``).  Neither
  lets the container reach the host's loopback (``--disable-host-loopback``, ``--no-map-gw``): a
  registry or a daemon listening on the host's 127.0.0.1 stays out of reach.
- ``auto`` (the default): slirp4netns if installed, else pasta, else ``none`` with a warning.
- ``none``: a namespace with only a loopback interface.
- ``host``: the host's network namespace (the container can see and open every host socket, and
  with CAP_NET_RAW sniff them: only on request).

The namespace is a file (``BUNDLE/netns``) bind-mounted from ``/proc/self/ns/net`` of a short-lived
child that unshared it; runc joins it through ``linux.namespaces[].path``, and the stack's process
attaches a tap interface to it.  ``ContainerNetwork.close`` stops the stack, unmounts and removes it.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import NotFound, ShoalError, UsageError

__all__ = ["NETWORKS", "ContainerNetwork", "check_network", "open_network"]

log = logging.getLogger(__name__)

NETWORKS = ("auto", "slirp4netns", "pasta", "none", "host")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_SLIRP_DNS = "10.0.2.3"  # slirp4netns's built-in forwarder to the host's resolver
_READY_TIMEOUT = 10.0


@dataclass
class ContainerNetwork:
    """A set-up network: ``path`` is the namespace file runc joins (None: the host's network);
    ``resolv`` the resolv.conf text the container gets (None: the host's file)."""

    mode: str
    path: str | None = None
    resolv: str | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _exit_w: int | None = None
    _pidfile: Path | None = None

    def close(self) -> None:
        """Stop the network stack, unmount and remove the namespace file (idempotent)."""
        if self._exit_w is not None:  # slirp4netns exits when its exit fd reaches end of file
            os.close(self._exit_w)
            self._exit_w = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._pidfile is not None:
            _kill_pidfile(self._pidfile)
            self._pidfile = None
        if self.path is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(self.path.encode(), MNT_DETACH)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def check_network(mode: str) -> str:
    """The mode to use for ``--network mode``: checked before anything is mounted."""
    if mode not in NETWORKS:
        raise UsageError(f"unsupported --network {mode!r} ({', '.join(NETWORKS)})")
    if mode == "auto":
        found = next((m for m in ("slirp4netns", "pasta") if shutil.which(m)), None)
        if found is None:
            log.warning("neither slirp4netns nor pasta is installed: the container has no network but its "
                        "loopback (install slirp4netns, or use --network host)")
        return found or "none"
    if mode in ("slirp4netns", "pasta") and shutil.which(mode) is None:
        raise NotFound(f"--network {mode}: {mode} is not installed (Debian package "
                       f"{'passt' if mode == 'pasta' else mode})")
    return mode


def open_network(mode: str, bundle: Path) -> ContainerNetwork:
    """Set up the network of ``check_network(mode)`` for the container whose bundle is ``bundle``."""
    if mode == "host":
        return ContainerNetwork(mode)
    net = ContainerNetwork(mode, path=str(bundle / "netns"))
    try:
        _make_namespace(net.path or "")
        if mode == "slirp4netns":
            _start_slirp(net, bundle)
            net.resolv = f"nameserver {_SLIRP_DNS}\n"
        elif mode == "pasta":
            _start_pasta(net, bundle)
            net.resolv = _host_resolvers()
    except BaseException:
        net.close()
        raise
    return net


def _make_namespace(path: str) -> None:
    """A new network namespace, kept alive by a bind mount on ``path``, with its loopback up."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    # loaded before the fork, so the child takes no dynamic loader lock (run.py calls this in a thread)
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: unshare, pin, bring lo up, report
        err = b"?"
        try:
            os.close(r)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            if libc.mount(b"/proc/self/ns/net", path.encode(), None, ctypes.c_ulong(MS_BIND), None) != 0:
                raise OSError(ctypes.get_errno(), "bind mount of the namespace")
            _loopback_up()
            err = b""
        except OSError as exc:
            err = f"{exc.strerror or exc}".encode()[:200] or b"?"
        finally:
            os.write(w, err or b"ok")
            os._exit(0)
    os.close(w)
    try:
        msg = os.read(r, 256)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if msg != b"ok":
        raise ShoalError(f"cannot create the container's network namespace: {msg.decode(errors='replace')}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _start_slirp(net: ContainerNetwork, bundle: Path) -> None:
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    cmd = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox",
           "--enable-seccomp", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", "--netns-type=path",
           net.path or "", "tap0"]
    logpath = bundle / "slirp4netns.log"
    try:
        with open(logpath, "wb") as logf:
            net._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         pass_fds=(ready_w, exit_r), start_new_session=True)
    finally:
        os.close(ready_w)
        os.close(exit_r)
    net._exit_w = exit_w  # closed by close(): slirp4netns then exits (and if shoal dies, with it)
    try:
        ready, _, _ = select.select([ready_r], [], [], _READY_TIMEOUT)
        ok = bool(ready) and os.read(ready_r, 1) == b"1"
    finally:
        os.close(ready_r)
    if not ok:
        try:
            last = logpath.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        raise ShoalError("slirp4netns did not set up the container's network" + (f": {last[0]}" if last else ""))


def _start_pasta(net: ContainerNetwork, bundle: Path) -> None:
    pidfile = bundle / "pasta.pid"
    # without --foreground pasta returns once the namespace is configured, and keeps running
    # as root, pasta drops to "nobody" unless told otherwise, and nobody cannot join a root-owned namespace;
    # by default it forwards every port bound on the host's loopback into the container (-T/-U auto): none
    cmd = ["pasta", "--config-net", "--quiet", "--no-map-gw", "--runas", "0:0", "-t", "none", "-u", "none",
           "-T", "none", "-U", "none", "--netns", net.path or "", "--pid", str(pidfile)]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=_READY_TIMEOUT, check=False)
    net._pidfile = pidfile
    if p.returncode != 0:
        last = (p.stderr.decode(errors="replace").strip().splitlines() or ["exit status " + str(p.returncode)])[-1]
        raise ShoalError(f"pasta did not set up the container's network: {last}")


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _host_resolvers() -> str | None:
    """The host's resolv.conf without loopback name servers (unreachable from the container), as podman
    writes it; None when nothing is left (the container then resolves nothing)."""
    try:
        lines = Path("/etc/resolv.conf").read_text(errors="replace").splitlines()
    except OSError:
        return None
    keep = [ln for ln in lines if not (ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1
                                       and (ln.split()[1].startswith("127.") or ln.split()[1] == "::1"))]
    return "\n".join(keep) + "\n" if any(ln.startswith("nameserver") for ln in keep) else None
