"""Shoal's one error hierarchy (a leaf module: it imports nothing from shoal).

    ShoalError                      exit 1
    ├── UsageError                  exit 2   bad arguments, bad references
    ├── NotFound                    exit 3   unknown image, path or blob
    ├── FormatError                 exit 4   malformed, oversized or non-canonical input
    │   └── HostileInput                     input that tries to escape or exhaust
    ├── IntegrityError              exit 5   a digest or size does not match
    │   └── FrameConflict                    two sources claim different bytes for one range of a pack
    ├── StoreError                  exit 6   the local store is unusable or locked
    ├── TransportError              exit 7   a registry or transport failed
    │   └── AuthError                        credentials refused or missing
    └── PermissionDenied            exit 8   an operation needs privileges we lack

Only the CLI turns these into messages and exit codes (``exit_code``).  Every
message is one line and never contains credentials.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "ShoalError",
    "UsageError",
    "NotFound",
    "FormatError",
    "HostileInput",
    "IntegrityError",
    "FrameConflict",
    "StoreError",
    "TransportError",
    "AuthError",
    "PermissionDenied",
]


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    exit_code: int = 1
    errno: int = _errno.EIO

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class UsageError(ShoalError):
    exit_code = 2
    errno = _errno.EINVAL


class NotFound(ShoalError):
    exit_code = 3
    errno = _errno.ENOENT


class FormatError(ShoalError):
    exit_code = 4
    errno = _errno.EIO


class HostileInput(FormatError):
    pass


class IntegrityError(ShoalError):
    exit_code = 5
    errno = _errno.EIO


class FrameConflict(IntegrityError):
    """A verified frame already covers part of this range of a partial pack with other bytes."""


class StoreError(ShoalError):
    exit_code = 6
    errno = _errno.EIO


class TransportError(ShoalError):
    exit_code = 7
    errno = _errno.EIO


class AuthError(TransportError):
    errno = _errno.EACCES


class PermissionDenied(ShoalError):
    exit_code = 8
    errno = _errno.EPERM
