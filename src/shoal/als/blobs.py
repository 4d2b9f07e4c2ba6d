"""The ``blob`` file of a layer: its compressed bytes, verified before any of them is served (docs/podman.md).

containers/storage opens ``<layer>/blob`` only in ``layerStore.Diff`` of a layer that came from the
store (``podman push``, ``podman save``, ``podman image scp``): a reader that wants the whole blob.

- The **stub** layer's bytes are computed (``format.runtime_view.stub_layer``) and kept in memory.
- An **index or pack** layer's bytes are the registry blob.  Its compressed bytes have no digest finer
  than the blob's own (a pack's frames are verified by the chunks they decompress to, not by their
  compressed bytes), so the only sound check of what ``blob`` returns is the whole blob's sha256: the
  first ``open`` streams the blob into an unlinked temp file (in ``$TMPDIR``), checking its size and
  digest, and fails with EIO on a mismatch; reads are then served from that file.  Opens of the same
  blob share one copy, which is dropped when the last of them is closed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from shoal.errors import IntegrityError
from shoal.store.layout import unlinked_tempfile
from shoal.transports.base import BlobInfo, parse_reference
from shoal.transports.context import SystemContext

__all__ = ["Blobs", "Spool"]

log = logging.getLogger(__name__)


@dataclass
class Spool:
    """One verified copy of a blob: bytes in memory (the stub) or an unlinked file."""

    digest: str
    size: int
    data: bytes | None = None
    fd: int = -1
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, off: int, size: int) -> bytes:
        if self.data is not None:
            return self.data[off:off + size]
        return os.pread(self.fd, max(0, min(size, self.size - off)), off)


class Blobs:
    """Open blobs by digest, each fetched and verified once while it is open."""

    def __init__(self, ctx: SystemContext) -> None:
        self.ctx = ctx
        self._guard = threading.Lock()
        self._spools: dict[str, Spool] = {}

    def acquire(self, repo_ref: str, digest: str, size: int, data: bytes | None = None) -> Spool:
        """The verified bytes of blob ``digest`` (``size`` bytes) of ``repo_ref`` (``docker://REPO@…``),
        or ``data`` when the caller has them (the stub, digest checked as well).  Pair with ``release``."""
        with self._guard:
            sp = self._spools.setdefault(digest, Spool(digest, size))
            sp.users += 1
        try:
            with sp.lock:
                if sp.data is None and sp.fd < 0:
                    if data is not None:
                        _check(digest, size, hashlib.sha256(data), len(data))
                        sp.data = data
                    else:
                        sp.fd = self._fetch(repo_ref, digest, size)
        except BaseException:
            self.release(sp)
            raise
        return sp

    def release(self, sp: Spool) -> None:
        with self._guard:
            sp.users -= 1
            if sp.users > 0:
                return
            self._spools.pop(sp.digest, None)
        if sp.fd >= 0:
            os.close(sp.fd)
            sp.fd = -1

    def _fetch(self, repo_ref: str, digest: str, size: int) -> int:
        tmp = Path(self.ctx.tmpdir or tempfile.gettempdir())
        fd = unlinked_tempfile(tmp, "shoal-als-blob")
        try:
            h, n = hashlib.sha256(), 0
            src = parse_reference(repo_ref).new_source(self.ctx)
            try:
                stream, _ = src.get_blob(BlobInfo(digest, size))
                with stream:
                    while buf := stream.read(1 << 20):
                        n += len(buf)
                        if n > size:
                            raise IntegrityError(f"blob {digest} is longer than its declared {size} bytes")
                        h.update(buf)
                        _write_all(fd, buf)
            finally:
                src.close()
            _check(digest, size, h, n)
        except BaseException:
            os.close(fd)
            raise
        log.info("blob %s: %d bytes fetched and verified", digest, n)
        return fd


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view):]


def _check(digest: str, size: int, h: "hashlib._Hash", n: int) -> None:
    if n != size:
        raise IntegrityError(f"blob {digest} has {n} bytes, not the declared {size}")
    got = "sha256:" + h.hexdigest()
    if got != digest:
        raise IntegrityError(f"blob digest mismatch: expected {digest}, got {got}")
