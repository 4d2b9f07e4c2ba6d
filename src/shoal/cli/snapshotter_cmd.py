"""shoal snapshotter: a containerd proxy snapshotter (docs/containerd.md)"""

from __future__ import annotations

import os

import click


@click.command("snapshotter")
@click.option("--address", required=True, metavar="SOCK", help="Unix socket to serve containerd's snapshots API on.")
@click.option("--root", default=None, metavar="DIR",
              help="Snapshot directories and metadata (default /var/lib/shoal-snapshotter as root, "
                   "else ~/.local/share/shoal-snapshotter).")
@click.option("--store", "store", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="The Shoal store the lazy mounts cache frames in (default: shoal's --store, $SHOAL_STORE, "
                   "/var/lib/shoal as root, else ~/.local/share/shoal).")
@click.option("--hosts-dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="containerd's registry hosts directory (CRI's config_path): DIR/HOST/hosts.toml mirrors, "
                   "server, ca, client and skip_verify apply to lazy fetches (default /etc/containerd/certs.d "
                   "if it exists).")
@click.option("--cri-keychain-image-service", "cri_image_service", default=None, metavar="SOCK",
              help="Also serve CRI's image service on --address, forwarding it to containerd's CRI socket "
                   "SOCK and keeping each pull's credentials for the lazy mounts (under --root, mode 0600).")
@click.pass_context
def snapshotter(ctx: click.Context, address: str, root: str | None, store: str | None,
                hosts_dir: str | None, cri_image_service: str | None) -> None:
    """Serve containerd's snapshots API (proxy plugin) with overlayfs semantics; Shoal images lazily.

    With --cri-keychain-image-service, point the kubelet's --image-service-endpoint (or crictl's
    --image-endpoint) at --address: per-pull credentials (imagePullSecrets) then reach the lazy mounts."""
    from pathlib import Path

    from shoal.cli.forkserver import ForkServer
    from shoal.snapshotter.cache import StoreCache
    from shoal.snapshotter.criproxy import MAX_PULLS, ImageServiceProxy
    from shoal.snapshotter.hosts import DEFAULT_HOSTS_DIR
    from shoal.snapshotter.keychain import Keychain
    from shoal.snapshotter.remote import RemoteMounts
    from shoal.snapshotter.server import serve
    from shoal.snapshotter.service import Service
    from shoal.store import default_store_path

    if root is None:
        root = ("/var/lib/shoal-snapshotter" if os.geteuid() == 0
                else os.path.expanduser("~/.local/share/shoal-snapshotter"))
    rootp = Path(root).absolute()
    rootp.mkdir(parents=True, exist_ok=True)
    keychain = Keychain(rootp) if cri_image_service else None
    store = store or (ctx.obj or {}).get("store")
    cache = StoreCache(Path(store or default_store_path()).absolute())
    if hosts_dir is None and os.path.isdir(DEFAULT_HOSTS_DIR):
        hosts_dir = DEFAULT_HOSTS_DIR
    runner = ForkServer()  # each lazy mount is a child of one warm interpreter (docs/containerd.md "Start-up")
    runner.start()
    remote = RemoteMounts(rootp, runner, cache=cache, hosts=Path(hosts_dir).absolute() if hosts_dir else None,
                          keychain=keychain)
    svc = Service(rootp, remote.mount, remote.release, remote.locate)  # mounts start at Prepare, awaited by use
    svc.reattach()  # lazy mounts of a previous run: found again, or mounted again (after a reboot)
    remote.sweep({s.remote for s in svc.list([]) if s.remote})  # images released while it was down
    proxy = ImageServiceProxy(os.path.abspath(cri_image_service), keychain) if keychain and cri_image_service else None
    try:
        if proxy is None:
            serve(svc, address)
        else:
            serve(svc, address, extra=(proxy,), workers=8 + MAX_PULLS + 8)
    finally:
        if proxy is not None:
            proxy.close()
        cache.close()
        runner.close()
