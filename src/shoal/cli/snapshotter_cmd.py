"""shoal snapshotter: a containerd proxy snapshotter (docs/containerd.md)"""

from __future__ import annotations

import os

import click


@click.command("snapshotter")
@click.option("--address", required=True, metavar="SOCK", help="Unix socket to serve containerd's snapshots API on.")
@click.option("--root", default=None, metavar="DIR",
              help="Snapshot directories and metadata (default /var/lib/shoal-snapshotter as root, "
                   "else ~/.local/share/shoal-snapshotter).")
@click.option("--cri-keychain-image-service", "cri_image_service", default=None, metavar="SOCK",
              help="Also serve CRI's image service on --address, forwarding it to containerd's CRI socket "
                   "SOCK and keeping each pull's credentials for the lazy mounts (under --root, mode 0600).")
def snapshotter(address: str, root: str | None, cri_image_service: str | None) -> None:
    """Serve containerd's snapshots API (proxy plugin) with overlayfs semantics; Shoal images lazily.

    With --cri-keychain-image-service, point the kubelet's --image-service-endpoint (or crictl's
    --image-endpoint) at --address: per-pull credentials (imagePullSecrets) then reach the lazy mounts."""
    from pathlib import Path

    from shoal.snapshotter.criproxy import MAX_PULLS, ImageServiceProxy
    from shoal.snapshotter.keychain import Keychain
    from shoal.snapshotter.remote import RemoteMounts
    from shoal.snapshotter.server import serve
    from shoal.snapshotter.service import Service

    if root is None:
        root = ("/var/lib/shoal-snapshotter" if os.geteuid() == 0
                else os.path.expanduser("~/.local/share/shoal-snapshotter"))
    rootp = Path(root).absolute()
    rootp.mkdir(parents=True, exist_ok=True)
    keychain = Keychain(rootp) if cri_image_service else None
    remote = RemoteMounts(rootp, keychain=keychain)
    svc = Service(rootp, remote.mount, remote.release)
    svc.reattach()  # lazy mounts of a previous run: found again, or mounted again (after a reboot)
    if keychain is None or cri_image_service is None:
        serve(svc, address)
        return
    proxy = ImageServiceProxy(os.path.abspath(cri_image_service), keychain)
    try:
        serve(svc, address, extra=(proxy,), workers=8 + MAX_PULLS + 8)
    finally:
        proxy.close()
