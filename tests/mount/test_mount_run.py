"""``shoal run`` of a real Debian image with real runc (and the chroot fallback)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mountkit import mounts_under, shoal

import helpers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debian_store(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shoal.build import BuildOptions, build
    from shoal.format.manifest import ImageConfig
    from shoal.store import Store

    d = tmp_path_factory.mktemp("debian-store")
    conf = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_VAR=from-image"],
            "Cmd": ["/bin/sh"]}
    build(Store.open(d), debian_rootfs, "debian:12", BuildOptions(workers=2, config=ImageConfig(config=conf)))
    return d


def _clean(run_dir: Path) -> None:
    assert not mounts_under(run_dir)
    assert not list((run_dir / "mounts").glob("*.json")) if (run_dir / "mounts").exists() else True
    containers = run_dir / "containers"
    assert not containers.exists() or not list(containers.iterdir())


def needs_runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")


def test_run_exit_code_and_stdout(debian_store: Path, run_dir: Path) -> None:
    needs_runc()
    p = shoal(debian_store, "run", "--rm", "debian:12", "--", "sh", "-c", "echo hi; exit 3", check=False,
              stdin=open(os.devnull, "rb"))
    assert (p.returncode, p.stdout, p.stderr) == (3, b"hi\n", b"")
    _clean(run_dir)


def test_run_env_volume_stdin_and_user(debian_store: Path, run_dir: Path, tmp_path: Path) -> None:
    needs_runc()
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in.txt").write_bytes(b"from the host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = ('echo "$FOO|$IMAGE_VAR|$HOME"; cat /data/in.txt; echo written > /data/out.txt; '
              'cat; id -u; pwd; touch /ro/x 2>/dev/null || echo ro-ok')
    p = shoal(debian_store, "run", "--rm", "-e", "FOO=bar baz", "-v", f"{vol}:/data", "-v", f"{ro}:/ro:ro",
              "-w", "/tmp", "debian:12", "sh", "-c", script, input=b"piped stdin\n", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == ["bar baz|from-image|/root", "from the host", "piped stdin", "0", "/tmp",
                                              "ro-ok"]
    assert (vol / "out.txt").read_bytes() == b"written\n"
    assert not (ro / "x").exists()
    p = shoal(debian_store, "run", "--rm", "-u", "nobody", "debian:12", "sh", "-c", "id -u; id -g; echo $HOME",
              stdin=open(os.devnull, "rb"))
    assert p.stdout.decode().split() == ["65534", "65534", "/nonexistent"]
    p = shoal(debian_store, "run", "--rm", "-u", "ghost", "debian:12", "true", check=False)
    helpers.assert_one_line_error(p, "ghost")
    _clean(run_dir)


def test_run_keeps_container_without_rm(debian_store: Path, run_dir: Path) -> None:
    needs_runc()
    p = shoal(debian_store, "run", "--name", "kept", "debian:12", "sh", "-c", "echo state > /root/file",
              stdin=open(os.devnull, "rb"))
    assert p.stdout == b""
    rootfs = run_dir / "containers" / "kept" / "rootfs"
    assert (rootfs / "root" / "file").read_bytes() == b"state\n"
    rows = json.loads(shoal(None, "status", "--json").stdout)["mounts"]
    assert [r["mountpoint"] for r in rows] == [str(rootfs)] and rows[0]["writable"]
    helpers.assert_one_line_error(shoal(debian_store, "run", "--name", "kept", "debian:12", "true", check=False),
                                  "kept")
    shoal(None, "umount", rootfs)
    _clean(run_dir)


def test_a_missing_runtime_is_an_error_not_a_chroot(debian_store: Path, run_dir: Path, tmp_path: Path) -> None:
    """A misspelled --runtime used to fall back to a chroot silently (all capabilities, host PID namespace,
    host /dev): now it fails before anything is mounted, and the chroot needs --unsafe-chroot."""
    p = shoal(debian_store, "run", "--rm", "--runtime", "no-such-runtime", "debian:12", "true", check=False,
              stdin=open(os.devnull, "rb"))
    line = helpers.assert_one_line_error(p, "no-such-runtime")
    assert p.returncode == 3 and "not found" in line and "--unsafe-chroot" in line
    assert not mounts_under(run_dir)
    vol = tmp_path / "vol"
    vol.mkdir()
    p = shoal(debian_store, "run", "--rm", "--runtime", "no-such-runtime", "--unsafe-chroot", "-e", "A=1", "-v",
              f"{vol}:/data", "debian:12", "sh", "-c", "echo $A > /data/a; echo out; exit 4", check=False,
              stdin=open(os.devnull, "rb"))
    assert p.returncode == 4 and p.stdout == b"out\n"
    assert b"unsafe-chroot" in p.stderr and p.stderr.count(b"\n") == 1
    assert (vol / "a").read_bytes() == b"1\n"
    _clean(run_dir)


def test_run_defaults_are_podmans(debian_store: Path, run_dir: Path) -> None:
    """Inspected from inside: no new privileges, seccomp filter mode, podman's capability set (no NET_RAW,
    MKNOD, AUDIT_WRITE), a pids limit, read-only /proc/sys; the opt-outs change exactly that."""
    needs_runc()
    script = ("grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; "
              "echo 1 > /proc/sys/kernel/hostname 2>/dev/null || echo sys-ro")
    p = shoal(debian_store, "run", "--rm", "debian:12", "sh", "-c", script, stdin=open(os.devnull, "rb"))
    got = dict(line.split(":\t") for line in p.stdout.decode().splitlines() if ":\t" in line)
    assert got == {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "00000000800405fb"}, p.stdout  # podman's 11 caps
    assert b"sys-ro" in p.stdout
    spec_caps = int(got["CapEff"], 16)
    for bit in (13, 27, 29):  # CAP_NET_RAW, CAP_MKNOD, CAP_AUDIT_WRITE
        assert not spec_caps & (1 << bit)
    p = shoal(debian_store, "run", "--rm", "--security-opt", "seccomp=unconfined", "--cap-drop", "all",
              "--cap-add", "net_raw", "debian:12", "sh", "-c", script, stdin=open(os.devnull, "rb"))
    got = dict(line.split(":\t") for line in p.stdout.decode().splitlines() if ":\t" in line)
    assert got == {"NoNewPrivs": "1", "Seccomp": "0", "CapEff": f"{1 << 13:016x}"}, p.stdout
    p = shoal(debian_store, "run", "--rm", "--security-opt", "seccomp=/no/such.json", "debian:12", "true",
              check=False, stdin=open(os.devnull, "rb"))
    helpers.assert_one_line_error(p, "seccomp profile")
    assert p.returncode == 3 and not mounts_under(run_dir)
    _clean(run_dir)


def _host_address() -> str | None:
    """An address of this machine that is not loopback (``hostname -I``), or None."""
    import subprocess

    p = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
    return next((a for a in p.stdout.split() if "." in a and not a.startswith("127.")), None)


def test_run_network_is_its_own(debian_store: Path, run_dir: Path) -> None:
    """podman's network defaults: the container's own namespace; no packet sockets (no CAP_NET_RAW), so
    it cannot sniff the host's loopback traffic; outbound connections through slirp4netns or pasta, but
    not to the host's loopback; --network none and host on request."""
    import socket
    import threading

    needs_runc()
    if shutil.which("slirp4netns") is None and shutil.which("pasta") is None:
        pytest.skip("neither slirp4netns nor pasta is installed")
    addr = _host_address()
    served: list[bytes] = []
    lsn = socket.socket()
    lsn.bind(("0.0.0.0", 0))  # the host's loopback and its other addresses
    lsn.listen(4)
    port = lsn.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                c, _ = lsn.accept()
            except OSError:
                return
            with c:
                served.append(c.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    host_ns = os.readlink("/proc/self/ns/net")
    script = ("readlink /proc/self/ns/net; ls /sys/class/net | tr '\\n' ' '; echo; "
              "perl -MSocket -e 'socket(S, 17, 3, 0) and print \"packet-socket\\n\" or print \"no-packet: $!\\n\"'; "
              f"timeout 5 bash -c 'echo via-loopback > /dev/tcp/127.0.0.1/{port}' 2>/dev/null || echo lo-refused; "
              f"timeout 5 bash -c 'echo via-gateway > /dev/tcp/10.0.2.2/{port}' 2>/dev/null || echo gw-refused; ")
    if addr is not None:
        script += f"timeout 10 bash -c 'echo outbound > /dev/tcp/{addr}/{port}' && echo out-ok"
    try:
        p = shoal(debian_store, "run", "--rm", "debian:12", "sh", "-c", script, stdin=open(os.devnull, "rb"))
        lines = p.stdout.decode().splitlines()
        assert lines[0].startswith("net:[") and lines[0] != host_ns, p.stdout
        assert "lo" in lines[1].split() and len(lines[1].split()) == 2, p.stdout  # lo and the tap device
        assert lines[2].startswith("no-packet: Operation not permitted"), p.stdout
        assert "lo-refused" in lines and "gw-refused" in lines, p.stdout
        assert b"via-loopback\n" not in served and b"via-gateway\n" not in served
        if addr is not None:
            assert "out-ok" in lines and b"outbound\n" in served, (p.stdout, served)
        if shutil.which("pasta") is not None:  # pasta copies the host's address: no outbound check here
            p = shoal(debian_store, "run", "--rm", "--network", "pasta", "debian:12", "sh", "-c",
                      "readlink /proc/self/ns/net; " + script.split("; ", 3)[3].rsplit("timeout 10", 1)[0],
                      stdin=open(os.devnull, "rb"))
            lines = p.stdout.decode().splitlines()
            assert lines[0] != host_ns and "lo-refused" in lines, p.stdout
            assert b"via-loopback\n" not in served
        p = shoal(debian_store, "run", "--rm", "--network", "none", "debian:12", "sh", "-c",
                  "readlink /proc/self/ns/net; ls /sys/class/net | tr '\\n' ' '", stdin=open(os.devnull, "rb"))
        ns, devs = p.stdout.decode().splitlines()
        assert ns != host_ns and devs.split() == ["lo"], p.stdout
        p = shoal(debian_store, "run", "--rm", "--network", "host", "debian:12", "readlink", "/proc/self/ns/net",
                  stdin=open(os.devnull, "rb"))
        assert p.stdout.decode().strip() == host_ns
        p = shoal(debian_store, "run", "--rm", "--network", "bridge", "debian:12", "true", check=False,
                  stdin=open(os.devnull, "rb"))
        assert p.returncode == 2 and b"bridge" in p.stderr
    finally:
        lsn.close()
    _clean(run_dir)


def test_run_pids_limit_stops_a_fork_bomb(debian_store: Path, run_dir: Path) -> None:
    """A fork loop meets the pids limit inside the container (EAGAIN), not the host's process table."""
    needs_runc()
    bomb = ("my $n = 0; my @k; while ($n < 500) { my $p = fork; if (!defined $p) { print \"stopped $n $!\\n\"; last }"
            " if ($p == 0) { sleep 30; exit 0 } push @k, $p; $n++ } kill 9, @k; print \"forked $n\\n\"")
    p = shoal(debian_store, "run", "--rm", "--pids-limit", "40", "debian:12", "perl", "-e", bomb,
              stdin=open(os.devnull, "rb"))
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "stopped 39 Resource temporarily unavailable" and lines[1] == "forked 39", p.stdout
    _clean(run_dir)


def test_run_read_only_root(debian_store: Path, run_dir: Path) -> None:
    needs_runc()
    script = "touch /etc/x 2>/dev/null || echo root-ro; touch /tmp/x /run/x /var/tmp/x && echo scratch-rw"
    p = shoal(debian_store, "run", "--rm", "--read-only", "debian:12", "sh", "-c", script,
              stdin=open(os.devnull, "rb"))
    assert p.stdout.decode().split() == ["root-ro", "scratch-rw"], p.stdout
    _clean(run_dir)
