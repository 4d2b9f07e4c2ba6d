"""The blob-info cache: a local record of where blobs were seen, for cross-repository mounts
(docs/transports.md §2.2).

The role of containers/image's ``pkg/blobinfocache`` (its ``KnownLocations``): each time a blob is seen in
a repository of a registry (read from it, found there by HEAD, uploaded or mounted there), the pair is
recorded with the time; a push to another repository of the same registry asks for the places where the
blob was seen, most recent first, and tries to mount it from each, a bounded number of times.

Nothing in it is trusted: a candidate is only a hint.  What counts is the registry's answer (``201
Created`` to the mount); a candidate the registry refuses is forgotten, and a blob read is verified
against its digest as ever.

One sqlite3 file, ``blob-info-cache-v1.sqlite``, in the directory ``SystemContext.blob_info_cache_dir``
names, else ``$SHOAL_BLOB_INFO_CACHE_DIR``, else ``/var/lib/shoal/cache`` for root and
``$XDG_DATA_HOME/shoal/cache`` (``~/.local/share/shoal/cache``) for others.  Several processes may use
it at once (WAL journal, a busy timeout).  It is never fatal: a cache that cannot be opened, read or
written (read-only or missing directory, corrupt file, full disk) is logged once (a warning) and
skipped for the rest of the process; the push or pull goes on without it.

Records wait in memory and go in one transaction (``FLUSH_AT`` of them, any read or forget through the
same object, the last user's ``release``, ``close``): a pull of 200 packs made 200 write transactions
on a file every shoal process of the machine shares, each under the lock its fetching threads wait on.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.digest import VerifiedBlob

if TYPE_CHECKING:
    from shoal.transports.registry.blobs import BlobReader

__all__ = ["BlobInfoCache", "SeenOnce", "RecordWhenVerified", "FILENAME", "SYSTEM_DIR", "MAX_CANDIDATES",
           "ENV_DIR", "default_dir", "cache_for"]

log = logging.getLogger(__name__)

FILENAME = "blob-info-cache-v1.sqlite"  # a new format gets a new name, never a migration (as containers/image)
SYSTEM_DIR = "/var/lib/shoal/cache"
ENV_DIR = "SHOAL_BLOB_INFO_CACHE_DIR"
MAX_CANDIDATES = 5  # mount attempts per blob from the cache (containers/image: replacementAttempts = 5)
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's write (go-sqlite3's default)
TRANSPORT = "docker"
FLUSH_AT = 256  # records kept in memory before they are written anyway

_SCHEMA = """CREATE TABLE IF NOT EXISTS KnownLocations(
    transport TEXT NOT NULL,
    scope TEXT NOT NULL,
    digest TEXT NOT NULL,
    location TEXT NOT NULL,
    time INTEGER NOT NULL,
    PRIMARY KEY (transport, scope, digest, location)
)"""


def default_dir() -> Path | None:
    """Where the cache lives when nothing names a directory (None: nowhere, no HOME)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path(SYSTEM_DIR)
    base = os.environ.get("XDG_DATA_HOME")
    if not base:
        home = os.environ.get("HOME")
        if not home:
            return None
        base = os.path.join(home, ".local", "share")
    return Path(base) / "shoal" / "cache"


class BlobInfoCache:
    """The known locations of blobs in one sqlite file.  Thread-safe; every method swallows the cache's
    own failures (the first one is logged, and the cache is off from then on)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._users = 0
        self._pending: list[tuple[str, str, str, str, int]] = []  # records not written yet
        self.broken = path is None

    # -- plumbing ---------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if not self.broken:
            self.broken = True
            log.warning("blob-info cache %s is not usable (%s); going on without it", self.path, exc)
        self._close_db()

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def _conn(self) -> sqlite3.Connection:
        """The open connection (reopened in a forked child, whose parent's connection is not its own)."""
        assert self.path is not None
        if self._db is not None and self._pid == os.getpid():
            return self._db
        self._db = None
        os.makedirs(self.path.parent, mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # a cache: losing the last records to a crash is harmless
            db.execute(_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        return db

    def _run(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]] | None:
        """Rows of ``sql`` (after the records waiting), or None when the cache is off or just failed."""
        with self._lock:
            if self.broken:
                return None
            try:
                self._flush_locked()
                return self._conn().execute(sql, args).fetchall()
            except (sqlite3.Error, OSError, ValueError) as exc:
                self._fail(exc)
                return None

    def _flush_locked(self) -> None:
        """Write the records waiting, in one transaction (the lock held; sqlite errors go to the caller)."""
        rows, self._pending = self._pending, []
        if not rows or self.broken:
            return
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO KnownLocations(transport, scope, digest, location, time) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def flush(self) -> None:
        """Write the records waiting now."""
        with self._lock:
            try:
                self._flush_locked()
            except (sqlite3.Error, OSError, ValueError) as exc:
                self._fail(exc)

    # -- the records ------------------------------------------------------------------
    def record(self, host: str, repo: str, digest: str) -> None:
        """Blob ``digest`` was seen in ``repo`` on registry ``host`` (``host[:port]``) just now (written with
        the next flush)."""
        with self._lock:
            if self.broken:
                return
            self._pending.append((TRANSPORT, host, digest, repo, time.time_ns()))
            if len(self._pending) < FLUSH_AT:
                return
        self.flush()

    def candidates(self, host: str, digest: str, *, exclude: str | None = None,
                   limit: int = MAX_CANDIDATES) -> list[str]:
        """Repositories of ``host`` where ``digest`` was seen, most recent first, at most ``limit``,
        never ``exclude`` (the destination itself)."""
        rows = self._run("SELECT location FROM KnownLocations WHERE transport = ? AND scope = ? AND digest = ? "
                         "AND location != ? ORDER BY time DESC, location LIMIT ?",
                         (TRANSPORT, host, digest, exclude or "", max(0, limit)))
        return [str(r[0]) for r in rows or ()]

    def forget(self, host: str, repo: str, digest: str) -> None:
        """``digest`` is not (or no longer) to be had from ``repo``: drop that record."""
        self._run("DELETE FROM KnownLocations WHERE transport = ? AND scope = ? AND digest = ? AND location = ?",
                  (TRANSPORT, host, digest, repo))

    def acquire(self) -> None:
        """A user (one source or destination) starts: the connection, once opened, stays open until the
        last user's :meth:`release` (one connection per copy, no file descriptor kept by an idle process)."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._flush_and_close()

    def close(self) -> None:
        with self._lock:
            self._flush_and_close()

    def _flush_and_close(self) -> None:
        try:
            self._flush_locked()
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._fail(exc)
        self._close_db()


_caches: dict[str, BlobInfoCache] = {}
_caches_lock = threading.Lock()


def cache_for(directory: str | os.PathLike[str] | None = None) -> BlobInfoCache:
    """The process's cache in ``directory`` (default: :func:`default_dir`), one object per file, so that a
    broken cache is reported once per process."""
    d = Path(directory) if directory else default_dir()
    path = d / FILENAME if d is not None else None
    key = os.path.abspath(path) if path is not None else ""
    with _caches_lock:
        c = _caches.get(key)
        if c is None:
            c = _caches[key] = BlobInfoCache(path)
            if path is None:
                log.info("no blob-info cache: neither XDG_DATA_HOME nor HOME is set")
        return c


class SeenOnce:
    """Records in a blob-info cache, each (registry, repository, blob) once per source or destination (a
    lazy mount's range reads do not write the same record per frame)."""

    def __init__(self, cache: BlobInfoCache | None) -> None:
        self.cache = cache
        self._done: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        if cache is not None:
            cache.acquire()

    def release(self) -> None:
        """The source or destination is closed (once; a second call does nothing)."""
        cache, self.cache = self.cache, None
        if cache is not None:
            cache.release()

    def record(self, host: str, repo: str, digest: str) -> None:
        if self.cache is None:
            return
        key = (host, repo, digest)
        with self._lock:
            if key in self._done:
                return
            self._done.add(key)
        self.cache.record(host, repo, digest)

    def forget(self, host: str, repo: str, digest: str) -> None:
        if self.cache is None:
            return
        with self._lock:
            self._done.discard((host, repo, digest))
        self.cache.forget(host, repo, digest)

    def candidates(self, host: str, digest: str, exclude: str) -> list[str]:
        return self.cache.candidates(host, digest, exclude=exclude, limit=MAX_CANDIDATES) if self.cache else []


class RecordWhenVerified:
    """A registry blob stream that records where the blob was seen once it has been read to its verified end."""

    def __init__(self, reader: BlobReader, seen: SeenOnce, host: str, repo: str) -> None:
        self.reader, self.seen, self.host, self.repo = reader, seen, host, repo
        self.size = reader.size

    def read(self, n: int = -1) -> bytes:
        b = self.reader.read(n)
        if not b and self.reader.verified:
            self.seen.record(self.host, self.repo, self.reader.digest)
        return b

    def read_verified(self) -> VerifiedBlob:
        blob = self.reader.read_verified()
        self.seen.record(self.host, self.repo, self.reader.digest)
        return blob

    def __iter__(self) -> Iterator[bytes]:
        yield from self.reader
        if self.reader.verified:
            self.seen.record(self.host, self.repo, self.reader.digest)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "RecordWhenVerified":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
