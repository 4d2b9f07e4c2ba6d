"""Three-way merges of image trees on their Merkle indexes: ``rebase`` and ``apply`` (docs/spec/lineage.md).

An image's *delta* is what changed from its recorded base to it.  ``merge3(base, ours, theirs)`` puts the
delta of ``ours`` (relative to ``base``) on top of ``theirs``: path by path, a side that left a path as the
base had it takes the other side's version; where both sides changed the same path differently it is a
conflict, unless a rule for that path (a generated file, a directory's mtime) merges it.  Subtrees whose
Merkle digests agree are taken whole without being visited.  No file data is read except for the few files
a rule merges; the result references the inputs' chunks where they are stored (``build.build_placed``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from shoal.build import BuildOptions, BuildResult, Placed, PlacedTree, build_placed
from shoal.chunking import get_chunker
from shoal.errors import ConflictError, NotFound, UsageError
from shoal.format import index as fidx
from shoal.format.manifest import MAX_MANIFEST_BYTES, ImageConfig, ShoalManifest, parse_config
from shoal.format.model import Entry, Index, Kind, Shape
from shoal.progress import NULL, Sink
from shoal.reader import Reader, StoreSource
from shoal.store import Store

__all__ = ["Tree", "Conflict", "Resolved", "MergeResult", "tree_of_index", "merge3", "placed_tree", "RULES",
           "paragraph_merge", "OURS", "THEIRS", "Input", "Outcome", "LINEAGE", "lineage_of", "lineage_record",
           "config_of", "recorded_base", "rebase", "apply"]

log = logging.getLogger(__name__)

OURS = "ours"
THEIRS = "theirs"


class Tree:
    """A tree to merge: entries in canonical order (directories with their Merkle digests), each FILE's
    chunks indexing ``ids``; ``read(pos)`` returns a file's bytes (only rules call it)."""

    def __init__(self, name: str, entries: Sequence[Entry], ids: Sequence[bytes], lengths: dict[bytes, int],
                 read: Callable[[int], bytes]) -> None:
        self.name = name
        self.entries = entries
        self.ids = ids
        self.lengths = lengths
        self.read = read
        self.shape = Shape([e.path for e in entries])

    def end(self, pos: int) -> int:
        return self.shape.end(pos)

    def kids(self, pos: int) -> dict[bytes, int]:
        return {self.entries[k].name: k for k in self.shape.kids(pos)}

    def record(self, pos: int) -> bytes:
        """What the Merkle tree binds of this path: a directory's digest (its whole subtree), else the
        child record (metadata, content)."""
        e = self.entries[pos]
        if e.kind == Kind.DIR:
            return b"D" + e.digest
        return fidx.child_bytes(e, tuple(self.ids) if not isinstance(self.ids, tuple) else self.ids)

    def file_ids(self, pos: int) -> tuple[bytes, ...]:
        return tuple(self.ids[c] for c in self.entries[pos].chunks)


def tree_of_index(name: str, idx: Index, read_file: Callable[[Entry], bytes]) -> Tree:
    lengths = dict(zip(idx.chunk_ids, idx.chunk_lengths))
    return Tree(name, idx.entries, idx.chunk_ids, lengths, lambda pos: read_file(idx.entries[pos]))


@dataclass(frozen=True)
class Conflict:
    path: bytes
    reason: str

    def line(self) -> str:
        return "/" + self.path.decode("utf-8", "backslashreplace") + ": " + self.reason


@dataclass(frozen=True)
class Resolved:
    path: bytes
    rule: str


@dataclass
class MergeResult:
    tree: Tree
    conflicts: list[Conflict] = field(default_factory=list)
    resolved: list[Resolved] = field(default_factory=list)  # by a rule or by --prefer
    new: dict[bytes, bytes] = field(default_factory=dict)  # chunk id -> bytes of files a rule wrote


# ------------------------------------------------------------------------------------------- rules

def _paragraphs(data: bytes, keys: tuple[bytes, ...]) -> dict[tuple[bytes, ...], bytes] | None:
    """Debian control paragraphs (blank-line separated) by the values of ``keys``; None if not that."""
    out: dict[tuple[bytes, ...], bytes] = {}
    for para in data.split(b"\n\n"):
        para = para.strip(b"\n")
        if not para:
            continue
        fields: dict[bytes, bytes] = {}
        for line in para.split(b"\n"):
            if line[:1] in (b" ", b"\t") or b":" not in line:
                continue
            k, _, v = line.partition(b":")
            fields[k.lower()] = v.strip()
        if keys[0].lower() not in fields:
            return None
        key = tuple(fields.get(k.lower(), b"") for k in keys)
        if key in out:
            return None
        out[key] = para + b"\n"
    return out


def paragraph_merge(keys: tuple[bytes, ...]) -> Callable[[bytes | None, bytes, bytes], tuple[bytes | None, str]]:
    """Merge files of Debian control paragraphs keyed by ``keys`` (dpkg's status: Package, Architecture):
    three-way per key, paragraphs sorted by key as dpkg writes them; the same key changed differently on
    both sides is a conflict (returned as None, with the keys)."""

    def merge(o: bytes | None, a: bytes, b: bytes) -> tuple[bytes | None, str]:
        po = _paragraphs(o, keys) if o is not None else {}
        pa, pb = _paragraphs(a, keys), _paragraphs(b, keys)
        if po is None or pa is None or pb is None:
            return None, "not a file of control paragraphs"
        out: dict[tuple[bytes, ...], bytes] = {}
        bad = []
        for k in sorted(po.keys() | pa.keys() | pb.keys()):
            vo, va, vb = po.get(k), pa.get(k), pb.get(k)
            v = vb if va == vo else va if vb == vo or va == vb else False
            if v is False:
                bad.append(b"/".join(x for x in k if x).decode("utf-8", "backslashreplace"))
                continue
            if v is not None:
                out[k] = v  # type: ignore[assignment]
        if bad:
            return None, "paragraphs changed on both sides: " + ", ".join(bad[:20])
        return b"".join(v + b"\n" for v in out.values()), ""  # each paragraph, then a blank line

    return merge


def _append_merge(o: bytes | None, a: bytes, b: bytes) -> tuple[bytes | None, str]:
    """Logs: both sides appended to the base's log: theirs, then what ours appended."""
    o = o or b""
    if a.startswith(o) and b.startswith(o):
        return b + a[len(o):], ""
    return a, ""


def _take_ours(o: bytes | None, a: bytes, b: bytes) -> tuple[bytes | None, str]:
    return a, ""


_STATUS = paragraph_merge((b"Package", b"Architecture"))
_DEBCONF = paragraph_merge((b"Name",))

#: (glob on the path without leading /, rule name, merge).  The first match applies; docs/spec/lineage.md §4
#: lists them.  Paths not matched are conflicts when both sides change them.
RULES: list[tuple[str, str, Callable[[bytes | None, bytes, bytes], tuple[bytes | None, str]]]] = [
    ("var/lib/dpkg/status", "dpkg-paragraphs", _STATUS),
    ("var/lib/dpkg/available", "dpkg-paragraphs", _STATUS),
    ("var/lib/apt/extended_states", "dpkg-paragraphs", _STATUS),
    ("var/cache/debconf/config.dat", "debconf-paragraphs", _DEBCONF),
    ("var/cache/debconf/templates.dat", "debconf-paragraphs", _DEBCONF),
    ("var/cache/debconf/passwords.dat", "debconf-paragraphs", _DEBCONF),
    ("var/lib/dpkg/status-old", "ours (backup)", _take_ours),
    ("var/lib/dpkg/available-old", "ours (backup)", _take_ours),
    ("var/cache/debconf/*-old", "ours (backup)", _take_ours),
    ("var/log/*", "log-append", _append_merge),
    ("var/cache/*", "ours (cache)", _take_ours),
    ("etc/ld.so.cache", "ours (cache)", _take_ours),
]


def _rule(path: bytes) -> tuple[str, Callable[[bytes | None, bytes, bytes], tuple[bytes | None, str]]] | None:
    p = path.decode("utf-8", "surrogateescape")
    for pattern, name, fn in RULES:
        if fnmatch.fnmatchcase(p, pattern):  # "*" matches "/" too: var/log/* is the whole subtree
            return name, fn
    return None


# ------------------------------------------------------------------------------------------- merge

class _Out:
    """The merged tree as it is made, in canonical order: entries whose chunks index ``ids``."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.ids: list[bytes] = []
        self.id_pos: dict[bytes, int] = {}
        self.lengths: dict[bytes, int] = {}
        self.origin: dict[int, tuple[Tree, int]] = {}  # output position -> where its bytes are
        self.data: dict[int, bytes] = {}  # output position -> bytes a rule wrote

    def _ref(self, cid: bytes, ln: int) -> int:
        i = self.id_pos.get(cid)
        if i is None:
            i = self.id_pos[cid] = len(self.ids)
            self.ids.append(cid)
            self.lengths[cid] = ln
        return i

    def take(self, t: Tree, pos: int, meta: Entry | None = None) -> None:
        """Entry ``pos`` of ``t`` and its whole subtree (a non-directory with ``meta``'s metadata)."""
        for p in range(pos, t.end(pos)):
            e = t.entries[p]
            if meta is not None and e.kind != Kind.DIR:
                e = replace(e, mode=meta.mode, uid=meta.uid, gid=meta.gid, mtime_ns=meta.mtime_ns,
                            xattrs=meta.xattrs)
            if e.kind == Kind.FILE:
                ids = t.ids
                e = replace(e, chunks=tuple(self._ref(ids[c], t.lengths[ids[c]]) for c in e.chunks))
                self.origin[len(self.entries)] = (t, p)
            self.entries.append(e)

    def put(self, e: Entry) -> None:
        self.entries.append(e)

    def put_data(self, e: Entry, data: bytes, new: dict[bytes, bytes], known: Callable[[bytes], bool]) -> None:
        refs = []
        for off, n in get_chunker().cut(memoryview(data)):
            cid = hashlib.sha256(data[off:off + n]).digest()
            if not known(cid):
                new[cid] = data[off:off + n]
            refs.append(self._ref(cid, n))
        self.data[len(self.entries)] = data
        self.entries.append(replace(e, size=len(data), chunks=tuple(refs), digest=b""))

    def tree(self, name: str) -> Tree:
        entries = fidx.merkle(self.entries, tuple(self.ids))
        origin, data = self.origin, self.data

        def read(pos: int) -> bytes:
            if pos in data:
                return data[pos]
            t, p = origin[pos]
            return t.read(p)

        return Tree(name, entries, tuple(self.ids), self.lengths, read)


def _meta(e: Entry) -> tuple[int, int, int, tuple[tuple[bytes, bytes], ...]]:
    return (e.mode, e.uid, e.gid, e.xattrs)


def merge3(base: Tree | None, ours: Tree, theirs: Tree, prefer: str | None = None,
           known: Callable[[bytes], bool] = lambda cid: False, name: str = "merged") -> MergeResult:
    """``theirs`` plus the changes ``ours`` made to ``base`` (docs/spec/lineage.md §3).  ``base`` None:
    nothing in common (every path both sides have is "added on both sides").  ``prefer`` (``ours`` or
    ``theirs``) resolves each conflict by taking that side's version of the path (its whole subtree);
    without it, conflicts are returned, and the caller refuses.  ``known(cid)``: a chunk some input
    stores (bytes of a file a rule writes are kept only for the others)."""
    out = _Out()
    res = MergeResult(ours)  # tree replaced below
    o_t, a_t, b_t = base, ours, theirs

    def rec(t: Tree | None, pos: int | None) -> bytes | None:
        return None if t is None or pos is None else t.record(pos)

    def entry(t: Tree | None, pos: int | None) -> Entry | None:
        return None if t is None or pos is None else t.entries[pos]

    def conflict(path: bytes, reason: str, pa: int | None, pb: int | None) -> None:
        if prefer == OURS:
            res.resolved.append(Resolved(path, f"--prefer ours ({reason})"))
            if pa is not None:
                out.take(a_t, pa)
        elif prefer == THEIRS:
            res.resolved.append(Resolved(path, f"--prefer theirs ({reason})"))
            if pb is not None:
                out.take(b_t, pb)
        else:
            res.conflicts.append(Conflict(path, reason))

    def node(path: bytes, po: int | None, pa: int | None, pb: int | None) -> None:
        ro, ra, rb = rec(o_t, po), rec(a_t, pa), rec(b_t, pb)
        if ra == ro or ra == rb:  # ours left it as the base had it (or made theirs' change): theirs
            if pb is not None:
                out.take(b_t, pb)
            return
        if rb == ro:  # theirs left it: ours
            if pa is not None:
                out.take(a_t, pa)
            return
        eo, ea, eb = entry(o_t, po), entry(a_t, pa), entry(b_t, pb)
        if ea is not None and eb is not None and ea.kind == Kind.DIR and eb.kind == Kind.DIR:
            odir = eo if eo is not None and eo.kind == Kind.DIR else None
            merged = _merge_dir_meta(odir, ea, eb)
            if merged is None:
                conflict(path, "directory metadata (mode, owner or xattrs) changed on both sides", pa, pb)
                return
            out.put(merged)
            ko = o_t.kids(po) if odir is not None and o_t is not None and po is not None else {}
            ka, kb = a_t.kids(pa), b_t.kids(pb)  # type: ignore[arg-type]
            for n in sorted(ko.keys() | ka.keys() | kb.keys()):
                node(path + b"/" + n if path else n, ko.get(n), ka.get(n), kb.get(n))
            return
        if ea is not None and eb is not None and ea.kind == eb.kind and ea.kind != Kind.HARDLINK \
                and _same_content(a_t, pa, b_t, pb):  # type: ignore[arg-type]
            e = _merge_file_meta(eo if eo is not None and eo.kind == ea.kind else None, ea, eb)
            if e is not None:  # only mtimes differ: the later one
                out.take(b_t, pb, e)  # type: ignore[arg-type]
                res.resolved.append(Resolved(path, "same content (later mtime)"))
                return
        reason = _reason(eo, ea, eb)
        if ea is not None and eb is not None and ea.kind == Kind.FILE and eb.kind == Kind.FILE \
                and (eo is None or eo.kind == Kind.FILE):
            got = _rule(path)
            if got is not None:
                rule_name, fn = got
                try:
                    data, why = fn(None if eo is None else o_t.read(po), a_t.read(pa), b_t.read(pb))  # type: ignore[union-attr,arg-type]
                except UnicodeError:  # pragma: no cover - rules work on bytes
                    data, why = None, "undecodable"
                if data is not None:
                    e = _merge_file_meta(eo, ea, eb)
                    if e is not None:
                        if data == a_t.read(pa):  # type: ignore[arg-type]
                            out.take(a_t, pa)  # type: ignore[arg-type]
                        elif data == b_t.read(pb):  # type: ignore[arg-type]
                            out.take(b_t, pb)  # type: ignore[arg-type]
                        else:
                            out.put_data(e, data, res.new, known)
                        res.resolved.append(Resolved(path, rule_name))
                        return
                    why = "file metadata changed on both sides"
                reason += f" (rule {rule_name}: {why})"
        conflict(path, reason, pa, pb)

    root_o = 0 if o_t is not None else None
    node(b"", root_o, 0, 0)
    if not out.entries:
        raise ConflictError("merge: the result has no root directory")
    res.tree = out.tree(name)
    _check_links(res, prefer)
    return res


def _reason(eo: Entry | None, ea: Entry | None, eb: Entry | None) -> str:
    def kind(e: Entry | None) -> str:
        return "absent" if e is None else "directory" if e.kind == Kind.DIR else e.kind.name.lower()

    if ea is None:
        return "deleted by ours, changed by theirs"
    if eb is None:
        return "changed by ours, deleted by theirs"
    if (ea.kind == Kind.DIR) != (eb.kind == Kind.DIR):
        if eo is not None and eo.kind == Kind.DIR:
            side = "ours" if ea.kind != Kind.DIR else "theirs"
            return f"directory replaced by a {kind(ea if side == 'ours' else eb)} by {side}, changed by the other"
        if eo is not None:
            side = "ours" if ea.kind == Kind.DIR else "theirs"
            return f"{kind(eo)} replaced by a directory by {side}, changed by the other"
        return f"added on both sides as a {kind(ea)} (ours) and a {kind(eb)} (theirs)"
    if eo is None:
        return "added on both sides, differently"
    return "changed on both sides"


def _same_content(a: Tree, pa: int, b: Tree, pb: int) -> bool:
    """The same bytes (chunk ids), target or device, whatever the metadata."""
    ea, eb = a.entries[pa], b.entries[pb]
    if ea.kind == Kind.FILE:
        return ea.size == eb.size and a.file_ids(pa) == b.file_ids(pb)
    return ea.target == eb.target and ea.rdev == eb.rdev


def _merge_dir_meta(o: Entry | None, a: Entry, b: Entry) -> Entry | None:
    """A directory both sides kept: mode, owner and xattrs merge three-way (both changed differently: None);
    the mtime is the later of the two (every package install touches its directories' mtimes)."""
    ma, mb = _meta(a), _meta(b)
    if ma == mb:
        meta = ma
    elif o is not None and _meta(o) == ma:
        meta = mb
    elif o is not None and _meta(o) == mb:
        meta = ma
    else:
        return None
    mtime = b.mtime_ns if o is not None and a.mtime_ns == o.mtime_ns else \
        a.mtime_ns if o is not None and b.mtime_ns == o.mtime_ns else max(a.mtime_ns, b.mtime_ns)
    return replace(b, mode=meta[0], uid=meta[1], gid=meta[2], xattrs=meta[3], mtime_ns=mtime, digest=b"")


def _merge_file_meta(o: Entry | None, a: Entry, b: Entry) -> Entry | None:
    return _merge_dir_meta(o, a, b)


def _check_links(res: MergeResult, prefer: str | None) -> None:
    """Every hardlink of the result must still point at an earlier file with its metadata."""
    t = res.tree
    files: dict[bytes, Entry] = {}
    for e in t.entries:
        if e.kind == Kind.FILE:
            files[e.path] = e
        elif e.kind == Kind.HARDLINK:
            f = files.get(e.target)
            if f is None or fidx.meta_record(f) != fidx.meta_record(e):
                res.conflicts.append(Conflict(e.path, "hardlink whose file the other side changed or removed"))


def placed_tree(res: MergeResult, places: dict[bytes, Placed]) -> PlacedTree:
    t = res.tree
    entries = [replace(e, digest=b"") if e.kind == Kind.DIR else e for e in t.entries]
    return PlacedTree(entries, list(t.ids), places, dict(res.new))


# ------------------------------------------------------------------------------------------- images

LINEAGE = "lineage"  # the key of the config's "shoal" object (docs/spec/lineage.md §2)


@dataclass(frozen=True)
class Input:
    """An image of the store taking part in a merge: the name it was given by, and its manifest."""

    name: str
    manifest: ShoalManifest


@dataclass(frozen=True)
class Outcome:
    result: BuildResult
    resolved: list[Resolved]
    changed_by_ours: int  # paths the merge took from the image(s) applied, not the new base


def lineage_record(i: Input) -> dict[str, str]:
    return {"digest": i.manifest.digest, "root": i.manifest.root, "name": i.name}


def config_of(store: Store, m: ShoalManifest) -> ImageConfig:
    return parse_config(store.layout.get(m.config.digest, limit=MAX_MANIFEST_BYTES))


def lineage_of(cfg: ImageConfig) -> dict[str, Any]:
    lin = cfg.extra.get(LINEAGE)
    return lin if isinstance(lin, dict) else {}


def recorded_base(store: Store, i: Input) -> Input:
    """The base image ``i`` records (lineage.base), which must be in the store."""
    base = lineage_of(config_of(store, i.manifest)).get("base")
    digest = base.get("digest") if isinstance(base, dict) else None
    if not isinstance(digest, str):
        raise UsageError(f"{i.name} records no base image (build it with --base NAME:TAG, or give --from)")
    try:
        m = store.manifest(digest)
    except NotFound:
        name = base.get("name", "") if isinstance(base, dict) else ""
        raise NotFound(f"the base of {i.name}, {name} {digest}, is not in the store (pull it, or give --from)"
                       ) from None
    return Input(str(base.get("name") or digest) if isinstance(base, dict) else digest, m)


class _Inputs:
    """Indexes, trees and chunk places of the images of one merge, loaded once each."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.trees: dict[str, Tree] = {}
        self.places: dict[bytes, Placed] = {}

    def tree(self, i: Input) -> Tree:
        t = self.trees.get(i.manifest.digest)
        if t is not None:
            return t
        idx = self.store.load_index(i.manifest)
        reader = Reader(idx, StoreSource(self.store))
        t = self.trees[i.manifest.digest] = tree_of_index(i.name, idx, lambda e: b"".join(reader.iter_file(e)))
        sizes = [p.size for p in i.manifest.packs]
        places = self.places
        for cid, fi, off, ln in zip(idx.chunk_ids, idx.chunk_frames, idx.chunk_offsets, idx.chunk_lengths):
            if cid not in places:
                f = idx.frames[fi]
                places[cid] = Placed(idx.packs[f.pack], sizes[f.pack], f, off, ln)
        return t


def _check_platforms(store: Store, inputs: list[Input]) -> ImageConfig:
    cfgs = [config_of(store, i.manifest) for i in inputs]
    plats = {(c.os, c.architecture, c.variant) for c in cfgs}
    if len(plats) > 1:
        raise UsageError("images of different platforms: " + ", ".join(
            f"{i.name} {c.os}/{c.architecture}" for i, c in zip(inputs, cfgs)))
    return cfgs[-1]


def _refuse(what: str, res: MergeResult) -> None:
    if res.conflicts:
        n = len(res.conflicts)
        lines = [c.line() for c in res.conflicts]
        raise ConflictError(f"{what}: {n} conflicting path{'s' if n > 1 else ''} ({lines[0]}"
                            f"{', ...' if n > 1 else ''}); nothing written; resolve with --prefer ours|theirs "
                            "or change the images", lines)


def _finish(store: Store, inputs: _Inputs, res: MergeResult, ref: str | None, cfg: ImageConfig,
            lineage: dict[str, Any], sink: Sink) -> BuildResult:
    config = replace(cfg, root="", extra={**cfg.extra, LINEAGE: lineage})
    return build_placed(store, placed_tree(res, inputs.places), ref, BuildOptions(config=config), sink)


def rebase(store: Store, image: Input, onto: Input, ref: str | None, *, old_base: Input | None = None,
           prefer: str | None = None, sink: Sink = NULL) -> Outcome:
    """``onto`` plus the changes ``image`` made to its base (``old_base``, default the base it records)."""
    old = old_base or recorded_base(store, image)
    cfg = _check_platforms(store, [old, onto, image])
    recorded = lineage_of(cfg).get("base")
    if isinstance(recorded, dict) and recorded.get("root") not in (None, old.manifest.root):
        log.warning("%s records base root %s, not %s's %s", image.name, recorded.get("root"), old.name,
                    old.manifest.root)
    ins = _Inputs(store)
    theirs, ours, base = ins.tree(onto), ins.tree(image), ins.tree(old)  # place priority: new base first
    res = merge3(base, ours, theirs, prefer, known=ins.places.__contains__, name=ref or image.name)
    _refuse(f"rebase of {image.name} from {old.name} onto {onto.name}", res)
    lineage = {**lineage_of(cfg), "base": lineage_record(onto)}
    built = _finish(store, ins, res, ref, cfg, lineage, sink)
    return Outcome(built, res.resolved, _from_ours(res.tree, theirs))


def apply(store: Store, base: Input, images: list[Input], ref: str | None, *, prefer: str | None = None,
          sink: Sink = NULL) -> Outcome:
    """``base`` plus each image's own changes (relative to the base it records), in order."""
    if not images:
        raise UsageError("apply needs a base and at least one image to apply")
    cfg = _check_platforms(store, [base, *images])
    ins = _Inputs(store)
    cur = ins.tree(base)
    first = cur
    resolved: list[Resolved] = []
    new: dict[bytes, bytes] = {}
    for img in images:
        own = recorded_base(store, img)
        res = merge3(ins.tree(own), ins.tree(img), cur, prefer, known=ins.places.__contains__,
                     name=ref or "applied")
        _refuse(f"apply of {img.name} (on {own.name}) onto {cur.name}", res)
        resolved += res.resolved
        new.update(res.new)
        cur = res.tree
    lineage = {**lineage_of(cfg), "base": lineage_record(base),
               "applied": [lineage_record(i) for i in images]}
    final = MergeResult(cur, [], resolved, {k: v for k, v in new.items() if k in set(cur.ids)})
    built = _finish(store, ins, final, ref, cfg, lineage, sink)
    return Outcome(built, resolved, _from_ours(cur, first))


def _from_ours(t: Tree, theirs: Tree) -> int:
    """Paths of the result whose record differs from the new base's (for the report)."""
    n = 0
    for pos, e in enumerate(t.entries):
        if e.kind == Kind.DIR:
            continue
        q = theirs.shape.by_path.get(e.path)
        if q is None or theirs.record(q) != t.record(pos):
            n += 1
    return n
