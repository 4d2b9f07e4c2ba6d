"""shoal images / inspect / ls / cat / diff / rm"""

from __future__ import annotations

import stat
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

from shoal.cli.common import (
    emit_json,
    human,
    open_store,
    platform_option,
    registry_options,
    registry_opts,
    show_path,
)
from shoal.format.manifest import ShoalManifest
from shoal.format.model import Index
from shoal.reader import FrameSource


@dataclass
class _Image:
    manifest: ShoalManifest
    index: Index
    config: bytes
    source: FrameSource  # where pack bytes come from (local store, or range reads on a registry)


class _RemoteFrames(FrameSource):
    """Range reads on a remote image's packs, uncached (``cat`` of a docker:// image)."""

    def __init__(self, ref: str, opts: dict[str, object]) -> None:
        from shoal.transports.base import parse_reference

        self.src = parse_reference(ref).new_source(**opts)

    def fetch(self, pack: str, offset: int, length: int) -> bytes:
        from shoal import mediatypes as mt
        from shoal.transports.base import BlobInfo

        return self.src.get_blob_ranges(BlobInfo(pack, -1, mt.PACK), [(offset, length)])[0]


def _load(ctx: click.Context, ref: str, platform: str | None = None, opts: dict[str, object] | None = None) -> _Image:
    """A store image (NAME:TAG) or a registry one (docker://...), fetching only manifest, config and index."""
    from shoal.errors import FormatError
    from shoal.format import index as fidx
    from shoal.format.manifest import parse_manifest
    from shoal.reader import StoreSource

    if ref.startswith("docker://"):
        from shoal.transports.docker import open_remote_image

        o = dict(opts or {})
        raw, config, blob = open_remote_image(ref, platform, **o)
        if not blob:
            raise FormatError(f"{ref} is a classic image, not a Shoal image (see `shoal convert`)")
        m = parse_manifest(raw)
        idx = fidx.decode(fidx.decompress(blob))
        if "sha256:" + idx.root.hex() != m.root:
            raise FormatError("index root differs from the manifest's annotation")
        return _Image(m, idx, config, _RemoteFrames(ref, o))
    store = open_store(ctx)
    m = store.resolve(ref, platform)
    return _Image(m, store.load_index(m), store.layout.get(m.config.digest), StoreSource(store))


_PLATFORM_HELP = "Image of an image index to use (default: this machine's platform)."


def _path_arg(p: str) -> bytes:
    b = p.encode("utf-8", "surrogateescape").strip(b"/")
    return b"" if b in (b"", b".") else b


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def images(ctx: click.Context, as_json: bool) -> None:
    """List images with their sizes."""
    store = open_store(ctx)
    rows = [(name, m) for name, m in store.images()]
    shoal_tags = {n.split(" [")[0] for n, _ in rows}
    classic = {n: d for n, d in store.layout.refs().items() if n not in shoal_tags}
    if as_json:
        emit_json({"images": [{"ref": n, "digest": m.digest, "root": m.root, "size": m.size, "format": "shoal",
                               "packs": len(m.packs)} for n, m in rows]
                   + [{"ref": n, "digest": d.get("digest"), "format": "classic"} for n, d in classic.items()]})
        return
    click.echo(f"{'IMAGE':40} {'DIGEST':19} {'SIZE':>10} {'PACKS':>6}")
    for n, m in rows:
        click.echo(f"{n:40} {m.digest[:19]} {human(m.size):>10} {len(m.packs):>6}")
    for n, d in sorted(classic.items()):
        click.echo(f"{n:40} {str(d.get('digest'))[:19]} {'classic':>10} {'-':>6}")


@click.command()
@click.argument("ref")
@platform_option(_PLATFORM_HELP)
@click.option("--json", "as_json", is_flag=True)
@registry_options
@click.pass_context
def inspect(ctx: click.Context, /, ref: str, platform: str | None, as_json: bool, **kw: Any) -> None:
    """Show digest, Merkle root, format, sizes and counts of REF (NAME:TAG or docker://...; no pack is read)."""
    from shoal.format.manifest import parse_config

    img = _load(ctx, ref, platform, registry_opts(ctx, **kw))
    m, idx = img.manifest, img.index
    cfg = parse_config(img.config)
    kinds: dict[str, int] = {}
    for e in idx.entries:
        kinds[e.kind.name.lower()] = kinds.get(e.kind.name.lower(), 0) + 1
    doc = {
        "ref": ref, "digest": m.digest, "root": m.root, "format": m.format, "size": m.size,
        "files": idx.files, "entries": len(idx.entries), "kinds": kinds, "bytes": idx.logical_bytes,
        "chunks": len(idx.chunk_ids), "frames": len(idx.frames), "packs": len(m.packs),
        "index_size": m.index.size, "pack_bytes": sum(p.size for p in m.packs),
        "architecture": cfg.architecture, "os": cfg.os, "config": cfg.config,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"Image:        {ref}\nDigest:       {m.digest}\nMerkle root:  {m.root}")
    click.echo(f"Format:       shoal v{m.format}")
    click.echo(f"Platform:     {cfg.os}/{cfg.architecture}")
    click.echo(f"Size:         {human(m.size)} (index {human(m.index.size)}, {len(m.packs)} packs)")
    click.echo(f"Tree:         {idx.files} files, {len(idx.entries)} entries, {human(idx.logical_bytes)}")
    click.echo(f"Chunks:       {len(idx.chunk_ids)} in {len(idx.frames)} frames")
    click.echo("Kinds:        " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


def _long(e, idx) -> str:  # type: ignore[no-untyped-def]
    from shoal.format.model import Kind

    ch = {Kind.DIR: "d", Kind.FILE: "-", Kind.HARDLINK: "-", Kind.SYMLINK: "l", Kind.CHAR: "c",
          Kind.BLOCK: "b", Kind.FIFO: "p"}[e.kind]
    perms = stat.filemode(e.mode)[1:]
    size = e.size
    if e.kind == Kind.HARDLINK:
        target = idx.lookup(e.target)
        size = target.size if target else 0
    elif e.kind in (Kind.CHAR, Kind.BLOCK):
        size = 0
    t = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    sz = f"{e.rdev[0]},{e.rdev[1]}" if e.kind in (Kind.CHAR, Kind.BLOCK) else str(size)
    line = f"{ch}{perms} {e.uid:>5} {e.gid:>5} {sz:>10} {t} /{show_path(e.path).lstrip('/')}"
    if e.kind == Kind.SYMLINK:
        line += " -> " + show_path(e.target)
    elif e.kind == Kind.HARDLINK:
        line += " link to " + show_path(e.target)
    return line


@click.command()
@click.argument("ref")
@click.argument("path", required=False, default="/")
@click.option("-l", "long", is_flag=True, help="Long listing.")
@click.option("-R", "recursive", is_flag=True, help="List subdirectories recursively.")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def ls(ctx: click.Context, /, ref: str, path: str, long: bool, recursive: bool, platform: str | None,
       **kw: Any) -> None:
    """List PATH (default /) of REF from the index alone (for docker://, only the index is fetched)."""
    from shoal.errors import NotFound
    from shoal.format.model import Kind

    idx = _load(ctx, ref, platform, registry_opts(ctx, **kw)).index
    p = _path_arg(path)
    e = idx.lookup(p)
    if e is None:
        raise NotFound(f"no such path in {ref}: /{show_path(p).lstrip('/')}")
    out = sys.stdout
    todo = [e] if e.kind != Kind.DIR else list(idx.children(p))
    while todo:
        c = todo.pop(0)
        out.write((_long(c, idx) if long else "/" + show_path(c.path)) + "\n")
        if recursive and c.kind == Kind.DIR:
            todo[0:0] = idx.children(c.path)


@click.command()
@click.argument("ref")
@click.argument("path")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def cat(ctx: click.Context, /, ref: str, path: str, platform: str | None, **kw: Any) -> None:
    """Write the bytes of file PATH of REF to stdout (every chunk verified; docker:// reads ranges)."""
    from shoal.reader import Reader

    img = _load(ctx, ref, platform, registry_opts(ctx, **kw))
    reader = Reader(img.index, img.source)
    e = reader.file_entry(_path_arg(path))
    out = sys.stdout.buffer
    for data in reader.iter_file(e):
        out.write(data)
    out.flush()


@click.command()
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def diff(ctx: click.Context, ref_a: str, ref_b: str, as_json: bool) -> None:
    """Paths added, removed and changed from REF_A to REF_B, and what a pull of REF_B would fetch."""
    from shoal.diff import diff as do_diff

    ia, ib = _load(ctx, ref_a), _load(ctx, ref_b)
    ma, a, mb, b = ia.manifest, ia.index, ib.manifest, ib.index
    r = do_diff(a, b)
    if as_json:
        emit_json({
            "a": ma.digest, "b": mb.digest, "same": r.same,
            "added": [show_path(p) for p in r.added], "removed": [show_path(p) for p in r.removed],
            "changed": [show_path(p) for p in r.changed], "new_chunks": r.new_chunks, "new_bytes": r.new_bytes,
            "fetch_bytes": r.fetch_bytes, "fetch_frames": r.fetch_frames,
        })
        return
    for tag, paths in (("+", r.added), ("-", r.removed), ("M", r.changed)):
        for p in paths:
            click.echo(f"{tag} /{show_path(p).lstrip('/')}")
    click.echo(f"{len(r.added)} added, {len(r.removed)} removed, {len(r.changed)} changed; "
               f"{r.new_chunks} new chunks ({human(r.new_bytes)}), a pull of {ref_b} over {ref_a} fetches "
               f"{human(r.fetch_bytes)} in {r.fetch_frames} frames", err=bool(r.added or r.removed or r.changed))


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove image names; run gc to reclaim space."""
    store = open_store(ctx)
    for r in refs:
        store.untag(r)
        click.echo(f"removed {r}")
