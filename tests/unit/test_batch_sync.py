"""store.layout.Batch: each blob of a batch is made durable on its own (fdatasync of its file, as it is
added), before any of them is renamed into place; nothing else on the file system is waited for, and a
blob whose sync failed never becomes visible (store.md §3)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from shoal.errors import StoreError
from shoal.store.layout import Batch, Layout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "store")
    layout.init()
    return layout


def test_every_blob_is_synced_before_any_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path)
    elsewhere = tmp_path / "tree-being-unpacked"
    elsewhere.write_bytes(b"dirty pages of another writer")
    synced: list[str] = []
    renamed: list[tuple[str, list[str]]] = []
    real_sync, real_rename = os.fdatasync, os.rename

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_sync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append((os.fspath(src), list(synced)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "rename", rename)
    batch = Batch(layout)
    blobs = [os.urandom(1000 + i) for i in range(12)]
    digests = [layout.put(b, batch=batch) for b in blobs]
    assert not any(layout.has(d) for d in digests)  # visible at commit only
    batch.commit()
    assert [layout.get(d) for d in digests] == blobs
    tmps = [src for src, _ in renamed]
    assert sorted(synced) == sorted(tmps)  # each blob's own file, once; nothing else
    assert str(elsewhere) not in synced
    for _, seen in renamed:
        assert sorted(seen) == sorted(tmps)  # all of them durable before the first rename


def test_a_blob_whose_sync_fails_is_never_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path)
    batch = Batch(layout)
    good = layout.put(b"first blob", batch=batch)
    batch.commit()

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", broken)
    batch = Batch(layout)
    digests = [layout.put(b"blob %d" % i, batch=batch) for i in range(3)]
    with pytest.raises(StoreError, match="cannot sync a blob"):
        batch.commit()
    assert layout.has(good)
    assert not any(layout.has(d) for d in digests)
    assert sha(b"blob 0") == digests[0]


def test_abort_waits_for_the_syncs_and_leaves_nothing(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    batch = Batch(layout)
    digests = [layout.put(os.urandom(5000), batch=batch) for _ in range(5)]
    batch.abort()
    assert not any(layout.has(d) for d in digests)
    assert not os.listdir(layout.tmp)
    batch.commit()  # nothing left to publish
