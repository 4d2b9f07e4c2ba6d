"""What a forked child inherited and must neither use nor close (a leaf: standard library only).

Closing an inherited sqlite connection releases the child's own POSIX locks on the catalogue (and lets
SQLite undo the parent's WAL state), and an inherited HTTP connection is shared with the parent.  A
mount daemon's sources and the catalogue hand such objects here in the child; they stay alive and
untouched until it ends (docs/spec/mount.md §5.3).
"""

from __future__ import annotations

__all__ = ["keep_inherited", "kept"]

_KEPT: list[object] = []


def keep_inherited(obj: object) -> None:
    """Keep ``obj``, inherited across a fork, alive and untouched for this process's lifetime."""
    _KEPT.append(obj)


def kept(obj: object) -> bool:
    """Whether ``obj`` is kept so (for tests)."""
    return any(k is obj for k in _KEPT)
