"""fsck and gc for the local store (docs/spec/store.md §4).

fsck checks every blob against its digest, every tagged image's structure
(manifest, config, index, packs, sizes) and, deeply, that every chunk an
index names decompresses from its pack and hashes to its id, and that every
location the chunk catalogue records holds the chunk it names (a row that
does not is reported and dropped).  ``blobs_only`` skips the chunk passes:
blob digests and structure only.  gc removes what no tag reaches (blobs, partial
packs, and the start-up profiles of manifests it removes or never had), under the
exclusive gc lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shoal.errors import ShoalError
from shoal.format.model import Frame, Index
from shoal.format.packing import bad_chunk, chunk_ok, open_frame
from shoal.format.runtime_view import registry_index
from shoal.progress import NULL, Sink
from shoal.store import Store
from shoal.store.layout import hash_file

__all__ = ["FsckReport", "GcReport", "fsck", "gc", "reachable"]

log = logging.getLogger(__name__)


@dataclass
class FsckReport:
    blobs: int = 0
    bytes: int = 0
    images: int = 0
    chunks: int = 0
    errors: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class GcReport:
    removed: int = 0  # blobs and partial packs
    freed: int = 0  # bytes, profile files included
    tmp_removed: int = 0
    kept: int = 0
    profiles_removed: int = 0  # files STORE/profiles/<hex>.json and <hex>.bundle


# a start-up profile of manifest <hex> and its bundle (mount.md §6, bundle.md §5); anything else there
# (the temp file of a profile being written: ``.NAME.<random>.tmp``) is left alone
_PROFILE_FILE = re.compile(r"([0-9a-f]{64})\.(?:json|bundle)")



def _check_chunks(store: Store, idx: Index, bad_blobs: set[str]) -> list[str]:
    errors = []
    for fi, cis in sorted(idx.chunks_by_frame().items()):
        f = idx.frames[fi]
        pack = "sha256:" + idx.packs[f.pack].hex()
        if pack in bad_blobs:
            continue
        if not store.has_frame(pack, f.offset):
            # a pull skipped this frame because the store holds its chunks elsewhere
            locs = store.catalog.locate([idx.chunk_ids[c] for c in cis])
            missing = [c for c in cis if (loc := locs.get(idx.chunk_ids[c])) is None
                       or not store.has_frame(loc.pack, loc.frame_off)]
            if missing:
                errors.append(f"pack {pack} frame @{f.offset}: {len(missing)} chunks are not in the store")
            continue
        try:
            data = open_frame(store.read_frame(pack, f.offset, f.clen), f, f"{pack}@{f.offset}")
        except ShoalError as exc:
            errors.append(f"pack {pack} frame @{f.offset}: {exc}")
            continue
        # every bad chunk is reported, each by the check the reader and pull make (verify_frame's)
        errors += [f"chunk sha256:{idx.chunk_ids[ci].hex()} in pack {pack} failed verification"
                   for ci in cis if bad_chunk(idx, data, (ci,)) is not None]
    return errors


def _check_catalogue(store: Store, bad_blobs: set[str], rep: FsckReport) -> None:
    """Re-hash every catalogued chunk at the location the catalogue gives; drop the rows that lie."""
    groups: dict[tuple[str, int, int, int], list[tuple[bytes, int, int]]] = {}
    for cid, loc in store.catalog.rows():
        groups.setdefault((loc.pack, loc.frame_off, loc.frame_clen, loc.frame_ulen), []).append(
            (cid, loc.off, loc.length))
    bad: list[bytes] = []
    for (pack, off, clen, ulen), rows in groups.items():
        if pack in bad_blobs:
            continue  # its rows are dropped with the corrupt blob
        if not store.has_frame(pack, off):
            rep.errors.append(f"catalogue: {len(rows)} chunks point at frame {pack}@{off}, which is not in the store")
            bad += [cid for cid, _, _ in rows]
            continue
        try:
            data = open_frame(store.read_frame(pack, off, clen), Frame(0, off, clen, ulen), f"{pack}@{off}")
        except ShoalError as exc:
            rep.errors.append(f"catalogue: frame {pack}@{off}: {exc}")
            bad += [cid for cid, _, _ in rows]
            continue
        for cid, o, n in rows:
            if not chunk_ok(data, o, n, cid):
                rep.errors.append(f"catalogue: chunk sha256:{cid.hex()} is not at {pack}@{off}+{o}")
                bad.append(cid)
    for cid in bad:
        store.catalog.drop_chunk(cid)
    if bad:
        rep.repaired.append(f"dropped {len(bad)} catalogue rows that did not verify")


def fsck(store: Store, sink: Sink = NULL, workers: int = 2, blobs_only: bool = False) -> FsckReport:
    rep = FsckReport()
    layout = store.layout
    blobs = layout.all_blobs()
    sizes = {d: layout.path(d).stat().st_size for d in blobs}
    sink.start("fsck", sum(sizes.values()))
    bad: set[str] = set()

    def check(d: str) -> tuple[str, str]:
        got = hash_file(layout.path(d))
        sink.advance("fsck", sizes[d])
        return d, got

    with ThreadPoolExecutor(workers) as pool:
        for d, got in pool.map(check, blobs):
            rep.blobs += 1
            rep.bytes += sizes[d]
            if got != d:
                bad.add(d)
                rep.errors.append(f"blob {d} is corrupt: content hashes to {got}")
    stale = store.catalog.packs() - set(blobs) - store.catalog.frame_packs()
    if stale:
        store.catalog.drop_packs(stale)
        rep.repaired.append(f"dropped catalogue rows of {len(stale)} missing packs")
    try:
        tagged = store.all_manifests()
    except ShoalError as exc:
        rep.errors.append(f"index.json: {exc}")
        tagged = []
    for name, plat, m in tagged:
        rep.images += 1
        name = f"{name} [{plat}]" if plat else name
        try:
            for dsc in (m.config, m.index, *m.packs):
                if dsc.digest not in sizes and dsc in m.packs:
                    continue  # partly pulled, or its chunks live elsewhere: checked frame by frame below
                if dsc.digest not in sizes:
                    rep.errors.append(f"{name}: blob {dsc.digest} is missing")
                elif sizes[dsc.digest] != dsc.size:
                    rep.errors.append(
                        f"{name}: blob {dsc.digest} has {sizes[dsc.digest]} bytes, manifest says {dsc.size}")
            if m.index.digest in bad:
                continue
            idx = store.load_index(m)
            rep.chunks += len(idx.chunk_ids)
            if not blobs_only:
                rep.errors += [f"{name}: {e}" for e in _check_chunks(store, idx, bad)]
        except ShoalError as exc:
            rep.errors.append(f"{name}: {exc}")
    if not blobs_only:
        _check_catalogue(store, bad, rep)
    bad_packs = bad & store.catalog.packs()
    if bad_packs:
        store.catalog.drop_packs(bad_packs)
        rep.repaired.append(f"dropped catalogue rows of {len(bad_packs)} corrupt packs")
    sink.finish("fsck")
    return rep


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def reachable(store: Store) -> set[str]:
    """Every blob a tag reaches: manifests, configs, indexes, packs — and the packs elsewhere in the
    store holding chunks of frames a pull skipped (the catalogue's "what references it")."""
    keep: set[str] = set()
    for desc in store.layout.refs().values():
        keep |= store.blobs_of(str(desc["digest"]))  # classic images too
    for _, _, m in store.all_manifests():
        keep.add(m.digest)
        keep.add(m.config.digest)
        keep.add(m.index.digest)
        keep.update(p.digest for p in m.packs)
        if all(store.layout.has(p.digest) for p in m.packs):
            continue
        idx = store.load_index(m)
        borrowed = []
        for ci, fi in enumerate(idx.chunk_frames):
            f = idx.frames[fi]
            if not store.has_frame("sha256:" + idx.packs[f.pack].hex(), f.offset):
                borrowed.append(idx.chunk_ids[ci])
        keep.update(loc.pack for loc in store.catalog.locate(borrowed).values())
    # referrers (store.md §5) are kept while their subject is: a referrer of a referrer too; the subject
    # may also be the registry index [view, Shoal manifest] of a kept Shoal manifest, or that view (a signature made at
    # build time, or pulled with the image: the index itself is not stored, it is made again at push)
    subjects = {str(d["digest"]): store.subject_of(str(d["digest"])) for d in store.layout.untagged()}
    alive = set(keep)
    if subjects:
        for _, _, m in store.all_manifests():
            try:
                rindex, view = registry_index(store.layout.get(m.digest), store.layout.get(m.config.digest))
            except ShoalError:
                continue
            alive |= {sha256_digest(rindex), view.digest}
    while True:
        more = [d for d, s in subjects.items() if (s in keep or s in alive) and d not in keep]
        if not more:
            return keep
        for d in more:
            keep |= store.blobs_of(d)


def _gc_partial(store: Store, keep: set[str], scope: Collection[str] | None) -> int:
    n = 0
    for pack in store.partial.packs() | store.catalog.frame_packs():
        if pack not in keep and (scope is None or pack in scope):
            store.partial.drop(pack)
            n += 1
    return n


def _gc_profiles(store: Store, keep: set[str], scope: Collection[str] | None, rep: GcReport) -> None:
    """Remove the profile files (and bundles) of manifests gc does not keep: the profile goes with its
    image, as the image's blobs do.  Writers that save a profile before they tag its image (a pull or
    copy into the store, the containerd snapshotter's mount) hold the shared gc lock until the tag is
    written, so the caller's exclusive lock keeps them out; an untagged lazy mount has read its profile
    and bundle before it serves, and its profile is garbage as its metadata is (mount.md §5.1)."""
    root = store.root / "profiles"
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot list the profiles in %s: %s", root, exc.strerror)
        return
    for name in sorted(names):
        m = _PROFILE_FILE.fullmatch(name)
        if m is None or (digest := "sha256:" + m.group(1)) in keep or (scope is not None and digest not in scope):
            continue
        p = root / name
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:  # removed meanwhile (the snapshotter's release)
            continue
        except OSError as exc:
            log.warning("cannot remove the profile file %s: %s", p, exc.strerror)
            continue
        rep.freed += size
        rep.profiles_removed += 1


def gc(store: Store, sink: Sink = NULL, scope: Collection[str] | None = None) -> GcReport:
    """Remove what no tag reaches, and the profiles of manifests it does not reach.  With ``scope``
    (digests of blobs and packs), only those blobs, partial packs and manifests' profiles may go and
    ``tmp/`` is left alone: the collection of one image's data once its last
    user let go of it (the containerd snapshotter's, docs/containerd.md), which leaves whatever else
    is untagged in the store to its owner."""
    rep = GcReport()
    layout = store.layout
    with layout.lock("gc.lock", exclusive=True):
        keep = reachable(store)
        layout.drop_untagged({str(d["digest"]) for d in layout.untagged()
                              if d["digest"] not in keep and (scope is None or d["digest"] in scope)})
        doomed = [d for d in layout.all_blobs() if d not in keep and (scope is None or d in scope)]
        sink.start("gc", len(doomed), unit="blobs")
        for d in doomed:
            rep.freed += layout.path(d).stat().st_size
            layout.remove(d)
            rep.removed += 1
            sink.advance("gc", 1)
        rep.kept = len(keep)
        for p in layout.tmp.iterdir() if scope is None else ():
            p.unlink(missing_ok=True)
            rep.tmp_removed += 1
        rep.removed += _gc_partial(store, keep, scope)
        _gc_profiles(store, keep, scope, rep)
        gone = store.catalog.packs() - set(layout.all_blobs()) - store.catalog.frame_packs()
        store.catalog.drop_packs(gone if scope is None else gone & set(scope))
    if scope is None:
        os.sync()
    sink.finish("gc")
    return rep
