"""No fork while a thread holds a store flock (docs/spec/store.md §3).

An flock belongs to an open file description, and ``os.fork`` copies the descriptor: a child
forked while another thread holds the lock on a partial pack or on the catalogue's lock file keeps
that lock for as long as it lives, and blocks forever the first time it asks for the same lock
itself (its own ``open`` is a new description).  The mount daemon is such a child, and a lazy
source's worker threads store frames under those locks.

``held()`` wraps each short section that opens, flocks and closes such a file; ``os.fork`` waits
(through ``os.register_at_fork``) until no thread is inside one, and no thread enters one until
the fork is done.  ``subprocess`` does not run these hooks, and its child execs at once.  A thread
inside a section must not fork.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["held"]


class _Gate:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.inside = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self.cond:  # a fork in progress holds the condition's lock: wait for it
            self.inside += 1
        try:
            yield
        finally:
            with self.cond:
                self.inside -= 1
                if not self.inside:
                    self.cond.notify_all()

    def before_fork(self) -> None:
        self.cond.acquire()
        self.cond.wait_for(lambda: self.inside == 0)  # keeps the lock: nobody enters until after the fork

    def after_fork_parent(self) -> None:
        self.cond.release()

    def after_fork_child(self) -> None:
        self._reset()  # the child has none of the other threads, and none of their sections


_GATE = _Gate()
os.register_at_fork(before=_GATE.before_fork, after_in_parent=_GATE.after_fork_parent,
                    after_in_child=_GATE.after_fork_child)


def held() -> contextlib.AbstractContextManager[None]:
    """Hold around opening, flocking and closing a store lock file: no fork happens in between."""
    return _GATE.held()
