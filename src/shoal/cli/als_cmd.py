"""shoal store serve: podman / CRI-O additional layer store (docs/podman.md)"""

from __future__ import annotations

import os

import click

from shoal.cli.common import platform_option


@click.group()
def store() -> None:
    """Serve the store to other container engines."""


@store.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--mounts", "mounts_root", type=click.Path(file_okay=False), default=None,
              help="Where the lazy image mounts go (default $SHOAL_RUN_DIR/als, /run/shoal/als as root).")
@platform_option("Image of an image index to use (default: this machine's platform).")
@click.pass_context
def serve(ctx: click.Context, /, directory: str, mounts_root: str | None, platform: str | None) -> None:
    """Serve podman's additional layer store at DIRECTORY (FUSE) in the foreground until SIGTERM/SIGINT.

    storage.conf: additionallayerstores = ["DIRECTORY:ref"].  Registry settings and credentials come from
    registries.conf and the auth files, as for `shoal pull`."""
    from shoal.als.serve import serve as do_serve
    from shoal.transports.context import SystemContext

    st = ctx.obj.get("store") if ctx.obj else None
    sc = SystemContext(store=os.path.abspath(st) if st else None, platform=platform)
    do_serve(directory, sc, os.path.abspath(mounts_root) if mounts_root else None)
