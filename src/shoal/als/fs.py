"""The additional layer store's FUSE file system (docs/podman.md).

It answers lookups for arbitrary names, as containers/storage expects: a path of base64 text
(the encoding's ``/`` splits it into several directories) followed by a ``sha256:…`` name is a
layer directory holding ``diff``, ``info`` and ``blob``.  Nothing is listed (``readdir`` of the
root is empty), only looked up.

- ``diff`` of the index layer is a symlink to the image's lazy Shoal mount, started on the lookup;
  a pack layer's ``diff`` is an empty directory.
- ``info`` is the JSON of ``layers.Layer.info``.
- ``blob`` is the layer's compressed bytes (blobs.py: the stub's are computed; an index or pack
  blob is fetched whole and verified on open, before any byte is served).
- Use counts (containers/storage 1.43 ``drivers/overlay``): c/storage creates ``<layer>/use`` each time
  it starts using a layer (``LookupAdditionalLayer``, ``CreateAs``) and runs ``rmdir <layer>`` each time
  it stops (``Release``, ``Remove`` of its layer); both are answered ENOENT, as stargz-store does.
  When no layer of an image has a user left (``podman rmi``), the image's lazy mount is released.
  Every other change is EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from shoal.als.blobs import Blobs, Spool
from shoal.als.layers import DIGEST_RE, Layer, LayerKind, Resolver, decode_ref
from shoal.als.mounts import Mounts
from shoal.errors import NotFound, ShoalError, UsageError

__all__ = ["LayerStoreFS"]

log = logging.getLogger(__name__)

_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+=")
_TIMEOUT = 1.0  # attribute/entry cache: a tag may move, so keep it short


@dataclass(frozen=True)
class _Node:
    kind: str  # "prefix" | "layer" | "diff-link" | "diff-empty" | "info" | "blob"
    prefix: str = ""  # base64 text so far (prefix); the layer's key otherwise
    layer: Layer | None = None


class LayerStoreFS(pyfuse3.Operations):
    def __init__(self, resolver: Resolver, mounts: Mounts, blobs: Blobs) -> None:
        super().__init__()
        self.resolver = resolver
        self.mounts = mounts
        self.blobs = blobs
        self._handles: dict[int, tuple[_Node, Spool | None]] = {}
        self._next_fh = 1
        self._uses: dict[tuple[str, str], int] = {}  # (base64 ref, layer digest) -> c/storage's users
        self._layers: dict[tuple[str, str], Layer] = {}  # the layers looked up, by the same key
        self._nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node("prefix")}
        self._inos: dict[tuple[str, str, str], int] = {("prefix", "", ""): pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- nodes -----------------------------------------------------------------------------

    def _ino(self, node: _Node) -> int:
        key = (node.kind, node.prefix, node.layer.digest if node.layer else "")
        ino = self._inos.get(key)
        if ino is None or self._nodes[ino] != node:
            ino = self._next
            self._next += 1
            self._inos[key] = ino
        self._nodes[ino] = node
        return ino

    def _node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self._node(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid, a.st_gid = self._uid, self._gid
        a.entry_timeout = a.attr_timeout = _TIMEOUT
        a.st_nlink = 1
        if node.kind in ("prefix", "layer", "diff-empty"):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif node.kind == "diff-link":
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_size = len(self._target(node))
        else:
            a.st_mode = stat.S_IFREG | 0o444
            if node.layer is not None:
                a.st_size = len(node.layer.info) if node.kind == "info" else node.layer.size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        return a

    def _target(self, node: _Node) -> bytes:
        assert node.layer is not None
        return os.fsencode(self.mounts.path_for(node.layer.manifest_digest))

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.kind == "prefix":
            if DIGEST_RE.match(name) and parent.prefix:
                layer = await trio.to_thread.run_sync(self._resolve, parent.prefix, name.decode())
                self._layers[(parent.prefix, layer.digest)] = layer
                return self._attr(self._ino(_Node("layer", parent.prefix, layer)))
            if name and len(parent.prefix) + len(name) < 4096 and all(c in _B64 for c in name):
                sep = "/" if parent.prefix else ""
                return self._attr(self._ino(_Node("prefix", parent.prefix + sep + name.decode())))
        elif parent.kind == "layer" and parent.layer is not None:
            layer = parent.layer
            if name == b"diff" and layer.kind is LayerKind.TREE:
                await trio.to_thread.run_sync(self._mount, layer)
                return self._attr(self._ino(_Node("diff-link", parent.prefix, layer)))
            if name == b"diff":
                return self._attr(self._ino(_Node("diff-empty", parent.prefix, layer)))
            if name in (b"info", b"blob"):
                return self._attr(self._ino(_Node(name.decode(), parent.prefix, layer)))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _resolve(self, prefix: str, digest: str) -> Layer:
        try:
            return self.resolver.layer(decode_ref(prefix), digest)
        except (UsageError, NotFound) as exc:
            log.info("no layer %s/%s: %s", prefix, digest, exc)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except ShoalError as exc:
            log.warning("resolving %s/%s: %s", prefix, digest, exc)
            raise pyfuse3.FUSEError(exc.errno) from None

    def _mount(self, layer: Layer) -> None:
        try:
            self.mounts.ensure(layer.mount_ref, layer.manifest_digest)
        except ShoalError as exc:
            log.warning("%s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind != "diff-link" or node.layer is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await trio.to_thread.run_sync(self._mount, node.layer)
        return self._target(node)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).kind not in ("prefix", "layer", "diff-empty"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        if node.kind != "layer" or node.layer is None:
            return
        names = [b"blob", b"diff", b"info"]
        for i, name in enumerate(names[start_id:], start_id):
            attr = await self.lookup(fh, name, None)  # type: ignore[arg-type]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.kind not in ("info", "blob") or node.layer is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        spool = await trio.to_thread.run_sync(self._acquire, node.layer) if node.kind == "blob" else None
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (node, spool)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _acquire(self, layer: Layer) -> Spool:
        try:
            return self.blobs.acquire(layer.mount_ref, layer.digest, layer.size, layer.data)
        except ShoalError as exc:
            log.warning("blob %s of %s: %s", layer.digest, layer.ref, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:  # e.g. a full $TMPDIR: this open fails, the layer store goes on serving
            log.warning("blob %s of %s: %s", layer.digest, layer.ref, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - any other failure must not end pyfuse3's main loop
            log.warning("blob %s of %s failed", layer.digest, layer.ref, exc_info=exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node, spool = handle
        if spool is not None:
            try:
                return spool.read(off, size)
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        data = node.layer.info if node.layer else b""
        return data[off:off + size]

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle[1] is not None:
            self.blobs.release(handle[1])

    # -- use counts, GC hints and refusals ---------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        raise pyfuse3.FUSEError(errno.ENOENT if name == b"use" else errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> Any:
        """c/storage's ``os.Create(<layer>/use)``: one more user of the layer."""
        parent = self._node(parent_inode)
        if name != b"use":
            raise pyfuse3.FUSEError(errno.EROFS)
        if parent.kind == "layer" and parent.layer is not None:
            key = (parent.prefix, parent.layer.digest)
            self._uses[key] = self._uses.get(key, 0) + 1
            log.debug("layer %s of %s: %d users", parent.layer.digest, parent.layer.ref, self._uses[key])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """c/storage's ``rmdir <layer>``: one user fewer; the image's mount goes with its last user.

        A layer whose uses were never seen (counted by an earlier ``shoal store serve``) counts as having
        had one.  A mount released too early comes back: ``diff`` mounts it again when it is resolved."""
        parent = self._node(parent_inode)
        layer = self._layers.get((parent.prefix, name.decode(errors="replace")))
        if parent.kind == "prefix" and layer is not None:
            key = (parent.prefix, layer.digest)
            self._uses[key] = max(0, self._uses.get(key, 0) - 1)
            log.debug("layer %s of %s: %d users", layer.digest, layer.ref, self._uses[key])
            if not any(n and self._layers[k].manifest_digest == layer.manifest_digest
                       for k, n in self._uses.items()):
                self.mounts.release_soon(layer.manifest_digest)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s
