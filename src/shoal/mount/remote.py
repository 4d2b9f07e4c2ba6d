"""``docker://`` images for mount, run and profile: metadata now, packs lazily (docs/spec/mount.md §5).

Opening ``docker://HOST/REPO:TAG`` fetches the manifest (an image index resolves to this machine's
image, or ``--platform``'s, by ``shoal.format.platform.choose``), then — in parallel — the config,
the index and the recorded start-up profile. A profile with a bundle (docs/spec/bundle.md) hands the
mount daemon the bundle's descriptor: the daemon streams and checks it after its fork (§6.1, §6.2).
Without one, and with ``--prefetch auto|all``, the profile's range reads start the moment it arrives
(``EarlyFetch``, unverified bytes in memory) while the index is still being fetched and decoded; the
``LazySource`` adopts them, verifies them, and hands them over to the mount daemon across its fork.
Config and index are verified by digest and kept *untagged* in the local store's layout (so a later
open of the same digest fetches neither again; ``shoal gc`` may remove them, and the partial packs a
mount cached, once nothing references them). Frames come from a ``LazySource`` over the registry:
verified range reads, cached as partial packs in the shared store.

Credentials are resolved in the calling process (``--creds``, else the auth files) and handed to the
daemon in memory, so a mount keeps working for its whole life even if the auth file changes; the
registry client refreshes expired tokens with them.  The daemon never reuses the parent's HTTP
connections or sqlite handle (``LazySource.after_fork``).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from shoal import mediatypes as mt
from shoal.early import EarlyFetch
from shoal.errors import FormatError, TransportError, UsageError
from shoal.format.manifest import ShoalManifest, json_object, parse_config, parse_manifest
from shoal.format.platform import choose
from shoal.format.runtime_view import ANN_INDEX, for_readers, index_hint
from shoal.lazy import NEIGHBOURS, LazySource
from shoal.mount import bundle
from shoal.mount.image import OpenedImage, OpenOptions
from shoal.mount.profile import Profile, find_remote, load_local, local_path, save_local
from shoal.reader import FrameSource
from shoal.store import Store
from shoal.transports.base import BlobInfo, ImageReference
from shoal.transports.context import SystemContext
from shoal.transports.docker import DockerReference, DockerSource, parse_docker

__all__ = ["open_docker", "registry_options"]

log = logging.getLogger(__name__)

_MAX_META = 256 * 1024 * 1024  # config and index blobs are read whole


def registry_options(ref: DockerReference, ctx: SystemContext, fetch_timeout: float) -> SystemContext:
    """The context a mount's source is made with: the caller's, plus resolved credentials (from
    ``ctx.auth_file`` first) and a per-request timeout no longer than ``fetch_timeout`` (so a dead
    registry frees its threads)."""
    from shoal.transports.registry import load_credentials

    if ctx.credentials is None:
        # per-repository keys first (containers-auth.json(5))
        creds = load_credentials(ref.host, ref.repo, ctx.auth_file)
        if creds is not None:
            ctx = ctx.replace(credentials=creds)
    return ctx.replace(timeout=min(ctx.timeout, max(1.0, fetch_timeout)))


def open_docker(ref: ImageReference, ctx: SystemContext, options: OpenOptions) -> OpenedImage | None:
    """A lazily served ``docker://`` image, or None when it is a classic image (``open_image`` then
    converts it)."""
    # Decoding the index is CPU-bound and holds the GIL in 5 ms slices; the threads fetching the
    # profile and its frames meanwhile need it for a moment per response.  Shorter slices let them in.
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, 0.0005))
    try:
        return _open_docker(parse_docker(ref.details()), ctx, options)
    finally:
        sys.setswitchinterval(old)


def _warm(modules: tuple[str, ...]) -> threading.Thread | None:
    """Import ``modules`` in a thread of their own (``OpenOptions.warm``): they load while the open
    waits for the registry (config, index, profile), instead of in the mount daemon after its fork
    (the file system and its server).  A failed import is left to whoever needs it."""
    modules = tuple(m for m in modules if m not in sys.modules)  # a warm process (shoal service) has them
    if not modules:
        return None

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the daemon reports it
                log.debug("cannot preload %s", name, exc_info=True)

    t = threading.Thread(target=load, name="shoal-warm", daemon=True)
    t.start()
    return t


def _open_docker(ref: DockerReference, ctx: SystemContext, options: OpenOptions) -> OpenedImage | None:
    if options.fetch_timeout <= 0:
        raise UsageError("--fetch-timeout must be positive")
    log.debug("timeline: opening %s", ref)
    reg = registry_options(ref, ctx, options.fetch_timeout)
    store = Store.open(ctx.store)
    src = ref.new_source(reg)
    pool = ThreadPoolExecutor(6, thread_name_prefix="shoal-open")
    wanted = options.profile and options.prefetch != "none"  # only prefetching uses a profile
    lookups: dict[str, Future[tuple[Profile | None, tuple[str, int] | None]]] = {}
    # the mount daemon's own client, made while we wait for the network (loading CA certificates
    # takes ~0.1 s); it is never used before the fork, so it holds no connection the parent shares
    spare = pool.submit(ref.new_source, reg)
    # and one for a bundle the daemon streams (bundle.md §6.2), so it does not make one while it mounts
    spare_bundle = pool.submit(ref.new_source, reg) if wanted else None
    # the index the snapshotter's label or the tag's image index names, requested beside the manifest (the
    # manifest decides: only the blob it names is decoded); a blob the store holds is not requested
    hinted: dict[tuple[str, int], Future[None]] = {}

    def hint_index(hint: tuple[str, int] | None) -> None:
        if hint is not None and hint not in hinted and not store.layout.has(hint[0]):
            hinted[hint] = pool.submit(_blob, src, store, BlobInfo(hint[0], hint[1], mt.INDEX))

    def known(digest: str, hint: tuple[str, int] | None) -> None:
        hint_index(hint)
        if wanted:
            _look_up(pool, src, store, digest, lookups)

    hint_index(options.index_hint)
    # the serving modules load while the manifest, config and index are on their way: the main thread
    # only waits then (~0.1 s less to the fork than starting once the manifest is known)
    warm = _warm(options.warm)
    try:
        raw = _manifest(src, store, ctx.platform, known)
        if raw is None:
            for look in lookups.values():  # a digest guessed to be a Shoal manifest: let its lookup end first
                look.exception()
            src.close()
            for sp in (spare, spare_bundle):
                if sp is not None:
                    sp.result().close()
            return None
        m = parse_manifest(raw)
        log.debug("timeline: manifest %s", m.digest)
        ours = hinted.get((m.index.digest, m.index.size))
        if hinted and ours is None:
            log.debug("index hint %s is not the manifest's index; not used", ", ".join(f"{d}:{n}" for d, n in hinted))
        meta = [pool.submit(_blob, src, store, m.config), ours or pool.submit(_blob, src, store, m.index)]
        early_wanted = options.prefetch in ("auto", "all")
        prof_f = pool.submit(_profile, src, store, m, early_wanted, lookups.get(m.digest)) if wanted else None
        meta[1].result()
        log.debug("timeline: index stored")
        # decoding and checking the index overlaps the profile lookup and the config's request
        index = store.load_index(m, lazy=not options.whole_index, freeze=options.freeze)
        log.debug("timeline: index decoded (%d frames)", len(index.frames))
        meta[0].result()
        store.layout.put(raw, m.digest)  # the manifest last: the store holds what it names
        config = parse_config(store.layout.get(m.config.digest))
        prof, early, bun = prof_f.result() if prof_f is not None else (None, None, None)
        fresh = spare.result()
        for_bundle = spare_bundle.result() if spare_bundle is not None else None
        pool.shutdown(wait=True)  # its threads used sqlite (has_frame): gone before any fork
    except TransportError as exc:  # name the image: "GET host/v2/... failed" alone does not say which mount
        src.close()
        raise type(exc)(f"cannot open {ref}: {exc}") from None
    except BaseException:
        src.close()
        raise
    finally:
        pool.shutdown(wait=False)
        if warm is not None:
            warm.join()  # no import may be under way at a fork (a half-imported module would hang the child)
            log.debug("timeline: serving modules loaded")
    frames: tuple[int, ...] = ()
    adopted: dict[int, Future[bytes]] = {}
    if prof is not None:
        found = prof.frame_indices(index)
        if found is None:
            log.warning("ignoring the profile of %s: it names frames its index does not have", m.digest)
        else:
            frames = found  # with a bundle, its source leaves out the frames holding its chunks
            if early is not None:
                adopted = {fi: fut for fi, (p, off, _) in zip(found, prof.frames)
                           if (fut := early.futures.get((m.packs[p].digest, off))) is not None}
    fresh.follow(src)  # the daemon reads from the endpoint (mirror) that served the manifest
    if for_bundle is not None:
        for_bundle.follow(src)
        if bun is None or bun.desc is None:
            for_bundle.close()
            for_bundle = None
    spares = [fresh]

    def reopen() -> DockerSource:
        if spares:
            return spares.pop()
        again = ref.new_source(reg)
        again.follow(src)
        return again

    log.debug("timeline: opened %s (%d profile frames)", m.digest, len(frames))
    # with a bundle, the workload's reads are the bundle's: a demand read is a miss, carrying neighbours waste
    bundled = bun is not None and (bun.blob is not None or bun.desc is not None)
    lazy = LazySource(store, src, m, index, reopen=reopen, fetch_timeout=options.fetch_timeout,
                      where=f"{ref.host}/{ref.repo}", early=adopted, neighbours=0 if bundled else NEIGHBOURS)
    source: FrameSource = lazy
    if bun is not None and bun.blob is not None:  # the store's
        source = bundle.BundleSource.deferred(lazy, index, bun.blob, m.root, m.digest)
    elif bun is not None and bun.desc is not None:  # the registry's: streamed by the mount daemon
        root, (digest, size), made = store.root, bun.desc, for_bundle
        source = bundle.BundleSource.deferred(
            lazy, index, None, m.root, m.digest, keep=lambda blob: bundle.save_local(root, m.digest, blob),
            fetch=lambda: _stream(made or _followed(ref, reg, src), digest, size), size=size,
            timeout=options.fetch_timeout)
    return OpenedImage(ref=str(ref), name=str(ref), digest=m.digest, index=index, source=source,
                       config=config, prefetch=frames, local=False, manifest=m)


def _followed(ref: DockerReference, reg: SystemContext, src: DockerSource) -> DockerSource:
    s = ref.new_source(reg)
    s.follow(src)
    return s


def _stream(s: DockerSource, digest: str, size: int) -> Iterator[bytes]:
    """Blob ``digest`` of ``s``'s repository as it arrives, through ``s`` (a client of the mount daemon's
    own: made before the fork but never used there, on the endpoint that served the manifest); verified
    by digest and size at its end."""
    try:
        with s.client.open_blob_stream(s.repo, digest, size=size) as r:
            yield from r
    finally:
        s.close()


def _look_up(pool: ThreadPoolExecutor, src: DockerSource, store: Store, digest: str,
             lookups: dict[str, Future[tuple[Profile | None, tuple[str, int] | None]]]) -> None:
    """Start the registry's profile lookup for the manifest ``digest`` at once, in ``pool``: it needs
    nothing but the digest, so its two round trips overlap the manifest's own (docs/spec/mount.md §5.1).
    Not when the store has a profile of it (that one is used)."""
    if digest not in lookups and not local_path(store.root, digest).exists():
        lookups[digest] = pool.submit(find_remote, src.client, src.repo, digest)


def _manifest(src: DockerSource, store: Store, platform: str | None,
              known: Callable[[str, tuple[str, int] | None], None] | None = None) -> bytes | None:
    """The Shoal manifest ``src`` names (a local copy when the reference is a digest we hold); None
    for a classic image.  ``known(digest, index_hint)`` is called as soon as the digest of the Shoal
    manifest is known, before that manifest is fetched: the reference's own digest, or an image index's
    Shoal child (a guess for a digest reference: it may name an index or a classic image), with the
    (digest, size) of its index blob that the image index's entry names (oci-mapping.md §4.1), if any."""
    digest = src.ref.digest
    if digest is not None and known is not None:
        known(digest, None)
    if digest is not None and store.layout.has(digest):
        raw = store.layout.get(digest)
        if _is_manifest(raw):
            return raw
    raw, media = src.get_manifest()
    doc = json_object(raw)
    if media in mt.INDEX_TYPES or "manifests" in doc:
        raw = _child(src, doc, platform, known)
        doc = json_object(raw)
    if doc.get("artifactType") != mt.ARTIFACT_TYPE:
        return None
    return raw


def _is_manifest(raw: bytes) -> bool:
    try:
        return json_object(raw).get("artifactType") == mt.ARTIFACT_TYPE
    except FormatError:
        return False


def _child(src: DockerSource, doc: dict[str, Any], platform: str | None,
           known: Callable[[str, tuple[str, int] | None], None] | None = None) -> bytes:
    """The index's image for ``platform`` (default this machine's) by the one rule; a Shoal child wins
    over a classic one of the same platform.  ``known`` hears a Shoal child's digest before it is fetched."""
    kid = choose(for_readers(doc.get("manifests")), platform, str(src.ref),
                 prefer=lambda m: m.get("artifactType") == mt.ARTIFACT_TYPE)
    if known is not None and kid.get("artifactType") == mt.ARTIFACT_TYPE:
        known(str(kid["digest"]), index_hint((kid.get("annotations") or {}).get(ANN_INDEX)))
    raw, _ = src.get_manifest(str(kid["digest"]))  # verified against its digest
    return raw


def _blob(src: DockerSource, store: Store, d: Any) -> None:
    """Config or index into the layout, verified by digest and size (skipped when held)."""
    if store.layout.has(d.digest):
        return
    if not 0 <= d.size <= _MAX_META:
        raise FormatError(f"blob {d.digest} has an invalid or oversized size {d.size}")
    stream, _ = src.get_blob(BlobInfo(d.digest, d.size, d.media_type))
    try:
        store.layout.put_stream(stream, d.digest, d.size)
    finally:
        stream.close()


@dataclass(frozen=True)
class Pending:
    """A profile's bundle, not checked yet (``BundleSource.deferred`` checks it in the mount daemon):
    its ``blob`` from the store, or the registry's ``(digest, size)`` of it for the daemon to stream
    (bundle.md §6.2; then saved locally once it passed)."""

    blob: bytes | None
    desc: tuple[str, int] | None = None


def _profile(src: DockerSource, store: Store, m: ShoalManifest, early: bool,
             looked_up: Future[tuple[Profile | None, tuple[str, int] | None]] | None = None,
             ) -> tuple[Profile | None, EarlyFetch | None, Pending | None]:
    """The local profile of ``m``, else the newest one in the registry (``looked_up`` if that lookup is
    under way already; then saved locally), with its bundle blob, unchecked (docs/spec/bundle.md §3,
    §6.1); with ``early`` and no bundle, its frames not yet in the store are requested at once."""
    prof = load_local(store.root, m.digest, len(m.packs))
    desc: tuple[str, int] | None = None
    blob: bytes | None = None
    if prof is not None:
        blob = bundle.load_local(store.root, m.digest)
    else:
        prof, desc = (looked_up.result() if looked_up is not None
                      else find_remote(src.client, src.repo, m.digest))
        if prof is not None and prof.pack_count != len(m.packs):
            log.warning("ignoring the registry's profile of %s: it names %d packs, the image has %d", m.digest,
                        prof.pack_count, len(m.packs))
            prof = desc = None
        if prof is not None:
            try:
                save_local(store.root, prof)
            except OSError as exc:
                log.warning("cannot save the profile of %s locally: %s", m.digest, exc.strerror)
    if blob is not None or desc is not None:  # the workload's chunks come with it: no profile frame early
        return prof, None, Pending(blob, desc)
    if prof is None or not early:
        return prof, None, None
    # what the store already holds, cheaply: one query, then a look at each partly present pack's frames
    # (this thread competes for the GIL with the index decoder: every call it avoids is ~5 ms sooner)
    partial = store.catalog.frame_packs()
    want = []
    for p, off, clen in prof.frames:
        d = m.packs[p]
        if off + clen > d.size or store.layout.has(d.digest):
            continue
        if d.digest in partial and store.has_frame(d.digest, off):
            continue
        want.append((d.digest, off, clen))
    return prof, EarlyFetch(src, {p.digest: p.size for p in m.packs}, want) if want else None, None

