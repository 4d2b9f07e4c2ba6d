"""Turn an image reference into what a mount serves: index, frame source and runtime config.

``open_image(ref, store, options)`` is the one entry point used by ``mount``, ``run`` and
``profile``.  A reference is a local ``NAME[:TAG]`` in the store, or ``scheme://...`` served by an
opener registered with ``register_opener`` (``docker://`` is ``shoal.mount.remote``, registered
on first use): an opener returns an ``OpenedImage`` whose ``source`` is any ``FrameSource``; the
FUSE adapter never knows where bytes come from.

``CountingSource`` wraps any source to count what the mount fetched (``shoal status``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from shoal.errors import UsageError
from shoal.format.manifest import ImageConfig, parse_config
from shoal.format.model import Index
from shoal.reader import ForwardingSource, FrameSource, StoreSource

__all__ = ["OpenedImage", "OpenOptions", "Opener", "open_image", "register_opener", "split_scheme",
           "CountingSource", "FetchStats", "LocalStoreSource"]

StorePath = str | os.PathLike[str] | None


@dataclass(frozen=True)
class OpenedImage:
    """An image ready to be served.

    ``prefetch`` lists frame indices worth fetching ahead of any read (a recorded start-up
    profile, in the order it was recorded); empty when none is known.  ``--prefetch auto``
    fetches exactly these.  ``local`` is true when every frame is already on this machine.
    """

    ref: str  # as the user gave it
    name: str  # canonical display name, e.g. "debian:12" or "docker://host/repo:tag"
    digest: str  # manifest digest
    index: Index
    source: FrameSource
    config: ImageConfig
    prefetch: tuple[int, ...] = ()
    local: bool = True


@dataclass(frozen=True)
class OpenOptions:
    """How to reach a remote image.  ``registry`` holds the ``docker://`` transport options
    (``tls_verify``, ``ca_bundle``, ``cert_dir``, ``plain_http``, ``credentials``, ``retries``, ...;
    see transports/docker.py); ``fetch_timeout`` bounds how long a read waits for the network
    before it fails with EIO; ``profile`` looks up a recorded start-up profile for ``--prefetch auto``."""

    registry: Mapping[str, object] = field(default_factory=dict)
    fetch_timeout: float = 30.0
    platform: str | None = None  # os/arch[/variant] of an image index's image (default: this machine's)
    profile: bool = True
    prefetch: str = "auto"  # the mount's --prefetch: auto and all start the profile's range reads at once


# (reference without its "scheme://" prefix, store directory or None, options) -> OpenedImage.
# An opener that takes two parameters is called without the options.
Opener = Callable[[str, StorePath, OpenOptions], OpenedImage]


class LocalStoreSource(FrameSource):
    """Frames from the local store (complete packs, partial packs, chunks by id: ``StoreSource``).

    ``before_fork`` closes the store's sqlite connection and ``after_fork`` opens a new one, so the
    mount daemon never uses (or inherits SQLite's lock bookkeeping for) a connection made before
    ``fork``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._inner: StoreSource | None = None

    @property
    def inner(self) -> StoreSource:
        from shoal.store import Store

        if self._inner is None:
            self._inner = StoreSource(Store.open(self.root))
        return self._inner

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        return self.inner.fetch(pack, offset, length)

    def find_chunk(self, cid: bytes) -> bytes | None:
        return self.inner.find_chunk(cid)

    def before_fork(self) -> None:
        from shoal.lazy import release_sqlite

        self._inner = None
        release_sqlite()

    def after_fork(self) -> None:
        from shoal.lazy import keep_inherited

        if self._inner is not None:  # never close the parent's sqlite connection in the child
            keep_inherited(self._inner)
            self._inner = None


def _open_local(ref: str, store_root: StorePath, options: OpenOptions | None = None) -> OpenedImage:
    from shoal.store import Store, normalize_ref

    # absolute: the mount daemon changes its directory to /
    store = Store.open(None if store_root is None else os.path.abspath(os.fspath(store_root)))
    m = store.resolve(ref, options.platform if options is not None else None)  # an index: its host image
    index = store.load_index(m)
    config = parse_config(store.layout.get(m.config.digest))
    # every frame is local: a recorded profile has nothing to fetch ahead
    return OpenedImage(ref=ref, name=normalize_ref(ref), digest=m.digest, index=index,
                       source=LocalStoreSource(str(store.root)), config=config, local=True)


_OPENERS: dict[str, Callable[..., OpenedImage]] = {"": _open_local}
# built-in schemes, imported on first use so that a local mount never loads HTTP code
_BUILTIN = {"docker": "shoal.mount.remote"}


def register_opener(scheme: str, opener: Callable[..., OpenedImage]) -> None:
    """Serve references ``scheme://...`` with ``opener(rest, store_root[, options])``."""
    _OPENERS[scheme] = opener


def _takes_options(opener: Callable[..., OpenedImage]) -> bool:
    params = [p for p in inspect.signature(opener).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def split_scheme(ref: str) -> tuple[str, str]:
    """``"docker://a/b:c"`` -> ``("docker", "a/b:c")``; ``"name:tag"`` -> ``("", "name:tag")``."""
    scheme, sep, rest = ref.partition("://")
    if not sep:
        return "", ref
    return scheme, rest


def open_image(ref: str, store_root: StorePath = None, options: OpenOptions | None = None) -> OpenedImage:
    """Resolve ``ref`` to (index, frame source, config, profile).  Raises UsageError for unknown
    schemes, NotFound for unknown images, FormatError/IntegrityError for bad ones."""
    scheme, rest = split_scheme(ref)
    if scheme not in _OPENERS and scheme in _BUILTIN:
        importlib.import_module(_BUILTIN[scheme])  # registers itself
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in sorted(set(_OPENERS) | set(_BUILTIN)) if s) or "none"
        raise UsageError(f"cannot mount {scheme}:// references (local NAME:TAG works; other schemes: {known})")
    if _takes_options(opener):
        return opener(rest, store_root, options or OpenOptions())
    return opener(rest, store_root)


# ---------------------------------------------------------------------------------------------- counting


@dataclass
class FetchStats:
    fetches: int = 0
    bytes: int = 0
    seconds: float = 0.0
    frames: set[tuple[str, int]] = field(default_factory=set)  # distinct (pack, offset) fetched


class CountingSource(ForwardingSource):
    """A FrameSource that forwards to ``inner`` and counts requests, bytes and time (``counts``)."""

    def __init__(self, inner: FrameSource) -> None:
        super().__init__(inner)
        self.counts = FetchStats()
        self._lock = threading.Lock()

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        t0 = time.monotonic()
        data = self.inner.fetch(pack, offset, length)
        dt = time.monotonic() - t0
        with self._lock:
            s = self.counts
            s.fetches += 1
            s.bytes += len(data)
            s.seconds += dt
            s.frames.add((pack, offset))
        return data

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            s = self.counts
            return {"fetches": s.fetches, "bytes_fetched": s.bytes, "fetch_seconds": round(s.seconds, 6),
                    "frames_fetched": len(s.frames)}

    def fetched_frames(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.counts.frames)
