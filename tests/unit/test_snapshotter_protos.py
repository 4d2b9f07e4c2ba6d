"""The committed snapshotter stubs are exactly what scripts/gen_protos.py generates (issue 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = "shoal/snapshotter/proto"


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    made = sorted(p.name for p in (tmp_path / PKG).iterdir())
    assert made == sorted(p.name for p in (ROOT / "src" / PKG).glob("*_pb2*"))
    for name in made:
        assert (tmp_path / PKG / name).read_bytes() == (ROOT / "src" / PKG / name).read_bytes(), name


def test_stubs_import() -> None:
    from shoal.snapshotter.proto import snapshots_pb2, snapshots_pb2_grpc

    assert snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name == \
        "containerd.services.snapshots.v1.Snapshots"
    assert hasattr(snapshots_pb2_grpc, "SnapshotsStub")
