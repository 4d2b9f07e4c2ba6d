"""Remote (lazy) layers: a layer labelled ``containerd.io/snapshot/shoal.image`` is served by a lazy
mount of that Shoal image instead of being downloaded (docs/containerd.md, docs/spec/oci-mapping.md §4).

The mount is made by ``shoal mount`` in a child process whose FUSE daemon detaches, so the mounts
outlive the gRPC server (a snapshotter restart keeps running containers) and no FUSE daemon is
forked from a process with gRPC threads.  Credentials and registries.conf are ``shoal mount``'s; when
the CRI keychain (:mod:`shoal.snapshotter.keychain`) holds credentials for the repository, its file
is the mount's ``--authfile`` (so no secret is on a command line).  The store is the snapshotter's
``--store``, where ``cache.StoreCache`` tags each mounted image and collects its data when the last
snapshot goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path

from shoal.errors import TransportError, UsageError
from shoal.format.runtime_view import index_hint
from shoal.mount.state import is_mounted  # here, not at the first mount: 6-11 ms of imports on its path
from shoal.snapshotter.cache import StoreCache
from shoal.snapshotter.hosts import HostsDir
from shoal.snapshotter.keychain import Keychain, normalize_repository
from shoal.snapshotter.runner import Runner, SubprocessRunner

__all__ = ["SHOAL_IMAGE_LABEL", "SHOAL_INDEX_LABEL", "REF_LABELS", "RemoteMounts"]

log = logging.getLogger(__name__)

SHOAL_IMAGE_LABEL = "containerd.io/snapshot/shoal.image"  # the Shoal manifest digest (oci-mapping.md §4)
SHOAL_INDEX_LABEL = "containerd.io/snapshot/shoal.index"  # its index blob, sha256:<hex>:<size> (a hint)
REF_LABELS = ("containerd.io/snapshot/remote/stargz.reference",  # ctr-remote image rpull
              "containerd.io/snapshot/cri.image-ref")  # CRI PullImage with disable_snapshot_annotations = false
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RemoteMounts:
    """Lazy mounts of whole Shoal images under ``<root>/mounts/<manifest hex>``."""

    def __init__(self, root: Path, runner: Runner | None = None, cache: StoreCache | None = None,
                 hosts: Path | None = None, keychain: Keychain | None = None) -> None:
        self.dir = root / "mounts"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)  # the mounts are --trusted-image (suid, dev): root only, as containerd's own
        self.runner = runner or SubprocessRunner()
        self.globals: list[str] = []  # shoal's options before the command
        self.keychain = keychain
        self.cache = cache
        self.hosts = HostsDir(hosts, root / "hosts") if hosts is not None else None  # containerd's config_path
        if cache is not None:
            self.globals = ["--store", str(cache.root)]

    def locate(self, labels: dict[str, str]) -> str:
        """Where ``mount`` serves the layer with these labels; "" for a layer that is not remote."""
        digest = labels.get(SHOAL_IMAGE_LABEL, "")
        if not digest:
            return ""  # an ordinary layer: containerd fetches and applies it
        if not _DIGEST.match(digest):
            raise UsageError(f"label {SHOAL_IMAGE_LABEL}={digest!r} is not a sha256 digest")
        if not any(labels.get(k) for k in REF_LABELS):
            return ""  # no reference to fetch from (ctr images pull): the stub layer is applied
        return str(self.dir / digest.removeprefix("sha256:"))

    def mount(self, labels: dict[str, str]) -> str:
        where = self.locate(labels)
        if not where:
            return ""
        digest = labels[SHOAL_IMAGE_LABEL]
        ref = next(labels[k] for k in REF_LABELS if labels.get(k))
        mp = Path(where)
        hint = labels.get(SHOAL_INDEX_LABEL, "")
        if hint and index_hint(hint) is None:
            log.debug("ignoring label %s=%r: not sha256:<hex>:<size>", SHOAL_INDEX_LABEL, hint[:100])
            hint = ""
        if self.cache is None:
            return self._mount(mp, ref, digest, hint)
        with contextlib.ExitStack() as hold:
            hold.enter_context(self.cache.mounting())  # no gc of the store until the image is tagged
            out = self._mount(mp, ref, digest, hint)
            log.debug("timeline: lazy mount %s answered", mp.name[:12])
            self.cache.pin_later(digest, hold.pop_all())  # the hold goes with the tagging, off this path
        return out

    def _mount(self, mp: Path, ref: str, digest: str, index_hint: str = "") -> str:
        if is_mounted(str(mp)):
            try:
                os.stat(mp)
                return str(mp)
            except OSError as e:  # its FUSE daemon is gone (ENOTCONN): mount it again
                log.warning("lazy mount %s is dead (%s); mounting it again", mp, e)
                subprocess.run(["umount", "-l", str(mp)], capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        mp.mkdir(exist_ok=True)
        src = f"docker://{normalize_repository(ref)}@{digest}"
        authfile = self.keychain.authfile_for(ref) if self.keychain is not None else None
        extra = ["--authfile", str(authfile)] if authfile is not None else []
        log.info("mounting %s lazily at %s%s", src, mp, " with the CRI keychain's credentials" if extra else "")
        extra += self.hosts.mount_args(src.removeprefix("docker://").split("/", 1)[0]) if self.hosts else []
        # the view's index label: the mount requests that blob beside the manifest, one round trip sooner
        extra += ["--index-hint", index_hint] if index_hint else []
        debug = log.isEnabledFor(logging.DEBUG)  # the mount's own timeline, relayed below
        rc, stderr = self.runner.run([*self.globals, *(["-vv"] if debug else []), "mount", "--trusted-image", *extra,
                                      src, str(mp)], 300)
        if debug:
            for line in stderr.splitlines():
                log.debug("mount %s: %s", mp.name[:12], line)
        if rc != 0:
            err = (stderr.strip().splitlines() or ["no message"])[-1]
            raise TransportError(f"lazy mount of {src} failed: {err}")
        return str(mp)

    def release(self, mountpoint: str) -> None:
        log.info("releasing lazy mount %s", mountpoint)
        rc, stderr = self.runner.run([*self.globals, "umount", "--lazy", mountpoint], 60)
        if rc != 0:
            log.warning("umount %s: %s", mountpoint, stderr.strip())
            if is_mounted(mountpoint):  # still served: its store data stays with it
                return
        try:
            os.rmdir(mountpoint)
        except OSError:
            pass
        if self.cache is not None:  # its tag, then what of it no other image uses, off the gRPC thread
            self.cache.release("sha256:" + Path(mountpoint).name)

    def sweep(self, live: set[str]) -> None:
        """Release the store data of tagged images that no snapshot uses (a snapshotter that died
        between removing the last snapshot and collecting)."""
        if self.cache is None:
            return
        for digest in self.cache.pinned():
            if str(self.dir / digest.removeprefix("sha256:")) not in live:
                self.cache.release(digest)
