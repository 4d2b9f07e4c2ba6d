"""The blob-info cache (transports/registry/blobinfo.py): order, limit, forget, scope, and that a cache
which cannot be used is skipped with one warning, never an error."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from shoal.transports.registry import blobinfo
from shoal.transports.registry.blobinfo import FILENAME, BlobInfoCache, cache_for, default_dir

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _cache(tmp_path: Path) -> BlobInfoCache:
    return BlobInfoCache(tmp_path / "c" / FILENAME)


def test_candidates_most_recent_first_limited_and_scoped(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    for i in range(8):
        c.record("reg:5000", f"r{i}", D1)
        time.sleep(0.001)
    c.record("other:5000", "elsewhere", D1)  # another registry: never a candidate here
    c.record("reg:5000", "r9", D2)  # another blob
    assert c.candidates("reg:5000", D1) == ["r7", "r6", "r5", "r4", "r3"]  # MAX_CANDIDATES
    assert c.candidates("reg:5000", D1, limit=2) == ["r7", "r6"]
    assert c.candidates("reg:5000", D1, exclude="r7", limit=2) == ["r6", "r5"]  # never the destination
    c.record("reg:5000", "r0", D1)  # seen again: first now
    assert c.candidates("reg:5000", D1, limit=2) == ["r0", "r7"]
    assert c.candidates("other:5000", D1) == ["elsewhere"]
    assert c.candidates("reg:5000", D2) == ["r9"]
    assert c.candidates("reg", D1) == []  # the port is part of the registry
    c.close()


def test_forget_and_shared_between_connections(tmp_path: Path) -> None:
    a, b = _cache(tmp_path), _cache(tmp_path)
    a.record("reg", "one", D1)
    a.record("reg", "two", D1)
    assert a.candidates("reg", D1) == ["two", "one"]  # a read through the same object writes them first
    assert b.candidates("reg", D1) == ["two", "one"]
    b.forget("reg", "two", D1)
    assert a.candidates("reg", D1) == ["one"]
    a.close()
    b.close()
    with sqlite3.connect(tmp_path / "c" / FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, name: str) -> None:
    c = BlobInfoCache(Path(path))
    for i in range(200):
        c.record("reg", f"{name}{i % 20}", f"sha256:{i:064x}")
    assert not c.broken
    c.close()


def test_concurrent_processes_write_without_losing_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "c" / FILENAME
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), n)) for n in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = BlobInfoCache(path)
    assert len(c.candidates("reg", f"sha256:{5:064x}", limit=10)) == 3
    assert not c.broken


@pytest.mark.parametrize("how", ["dir_is_a_file", "corrupt_file"])
def test_unusable_cache_is_skipped_with_one_warning(tmp_path: Path, how: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    if how == "dir_is_a_file":  # as root a read-only directory is still writable: a file in the way is not
        (tmp_path / "c").write_text("not a directory")
    else:
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / FILENAME).write_bytes(b"this is not a sqlite database" * 100)
    c = _cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger=blobinfo.__name__):
        c.record("reg", "r", D1)
        assert c.candidates("reg", D1) == []
        c.forget("reg", "r", D1)
        c.record("reg", "r", D2)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "blob-info cache" in warnings[0].getMessage()
    assert c.broken


def test_default_dir_and_one_object_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(blobinfo.ENV_DIR, str(tmp_path / "env"))
    assert default_dir() == tmp_path / "env"
    monkeypatch.delenv(blobinfo.ENV_DIR)
    if os.geteuid() == 0:
        assert default_dir() == Path("/var/lib/shoal/cache")
    else:
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert default_dir() == tmp_path / "xdg" / "shoal" / "cache"
    assert cache_for(tmp_path / "x") is cache_for(str(tmp_path / "x"))
    assert cache_for(tmp_path / "x").path == tmp_path / "x" / FILENAME


def test_connection_closes_with_its_last_user(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    c.acquire()
    c.acquire()
    c.record("reg", "r", D1)
    c.flush()
    c.release()
    assert c._db is not None  # noqa: SLF001 - the point of the test
    c.release()
    assert c._db is None  # noqa: SLF001
    assert c.candidates("reg", D1) == ["r"]  # reopened on use


def test_records_wait_and_go_in_one_transaction(tmp_path: Path) -> None:
    """A pull's records are written together: at ``FLUSH_AT`` of them, at a read or forget through the same
    object, at the last user's release, at close; another reader sees none of them before."""
    a, b = _cache(tmp_path), _cache(tmp_path)
    a.acquire()
    for i in range(10):
        a.record("reg", f"r{i}", D1)
    assert b.candidates("reg", D1) == []
    a.release()  # the last user
    assert len(b.candidates("reg", D1, limit=20)) == 10
    for i in range(blobinfo.FLUSH_AT):
        a.record("reg", "bulk", f"sha256:{i:064x}")
    assert b.candidates("reg", f"sha256:{0:064x}") == ["bulk"]  # FLUSH_AT reached: written
    a.record("reg", "late", D2)
    a.close()
    assert b.candidates("reg", D2) == ["late"]
    b.close()
