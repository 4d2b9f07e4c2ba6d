"""Turn any image reference into what a reader or a mount serves: index, frame source and runtime config.

``open_image(ref, store_root, options)`` is the one open-image layer: ``ls``, ``cat``, ``diff`` and
``unpack`` use it as ``mount``, ``run`` and ``profile`` do.  ``ref`` is parsed by the one grammar
(``shoal.transports.base.parse_reference``), and every transport is served:

- a store ``NAME[:TAG]``: frames from the store (complete packs, partial packs, chunks by id);
- ``docker://``: for a mount (``OpenOptions.lazy``), ``shoal.mount.remote``: metadata now, packs
  lazily through a ``LazySource`` that caches verified frames in the store; for a one-shot read
  (``lazy=False``), plain range reads, the store untouched;
- ``oci:``, ``oci-archive:``, ``dir:``, ``docker-archive:``: the index read through the transport
  (``shoal.transports.resolve``), frames as ranges of its pack blobs (``SourceFrames``);
- a classic (tar layer) image from any transport: converted (``shoal.convert``) into the store,
  *untagged* (``shoal gc`` reclaims it; a later open dedups against it), then served from there.

How to reach the image (auth file, TLS, registries.conf, store, platform) is the ``SystemContext``
in ``OpenOptions.context`` (transports/context.py).  The FUSE adapter never knows where bytes come
from.  ``CountingSource`` wraps any source to count what the mount fetched (``shoal status``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shoal.errors import NotShoal
from shoal.format.manifest import ImageConfig, ShoalManifest, parse_config
from shoal.format.model import Index
from shoal.inherited import keep_inherited
from shoal.reader import ForwardingSource, FrameSource, StoreSource
from shoal.store.catalog import close_connections
from shoal.transports.base import ImageReference, parse_reference
from shoal.transports.context import SystemContext

__all__ = ["OpenedImage", "OpenOptions", "open_image", "CountingSource", "FetchStats", "LocalStoreSource"]

log = logging.getLogger(__name__)

StorePath = str | os.PathLike[str] | None


@dataclass(frozen=True)
class OpenedImage:
    """An image ready to be served.

    ``prefetch`` lists frame indices worth fetching ahead of any read (a recorded start-up
    profile, in the order it was recorded); empty when none is known.  ``--prefetch auto``
    fetches exactly these.  ``local`` is true when every frame is already on this machine.
    ``classic`` is the digest of the classic image this one was converted from ("" if none).
    Call ``close()`` when done reading (a one-shot read's transport source).
    """

    ref: str  # as the user gave it
    name: str  # canonical display name, e.g. "debian:12" or "docker://host/repo:tag"
    digest: str  # manifest digest
    index: Index
    source: FrameSource
    config: ImageConfig
    prefetch: tuple[int, ...] = ()
    local: bool = True
    manifest: ShoalManifest | None = None
    classic: str = ""
    closer: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()


@dataclass(frozen=True)
class OpenOptions:
    """How to open an image.  ``context`` says how to reach it (``SystemContext``: auth file, TLS,
    registries.conf, store, platform); ``fetch_timeout`` bounds how long a mount's read waits for the
    network before it fails with EIO; ``profile`` looks up a recorded start-up profile for
    ``--prefetch auto``; ``lazy`` (mounts) serves ``docker://`` images through the store's frame
    cache, ``lazy=False`` (one-shot reads) with plain range reads.  ``whole_index`` decodes and checks
    the whole index before anything is read (unpack, ls, diff: a bad image is refused before any output)
    instead of each directory when it is first used (mounts; docs/spec/format.md §6.2).  ``warm`` names
    modules a lazy ``docker://`` open imports in a thread while it waits for the registry (a mount's
    serving modules: the daemon, forked after the open, then finds them loaded).  ``freeze``: a lazy
    index is frozen (``gc.freeze``) as it is decoded, for a process that forks a mount daemon and
    froze its own objects before the open (``shoal mount``, ``shoal run``: ``store.collector_paused``).
    ``index_hint``: (digest, size) of the index blob the manifest is expected to name (the containerd
    snapshotter's label): a ``docker://`` open requests it beside the manifest, and uses it only if the
    manifest names exactly that blob."""

    context: SystemContext = SystemContext()
    fetch_timeout: float = 30.0
    profile: bool = True
    prefetch: str = "auto"  # the mount's --prefetch: auto and all start the profile's range reads at once
    lazy: bool = True
    whole_index: bool = False
    warm: tuple[str, ...] = ()
    freeze: bool = False
    index_hint: tuple[str, int] | None = None
    # mount, run, profile: the signature policy first (docs/spec/trust.md §4); the image opened is the
    # manifest the policy decided on (by digest), so a tag moved meanwhile is not what gets served
    policy: bool = False

    @property
    def platform(self) -> str | None:  # os/arch[/variant] of an image index's image (default: this machine's)
        return self.context.platform


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

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        return self.inner.fetch_nowait(pack, offset, length)

    def find_chunk(self, cid: bytes) -> bytes | None:
        return self.inner.find_chunk(cid)

    def before_fork(self) -> None:
        self._inner = None
        close_connections()

    def after_fork(self) -> None:
        if self._inner is not None:  # never close the parent's sqlite connection in the child
            keep_inherited(self._inner)
            self._inner = None


def _open_store(ctx: SystemContext) -> Any:
    from shoal.store import Store

    return Store.open(ctx.store)


def _from_store(ref: str, name: str, store: Any, m: ShoalManifest, o: OpenOptions,
                classic: str = "") -> OpenedImage:
    index = store.load_index(m, lazy=not o.whole_index, freeze=o.freeze)
    config = parse_config(store.layout.get(m.config.digest))
    # every frame is local: a recorded profile has nothing to fetch ahead
    return OpenedImage(ref=ref, name=name, digest=m.digest, index=index, source=LocalStoreSource(str(store.root)),
                       config=config, local=True, manifest=m, classic=classic)


def open_image(ref: str | ImageReference, store_root: StorePath = None,
               options: OpenOptions | None = None) -> OpenedImage:
    """Resolve ``ref`` (any transport) to (index, frame source, config, profile); see the module text.
    ``store_root``, if given, replaces the context's store.  Raises UsageError for a malformed
    reference, NotFound for unknown images, FormatError/IntegrityError for bad ones; with
    ``options.policy``, PolicyRefused for an image the signature policy refuses."""
    o = options or OpenOptions()
    ctx = o.context
    # absolute: the mount daemon changes its directory to /
    store = ctx.store if store_root is None else os.fspath(store_root)
    ctx = ctx.replace(store=os.path.abspath(store) if store else None)
    r = parse_reference(ref) if isinstance(ref, str) else ref
    text = ref if isinstance(ref, str) else str(ref)
    if o.policy and r.policy_scope() is not None:
        from shoal.trust.image import admit

        adm = admit(r, ctx)  # PolicyRefused: nothing is opened
        if adm is not None and adm.digest:
            opened = _open(r.pinned(adm.digest), text, ctx, o)
            return dataclasses.replace(opened, name=str(r))
    return _open(r, text, ctx, o)


def _open(r: ImageReference, text: str, ctx: SystemContext, o: OpenOptions) -> OpenedImage:
    from shoal.transports.resolve import SourceFrames, resolve_image

    kind = r.transport.name
    if kind == "":  # the store: its own resolution (tags, image indexes, partial packs)
        st = _open_store(ctx)
        try:
            m: ShoalManifest | None = st.resolve(r.details(), ctx.platform)
        except NotShoal:  # a classic image the store holds (pulled or copied in): converted as a remote one, below
            m = None
        if m is not None:
            return _from_store(text, str(r), st, m, o)
    if kind == "docker" and o.lazy:  # frames cached in the store as they are read
        from shoal.mount.remote import open_docker

        lazy = open_docker(r, ctx, o)
        if lazy is not None:
            return dataclasses.replace(lazy, ref=text)
    src = r.new_source(ctx)
    try:
        res = resolve_image(src, r, ctx.platform)
        if res.manifest is None or res.index is None:
            return _open_classic(text, r, src, ctx, o)
    except BaseException:
        src.close()
        raise
    return OpenedImage(ref=text, name=str(r), digest=res.digest, index=res.index, source=SourceFrames(src),
                       config=parse_config(res.config), local=kind != "docker", manifest=res.manifest,
                       closer=src.close)


def _open_classic(text: str, r: ImageReference, src: Any, ctx: SystemContext, o: OpenOptions) -> OpenedImage:
    """A classic image: converted into the store, untagged, then read from there."""
    from shoal.convert import convert
    from shoal.format.platform import Platform

    st = _open_store(ctx)
    log.info("%s is a classic image: converting it into the store %s (untagged)", r, st.root)
    try:
        res = convert(src, st, None, platform=ctx.platform or Platform.host())
    finally:
        src.close()
    return _from_store(text, str(r), st, st.manifest(res.digest), o, classic=res.source_digest)


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
        self._count(pack, offset, len(data), time.monotonic() - t0)
        return data

    def fetch_nowait(self, pack: str, offset: int, length: int) -> bytes | None:
        t0 = time.monotonic()
        data = self.inner.fetch_nowait(pack, offset, length)
        if data is not None:
            self._count(pack, offset, len(data), time.monotonic() - t0)
        return data

    def _count(self, pack: str, offset: int, n: int, dt: float) -> None:
        with self._lock:
            s = self.counts
            s.fetches += 1
            s.bytes += n
            s.seconds += dt
            s.frames.add((pack, offset))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            s = self.counts
            return {"fetches": s.fetches, "bytes_fetched": s.bytes, "fetch_seconds": round(s.seconds, 6),
                    "frames_fetched": len(s.frames)}

    def fetched_frames(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.counts.frames)
