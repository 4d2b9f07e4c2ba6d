"""The one engine that moves images between any two transports (docs/transports.md).

- Blobs first, manifests after them, the top manifest last, then ``commit()``.
- A blob the destination already has (or can mount from the source repository) is never sent.
- Every byte is verified against its descriptor's digest and size while it streams.
- A Shoal image pulled into the local store takes the chunk-level path (``pull.py``): only the
  frames holding chunks the store lacks are fetched, with HTTP range reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, UsageError
from shoal.format.manifest import json_object
from shoal.format.platform import Platform, select
from shoal.progress import NULL, Sink
from shoal.transports.base import BlobInfo, ImageDestination, ImageReference, ImageSource

__all__ = ["CopyOptions", "CopyResult", "copy", "DigestingReader", "descriptors_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyOptions:
    concurrency: int = 8
    platform: str | None = None  # os/arch[/variant]: copy only that child of an index
    src_opts: dict[str, object] = field(default_factory=dict)
    dst_opts: dict[str, object] = field(default_factory=dict)


@dataclass
class CopyResult:
    digest: str = ""
    media_type: str = ""
    blobs_sent: int = 0
    blobs_skipped: int = 0
    bytes_sent: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0


class DigestingReader:
    """Wraps a stream; raises IntegrityError at EOF if the bytes do not match digest and size."""

    def __init__(self, stream: BinaryIO, info: BlobInfo) -> None:
        self.stream = stream
        self.info = info
        self.h = hashlib.sha256()
        self.n = 0
        self.done = False

    def read(self, size: int = -1) -> bytes:
        b = self.stream.read(size)
        if b:
            self.n += len(b)
            if self.info.size >= 0 and self.n > self.info.size:
                raise IntegrityError(f"blob {self.info.digest} is longer than its declared {self.info.size} bytes")
            self.h.update(b)
        elif not self.done:
            self.done = True
            if self.info.size >= 0 and self.n != self.info.size:
                raise IntegrityError(f"blob {self.info.digest} is truncated: {self.n} of {self.info.size} bytes")
            got = "sha256:" + self.h.hexdigest()
            if got != self.info.digest:
                raise IntegrityError(f"digest mismatch for blob {self.info.digest}: got {got}")
        return b

    def close(self) -> None:
        self.stream.close()


def descriptors_of(raw: bytes) -> list[BlobInfo]:
    """Config and layer blobs of an OCI or Docker schema 2 image manifest."""
    doc = json_object(raw, "manifest")
    if doc.get("schemaVersion") != 2:
        raise FormatError("only schemaVersion 2 manifests are supported")
    layers = doc.get("layers") or []
    if not isinstance(layers, list):
        raise FormatError("manifest layers must be a list")
    out = []
    for d in [doc.get("config")] + layers:
        size = d.get("size") if isinstance(d, dict) else None
        if (not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(size, int)
                or isinstance(size, bool) or size < 0):
            raise FormatError("manifest descriptor needs digest and a non-negative size")
        out.append(BlobInfo(dg.validate(d["digest"]), d["size"], str(d.get("mediaType", ""))))
    return out


def host_platform() -> str:
    return str(Platform.host())


def _children(raw: bytes, platform: str | None) -> list[tuple[str, str]]:
    doc = json_object(raw, "image index")
    entries = doc.get("manifests")
    if not isinstance(entries, list) or len(select(entries, None)) != len(entries):
        raise FormatError("image index has a malformed manifests list")  # copying it would dangle
    out = [(str(m["digest"]), str(m.get("mediaType", mt.OCI_MANIFEST))) for m in select(doc.get("manifests"), platform)]
    if platform and not out:
        raise UsageError(f"no manifest for platform {platform} in the image index")
    return out


class _Copier:
    def __init__(self, src_ref: ImageReference, src: ImageSource, dst: ImageDestination, opts: CopyOptions,
                 sink: Sink) -> None:
        self.src_ref = src_ref
        self.src = src
        self.dst = dst
        self.opts = opts
        self.sink = sink
        self.result = CopyResult()

    def blob(self, info: BlobInfo) -> None:
        if self.dst.try_reuse_blob(info, self.src_ref):
            self.result.blobs_skipped += 1
            return
        stream, _ = self.src.get_blob(info)
        reader = DigestingReader(stream, info)
        try:
            self.dst.put_blob(reader, info)  # type: ignore[arg-type]
            while reader.read(1 << 20):  # a destination that stopped early still gets the stream verified
                pass
        finally:
            reader.close()
        self.result.blobs_sent += 1
        self.result.bytes_sent += reader.n
        self.sink.advance("copy", reader.n)

    def manifest(self, raw: bytes, media: str, digest: str | None) -> None:
        blobs = descriptors_of(raw)
        with ThreadPoolExecutor(max(1, self.opts.concurrency), thread_name_prefix="shoal-copy") as pool:
            list(pool.map(self.blob, blobs))
        self.dst.put_manifest(raw, media, digest)

    def run(self) -> CopyResult:
        raw, media = self.src.get_manifest()
        top = "sha256:" + hashlib.sha256(raw).hexdigest()
        doc = json_object(raw, "manifest")
        media = media or str(doc.get("mediaType", ""))
        if media in mt.INDEX_TYPES or (not media and "manifests" in doc):
            platform = self.opts.platform
            if platform is None and not self.dst.supports_index:
                platform = host_platform()  # like skopeo: a single-image format gets this machine's image
            kids = _children(raw, platform)
            if platform:
                (d, m), = kids[:1]
                craw, cmedia = self.src.get_manifest(d)
                self._check(craw, d)
                self.manifest(craw, cmedia or m, None)
                top = d
            else:
                for d, m in kids:
                    craw, cmedia = self.src.get_manifest(d)
                    self._check(craw, d)
                    self.manifest(craw, cmedia or m, d)
                self.dst.put_manifest(raw, media, None)
        else:
            self.manifest(raw, media, None)
        self.dst.commit()
        self.result.digest = top
        self.result.media_type = media
        return self.result

    @staticmethod
    def _check(raw: bytes, digest: str) -> None:
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise IntegrityError(f"manifest {digest} does not match its digest")


def copy(src_ref: ImageReference, dst_ref: ImageReference, opts: CopyOptions | None = None,
         sink: Sink = NULL) -> CopyResult:
    """Copy an image from ``src_ref`` to ``dst_ref``; see the module docstring for the guarantees."""
    opts = opts or CopyOptions()
    t0 = time.monotonic()
    with src_ref.new_source(**opts.src_opts) as src:
        from shoal.transports.local import LocalDestination

        with dst_ref.new_destination(**opts.dst_opts) as dst:
            raw, media = src.get_manifest()
            if isinstance(dst, LocalDestination) and _is_shoal(raw):
                from shoal.pull import pull_into_store

                result = pull_into_store(src, raw, dst, opts, sink)
            else:
                sink.start("copy", None)  # a pull reports its own task, "pull", with a known total
                try:
                    result = _Copier(src_ref, src, dst, opts, sink).run()
                finally:
                    sink.finish("copy")
            _account(result, src, dst)
    result.seconds = time.monotonic() - t0
    return result


def _account(result: CopyResult, src: ImageSource, dst: ImageDestination) -> None:
    """Wire figures from transports that keep ``stats`` (requests, retries, bytes_fetched, bytes_sent).

    ``requests`` and ``retries`` are sums over source and destination.  Where a side keeps stats, its wire count
    replaces the payload count (it includes manifests, retries and any full-blob fallback).
    """
    s_stats, d_stats = getattr(src, "stats", None), getattr(dst, "stats", None)
    result.requests = sum(int(getattr(st, "requests", 0)) for st in (s_stats, d_stats) if st is not None)
    result.retries = sum(int(getattr(st, "retries", 0)) for st in (s_stats, d_stats) if st is not None)
    if s_stats is not None:
        result.bytes_fetched = int(getattr(s_stats, "bytes_fetched", 0))
    elif result.bytes_fetched == 0:
        result.bytes_fetched = result.bytes_sent  # a local source: what was read is what was moved
    if d_stats is not None:
        result.bytes_sent = int(getattr(d_stats, "bytes_sent", 0))


def _is_shoal(raw: bytes) -> bool:
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("artifactType") == mt.ARTIFACT_TYPE
