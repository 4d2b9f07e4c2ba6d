"""The catalogue's connections (store/catalog.py, docs/spec/mount.md §5.3): one per thread, all closed
before a fork without a garbage collection, those of ended threads closed by the next new one, and a
forked child's copies of its parent's never closed."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from shoal.inherited import kept
from shoal.store.catalog import Catalog, close_connections


def _in_thread(cat: Catalog) -> sqlite3.Connection:
    got: list[sqlite3.Connection] = []

    def use() -> None:
        cat.frame_packs()
        got.append(cat._conn())  # noqa: SLF001 - the connection this thread used

    t = threading.Thread(target=use)
    t.start()
    t.join()
    return got[0]


def _is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return False
    return True


def test_connections_of_ended_threads_are_closed_without_a_collection(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    close_connections()
    gc.disable()  # what closes them must not be the collector
    try:
        ended = [_in_thread(cat) for _ in range(3)]
        assert all(_is_open(c) for c in ended[-1:])  # the last one's thread ended, nobody opened since
        mine = cat._conn()  # noqa: SLF001 - a new connection closes those of threads that ended
        assert not any(_is_open(c) for c in ended)
        assert close_connections() == 1 and not _is_open(mine)
        cat.frame_packs()  # the next use opens a new one
        assert cat._conn() is not mine and _is_open(cat._conn())  # noqa: SLF001
    finally:
        gc.enable()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_closes_its_parents_connections(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    cat.add([(b"\x01" * 32, "sha256:" + "a" * 64, 0, 10, 20, 0, 20)])
    parent = cat._conn()  # noqa: SLF001
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            mine = cat._conn()  # noqa: SLF001 - its own, new
            ok = mine is not parent and close_connections() == 1 and kept(parent)
            ok = ok and cat.locate([b"\x01" * 32]) != {}
            code = 0 if ok else 3
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"\x00"
    assert _is_open(parent) and cat.locate([b"\x01" * 32]) != {}  # the parent's still works
