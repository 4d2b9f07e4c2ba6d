"""Platforms (os/architecture/variant) as OCI image indexes describe them, and the one rule that picks
a platform's image from an index.  Pure, no I/O (but ``Platform.host`` asks ``platform.machine``).

Spellings are normalized as containerd's ``platforms`` package does: ``x86_64``/``x86-64`` are
``amd64``, ``aarch64`` is ``arm64``, ``i386`` is ``386``, ``armhf`` is ``arm/v7``, ``armel`` is
``arm/v6``; ``arm`` without a variant is ``arm/v7``; ``arm64`` without a variant is ``arm64/v8`` and
``amd64`` without one is ``amd64/v1`` (both written without the variant).  A request accepts its
own platform and, after it, the older variants of the same architecture (``arm/v7`` also takes
``v6`` then ``v5``; ``amd64/v3`` takes ``v2`` then ``v1``).  Never another architecture or OS.
"""

from __future__ import annotations

import platform as _host
from dataclasses import dataclass
from typing import Any, Callable

from shoal.errors import NotFound, UsageError

__all__ = ["Platform", "platform_json", "host_arch", "select", "choose", "listed"]


def _norm_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's ``normalizeArch``."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return arch, variant


def _norm_os(os_: str) -> str:
    os_ = os_.lower()
    return "darwin" if os_ == "macos" else os_


def host_arch() -> str:
    """This machine's architecture in OCI spelling (amd64, arm64, ...)."""
    return Platform.host().architecture


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, always normalized (``Platform("linux", "x86_64")`` is
    ``Platform("linux", "amd64")``), so equal platforms compare equal."""

    os: str
    architecture: str
    variant: str = ""

    def __post_init__(self) -> None:
        arch, variant = _norm_arch(self.architecture, self.variant)
        object.__setattr__(self, "os", _norm_os(self.os))
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "variant", variant)

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``os/arch[/variant]``, e.g. ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, doc: Any) -> "Platform":
        """The platform of an OCI ``platform`` object (empty fields if it is not one)."""
        if not isinstance(doc, dict):
            return cls("", "")
        return cls(str(doc.get("os", "") or ""), str(doc.get("architecture", "") or ""),
                   str(doc.get("variant", "") or ""))

    @classmethod
    def host(cls) -> "Platform":
        """This machine: ``linux`` and the kernel's machine name (``armv7l`` is ``arm/v7``)."""
        m = _host.machine().lower()
        if m.startswith("armv") and m[4:5].isdigit():
            return cls("linux", "arm", "v" + m[4])
        if m in ("i486", "i586", "i686"):
            return cls("linux", "386")
        return cls("linux", m)

    def accepts(self) -> list["Platform"]:
        """What a request for this platform takes, best first (older variants of the same arch)."""
        out = [self]
        num = self.variant[1:] if self.variant.startswith("v") else ""
        if self.architecture == "amd64" and num.isdigit():
            out += [Platform(self.os, "amd64", f"v{n}") for n in range(int(num) - 1, 0, -1)]
        elif self.architecture == "arm" and num.isdigit():
            out += [Platform(self.os, "arm", f"v{n}") for n in range(int(num) - 1, 4, -1)]
        return out

    def rank(self, other: "Platform") -> int | None:
        """How well ``other`` (an image's platform) serves this request: 0 is exact, larger is an older
        compatible variant, None is not at all."""
        try:
            return self.accepts().index(other)
        except ValueError:
            return None

    def matches(self, other: "Platform") -> bool:
        """``other`` (an image's platform) serves this request."""
        return self.rank(other) is not None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_PLATFORM_KEYS = ("architecture", "os", "os.version", "os.features", "variant", "features")


def platform_json(doc: Any) -> dict[str, Any]:
    """The known fields of an OCI ``platform`` object (others dropped)."""
    if not isinstance(doc, dict):
        return {}
    return {k: doc[k] for k in _PLATFORM_KEYS if k in doc and doc[k] not in ("", None, [])}


def _want(platform: "str | Platform | None") -> Platform:
    if platform is None or platform == "":
        return Platform.host()
    return Platform.parse(platform) if isinstance(platform, str) else platform


def _entries(manifests: Any) -> list[dict[str, Any]]:
    return [m for m in (manifests if isinstance(manifests, list) else [])
            if isinstance(m, dict) and isinstance(m.get("digest"), str)]


def select(manifests: Any, platform: "str | Platform | None") -> list[dict[str, Any]]:
    """The entries of an image index's ``manifests`` list (well-formed descriptors only) that serve
    ``platform``, best first (index order among equals); all of them when ``platform`` is None."""
    kids = _entries(manifests)
    if platform is None or platform == "":
        return kids
    want = _want(platform)
    ranked = [(r, i, m) for i, m in enumerate(kids) if (r := want.rank(Platform.of(m.get("platform")))) is not None]
    return [m for _, _, m in sorted(ranked, key=lambda t: (t[0], t[1]))]


def listed(manifests: Any) -> list[str]:
    """The distinct platforms an index lists, in index order (for messages)."""
    out: list[str] = []
    for m in _entries(manifests):
        p = Platform.of(m.get("platform"))
        s = str(p) if p.os and p.architecture and "unknown" not in (p.os, p.architecture) else ""
        if s and s not in out:
            out.append(s)
    return out


def choose(manifests: Any, platform: "str | Platform | None", what: str,
           prefer: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """THE rule: the one entry of an image index for ``platform`` (None: this machine's).

    The best-ranked match wins (see the module docstring); among equally good ones, those ``prefer``
    likes come first, then index order.  No match raises NotFound naming ``what``, the platform and
    what the index has."""
    want = _want(platform)
    kids = select(manifests, want)
    if not kids:
        have = ", ".join(listed(manifests)) or "no platforms"
        raise NotFound(f"{what} has no image for {want} (it has {have}); choose one with --platform")
    if prefer is not None:
        best = want.rank(Platform.of(kids[0].get("platform")))
        top = [m for m in kids if want.rank(Platform.of(m.get("platform"))) == best]
        return next((m for m in top if prefer(m)), top[0])
    return kids[0]
