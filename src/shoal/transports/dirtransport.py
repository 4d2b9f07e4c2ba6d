"""``dir:PATH`` -- skopeo's directory format (containers/image ``directory/``; docs/transports.md).

Layout::

    PATH/version                     "Directory Transport Version: 1.1\\n"
    PATH/manifest.json               the top manifest or index (its media type is guessed, never stored)
    PATH/<hex>.manifest.json         a child manifest of an index, by digest
    PATH/<hex>                       a blob, named by its sha256 hex without the "sha256:" prefix

PATH may contain ``:`` (the whole details string is the path).  As in skopeo, a destination refuses
a non-empty directory that has no matching ``version`` file, and the directory ends up holding only
the new image.  Unlike skopeo (which empties the directory when the destination is opened), the old
image stays intact until ``commit()``: blobs are added beside it, ``manifest.json`` is replaced
atomically, and only then are files the new image does not use removed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import FormatError, NotFound, UsageError, from_oserror
from shoal.transports.base import ImageReference, SystemContext, Transport, register
from shoal.transports.oci_layout import (
    BlobFileDestination,
    BlobFileSource,
    guess_media_type,
    manifest_children,
    read_small,
    safe_hex,
    write_atomic,
)

__all__ = ["DirTransport", "DirReference", "DirSource", "DirDestination", "VERSION", "TRANSPORT"]

log = logging.getLogger(__name__)

VERSION = b"Directory Transport Version: 1.1\n"
# files a dir: image consists of; anything else in the directory is left alone
_OURS = re.compile(r"[0-9a-f]{64}(?:\.manifest\.json|\.signature-[0-9]+)?|manifest\.json|signature-[0-9]+")


class DirTransport(Transport):
    name = "dir"

    def parse(self, details: str) -> "DirReference":
        if not details:
            raise UsageError("invalid reference dir: : the path is empty")
        return DirReference(details)


TRANSPORT = register(DirTransport())


@dataclass(frozen=True)
class DirReference(ImageReference):
    path: str
    transport = TRANSPORT

    def details(self) -> str:
        return self.path

    def new_source(self, ctx: SystemContext | None = None) -> "DirSource":
        return DirSource(Path(self.path))

    def new_destination(self, ctx: SystemContext | None = None) -> "DirDestination":
        return DirDestination(Path(self.path))


def _manifest_path(root: Path, digest: str | None) -> Path:
    return root / ("manifest.json" if digest is None else f"{safe_hex(digest)}.manifest.json")


class DirSource(BlobFileSource):
    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / "manifest.json").exists():
            raise NotFound(f"no dir: image at {root} (manifest.json is missing)")

    def blob_path(self, digest: str) -> Path:
        return self.root / safe_hex(digest)

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        raw = self.read_manifest_file(_manifest_path(self.root, digest), digest)
        return raw, guess_media_type(raw)


class DirDestination(BlobFileDestination):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root
        self._top: bytes | None = None
        self._children: dict[str, bytes] = {}
        try:
            if root.exists() and any(root.iterdir()):
                try:
                    version = read_small(root / "version", "version file", 4096)
                except NotFound:
                    version = b""
                if version != VERSION:
                    raise UsageError(f"{root} is not empty and not a dir: image; refusing to overwrite it")
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_oserror(exc, f"cannot use {root} as a dir: destination", "", store=True) from None
        if not (root / "version").exists():
            write_atomic(root / "version", VERSION)

    def blob_path(self, digest: str) -> Path:
        return self.root / safe_hex(digest)

    def put_manifest(self, raw: bytes, media_type: str, digest: str | None = None) -> None:
        if digest is None:
            self._top = raw
            return
        self.put_bytes(raw, digest, _manifest_path(self.root, digest))
        self._children[digest] = raw

    def commit(self) -> None:
        if self._top is None:
            raise UsageError(f"dir:{self.root}: commit() before put_manifest()")
        write_atomic(self.root / "manifest.json", self._top)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Delete what the previous image left: files of ours that the new image does not use."""
        keep = {"manifest.json", "version"}
        todo = [self._top or b""]
        seen: set[str] = set()
        while todo:
            for d in manifest_children(todo.pop()):
                if d in seen:
                    continue
                seen.add(d)
                with contextlib.suppress(FormatError):
                    keep.add(safe_hex(d))
                if d in self._children:
                    keep.add(f"{safe_hex(d)}.manifest.json")
                    todo.append(self._children[d])
        for p in self.root.iterdir():
            if p.name not in keep and _OURS.fullmatch(p.name) and p.is_file():
                log.debug("dir:%s: removing %s, left by the previous image", self.root, p.name)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
