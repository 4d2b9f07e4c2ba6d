"""The chunk catalogue: sqlite (WAL) mapping chunk id -> where its bytes are (docs/spec/store.md §3).

It is an accelerator, never the truth: every row can be rebuilt from the
manifests and indexes in the layout, and ``fsck --repair``/``gc`` do so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from shoal.errors import NoSpace, ShoalError, StoreError, from_oserror
from shoal.inherited import keep_inherited
from shoal.store import forkgate

__all__ = ["Catalog", "ChunkLocation", "close_connections"]

# Every catalogue connection of this process, with the thread it belongs to (each thread has its own).
# A connection is only freed by the cyclic collector (its statement cache refers to it), so one left by
# a thread that ended stays open until a collection; ``close_connections`` closes them all before a
# fork without one (store.md §3), and a new connection closes those of threads that ended.
_OPEN: list[tuple[threading.Thread, sqlite3.Connection]] = []
_OPEN_LOCK = threading.Lock()
_generation = 0  # bumped by close_connections: a thread's connection of an older generation is closed


def close_connections() -> int:
    """Close every catalogue connection of this process now (before a fork: the child must inherit no
    sqlite state); each thread opens a new one on its next use.  Returns how many were open."""
    global _generation
    with _OPEN_LOCK:
        _generation += 1
        open_, _OPEN[:] = list(_OPEN), []
    for _, conn in open_:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    return len(open_)


def _register(conn: sqlite3.Connection) -> None:
    with _OPEN_LOCK:
        ended = [c for t, c in _OPEN if not t.is_alive()]
        _OPEN[:] = [(t, c) for t, c in _OPEN if t.is_alive()]
        _OPEN.append((threading.current_thread(), conn))
    for c in ended:
        with contextlib.suppress(sqlite3.Error):
            c.close()


def _after_fork_in_child() -> None:
    global _generation
    for _, c in _OPEN:  # closing them would let SQLite undo the parent's WAL state
        keep_inherited(c)
    _OPEN.clear()
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    pack TEXT NOT NULL,
    frame_off INTEGER NOT NULL,
    frame_clen INTEGER NOT NULL,
    frame_ulen INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS frames (
    pack TEXT NOT NULL,
    off INTEGER NOT NULL,
    clen INTEGER NOT NULL,
    PRIMARY KEY (pack, off)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    pack: str
    frame_off: int
    frame_clen: int
    frame_ulen: int
    off: int
    length: int


def sqlite_error(exc: sqlite3.Error, what: str, path: Path) -> ShoalError:
    """The Shoal error for a failed catalogue statement: NoSpace for a full disk, else a StoreError
    naming sqlite's cause (e.g. ``attempt to write a readonly database``)."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    cause = " ".join(str(exc).split()) or type(exc).__name__
    if code == sqlite3.SQLITE_FULL:
        return NoSpace(f"{what}: no space left on device ({cause}): {path}")
    if code == sqlite3.SQLITE_READONLY:
        return StoreError(f"{what}: the store is read-only ({cause}): {path}")
    return StoreError(f"{what}: {cause}: {path}")


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        if not path.exists() or os.access(path, os.W_OK):
            self._initialize()

    def _initialize(self) -> None:
        """Create the schema and switch to WAL once, serialized across processes.

        Concurrent first opens of a new database race on the journal-mode switch,
        which sqlite answers with SQLITE_BUSY without waiting; an flock on a
        sibling lock file makes the first opener do it while the others wait.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        with forkgate.held():
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise from_oserror(exc, "cannot open the catalogue lock", lock_path, store=True) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                conn = self._conn()
                try:
                    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                except sqlite3.Error as exc:
                    raise sqlite_error(exc, "cannot open the catalogue", self.path) from None
            finally:
                os.close(fd)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (each thread has its own; ``check_same_thread`` is off only so that
        ``close_connections`` and ``_register`` may close one whose thread ended or before a fork)."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "conn", None)
        if held is not None and held[0] == _generation:
            return held[1]
        try:
            if self.path.exists() and not os.access(self.path, os.W_OK):
                # a read-only store (another user's): reads work, writes fail clearly
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60.0, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise sqlite_error(exc, "cannot open the catalogue", self.path) from None
        _register(conn)
        self._local.conn = (_generation, conn)
        return conn

    def add(self, rows: Iterable[tuple[bytes, str, int, int, int, int, int]]) -> None:
        """Record chunk locations; an id already known keeps its first location."""
        self._write("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?,?,?,?)", list(rows))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        c = self._conn()
        try:
            yield c
        except sqlite3.Error as exc:
            raise sqlite_error(exc, "catalogue read failed", self.path) from None

    def locate(self, ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        out: dict[bytes, ChunkLocation] = {}
        ids = list(ids)
        q = "SELECT id, pack, frame_off, frame_clen, frame_ulen, off, len FROM chunks WHERE id IN ({})"
        with self._reading() as c:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                for row in c.execute(q.format(",".join("?" * len(part))), part):
                    out[row[0]] = ChunkLocation(*row[1:])
        return out

    def present(self, ids: Sequence[bytes]) -> set[bytes]:
        """The ids of ``ids`` the catalogue knows.  A catalogue no bigger than twice ``ids`` (a new
        store: empty) is read whole, which costs a fraction of looking every id up."""
        with self._reading() as c:
            small = c.execute("SELECT count(*) FROM (SELECT 1 FROM chunks LIMIT ?)", (2 * len(ids) + 1,)).fetchone()
            if small[0] <= 2 * len(ids):
                want = set(ids)
                return {row[0] for row in c.execute("SELECT id FROM chunks") if row[0] in want}
        return set(self.locate(ids))

    def add_frame(self, pack: str, off: int, clen: int) -> None:
        """Record that frame ``pack@off`` is present in the partial pack file (after it is durable)."""
        self._write("INSERT OR REPLACE INTO frames VALUES (?,?,?)", [(pack, off, clen)])

    def has_frame(self, pack: str, off: int) -> bool:
        q = "SELECT 1 FROM frames WHERE pack = ? AND off = ?"
        with self._reading() as c:
            return c.execute(q, (pack, off)).fetchone() is not None

    def frames_overlapping(self, pack: str, off: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the recorded frames of ``pack`` that overlap ``[off, off+length)``."""
        q = "SELECT off, clen FROM frames WHERE pack = ? AND off < ? AND off + clen > ? ORDER BY off"
        return [(int(r[0]), int(r[1])) for r in self._conn().execute(q, (pack, off + length, off))]

    def drop_frame_chunks(self, pack: str, frame_off: int) -> None:
        self._write("DELETE FROM chunks WHERE pack = ? AND frame_off = ?", [(pack, frame_off)])

    def rows(self) -> Iterator[tuple[bytes, ChunkLocation]]:
        """Every chunk row (for fsck)."""
        q = "SELECT id, pack, frame_off, frame_clen, frame_ulen, off, len FROM chunks ORDER BY pack, frame_off"
        for row in self._conn().execute(q).fetchall():
            yield row[0], ChunkLocation(*row[1:])

    def drop_chunk(self, cid: bytes) -> None:
        self._write("DELETE FROM chunks WHERE id = ?", [(cid,)])

    def frame_bytes(self, pack: str) -> int:
        with self._reading() as c:
            row = c.execute("SELECT coalesce(sum(clen), 0) FROM frames WHERE pack = ?", (pack,)).fetchone()
        return int(row[0])

    def drop_frames(self, pack: str) -> None:
        self._write("DELETE FROM frames WHERE pack = ?", [(pack,)])

    def frame_packs(self) -> set[str]:
        with self._reading() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT pack FROM frames")}

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        c = self._conn()
        try:
            c.execute("BEGIN IMMEDIATE")
            c.executemany(sql, rows)
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            if c.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
            raise sqlite_error(exc, "catalogue write failed", self.path) from None

    def drop_packs(self, packs: Iterable[str]) -> None:
        self._write("DELETE FROM chunks WHERE pack = ?", [(p,) for p in packs])

    def packs(self) -> set[str]:
        with self._reading() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT pack FROM chunks")}

    def empty(self) -> bool:
        with self._reading() as c:
            return c.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None

    def count(self) -> int:
        with self._reading() as c:
            return int(c.execute("SELECT count(*) FROM chunks").fetchone()[0])
