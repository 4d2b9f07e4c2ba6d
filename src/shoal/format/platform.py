"""Platforms (os/architecture/variant) as OCI image indexes describe them.  Pure, no I/O."""

from __future__ import annotations

import platform as _host
from dataclasses import dataclass
from typing import Any

from shoal.errors import UsageError

__all__ = ["Platform", "platform_json", "host_arch", "select"]

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64", "i686": "386"}


def host_arch() -> str:
    """This machine's architecture in OCI spelling (amd64, arm64, ...)."""
    return _ARCH.get(_host.machine(), _host.machine())


_PLATFORM_KEYS = ("architecture", "os", "os.version", "os.features", "variant", "features")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``os/arch[/variant]``, e.g. ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, doc: Any) -> "Platform":
        if not isinstance(doc, dict):
            return cls("", "")
        return cls(str(doc.get("os", "")), str(doc.get("architecture", "")), str(doc.get("variant", "") or ""))

    def matches(self, other: "Platform") -> bool:
        """``other`` (a source image's platform) satisfies this request; an unset variant matches any."""
        return (self.os == other.os and self.architecture == other.architecture
                and (not self.variant or self.variant == other.variant))

    @classmethod
    def host(cls) -> "Platform":
        return cls("linux", host_arch())

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_json(doc: Any) -> dict[str, Any]:
    """The known fields of an OCI ``platform`` object (others dropped)."""
    if not isinstance(doc, dict):
        return {}
    return {k: doc[k] for k in _PLATFORM_KEYS if k in doc and doc[k] not in ("", None, [])}


def select(manifests: Any, platform: str | None) -> list[dict[str, Any]]:
    """The entries of an image index's ``manifests`` list (well-formed descriptors only) whose platform
    matches ``platform`` (``os/arch[/variant]``; an unset variant matches any), or all of them."""
    kids = [m for m in (manifests if isinstance(manifests, list) else [])
            if isinstance(m, dict) and isinstance(m.get("digest"), str)]
    if not platform:
        return kids
    want = Platform.parse(platform)
    return [m for m in kids if want.matches(Platform.of(m.get("platform")))]
