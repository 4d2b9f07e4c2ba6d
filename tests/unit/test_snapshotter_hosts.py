"""containerd hosts.toml -> shoal mount's registries.conf and certificate directory (snapshotter/hosts.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shoal.errors import UsageError
from shoal.snapshotter.hosts import HostsDir
from shoal.transports.registry.sysregistries import load


def _write(root: Path, host: str, text: str) -> None:
    (root / host).mkdir(parents=True, exist_ok=True)
    (root / host / "hosts.toml").write_text(text)


def test_mirrors_server_tls_and_certificates(tmp_path: Path) -> None:
    root = tmp_path / "certs.d"
    _write(root, "r.example:5000", '''server = "https://r.example:5000"
ca = "ca.pem"
client = [["c.cert", "c.key"]]
[host."http://m1.example"]
  capabilities = ["pull", "resolve"]
[host."https://m2.example:8443"]
  capabilities = ["pull"]
  skip_verify = true
[host."https://own-ca.example"]
  ca = "other-ca.pem"
[host."https://m3.example/some/path"]
  capabilities = ["pull", "resolve"]
[host."https://push.example"]
  capabilities = ["push"]
''')
    for n in ("ca.pem", "c.cert", "c.key", "other-ca.pem"):
        (root / "r.example:5000" / n).write_text(n)
    args = HostsDir(root, tmp_path / "out").mount_args("r.example:5000")
    assert args[0] == "--registries-conf" and args[2] == "--cert-dir"
    (reg,) = tomllib.loads(Path(args[1]).read_text())["registry"]
    assert reg["prefix"] == "r.example:5000" and reg["location"] == "r.example:5000" and not reg["insecure"]
    assert reg["mirror"] == [{"location": "m1.example", "insecure": True},
                             {"location": "m2.example:8443", "insecure": True, "pull-from-mirror": "digest-only"}]
    _, sources = load(args[1]).pull_sources("r.example:5000/app", digested=True)  # Shoal reads it so
    assert [(s.name, s.insecure, s.mirror) for s in sources] == [
        ("m1.example/app", True, True), ("m2.example:8443/app", True, True), ("r.example:5000/app", False, False)]
    certs = Path(args[3])
    assert sorted(p.name for p in certs.iterdir()) == ["ca0.crt", "client.cert", "client.key"]
    assert (certs / "ca0.crt").read_text() == "ca.pem"
    assert HostsDir(root, tmp_path / "out").mount_args("r.example:5000") == args  # the same files again
    # a mirror's own CA is never trusted for the others (one --cert-dir serves every endpoint): skipped
    assert "other-ca.pem" not in {p.read_text() for p in certs.iterdir()}
    # a CA rotated at the same path is copied again
    (root / "r.example:5000" / "ca.pem").write_text("rotated")
    again = HostsDir(root, tmp_path / "out").mount_args("r.example:5000")
    assert again[3] != args[3] and (Path(again[3]) / "ca0.crt").read_text() == "rotated"


def test_default_and_none(tmp_path: Path) -> None:
    root = tmp_path / "certs.d"
    assert HostsDir(root, tmp_path / "out").mount_args("a.example") == []
    _write(root, "_default", '[host."http://mirror.local:5001"]\n')
    args = HostsDir(root, tmp_path / "out").mount_args("a.example")
    (reg,) = tomllib.loads(Path(args[1]).read_text())["registry"]
    assert reg["location"] == "a.example" and reg["mirror"] == [{"location": "mirror.local:5001", "insecure": True}]
    _write(root, "bad.example", "server = [")
    with pytest.raises(UsageError, match="hosts.toml"):
        HostsDir(root, tmp_path / "out").mount_args("bad.example")
