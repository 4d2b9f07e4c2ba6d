"""The snapshotter's share of the Shoal store (docs/containerd.md, "The store").

Each image the snapshotter serves lazily is tagged ``shoal-snapshotter:<manifest hex>`` in its store
while it is mounted, so no gc (the snapshotter's or a user's ``shoal gc``) removes the frames its
FUSE daemon cached.  When the last snapshot of the image goes, the tag and the image's local profile (and bundle)
go, and the store's gc, scoped to that image's manifest, config, index and packs, removes whatever no
other tag still reaches (spec/store.md §4): chunks another image uses stay.  The collection runs in
one background thread, off the gRPC threads; a mount holds the store's shared ``gc.lock`` from its
start until its tag is written, so the gc never runs between a mount's first write and its tag.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from shoal.errors import NotFound, ShoalError
from shoal.mount.bundle import bundle_path
from shoal.mount.profile import local_path
from shoal.store import Store
from shoal.store.maintenance import gc

__all__ = ["PIN_REPO", "StoreCache", "pin_name"]

log = logging.getLogger(__name__)

PIN_REPO = "shoal-snapshotter"


def pin_name(digest: str) -> str:
    return f"{PIN_REPO}:{digest.removeprefix('sha256:')}"


class StoreCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store.open(root)  # the catalogue's connections are per thread
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-snap-gc")
        self._tagger = ThreadPoolExecutor(1, thread_name_prefix="shoal-snap-tag")
        self._pins: dict[str, Future[None]] = {}
        self._pins_lock = threading.Lock()

    @contextlib.contextmanager
    def mounting(self) -> Iterator[None]:
        """Hold while a mount writes an image's metadata and frames before ``pin`` tags it."""
        with self.store.layout.writing():
            yield

    def pin(self, digest: str) -> None:
        """Tag the lazily mounted image ``digest`` (its manifest is in the store: the mount put it there)."""
        try:
            self.store.tag(pin_name(digest), self.store.manifest(digest))
        except ShoalError as e:
            log.warning("cannot tag %s in the store %s (a gc may drop its cached frames): %s", digest, self.root, e)

    def pin_later(self, digest: str, hold: contextlib.ExitStack) -> None:
        """``pin`` in a thread of its own, under ``hold`` (the caller's ``mounting``, handed over, so no
        gc runs between the mount's writes and the tag), so that the snapshot waiting for the mount
        goes on at once (docs/containerd.md "Start-up"); ``release`` and ``pinned`` wait for it."""
        def tag() -> None:
            with hold:
                self.pin(digest)

        with self._pins_lock:
            self._pins[digest] = self._tagger.submit(tag)

    def _tagged(self, digest: str | None = None) -> None:
        """Wait for the pending ``pin_later`` of ``digest`` (of every digest if None)."""
        with self._pins_lock:
            if digest is None:
                futs = list(self._pins.values())
                self._pins.clear()
            else:
                one = self._pins.pop(digest, None)
                futs = [one] if one is not None else []
        for f in futs:
            f.result()

    def pinned(self) -> set[str]:
        """The manifest digests the snapshotter's tags name."""
        self._tagged()
        return {"sha256:" + name.rpartition(":")[2] for name in self.store.layout.refs()
                if name.rpartition(":")[0] == PIN_REPO}

    def release(self, digest: str) -> Future[None] | None:
        """Untag ``digest`` and drop its cached profile now (a mount of it again tags it again), then
        collect what of it no other tag reaches in the background."""
        self._tagged(digest)
        try:
            with contextlib.suppress(NotFound):
                self.store.untag(pin_name(digest))
            local_path(self.root, digest).unlink(missing_ok=True)  # its cached profile (mount.md §6)
            bundle_path(self.root, digest).unlink(missing_ok=True)  # and the profile's bundle (bundle.md §5)
        except (ShoalError, OSError) as e:
            log.warning("cannot release %s in the store %s: %s", digest, self.root, e)
            return None
        return self._pool.submit(self._collect, digest)

    def _scope(self, digest: str) -> set[str]:
        """The image's blobs and packs, and the packs elsewhere that hold chunks of it (read from
        another image's frames instead of fetched: kept while that image had a tag, theirs now)."""
        scope = {digest}
        with contextlib.suppress(NotFound):  # a manifest some other gc removed: nothing else to find
            m = self.store.manifest(digest)
            scope |= {m.config.digest, m.index.digest, *(p.digest for p in m.packs)}
            idx = self.store.load_index(m)
            scope |= {loc.pack for loc in self.store.catalog.locate(idx.chunk_ids).values()}
        return scope

    def _collect(self, digest: str) -> None:
        try:
            rep = gc(self.store, scope=self._scope(digest))
        except (ShoalError, OSError) as e:
            log.warning("cannot collect the cache of %s in the store %s: %s", digest, self.root, e)
            return
        log.info("store %s: released %s: %d blobs and partial packs removed (%d bytes)", self.root, digest,
                 rep.removed, rep.freed)

    def close(self) -> None:
        self._tagger.shutdown(wait=True)
        self._pool.shutdown(wait=True)
