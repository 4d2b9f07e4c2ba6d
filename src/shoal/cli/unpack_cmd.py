"""shoal unpack NAME:TAG DIR"""

from __future__ import annotations

import click

from shoal.cli.common import emit_json, human, open_store, platform_option, progress_sink


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path())
@click.option("--workers", type=click.IntRange(1, 256), default=None)
@platform_option("Image of an image index to unpack (default: this machine's platform).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def unpack(ctx: click.Context, ref: str, dest: str, workers: int | None, platform: str | None, as_json: bool) -> None:
    """Materialize REF's tree in DEST (new or empty), metadata exact."""
    from shoal.reader import Reader, StoreSource
    from shoal.unpack import UnpackOptions
    from shoal.unpack import unpack as do_unpack

    store = open_store(ctx)
    m = store.resolve(ref, platform)
    idx = store.load_index(m)
    opts = UnpackOptions() if workers is None else UnpackOptions(workers=workers)
    with progress_sink(as_json) as sink:
        r = do_unpack(idx, Reader(idx, StoreSource(store)), dest, opts, sink)
    if as_json:
        emit_json({"entries": r.entries, "files": r.files, "bytes": r.bytes, "seconds": round(r.seconds, 3)})
    else:
        click.echo(f"unpacked {r.entries} entries ({r.files} files, {human(r.bytes)}) in {r.seconds:.2f}s")
