"""shoal snapshotter: a containerd proxy snapshotter (docs/containerd.md)"""

from __future__ import annotations

import os

import click


@click.command("snapshotter")
@click.option("--address", required=True, metavar="SOCK", help="Unix socket to serve containerd's snapshots API on.")
@click.option("--root", default=None, metavar="DIR",
              help="Snapshot directories and metadata (default /var/lib/shoal-snapshotter as root, "
                   "else ~/.local/share/shoal-snapshotter).")
def snapshotter(address: str, root: str | None) -> None:
    """Serve containerd's snapshots API (proxy plugin) with overlayfs semantics; Shoal images lazily."""
    from pathlib import Path

    from shoal.snapshotter.remote import RemoteMounts
    from shoal.snapshotter.server import serve
    from shoal.snapshotter.service import Service

    if root is None:
        root = ("/var/lib/shoal-snapshotter" if os.geteuid() == 0
                else os.path.expanduser("~/.local/share/shoal-snapshotter"))
    rootp = Path(root).absolute()
    remote = RemoteMounts(rootp)
    svc = Service(rootp, remote.mount, remote.release)
    svc.reattach()  # lazy mounts of a previous run: found again, or mounted again (after a reboot)
    serve(svc, address)
