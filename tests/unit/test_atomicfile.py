"""atomicfile.write_atomic: the one whole-file replace, with its durability spelled out."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shoal.atomicfile import Durability, write_atomic


@pytest.mark.parametrize("durability", list(Durability))
def test_replaces_whole_file_with_mode(tmp_path: Path, durability: Durability) -> None:
    p = tmp_path / "f.json"
    p.write_bytes(b"old contents, longer than the new ones")
    write_atomic(p, b"new", durability=durability, mode=0o600)
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["f.json"]  # no temp file left


def test_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(p, "not bytes", durability=Durability.FULL)  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]
    with pytest.raises(OSError):
        write_atomic(tmp_path / "missing" / "f", b"x", durability=Durability.FILE)
