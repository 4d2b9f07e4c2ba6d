"""OCI distribution-spec registry transport: client, auth and credentials."""

from __future__ import annotations

import importlib
import importlib.machinery
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


class _SyncOnlyHttpcore:
    """httpcore's package imports trio and anyio, if installed, for its async backends and primitives
    (trio with attrs, outcome and sortedcontainers: ~90 modules, ~0.2 s before a lazy mount's first
    request, issue 12); Shoal's registry client is synchronous and never uses them.  While httpcore's
    package is executed (it imports all of its modules), trio and anyio are hidden (unless already
    imported), so httpcore records them as absent: its async API would then refuse to run, which
    Shoal never calls.  Since stop 29 a mount serves without trio too (mount/kernel.py)."""

    NAME = "httpcore"
    HIDDEN = ("trio", "anyio")

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)  # a finder and loader for this one import (importlib.abc: 4 ms more)
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None  # found some other way: imported as usual
        self.inner = spec.loader
        spec.loader = self  # type: ignore[assignment]
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = self.inner  # the package's own loader from now on (resources, reloads)
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        hidden = [n for n in self.HIDDEN if n not in sys.modules]
        for n in hidden:
            sys.modules[n] = None  # type: ignore[assignment]  # an import of it raises ImportError
        try:
            self.inner.exec_module(module)
        finally:
            for n in hidden:
                if sys.modules.get(n, 0) is None:
                    del sys.modules[n]


def _sync_only_httpcore() -> None:
    if "httpcore" not in sys.modules and not any(
            isinstance(f, _SyncOnlyHttpcore) for f in sys.meta_path):
        sys.meta_path.insert(0, _SyncOnlyHttpcore())


_without_httpx_cli()
_sync_only_httpcore()

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
