"""store.collector_paused: no cyclic collection inside, nested and across threads; the collector comes
back on only if it was on, when the last one leaves."""

from __future__ import annotations

import gc
import threading

from shoal.store import collector_paused


def test_nested_and_threaded_pauses_restore_the_collector() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
        t.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread is still inside
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_by_the_caller_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freeze_keeps_what_was_made_inside_out_of_the_next_collection() -> None:
    """A mount's index (``load_index(freeze=True)``, ``shoal mount|run``): frozen as the collector comes
    back, so its first collection does not walk it; frozen once, by the last to leave."""

    def collectable(obj: object) -> bool:  # in a generation the collector walks (not frozen)
        return any(o is obj for o in gc.get_objects())

    try:
        with collector_paused(freeze=True):
            with collector_paused():
                made = [[i] for i in range(20_000)]  # tracked and young, as a decoded index
            assert collectable(made)  # not yet: the outer one is still inside
        assert gc.isenabled() and not collectable(made) and not collectable(made[-1])
        with collector_paused():
            later = [[1]]
        assert collectable(later)  # freezing was asked once
    finally:
        gc.unfreeze()
