"""``SystemContext``: the one typed options object every transport reads (docs/transports.md §options).

The role of containers/image's ``types.SystemContext``: how to reach images (auth file, credentials,
TLS, registries.conf, the store), which image of an index to pick (``platform``), and limits.  It is a
frozen dataclass, so a misspelt option is a ``TypeError`` where it is written, never a key silently
ignored; each transport reads the fields that concern it and ignores the others:

- ``docker://``: ``auth_file``, ``credentials``, ``tls_verify``, ``ca_bundle``, ``cert_dir``,
  ``plain_http``, ``registries_conf``, ``retries``, ``backoff``, ``timeout``, ``min_rate``,
  ``chunk_size``, ``concurrency``, ``blob_info_cache_dir`` (where the record of where blobs were seen
  lives, for cross-repository mounts; registry/blobinfo.py); destinations also ``tags`` (extra tags
  written at ``commit()``);
- ``oci-archive:``, ``docker-archive:``: ``max_size``, ``max_members``, ``tmpdir``;
- the store (``NAME[:TAG]``): ``store`` (its root; default ``$SHOAL_STORE`` or the user's);
- commands that pick one image of an index (inspect, ls, mount, ...): ``platform``.

``--authfile`` travels here (``auth_file``), not through ``$REGISTRY_AUTH_FILE``: it replaces the
primary auth file of podman's lookup order (transports/registry/credentials.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.errors import UsageError
from shoal.transports.registry.credentials import Credentials

__all__ = ["SystemContext", "as_context", "TAG_RE"]

TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)  # Go's \w: ASCII only (distribution/reference)


@dataclass(frozen=True)
class SystemContext:
    """How to reach and read images; every field has a working default (``SystemContext()``)."""

    store: str | None = None  # the local store's root
    platform: str | None = None  # os/arch[/variant] of an image index's image (default: this machine's)
    auth_file: str | None = None  # --authfile: replaces the primary auth file
    credentials: Credentials | None = None  # --creds: instead of the auth files
    tls_verify: bool = True
    ca_bundle: str | None = None
    cert_dir: str | None = None
    plain_http: bool | None = None  # None: https, found out for loopback hosts and with tls_verify=False
    registries_conf: str | None = None  # replaces the system registries.conf (its drop-ins still apply)
    retries: int = 5
    backoff: float = 0.2
    timeout: float = 30.0  # connect and stall limit, and the grace of each request's deadline
    min_rate: float = 64 * 1024  # bytes/s a request must average after its grace (registry/deadline.py)
    chunk_size: int | None = None  # blobs larger than this go up in PATCHes of this size (default 8 MiB)
    concurrency: int = 8
    tags: tuple[str, ...] = ()  # docker:// destinations: extra tags written at commit()
    # the blob-info cache's directory (registry/blobinfo.py; default $SHOAL_BLOB_INFO_CACHE_DIR, else
    # /var/lib/shoal/cache as root, else $XDG_DATA_HOME/shoal/cache)
    blob_info_cache_dir: str | None = None
    max_size: int = 64 << 30  # archives: bytes of member data (after decompression)
    max_members: int = 1_000_000  # archives: members
    tmpdir: str | None = None  # archives: where temp directories go
    # containers-policy.json applied at pull, mount and run (docs/spec/trust.md §4); None: the default
    # lookup ($SHOAL_SIGNATURE_POLICY, ~/.config/containers/policy.json, /etc/containers/policy.json)
    signature_policy: str | None = None
    # registries.d(5): where GPG simple signatures are kept (lookaside; docs/spec/trust.md §2.1); None: the
    # default lookup (~/.config/containers/registries.d when it exists, else /etc/containers/registries.d)
    registries_d: str | None = None

    def __post_init__(self) -> None:
        for name in ("tls_verify",):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"option {name} must be true or false")
        if self.plain_http is not None and not isinstance(self.plain_http, bool):
            raise UsageError("option plain_http must be true or false")
        for name, low in (("retries", 0), ("concurrency", 1), ("max_size", 0), ("max_members", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UsageError(f"option {name} has an invalid value")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise UsageError("option chunk_size has an invalid value")
        for name in ("backoff", "timeout", "min_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise UsageError(f"option {name} has an invalid value")
            object.__setattr__(self, name, float(v))
        if self.credentials is not None and not isinstance(self.credentials, Credentials):
            raise UsageError("credentials must be USER:PASSWORD")
        tags = tuple(self.tags)
        if not all(isinstance(t, str) and TAG_RE.fullmatch(t) for t in tags):
            raise UsageError("tags must be a list of valid tags")
        object.__setattr__(self, "tags", tags)
        for name in ("store", "auth_file", "ca_bundle", "cert_dir", "registries_conf", "tmpdir", "blob_info_cache_dir",
                     "signature_policy", "registries_d"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, os.fspath(v) or None)

    def replace(self, **changes: Any) -> "SystemContext":
        """A copy with ``changes`` (an unknown field is a TypeError)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_opts(cls, opts: Mapping[str, object]) -> "SystemContext":
        """From a mapping of field names (the old ``**opts`` calls); an unknown key is a UsageError.
        ``credentials`` may also be ``"USER:PASSWORD"``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise UsageError(f"unknown transport option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        kw: dict[str, Any] = {k: v for k, v in opts.items() if v is not None}
        creds = kw.get("credentials")
        if isinstance(creds, str):
            user, _, pw = creds.partition(":")
            if not user:
                raise UsageError("credentials must look like USER:PASSWORD")
            kw["credentials"] = Credentials(user, pw)
        return cls(**kw)


def as_context(ctx: "SystemContext | Mapping[str, object] | None") -> SystemContext:
    """``ctx`` itself, ``SystemContext()`` for None, or ``SystemContext.from_opts`` of a mapping (the
    compatibility path of callers that still hold option dicts: ``CopyOptions.src_opts``, tests)."""
    if ctx is None:
        return SystemContext()
    if isinstance(ctx, SystemContext):
        return ctx
    return SystemContext.from_opts(ctx)
