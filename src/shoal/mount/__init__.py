"""Lazy mounts and containers: FUSE over the index, overlayfs for writes, runc to run (docs/spec/mount.md).

Nothing here is imported by ``shoal --help``; the FUSE server loads only when a mount is served.
"""

from shoal.mount.image import CountingSource, OpenedImage, open_image

__all__ = ["OpenedImage", "open_image", "CountingSource"]
