"""One lazy Shoal mount per image (by manifest digest), started on first use (docs/podman.md).

The mount is started by a fresh process running ``shoal mount --suid --dev REF MOUNTPOINT``
(Shoal's own lazy mount, as ``shoal run`` mounts a container root): its daemon forks, so it must
not be forked from the store's FUSE process, which holds pyfuse3's session and trio's loop.
A mount that is already live (e.g. left by an earlier ``shoal store serve``) is reused.
``release`` unmounts an image's mount once containers/storage no longer uses any of its layers (fs.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from shoal.errors import ShoalError
from shoal.mount import control
from shoal.mount import state as ms

__all__ = ["Mounts"]

log = logging.getLogger(__name__)


class Mounts:
    def __init__(self, root: Path, store: str | None, timeout: float = 120.0) -> None:
        self.root = root
        # the mounts are suid and dev (images' setuid binaries work in containers): root only
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        self.store = store
        self.timeout = timeout
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.started: list[str] = []
        self._threads: list[threading.Thread] = []

    def path_for(self, manifest_digest: str) -> str:
        return str(self.root / manifest_digest.split(":", 1)[-1])

    def ensure(self, mount_ref: str, manifest_digest: str) -> str:
        """The mount point of ``mount_ref``, mounting it first if it is not live."""
        mp = self.path_for(manifest_digest)
        with self._lock(mp):
            if ms.mounts().get(mp) == "fuse.shoal":
                return mp
            os.makedirs(mp, exist_ok=True)
            cmd = [sys.executable, "-c", "import sys; from shoal.cli import main; sys.exit(main())"]
            cmd += (["--store", self.store] if self.store else []) + ["mount", "--suid", "--dev", mount_ref, mp]
            log.info("mounting %s at %s", mount_ref, mp)
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout)
            if p.returncode != 0:
                msg = p.stderr.decode(errors="replace").strip().splitlines()
                raise ShoalError(f"lazy mount of {mount_ref} failed: {msg[-1] if msg else p.returncode}")
            self.started.append(mp)
            return mp

    def _lock(self, mp: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(mp, threading.Lock())

    def release(self, manifest_digest: str) -> None:
        """Unmount the image's mount if it is live (lazily: a process still using it keeps it until it
        leaves, then its daemon exits) and remove its mount point.  A later ``ensure`` mounts it again."""
        mp = self.path_for(manifest_digest)
        with self._lock(mp):
            self._umount(mp)

    def release_soon(self, manifest_digest: str) -> None:
        """``release`` in a thread of its own (a FUSE request must not wait for an unmount)."""
        t = threading.Thread(target=self.release, args=(manifest_digest,), name="als-release", daemon=True)
        with self._guard:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _umount(self, mp: str) -> None:
        if ms.mounts().get(mp) == "fuse.shoal":
            log.info("releasing the image mount %s", mp)
            try:
                control.umount(mp, lazy=True)
            except ShoalError as exc:
                log.warning("unmounting %s: %s", mp, exc)
        if mp in self.started:
            self.started.remove(mp)
        try:
            os.rmdir(mp)
        except OSError:
            pass

    def close(self) -> None:
        """Unmount what this store mounted (lazily: a running container keeps its files)."""
        for t in self._threads:
            t.join()
        for mp in list(self.started):
            with self._lock(mp):
                self._umount(mp)
