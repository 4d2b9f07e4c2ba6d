"""shoal convert / shoal export (docs/spec/convert.md)."""

from __future__ import annotations

from typing import Any

import click

from shoal.cli.common import (
    emit_json,
    human,
    keep_freed_memory,
    open_store,
    platform_option,
    progress_sink,
    registry_options,
    registry_opts,
    reuse_choice,
    reuse_options,
)
from shoal.errors import UsageError


@click.command()
@click.argument("src")
@click.argument("dst")
@reuse_options
@platform_option("Convert only this platform's image of an index (default: every platform).")
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH", default=None)
@click.option("--json", "as_json", is_flag=True)
@registry_options
@click.pass_context
def convert(ctx: click.Context, /, src: str, dst: str, reuse: tuple[str, ...], no_reuse: bool, platform: str | None,
            source_date_epoch: int | None, as_json: bool, **kw: Any) -> None:
    """Convert the classic image SRC (docker://, oci:, oci-archive:, docker-archive:, dir:) to Shoal at DST.

    DST is a store NAME:TAG, or any destination (e.g. docker://HOST/REPO:TAG): the image is then
    converted into the store under the same repository name and copied there."""
    from shoal.convert import convert as do_convert
    from shoal.copier import CopyOptions, copy
    from shoal.store import refuse_reserved
    from shoal.transports.base import parse_reference
    from shoal.transports.local import LocalReference

    reusing = reuse_choice(reuse, no_reuse)
    opts = registry_opts(ctx, **kw)
    refuse_reserved(dst)  # `oci:latest` is the oci transport, not a store name: say so
    src_ref, dst_ref = parse_reference(src), parse_reference(dst)
    local = dst_ref.name if isinstance(dst_ref, LocalReference) else _local_name(dst_ref)
    store = open_store(ctx)
    keep_freed_memory()
    with progress_sink(as_json) as sink, src_ref.new_source(opts) as source:
        r = do_convert(source, store, local, platform=platform, **reusing, source_date_epoch=source_date_epoch,
                       sink=sink)
    pushed = None
    if not isinstance(dst_ref, LocalReference):
        pushed = copy(parse_reference(local), dst_ref, CopyOptions(src_opts=opts, dst_opts=opts))
    if as_json:
        emit_json({"src": str(src_ref), "dst": str(dst_ref), "ref": local, "digest": r.digest,
                   "source_digest": r.source_digest, "seconds": round(r.seconds, 3),
                   "images": len(r.images), "bytes_sent": pushed.bytes_sent if pushed else 0})
        return
    click.echo(f"converted {src_ref} ({r.source_digest[:19]}) -> {local} {r.digest} in {r.seconds:.2f}s")
    if pushed is not None:
        click.echo(f"  copied to {dst_ref}: sent {human(pushed.bytes_sent)}")


def _local_name(dst_ref: object) -> str:
    """The store name a conversion for a remote destination is kept under: its repository and tag."""
    from shoal.store import new_image_name
    from shoal.transports.docker import DockerReference

    if isinstance(dst_ref, DockerReference):
        return new_image_name(f"{dst_ref.repo}:{dst_ref.tag or 'latest'}")
    raise UsageError(f"convert writes Shoal images to the store or a registry, not {dst_ref}; "
                     "convert to NAME:TAG, then `shoal copy NAME:TAG DST`")


@click.command()
@click.argument("ref")
@click.argument("dst")
@click.option("--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip", show_default=True)
@platform_option("Export only this platform's image of an index (default: the whole index; a one-image "
                 "destination such as docker-archive: gets this machine's).")
@click.option("--json", "as_json", is_flag=True)
@registry_options
@click.pass_context
def export(ctx: click.Context, /, ref: str, dst: str, compression: str, platform: str | None, as_json: bool,
           **kw: Any) -> None:
    """Write store image REF to DST as a classic OCI image with one layer, byte-reproducible."""
    from shoal.convert import export as do_export
    from shoal.transports.base import parse_reference

    dst_ref = parse_reference(dst)
    store = open_store(ctx)
    with progress_sink(as_json) as sink, dst_ref.new_destination(registry_opts(ctx, **kw)) as dest:
        r = do_export(store, ref, dest, compression, platform=platform, sink=sink)
    if as_json:
        emit_json({"ref": ref, "dst": str(dst_ref), "digest": r.digest, "media_type": r.media_type,
                   "seconds": round(r.seconds, 3)})
        return
    click.echo(f"exported {ref} -> {dst_ref} {r.digest} in {r.seconds:.2f}s")
