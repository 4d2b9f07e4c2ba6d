"""Shoal's public Python API (docs/api.md), re-exported lazily by ``shoal/__init__.py``.

Every function takes paths as ``str`` or ``os.PathLike``, references as the CLI spells them
(``NAME[:TAG]`` for the local store, ``docker://``, ``oci:``, ``oci-archive:``, ``docker-archive:``,
``dir:``), and its options keyword-only.  ``store`` is the store directory (default: ``$SHOAL_STORE``,
else ``~/.local/share/shoal``, or ``/var/lib/shoal`` as root).  Errors are the classes of
``shoal.errors`` (all ``ShoalError``); nothing here prints or exits.

HTTP code is imported only when a function needs a registry or the transport table (``copy``,
``pull``, ``push``); FUSE only when ``mount`` serves.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from shoal.progress import NULL, Sink

if TYPE_CHECKING:
    from shoal.build import BuildOptions, BuildResult
    from shoal.copier import CopyOptions, CopyResult
    from shoal.format.manifest import ImageConfig
    from shoal.format.model import Entry, Index
    from shoal.mount.image import OpenOptions
    from shoal.mount.state import MountOptions, MountState
    from shoal.reader import Reader
    from shoal.unpack import UnpackOptions, UnpackResult

__all__ = ["StrPath", "Image", "build", "copy", "pull", "push", "open_image", "mount", "unmount", "unpack"]

StrPath = str | os.PathLike[str]


def _root(store: StrPath | None) -> str | None:
    return None if store is None else os.path.abspath(os.fspath(store))


def _path(p: str | bytes) -> bytes:
    b = os.fsencode(p).strip(b"/")
    return b"" if b in (b"", b".") else b


# ---------------------------------------------------------------------------------------------- build


def build(source: StrPath, ref: str, *, store: StrPath | None = None, options: BuildOptions | None = None,
          progress: Sink = NULL) -> BuildResult:
    """Chunk, dedup, pack and index the directory ``source`` into the store as ``ref`` (``NAME[:TAG]``).

    Without ``options``, the image gets what ``shoal build`` gives it by default: the platform of the
    tree's ``/bin/sh`` (else linux/amd64), ``PATH`` and ``Cmd ["/bin/sh"]``.

    Raises UsageError (bad or reserved name), NotFound / PermissionDenied (``source``), StoreError,
    NoSpace.
    """
    from shoal.build import BuildOptions
    from shoal.build import build as do_build
    from shoal.store import Store, new_image_name

    name = new_image_name(ref)
    if options is None:
        options = BuildOptions(config=default_config(source))
    return do_build(Store.open(_root(store)), os.fspath(source), name, options, progress)


def default_config(source: StrPath) -> ImageConfig:
    """The image config ``shoal build`` records without options for the tree at ``source``."""
    from shoal.format.manifest import ImageConfig
    from shoal.scan import build_platform

    plat = build_platform(os.fspath(source))
    conf: dict[str, object] = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                               "Cmd": ["/bin/sh"]}
    return ImageConfig(architecture=plat.architecture, os=plat.os, variant=plat.variant, config=conf)


# ---------------------------------------------------------------------------------------------- transfer


def _with_store(options: CopyOptions | None, store: StrPath | None) -> CopyOptions:
    from shoal.copier import CopyOptions

    o = options or CopyOptions()
    root = _root(store)
    if root is None:
        return o
    from shoal.transports.context import as_context

    src, dst = as_context(o.src_opts), as_context(o.dst_opts)
    return dataclasses.replace(o, src_opts=src.replace(store=src.store or root),
                               dst_opts=dst.replace(store=dst.store or root))


def copy(src: str, dst: str, *, store: StrPath | None = None, options: CopyOptions | None = None,
         progress: Sink = NULL) -> CopyResult:
    """Copy an image from reference ``src`` to ``dst`` (any two transports); only missing blobs travel,
    and every byte is verified.  ``options.src_opts``/``dst_opts`` carry transport options
    (``tls_verify``, ``credentials``, ``tags``, ...; docs/transports.md).

    Raises UsageError (bad reference), NotFound, FormatError, IntegrityError, TransportError /
    AuthError (registries), StoreError, NoSpace.
    """
    from shoal.copier import copy as do_copy
    from shoal.transports.base import parse_reference

    return do_copy(parse_reference(src), parse_reference(dst), _with_store(options, store), progress)


def push(name: str, dst: str, *, store: StrPath | None = None, options: CopyOptions | None = None,
         progress: Sink = NULL) -> CopyResult:
    """Copy the store image ``name`` (``NAME[:TAG]``) to ``dst``, sending only the blobs it lacks.

    Raises UsageError if ``name`` is not a store image name; else as ``copy``.
    """
    from shoal.errors import UsageError
    from shoal.transports.base import parse_reference

    if parse_reference(name).transport.name != "":
        raise UsageError(f"push takes a store image NAME[:TAG], not {name!r} (use copy)")
    return copy(name, dst, store=store, options=options, progress=progress)


def pull(src: str, name: str | None = None, *, store: StrPath | None = None, options: CopyOptions | None = None,
         progress: Sink = NULL) -> CopyResult:
    """Pull ``src`` into the store as ``name`` (default: a ``docker://`` source's repository and tag),
    fetching only the chunks the store lacks.  A short name (``busybox``) is resolved as podman does
    (registries.conf aliases, then the search registries, in order).  ``options.platform`` defaults to
    this machine's.

    Raises UsageError (bad or reserved name, or no ``name`` for a non-registry source), NotFound,
    TransportError / AuthError; else as ``copy``.
    """
    from shoal.copier import CopyOptions
    from shoal.errors import UsageError
    from shoal.format.platform import Platform
    from shoal.store import refuse_reserved
    from shoal.transports.base import ImageReference, parse_reference
    from shoal.transports.context import as_context
    from shoal.transports.docker import (
        DockerReference,
        first_candidate,
        short_name_candidates,
        short_name_store_name,
    )

    o = options or CopyOptions()
    if o.platform is None:  # like podman pull: an image index gives this machine's image
        o = dataclasses.replace(o, platform=str(Platform.host()))
    ref = parse_reference(src)
    cands: tuple[ImageReference, ...] = (ref,)
    if ref.transport.name == "":  # a short name
        conf = as_context(o.src_opts).registries_conf
        short = short_name_candidates(src, None if conf is None else str(conf))
        if short is None:
            raise UsageError(f"pull takes a remote or layout reference, not the store image {src!r}")
        cands = short
        if name is None:
            name = short_name_store_name(src, short[0])
    elif name is None:
        if not isinstance(ref, DockerReference):
            raise UsageError("give a NAME[:TAG] for the store when pulling from a non-registry source")
        repo = ref.repo[len("library/"):] if ref.repo.startswith("library/") else ref.repo
        name = f"{repo}:{ref.tag or 'latest'}"
    refuse_reserved(name)
    if parse_reference(name).transport.name != "":
        raise UsageError(f"pull stores into the local store: want NAME[:TAG], not {name!r}")
    store_name = name
    return first_candidate(src, cands, lambda c: copy(str(c), store_name, store=store, options=o, progress=progress))


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Image:
    """An opened image: its file tree (``index``), runtime ``config``, and a ``reader`` that verifies
    every chunk it returns.  Paths are absolute or relative to the image's root, ``str`` or ``bytes``."""

    ref: str  # as given
    name: str  # canonical, e.g. "debian:12" or "docker://host/repo:tag"
    digest: str  # manifest digest
    config: ImageConfig
    index: Index
    reader: Reader

    def entry(self, path: str | bytes, *, follow_symlinks: bool = True) -> Entry | None:
        """The entry at ``path`` (symlinks resolved inside the image), or None."""
        return self.reader.resolve(_path(path), follow_symlinks)

    def listdir(self, path: str | bytes = "/") -> list[str]:
        """Names in directory ``path``, in index order.  Raises NotFound, UsageError (not a directory)."""
        from shoal.errors import NotFound, UsageError
        from shoal.format.model import Kind

        p = _path(path)
        e = self.reader.resolve(p)
        if e is None:
            raise NotFound(f"no such directory in {self.ref}: /{os.fsdecode(p)}")
        if e.kind != Kind.DIR:
            raise UsageError(f"not a directory in {self.ref}: /{os.fsdecode(p)}")
        return [os.fsdecode(c.name) for c in self.index.children(e.path)]

    def iter_bytes(self, path: str | bytes) -> Iterator[bytes]:
        """The bytes of regular file ``path``, chunk by chunk.  Raises UsageError (not a regular file),
        NotFound / IntegrityError / TransportError (its bytes)."""
        for chunk in self.reader.iter_file(self.reader.file_entry(_path(path))):
            yield bytes(chunk)

    def read_bytes(self, path: str | bytes) -> bytes:
        """The whole of regular file ``path``; raises as ``iter_bytes``."""
        return b"".join(self.iter_bytes(path))


def open_image(ref: str, *, store: StrPath | None = None, options: OpenOptions | None = None) -> Image:
    """Open image ``ref`` (``NAME[:TAG]`` in the store, or ``docker://...``) for reading, fetching
    only its manifest, config and index; file bytes are read (and verified) on demand.

    Raises UsageError (unsupported reference), NotFound, FormatError, IntegrityError, TransportError.
    """
    from shoal.mount.image import open_image as do_open
    from shoal.reader import Reader

    img = do_open(ref, _root(store), options)
    return Image(ref=img.ref, name=img.name, digest=img.digest, config=img.config, index=img.index,
                 reader=Reader(img.index, img.source))


def unpack(ref: str, dest: StrPath, *, store: StrPath | None = None, options: UnpackOptions | None = None,
           open_options: OpenOptions | None = None, progress: Sink = NULL) -> UnpackResult:
    """Materialize image ``ref``'s tree in directory ``dest`` (new or empty), metadata exact.
    ``open_options.platform`` picks an image of an image index (default: this machine's).

    Raises as ``open_image``, and UsageError (``dest`` not empty), PermissionDenied (device nodes
    without root, an unwritable ``dest``), IntegrityError, NoSpace.
    """
    from shoal.mount.image import OpenOptions as Options
    from shoal.unpack import unpack as do_unpack

    whole = dataclasses.replace(open_options or Options(), whole_index=True)  # refused before any write
    img = open_image(ref, store=store, options=whole)
    return do_unpack(img.index, img.reader, os.fspath(dest), options, progress)


# ---------------------------------------------------------------------------------------------- mounts


def mount(ref: str, mountpoint: StrPath, *, store: StrPath | None = None, options: MountOptions | None = None,
          open_options: OpenOptions | None = None) -> MountState | None:
    """Mount image ``ref`` read-only (or ``options.writable``) at ``mountpoint`` with FUSE, reading
    lazily, and return the live mount's state; the mount is served by a daemon until ``unmount``.
    With ``options.foreground`` it is served in this process until unmounted, and None is returned.

    Raises as ``open_image``, and UsageError (mountpoint not an empty directory, already mounted),
    PermissionDenied (no FUSE access).
    """
    from shoal.mount.daemon import mount as do_mount
    from shoal.mount.state import MountOptions

    return do_mount(ref, os.fspath(mountpoint), options or MountOptions(), _root(store), open_opts=open_options)


def unmount(mountpoint: StrPath, *, lazy: bool = False, timeout: float = 10.0) -> MountState | None:
    """Unmount the shoal mount at ``mountpoint`` and stop its daemon (``lazy``: detach now, the daemon
    exits when the last user leaves).  Returns the state it had (None if only a stale mount was found).

    Raises NotFound (not a shoal mount), UsageError (busy; ``MountBusy``).
    """
    from shoal.mount.control import umount

    return umount(os.fspath(mountpoint), lazy=lazy, timeout=timeout)
