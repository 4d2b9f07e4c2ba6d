"""Credential lookup rules (containers-auth.json(5) order, per-repository keys, legacy .dockercfg),
the repository a request's scopes name, masking secrets in /proc/PID/cmdline, and URL redaction."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.errors import UsageError
from shoal.mount.proctitle import mask_args
from shoal.transports.registry.auth import scope_repository
from shoal.transports.registry.credentials import (
    Credentials,
    auth_file_candidates,
    default_auth_file,
    load_credentials,
    store_credentials,
)
from shoal.transports.registry.responses import redact

HOST = "reg.example:5000"


def _entry(user: str, pw: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}


def _write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for v in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(v, raising=False)
    return h


def test_podmans_file_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # without XDG_RUNTIME_DIR the primary file is /run/containers/$UID/auth.json (not touched here)
    assert auth_file_candidates() == [Path(f"/run/containers/{os.getuid()}/auth.json"),
                                      home / ".config/containers/auth.json", home / ".docker/config.json",
                                      home / ".dockercfg"]
    run, cfg = tmp_path / "run", tmp_path / "cfg"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    files = [run / "containers/auth.json", cfg / "containers/auth.json", home / ".docker/config.json"]
    assert auth_file_candidates() == files + [home / ".dockercfg"]
    for i, f in enumerate(files):
        _write(f, {"auths": {HOST: _entry(f"u{i}", "pw")}})
    _write(home / ".dockercfg", {f"https://{HOST}": _entry("u3", "pw")})
    for i, f in enumerate(files):
        assert load_credentials(HOST) == Credentials(f"u{i}", "pw")
        f.unlink()
    assert load_credentials(HOST) == Credentials("u3", "pw")
    # --authfile / $REGISTRY_AUTH_FILE replaces the primary file (podman's --authfile)
    other = tmp_path / "other.json"
    _write(other, {"auths": {HOST: _entry("explicit", "pw")}})
    _write(run / "containers/auth.json", {"auths": {HOST: _entry("runtime", "pw")}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(other))
    assert auth_file_candidates()[0] == other and run / "containers/auth.json" not in auth_file_candidates()
    assert load_credentials(HOST) == Credentials("explicit", "pw")
    # a missing $XDG_RUNTIME_DIR is skipped (and login refuses to write there)
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert auth_file_candidates()[0] == cfg / "containers/auth.json"
    with pytest.raises(UsageError, match="XDG_RUNTIME_DIR"):
        default_auth_file()


def test_login_writes_the_primary_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert store_credentials(HOST, "alice", "pw") == run / "containers/auth.json" == auth_file_candidates()[0]
    assert load_credentials(HOST) == Credentials("alice", "pw")


def test_per_repository_keys(home: Path) -> None:
    _write(home / ".config/containers/auth.json", {"auths": {
        HOST: _entry("host", "p"),
        f"{HOST}/team": _entry("team", "p"),
        f"{HOST}/team/app": _entry("app", "p"),
        f"{HOST}/team/app/sub": {},  # an empty entry does not hide the ones above it
        "docker.io/library/busybox": _entry("hub-busybox", "p"),
        "https://index.docker.io/v1/": _entry("hub", "p"),
    }})
    assert load_credentials(HOST) == Credentials("host", "p")
    assert load_credentials(HOST, "team/app") == Credentials("app", "p")
    assert load_credentials(HOST, "team/app/sub") == Credentials("app", "p")
    assert load_credentials(HOST, "team/other") == Credentials("team", "p")
    assert load_credentials(HOST, "teamwork/app") == Credentials("host", "p")  # components, not prefixes
    assert load_credentials(HOST, "other") == Credentials("host", "p")
    assert load_credentials("docker.io", "library/busybox") == Credentials("hub-busybox", "p")
    assert load_credentials("registry-1.docker.io", "library/alpine") == Credentials("hub", "p")


def test_legacy_dockercfg_has_host_keys_only(home: Path) -> None:
    _write(home / ".dockercfg", {f"https://{HOST}/v1/": {**_entry("legacy", "p"), "email": "e@x"},
                                 "other.example/team": _entry("path-key", "p")})
    assert load_credentials(HOST, "team/app") == Credentials("legacy", "p")
    assert load_credentials("other.example", "team/app") is None


def test_scope_repository() -> None:
    assert scope_repository(()) is None
    assert scope_repository(["registry:catalog:*"]) is None
    assert scope_repository(["repository:a/b:pull"]) == "a/b"
    # a cross-repository mount: the repository pushed to decides
    assert scope_repository(["repository:src/x:pull", "repository:dst/y:pull,push"]) == "dst/y"
    assert scope_repository(["repository:reg.io:5000/x:pull"]) == "reg.io:5000/x"


def test_mask_args() -> None:
    args = ["shoal", "mount", "--creds", "alice:s3cret", "--src-creds=bob:pw:with:colons", "--dest-creds",
            "carol", "--password", "pw", "--", "--creds", "x:operand"]
    assert mask_args(args) == ["shoal", "mount", "--creds", "alice:***", "--src-creds=bob:***", "--dest-creds",
                               "carol", "--password", "**", "--", "--creds", "x:operand"]
    assert mask_args(["shoal", "login", "-ps3cret"], passwords=("-p",)) == ["shoal", "login", "-p***"]


def test_scrub_argv_in_proc_cmdline() -> None:
    code = ("import sys; from shoal.mount.proctitle import scrub_argv; r = scrub_argv(); "
            "sys.stdout.buffer.write(open('/proc/self/cmdline', 'rb').read() + str(r).encode())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, "--creds", "alice:topsecret-1234", "x"], env=env,
                         capture_output=True, check=True).stdout
    assert b"topsecret" not in out and out.endswith(b"True")
    args = out[:-4].rstrip(b"\0").split(b"\0")
    assert args[-3:] == [b"--creds", b"alice:***", b"x"]


def test_scrub_argv_masks_only_the_arguments_of_a_padded_area() -> None:
    """A fork server's child writes its command line into a padded area (set_title), leaving a long NUL
    tail; its mount daemon's scrub masks the arguments only, not one empty argument per byte of it."""
    code = ("import sys; from shoal.mount import proctitle; seen = []; real = proctitle.mask_args; "
            "proctitle.mask_args = lambda a, *r: seen.append(len(a)) or real(a, *r); "
            "proctitle.set_title(['shoal', 'mount', '--creds', 'alice:topsecret-1234', 'x']); "
            "r = proctitle.scrub_argv(); "
            "sys.stdout.buffer.write(open('/proc/self/cmdline', 'rb').read() + repr((r, seen)).encode())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, "p" * 4096], env=env, capture_output=True, check=True).stdout
    area, _, tail = out.rpartition(b"\0")
    # set_title masked already (nothing left for the scrub); each looked at the five arguments only
    assert tail == b"(False, [5, 5])"
    assert b"topsecret" not in area and area.rstrip(b"\0").split(b"\0") == [b"shoal", b"mount", b"--creds",
                                                                           b"alice:***", b"x"]


def test_redact() -> None:
    assert redact("https://u:p@cdn.example:8443/v2/a/blobs/sha256:00?X-Amz-Signature=abc#f") == \
        "https://cdn.example:8443/v2/a/blobs/sha256:00"
    assert redact("http://[::1]:5000/v2/?q=1") == "http://[::1]:5000/v2/"
