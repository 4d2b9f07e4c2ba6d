"""sha256 digests as OCI spells them (``sha256:<64 hex>``).  Leaf module."""

from __future__ import annotations

import hashlib
import re
from typing import Any, final

from shoal.errors import FormatError, HostileInput, IntegrityError

__all__ = ["ALGO", "BlobDigester", "VerifiedBlob", "sha256", "to_str", "from_str", "hex_of", "validate"]

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


_SEAL = object()  # only this module makes a VerifiedBlob


@final
class VerifiedBlob:
    """A whole blob whose bytes were hashed and matched ``digest`` (and ``size``): what the store takes
    without hashing it again (``Layout.put_verified``).  Made only here, never from a caller's word: by
    ``VerifiedBlob.check`` (hashes the bytes) or by ``BlobDigester.seal`` (the bytes it hashed as they
    streamed, e.g. a registry read, which verifies every blob as it reads it).  ``data`` is immutable."""

    __slots__ = ("data", "digest")

    data: bytes
    digest: str

    def __init__(self, data: bytes, digest: str, seal: object = None) -> None:
        if seal is not _SEAL:
            raise TypeError("a VerifiedBlob is made by VerifiedBlob.check or BlobDigester.seal")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "digest", digest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a VerifiedBlob is immutable")

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    def check(cls, data: bytes, digest: str, size: int | None = None) -> "VerifiedBlob":
        """``data`` as a VerifiedBlob of ``digest``, hashed here; IntegrityError if it does not match."""
        d = BlobDigester(digest, size, keep=True)
        d.update(bytes(data))
        return d.seal()


@final
class BlobDigester:
    """Hashes a blob's bytes as they arrive (any ``algo:hex`` digest hashlib knows), and with ``keep``
    keeps them for ``seal``.  ``check`` (size and digest) raises IntegrityError on a mismatch."""

    __slots__ = ("digest", "size", "_h", "_parts", "n")

    def __init__(self, digest: str, size: int | None = None, keep: bool = False) -> None:
        self.digest = digest
        self.size = size
        self._h: Any = hashlib.new(digest.partition(":")[0])
        self._parts: list[bytes] | None = [] if keep else None
        self.n = 0

    def keep(self) -> None:
        """Keep the bytes from now on, for ``seal``: only before any byte was hashed."""
        if self.n:
            raise ValueError("a digester keeps a blob's bytes from its first byte only")
        if self._parts is None:
            self._parts = []

    def update(self, b: bytes) -> None:
        self._h.update(b)
        self.n += len(b)
        if self._parts is not None:
            self._parts.append(b)

    def matches(self) -> bool:
        return f"{self.digest.partition(':')[0]}:{self._h.hexdigest()}" == self.digest

    def check(self, what: str = "") -> None:
        what = what or f"blob {self.digest}"
        if self.size is not None and self.n != self.size:
            raise IntegrityError(f"{what}: got {self.n} bytes, expected {self.size}")
        if not self.matches():
            raise IntegrityError(f"{what}: content does not match its digest")

    def seal(self, what: str = "") -> VerifiedBlob:
        """The bytes hashed (kept since the first), checked (``check``), as a VerifiedBlob."""
        if self._parts is None:
            raise ValueError("this digester did not keep the bytes it hashed (or sealed them already)")
        self.check(what)
        parts, self._parts = self._parts, None  # sealed once
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return VerifiedBlob(data, self.digest, _SEAL)
