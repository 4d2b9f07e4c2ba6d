"""Shoal's one error hierarchy (a leaf module: it imports nothing from shoal).

    ShoalError                      exit 1
    ├── UsageError                  exit 2   bad arguments, bad references
    ├── NotFound                    exit 3   unknown image, path or blob
    ├── FormatError                 exit 4   malformed, oversized or non-canonical input
    │   └── HostileInput                     input that tries to escape or exhaust
    ├── IntegrityError              exit 5   a digest or size does not match
    │   └── FrameConflict                    two sources claim different bytes for one range of a pack
    ├── StoreError                  exit 6   the local store is unusable, locked or read-only (EROFS)
    ├── TransportError              exit 7   a registry or transport failed
    │   └── AuthError                        credentials refused or missing
    ├── PermissionDenied            exit 8   an operation needs privileges we lack, or a path is
    │                                        not writable (EACCES, EPERM; EROFS outside the store)
    ├── NoSpace                     exit 9   no space left: disk full or quota exceeded
    ├── PolicyRefused               exit 10  the signature policy (containers-policy.json) refuses the
    │                                        image, or there is no policy to apply (docs/spec/trust.md)
    └── ConflictError               exit 11  a rebase or apply merge found conflicting changes
                                             (docs/spec/lineage.md); ``lines`` lists them

Only the CLI turns these into messages and exit codes (``exit_code``).  Every
message is one line (whitespace runs collapse, control characters are escaped), at most
``MAX_MESSAGE`` characters, and never contains credentials.

``from_oserror`` is the one place an ``OSError`` becomes a Shoal error (by errno).
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "ShoalError",
    "UsageError",
    "NotFound",
    "FormatError",
    "HostileInput",
    "NotShoal",
    "IntegrityError",
    "FrameConflict",
    "StoreError",
    "TransportError",
    "AuthError",
    "PermissionDenied",
    "NoSpace",
    "PolicyRefused",
    "ConflictError",
    "MAX_MESSAGE",
    "from_oserror",
    "short",
]

MAX_MESSAGE = 600  # characters of an error message; longer ones are cut in the middle
_PATH_SHOWN = 160  # characters of a path shown in a message


def short(text: str, limit: int = _PATH_SHOWN) -> str:
    """``text`` on one line, control characters escaped, cut in the middle to ``limit`` characters."""
    text = " ".join(text.split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(text) > limit:
        keep = max(limit - 3, 2)
        text = text[: keep - keep // 3] + "..." + text[len(text) - keep // 3 :]
    return text


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    exit_code: int = 1
    errno: int = _errno.EIO

    def __str__(self) -> str:  # one line, always
        return short(super().__str__(), MAX_MESSAGE)


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


class NotShoal(FormatError):
    """A well-formed manifest that is not a Shoal image's: a classic (tar layer) image, or another artifact.
    Readers that can convert a classic image (``mount.image.open_image``) take it; the rest refuse it."""


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


class NoSpace(ShoalError):
    exit_code = 9
    errno = _errno.ENOSPC


class PolicyRefused(ShoalError):
    """The signature policy refuses an image (a requirement failed, or no policy file exists): nothing
    was tagged, mounted or run."""

    exit_code = 10
    errno = _errno.EACCES


class ConflictError(ShoalError):
    """A three-way merge (``shoal rebase``, ``shoal apply``) found paths both sides changed differently and
    no rule or ``--prefer`` resolves: nothing was written.  The message is a one-line summary; ``lines``
    holds one line per conflicting path (the CLI prints them after the summary)."""

    exit_code = 11
    errno = _errno.EINVAL

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = list(lines or [])


def _show(path: object) -> str:
    if path is None or path == "" or path == b"":
        return ""
    if isinstance(path, bytes):
        text = path.decode("utf-8", "backslashreplace")
    elif isinstance(path, int):  # a descriptor: nothing to show
        return ""
    else:
        text = str(path)
    return short(text)


def from_oserror(exc: OSError, what: str = "", path: object = None, *, store: bool = False) -> ShoalError:
    """The Shoal error for a failed system call: ``what`` failed on ``path`` (default: the error's own
    file name; ``""``: none) because of ``exc``.  By errno: EACCES/EPERM -> PermissionDenied,
    ENOSPC/EDQUOT -> NoSpace, ENAMETOOLONG -> FormatError, EROFS -> StoreError with ``store`` (the
    path is in the local store, or an image layout being written) else PermissionDenied; any other
    errno -> StoreError with ``store``, else NotFound (ENOENT, ENOTDIR), UsageError (EEXIST, EISDIR,
    ENOTEMPTY, ELOOP) or ShoalError (exit 1)."""
    shown = _show(path if path is not None else exc.filename)
    if exc.filename2 is not None and path is None:
        shown = f"{shown} -> {_show(exc.filename2)}"
    cause = exc.strerror or str(exc)
    code = exc.errno
    cls: type[ShoalError]
    if code in (_errno.EACCES, _errno.EPERM):
        cls, cause = PermissionDenied, "permission denied"
    elif code == _errno.EROFS:
        cls, cause = StoreError if store else PermissionDenied, "read-only file system"
    elif code in (_errno.ENOSPC, _errno.EDQUOT):
        cls, cause = NoSpace, "no space left on device" if code == _errno.ENOSPC else "disk quota exceeded"
    elif code == _errno.ENAMETOOLONG:
        cls, cause = FormatError, "path too long (at most 4096 bytes, 255 per name)"
    elif store:
        cls = StoreError
    elif code in (_errno.ENOENT, _errno.ENOTDIR):
        cls = NotFound
    elif code in (_errno.EEXIST, _errno.EISDIR, _errno.ENOTEMPTY, _errno.ELOOP):
        cls = UsageError
    else:
        cls = ShoalError
    parts = [p for p in (what, cause, shown) if p]
    return cls(": ".join(parts))
