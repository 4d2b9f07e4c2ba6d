"""Compare two images through their Merkle trees: only subtrees whose digests differ are visited."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.format import index as fidx
from shoal.format.model import Entry, Index, Kind

__all__ = ["DiffResult", "diff"]


@dataclass(frozen=True)
class DiffResult:
    added: list[bytes]
    removed: list[bytes]
    changed: list[bytes]
    new_chunks: int  # chunks of B that A does not have
    new_bytes: int  # their uncompressed size
    fetch_bytes: int  # compressed bytes of the frames holding them: what a pull of B on top of A fetches
    fetch_frames: int

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed)


def _subtree(idx: Index, e: Entry) -> list[bytes]:
    out = [e.path]
    if e.kind == Kind.DIR:
        for c in idx.children(e.path):
            out += _subtree(idx, c)
    return out


def diff(a: Index, b: Index) -> DiffResult:
    added: list[bytes] = []
    removed: list[bytes] = []
    changed: list[bytes] = []

    def walk(da: Entry, db: Entry) -> None:
        if da.digest == db.digest:
            return
        if fidx.meta_record(da) != fidx.meta_record(db):
            changed.append(db.path)
        ka = {c.name: c for c in a.children(da.path)}
        kb = {c.name: c for c in b.children(db.path)}
        for name in sorted(ka.keys() | kb.keys()):
            ca, cb = ka.get(name), kb.get(name)
            if cb is None:
                removed.extend(_subtree(a, ca))  # type: ignore[arg-type]
            elif ca is None:
                added.extend(_subtree(b, cb))
            elif ca.kind == Kind.DIR and cb.kind == Kind.DIR:
                walk(ca, cb)
            elif ca.kind != cb.kind:
                removed.extend(_subtree(a, ca))
                added.extend(_subtree(b, cb))
            elif fidx.child_record(ca, a.chunk_ids) != fidx.child_record(cb, b.chunk_ids):
                changed.append(cb.path)

    walk(a.entries[0], b.entries[0])
    have = set(a.chunk_ids)
    frames: set[int] = set()
    new_chunks = new_bytes = 0
    for i, cid in enumerate(b.chunk_ids):
        if cid not in have:
            new_chunks += 1
            new_bytes += b.chunk_lengths[i]
            frames.add(b.chunk_frames[i])
    fetch = sum(b.frames[f].clen for f in frames)
    return DiffResult(sorted(added), sorted(removed), sorted(changed), new_chunks, new_bytes, fetch, len(frames))
