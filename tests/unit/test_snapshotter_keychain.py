"""The CRI keychain of ``shoal snapshotter`` (docs/containerd.md "Credentials")."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from shoal.errors import FormatError
from shoal.snapshotter.keychain import CriAuth, Keychain, auth_from_cri, normalize_repository
from shoal.transports.registry.credentials import load_credentials


@pytest.mark.parametrize(("ref", "repo"), [
    ("busybox", "docker.io/library/busybox"),
    ("busybox:1.36", "docker.io/library/busybox"),
    ("docker.io/library/busybox@sha256:" + "a" * 64, "docker.io/library/busybox"),
    ("index.docker.io/org/app:1", "docker.io/org/app"),
    ("org/app", "docker.io/org/app"),
    ("localhost/app:1", "localhost/app"),
    ("127.0.0.1:5000/a/b:tag", "127.0.0.1:5000/a/b"),
    ("docker://quay.io/org/app@sha256:" + "b" * 64, "quay.io/org/app"),
])
def test_normalize_repository(ref: str, repo: str) -> None:
    assert normalize_repository(ref) == repo


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_auth_from_cri_follows_containerd() -> None:
    img = "reg.io:5000/app:1"
    assert auth_from_cri(img, "u", "p", "", "", "", "") == CriAuth("u", "p")
    assert auth_from_cri(img, "", "", _b64("u:p:x"), "https://reg.io:5000", "", "") == CriAuth("u", "p:x")
    assert auth_from_cri(img, "", "", "", "", "tok", "") == CriAuth(identity_token="tok")
    assert auth_from_cri(img, "u", "p", "", "https://other.io", "", "") is None  # for another host
    assert auth_from_cri(img, "", "", "not base64!", "", "", "") is None
    assert auth_from_cri(img, "", "", "", "", "", "bearer") is None  # registry_token: refused
    assert auth_from_cri("app", "u", "p", "", "https://index.docker.io/v1/", "", "") == CriAuth("u", "p")
    assert repr(CriAuth("u", "s3cret", "t0ken")) == "CriAuth(username='u')"


def test_keychain_persists_0600_and_shoal_reads_it(tmp_path: Path) -> None:
    kc = Keychain(tmp_path)
    assert kc.authfile_for("reg.io/app:1") is None
    kc.record("reg.io/app:1", CriAuth("u", "p"))
    kc.record("reg.io/tok/app:2", CriAuth(identity_token="t"))
    path = tmp_path / "cri-auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kc.authfile_for("reg.io/app@sha256:" + "c" * 64) == path
    assert kc.authfile_for("reg.io/other:1") is None
    # a restarted snapshotter reads them back; shoal's auth-file reader understands the file
    again = Keychain(tmp_path)
    assert again.authfile_for("reg.io/tok/app") == path
    assert load_credentials("reg.io", "app", path) is not None
    c = load_credentials("reg.io", "app", path)
    assert c is not None and (c.username, c.password) == ("u", "p")
    t = load_credentials("reg.io", "tok/app", path)
    assert t is not None and t.identity_token == "t"


def test_keychain_revert_restores_the_working_credentials(tmp_path: Path) -> None:
    kc = Keychain(tmp_path)
    good, bad = CriAuth("u", "p"), CriAuth("u", "wrong")
    old = kc.entry_for("reg.io/app")
    kc.record("reg.io/app", bad)
    kc.revert("reg.io/app", bad, old)  # a failed first pull: nothing kept
    assert kc.authfile_for("reg.io/app") is None
    kc.record("reg.io/app", good)
    old = kc.entry_for("reg.io/app:2")
    kc.record("reg.io/app:2", bad)
    kc.revert("reg.io/app:2", bad, old)
    assert json.loads((tmp_path / "cri-auth.json").read_text())["auths"] == {"reg.io/app": good.entry()}


def test_keychain_refuses_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "cri-auth.json").write_text('{"auths": {"reg.io/app": 3}}')
    with pytest.raises(FormatError, match="cri-auth.json"):
        Keychain(tmp_path)
