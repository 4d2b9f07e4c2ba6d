"""Transports with skopeo's syntax: docker://, oci:, oci-archive:, docker-archive:, dir:, and bare NAME:TAG
for the local store.  Importing this package registers them all (see base.TRANSPORTS)."""

from __future__ import annotations

import importlib

# module -> transport name it registers (docs/transports.md)
_BUILTIN = ("local", "oci_layout", "oci_archive", "docker_archive", "dirtransport", "docker")

for _m in _BUILTIN:
    try:
        importlib.import_module(f"shoal.transports.{_m}")
    except ModuleNotFoundError as _exc:  # a transport not written yet; never hide other import errors
        if _exc.name != f"shoal.transports.{_m}":
            raise
