"""containerd's registry hosts configuration (``config_path``: ``DIR/<host>/hosts.toml``) for lazy mounts.

containerd reads ``DIR/<host>/hosts.toml``, else ``DIR/_default/hosts.toml``: ``server`` (the upstream,
default ``https://<host>``), ``ca``, ``client``, ``skip_verify``, and ``[host."<url>"]`` tables, the
mirrors, tried in order before the server, each with ``capabilities`` (default pull, resolve, push),
``ca``, ``client``, ``skip_verify``.  ``HostsDir.mount_args`` turns that into what ``shoal mount``
understands (docs/containerd.md, "Registry hosts"): a generated registries.conf (``--registries-conf``)
whose ``[[registry]]`` for the host has the server as location and the pull-capable hosts as mirrors
(``insecure`` for ``http://`` or ``skip_verify``; a mirror without ``resolve`` serves by digest only),
and, when the server's table names a ``ca`` or ``client``, a generated certificate directory
(``--cert-dir``) with its CAs and first client pair (keyed by the files' contents, so a rotated one is
copied again).  A mirror with a ``ca`` or ``client`` of its own is skipped with a warning: one
certificate directory serves every endpoint of a mount, so its CA would be trusted for the upstream
too.  Host URLs with a path (``override_path``) have no registries.conf form and are skipped with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shoal.atomicfile import Durability, write_atomic
from shoal.errors import UsageError

__all__ = ["HostsDir", "DEFAULT_HOSTS_DIR"]

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"


@dataclass(frozen=True)
class _End:
    location: str
    insecure: bool
    digest_only: bool = False


def _strs(v: Any, what: str, path: Path) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise UsageError(f"{path}: {what} must be a string or an array of strings")


def _clients(v: Any, path: Path) -> list[tuple[str, str]]:
    """``client``: "cert.pem" (cert and key in one file), ["a.pem", ...], or [["cert", "key"], ...]."""
    items = v if isinstance(v, list) else [v]
    out = []
    for it in items:
        if isinstance(it, str):
            out.append((it, it))
        elif isinstance(it, list) and len(it) == 2 and all(isinstance(x, str) for x in it):
            out.append((it[0], it[1]))
        else:
            raise UsageError(f"{path}: client must be a file or a [certificate, key] pair (or an array of them)")
    return out


def _contents(path: Path, files: list[Path]) -> bytes:
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(str(f).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        except OSError as e:
            raise UsageError(f"{path}: cannot read a certificate: {e}") from None
    return h.digest()


class HostsDir:
    def __init__(self, root: Path, out: Path) -> None:
        self.root = root
        self.out = out  # where the generated files go

    def _file(self, host: str) -> Path | None:
        for name in (host, "_default"):
            p = self.root / name / "hosts.toml"
            if p.is_file():
                return p
        return None

    def mount_args(self, host: str) -> list[str]:
        """``shoal mount`` options for images of ``host`` (``host[:port]``): none without a hosts.toml."""
        path = self._file(host)
        if path is None:
            return []
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read {path}: {e}") from None
        cas: list[Path] = []
        clients: list[tuple[Path, Path]] = []

        def end(url: str, table: dict[str, Any], what: str) -> _End | None:
            u = urlsplit(url if "://" in url else f"https://{url}")
            if u.scheme not in ("http", "https") or not u.netloc or u.path.strip("/") or u.query:
                log.warning("%s: %s %r is not scheme://host[:port]; skipped", path, what, url)
                return None
            own_cas = [path.parent / c for c in _strs(table.get("ca", []), "ca", path)]
            own_clients = [(path.parent / c, path.parent / k) for c, k in _clients(table.get("client", []), path)]
            if what == "server":
                cas.extend(own_cas)
                clients.extend(own_clients)
            elif own_cas or own_clients:
                # one --cert-dir serves every endpoint of a mount: a mirror's own CA would be trusted for
                # the upstream too (and its client key shown to it), so such a mirror is not used
                log.warning("%s: mirror %r names its own ca/client, which a lazy mount cannot keep to that "
                            "mirror; skipped", path, url)
                return None
            caps = _strs(table.get("capabilities", ["pull", "resolve", "push"]), "capabilities", path)
            if "pull" not in caps:
                return None
            return _End(u.netloc, u.scheme == "http" or table.get("skip_verify") is True, "resolve" not in caps)

        default = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
        server = end(str(doc.get("server") or default), doc, "server") or _End(host, False)
        hosts = doc.get("host") or {}
        if not isinstance(hosts, dict) or not all(isinstance(t, dict) for t in hosts.values()):
            raise UsageError(f'{path}: host must be tables [host."URL"]')
        mirrors = [m for url, t in hosts.items() if (m := end(url, t, "host")) is not None]
        q = json.dumps  # a JSON string is a valid TOML basic string: quotes and escapes are kept
        lines = ["[[registry]]", f"prefix = {q(host)}", f"location = {q(server.location)}",
                 f"insecure = {str(server.insecure).lower()}"]
        for m in mirrors:
            lines += ["[[registry.mirror]]", f"location = {q(m.location)}", f"insecure = {str(m.insecure).lower()}"]
            if m.digest_only:
                lines.append('pull-from-mirror = "digest-only"')
        text = "\n".join(lines) + "\n"
        # the certificates' contents are in the key: a CA or key rotated at the same path is copied again
        key = hashlib.sha256(f"{host}\n{text}".encode() + _contents(path, [*cas, *(f for c in clients for f in c)])
                             ).hexdigest()[:16]
        self.out.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.out / f"{key}.conf"
        if not conf.exists():
            write_atomic(conf, text.encode(), durability=Durability.PROCESS)
        args = ["--registries-conf", str(conf)]
        if cas or clients:
            certs = self.out / f"{key}.certs"
            if not certs.is_dir():
                tmp = self.out / f"{key}.certs.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(mode=0o700)
                try:
                    for i, ca in enumerate(cas):
                        shutil.copyfile(ca, tmp / f"ca{i}.crt")
                    if clients:
                        shutil.copyfile(clients[0][0], tmp / "client.cert")
                        shutil.copyfile(clients[0][1], tmp / "client.key")
                except OSError as e:
                    raise UsageError(f"{path}: cannot read a certificate: {e}") from None
                tmp.rename(certs)
            args += ["--cert-dir", str(certs)]
        log.info("images of %s: registries per %s (%d mirrors)", host, path, len(mirrors))
        return args
