"""shoal images / inspect / ls / cat / diff / rm"""

from __future__ import annotations

import contextlib
import json
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

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
from shoal.format.model import Entry, Index

if TYPE_CHECKING:
    from shoal.mount.image import OpenedImage
    from shoal.sbom.databases import Package
    from shoal.sbom.pkgdiff import PackageDiff
    from shoal.transports.context import SystemContext
    from shoal.transports.resolve import ResolvedImage


@contextlib.contextmanager
def load_image(ctx: click.Context, ref: str, sc: "SystemContext") -> Iterator["OpenedImage"]:
    """REF through the one open-image layer (any transport; a classic image is converted into the
    store, untagged), read with plain range reads: only manifest, config and index up front."""
    from shoal.mount.image import OpenOptions, open_image

    img = open_image(ref, None, OpenOptions(context=sc, lazy=False, profile=False, prefetch="none",
                                               whole_index=True))
    try:
        yield img
    finally:
        img.close()


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
@click.option("--raw", is_flag=True, help="Write the manifest (or image index) exactly as stored, as skopeo's --raw.")
@click.option("--config", "config", is_flag=True,
              help="Write the image's config (with --raw: the blob exactly as stored), as skopeo's --config.")
@registry_options
@click.pass_context
def inspect(ctx: click.Context, /, ref: str, platform: str | None, as_json: bool, raw: bool, config: bool,
            **kw: Any) -> None:
    """Show digest, Merkle root, format, sizes and counts of REF (any transport; no pack or layer is read).

    A classic (tar layer) image is shown as such (format classic: its layers and config)."""
    from shoal.transports.base import parse_reference
    from shoal.transports.resolve import resolve_image

    sc = registry_opts(ctx, platform=platform, **kw)
    r = parse_reference(ref)
    with r.new_source(sc) as src:
        res = resolve_image(src, r, sc.platform, with_index=not (raw or config))
    if config:
        out = res.config if raw else (json.dumps(json.loads(res.config), indent=4) + "\n").encode()
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
        return
    if raw:
        sys.stdout.buffer.write(res.top)
        sys.stdout.buffer.flush()
        return
    if res.manifest is None or res.index is None:
        _inspect_classic(ref, res, as_json)
        return
    from shoal.format.manifest import parse_config

    m, idx = res.manifest, res.index
    cfg = parse_config(res.config)
    kinds: dict[str, int] = {}
    for e in idx.entries:
        kinds[e.kind.name.lower()] = kinds.get(e.kind.name.lower(), 0) + 1
    doc = {
        "ref": ref, "digest": m.digest, "root": m.root, "format": "shoal", "format_version": m.format,
        "size": m.size, "files": idx.files, "entries": len(idx.entries), "kinds": kinds,
        "bytes": idx.logical_bytes, "chunks": len(idx.chunk_ids), "frames": len(idx.frames), "packs": len(m.packs),
        "index_size": m.index.size, "pack_bytes": sum(p.size for p in m.packs),
        "architecture": cfg.architecture, "os": cfg.os, "config": cfg.config,
    }
    lineage = cfg.extra.get("lineage")
    if isinstance(lineage, dict) and lineage:
        doc["lineage"] = lineage
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
    if isinstance(lineage, dict):
        _show_lineage(lineage)


def _show_lineage(lineage: dict[str, Any]) -> None:
    """The lineage record of the config (docs/spec/lineage.md §2), one line per image."""
    def one(d: Any) -> str:
        if not isinstance(d, dict):
            return "?"
        name = f"{d.get('name')} " if d.get("name") else ""
        return f"{name}{d.get('digest', '?')} (root {d.get('root', '?')})"

    if "base" in lineage:
        click.echo(f"Base:         {one(lineage['base'])}")
    for a in lineage.get("applied") or []:
        click.echo(f"Applied:      {one(a)}")
    if isinstance(lineage.get("recipe"), dict):
        click.echo(f"Recipe:       {lineage['recipe'].get('digest', '?')}")


def _inspect_classic(ref: str, res: "ResolvedImage", as_json: bool) -> None:
    from shoal.format.manifest import json_object

    cfg = json_object(res.config)
    conf = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    layers = res.layers()
    size = sum(d.get("size", 0) for d in layers if isinstance(d.get("size"), int))
    plat = "/".join(str(cfg.get(k)) for k in ("os", "architecture", "variant") if cfg.get(k))
    if as_json:
        emit_json({"ref": ref, "digest": res.digest, "format": "classic", "media_type": res.media_type,
                   "layers": len(layers), "size": size, "architecture": cfg.get("architecture"), "os": cfg.get("os"),
                   "config": conf})
        return
    click.echo(f"Image:        {ref}\nDigest:       {res.digest}")
    click.echo("Format:       classic (tar layers; `shoal convert` makes a Shoal image of it)")
    click.echo(f"Platform:     {plat}")
    click.echo(f"Size:         {human(size)} in {len(layers)} layers")


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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, every entry's metadata (-l implied).")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def ls(ctx: click.Context, /, ref: str, path: str, long: bool, recursive: bool, as_json: bool, platform: str | None,
       **kw: Any) -> None:
    """List PATH (default /) of REF from the index alone (any transport; for docker://, only the index is fetched)."""
    from shoal.errors import NotFound
    from shoal.format.model import Kind

    with load_image(ctx, ref, registry_opts(ctx, platform=platform, **kw)) as img:
        idx = img.index
    p = _path_arg(path)
    e = idx.lookup(p)
    if e is None:
        raise NotFound(f"no such path in {ref}: /{show_path(p).lstrip('/')}")
    out = sys.stdout
    listing: list[dict[str, Any]] = []
    todo = [e] if e.kind != Kind.DIR else list(idx.children(p))
    while todo:
        c = todo.pop(0)
        if as_json:
            listing.append(_entry_json(c, idx))
        else:
            out.write((_long(c, idx) if long else "/" + show_path(c.path)) + "\n")
        if recursive and c.kind == Kind.DIR:
            todo[0:0] = idx.children(c.path)
    if as_json:
        emit_json({"ref": ref, "path": _abs(p), "listing": listing})


def _abs(p: bytes) -> str:
    """A path of an image in JSON: absolute, undecodable bytes as \\x escapes (docs/cli-json.md)."""
    return "/" + show_path(p).lstrip("/")


def _entry_json(e: Entry, idx: Index) -> dict[str, Any]:
    """One entry of ``ls --json`` (docs/cli-json.md)."""
    from shoal.format.model import Kind

    size = e.size
    if e.kind == Kind.HARDLINK:
        target = idx.lookup(e.target)
        size = target.size if target else 0
    link = e.kind in (Kind.SYMLINK, Kind.HARDLINK)
    dev = e.kind in (Kind.CHAR, Kind.BLOCK)
    return {"path": _abs(e.path), "kind": e.kind.name.lower(), "mode": e.mode, "uid": e.uid,
            "gid": e.gid, "size": size, "mtime_ns": e.mtime_ns,
            "target": (_abs(e.target) if e.kind == Kind.HARDLINK else show_path(e.target)) if link else None,
            "rdev": list(e.rdev) if dev else None}


@click.command()
@click.argument("ref")
@click.argument("path")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def cat(ctx: click.Context, /, ref: str, path: str, platform: str | None, **kw: Any) -> None:
    """Write the bytes of file PATH of REF to stdout (any transport; every chunk verified; docker:// reads ranges)."""
    from shoal.reader import Reader

    with load_image(ctx, ref, registry_opts(ctx, platform=platform, **kw)) as img:
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
@click.option("--packages", is_flag=True,
              help="Packages added, removed and upgraded, and which package each changed path belongs to.")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def diff(ctx: click.Context, /, ref_a: str, ref_b: str, as_json: bool, packages: bool, platform: str | None,
         **kw: Any) -> None:
    """Paths added, removed and changed from REF_A to REF_B (any transports), and what a pull of REF_B would fetch.

    With --packages: the same change in package terms (docs/sbom.md), from each image's package
    databases (only those files are read)."""
    from shoal.diff import diff as do_diff

    sc = registry_opts(ctx, platform=platform, **kw)
    with load_image(ctx, ref_a, sc) as ia, load_image(ctx, ref_b, sc) as ib:
        r = do_diff(ia.index, ib.index)
        if packages:
            from shoal.reader import Reader
            from shoal.sbom.inventory import packages_of
            from shoal.sbom.pkgdiff import package_diff

            pd = package_diff(packages_of(ia.index, Reader(ia.index, ia.source)),
                              packages_of(ib.index, Reader(ib.index, ib.source)), r)
            _print_package_diff(ia.digest, ib.digest, pd, as_json)
            return
    if as_json:
        emit_json({
            "a": ia.digest, "b": ib.digest, "same": r.same,
            "added": [_abs(p) for p in r.added], "removed": [_abs(p) for p in r.removed],
            "changed": [_abs(p) for p in r.changed], "new_chunks": r.new_chunks, "new_bytes": r.new_bytes,
            "fetch_bytes": r.fetch_bytes, "fetch_frames": r.fetch_frames,
        })
        return
    for tag, paths in (("+", r.added), ("-", r.removed), ("M", r.changed)):
        for p in paths:
            click.echo(f"{tag} /{show_path(p).lstrip('/')}")
    click.echo(f"{len(r.added)} added, {len(r.removed)} removed, {len(r.changed)} changed; "
               f"{r.new_chunks} new chunks ({human(r.new_bytes)}), a pull of {ref_b} over {ref_a} fetches "
               f"{human(r.fetch_bytes)} in {r.fetch_frames} frames", err=bool(r.added or r.removed or r.changed))


def _print_package_diff(a: str, b: str, pd: "PackageDiff", as_json: bool) -> None:
    def pkg(p: "Package") -> dict[str, Any]:
        return {"type": p.ecosystem, "name": p.name, "version": p.version, "arch": p.arch, "purl": p.purl}

    if as_json:
        emit_json({"a": a, "b": b, "added": [pkg(p) for p in pd.added], "removed": [pkg(p) for p in pd.removed],
                   "upgraded": [{"type": u.new.ecosystem, "name": u.new.name, "arch": u.new.arch,
                                 "old": u.old.version, "new": u.new.version, "old_purl": u.old.purl,
                                 "new_purl": u.new.purl} for u in pd.upgraded],
                   "files": {path: owners for path, owners in sorted(pd.files.items())}})
        return

    def label(p: "Package") -> str:
        return f"{p.ecosystem}:{p.name}" + (f":{p.arch}" if p.arch else "")

    for p in pd.added:
        click.echo(f"+ {label(p)} {p.version}")
    for p in pd.removed:
        click.echo(f"- {label(p)} {p.version}")
    for u in pd.upgraded:
        click.echo(f"^ {label(u.new)} {u.old.version} -> {u.new.version}")
    by = pd.by_package()
    for purl in sorted(k for k in by if k):
        click.echo(f"{purl}: {len(by[purl])} changed paths")
        for path in by[purl]:
            click.echo(f"    {show_path(path.encode('utf-8', 'surrogateescape'))}")
    if by.get(""):
        click.echo(f"(no package): {len(by[''])} changed paths")
        for path in by[""]:
            click.echo(f"    {show_path(path.encode('utf-8', 'surrogateescape'))}")
    click.echo(f"{len(pd.added)} packages added, {len(pd.removed)} removed, {len(pd.upgraded)} upgraded; "
               f"{len(pd.files)} changed paths, {len(pd.files) - len(by.get('', []))} of them owned by a package",
               err=True)


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove image names; run gc to reclaim space."""
    store = open_store(ctx)
    for r in refs:
        store.untag(r)
        click.echo(f"removed {r}")
