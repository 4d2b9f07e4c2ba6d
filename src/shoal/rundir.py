"""Where Shoal keeps its run-time state, and where ``shoal service`` listens (a leaf: standard library
only, because the ``shoal`` entry point reads it before anything else is imported; the ``*_path``
functions give strings and import nothing, not even ``pathlib``)."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: typing alone costs the entry point more than the rest of its imports
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["run_dir", "run_dir_path", "service_socket", "service_socket_path"]


def run_dir_path() -> str:
    """``$SHOAL_RUN_DIR``, else ``/run/shoal`` (root) or ``$XDG_RUNTIME_DIR/shoal``."""
    env = os.environ.get("SHOAL_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/shoal"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "shoal")
    import tempfile  # not at the top: the entry point reads this module before anything else

    return os.path.join(tempfile.gettempdir(), f"shoal-{os.geteuid()}")


def service_socket_path() -> str:
    """The socket of ``shoal service``: ``$SHOAL_SERVICE_SOCKET``, else ``RUN/service.sock``."""
    return os.environ.get("SHOAL_SERVICE_SOCKET") or os.path.join(run_dir_path(), "service.sock")


def run_dir() -> Path:
    """``run_dir_path()`` as a Path."""
    from pathlib import Path

    return Path(run_dir_path())


def service_socket() -> Path:
    """``service_socket_path()`` as a Path."""
    from pathlib import Path

    return Path(service_socket_path())
