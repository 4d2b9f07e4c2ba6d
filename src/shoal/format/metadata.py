"""What an image records about an entry besides its content (docs/spec/format.md §4.7).  Pure, no I/O.

``build`` (a directory, read by ``shoal.scan``) and ``convert`` (tar headers, read by
``shoal.convert.layers``) both pass extended attributes through ``recorded_xattrs``, so the same tree
gives the same index entries whichever way it arrives, and whatever the host adds to its files.

The xattr rule is an allow-list, not a deny-list: a label that some host attaches tomorrow
(a new LSM, an integrity or a network-filesystem attribute) is dropped without a code change.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["KEPT_XATTR_PREFIXES", "KEPT_XATTRS", "DROPPED_XATTR_PREFIXES", "MODE_BITS", "keep_xattr",
           "recorded_xattrs"]

# §4.7: namespaces that belong to the file: user data, and data a privileged author set on purpose.
KEPT_XATTR_PREFIXES = (b"user.", b"trusted.")
# §4.7: the one attribute of the security.* namespace that is part of what a file *does* (file capabilities).
KEPT_XATTRS = frozenset({b"security.capability"})
# §4.7: overlayfs bookkeeping (opaque markers, redirects, origins of a copy-up): the host's, not the file's.
DROPPED_XATTR_PREFIXES = (b"trusted.overlay.",)
# §4.7: permission bits, setuid, setgid and sticky; the file type is the entry kind.
MODE_BITS = 0o7777


def keep_xattr(name: bytes) -> bool:
    """True if an image records the extended attribute ``name`` (format.md §4.7)."""
    if name in KEPT_XATTRS:
        return True
    return name.startswith(KEPT_XATTR_PREFIXES) and not name.startswith(DROPPED_XATTR_PREFIXES)


def recorded_xattrs(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The attributes of ``pairs`` an image records, sorted by name (the index's canonical order)."""
    return tuple(sorted((k, v) for k, v in pairs if keep_xattr(k)))
