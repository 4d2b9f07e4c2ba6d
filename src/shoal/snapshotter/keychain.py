"""The CRI keychain: the credentials of each CRI PullImage, by repository (docs/containerd.md "Credentials").

The CRI image-service proxy (:mod:`shoal.snapshotter.criproxy`) hands every ``PullImageRequest.auth``
(Kubernetes imagePullSecrets) to :meth:`Keychain.record`; a lazy mount of that repository's layers
then reads them (:meth:`Keychain.authfile_for`).  The keychain is kept in memory and in
``<root>/cri-auth.json`` (mode 0600, replaced atomically), a containers auth.json whose ``auths`` keys
are repositories (``host/path``, containers-auth.json(5)), so a restarted snapshotter re-mounts with
them and ``shoal mount --authfile`` reads them without a secret on any command line.

What is taken from an ``AuthConfig`` follows containerd 1.6's ``ParseAuth``: nothing when
``server_address`` names another host; else ``username``/``password``, an ``identity_token`` (an
OAuth2 refresh token, for a token service), or ``auth`` (base64 ``user:password``).  A bare
``registry_token`` is refused with one log line (containerd 1.6 does not use it either).  Secrets
never appear in logs or exceptions.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from shoal.atomicfile import Durability, write_atomic
from shoal.errors import FormatError
from shoal.format.manifest import json_loads
from shoal.transports.registry.credentials import normalize_host

__all__ = ["CriAuth", "Keychain", "normalize_repository", "auth_from_cri"]

log = logging.getLogger(__name__)

FILE_NAME = "cri-auth.json"


def normalize_repository(ref: str) -> str:
    """containerd's normalized ``host/path`` of an image reference (docker reference rules): no
    registry host -> ``docker.io``, a one-part Docker Hub path -> ``library/``; tag and digest dropped."""
    name = ref.removeprefix("docker://").split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name = name[:colon]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = normalize_host(first), rest
    else:
        host, path = "docker.io", name
    if host == "docker.io" and "/" not in path:
        path = "library/" + path
    return f"{host}/{path}"


@dataclass(frozen=True)
class CriAuth:
    """Credentials for one repository; the secrets never print."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def entry(self) -> dict[str, str]:
        """The auth.json entry (containers-auth.json(5))."""
        if self.identity_token:
            return {"identitytoken": self.identity_token}
        raw = f"{self.username}:{self.password}".encode()
        return {"auth": base64.b64encode(raw).decode("ascii")}


def auth_from_cri(image: str, username: str, password: str, auth: str, server_address: str,
                  identity_token: str, registry_token: str) -> CriAuth | None:
    """The credentials an ``AuthConfig`` gives for ``image`` (see the module text), or ``None``."""
    host = normalize_repository(image).split("/", 1)[0]
    if server_address and normalize_host(server_address) != host:
        log.info("CRI pull of %s: the credentials are for %s, not %s; not kept", image,
                 normalize_host(server_address), host)
        return None
    if username:
        return CriAuth(username, password)
    if identity_token:
        return CriAuth(identity_token=identity_token)
    if auth:
        try:
            user, sep, pw = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user, sep, pw = "", "", ""
        if not sep:
            log.warning("CRI pull of %s: its 'auth' credentials are not base64 user:password; not kept", image)
            return None
        return CriAuth(user, pw)
    if registry_token:
        log.warning("CRI pull of %s: a registry_token alone is not supported (containerd 1.6 ignores it too); "
                    "its lazy mount uses the snapshotter's own credentials", image)
    return None


class Keychain:
    """Repository -> :class:`CriAuth`, in memory and in ``<root>/cri-auth.json``."""

    def __init__(self, root: Path) -> None:
        self.path = root / FILE_NAME
        self._lock = threading.Lock()
        self._auths: dict[str, dict[str, str]] = self._load()

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json_loads(raw)
        except ValueError:
            raise FormatError(f"{self.path} is not valid JSON") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict) or not all(
                isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in auths.values()):
            raise FormatError(f"{self.path} is not a containers auth.json")
        log.info("CRI keychain: credentials for %d repositories from %s", len(auths), self.path)
        return {str(k): dict(v) for k, v in auths.items()}

    def entry_for(self, image: str) -> dict[str, str] | None:
        """The auth.json entry kept for the repository of ``image`` (for :meth:`revert`)."""
        with self._lock:
            return self._auths.get(normalize_repository(image))

    def record(self, image: str, creds: CriAuth) -> None:
        """Keep ``creds`` for the repository of ``image`` (the last pull's win).  OSError if the file
        cannot be written (they are kept in memory all the same)."""
        repo = normalize_repository(image)
        entry = creds.entry()
        with self._lock:
            if self._auths.get(repo) != entry:
                self._auths = dict(self._auths, **{repo: entry})
                log.info("CRI keychain: credentials recorded for %s", repo)
                self._save()

    def revert(self, image: str, creds: CriAuth, old: dict[str, str] | None) -> None:
        """Undo :meth:`record` after a failed pull (wrong credentials must not replace working ones),
        unless another pull has recorded other credentials since."""
        repo = normalize_repository(image)
        with self._lock:
            if self._auths.get(repo) != creds.entry() or old == creds.entry():
                return
            auths = dict(self._auths)
            if old is None:
                del auths[repo]
            else:
                auths[repo] = old
            self._auths = auths
            log.info("CRI keychain: the pull of %s failed; its credentials are not kept", repo)
            self._save()

    def _save(self) -> None:
        data = json.dumps({"auths": self._auths}, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self.path, data, durability=Durability.FULL, mode=0o600)

    def authfile_for(self, ref: str) -> Path | None:
        """The auth file holding credentials for the repository of ``ref``, if the keychain has some."""
        with self._lock:
            return self.path if normalize_repository(ref) in self._auths else None
