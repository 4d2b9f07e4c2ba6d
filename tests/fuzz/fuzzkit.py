"""Shared plumbing of the fuzz harnesses (tests/fuzz/, README "Fuzzing").

Two Hypothesis profiles, picked by ``HYPOTHESIS_PROFILE``:

- ``ci`` (the default, what ``make test`` runs): each harness runs its own small ``max_examples``
  (``budget(n)``), derandomized and without an example database, so every run tries the same inputs.
- ``fuzz`` (``make fuzz``): ``SHOAL_FUZZ_EXAMPLES`` examples per harness (default 20000), random
  seeds, failures remembered in ``.hypothesis/`` so a re-run replays them first.

``only_shoal_errors`` is the oracle: the parser may return or raise a ``ShoalError`` subclass;
anything else (IndexError, RecursionError, zstandard.ZstdError, ...) fails the example, and so does
running longer than ``BOUND_SECONDS`` of CPU time (a hang).  The bound is a CPU-time interval timer
(SIGVTALRM), so it neither depends on how loaded the machine is nor collides with pytest-timeout's
SIGALRM.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Callable, Iterator, TypeVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from shoal.errors import ShoalError

T = TypeVar("T")

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "20000"))
BOUND_SECONDS = 5.0 if PROFILE == "ci" else 2.0  # CPU seconds one example may take

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
         HealthCheck.large_base_example]
settings.register_profile("ci", derandomize=True, database=None, deadline=None, suppress_health_check=_SLOW,
                          print_blob=False, phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("fuzz", derandomize=False, deadline=None, suppress_health_check=_SLOW,
                          print_blob=True,
                          database=DirectoryBasedExampleDatabase(
                              os.path.join(os.path.dirname(__file__), "..", "..", ".hypothesis", "fuzz")))
settings.load_profile(PROFILE if PROFILE in ("ci", "fuzz") else "ci")


def budget(ci_examples: int) -> settings:
    """Settings for one harness: ``ci_examples`` examples under ``make test``, many more under ``make fuzz``."""
    return settings(max_examples=ci_examples if PROFILE != "fuzz" else FUZZ_EXAMPLES)


class Hang(AssertionError):
    """An example ran longer than ``BOUND_SECONDS`` of CPU time."""


@contextlib.contextmanager
def bounded(seconds: float = BOUND_SECONDS) -> Iterator[None]:
    """Raise ``Hang`` in the block once it has used ``seconds`` of CPU time."""

    def _fire(signum: int, frame: Any) -> None:
        raise Hang(f"example still running after {seconds} s of CPU time")

    old = signal.signal(signal.SIGVTALRM, _fire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def only_shoal_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)``, or None if it raised a ShoalError; any other exception propagates."""
    with bounded():
        try:
            return fn(*args, **kwargs)
        except ShoalError as exc:
            str(exc)  # the message itself must be renderable (one line, no crash)
            return None
