"""Content-defined frame and pack boundaries (docs/spec/format.md §5).

New chunks, in canonical order, are grouped into zstd frames, and frames into
pack blobs.  Both cuts are decided by the content alone (chunk ids and
lengths), so an edit moves at most the frame and pack around it and two builds
of similar trees share most packs byte for byte.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Iterable

import zstandard

from shoal.errors import IntegrityError
from shoal.format.model import Frame, Index

__all__ = [
    "FRAME_MIN", "FRAME_SPAN", "FRAME_MAX", "PACK_MIN", "PACK_SPAN", "PACK_MAX",
    "SMALL_FILE", "SMALL_FRAME_MIN", "SMALL_FRAME_SPAN", "OWN_FILE", "ZSTD_LEVEL", "FRAME_LEVELS",
    "decompress_frame", "open_frame", "verify_frame", "chunk_ok", "bad_chunk",
    "frame_full", "frame_ends_after", "small_file", "own_frames", "pack_full", "pack_ends_after",
]

KiB = 1024
MiB = 1024 * KiB

# §5.1 frames (uncompressed bytes)
FRAME_MIN = 192 * KiB
FRAME_SPAN = 320 * KiB
FRAME_MAX = 1 * MiB
# §5.1 small-file frames: the chunks of files smaller than SMALL_FILE go to frames of their own, cut finer
SMALL_FILE = 32 * KiB
SMALL_FRAME_MIN = 64 * KiB
SMALL_FRAME_SPAN = 64 * KiB
# §5.1 own frames: a file of at least OWN_FILE bytes shares no frame with another file
OWN_FILE = 256 * KiB
# §5.2 packs (uncompressed bytes of their frames)
PACK_MIN = 512 * KiB
PACK_SPAN = 1536 * KiB
PACK_MAX = 8 * MiB
# §5.3
ZSTD_LEVEL = 5
# every level a builder of this format has used, newest first: a pack rebuilt from its chunks
# (transports/local.py) takes, frame by frame, the first whose output has the index's length
FRAME_LEVELS = (5, 3)

_TWO32 = 1 << 32


def frame_full(frame_len: int, chunk_len: int) -> bool:
    """True if a chunk of ``chunk_len`` must start a new frame (the current one would pass FRAME_MAX)."""
    return frame_len > 0 and frame_len + chunk_len > FRAME_MAX


def frame_ends_after(chunk_id: bytes, chunk_len: int, frame_len: int, small: bool = False) -> bool:
    """True if the frame ends after this chunk; ``frame_len`` includes it.  ``small``: a small-file frame."""
    if frame_len < (SMALL_FRAME_MIN if small else FRAME_MIN):
        return False
    return int.from_bytes(chunk_id[0:4], "big") * (SMALL_FRAME_SPAN if small else FRAME_SPAN) < chunk_len * _TWO32


def small_file(size: int) -> bool:
    """True if the chunks of a file of ``size`` bytes (as the index records it) go to small-file frames."""
    return size < SMALL_FILE


def own_frames(size: int) -> bool:
    """True if the new chunks of a file of ``size`` bytes (as the index records it) share no frame with
    another file's: a lazy read of it fetches none of its neighbours' bytes (format.md §5.1)."""
    return size >= OWN_FILE


def pack_full(pack_len: int, frame_ulen: int) -> bool:
    """True if a frame of ``frame_ulen`` must start a new pack."""
    return pack_len > 0 and pack_len + frame_ulen > PACK_MAX


def pack_ends_after(last_chunk_id: bytes, frame_ulen: int, pack_len: int) -> bool:
    """True if the pack ends after this frame; ``pack_len`` includes it."""
    if pack_len < PACK_MIN:
        return False
    return int.from_bytes(last_chunk_id[4:8], "big") * PACK_SPAN < frame_ulen * _TWO32


# §4.6 frames: readers decompress with the declared length as a hard bound
_tls = threading.local()
_MAX_WINDOW = 1 << 24  # a frame holds at most FRAME_MAX bytes; no honest frame needs a larger window


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    return d


def decompress_frame(data: bytes | memoryview, ulen: int, where: str) -> bytes:
    """Decompress one frame that the index says holds exactly ``ulen`` bytes.

    python-zstandard trusts a content size declared in the frame header over ``max_output_size``,
    so the header is read first: a frame that declares any other length is refused before a byte
    is allocated for it (a 32 KB frame may declare 1 GiB).  Every reader (cat, unpack, the mount,
    pull, fsck) goes through here, so they all apply the same checks.
    """
    if not 0 < ulen <= FRAME_MAX:
        raise IntegrityError(f"corrupt frame at {where}: declared length {ulen} out of range")
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"corrupt frame at {where}: {exc}") from None
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared != ulen:
        raise IntegrityError(f"corrupt frame at {where}: header declares {declared} bytes, index says {ulen}")
    try:
        out = _dctx().decompress(data, max_output_size=ulen, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"corrupt frame at {where}: {exc}") from None
    if len(out) != ulen:
        raise IntegrityError(f"corrupt frame at {where}: {len(out)} bytes instead of {ulen}")
    return out


def open_frame(raw: bytes | memoryview, f: Frame, where: str) -> bytes:
    """Frame ``f`` decompressed from its compressed bytes ``raw``: exactly ``f.clen`` bytes in (a frame
    record that runs past the end of its pack is refused), exactly ``f.ulen`` out (``decompress_frame``)."""
    if len(raw) != f.clen:
        raise IntegrityError(f"corrupt frame at {where}: {len(raw)} compressed bytes where the index says {f.clen} "
                             "(the frame runs past the end of its pack?)")
    return decompress_frame(raw, f.ulen, where)


def chunk_ok(data: bytes | memoryview, off: int, length: int, cid: bytes) -> bool:
    """True if bytes ``[off, off+length)`` of the decompressed frame ``data`` lie inside it and hash to ``cid``."""
    if off < 0 or length < 0 or off + length > len(data):
        return False
    return hashlib.sha256(memoryview(data)[off : off + length]).digest() == cid


def bad_chunk(idx: Index, data: bytes, chunks: Iterable[int]) -> int | None:
    """The first of ``chunks`` (indices into ``idx``) whose bytes in the decompressed frame ``data`` do
    not hash to its id, or None: the check every path makes before it serves, stores or catalogues."""
    for ci in chunks:
        if not chunk_ok(data, idx.chunk_offsets[ci], idx.chunk_lengths[ci], idx.chunk_ids[ci]):
            return ci
    return None


def verify_frame(idx: Index, fi: int, raw: bytes | memoryview, where: str,
                 chunks: Iterable[int] | None = None) -> tuple[bytes, int | None]:
    """The one frame check (pull, lazy mount, store registration, fsck; the Reader makes the same two
    steps, hashing each chunk as it is first read): frame ``fi`` of ``idx`` opened from ``raw``
    (``open_frame``: IntegrityError if the frame itself is corrupt) and the first of ``chunks``
    (default: every chunk the index places in it) that does not hash to its id, or None."""
    data = open_frame(raw, idx.frames[fi], where)
    return data, bad_chunk(idx, data, idx.frame_chunks(fi) if chunks is None else chunks)
