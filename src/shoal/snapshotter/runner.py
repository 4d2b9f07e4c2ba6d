"""How the snapshotter runs ``shoal ARGS`` (a lazy mount, an unmount): a fresh interpreter per call
(:class:`SubprocessRunner`), or a child of the fork server (``shoal.cli.forkserver``, the default
of ``shoal snapshotter``), which saves each mount the interpreter's start-up and imports.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

__all__ = ["Runner", "SubprocessRunner", "timed_out"]


def timed_out(args: Sequence[str], timeout: float) -> str:
    """The standard error of a call that ran out of time (exit code 124, as timeout(1))."""
    return f"shoal {args[0] if args else ''} did not finish within {timeout:.0f} s"


class Runner:
    """Runs ``shoal ARGS`` and returns (exit code, standard error); 124 when it ran out of time."""

    def run(self, args: Sequence[str], timeout: float) -> tuple[int, str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runner holds."""


class SubprocessRunner(Runner):
    """A fresh interpreter per call."""

    def __init__(self, prefix: Sequence[str] | None = None) -> None:
        self.prefix = list(prefix or [sys.executable, "-c", "import sys; from shoal.cli import main; sys.exit(main())"])

    def run(self, args: Sequence[str], timeout: float) -> tuple[int, str]:
        try:
            p = subprocess.run([*self.prefix, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, timed_out(args, timeout)
        return p.returncode, p.stderr
