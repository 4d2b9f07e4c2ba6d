"""Progress events, sent to a sink the caller chooses.  Leaf module: the library never draws.

The CLI passes a rich-backed sink on a TTY and ``NULL`` otherwise.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Sink", "NullSink", "NULL"]


class Sink(Protocol):
    def start(self, task: str, total: int | None, unit: str = "B") -> None:
        """A task begins; ``total`` in ``unit`` if known."""

    def advance(self, task: str, amount: int) -> None:
        """``amount`` more units of ``task`` are done (may be called from worker threads)."""

    def finish(self, task: str) -> None:
        """The task is over."""


class NullSink:
    def start(self, task: str, total: int | None, unit: str = "B") -> None:
        pass

    def advance(self, task: str, amount: int) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


NULL = NullSink()
