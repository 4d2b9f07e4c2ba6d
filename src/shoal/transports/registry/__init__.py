"""OCI distribution-spec registry transport: client, auth and credentials."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any


def _without_httpx_cli() -> None:
    """httpx's package imports its command-line client (``httpx._main``: rich, pygments and click, about
    70 modules, 90 ms on a warm page cache and more on a cold one) unless that import fails; Shoal never
    runs it, and every registry client (a lazy mount's first request, issue 12) would pay for it.  A
    stand-in module for it is registered before httpx is first imported (all of Shoal's httpx imports
    are in this package); ``httpx.main`` then says it is not loaded."""
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    stub = types.ModuleType("httpx._main")

    def main() -> None:
        raise SystemExit("the httpx command-line client is not loaded in this process (shoal)")

    stub.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stub


_without_httpx_cli()

if TYPE_CHECKING:
    from .auth import Authenticator, Challenge, parse_www_authenticate
    from .blobs import BlobReader
    from .client import (
        DEFAULT_MANIFEST_ACCEPT,
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
        MAX_MANIFEST_SIZE,
        OCI_INDEX,
        OCI_MANIFEST,
        ManifestInfo,
        RegistryClient,
        RegistryStats,
        referrers_tag,
    )
    from .credentials import (
        Credentials,
        default_auth_file,
        erase_credentials,
        load_credentials,
        store_credentials,
    )
    from .uploads import PutBlobResult

# name -> submodule: loaded on first use, so that a credentials lookup never imports the HTTP client
_LAZY = {
    "Authenticator": "auth",
    "BlobReader": "blobs",
    "Challenge": "auth",
    "Credentials": "credentials",
    "DEFAULT_MANIFEST_ACCEPT": "client",
    "DOCKER_MANIFEST": "client",
    "DOCKER_MANIFEST_LIST": "client",
    "MAX_MANIFEST_SIZE": "client",
    "ManifestInfo": "client",
    "OCI_INDEX": "client",
    "OCI_MANIFEST": "client",
    "PutBlobResult": "uploads",
    "RegistryClient": "client",
    "RegistryStats": "client",
    "default_auth_file": "credentials",
    "erase_credentials": "credentials",
    "load_credentials": "credentials",
    "parse_www_authenticate": "auth",
    "referrers_tag": "client",
    "store_credentials": "credentials",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = [
    "Authenticator",
    "BlobReader",
    "Challenge",
    "Credentials",
    "DEFAULT_MANIFEST_ACCEPT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MAX_MANIFEST_SIZE",
    "ManifestInfo",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "PutBlobResult",
    "RegistryClient",
    "RegistryStats",
    "default_auth_file",
    "erase_credentials",
    "load_credentials",
    "parse_www_authenticate",
    "referrers_tag",
    "store_credentials",
]
