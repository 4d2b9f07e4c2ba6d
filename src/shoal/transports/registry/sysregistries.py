"""containers-registries.conf(5) v2, read as containers/image reads it (docs/transports-registry.md §registries.conf).

Which files (``load``):

* the main file: ``--registries-conf FILE`` (skopeo's flag), else ``$CONTAINERS_REGISTRIES_CONF``, else
  ``$HOME/.config/containers/registries.conf`` when it exists, else ``/etc/containers/registries.conf``;
  an explicitly named file must exist, the default one may be missing;
* then the drop-ins ``*.conf`` of ``/etc/containers/registries.conf.d`` and
  ``$HOME/.config/containers/registries.conf.d``, each directory in name order (with the per-user main
  file, only the per-user directory), as containers-registries.conf.d(5) says: a later file's
  ``[[registry]]`` replaces an earlier one of the same prefix, its ``unqualified-search-registries`` and
  ``short-name-mode`` replace earlier ones when set, its ``[aliases]`` add to or replace single aliases;
* short-name aliases also come from ``short-name-aliases.conf`` (``$HOME/.cache/containers/`` for a
  user, ``/var/cache/containers/`` for root), which wins over registries.conf (as in containers/image).

The v1 format (``[registries.search]``, ``[registries.insecure]``, ``[registries.block]``) is converted
as containers/image converts it, in the main file only; mixed with v2 it is refused.  A malformed
file is one ``UsageError`` naming it.

``RegistriesConf.pull_sources`` is containers/image's ``PullSourcesFromReference`` (mirrors in order,
filtered by ``mirror-by-digest-only``/``pull-from-mirror``, then the primary; the matched prefix is
rewritten to each endpoint's location); ``find`` is its ``FindRegistry`` (the longest matching prefix
wins; ``*.example.com`` matches subdomains of example.com).  ``resolve_short_name`` is the podman-level
short-name resolution without a prompt (docs/transports-registry.md says how each mode behaves).
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import UsageError, short

__all__ = ["Endpoint", "Registry", "RegistriesConf", "PullSource", "load", "resolve_short_name",
           "is_short_name", "EMPTY"]

SYSTEM_FILE = "/etc/containers/registries.conf"
SYSTEM_DIR = "/etc/containers/registries.conf.d"
USER_FILE = ".config/containers/registries.conf"
USER_DIR = ".config/containers/registries.conf.d"
ENV = "CONTAINERS_REGISTRIES_CONF"
MODES = ("enforcing", "permissive", "disabled")
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")

_DOMAIN_COMP = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMP}(?:\.{_DOMAIN_COMP})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_SHORT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


@dataclass(frozen=True)
class Endpoint:
    """A place a registry's images can be pulled from: its location (``host[:port][/namespace]``)."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = ""  # mirrors only: "", "all", "digest-only", "tag-only"


@dataclass(frozen=True)
class Registry:
    """One ``[[registry]]`` table, normalized (``prefix`` defaults to ``location`` and back)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Endpoint, ...] = ()
    origin: str = ""  # the file it came from


@dataclass(frozen=True)
class PullSource:
    """Where to try a pull: ``name`` is ``host/repo`` at that endpoint (the matched prefix rewritten)."""

    name: str
    insecure: bool
    mirror: bool


@dataclass(frozen=True)
class RegistriesConf:
    registries: tuple[Registry, ...] = ()
    unqualified_search: tuple[str, ...] = ()
    short_name_mode: str = "enforcing"
    aliases: tuple[tuple[str, str], ...] = ()  # (short name, fully-qualified name), sorted; "" removes one
    files: tuple[str, ...] = ()  # the files read, in order

    def where(self) -> str:
        return ", ".join(self.files) or "no registries.conf"

    def find(self, name: str) -> Registry | None:
        """The registry whose prefix matches ``name`` (``host/repo``) longest, if any."""
        best: Registry | None = None
        for r in self.registries:
            if _match(name, r.prefix) >= 0 and (best is None or len(r.prefix) > len(best.prefix)):
                best = r
        return best

    def pull_sources(self, name: str, digested: bool) -> tuple[Registry | None, tuple[PullSource, ...]]:
        """The matched registry and where to pull ``name`` from, in order; the last is the primary."""
        reg = self.find(name)
        if reg is None:
            return None, (PullSource(name, False, False),)
        ends: list[Endpoint] = []
        if reg.mirror_by_digest_only:
            if digested:
                ends += reg.mirrors
        else:
            for m in reg.mirrors:
                if (m.pull_from_mirror == "digest-only" and not digested) or (
                        m.pull_from_mirror == "tag-only" and digested):
                    continue
                ends.append(m)
        n = _match(name, reg.prefix)
        out = [PullSource(_rewrite(name, n, m.location), m.insecure, True) for m in ends]
        out.append(PullSource(_rewrite(name, n, reg.location), reg.insecure, False))
        return reg, tuple(out)

    def alias(self, name: str) -> str | None:
        for k, v in self.aliases:
            if k == name:
                return v or None
        return None


EMPTY = RegistriesConf()


def _match(ref: str, prefix: str) -> int:
    """containers/image's refMatchingPrefix: the length of ``ref`` the prefix matched, or -1."""
    if prefix.startswith("*."):
        sub = prefix[1:]  # ".example.com"
        i = ref.find(sub)
        if i < 0 or "/" in ref[:i]:
            return -1
        i += len(sub)
        return i if i == len(ref) or ref[i] in ":/@" else -1
    if ref == prefix:
        return len(prefix)
    if len(ref) > len(prefix) and ref.startswith(prefix) and ref[len(prefix)] in ":/@":
        return len(prefix)
    return -1


def _rewrite(name: str, matched: int, location: str) -> str:
    return name if not location else location + name[matched:]


# ------------------------------------------------------------------------------------------ parsing


def _bad(path: str, msg: str) -> UsageError:
    return UsageError(f"invalid registries configuration {short(path)}: {msg}")


def _location(path: str, v: object, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(v, str):
        raise _bad(path, f"{what} must be a string")
    loc = v.rstrip("/")
    if not loc and not empty_ok:
        raise _bad(path, f"{what} cannot be empty")
    if loc.startswith(("http://", "https://")):
        raise _bad(path, f"{what} {loc[:80]!r}: URI schemes are not supported")
    return loc


def _bool(path: str, d: dict[str, Any], key: str, what: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise _bad(path, f"{what}: {key} must be true or false")
    return v


_REG_KEYS = {"prefix", "location", "insecure", "blocked", "mirror-by-digest-only", "mirror", "pull-from-mirror"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}


def _registry(path: str, d: object) -> Registry:
    if not isinstance(d, dict):
        raise _bad(path, "[[registry]] must be a table")
    unknown = set(d) - _REG_KEYS
    if unknown:
        raise _bad(path, f"unknown [[registry]] key {sorted(unknown)[0][:40]!r}")
    loc = _location(path, d.get("location", ""), "location", empty_ok=True)
    prefix = _location(path, d["prefix"], "prefix") if "prefix" in d else ""
    if not prefix:
        if not loc:
            raise _bad(path, "a [[registry]] has neither location nor prefix")
        prefix = loc
    elif not loc and not prefix.startswith("*."):
        loc = prefix
    what = f"registry {prefix[:80]!r}"
    if "pull-from-mirror" in d:
        raise _bad(path, f"{what}: pull-from-mirror must not be set for a non-mirror registry")
    by_digest = _bool(path, d, "mirror-by-digest-only", what)
    raw_mirrors = d.get("mirror", [])
    if not isinstance(raw_mirrors, list):
        raise _bad(path, f"{what}: mirror must be an array of tables ([[registry.mirror]])")
    mirrors = tuple(_mirror(path, m, what, by_digest) for m in raw_mirrors)
    return Registry(prefix, loc, _bool(path, d, "insecure", what), _bool(path, d, "blocked", what), by_digest,
                    mirrors, path)


def _mirror(path: str, m: object, what: str, by_digest: bool) -> Endpoint:
    """One ``[[registry.mirror]]`` of registry ``what``."""
    if not isinstance(m, dict):
        raise _bad(path, f"{what}: each [[registry.mirror]] must be a table")
    bad = set(m) - _MIRROR_KEYS
    if bad:
        raise _bad(path, f"{what}: unknown [[registry.mirror]] key {sorted(bad)[0][:40]!r}")
    mloc = _location(path, m.get("location", ""), f"{what}: mirror location")
    pfm = m.get("pull-from-mirror", "")
    if pfm not in ("",) + PULL_FROM_MIRROR:
        raise _bad(path, f"{what}: unsupported pull-from-mirror value {str(pfm)[:40]!r} for mirror {mloc!r}")
    if by_digest and pfm:
        raise _bad(path, f"{what}: mirror-by-digest-only and a mirror's pull-from-mirror cannot both be set")
    return Endpoint(mloc, _bool(path, m, "insecure", f"mirror {mloc!r}"), str(pfm))


def _v1(path: str, doc: dict[str, Any]) -> tuple[list[Registry], list[str]] | None:
    """A v1 file's ``[registries.search|insecure|block]`` as containers/image converts them, else None."""
    old = doc.get("registries")
    if not isinstance(old, dict):
        return None

    def names(kind: str) -> list[str]:
        t = old.get(kind, {})
        v = t.get("registries", []) if isinstance(t, dict) else None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _bad(path, f"[registries.{kind}] registries must be an array of strings")
        return list(v)

    search, insecure, block = names("search"), names("insecure"), names("block")
    if not (search or insecure or block):
        return None
    regs: dict[str, dict[str, bool]] = {}
    for kind, hosts in (("blocked", block), ("insecure", insecure)):
        for h in hosts:
            regs.setdefault(_location(path, h, f"[registries.{kind}] entry"), {})[kind] = True
    return ([Registry(loc, loc, f.get("insecure", False), f.get("blocked", False), origin=path)
             for loc, f in regs.items()], search)


@dataclass
class _Partial:
    registries: dict[str, Registry]
    search: tuple[str, ...] | None = None
    mode: str | None = None
    aliases: dict[str, str] | None = None


def _parse(path: str, text: str, *, dropin: bool) -> _Partial:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, f"not valid TOML: {exc}") from None
    v2_keys = {"registry", "unqualified-search-registries", "short-name-mode", "aliases"}
    v1 = _v1(path, doc)
    if v1 is not None:
        if dropin:
            raise _bad(path, "a drop-in must use the v2 format (the v1 [registries.*] tables are not allowed)")
        if v2_keys & set(doc):
            raise _bad(path, "mixing the v1 [registries.*] tables with v2 keys is not supported")
        regs, search = v1
        return _Partial({r.prefix: r for r in regs}, tuple(_search(path, search)))
    raw = doc.get("registry", [])
    if not isinstance(raw, list):
        raise _bad(path, "registry must be an array of tables ([[registry]])")
    out = _Partial({})
    for d in raw:
        r = _registry(path, d)
        out.registries.setdefault(r.prefix, r)  # the first of one prefix wins, as in containers/image
    if "unqualified-search-registries" in doc:
        s = doc["unqualified-search-registries"]
        if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
            raise _bad(path, "unqualified-search-registries must be an array of strings")
        out.search = tuple(_search(path, s))
    if "short-name-mode" in doc:
        mode = doc["short-name-mode"]
        if mode not in MODES:
            raise _bad(path, f"short-name-mode {str(mode)[:40]!r} is not one of {', '.join(MODES)}")
        out.mode = str(mode)
    if "aliases" in doc:
        out.aliases = _aliases(path, doc["aliases"])
    return out


def _search(path: str, hosts: list[str]) -> list[str]:
    out = []
    for h in hosts:
        loc = _location(path, h, "unqualified-search-registries entry")
        if not _DOMAIN_RE.fullmatch(loc):
            raise _bad(path, f"invalid unqualified-search-registries entry {loc[:80]!r}")
        out.append(loc)
    return out


def _aliases(path: str, t: object) -> dict[str, str]:
    if not isinstance(t, dict):
        raise _bad(path, "[aliases] must be a table")
    out: dict[str, str] = {}
    for k, v in t.items():
        if not isinstance(v, str):
            raise _bad(path, f"alias {k[:80]!r} must be a string")
        if not is_short_name(k):
            raise _bad(path, f"alias {k[:80]!r} is not a short name (no registry host, tag or digest)")
        if v and (is_short_name(v) or "@" in v or ":" in v.rpartition("/")[2]):
            raise _bad(path, f"alias {k[:80]!r}: {v[:80]!r} must be a fully-qualified name without tag or digest")
        out[k] = v
    return out


def is_short_name(name: str) -> bool:
    """``busybox`` or ``library/busybox``: a repository without registry host, tag or digest."""
    if not _SHORT_RE.fullmatch(name):
        return False
    first, sep, _ = name.partition("/")
    return not (sep and ("." in first or first == "localhost"))


def _read(path: str, *, dropin: bool, must_exist: bool) -> _Partial | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if must_exist:
            raise UsageError(f"registries configuration {short(path)} does not exist") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise _bad(path, f"cannot read it: {why}") from None
    return _parse(path, text, dropin=dropin)


def _dropins(d: str) -> list[str]:
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".conf"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise UsageError(f"cannot read registries.conf.d directory {short(d)}: {exc.strerror}") from None
    return [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n))]


def _alias_cache(home: str | None) -> str:
    if os.geteuid() == 0 or not home:
        return "/var/cache/containers/short-name-aliases.conf"
    return os.path.join(home, ".cache/containers/short-name-aliases.conf")


def load(path: str | None = None) -> RegistriesConf:
    """The effective configuration (the main file ``path``, else as the module docstring says)."""
    return _load(path or None, os.environ.get(ENV) or None, os.environ.get("HOME") or None)


@functools.lru_cache(maxsize=8)
def _load(path: str | None, env: str | None, home: str | None) -> RegistriesConf:
    dirs = [SYSTEM_DIR] + ([os.path.join(home, USER_DIR)] if home else [])
    explicit = path or env
    if explicit:
        main, must = explicit, True
    elif home and os.path.exists(os.path.join(home, USER_FILE)):
        main, must = os.path.join(home, USER_FILE), True
        dirs = [os.path.join(home, USER_DIR)]
    else:
        main, must = SYSTEM_FILE, False
    regs: dict[str, Registry] = {}
    search: tuple[str, ...] = ()
    mode = "enforcing"
    aliases: dict[str, str] = {}
    files: list[str] = []
    parts = [(main, _read(main, dropin=False, must_exist=must))]
    for d in dirs:
        parts += [(f, _read(f, dropin=True, must_exist=False)) for f in _dropins(d)]
    for f, p in parts:
        if p is None:
            continue
        files.append(f)
        regs.update(p.registries)
        if p.search is not None:
            search = p.search
        if p.mode is not None:
            mode = p.mode
        if p.aliases is not None:
            aliases.update(p.aliases)
    cache = _read(_alias_cache(home), dropin=True, must_exist=False)
    if cache is not None and cache.aliases:
        aliases.update(cache.aliases)
    _check_conflicts(list(regs.values()))
    return RegistriesConf(tuple(regs.values()), search, mode, tuple(sorted(aliases.items())), tuple(files))


def _check_conflicts(regs: list[Registry]) -> None:
    by_loc: dict[str, Registry] = {}
    for r in regs:
        other = by_loc.setdefault(r.location or r.prefix, r)
        for key in ("insecure", "blocked"):
            if getattr(other, key) != getattr(r, key):
                raise _bad(r.origin, f"registry {r.location[:80]!r} is defined more than once with "
                                     f"conflicting {key!r} settings")


# ------------------------------------------------------------------------------------------ short names


def resolve_short_name(name: str, conf: RegistriesConf) -> tuple[tuple[str, ...], bool]:
    """The fully-qualified ``host/repo`` names to try for short name ``name`` (no tag or digest), in order,
    and whether they come from an alias.  Without a prompt: an alias is the one candidate; else the
    ``unqualified-search-registries`` in order, except that ``enforcing`` refuses several of them
    (as podman does without a TTY).  No candidate at all is a UsageError."""
    target = conf.alias(name)
    if target is not None:
        return (target,), True
    if not conf.unqualified_search:
        raise UsageError(f"short name {name!r} has no alias and no unqualified-search-registries are defined "
                         f"(in {conf.where()}); give a full name such as docker://HOST/{name}")
    cands = tuple(_qualify(h, name) for h in conf.unqualified_search)
    if len(cands) > 1 and conf.short_name_mode == "enforcing":
        raise UsageError(f"short name {name!r} is ambiguous (short-name-mode enforcing, no alias): "
                         f"candidates {', '.join(cands)}; give a full name or an alias")
    return cands, False


def _qualify(host: str, name: str) -> str:
    if host in ("docker.io", "index.docker.io") and "/" not in name:
        return f"docker.io/library/{name}"
    return f"{host}/{name}"
