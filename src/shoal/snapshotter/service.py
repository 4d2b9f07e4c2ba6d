"""The snapshotter's operations, with the overlay semantics of containerd's overlayfs snapshotter.

gRPC lives in ``server.py``; this module knows directories, mounts and metadata only.  Mount table
(docs/containerd.md): an active snapshot without parents is ``bind <fs> rw,rbind``; with parents
``overlay workdir=,upperdir=,lowerdir=`` (nearest parent first); a view of one layer ``bind ro``,
of several an ``overlay lowerdir=`` only.  A remote parent (a lazily mounted Shoal image) ends the
lower chain with its FUSE mount, which holds the whole image.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import NotFound, ShoalError, UsageError
from shoal.snapshotter import filters
from shoal.snapshotter.meta import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    FailedPrecondition,
    MetaStore,
    Snapshot,
    SnapshotExists,
)

__all__ = ["Mount", "Usage", "Service", "TARGET_LABEL"]

log = logging.getLogger(__name__)

TARGET_LABEL = "containerd.io/snapshot.ref"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


# (target label value, labels) -> FUSE mount point of the image, or "" when the layer is not remote
RemoteMounter = Callable[[dict[str, str]], str]
RemoteReleaser = Callable[[str], None]
# labels -> where RemoteMounter would mount them ("" when the layer is not remote), without mounting
RemoteLocator = Callable[[dict[str, str]], str]


def _du(path: Path) -> Usage:
    """Disk usage of a local directory (an upper dir; never a FUSE tree)."""
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return Usage(size, inodes)


class Service:
    def __init__(self, root: Path, mount_remote: RemoteMounter | None = None,
                 release_remote: RemoteReleaser | None = None, locate_remote: RemoteLocator | None = None) -> None:
        self.root = root
        self.meta = MetaStore(root)
        (root / "snapshots").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._mount_remote = mount_remote
        self._release_remote = release_remote
        self._locate_remote = locate_remote
        # a lazy mount's start and its snapshot row, and a last user's release (decided and done, after
        # the mount under way finished), are under one lock: a Prepare of an image whose last snapshot is
        # being removed must not get a mount the removal then takes away (nor the store data it collects)
        self._remote_lock = threading.Lock()
        # with ``locate_remote``, a layer's Prepare starts its image's lazy mount here and answers at once;
        # whatever needs the mount (a child's mounts) waits for it (docs/containerd.md "Start-up")
        self._jobs: dict[str, Future[str]] = {}  # mount point -> the mount under way or done
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="shoal-snap-mount")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.meta.close()

    def reattach(self) -> list[str]:
        """Make sure every lazy mount that metadata records is mounted (on start, before serving).

        A restart of the gRPC server alone leaves the FUSE daemons running, so this finds their
        mounts and does nothing; after a reboot or a dead daemon it mounts the image again from the
        labels the remote snapshot was committed with.  Returns the mount points it could not serve.
        """
        if self._mount_remote is None:
            return []
        failed: list[str] = []
        done: set[str] = set()
        for s in self.meta.all():
            if not s.remote or s.remote in done:
                continue
            done.add(s.remote)
            try:
                mp = self._mount_remote(s.labels)
            except ShoalError as e:
                log.warning("cannot re-attach the lazy mount %s of snapshot %s: %s", s.remote, s.key, e)
                failed.append(s.remote)
                continue
            if mp != s.remote:
                log.warning("snapshot %s: lazy mount %s re-attached at %s", s.key, s.remote, mp or "(nowhere)")
                failed.append(s.remote)
        return failed

    def _dir(self, s: Snapshot) -> Path:
        return self.root / "snapshots" / str(s.id)

    def _mounted(self, s: Snapshot) -> None:
        """Wait for the lazy mount of the remote snapshot ``s`` started by a Prepare; if it failed, mount
        again now (its error, if it fails again, is this call's)."""
        job = self._jobs.get(s.remote)
        if job is None or self._mount_remote is None:
            return  # mounted before this process served (reattach), or by the synchronous path
        try:
            mp = job.result()
            log.debug("timeline: snapshot %s: its lazy mount is up", s.key)
            if mp != s.remote:
                raise ShoalError(f"snapshot {s.key}: lazy mount {s.remote} came up at {mp or '(nowhere)'}")
            return
        except ShoalError as e:
            log.warning("the lazy mount of snapshot %s failed (%s); mounting it again", s.key, e)
        except Exception as e:  # a bug: as above, the retry reports what it finds
            log.warning("the lazy mount of snapshot %s failed (%s: %s); mounting it again", s.key,
                        type(e).__name__, e)
        with self._remote_lock:
            if self._jobs.get(s.remote) is job:
                self._jobs[s.remote] = self._pool.submit(self._mount_remote, dict(s.labels))
            again = self._jobs[s.remote]
        mp = again.result()
        if mp != s.remote:
            raise ShoalError(f"snapshot {s.key}: lazy mount {s.remote} came up at {mp or '(nowhere)'}")

    def _lowers(self, parents: list[Snapshot]) -> list[str]:
        out: list[str] = []
        for p in parents:
            if p.remote:
                self._mounted(p)
                out.append(p.remote)
                break
            out.append(str(self._dir(p) / "fs"))
        return out

    def mounts(self, key: str) -> list[Mount]:
        s = self.meta.get(key)
        if s.kind == KIND_COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: it has no mounts")
        lowers = self._lowers(self.meta.chain(key))
        d = self._dir(s)
        if s.kind == KIND_ACTIVE:
            if not lowers:
                return [Mount("bind", str(d / "fs"), ("rw", "rbind"))]
            return [Mount("overlay", "overlay", (f"workdir={d / 'work'}", f"upperdir={d / 'fs'}",
                                                 f"lowerdir={':'.join(lowers)}"))]
        if not lowers:
            return [Mount("bind", str(d / "fs"), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]

    def _create(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> list[Mount]:
        if parent and self._jobs:  # a lazy mount below it that is still under way, or failed: before any row
            try:
                below = self.meta.get(parent)
            except NotFound:
                pass  # meta.create says so
            else:
                self._lowers([below, *self.meta.chain(parent)])
        s = self.meta.create(key, parent, kind, labels)
        d = self._dir(s)
        try:
            if d.exists():  # a leftover of an id sqlite reused after a crash
                shutil.rmtree(d)
            (d / "fs").mkdir(parents=True, mode=0o755)
            if kind == KIND_ACTIVE:
                (d / "work").mkdir(mode=0o711)
        except BaseException:
            self.meta.remove(key)
            raise
        return self.mounts(key)

    def _exists(self, key: str) -> bool:
        try:
            self.meta.get(key)
        except NotFound:
            return False
        return True

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = labels.get(TARGET_LABEL, "")
        if target and self._mount_remote is not None:
            if self._exists(target):
                raise SnapshotExists(f"target snapshot {target} already exists")
            with self._remote_lock:
                if self._locate_remote is None:
                    mp = self._mount_remote(labels)
                else:  # started, not awaited: the pull goes on (and the pod sandbox starts) while it mounts
                    mp = self._locate_remote(labels)
                    if mp:
                        job = self._jobs.get(mp)
                        if job is None or (job.done() and job.exception() is not None):
                            self._jobs[mp] = self._pool.submit(self._mount_remote, dict(labels))
                if mp:
                    try:
                        self.meta.create(target, parent, KIND_COMMITTED, labels, remote=mp)
                    except SnapshotExists:
                        pass
            if mp:
                raise SnapshotExists(f"target snapshot {target} already exists (served lazily from {mp})")
        return self._create(key, parent, KIND_ACTIVE, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, KIND_VIEW, labels)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        s = self.meta.get(key)
        u = _du(self._dir(s) / "fs")
        self.meta.commit(key, name, labels, u.size, u.inodes)

    def stat(self, key: str) -> Snapshot:
        return self.meta.get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        s = self.meta.get(key)
        if not paths:
            new = dict(labels)
        else:
            new = dict(s.labels)
            for p in paths:
                if p == "labels":
                    new = dict(labels)
                elif p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise UsageError(f"cannot update field {p!r} of snapshot {key}")
        return self.meta.set_labels(key, new)

    def list(self, filter_texts: list[str]) -> list[Snapshot]:
        fs = [filters.parse(t) for t in filter_texts if t.strip()]
        out = []
        for s in self.meta.all():
            kind = {KIND_VIEW: "view", KIND_ACTIVE: "active", KIND_COMMITTED: "committed"}.get(s.kind, "")
            if filters.match_any(fs, {"name": s.key, "parent": s.parent, "kind": kind}, s.labels):
                out.append(s)
        return out

    def usage(self, key: str) -> Usage:
        s = self.meta.get(key)
        if s.kind == KIND_ACTIVE and not s.remote:
            return _du(self._dir(s) / "fs")
        return Usage(s.size, s.inodes)  # committed and remote: from metadata, never a walk

    def remove(self, key: str) -> None:
        s = self.meta.remove(key)
        shutil.rmtree(self._dir(s), ignore_errors=True)
        if s.remote and self._release_remote is not None:
            with self._remote_lock:
                if self.meta.remote_users(s.remote) == 0:
                    job = self._jobs.pop(s.remote, None)
                    if job is not None:  # let a mount under way finish, then take it away
                        try:
                            job.result()
                        except Exception as e:
                            log.info("the lazy mount %s had failed: %s", s.remote, e)
                    self._release_remote(s.remote)

    def cleanup(self) -> None:
        ids = self.meta.ids()
        for d in (self.root / "snapshots").iterdir():
            if not (d.name.isdigit() and int(d.name) in ids):
                log.info("cleanup: removing %s", d)
                shutil.rmtree(d, ignore_errors=True)
