"""Cold start: read ahead the code a command loads, before the interpreter asks for it file by file.

On a cold page cache (after a reboot or memory pressure) Python's imports wait for the disk once per
file, one file at a time: for ``shoal run`` some 380 byte-code files and shared libraries, 0.3-0.5 s
before the first registry request on this machine, where the same imports take 0.08 s warm.  This
module remembers, per command, which files the last run of that command had loaded
(``$XDG_CACHE_HOME/shoal/preload/COMMAND``, else ``~/.cache/...``), and at the next start asks the
kernel to read them all at once (``posix_fadvise(WILLNEED)`` from a few threads, so the disk sees
many requests together).  The imports then find their pages in memory.

It only ever reads: a listed path that is gone, not a regular file or unreadable is skipped, and the
list is written only by the process that read it (not a forked mount daemon), atomically, when the
set of files changed.  ``SHOAL_PRELOAD=0`` turns it off.  It imports nothing beyond the standard
library's ``os``, ``sys`` and ``threading``, and logs nothing (logging is not set up this early).
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["start", "record"]

_THREADS = 4
_MAX_FILES = 4096
_MAX_LIST = 1 << 20

_state: dict[str, object] = {}


def _list_path(command: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shoal", "preload", command)


def _command(argv: list[str], commands: object) -> str | None:
    for a in argv[1:]:
        if a in commands:  # type: ignore[operator]
            return a
    return None


def _advise(paths: list[str]) -> None:
    for p in paths:
        try:
            if os.stat(p).st_mode & 0o170000 != 0o100000:  # never open a device or a FIFO
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def start(commands: object) -> None:
    """Read ahead the files the command named in ``sys.argv`` loaded last time (in the background)."""
    if os.environ.get("SHOAL_PRELOAD", "1") == "0":
        return
    command = _command(sys.argv, commands)
    if command is None:
        return
    path = _list_path(command)
    _state.update(command=command, pid=os.getpid(), path=path, old=frozenset())
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_LIST)
    except OSError:
        return
    paths = [p for p in raw.decode("utf-8", "replace").split("\n") if p.startswith("/")][:_MAX_FILES]
    _state["old"] = frozenset(paths)
    for i in range(_THREADS):
        threading.Thread(target=_advise, args=(paths[i::_THREADS],), name="shoal-preload", daemon=True).start()


def _loaded() -> set[str]:
    """The byte code and extension modules this process imported, and the shared objects it mapped."""
    out: set[str] = set()
    for mod in list(sys.modules.values()):
        spec = getattr(mod, "__spec__", None)
        cached, origin = getattr(spec, "cached", None), getattr(spec, "origin", None)
        if isinstance(cached, str) and cached.startswith("/") and os.path.exists(cached):
            out.add(cached)  # what the import read (not the source, when byte code is kept)
        elif isinstance(origin, str) and origin.startswith("/") and origin.endswith((".py", ".so")):
            out.add(origin)
    try:
        with open("/proc/self/maps", "rb") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(b"/") and b".so" in parts[5]:
                    out.add(parts[5].rstrip(b"\n").decode("utf-8", "replace"))
    except OSError:
        pass
    return out


def record() -> None:
    """Remember what this command loaded, for its next cold start (only if it changed)."""
    if _state.get("pid") != os.getpid():
        return
    files = _loaded()
    if not files or files == _state["old"]:
        return
    path = str(_state["path"])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(files)[:_MAX_FILES]) + "\n")
        os.replace(tmp, path)
        _state["old"] = frozenset(files)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
