"""registries.d(5) and the lookaside signature storage of GPG simple signing (docs/spec/trust.md §2.1).

containers/image keeps simple signatures beside the registry, in a "lookaside" storage named by the
YAML files of a registries.d directory::

    default-docker:
      lookaside: file:///var/lib/containers/sigstore
    docker:
      registry.example/team:
        lookaside: https://sigs.example/team          # read
        lookaside-staging: file:///srv/sigs/team      # written (skopeo copy --sign-by)
        use-sigstore-attachments: true

- The directory: ``--registries.d DIR``, else ``~/.config/containers/registries.d`` when it exists, else
  ``/etc/containers/registries.d``.  Every ``*.yaml`` file is read; a ``docker`` namespace or
  ``default-docker`` defined in two files is an error (as containers/image).
- Which entry: the image's own ``HOST/REPO:TAG`` (or ``@DIGEST``), then ``HOST/REPO``, each parent
  namespace, ``HOST`` and ``*.DOMAIN`` (the policy's scopes), then ``default-docker``; the first entry that
  names a location wins.  Reading takes ``lookaside`` (older name: ``sigstore``); writing takes
  ``lookaside-staging`` (``sigstore-staging``), else the read location.  None configured: the built-in
  default, ``file:///var/lib/containers/sigstore`` as root, else
  ``file://$HOME/.local/share/containers/sigstore`` (containers/image 5.23, measured with skopeo 1.9.3).
- The files: ``<base>/<REPO>@sha256=<hex>/signature-<N>``, N = 1, 2, ... until one is missing; REPO is the
  repository path without the host.  Each is read up to 4 MiB (containers/image's limit); a larger one is
  kept as a refusal reason, never verified.  ``file://`` and ``http(s)://`` are read; only ``file://`` is
  written.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from shoal import digest as dg
from shoal.errors import FormatError, TransportError, UsageError, from_oserror
from shoal.transports.base import ImageReference
from shoal.transports.context import SystemContext

__all__ = ["RegistriesD", "LookasideSignature", "load_registries_d", "default_registries_d", "lookaside_base",
           "keeps_lookaside", "writable_base",
           "read_lookaside", "write_lookaside", "MAX_SIGNATURE", "MAX_SIGNATURES", "SYSTEM_REGISTRIES_D"]

log = logging.getLogger(__name__)

SYSTEM_REGISTRIES_D = "/etc/containers/registries.d"
MAX_SIGNATURE = 4 << 20  # bytes of one signature file (containers/image's iolimits.MaxSignatureBodySize)
MAX_SIGNATURES = 64  # signature-N files read for one manifest
_MAX_CONFIG = 1 << 20  # bytes of one registries.d file
_KEYS = ("lookaside", "lookaside-staging", "sigstore", "sigstore-staging", "use-sigstore-attachments")


@dataclass(frozen=True)
class Namespace:
    """One ``docker:`` entry (or ``default-docker``)."""

    lookaside: str = ""
    lookaside_staging: str = ""
    use_sigstore_attachments: bool = False

    def location(self, write: bool) -> str:
        return (self.lookaside_staging if write else "") or self.lookaside


@dataclass(frozen=True)
class RegistriesD:
    default_docker: Namespace | None = None
    docker: dict[str, Namespace] = field(default_factory=dict)
    origin: str = ""

    def location(self, scopes: list[str], write: bool) -> tuple[str, str]:
        """(the lookaside URL, the entry it came from) for an image whose scopes are ``scopes`` (most
        specific first); ("", "") when no entry names one."""
        for s in scopes:
            ns = self.docker.get(s)
            if ns is not None and ns.location(write):
                return ns.location(write), f"docker: {s}"
        if self.default_docker is not None and self.default_docker.location(write):
            return self.default_docker.location(write), "default-docker"
        return "", ""


def default_registries_d(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    user = os.path.join(os.path.expanduser("~"), ".config", "containers", "registries.d")
    return user if os.path.isdir(user) else SYSTEM_REGISTRIES_D


def _namespace(v: Any, where: str) -> Namespace:
    if v is None:
        return Namespace()
    if not isinstance(v, dict):
        raise FormatError(f"{where}: not a mapping")
    for k in ("lookaside", "lookaside-staging", "sigstore", "sigstore-staging"):
        if k in v and v[k] is not None and not isinstance(v[k], str):
            raise FormatError(f"{where}: {k} is not a URL string")
    ua = v.get("use-sigstore-attachments", False)
    if ua is not None and not isinstance(ua, bool):
        raise FormatError(f"{where}: use-sigstore-attachments is not true or false")
    return Namespace(str(v.get("lookaside") or v.get("sigstore") or ""),
                     str(v.get("lookaside-staging") or v.get("sigstore-staging") or ""), bool(ua))


def load_registries_d(path: str | None = None) -> RegistriesD:
    """Every ``*.yaml`` of ``default_registries_d(path)``; a missing directory is an empty configuration."""
    import yaml  # type: ignore[import-untyped]

    d = default_registries_d(path)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".yaml"))
    except FileNotFoundError:
        return RegistriesD(origin=d)
    except OSError as exc:
        raise from_oserror(exc, "reading registries.d", d) from None
    default: Namespace | None = None
    default_from = ""
    docker: dict[str, Namespace] = {}
    docker_from: dict[str, str] = {}
    for n in names:
        p = os.path.join(d, n)
        try:
            with open(p, "rb") as f:
                raw = f.read(_MAX_CONFIG + 1)
        except OSError as exc:
            raise from_oserror(exc, "reading", p) from None
        if len(raw) > _MAX_CONFIG:
            raise FormatError(f"{p}: larger than 1 MiB")
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise FormatError(f"{p}: not YAML ({' '.join(str(exc).split())[:200]})") from None
        except RecursionError:  # PyYAML's composer recurses per level: "[[[[..." of 200,000 levels
            raise FormatError(f"{p}: not YAML (nested too deeply)") from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise FormatError(f"{p}: not a mapping")
        if doc.get("default-docker") is not None:
            if default is not None:
                raise FormatError(f"registries.d: default-docker defined both in {default_from} and {p}")
            default, default_from = _namespace(doc["default-docker"], f"{p}: default-docker"), p
        entries = doc.get("docker") or {}
        if not isinstance(entries, dict):
            raise FormatError(f"{p}: docker is not a mapping")
        for scope, v in entries.items():
            scope = str(scope)
            if scope in docker:
                raise FormatError(f"registries.d: docker namespace {scope!r} defined both in {docker_from[scope]} "
                                  f"and {p}")
            docker[scope], docker_from[scope] = _namespace(v, f"{p}: docker.{scope}"), p
    return RegistriesD(default, docker, d)


def _builtin_default() -> str:
    if os.geteuid() == 0:
        return "file:///var/lib/containers/sigstore"
    return "file://" + os.path.join(os.path.expanduser("~"), ".local", "share", "containers", "sigstore")


def keeps_lookaside(ref: ImageReference) -> bool:
    """True for docker:// references: the only ones whose simple signatures live in a lookaside."""
    scope = ref.policy_scope()
    return scope is not None and scope.transport == "docker" and bool(scope.docker_name)


def lookaside_base(ref: ImageReference, ctx: SystemContext, write: bool) -> tuple[str, str]:
    """(the URL of ``ref``'s repository in its lookaside storage, where it was configured); ``ref`` must be a
    docker:// reference.  Reading: ``lookaside``; writing: ``lookaside-staging``, else ``lookaside``."""
    scope = ref.policy_scope()
    if scope is None or not keeps_lookaside(ref):
        raise UsageError(f"{ref}: GPG simple signatures are kept for docker:// images only")
    conf = load_registries_d(ctx.registries_d)
    url, entry = conf.location([scope.identity, *scope.namespaces], write)
    where = f"{conf.origin} ({entry})" if url else "the built-in default (no registries.d entry)"
    if not url:
        url = _builtin_default()
    from shoal.trust.policy import DockerName

    name = DockerName.parse(scope.docker_name).name
    repo = name.split("/", 1)[1]
    if any(part in ("", ".", "..") for part in repo.split("/")):
        raise FormatError(f"{ref}: unexpected path elements in the repository {repo!r}")
    return url.rstrip("/") + "/" + repo, where


@dataclass(frozen=True)
class LookasideSignature:
    """One ``signature-N`` file: its bytes, or why it was not read (too large)."""

    url: str
    data: bytes = b""
    problem: str = ""


def _sig_url(base: str, digest: str, n: int) -> str:
    algo, hexd = dg.validate(digest).split(":", 1)
    return f"{base}@{algo}={hexd}/signature-{n}"


def _file_path(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(u.path)
    if u.netloc not in ("", "localhost") or not path.startswith("/"):  # file:sigs would be ./sigs of the cwd
        raise UsageError(f"lookaside {url}: a file:// URL names an absolute local path (file:///PATH)")
    return path


def _read_one(url: str, ctx: SystemContext) -> bytes | None:
    """The first MAX_SIGNATURE + 1 bytes at ``url``; None when there is nothing there."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        path = _file_path(url)
        try:  # O_NONBLOCK: a FIFO planted as signature-N must not hang the reader
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                return None
            raise from_oserror(exc, "reading signature", path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FormatError(f"{url} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_SIGNATURE + 1)
    if scheme in ("http", "https"):
        tls = ssl.create_default_context(cafile=ctx.ca_bundle)
        if not ctx.tls_verify:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        # the socket timeout bounds each read only: a server sending a byte every few seconds would hold
        # the reader for days, so the whole body must arrive within timeout + 4 MiB at min_rate (94 s)
        deadline = time.monotonic() + ctx.timeout + MAX_SIGNATURE / max(1.0, ctx.min_rate)
        try:
            with urllib.request.urlopen(url, timeout=ctx.timeout, context=tls) as r:  # noqa: S310 - http(s) only
                body = bytearray()
                while len(body) <= MAX_SIGNATURE:
                    if time.monotonic() > deadline:
                        raise TransportError(f"reading signature {url}: too slow (under "
                                             f"{ctx.min_rate / 1024:.0f} KiB/s after {ctx.timeout:.0f}s)")
                    part = r.read1(min(65536, MAX_SIGNATURE + 1 - len(body)))
                    if not part:
                        break
                    body += part
                return bytes(body)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise TransportError(f"reading signature {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransportError(f"reading signature {url}: {getattr(exc, 'reason', exc)}") from None
    raise UsageError(f"lookaside {url}: unsupported scheme {scheme!r} (file://, http://, https://)")


def read_lookaside(ref: ImageReference, ctx: SystemContext, digest: str) -> list[LookasideSignature]:
    """The simple signatures of the manifest ``digest`` of ``ref``'s repository: ``signature-1``,
    ``signature-2``, ... until one is missing (at most MAX_SIGNATURES)."""
    base, where = lookaside_base(ref, ctx, write=False)
    out = []
    for n in range(1, MAX_SIGNATURES + 1):
        url = _sig_url(base, digest, n)
        try:
            data = _read_one(url, ctx)
        except FormatError as exc:
            out.append(LookasideSignature(url, problem=str(exc)))
            continue
        if data is None:
            break
        if len(data) > MAX_SIGNATURE:
            out.append(LookasideSignature(url, problem=f"{url} is larger than 4 MiB"))
        else:
            out.append(LookasideSignature(url, data))
    else:
        log.warning("more than %d signatures for %s at %s: the rest are not read", MAX_SIGNATURES, digest, base)
    log.debug("%d simple signatures of %s from %s (%s)", len(out), digest, base, where)
    return out


def write_lookaside(ref: ImageReference, ctx: SystemContext, digest: str, blobs: list[bytes]) -> list[str]:
    """Add ``blobs`` to the signatures of ``digest`` in the lookaside staging storage (file:// only; the ones
    there are kept, an identical one is not written twice); returns the URLs written.  Each file appears
    whole (written aside, then hard-linked into place) and never replaces one there: two signers at once
    get the next free numbers."""
    from shoal.atomicfile import fsync_dir

    base, where = writable_base(ref, ctx)
    out = []
    for b in blobs:
        n = 1
        while True:
            if n > MAX_SIGNATURES:
                raise FormatError(f"{base}: {digest} has {MAX_SIGNATURES} signatures already")
            url = _sig_url(base, digest, n)
            try:
                have = _read_one(url, ctx)
            except FormatError:
                have = b""  # something unreadable holds this number: take the next
            if have == b:
                break  # already there
            if have is None and _link_new(_file_path(url), b):
                break
            n += 1
        out.append(url)
    if out:
        try:
            fsync_dir(os.path.dirname(_file_path(out[-1])))
        except OSError as exc:
            raise from_oserror(exc, "writing signature", _file_path(out[-1])) from None
    log.info("signatures of %s written to %s (%s)", digest, base, where)
    return out


def _link_new(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data``, whole or not at all; False when something is there already."""
    import tempfile

    d = os.path.dirname(path)
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".signature.", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise from_oserror(exc, "writing signature", path) from None


def writable_base(ref: ImageReference, ctx: SystemContext) -> tuple[str, str]:
    """Where signatures of ``ref`` are written; refuses a location Shoal cannot write (http(s)), as skopeo."""
    base, where = lookaside_base(ref, ctx, write=True)
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme != "file":
        raise UsageError(f"cannot write signatures to {base} (from {where}): only a file:// lookaside is written; "
                         "configure lookaside-staging: file:///PATH in registries.d")
    _file_path(base)
    return base, where
