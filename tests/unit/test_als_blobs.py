"""The layer store's ``blob`` bytes are verified before any is served (src/shoal/als/blobs.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shoal.als.blobs import Blobs
from shoal.errors import IntegrityError
from shoal.transports.context import SystemContext


def _dir_image(root: Path, blobs: dict[str, bytes]) -> str:
    """A dir: image holding ``blobs`` under the given digests (whatever their bytes)."""
    root.mkdir()
    (root / "version").write_text("Directory Transport Version: 1.1\n")
    (root / "manifest.json").write_text("{}")
    for digest, data in blobs.items():
        (root / digest.split(":", 1)[1]).write_bytes(data)
    return f"dir:{root}"


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_a_verified_blob_is_served_and_shared_until_the_last_release(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    ref = _dir_image(tmp_path / "img", {_sha(data): data})
    blobs = Blobs(SystemContext(tmpdir=str(tmp_path)))
    a = blobs.acquire(ref, _sha(data), len(data))
    b = blobs.acquire(ref, _sha(data), len(data))
    assert a is b and a.read(0, len(data) + 10) == data and a.read(1000, 3) == data[1000:1003]
    assert a.read(len(data), 10) == b""
    blobs.release(a)
    assert b.read(5, 2) == data[5:7]
    blobs.release(b)
    assert b.fd == -1 and list(tmp_path.iterdir()) == [tmp_path / "img"]  # the spool file was never linked


@pytest.mark.parametrize("stored, size", [(b"jello", 5), (b"hello!", 5), (b"hell", 5), (b"hello", 4)])
def test_a_blob_that_does_not_match_its_digest_or_size_is_refused(tmp_path: Path, stored: bytes, size: int) -> None:
    ref = _dir_image(tmp_path / "img", {_sha(b"hello"): stored})
    blobs = Blobs(SystemContext(tmpdir=str(tmp_path)))
    with pytest.raises(IntegrityError):
        blobs.acquire(ref, _sha(b"hello"), size)
    good = _dir_image(tmp_path / "good", {_sha(b"hello"): b"hello"})
    assert blobs.acquire(good, _sha(b"hello"), 5).read(0, 9) == b"hello"  # nothing of the bad copy was kept


def test_computed_bytes_are_checked_too(tmp_path: Path) -> None:
    blobs = Blobs(SystemContext())
    assert blobs.acquire("dir:/nonexistent", _sha(b"stub"), 4, b"stub").read(0, 4) == b"stub"
    with pytest.raises(IntegrityError):
        blobs.acquire("dir:/nonexistent", _sha(b"other"), 4, b"stub")
