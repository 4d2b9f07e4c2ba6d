"""``shoal store serve DIR``: serve the additional layer store at DIR until SIGTERM/SIGINT or
until DIR is unmounted; then unmount the lazy image mounts it started (docs/podman.md)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from shoal.errors import StoreError
from shoal.mount import state as ms
from shoal.transports.context import SystemContext

__all__ = ["serve", "ALS_FUSE_OPTIONS"]

log = logging.getLogger(__name__)

#: not "ro": c/storage's GC hints (mkdir use, rmdir) must reach the file system to be answered ENOENT.
#: No allow_other: only the user serving the store (root, like podman's root storage) may enter it.
ALS_FUSE_OPTIONS = frozenset({"fsname=shoal-als", "subtype=shoal-als", "default_permissions"})


def serve(directory: str, ctx: SystemContext, mounts_root: str | None = None,
          notify: Any = None) -> None:
    """Mount the layer store at ``directory`` and serve it in this process."""
    import pyfuse3
    import trio

    from shoal.als.blobs import Blobs
    from shoal.als.fs import LayerStoreFS
    from shoal.als.layers import Resolver
    from shoal.als.mounts import Mounts

    mp = ms.canonical_mountpoint(directory)
    os.makedirs(mp, exist_ok=True)
    if mp in ms.mounts():
        raise StoreError(f"{mp} is already a mount point")
    root = Path(mounts_root) if mounts_root else ms.run_dir() / "als"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    mounts = Mounts(root, ctx.store)
    fs = LayerStoreFS(Resolver(ctx), mounts, Blobs(ctx))
    try:
        pyfuse3.init(fs, mp, set(ALS_FUSE_OPTIONS))
    except RuntimeError as exc:
        raise StoreError(f"cannot mount FUSE at {mp}: {exc}") from None

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def loop() -> None:
                try:
                    await pyfuse3.main(min_tasks=2, max_tasks=16)
                finally:
                    nursery.cancel_scope.cancel()

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for signum in sigs:
                        log.info("signal %d: unmounting %s", signum, mp)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(signals)
            nursery.start_soon(loop)
            log.info("serving the additional layer store at %s (image mounts under %s)", mp, root)
            if notify is not None:
                notify()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=ms.is_mounted(mp))
        mounts.close()
        log.info("stopped serving %s", mp)
