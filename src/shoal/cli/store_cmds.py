"""shoal fsck / shoal gc"""

from __future__ import annotations

import sys

import click

from shoal.cli.common import emit_json, human, open_store, progress_sink


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--blobs-only", is_flag=True,
              help="Faster: check blob digests and image structure only, not every chunk and catalogue row.")
@click.pass_context
def fsck(ctx: click.Context, as_json: bool, blobs_only: bool) -> None:
    """Verify every blob, every image's structure, every chunk and every catalogue row."""
    from shoal.store.maintenance import fsck as do_fsck

    store = open_store(ctx)
    with progress_sink(as_json) as sink:
        rep = do_fsck(store, sink, blobs_only=blobs_only)
    if as_json:
        emit_json({"ok": rep.ok, "blobs": rep.blobs, "bytes": rep.bytes, "images": rep.images,
                   "chunks": rep.chunks, "errors": rep.errors, "repaired": rep.repaired})
    else:
        for e in rep.errors:
            click.echo(f"error: {e}", err=True)
        for r in rep.repaired:
            click.echo(f"repaired: {r}", err=True)
        click.echo(f"checked {rep.blobs} blobs ({human(rep.bytes)}), {rep.images} images, {rep.chunks} chunks: "
                   + ("ok" if rep.ok else f"{len(rep.errors)} errors"))
    if not rep.ok:
        sys.exit(5)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gc(ctx: click.Context, as_json: bool) -> None:
    """Delete blobs that no tagged image references, and the start-up profiles of images gone."""
    from shoal.store.maintenance import gc as do_gc

    store = open_store(ctx)
    with progress_sink(as_json) as sink:
        rep = do_gc(store, sink)
    if as_json:
        emit_json({"removed": rep.removed, "freed": rep.freed, "kept": rep.kept, "tmp_removed": rep.tmp_removed,
                   "profiles_removed": rep.profiles_removed})
    else:
        profiles = f" and {rep.profiles_removed} profile files" if rep.profiles_removed else ""
        click.echo(f"removed {rep.removed} blobs{profiles}, freed {human(rep.freed)}; kept {rep.kept}")
