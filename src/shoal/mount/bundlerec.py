"""Recording what a profiled workload uses, for its bundle (docs/spec/bundle.md §2.2): the chunks and
files it reads and the directories it lists, in first-use order.  Used by the mount daemon of
``shoal profile`` only (it imports the FUSE adapter's Reader)."""

from __future__ import annotations

import threading

from shoal.format.model import Entry, Index
from shoal.mount.fs import MountReader
from shoal.mount.profile import Recording
from shoal.reader import FrameSource

__all__ = ["ReadRecord", "RecordingReader"]


class ReadRecord:
    """First uses, thread-safe: ``chunk``/``file`` from reads, ``dir`` from the file system's listings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[int, None] = {}
        self._files: dict[int, None] = {}
        self._dirs: dict[int, None] = {}

    def read(self, pos: int, chunks: list[int]) -> None:
        with self._lock:
            self._files.setdefault(pos)
            for ci in chunks:
                self._chunks.setdefault(ci)

    def dir(self, pos: int) -> None:
        with self._lock:
            self._dirs.setdefault(pos)

    def recording(self, frames: list[int]) -> Recording:
        with self._lock:
            return Recording(frames, list(self._chunks), list(self._files), list(self._dirs))


class RecordingReader(MountReader):
    """A MountReader that records the chunks each read of the file system covers (the page-cache push
    must be off while recording: its reads are not the workload's)."""

    def __init__(self, index: Index, source: FrameSource, cache_frames: int, record: ReadRecord) -> None:
        super().__init__(index, source, cache_frames)
        self.record = record

    def read_parts(self, e: Entry, offset: int, size: int) -> list[memoryview]:  # ``read`` too goes through here
        if offset < e.size and size > 0:
            pos = self.index.position(e.path)
            if pos is not None:
                self.record.read(pos, self.chunks_in(e, offset, size))
        return super().read_parts(e, offset, size)
