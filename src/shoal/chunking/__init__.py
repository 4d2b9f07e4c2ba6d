"""Content-defined chunking (docs/spec/chunking.md).

Shoal cuts every regular file on its own with FastCDC 2020 (the variant of
fastcdc-rs ``v2020``), min/avg/max 16/64/256 KiB, normalization level 1, and
the gear table of the FastCDC reference code (seed 0).  Golden vectors in
tests/golden pin the cut points forever; changing anything here is a new
format version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pyfastcdc import FastCDC

__all__ = ["ChunkParams", "PARAMS_V1", "Chunker", "get_chunker"]


@dataclass(frozen=True)
class ChunkParams:
    min_size: int
    avg_size: int
    max_size: int
    normalization: int


# docs/spec/chunking.md, the parameter table
PARAMS_V1 = ChunkParams(min_size=16 * 1024, avg_size=64 * 1024, max_size=256 * 1024, normalization=1)


class Chunker:
    """Cuts buffers into (offset, length) pieces.  One instance per thread."""

    def __init__(self, params: ChunkParams = PARAMS_V1) -> None:
        self.params = params
        self._cdc = FastCDC(
            avg_size=params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
            seed=0,
        )

    def cut(self, buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of each chunk of ``buf``; an empty buffer has no chunks."""
        if len(buf) == 0:
            return
        for c in self._cdc.cut_buf(buf):
            yield c.offset, c.length


def get_chunker(params: ChunkParams = PARAMS_V1) -> Chunker:
    return Chunker(params)
