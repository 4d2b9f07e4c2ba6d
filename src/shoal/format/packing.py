"""Content-defined frame and pack boundaries (docs/spec/format.md §5).

New chunks, in canonical order, are grouped into zstd frames, and frames into
pack blobs.  Both cuts are decided by the content alone (chunk ids and
lengths), so an edit moves at most the frame and pack around it and two builds
of similar trees share most packs byte for byte.
"""

from __future__ import annotations

__all__ = [
    "FRAME_MIN", "FRAME_SPAN", "FRAME_MAX", "PACK_MIN", "PACK_SPAN", "PACK_MAX",
    "ZSTD_LEVEL", "frame_full", "frame_ends_after", "pack_full", "pack_ends_after",
]

KiB = 1024
MiB = 1024 * KiB

# §5.1 frames (uncompressed bytes)
FRAME_MIN = 192 * KiB
FRAME_SPAN = 320 * KiB
FRAME_MAX = 1 * MiB
# §5.2 packs (uncompressed bytes of their frames)
PACK_MIN = 512 * KiB
PACK_SPAN = 1536 * KiB
PACK_MAX = 8 * MiB
# §5.3
ZSTD_LEVEL = 3

_TWO32 = 1 << 32


def frame_full(frame_len: int, chunk_len: int) -> bool:
    """True if a chunk of ``chunk_len`` must start a new frame (the current one would pass FRAME_MAX)."""
    return frame_len > 0 and frame_len + chunk_len > FRAME_MAX


def frame_ends_after(chunk_id: bytes, chunk_len: int, frame_len: int) -> bool:
    """True if the frame ends after this chunk; ``frame_len`` includes it."""
    if frame_len < FRAME_MIN:
        return False
    return int.from_bytes(chunk_id[0:4], "big") * FRAME_SPAN < chunk_len * _TWO32


def pack_full(pack_len: int, frame_ulen: int) -> bool:
    """True if a frame of ``frame_ulen`` must start a new pack."""
    return pack_len > 0 and pack_len + frame_ulen > PACK_MAX


def pack_ends_after(last_chunk_id: bytes, frame_ulen: int, pack_len: int) -> bool:
    """True if the pack ends after this frame; ``pack_len`` includes it."""
    if pack_len < PACK_MIN:
        return False
    return int.from_bytes(last_chunk_id[4:8], "big") * PACK_SPAN < frame_ulen * _TWO32
