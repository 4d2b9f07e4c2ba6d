"""Pure parts of the mount package: runtime spec, user resolution, references, state files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.errors import NotFound, UsageError
from shoal.mount import image as mimage
from shoal.mount import state as ms
from shoal.mount.runtime_spec import (
    Bind,
    ProcessSpec,
    UserIds,
    build_spec,
    container_args,
    container_env,
    parse_volume,
    resolve_user,
)
from shoal.reader import FrameSource

PASSWD = b"""root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# comment
app:x:1000:1001:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = b"""root:x:0:
tty:x:5:
audio:x:29:app,daemon
appgrp:x:1001:
video:x:44:app
"""


def _files(path: str) -> bytes | None:
    return {"/etc/passwd": PASSWD, "/etc/group": GROUP}.get(path)


@pytest.mark.parametrize("spec,want", [
    ("", UserIds(0, 0, (), "/root")),
    ("root", UserIds(0, 0, (), "/root")),
    ("app", UserIds(1000, 1001, (29, 44), "/home/app")),
    ("1000", UserIds(1000, 1001, (29, 44), "/home/app")),
    ("app:tty", UserIds(1000, 5, (29, 44), "/home/app")),
    ("app:0", UserIds(1000, 0, (29, 44), "/home/app")),
    ("4242", UserIds(4242, 0, (), "/")),
    ("4242:4343", UserIds(4242, 4343, (), "/")),
    ("daemon", UserIds(1, 1, (29,), "/usr/sbin")),
])
def test_resolve_user(spec: str, want: UserIds) -> None:
    assert resolve_user(spec, _files) == want


def test_resolve_user_errors_and_missing_files() -> None:
    with pytest.raises(UsageError, match="ghost"):
        resolve_user("ghost", _files)
    with pytest.raises(UsageError, match="nogroup"):
        resolve_user("app:nogroup", _files)
    assert resolve_user("", lambda p: None) == UserIds(0, 0, (), "/")
    assert resolve_user("12:34", lambda p: None) == UserIds(12, 34, (), "/")


def test_container_args() -> None:
    conf = {"Entrypoint": ["/ep", "-x"], "Cmd": ["default"]}
    assert container_args(conf, (), None) == ("/ep", "-x", "default")
    assert container_args(conf, ("mine", "a"), None) == ("/ep", "-x", "mine", "a")
    assert container_args(conf, ("mine",), "") == ("mine",)
    assert container_args(conf, (), "/other") == ("/other", "default")
    assert container_args({"Cmd": ["/bin/sh"]}, (), None) == ("/bin/sh",)
    with pytest.raises(UsageError):
        container_args({}, (), None)


def test_container_env() -> None:
    u = UserIds(0, 0, (), "/root")
    env = container_env(["A=1", "PATH=/bin", "B=x=y"], ["A=2", "HOSTVAR", "MISSING", "C="], {"HOSTVAR": "h"},
                        "box", u, terminal=False)
    assert env == ("A=2", "PATH=/bin", "B=x=y", "HOSTVAR=h", "C=", "HOSTNAME=box", "HOME=/root")
    assert "TERM=xterm" in container_env([], [], {}, "box", u, terminal=True)
    assert any(e.startswith("PATH=/usr/local/sbin") for e in container_env([], [], {}, "b", u, False))
    with pytest.raises(UsageError):
        container_env([], ["=x"], {}, "b", u, False)


def test_parse_volume(tmp_path: Path) -> None:
    assert parse_volume(f"{tmp_path}:/data") == Bind(str(tmp_path), "/data", False)
    assert parse_volume(f"{tmp_path}:/data/:ro") == Bind(str(tmp_path), "/data", True)
    for bad in ("nocolon", f"{tmp_path}:relative", f"{tmp_path}:/a/../b", "/does/not/exist:/x", f"{tmp_path}:/x:rx"):
        with pytest.raises(UsageError):
            parse_volume(bad)


def test_build_spec_shape() -> None:
    proc = ProcessSpec(("sh", "-c", "x"), ("A=1",), "/w", UserIds(1000, 1001, (29,), "/h"), terminal=False)
    spec = build_spec(proc, "host", [Bind("/src", "/dst", True)])
    assert spec["ociVersion"] == "1.0.2" and spec["root"] == {"path": "rootfs", "readonly": False}
    p = spec["process"]
    assert p["args"] == ["sh", "-c", "x"] and p["cwd"] == "/w" and p["terminal"] is False
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [29]}
    assert p["capabilities"]["effective"] == [] and "CAP_CHOWN" in p["capabilities"]["bounding"]
    kinds = {n["type"] for n in spec["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "cgroup"}  # no netns given: the host's network (--network host)
    assert p["noNewPrivileges"] is True and spec["linux"]["resources"]["pids"] == {"limit": 2048}
    assert not {"CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE"} & set(p["capabilities"]["bounding"])  # podman's set
    assert "seccomp" not in spec["linux"]  # only when given
    dests = [m["destination"] for m in spec["mounts"]]
    for d in ("/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/dst"):
        assert d in dests
    assert spec["mounts"][-1]["options"] == ["rbind", "rprivate", "ro"]
    spec = build_spec(proc, "host", [], netns="/run/x/netns", read_only=True)
    assert {"type": "network", "path": "/run/x/netns"} in spec["linux"]["namespaces"]
    assert spec["root"]["readonly"] is True
    tmpfs = {m["destination"] for m in spec["mounts"] if m["type"] == "tmpfs"}
    assert {"/tmp", "/var/tmp", "/run"} <= tmpfs


def test_network_mode_is_checked_before_anything_runs() -> None:
    from shoal.errors import NotFound, UsageError
    from shoal.mount import netns

    with pytest.raises(UsageError, match="bridge"):
        netns.check_network("bridge")
    assert netns.check_network("host") == "host" and netns.check_network("none") == "none"
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = "/nonexistent"
    try:
        with pytest.raises(NotFound, match="slirp4netns is not installed"):
            netns.check_network("slirp4netns")
        assert netns.check_network("auto") == "none"  # with a warning: loopback only, never the host's network
    finally:
        os.environ["PATH"] = old


def test_seccomp_profile_resolves_containers_common_rules_for_arch_and_caps() -> None:
    from shoal.mount import seccomp

    doc = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
           "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
           "syscalls": [
               {"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {}, "excludes": {}},
               {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
               {"names": ["s390_only"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
               {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
               {"names": ["chroot"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_CHROOT"]}},
               {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                "excludes": {"caps": ["CAP_AUDIT_WRITE"]}, "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"}]},
           ]}
    got = seccomp.oci_profile(doc, ["CAP_SYS_CHROOT"], machine="x86_64")
    assert got["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"] and got["defaultErrnoRet"] == 38
    assert [r["names"][0] for r in got["syscalls"]] == ["read", "arch_prctl", "chroot", "socket"]
    assert got["syscalls"][-1] == {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                                   "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"}]}
    with_audit = seccomp.oci_profile(doc, ["CAP_AUDIT_WRITE"], machine="aarch64")
    assert [r["names"][0] for r in with_audit["syscalls"]] == ["read"] and "architectures" not in with_audit
    doc["archMap"] = [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}]
    assert seccomp.oci_profile(doc, [], machine="x86_64")["architectures"] == [
        "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert seccomp.oci_profile(doc, [], machine="x86_64", x32=False)["architectures"] == [
        "SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]


def test_run_takes_the_default_seccomp_profile_without_x32_and_a_named_one_as_it_is(tmp_path: Path) -> None:
    from shoal.mount import seccomp
    from shoal.mount.run import RunOptions, seccomp_for

    if not seccomp.DEFAULT_PROFILE.exists():
        pytest.skip("no containers-common seccomp profile")
    default = seccomp_for(RunOptions(command=("true",)), ["CAP_CHOWN"])
    assert default is not None and "SCMP_ARCH_X32" not in default.get("architectures", [])
    named = tmp_path / "seccomp.json"
    named.write_bytes(seccomp.DEFAULT_PROFILE.read_bytes())
    theirs = seccomp_for(RunOptions(command=("true",), security_opt=(f"seccomp={named}",)), ["CAP_CHOWN"])
    assert theirs is not None and theirs.get("architectures") == seccomp.oci_profile(
        seccomp.load_profile(named), ["CAP_CHOWN"]).get("architectures")
    assert default["syscalls"] == theirs["syscalls"]
    assert "SCMP_ARCH_X32" in theirs["architectures"]  # Debian's containers-common lists it for x86_64


def test_open_image_takes_every_transport_through_the_one_parser(tmp_path: Path) -> None:
    # no scheme registry of its own: a malformed or unknown reference is parse_reference's UsageError
    with pytest.raises(UsageError, match="invalid"):
        mimage.open_image("nosuch://x/y:z", str(tmp_path / "s"))
    with pytest.raises(UsageError, match="tag"):
        mimage.open_image("docker://x/y:t\u00e9g", str(tmp_path / "s"))
    with pytest.raises(NotFound):
        mimage.open_image(f"oci:{tmp_path}/none:x", str(tmp_path / "s"))


def test_counting_source() -> None:
    class Src(FrameSource):
        def fetch(self, pack: str, offset: int, length: int) -> bytes:
            return b"x" * length

    c = mimage.CountingSource(Src())
    assert c.fetch("p", 0, 10) == b"x" * 10
    c.fetch("p", 0, 10)
    c.fetch("q", 5, 3)
    snap = c.snapshot()
    assert (snap["fetches"], snap["bytes_fetched"], snap["frames_fetched"]) == (3, 23, 2)


def test_state_roundtrip_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_RUN_DIR", str(tmp_path))
    p = ms.paths_for("/some/where")
    assert p.state.parent == tmp_path / "mounts" and p.state.name == ms.mount_id("/some/where") + ".json"
    assert ms.mount_id("/some/where/") == ms.mount_id("/some//where")
    st = ms.MountState(mountpoint="/some/where", ref="a:1", name="a:1", digest="sha256:00", pid=1, start_time=2,
                       writable=False, lower="/some/where", stats={"reads": 3})
    ms.save_state(p.state, st)
    assert ms.load_state(p.state) == st
    assert ms.list_states() == [st]
    p.state.write_text("{not json")
    assert ms.load_state(p.state) is None and ms.list_states() == []
    assert ms.proc_start_time(2**22 + 12345) == -1
    assert ms._unescape("/a\\040b\\011c\\134d") == "/a b\tc\\d"
