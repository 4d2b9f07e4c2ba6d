"""shoal unpack REF DIR"""

from __future__ import annotations

from typing import Any

import click

from shoal.cli.common import emit_json, human, platform_option, progress_sink, registry_options, registry_opts


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--workers", type=click.IntRange(1, 256), default=None)
@platform_option("Image of an image index to unpack (default: this machine's platform).")
@click.option("--json", "as_json", is_flag=True)
@registry_options
@click.pass_context
def unpack(ctx: click.Context, /, ref: str, dest: str, workers: int | None, platform: str | None, as_json: bool,
           **kw: Any) -> None:
    """Materialize REF's tree (any transport) in DEST (new or empty), metadata exact."""
    from shoal.cli.image_cmds import load_image
    from shoal.reader import Reader
    from shoal.unpack import UnpackOptions
    from shoal.unpack import unpack as do_unpack

    opts = UnpackOptions() if workers is None else UnpackOptions(workers=workers)
    with load_image(ctx, ref, registry_opts(ctx, platform=platform, **kw)) as img, progress_sink(as_json) as sink:
        r = do_unpack(img.index, Reader(img.index, img.source), dest, opts, sink)
    if as_json:
        emit_json({"entries": r.entries, "files": r.files, "bytes": r.bytes, "seconds": round(r.seconds, 3)})
    else:
        click.echo(f"unpacked {r.entries} entries ({r.files} files, {human(r.bytes)}) in {r.seconds:.2f}s")
