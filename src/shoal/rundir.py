"""Where Shoal keeps its run-time state, and where ``shoal service`` listens (a leaf: standard library
only, because the ``shoal`` entry point reads it before anything else is imported)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["run_dir", "service_socket"]


def run_dir() -> Path:
    """``$SHOAL_RUN_DIR``, else ``/run/shoal`` (root) or ``$XDG_RUNTIME_DIR/shoal``."""
    env = os.environ.get("SHOAL_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/shoal")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "shoal"
    import tempfile  # not at the top: the entry point reads this module before anything else

    return Path(tempfile.gettempdir()) / f"shoal-{os.geteuid()}"


def service_socket() -> Path:
    """The socket of ``shoal service``: ``$SHOAL_SERVICE_SOCKET``, else ``RUN/service.sock``."""
    env = os.environ.get("SHOAL_SERVICE_SOCKET")
    return Path(env) if env else run_dir() / "service.sock"
