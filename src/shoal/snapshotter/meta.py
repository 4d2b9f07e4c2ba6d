"""Snapshot metadata of ``shoal snapshotter``: one sqlite file under the root (docs/containerd.md).

The semantics are those of containerd's overlay snapshotter (``snapshots/storage`` of containerd
1.6): a key names an active snapshot or a view; ``commit`` renames an active snapshot to a
committed one and keeps its directory; a parent must be committed; a snapshot with children cannot
be removed.  Each snapshot has a numeric id and a directory ``<root>/snapshots/<id>/{fs,work}``.
A *remote* snapshot (a lazily mounted Shoal image) records its FUSE mount point in ``remote``; its
usage is answered from metadata, never by walking the mount.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import NotFound, UsageError

__all__ = ["KIND_VIEW", "KIND_ACTIVE", "KIND_COMMITTED", "Snapshot", "MetaStore", "SnapshotExists",
           "FailedPrecondition"]

KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = 1, 2, 3  # the values of containerd's Kind enum


class SnapshotExists(UsageError):
    """A key or name is taken (gRPC ALREADY_EXISTS)."""


class FailedPrecondition(UsageError):
    """The snapshot is in the wrong state: not active, has children (gRPC FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    size: int = 0  # bytes (committed: measured at commit; remote: the image's file bytes)
    inodes: int = 0
    remote: str = ""  # FUSE mount point of a lazily mounted Shoal image


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  parent TEXT NOT NULL,
  kind INTEGER NOT NULL,
  labels TEXT NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  size INTEGER NOT NULL DEFAULT 0,
  inodes INTEGER NOT NULL DEFAULT 0,
  remote TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""

_COLS = "id, key, parent, kind, labels, created, updated, size, inodes, remote"


def _row(r: tuple[Any, ...]) -> Snapshot:
    return Snapshot(id=r[0], key=r[1], parent=r[2], kind=r[3], labels=json.loads(r[4]), created=r[5],
                    updated=r[6], size=r[7], inodes=r[8], remote=r[9])


class MetaStore:
    """The snapshot table; every method is one transaction, serialized by a lock (gRPC threads)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # its mounts are suid,dev and allow_other: no other user may reach them
        self.path = root / "metadata.db"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def get(self, key: str) -> Snapshot:
        with self._lock:
            r = self._db.execute(f"SELECT {_COLS} FROM snapshots WHERE key=?", (key,)).fetchone()
        if r is None:
            raise NotFound(f"snapshot {key} does not exist")
        return _row(r)

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [_row(r) for r in self._db.execute(f"SELECT {_COLS} FROM snapshots ORDER BY id")]

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def chain(self, key: str) -> list[Snapshot]:
        """``key``'s parents, nearest first (not ``key`` itself)."""
        out: list[Snapshot] = []
        parent = self.get(key).parent
        while parent:
            s = self.get(parent)
            out.append(s)
            parent = s.parent
        return out

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str], remote: str = "",
               size: int = 0, inodes: int = 0) -> Snapshot:
        if not key:
            raise UsageError("a snapshot key must not be empty")
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM snapshots WHERE key=?", (key,)).fetchone():
                    raise SnapshotExists(f"snapshot {key} already exists")
                if parent:
                    p = self._db.execute("SELECT kind FROM snapshots WHERE key=?", (parent,)).fetchone()
                    if p is None:
                        raise NotFound(f"parent snapshot {parent} does not exist")
                    if p[0] != KIND_COMMITTED:
                        raise UsageError(f"parent {parent} is not a committed snapshot")
                cur = self._db.execute(
                    "INSERT INTO snapshots (key, parent, kind, labels, created, updated, size, inodes, remote)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    (key, parent, kind, json.dumps(labels, sort_keys=True), now, now, size, inodes, remote))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        assert cur.lastrowid is not None
        return Snapshot(cur.lastrowid, key, parent, kind, dict(labels), now, now, size, inodes, remote)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                r = self._db.execute("SELECT kind FROM snapshots WHERE key=?", (key,)).fetchone()
                if r is None:
                    raise NotFound(f"snapshot {key} does not exist")
                if r[0] != KIND_ACTIVE:
                    raise FailedPrecondition(f"snapshot {key} is not active")
                if self._db.execute("SELECT 1 FROM snapshots WHERE key=?", (name,)).fetchone():
                    raise SnapshotExists(f"snapshot {name} already exists")
                self._db.execute("UPDATE snapshots SET key=?, kind=?, labels=?, updated=?, size=?, inodes=?"
                                 " WHERE key=?", (name, KIND_COMMITTED, json.dumps(labels, sort_keys=True),
                                                  time.time(), size, inodes, key))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(name)

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self._lock:
            n = self._db.execute("UPDATE snapshots SET labels=?, updated=? WHERE key=?",
                                 (json.dumps(labels, sort_keys=True), time.time(), key)).rowcount
        if n == 0:
            raise NotFound(f"snapshot {key} does not exist")
        return self.get(key)

    def remove(self, key: str) -> Snapshot:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                r = self._db.execute(f"SELECT {_COLS} FROM snapshots WHERE key=?", (key,)).fetchone()
                if r is None:
                    raise NotFound(f"snapshot {key} does not exist")
                if self._db.execute("SELECT 1 FROM snapshots WHERE parent=?", (key,)).fetchone():
                    raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
                self._db.execute("DELETE FROM snapshots WHERE key=?", (key,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return _row(r)

    def remote_users(self, mountpoint: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM snapshots WHERE remote=?", (mountpoint,)).fetchone()[0])
