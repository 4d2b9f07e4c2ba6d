"""sha256 digests as OCI spells them (``sha256:<64 hex>``).  Leaf module."""

from __future__ import annotations

import hashlib
import re

from shoal.errors import FormatError, HostileInput

__all__ = ["ALGO", "sha256", "to_str", "from_str", "hex_of", "validate"]

ALGO = "sha256"
_RE = re.compile(r"sha256:[0-9a-f]{64}")


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """The raw 32-byte sha256 of ``data``."""
    return hashlib.sha256(data).digest()


def to_str(raw: bytes) -> str:
    """32 raw bytes -> ``sha256:<hex>``."""
    if len(raw) != 32:
        raise FormatError(f"digest must be 32 bytes, got {len(raw)}")
    return "sha256:" + raw.hex()


def validate(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest string, else raise."""
    if not isinstance(digest, str) or not _RE.fullmatch(digest):
        bad = HostileInput if isinstance(digest, str) and "/" in digest else FormatError  # a path in disguise
        raise bad(f"not a sha256 digest: {str(digest)[:80]!r}")
    return digest


def from_str(digest: str) -> bytes:
    """``sha256:<hex>`` -> 32 raw bytes."""
    return bytes.fromhex(validate(digest)[7:])


def hex_of(digest: str) -> str:
    """The hex part of a validated digest string (safe to use as a file name)."""
    return validate(digest)[7:]
