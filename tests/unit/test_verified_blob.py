"""digest.VerifiedBlob: the store takes a blob without hashing it again only as a VerifiedBlob, which only
the code that hashed those very bytes can make (``check``, ``BlobDigester.seal``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shoal.digest import BlobDigester, VerifiedBlob
from shoal.errors import IntegrityError
from shoal.store.layout import Batch, Layout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_made_only_by_hashing() -> None:
    data = b"pack bytes" * 1000
    with pytest.raises(TypeError):
        VerifiedBlob(data, sha(data))  # a caller's word is not a proof
    v = VerifiedBlob.check(data, sha(data), len(data))
    assert (v.data, v.digest, v.size) == (data, sha(data), len(data))
    with pytest.raises(AttributeError):
        v.data = b"other"  # type: ignore[misc]
    with pytest.raises(IntegrityError):
        VerifiedBlob.check(data + b"!", sha(data))
    with pytest.raises(IntegrityError):
        VerifiedBlob.check(data, sha(data), len(data) + 1)


def test_digester_seals_what_it_hashed_once() -> None:
    parts = [b"a" * 5000, b"b" * 7000, b"c"]
    data = b"".join(parts)
    d = BlobDigester(sha(data), len(data), keep=True)
    for p in parts:
        d.update(p)
    v = d.seal()
    assert v.data == data
    with pytest.raises(ValueError):
        d.seal()  # sealed once: never an empty blob under that digest
    late = BlobDigester(sha(data))
    late.update(parts[0])
    with pytest.raises(ValueError):
        late.keep()  # bytes it did not keep were hashed
    bad = BlobDigester(sha(data), keep=True)
    bad.update(data[:-1] + b"x")
    with pytest.raises(IntegrityError):
        bad.seal()


def test_put_verified(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "store")
    layout.init()
    data = b"x" * 100_000
    v = VerifiedBlob.check(data, sha(data))
    other = sha(b"other")
    with pytest.raises(IntegrityError):
        layout.put_verified(v, other)  # verified against another digest
    with pytest.raises(IntegrityError):
        layout.put_verified(v, sha(data), len(data) - 1)
    assert not layout.has(other) and not layout.has(sha(data))
    batch = Batch(layout)
    assert layout.put_verified(v, sha(data), len(data), batch=batch) == sha(data)
    assert not layout.has(sha(data))  # visible at commit
    batch.commit()
    assert layout.get(sha(data)) == data
