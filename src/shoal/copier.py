"""The one engine that moves images between any two transports (docs/transports.md).

- Blobs first, manifests after them, the top manifest last, then ``commit()``.
- A blob the destination already has (or can mount from the source repository) is never sent.
- Every byte is verified against its descriptor's digest and size while it streams.
- A Shoal image copied to a destination that offers ``partial_pull()`` (the local store: ``pull.py``)
  takes that chunk-level path: only the frames holding chunks the destination lacks are fetched, with
  HTTP range reads; then ``commit()`` as for any copy.  So does each Shoal image of an image index
  (one after the other, so each finds the chunks the ones before it brought).
- To a destination that wants it (a registry), a Shoal image is tagged as an image index that lists, per
  platform, its runtime view and then the Shoal manifest (docs/spec/oci-mapping.md §4); an index that
  already lists a view of an image gets no second one.  To any other destination such an index goes
  without its views: the Shoal manifest itself (one image, so a pull takes the chunk-level path) or the
  Shoal image index it was made from.
- After ``commit()``, what the source keeps beside each manifest copied (the source's top, the manifest or
  index written, each child) follows it (docs/spec/trust.md §6): cosign signatures (``signatures``; off:
  skopeo's ``--remove-signatures``) and the other OCI referrers, SBOMs and profiles (``referrers``), each
  manifest and blob verified as any.  A signature that cannot be read or written fails the copy (as
  skopeo); another referrer is logged and left behind.  A destination that keeps no referrers (dir:,
  docker-archive:, oci-archive:) gets none, and the source is not asked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, cast

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound, ShoalError
from shoal.format.manifest import canonical_json, json_loads, json_object
from shoal.format.platform import Platform, choose, select
from shoal.format.runtime_view import (
    ANN_VIEW_OF,
    RuntimeView,
    for_readers,
    index_of,
    is_view_entry,
    registry_index,
    runtime_index,
    runtime_view,
    view_of,
)
from shoal.progress import NULL, Sink
from shoal.transports.base import BlobInfo, ImageDestination, ImageReference, ImageSource, PartialPull, Referrer
from shoal.transports.context import SystemContext, as_context
from shoal.unpack import UnpackRequest, UnpackResult

__all__ = ["CopyOptions", "CopyResult", "copy", "DigestingReader", "descriptors_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyOptions:
    concurrency: int = 8
    platform: str | None = None  # os/arch[/variant]: copy only that image of an index (``choose``); None: all
    # how to reach each side; a mapping of SystemContext field names is accepted (unknown keys refused)
    src_opts: SystemContext | Mapping[str, object] = SystemContext()
    dst_opts: SystemContext | Mapping[str, object] = SystemContext()
    # a registry destination: tag a Shoal image as an index with its runtime view (oci-mapping.md §4)
    runtime_view: bool = True
    # carry the source's cosign signatures of each copied manifest (False: skopeo's --remove-signatures)
    signatures: bool = True
    # carry the other referrers: SBOMs, start-up profiles, any OCI referrer (False: --no-referrers)
    referrers: bool = True
    # a Shoal image pulled through the destination's chunk-level path is also unpacked there, while it is
    # pulled (``shoal pull --unpack``); ``CopyResult.unpacked`` None: it was not (the caller unpacks after)
    unpack: UnpackRequest | None = None


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
    signatures: int = 0  # signature manifests carried (trust.md §6)
    referrers: int = 0  # other referrers carried (SBOMs, profiles)
    unpacked: UnpackResult | None = None  # CopyOptions.unpack, done beside the pull


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


def _children(raw: bytes) -> list[tuple[str, str]]:
    """(digest, media type) of every entry of an image index."""
    doc = json_object(raw, "image index")
    entries = doc.get("manifests")
    if not isinstance(entries, list) or len(select(entries, None)) != len(entries):
        raise FormatError("image index has a malformed manifests list")  # copying it would dangle
    return [(str(m["digest"]), str(m.get("mediaType", mt.OCI_MANIFEST))) for m in entries]


def _is_index(raw: bytes, media: str) -> bool:
    return media in mt.INDEX_TYPES or (not media and "manifests" in json_object(raw, "manifest"))


def _one_platform(src_ref: ImageReference, src: ImageSource, raw: bytes, platform: str) -> tuple[bytes, str]:
    """The image of the index ``raw`` for ``platform`` by the one rule (``choose``), verified."""
    kid = choose(for_readers(json_object(raw, "image index").get("manifests")), platform, str(src_ref),
                 prefer=lambda m: m.get("artifactType") == mt.ARTIFACT_TYPE)
    d = str(kid["digest"])
    craw, cmedia = src.get_manifest(d)
    _Copier.check(craw, d)
    return craw, cmedia or str(kid.get("mediaType", mt.OCI_MANIFEST))


class _Copier:
    def __init__(self, src_ref: ImageReference, src: ImageSource, dst: ImageDestination, opts: CopyOptions,
                 sink: Sink) -> None:
        self.src_ref = src_ref
        self.src = src
        self.dst = dst
        self.opts = opts
        self.sink = sink
        self.result = CopyResult()
        self.views: dict[str, RuntimeView] = {}  # by view manifest digest: children made here, not in src
        self.written: dict[str, dict[str, object]] = {}  # descriptors of the manifests put, by digest
        self.partial: PartialPull | None = None  # the destination's chunk-level path, for Shoal children

    def blob(self, info: BlobInfo) -> None:
        if self.dst.try_reuse_blob(info, self.src_ref):
            self.result.blobs_skipped += 1
            return
        stream, _ = self.src.get_blob(info)
        reader = DigestingReader(stream, info)
        try:
            self.dst.put_blob(cast(BinaryIO, reader), info)  # it has what destinations use: read() and close()
            while reader.read(1 << 20):  # a destination that stopped early still gets the stream verified
                pass
        finally:
            reader.close()
        self.result.blobs_sent += 1
        self.result.bytes_sent += reader.n
        self.sink.advance("copy", reader.n)

    def blobs(self, raw: bytes) -> None:
        with ThreadPoolExecutor(max(1, self.opts.concurrency), thread_name_prefix="shoal-copy") as pool:
            list(pool.map(self.blob, descriptors_of(raw)))

    def manifest(self, raw: bytes, media: str, digest: str | None) -> None:
        self.blobs(raw)
        self.dst.put_manifest(raw, media, digest)

    def run(self, raw: bytes, media: str) -> CopyResult:
        """Copy the manifest or image index ``raw`` (every platform of an index) and commit."""
        top = "sha256:" + hashlib.sha256(raw).hexdigest()
        media = media or str(json_object(raw, "manifest").get("mediaType", ""))
        if _is_index(raw, media):
            kids: list[tuple[bytes, str, str]] = []
            for d, m in _children(raw):
                if d in self.views:
                    kids.append((self.views[d].manifest, mt.OCI_MANIFEST, d))
                    continue
                craw, cmedia = self.src.get_manifest(d)
                self.check(craw, d)
                kids.append((craw, cmedia or m, d))
            pulled: set[str] = set()
            for craw, _, d in kids:  # every blob first, then the children, the index last
                if d in self.views:
                    self.view_blobs(self.views[d])
                elif self.partial is not None and _is_shoal(craw):
                    self.pull_child(self.partial, craw, d)  # puts the child itself
                    pulled.add(d)
                else:
                    self.blobs(craw)
            for craw, cmedia, d in kids:
                if d not in pulled:
                    self.dst.put_manifest(craw, cmedia, d)
                self.written[d] = _descriptor(craw, cmedia)
            self.dst.put_manifest(raw, media, None)
        else:
            self.manifest(raw, media, None)
        self.dst.commit()
        self.written[top] = _descriptor(raw, media)
        self.result.digest = top
        self.result.media_type = media
        return self.result

    def pull_child(self, partial: PartialPull, raw: bytes, digest: str) -> None:
        """A Shoal image of an index through the destination's chunk-level path, as a lone one goes."""
        got = partial.pull(self.src, raw, self.opts.concurrency, self.sink, digest)
        self.result.bytes_fetched += got.bytes_fetched
        self.result.chunks_fetched += got.chunks_fetched
        self.result.blobs_skipped += got.blobs_skipped

    def view_blobs(self, view: RuntimeView) -> None:
        """The config and stub blobs of a runtime view made by this copy."""
        for digest, data in view.blobs().items():
            info = BlobInfo(digest, len(data), "")
            if self.dst.try_reuse_blob(info, None):
                self.result.blobs_skipped += 1
                continue
            self.dst.put_blob(io.BytesIO(data), info)
            self.result.blobs_sent += 1
            self.result.bytes_sent += len(data)

    @staticmethod
    def check(raw: bytes, digest: str) -> None:
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise IntegrityError(f"manifest {digest} does not match its digest")


def copy(src_ref: ImageReference, dst_ref: ImageReference, opts: CopyOptions | None = None,
         sink: Sink = NULL) -> CopyResult:
    """Copy an image from ``src_ref`` to ``dst_ref``; see the module docstring for the guarantees."""
    opts = opts or CopyOptions()
    t0 = time.monotonic()
    with src_ref.new_source(as_context(opts.src_opts)) as src:
        with dst_ref.new_destination(as_context(opts.dst_opts)) as dst:
            raw, media = src.get_manifest()
            top, top_media = raw, media or str(json_object(raw, "manifest").get("mediaType") or mt.OCI_MANIFEST)
            if _is_index(raw, media):
                platform = opts.platform
                if platform is None and not dst.supports_index:
                    platform = str(Platform.host())  # like skopeo: a one-image format gets this machine's image
                if platform is not None:
                    raw, media = _one_platform(src_ref, src, raw, platform)
            views_wanted = dst.runtime_view and opts.runtime_view
            if not views_wanted:
                raw, media = _without_views(src_ref, src, raw, media)
            if dst.enforces_policy:  # a pull: refused here, before anything is written (trust.md §4)
                from shoal.trust.image import admit

                admit(src_ref, as_context(opts.src_opts), top, raw if raw is not top else None)
            # whose referrers follow: the source's top (also when it is not what is written), what is written
            # and each manifest the source's index lists (a runtime view left out here comes back at a push)
            subjects = {_dg_of(top): _descriptor(top, top_media)}
            if _is_index(top, top_media):
                for e in json_object(top, "image index").get("manifests") or []:
                    if isinstance(e, dict) and isinstance(e.get("digest"), str) and isinstance(e.get("size"), int):
                        subjects[dg.validate(e["digest"])] = {"mediaType": str(e.get("mediaType") or mt.OCI_MANIFEST),
                                                             "digest": e["digest"], "size": e["size"]}
            subjects[_dg_of(raw)] = _descriptor(raw, media)
            partial = dst.partial_pull() if _is_shoal(raw) or _is_index(raw, media) else None
            if partial is not None and not _is_index(raw, media):
                result = _partial(partial, src, dst, raw, opts, sink)
            else:
                copier = _Copier(src_ref, src, dst, opts, sink)
                copier.partial = partial
                if views_wanted:
                    raw, media, views = _with_views(src, raw, media)
                    copier.views = {v.digest: v for v in views}
                sink.start("copy", None)  # a pull reports its own task, "pull", with a known total
                try:
                    result = copier.run(raw, media)
                finally:
                    sink.finish("copy")
                subjects.update(copier.written)
            if opts.signatures or opts.referrers:
                _carry(src_ref, src, dst, subjects, opts, result)
            _account(result, src, dst)
    result.seconds = time.monotonic() - t0
    return result


def _dg_of(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _descriptor(raw: bytes, media: str) -> dict[str, object]:
    return {"mediaType": media or mt.OCI_MANIFEST, "digest": _dg_of(raw), "size": len(raw)}


MAX_REFERRER_DEPTH = 2  # a referrer's referrers (a signed SBOM) follow too; theirs no further


def _carry(src_ref: ImageReference, src: ImageSource, dst: ImageDestination, subjects: dict[str, dict[str, object]],
           opts: CopyOptions, result: CopyResult) -> None:
    """Copy the source's referrers of each of ``subjects`` (digest -> descriptor) to the destination, after
    ``commit()``: their blobs first (verified), then ``put_referrer`` (trust.md §6)."""
    if not dst.keeps_referrers:
        log.debug("%s keeps no referrers: signatures and other referrers are not carried", type(dst).__name__)
        return
    copier = _Copier(src_ref, src, dst, opts, NULL)
    todo = [(d, desc, 0) for d, desc in subjects.items()]
    seen = set(subjects)
    while todo:
        batch, todo = todo, []
        with ThreadPoolExecutor(min(len(batch), max(1, opts.concurrency)), thread_name_prefix="shoal-refs") as pool:
            found = list(pool.map(lambda t: src.referrers(t[0]), batch))  # a signature not readable raises here
        for (subject, desc, depth), refs in zip(batch, found):
            _carry_each(copier, dst, subject, desc, depth, refs, opts, result, seen, todo)
    result.blobs_sent += copier.result.blobs_sent
    result.blobs_skipped += copier.result.blobs_skipped
    result.bytes_sent += copier.result.bytes_sent


def _carry_each(copier: "_Copier", dst: ImageDestination, subject: str, desc: dict[str, object], depth: int,
                refs: list[Referrer], opts: CopyOptions, result: CopyResult, seen: set[str],
                todo: list[tuple[str, dict[str, object], int]]) -> None:
    """Carry ``refs``, the source's referrers of ``subject``; a referrer's own go to ``todo``."""
    for ref in refs:
        sig = ref.kind == "signature"
        if not (opts.signatures if sig else opts.referrers):
            continue
        try:
            copier.blobs(ref.manifest)
            dst.put_referrer(ref, desc)
        except ShoalError as exc:
            if sig:
                raise
            log.warning("referrer %s of %s not carried to the destination: %s", ref.digest, subject, exc)
            continue
        if sig:
            result.signatures += 1
        else:
            result.referrers += 1
        log.info("carried %s %s of %s", ref.kind, ref.digest, subject)
        if depth + 1 < MAX_REFERRER_DEPTH and ref.digest not in seen:
            seen.add(ref.digest)
            todo.append((ref.digest, _descriptor(ref.manifest, ref.media_type), depth + 1))


def _partial(partial: PartialPull, src: ImageSource, dst: ImageDestination, raw: bytes, opts: CopyOptions,
             sink: Sink) -> CopyResult:
    """A Shoal image through the destination's chunk-level capability, then ``commit()``."""
    got = partial.pull(src, raw, opts.concurrency, sink, unpack=opts.unpack)  # ends with dst.put_manifest(raw)
    dst.commit()
    return CopyResult(digest="sha256:" + hashlib.sha256(raw).hexdigest(), media_type=mt.OCI_MANIFEST,
                      blobs_skipped=got.blobs_skipped, bytes_fetched=got.bytes_fetched,
                      chunks_fetched=got.chunks_fetched, unpacked=got.unpacked)


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
        doc = json_loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("artifactType") == mt.ARTIFACT_TYPE


def _config(src: ImageSource, raw: bytes) -> bytes:
    """The config blob of the manifest ``raw``, verified against its descriptor."""
    info = descriptors_of(raw)[0]
    if info.size > 4 << 20:
        raise FormatError(f"config {info.digest} is too large ({info.size} bytes)")
    stream, _ = src.get_blob(info)
    reader = DigestingReader(stream, info)
    chunks = []
    try:
        while b := reader.read(1 << 16):  # to EOF: DigestingReader checks size and digest there
            chunks.append(b)
    finally:
        reader.close()
    return b"".join(chunks)


def _with_views(src: ImageSource, raw: bytes, media: str) -> tuple[bytes, str, list[RuntimeView]]:
    """``raw`` as a registry tags it: a Shoal manifest becomes an index [its view, itself]; an index gets
    a view before each Shoal entry that has none yet; anything else is unchanged."""
    doc = json_object(raw, "manifest")
    if not _is_index(raw, media):
        if doc.get("artifactType") != mt.ARTIFACT_TYPE:
            return raw, media, []
        index, view = registry_index(raw, _config(src, raw))
        return index, mt.OCI_INDEX, [view]
    entries = [e for e in doc.get("manifests") or [] if isinstance(e, dict)]
    have = {e["annotations"][ANN_VIEW_OF] for e in entries if is_view_entry(e)}
    views: dict[str, RuntimeView] = {}
    for e in entries:
        d = e.get("digest")
        if e.get("artifactType") == mt.ARTIFACT_TYPE and isinstance(d, str) and d not in have and d not in views:
            craw, _ = src.get_manifest(d)
            _Copier.check(craw, d)
            views[d] = runtime_view(d, _config(src, craw), index_of(craw))
    if not views:
        return raw, media, []
    return runtime_index(doc, views), mt.OCI_INDEX, list(views.values())


def _without_views(src_ref: ImageReference, src: ImageSource, raw: bytes, media: str) -> tuple[bytes, str]:
    """An index ``_with_views`` made, as it was before: the one Shoal manifest it wraps, or the Shoal
    image index (the same bytes when it was canonical); a runtime view alone: its Shoal manifest from the
    same source (NotFound, clearly, if the source lacks it); anything else unchanged."""
    doc = json_object(raw, "manifest")
    if not _is_index(raw, media):
        target = view_of(doc)
        if target is None:
            return raw, media
        try:
            craw, cmedia = src.get_manifest(target)
        except NotFound:
            raise NotFound(f"{src_ref} is the runtime view of the Shoal image {target}, which it does not hold "
                           "(copy the whole image index, e.g. skopeo copy --all)") from None
        _Copier.check(craw, target)
        return craw, cmedia or mt.OCI_MANIFEST
    entries = doc.get("manifests")
    shown = for_readers(entries)
    if shown is entries:
        return raw, media
    if len(shown) == 1 and shown[0].get("artifactType") == mt.ARTIFACT_TYPE:
        d = str(shown[0]["digest"])
        craw, cmedia = src.get_manifest(d)
        _Copier.check(craw, d)
        return craw, cmedia or mt.OCI_MANIFEST
    return canonical_json({**doc, "manifests": shown}), mt.OCI_INDEX
