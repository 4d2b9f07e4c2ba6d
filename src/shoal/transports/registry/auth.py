"""Registry authentication: ``WWW-Authenticate`` parsing, Basic and Bearer.

The Bearer flow is the distribution token protocol: on a 401 carrying
``Bearer realm=...,service=...,scope=...`` fetch a token from ``realm``
(GET with ``service``/``scope`` query parameters and HTTP Basic
credentials, or an OAuth2 ``refresh_token`` POST when an identity token is
known), cache it per scope set until ``expires_in`` (default 60 s) runs out,
and refresh it once when the registry refuses it anyway.

Secrets are kept in memory only and never appear in messages or logs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import httpx

from shoal.errors import AuthError, TransportError
from shoal.format.manifest import json_loads

from .credentials import Credentials, load_credentials

__all__ = [
    "Challenge",
    "Authenticator",
    "Credentials",
    "load_credentials",
    "merge_scopes",
    "parse_www_authenticate",
    "repository_scope",
    "scope_repository",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 60.0
_TOKEN_MARGIN = 5.0  # refresh this long before the server says it expires
_TOKEN_MAX_BYTES = 1 << 20

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header."""

    scheme: str  # lower case: "basic", "bearer", ...
    params: dict[str, str] = field(default_factory=dict)

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.params.get("scope", "").split())


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Parse one or more ``WWW-Authenticate`` values (RFC 7235 grammar, leniently)."""
    items = [values] if isinstance(values, str) else list(values)
    out: list[Challenge] = []
    for text in items:
        pos, n = 0, len(text)
        current: Challenge | None = None
        while pos < n:
            while pos < n and text[pos] in " \t,":
                pos += 1
            m = _TOKEN_RE.match(text, pos)
            if not m:
                pos += 1
                continue
            word, pos = m.group(0), m.end()
            j = pos
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == "=" and current is not None:
                # auth-param: name = token | quoted-string
                j += 1
                while j < n and text[j] in " \t":
                    j += 1
                if j < n and text[j] == '"':
                    j += 1
                    buf: list[str] = []
                    while j < n and text[j] != '"':
                        if text[j] == "\\" and j + 1 < n:
                            j += 1
                        buf.append(text[j])
                        j += 1
                    value, pos = "".join(buf), j + 1
                else:
                    vm = _TOKEN_RE.match(text, j)
                    value, pos = (vm.group(0), vm.end()) if vm else ("", j)
                current.params[word.lower()] = value
            elif j < n and text[j] == "=" and current is None:
                pos = j + 1  # stray param before any scheme: skip
            else:
                current = Challenge(word.lower(), {})
                out.append(current)
                # token68 form ("Negotiate abc==") is ignored: not used by registries
    return out


def repository_scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def scope_repository(scopes: Iterable[str]) -> str | None:
    """The repository a request's scopes are about: the one pushed to, else the first one named
    (a cross-repository mount also asks to pull from its source)."""
    repos: list[tuple[str, str]] = []
    for scope in scopes:
        for s in scope.split():
            rtype, _, rest = s.partition(":")
            name, sep, actions = rest.rpartition(":")
            if rtype == "repository" and sep and name:
                repos.append((name, actions))
    pushed = [name for name, actions in repos if "push" in actions.split(",")]
    names = pushed or [name for name, _ in repos]
    return names[0] if names else None


def merge_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Union of scopes, combining the actions of one resource; sorted, stable."""
    acc: dict[str, list[str]] = {}
    for scope in scopes:
        for s in scope.split():
            rtype, _, rest = s.partition(":")
            name, sep, actions = rest.rpartition(":")
            if not sep:
                name, actions = rest, ""
            key = f"{rtype}:{name}"
            have = acc.setdefault(key, [])
            for a in actions.split(","):
                if a and a not in have:
                    have.append(a)
    order = {"pull": 0, "push": 1, "delete": 2}
    return tuple(
        sorted(f"{k}:{','.join(sorted(v, key=lambda a: (order.get(a, 9), a)))}" for k, v in acc.items())
    )


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


# (method, url, headers, body) -> response (already read)
RawSend = Callable[[str, str, dict[str, str], bytes | None], httpx.Response]


class Authenticator:
    """Per-registry auth state, shared by the threads of one client."""

    def __init__(
        self,
        host: str,
        send: RawSend,
        credentials: Credentials | None = None,
        *,
        lookup: bool = True,
        secure: Callable[[], bool] = lambda: True,  # is the registry itself on https (once it is known)
        auth_file: str | None = None,  # --authfile: replaces the primary auth file (credentials.py)
    ) -> None:
        self.host = host
        self._send = send
        self._creds = credentials
        self._lookup = lookup and credentials is None
        self._auth_file = auth_file
        self._found: dict[str | None, Credentials | None] = {}  # looked up, per repository
        self._secure = secure
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._scheme: str | None = None  # "basic" or "bearer" once challenged
        self._bearer: Challenge | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self.token_fetches = 0

    # -- credentials -------------------------------------------------------
    def credentials(self, scopes: Sequence[str] = ()) -> Credentials | None:
        """The given credentials, else those the auth files hold for the repository ``scopes`` name
        (per-repository keys, containers-auth.json(5)), looked up once per repository."""
        if not self._lookup:
            return self._creds
        repo = scope_repository(scopes)
        with self._lock:
            if repo not in self._found:
                self._found[repo] = load_credentials(self.host, repo, self._auth_file)
            return self._found[repo]

    # -- proactive ---------------------------------------------------------
    def header_for(self, scopes: Sequence[str]) -> str | None:
        """The Authorization value to send before any challenge, if known."""
        if self._scheme == "basic":
            creds = self.credentials(scopes)
            return creds.basic_header() if creds and (creds.username or creds.password) else None
        if self._scheme == "bearer":
            key = merge_scopes(scopes)
            cached = self._cached(key)
            if cached is not None:
                return "Bearer " + cached
            return "Bearer " + self._fetch_token(key)
        return None

    def _cached(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            hit = self._tokens.get(key)
            if hit is None:
                return None
            token, expiry = hit
            if time.monotonic() >= expiry:
                del self._tokens[key]
                return None
            return token

    def invalidate(self) -> None:
        with self._lock:
            self._tokens.clear()

    # -- challenge ---------------------------------------------------------
    def handle_401(self, resp: httpx.Response, scopes: Sequence[str], sent: str | None) -> str:
        """Answer a 401: the Authorization value to retry with, or AuthError."""
        challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.params.get("realm")), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            with self._lock:
                self._scheme, self._bearer = "bearer", bearer
                if sent and sent.startswith("Bearer "):
                    stale = sent[7:]
                    for k in [k for k, (t, _) in self._tokens.items() if t == stale]:
                        del self._tokens[k]
            want = merge_scopes(list(scopes) + list(bearer.scopes))
            token = self._fetch_token(want)
            if tuple(scopes) and merge_scopes(scopes) != want:
                with self._lock:
                    hit = self._tokens.get(want)
                    if hit is not None:
                        self._tokens[merge_scopes(scopes)] = hit
            return "Bearer " + token
        if basic is not None:
            with self._lock:
                self._scheme = "basic"
            creds = self.credentials(scopes)
            if creds is not None and creds.identity_token and not (creds.username or creds.password):
                raise AuthError(f"{self.host} asks for a username and password (Basic), but its saved "
                                "credentials are an identity token, which only a token service accepts")
            if creds is None or not (creds.username or creds.password):
                raise AuthError(f"{self.host} requires authentication and no credentials were found")
            header = creds.basic_header()
            if sent == header:
                raise AuthError(f"authentication to {self.host} failed: username or password refused")
            return header
        raise AuthError(f"{self.host} answered 401 without a usable authentication challenge")

    def denied(self, scopes: Sequence[str]) -> AuthError:
        who = "anonymous access" if self.credentials(scopes) is None else "access"
        what = " ".join(scopes) or "the registry"
        return AuthError(f"{who} to {what} on {self.host} denied")

    # -- token flow --------------------------------------------------------
    def _fetch_token(self, scopes: tuple[str, ...]) -> str:
        with self._fetch_lock:
            cached = self._cached(scopes)
            if cached is not None:
                return cached
            ch = self._bearer
            if ch is None:  # pragma: no cover - guarded by callers
                raise AuthError(f"no bearer challenge known for {self.host}")
            realm = ch.params["realm"]
            parts = urlsplit(realm)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise AuthError(f"{self.host} advertises an invalid token realm")
            creds = self.credentials(scopes)
            if creds is not None and parts.scheme == "http" and self._secure() and not _is_loopback(parts.hostname):
                raise AuthError(f"refusing to send credentials for {self.host} to a plain-http token realm")
            started = time.monotonic()
            resp = self._ask_token(realm, ch.params.get("service"), scopes, creds)
            self.token_fetches += 1
            token, ttl_s = self._token_of(resp, creds)
            margin = min(_TOKEN_MARGIN, ttl_s / 10)
            with self._lock:
                self._tokens[scopes] = (token, started + ttl_s - margin)
            log.debug("token for %s scopes=%s ttl=%.0fs", self.host, " ".join(scopes) or "-", ttl_s)
            return token

    def _ask_token(self, realm: str, service: str | None, scopes: tuple[str, ...],
                   creds: Credentials | None) -> httpx.Response:
        """The token service's answer: a refresh-token POST for an identity token, else a GET (with
        basic auth when there are credentials)."""
        headers = {"Accept": "application/json"}
        if creds is not None and creds.identity_token:
            form: list[tuple[str, str]] = [
                ("grant_type", "refresh_token"),
                ("refresh_token", creds.identity_token),
                ("client_id", "shoal"),
            ]
            if service:
                form.append(("service", service))
            form.extend(("scope", s) for s in scopes)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return self._send("POST", realm, headers, urlencode(form).encode())
        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        query.extend(("scope", s) for s in scopes)
        if creds is not None and creds.username:
            query.append(("account", creds.username))
            headers["Authorization"] = creds.basic_header()
        sep = "&" if urlsplit(realm).query else "?"
        return self._send("GET", realm + (sep + urlencode(query) if query else ""), headers, None)

    def _token_of(self, resp: httpx.Response, creds: Credentials | None) -> tuple[str, float]:
        """The token and its lifetime (seconds) in a token service's answer."""
        if resp.status_code in (401, 403):
            if creds is None:
                raise AuthError(f"token service for {self.host} refused anonymous access")
            raise AuthError(f"authentication to {self.host} failed: username or password refused")
        if resp.status_code != 200:
            raise TransportError(f"token service for {self.host} answered HTTP {resp.status_code}")
        body = resp.content
        if len(body) > _TOKEN_MAX_BYTES:
            raise TransportError(f"token service for {self.host} sent an oversized answer")
        try:
            doc = json_loads(body)
        except ValueError:
            raise TransportError(f"token service for {self.host} sent malformed JSON") from None
        if not isinstance(doc, dict):
            raise TransportError(f"token service for {self.host} sent malformed JSON")
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise TransportError(f"token service for {self.host} sent no token")
        ttl = doc.get("expires_in")
        return token, float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else DEFAULT_TOKEN_TTL
