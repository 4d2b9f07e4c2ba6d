"""shoal snapshotter's semantics over its real gRPC socket, without containerd (issue 11; docs/containerd.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from shoal.snapshotter import filters  # noqa: E402
from shoal.snapshotter.proto import snapshots_pb2 as pb  # noqa: E402
from shoal.snapshotter.proto import snapshots_pb2_grpc  # noqa: E402
from shoal.snapshotter.server import make_server  # noqa: E402
from shoal.snapshotter.service import Service  # noqa: E402


@pytest.fixture()
def stub(tmp_path: Path) -> Iterator[Any]:
    svc = Service(tmp_path / "root")
    sock = str(tmp_path / "s.sock")
    server = make_server(svc, sock)
    server.start()
    ch = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield snapshots_pb2_grpc.SnapshotsStub(ch)
    finally:
        ch.close()
        server.stop(0).wait()
        svc.close()


def test_socket_is_owner_only(tmp_path: Path) -> None:
    """The socket carries CRI image calls and credentials (the keychain proxy): never another user's."""
    import os
    import stat

    svc = Service(tmp_path / "root")
    sock = str(tmp_path / "s.sock")
    old = os.umask(0)
    try:
        server = make_server(svc, sock)
        server.start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    finally:
        server.stop(0).wait()
        svc.close()


def _code(fn: Any, req: Any) -> Any:
    with pytest.raises(grpc.RpcError) as ei:
        r = fn(req)
        if not hasattr(r, "ListFields"):
            list(r)
    return ei.value.code()


def test_lifecycle_and_mounts(stub: Any, tmp_path: Path) -> None:
    m = stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"})).mounts
    assert [(x.type, list(x.options)) for x in m] == [("bind", ["rw", "rbind"])]
    (Path(m[0].source) / "f").write_text("hello")
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    assert stub.Stat(pb.StatSnapshotRequest(key="A")).info.kind == pb.COMMITTED
    assert stub.Usage(pb.UsageRequest(key="A")).inodes == 1
    m = stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A")).mounts
    assert m[0].type == "overlay" and m[0].options[2].startswith("lowerdir=")
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent="A")).mounts
    assert (v[0].type, list(v[0].options)) == ("bind", ["ro", "rbind"])
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="b")) == grpc.StatusCode.ALREADY_EXISTS
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="c", parent="nope")) == grpc.StatusCode.NOT_FOUND
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="c", parent="b")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Commit, pb.CommitSnapshotRequest(name="V", key="v")) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(stub.Remove, pb.RemoveSnapshotRequest(key="A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(stub.Mounts, pb.MountsRequest(key="A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(stub.Stat, pb.StatSnapshotRequest(key="zz")) == grpc.StatusCode.NOT_FOUND
    info = pb.Info(name="A", labels={"y": "2"})
    req = pb.UpdateSnapshotRequest(info=info)
    req.update_mask.paths.append("labels.y")
    assert dict(stub.Update(req).info.labels) == {"y": "2"}  # commit took its labels from Commit (none)
    names = [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=['labels."y"==2,kind==committed']))
             for i in r.info]
    assert names == ["A"]
    assert sorted(i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info) == ["A", "b", "v"]
    for k in ("b", "v", "A"):
        stub.Remove(pb.RemoveSnapshotRequest(key=k))
    (tmp_path / "root" / "snapshots" / "999").mkdir()
    stub.Cleanup(pb.CleanupRequest())
    assert list((tmp_path / "root" / "snapshots").iterdir()) == []


def test_filter_syntax() -> None:
    f = [filters.parse('labels."containerd.io/snapshot.ref"==sha256:ab,parent=="p q"')]
    assert filters.match_any(f, {"parent": "p q"}, {"containerd.io/snapshot.ref": "sha256:ab"})
    assert not filters.match_any(f, {"parent": "p"}, {"containerd.io/snapshot.ref": "sha256:ab"})
    assert filters.match_any([filters.parse("labels.a"), filters.parse("name~=^x")], {"name": "xy"}, {})


def test_remote_mount_starts_at_prepare_and_is_awaited_by_use(tmp_path: Path) -> None:
    """With a locator, a layer's Prepare starts its image's lazy mount and answers ALREADY_EXISTS at once;
    a child's Prepare waits for the mount; a failed mount is tried again by the next use; the last
    snapshot's removal lets a mount under way finish before releasing it (docs/containerd.md "Start-up")."""
    import threading

    from shoal.errors import TransportError
    from shoal.snapshotter.meta import SnapshotExists
    from shoal.snapshotter.service import TARGET_LABEL

    gate = threading.Event()
    calls: list[str] = []
    released: list[str] = []
    fail = [True]
    mp = str(tmp_path / "mnt" / "img")

    def mount(labels: dict[str, str]) -> str:
        calls.append(labels["img"])
        assert gate.wait(10)
        if fail[0]:
            fail[0] = False
            raise TransportError("registry down")
        return mp

    def locate(labels: dict[str, str]) -> str:
        return mp if labels.get("img") else ""

    svc = Service(tmp_path / "root", mount, released.append, locate)
    try:
        labels = {TARGET_LABEL: "L1", "img": "x"}
        with pytest.raises(SnapshotExists):
            svc.prepare("extract-1", "", labels)  # answered while the mount is still under way
        assert svc.stat("L1").remote == mp and calls == ["x"]
        got: list[Any] = []
        child = threading.Thread(target=lambda: got.append(svc.prepare("c1", "L1", {})))
        child.start()
        child.join(0.2)
        assert child.is_alive() and not got  # waits for the mount
        assert svc.list([]) and "c1" not in [x.key for x in svc.list([])]  # no row before the mount is there
        gate.set()  # the first attempt fails; the child's Prepare mounts again and gets it
        child.join(10)
        assert calls == ["x", "x"]
        assert got and got[0][0].type == "overlay" and got[0][0].options[2] == f"lowerdir={mp}"
        svc.remove("c1")
        gate.clear()
        fail[0] = False
        with pytest.raises(SnapshotExists):  # the image again (a mount known to work is not repeated)
            svc.prepare("extract-2", "", {TARGET_LABEL: "L2", "img": "x"})
        assert calls == ["x", "x"]
        svc.remove("L2")
        assert released == []  # L1 still uses it
        svc.remove("L1")
        assert released == [mp]
    finally:
        gate.set()
        svc.close()


def test_failed_remote_mount_leaves_no_child_snapshot(tmp_path: Path) -> None:
    """A child's Prepare whose lazy mount below fails (twice) fails, and leaves no row or directory."""
    from shoal.errors import TransportError
    from shoal.snapshotter.meta import SnapshotExists
    from shoal.snapshotter.service import TARGET_LABEL

    def mount(labels: dict[str, str]) -> str:
        raise TransportError("registry down")

    svc = Service(tmp_path / "root", mount, lambda mp: None, lambda labels: str(tmp_path / "mnt"))
    try:
        with pytest.raises(SnapshotExists):
            svc.prepare("extract", "", {TARGET_LABEL: "L", "img": "x"})
        with pytest.raises(TransportError, match="registry down"):
            svc.prepare("c", "L", {})
        assert [x.key for x in svc.list([])] == ["L"]
        assert list((tmp_path / "root" / "snapshots").iterdir()) == []  # a remote snapshot has none
    finally:
        svc.close()


def test_the_remote_mounter_has_its_imports_before_the_first_mount() -> None:
    """The first lazy mount's job imported ``shoal.mount.state`` itself: 6-11 ms on the way from Prepare to
    the fork server (containerd.md "Start-up").  The snapshotter imports it as it starts."""
    import subprocess
    import sys

    code = "import sys, shoal.snapshotter.remote; print('shoal.mount.state' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
