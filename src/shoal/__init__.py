"""Shoal: chunked, deduplicated, lazily mountable container images on OCI registries.

The public Python API (docs/api.md)::

    import shoal

    shoal.build("rootfs/", "app:1", store="store/")
    shoal.copy("app:1", "oci:/tmp/layout:app", store="store/")
    motd = shoal.open_image("app:1", store="store/").read_bytes("/etc/motd")

Everything listed in ``__all__`` is imported on first use, so ``import shoal`` loads nothing else:
no HTTP, FUSE or compression code until a function needs it.  ``shoal.build``, ``shoal.pull``,
``shoal.unpack`` and ``shoal.mount`` are the API functions, also after the submodules of the same
names have been imported (``from shoal.build import BuildOptions`` still imports the submodule).
"""

import sys

# not ``from typing import TYPE_CHECKING``: typing alone would triple this module's import time
TYPE_CHECKING = False

__version__ = "0.1.0"
FORMAT_VERSION = 2  # of the index (shoal.format.index.FORMAT; `shoal inspect --json` format_version)

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("build", "copy", "pull", "push", "open_image", "mount", "unmount", "unpack", "Image",
                     "StrPath"), "shoal.api"),
    "BuildOptions": "shoal.build", "BuildResult": "shoal.build",
    "CopyOptions": "shoal.copier", "CopyResult": "shoal.copier",
    "UnpackOptions": "shoal.unpack", "UnpackResult": "shoal.unpack",
    "OpenOptions": "shoal.mount.image",
    "MountOptions": "shoal.mount.state", "MountState": "shoal.mount.state", "Exposure": "shoal.mount.state",
    "ImageConfig": "shoal.format.manifest", "Entry": "shoal.format.model", "Kind": "shoal.format.model",
    "Sink": "shoal.progress",
    **dict.fromkeys(("ShoalError", "UsageError", "NotFound", "FormatError", "HostileInput", "IntegrityError",
                     "FrameConflict", "StoreError", "TransportError", "AuthError", "PermissionDenied", "NoSpace"),
                    "shoal.errors"),
}

__all__ = ["__version__", "FORMAT_VERSION", *_LAZY]

if TYPE_CHECKING:
    from typing import Any

    from shoal.api import Image as Image
    from shoal.api import StrPath as StrPath
    from shoal.api import build as build
    from shoal.api import copy as copy
    from shoal.api import mount as mount
    from shoal.api import open_image as open_image
    from shoal.api import pull as pull
    from shoal.api import push as push
    from shoal.api import unmount as unmount
    from shoal.api import unpack as unpack
    from shoal.build import BuildOptions as BuildOptions
    from shoal.build import BuildResult as BuildResult
    from shoal.copier import CopyOptions as CopyOptions
    from shoal.copier import CopyResult as CopyResult
    from shoal.errors import AuthError as AuthError
    from shoal.errors import FormatError as FormatError
    from shoal.errors import FrameConflict as FrameConflict
    from shoal.errors import HostileInput as HostileInput
    from shoal.errors import IntegrityError as IntegrityError
    from shoal.errors import NoSpace as NoSpace
    from shoal.errors import NotFound as NotFound
    from shoal.errors import PermissionDenied as PermissionDenied
    from shoal.errors import ShoalError as ShoalError
    from shoal.errors import StoreError as StoreError
    from shoal.errors import TransportError as TransportError
    from shoal.errors import UsageError as UsageError
    from shoal.format.manifest import ImageConfig as ImageConfig
    from shoal.format.model import Entry as Entry
    from shoal.format.model import Kind as Kind
    from shoal.mount.image import OpenOptions as OpenOptions
    from shoal.mount.state import Exposure as Exposure
    from shoal.mount.state import MountOptions as MountOptions
    from shoal.mount.state import MountState as MountState
    from shoal.progress import Sink as Sink
    from shoal.unpack import UnpackOptions as UnpackOptions
    from shoal.unpack import UnpackResult as UnpackResult


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(__import__(module, fromlist=[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from types import ModuleType as _Module
else:
    _Module = type(sys)  # types.ModuleType, without importing types


class _Package(_Module):
    """Keeps ``shoal.build`` (and pull, unpack, mount) the API function: importing a submodule of
    the same name binds it on the package, which would hide the function; the submodule stays
    reachable through ``sys.modules`` and ``from shoal.build import ...``."""

    def __setattr__(self, name: str, value: "Any") -> None:
        if isinstance(value, _Module) and _LAZY.get(name) == "shoal.api":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
