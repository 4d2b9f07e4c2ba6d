"""Registry credentials: containers ``auth.json``, docker ``config.json`` and ``~/.dockercfg``.

Files, in the order containers/image reads them (containers-auth.json(5); pkg/docker/config
``getAuthFilePaths``/``getPathToAuth``); the first file with credentials for the host wins:

1. the primary (read/write) file: ``--authfile`` / ``$REGISTRY_AUTH_FILE`` if given, else
   ``${XDG_RUNTIME_DIR}/containers/auth.json``, else ``/run/containers/$UID/auth.json`` (where
   root's podman writes); a ``$XDG_RUNTIME_DIR`` that does not exist is skipped with a warning
2. ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``
3. ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``
4. ``~/.dockercfg`` (legacy: a top-level map of hosts, no ``auths`` key, no helpers)

Inside one file: ``credHelpers[host]`` (helper program), then the most specific ``auths`` key for
the repository being accessed: for ``HOST/a/b/c`` the keys ``HOST/a/b/c``, ``HOST/a/b``, ``HOST/a``,
then ``HOST`` (containers-auth.json(5) "matched in its hierarchical order"; URL-style keys such as
``https://index.docker.io/v1/`` count as host keys), each a base64 ``auth``, ``username``/``password``
or ``identitytoken``; then ``credsStore`` (docker's default helper).  Helpers are
``docker-credential-<name> get|store|erase`` speaking JSON on stdin/stdout; a ``get`` answering
``Username: "<token>"`` hands back an identity token (an OAuth2 refresh token), as docker reads it.

Writing (login/logout) goes to the primary file (podman's ``--authfile`` default), or, for a
user who has neither ``$XDG_RUNTIME_DIR`` nor a ``/run/containers/$UID`` directory, to the
``XDG_CONFIG_HOME`` file (read second), atomically (temporary file + rename, mode 0600).  Secrets
never appear in exceptions or logs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import AuthError, FormatError, UsageError
from shoal.format.manifest import json_loads

__all__ = [
    "Credentials",
    "DOCKER_HUB_KEY",
    "auth_file_candidates",
    "default_auth_file",
    "load_credentials",
    "store_credentials",
    "erase_credentials",
    "normalize_host",
]

log = logging.getLogger(__name__)

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username and secret for one registry; the secret never prints."""

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def normalize_host(key: str) -> str:
    """``https://Foo.io/v1/`` -> ``foo.io``; Docker Hub aliases -> ``docker.io``."""
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.lower().startswith(prefix):
            k = k[len(prefix):]
            break
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in _HUB_ALIASES else k


def _key_path(key: str) -> str:
    """The namespace part of an auth.json key (``quay.io/org/repo`` -> ``org/repo``)."""
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.lower().startswith(prefix):
            return ""  # URL-style keys (docker) never carry namespaces
    parts = k.split("/", 1)
    return parts[1].strip("/") if len(parts) == 2 else ""


def _runtime_auth_file() -> Path | None:
    """``${XDG_RUNTIME_DIR}/containers/auth.json`` or ``/run/containers/$UID/auth.json``; ``None`` when
    ``$XDG_RUNTIME_DIR`` names a directory that does not exist (containers/image warns and skips it)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        if not os.path.isdir(xdg):
            _warn_once(f"{xdg} set by $XDG_RUNTIME_DIR does not exist: its containers/auth.json is not read")
            return None
        return Path(xdg) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning("%s", msg)


def _config_auth_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "containers" / "auth.json"


def _auth_files(auth_file: str | os.PathLike[str] | None = None) -> list[tuple[Path, bool]]:
    """``(path, legacy format)`` of every file consulted by :func:`load_credentials`, in order;
    ``auth_file`` (``--authfile``) replaces the primary file, as ``$REGISTRY_AUTH_FILE`` does."""
    out: list[tuple[Path, bool]] = []
    env = os.fspath(auth_file) if auth_file else os.environ.get("REGISTRY_AUTH_FILE")
    primary = Path(env) if env else _runtime_auth_file()
    if primary is not None:
        out.append((primary, False))
    out.append((_config_auth_file(), False))
    docker_dir = os.environ.get("DOCKER_CONFIG")
    out.append((Path(docker_dir) / "config.json" if docker_dir else Path.home() / ".docker" / "config.json", False))
    out.append((Path.home() / ".dockercfg", True))
    unique: list[tuple[Path, bool]] = []
    for item in out:  # --authfile may name one of the others
        if all(item[0] != p for p, _ in unique):
            unique.append(item)
    return unique


def auth_file_candidates(auth_file: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every file consulted by :func:`load_credentials`, in order."""
    return [p for p, _ in _auth_files(auth_file)]


def default_auth_file(auth_file: str | os.PathLike[str] | None = None) -> Path:
    """Where login writes when no path is given: podman's primary file (see the module text)."""
    env = os.fspath(auth_file) if auth_file else os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and not os.path.isdir(xdg):
        raise UsageError(f"{xdg} set by $XDG_RUNTIME_DIR does not exist; create it or unset XDG_RUNTIME_DIR")
    runtime = _runtime_auth_file()
    assert runtime is not None
    if xdg or os.getuid() == 0 or os.access(runtime.parent, os.W_OK):
        return runtime
    return _config_auth_file()  # an unprivileged user without a runtime directory: the next file read


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.debug("cannot read auth file %s: %s", path, e.strerror)
        return None
    if not raw.strip():
        return {}
    try:
        doc = json_loads(raw)
    except ValueError:
        raise FormatError(f"auth file {path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"auth file {path} is not a JSON object")
    return doc


def _is_docker_file(path: Path) -> bool:
    return path.name == "config.json"


def _entry_keys_for(host: str, docker_style: bool) -> str:
    if host == "docker.io":
        return DOCKER_HUB_KEY if docker_style else "docker.io"
    return host


def _decode_entry(entry: Any, where: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    ident = entry.get("identitytoken") or None
    if entry.get("auth"):
        try:
            user, sep, pw = base64.b64decode(str(entry["auth"]), validate=False).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise FormatError(f"auth file {where} has a malformed 'auth' entry") from None
        if not sep:
            raise FormatError(f"auth file {where} has a malformed 'auth' entry")
        return Credentials(user, pw, ident if isinstance(ident, str) else None)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and (name or secret):
        return Credentials(name, secret, ident if isinstance(ident, str) else None)
    if isinstance(ident, str):
        return Credentials("", "", ident)
    return None


def _run_helper(name: str, action: str, payload: str) -> str | None:
    """Run ``docker-credential-<name> <action>``; ``None`` if it reports not found."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid credential helper name {name!r}")
    prog = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [prog, action], input=payload.encode(), capture_output=True, timeout=_HELPER_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise AuthError(f"credential helper {prog} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {prog} timed out") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace").lower()
        if "not found" in out or "no credentials" in out:
            return None
        # helper output may echo secrets: report only the exit status
        raise AuthError(f"credential helper {prog} {action} failed (exit {proc.returncode})")
    return proc.stdout.decode(errors="replace")


def _helper_get(name: str, host: str, server_urls: list[str]) -> Credentials | None:
    for url in server_urls:
        out = _run_helper(name, "get", url)
        if out is None or not out.strip():
            continue
        try:
            doc = json_loads(out)
        except ValueError:
            raise AuthError(f"credential helper docker-credential-{name} returned malformed output") from None
        if not isinstance(doc, dict):
            raise AuthError(f"credential helper docker-credential-{name} returned malformed output")
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
        if not user and not secret:
            continue
        if user == "<token>":
            return Credentials("", "", secret)
        return Credentials(user, secret)
    log.debug("credential helper %s has nothing for %s", name, host)
    return None


def _server_urls(host: str) -> list[str]:
    if host == "docker.io":
        return [DOCKER_HUB_KEY, "docker.io", "index.docker.io", "registry-1.docker.io"]
    return [host, f"https://{host}"]


def _entry_for(auths: dict[str, Any], path: Path, host: str, repo: str | None) -> Credentials | None:
    """The credentials of the most specific key of ``auths`` for ``host/repo`` (containers-auth.json(5):
    ``host/a/b``, ``host/a``, then ``host``; keys with a path match only exactly)."""
    wanted = [""]
    if repo:
        parts = repo.strip("/").split("/")
        wanted = ["/".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        k = str(key)
        ns = _key_path(k)
        if normalize_host(k) != host or ns not in wanted:
            continue
        creds = _decode_entry(entry, path)
        if creds is not None and (ns not in found or k.lower() == host):  # an exact host key before aliases
            found[ns] = creds
    return next((found[ns] for ns in wanted if ns in found), None)


def _lookup_in(doc: dict[str, Any], path: Path, host: str, repo: str | None, legacy: bool) -> Credentials | None:
    if legacy:  # ~/.dockercfg: the whole file is the "auths" map, host keys only
        return _entry_for(doc, path, host, None)
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if normalize_host(str(key)) == host and isinstance(name, str):
                return _helper_get(name, host, _server_urls(host))
    auths = doc.get("auths")
    if isinstance(auths, dict):
        creds = _entry_for(auths, path, host, repo)
        if creds is not None:
            return creds
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return _helper_get(store, host, _server_urls(host))
    return None


def load_credentials(host: str, repo: str | None = None,
                     auth_file: str | os.PathLike[str] | None = None) -> Credentials | None:
    """Credentials for repository ``repo`` (``org/app``; ``None``: host keys only) on ``host``
    (``registry:port``), or ``None`` for anonymous access.  ``auth_file`` (``--authfile``, the
    ``SystemContext``'s) replaces the primary file."""
    h = normalize_host(host)
    for path, legacy in _auth_files(auth_file):
        doc = _read_json(path)
        if doc is None:
            continue
        creds = _lookup_in(doc, path, h, repo, legacy)
        if creds is not None:
            log.debug("credentials for %s%s from %s", h, f"/{repo}" if repo else "", path)
            return creds
    return None


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = (json.dumps(doc, indent="\t", sort_keys=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=".auth-", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _matching_keys(auths: dict[str, Any], host: str) -> list[str]:
    return [k for k in auths if normalize_host(str(k)) == host and not _key_path(str(k))]


def _helper_for(doc: dict[str, Any], host: str) -> str | None:
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if normalize_host(str(key)) == host and isinstance(name, str):
                return name
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def store_credentials(host: str, username: str, password: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Save credentials for ``host`` (login); returns the file written."""
    h = normalize_host(host)
    if not h:
        raise UsageError("empty registry host")
    if ":" in username:
        raise UsageError("username must not contain ':'")
    target = Path(path) if path is not None else default_auth_file()
    doc = _read_json(target) or {}
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
        doc["auths"] = auths
    key = _entry_keys_for(h, _is_docker_file(target))
    for k in _matching_keys(auths, h):
        del auths[k]
    helper = _helper_for(doc, h)
    if helper is not None:
        payload = json.dumps({"ServerURL": key, "Username": username, "Secret": password})
        _run_helper(helper, "store", payload)
        if doc.get("credsStore") == helper:
            auths[key] = {}
    else:
        auths[key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode("ascii")}
    _write_atomic(target, doc)
    log.debug("stored credentials for %s in %s", h, target)
    return target


def erase_credentials(host: str, path: str | os.PathLike[str] | None = None) -> bool:
    """Remove credentials for ``host`` (logout); ``True`` if something was removed."""
    h = normalize_host(host)
    target = Path(path) if path is not None else default_auth_file()
    doc = _read_json(target)
    if doc is None:
        return False
    removed = False
    helper = _helper_for(doc, h)
    if helper is not None:
        for url in _server_urls(h):
            if _run_helper(helper, "erase", url) is not None:
                removed = True
    auths = doc.get("auths")
    if isinstance(auths, dict):
        for k in _matching_keys(auths, h):
            del auths[k]
            removed = True
    if removed:
        _write_atomic(target, doc)
    return removed
