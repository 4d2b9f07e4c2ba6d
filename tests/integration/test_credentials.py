"""Credentials where podman, skopeo and docker keep them, against a real htpasswd registry (issue 9).

- each file of containers-auth.json(5)'s order is read: the primary ``$XDG_RUNTIME_DIR`` file
  (the code path of root's ``/run/containers/0/auth.json``), ``$XDG_CONFIG_HOME``, docker's
  ``config.json`` and the legacy ``~/.dockercfg``; a pull with none of them is refused;
- a per-repository key is the one sent: the host key is wrong, the ``HOST/creds/a`` key right, and
  a pull of ``creds/a`` succeeds while one of ``creds/b`` is refused;
- ``credHelpers`` and ``credsStore`` run ``docker-credential-NAME get`` (server URL on stdin); a
  helper's identity token is refused by a Basic registry with one clear line;
- ``shoal login`` writes where podman does, and skopeo reads it; ``skopeo login`` writes, shoal reads;
- ``--creds USER`` takes the password from standard input;
- a lazy mount given ``--creds u:p`` (through a proxy redirecting blobs to a presigned-style URL):
  the daemon's ``/proc/PID/cmdline``, its log (``-vv``), its state file and ``--json`` hold neither
  the password nor the redirect's query string.

Every test runs with HOME, XDG_RUNTIME_DIR and XDG_CONFIG_HOME in its own temporary directory: no
real ``/run`` or ``~`` file is read or written.
"""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mount"))

from mountkit import run_dir_fixture  # noqa: E402,F401  (the run_dir fixture)

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, basic_registry, proxy_factory  # noqa: E402,F401

WRONG = "not-the-password"


def _b64(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def _write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


class Env:
    """This test's HOME, runtime and config directories (set in os.environ for the subprocesses)."""

    def __init__(self, tmp: Path) -> None:
        self.home, self.runtime, self.config = tmp / "home", tmp / "xdg-run", tmp / "xdg-config"
        for d in (self.home, self.runtime, self.config):
            d.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()

    @property
    def primary(self) -> Path:  # podman's: $XDG_RUNTIME_DIR/containers/auth.json
        return self.runtime / "containers" / "auth.json"


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path)
    monkeypatch.setenv("HOME", str(e.home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(e.runtime))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(e.config))
    monkeypatch.setenv("PATH", f"{e.bin}{os.pathsep}{os.environ['PATH']}")
    for v in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG"):
        monkeypatch.delenv(v, raising=False)
    return e


@pytest.fixture(scope="module")
def pushed(basic_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image pushed to ``creds/a:1`` and ``creds/b:1`` (with --creds); returns its store."""
    d = tmp_path_factory.mktemp("creds-image")
    tree = d / "tree"
    helpers.write_tree(tree, {"hello.txt": b"hello credentials\n", "sub/data.bin": os.urandom(300_000)})
    store = d / "store"
    helpers.run_shoal(store, "build", tree, "img:1")
    creds = f"{basic_registry.username}:{basic_registry.password}"
    for repo in ("creds/a", "creds/b"):
        helpers.run_shoal(store, "push", "img:1", f"docker://{basic_registry.host}/{repo}:1", "--creds", creds)
    return store


def pull(reg: Registry, repo: str, tmp: Path, *extra: str, check: bool = True,
         **kw: object) -> subprocess.CompletedProcess[bytes]:
    store = tmp / f"pull-{len(list(tmp.glob('pull-*')))}"
    return helpers.run_shoal(store, "pull", f"docker://{reg.host}/{repo}:1", "x:1", *extra, check=check, **kw)


def test_nothing_saved_is_refused(pushed: Path, basic_registry: Registry, env: Env, tmp_path: Path) -> None:
    p = pull(basic_registry, "creds/a", tmp_path, check=False)
    helpers.assert_one_line_error(p, "requires authentication")


@pytest.mark.parametrize("where", ["primary", "xdg_config", "docker", "dockercfg"])
def test_each_file_of_podmans_order(where: str, pushed: Path, basic_registry: Registry, env: Env,
                                    tmp_path: Path) -> None:
    reg = basic_registry
    entry = {"auth": _b64(reg.username, reg.password)}
    if where == "primary":
        _write(env.primary, {"auths": {reg.host: entry}})
    elif where == "xdg_config":
        _write(env.config / "containers" / "auth.json", {"auths": {reg.host: entry}})
    elif where == "docker":
        _write(env.home / ".docker" / "config.json", {"auths": {f"https://{reg.host}": entry}})
    else:  # the legacy format: hosts at the top level, no "auths"
        _write(env.home / ".dockercfg", {f"https://{reg.host}/v1/": {**entry, "email": "x@example.com"}})
    pull(reg, "creds/a", tmp_path)


def test_the_first_file_wins(pushed: Path, basic_registry: Registry, env: Env, tmp_path: Path) -> None:
    reg = basic_registry
    _write(env.primary, {"auths": {reg.host: {"auth": _b64(reg.username, WRONG)}}})
    _write(env.config / "containers" / "auth.json", {"auths": {reg.host: {"auth": _b64(reg.username, reg.password)}}})
    helpers.assert_one_line_error(pull(reg, "creds/a", tmp_path, check=False), "refused")
    env.primary.unlink()
    pull(reg, "creds/a", tmp_path)


def test_per_repository_key_is_the_one_sent(pushed: Path, basic_registry: Registry, env: Env,
                                            tmp_path: Path) -> None:
    reg = basic_registry
    _write(env.primary, {"auths": {
        reg.host: {"auth": _b64(reg.username, WRONG)},
        f"{reg.host}/creds/a": {"auth": _b64(reg.username, reg.password)},
        f"{reg.host}/creds/b/deeper": {"auth": _b64(reg.username, reg.password)},  # not creds/b
    }})
    pull(reg, "creds/a", tmp_path)
    helpers.assert_one_line_error(pull(reg, "creds/b", tmp_path, check=False), "refused")
    # a namespace key covers the repositories under it
    _write(env.primary, {"auths": {reg.host: {"auth": _b64(reg.username, WRONG)},
                                   f"{reg.host}/creds": {"auth": _b64(reg.username, reg.password)}}})
    pull(reg, "creds/b", tmp_path)


HELPER = """#!{python}
import json, os, sys
url = sys.stdin.read()
with open(os.environ["SHOALTEST_HELPER_LOG"], "a") as f:
    f.write(json.dumps([sys.argv[1], url]) + "\\n")
known = json.loads(os.environ["SHOALTEST_HELPER_DB"])
if sys.argv[1] != "get" or url.strip() not in known:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = known[url.strip()]
print(json.dumps({{"ServerURL": url.strip(), "Username": user, "Secret": secret}}))
"""


@pytest.fixture()
def helper(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[str]]], Path]:
    """Install ``docker-credential-shoaltest`` on PATH; ``helper({server: [user, secret]})`` sets what
    it knows and returns the log of its calls."""
    exe = env.bin / "docker-credential-shoaltest"
    exe.write_text(HELPER.format(python=sys.executable))
    exe.chmod(0o755)
    log = tmp_path / "helper.log"
    monkeypatch.setenv("SHOALTEST_HELPER_LOG", str(log))

    def set_db(db: dict[str, list[str]]) -> Path:
        monkeypatch.setenv("SHOALTEST_HELPER_DB", json.dumps(db))
        return log

    return set_db


def test_credential_helpers(pushed: Path, basic_registry: Registry, env: Env, tmp_path: Path,
                            helper: Callable[[dict[str, list[str]]], Path]) -> None:
    reg = basic_registry
    log = helper({reg.host: [reg.username, reg.password]})
    # credHelpers in docker's config.json (an auth.json's host entry for another host is no obstacle)
    _write(env.home / ".docker" / "config.json", {"credHelpers": {reg.host: "shoaltest"}})
    pull(reg, "creds/a", tmp_path)
    assert [json.loads(ln) for ln in log.read_text().splitlines()][0] == ["get", reg.host]
    # credsStore in an auth.json (the default helper of every host)
    (env.home / ".docker" / "config.json").unlink()
    _write(env.primary, {"auths": {reg.host: {}}, "credsStore": "shoaltest"})
    pull(reg, "creds/a", tmp_path)
    # a helper that has nothing: no credentials, the registry's refusal
    helper({})
    helpers.assert_one_line_error(pull(reg, "creds/a", tmp_path, check=False), "requires authentication")
    # an identity token (Username "<token>") cannot answer a Basic challenge: one clear line
    helper({reg.host: ["<token>", "an-identity-token"]})
    msg = helpers.assert_one_line_error(pull(reg, "creds/a", tmp_path, check=False), "identity token")
    assert "an-identity-token" not in msg


def test_login_writes_where_podman_does_and_skopeo_agrees(pushed: Path, basic_registry: Registry, env: Env,
                                                          tmp_path: Path) -> None:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    reg = basic_registry
    p = helpers.run_shoal(None, "login", reg.host, "-u", reg.username, "--password-stdin",
                          input=reg.password.encode())
    assert str(env.primary) in p.stdout.decode()
    assert json.loads(env.primary.read_text())["auths"][reg.host]["auth"] == _b64(reg.username, reg.password)
    skopeo = ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/creds/a:1"]
    subprocess.run(skopeo, check=True, capture_output=True, timeout=60)  # skopeo reads shoal's login
    env.primary.unlink()
    assert subprocess.run(skopeo, capture_output=True, timeout=60).returncode != 0
    subprocess.run(["skopeo", "login", "--tls-verify=false", "-u", reg.username, "--password-stdin", reg.host],
                   input=reg.password.encode(), check=True, capture_output=True, timeout=60)
    assert env.primary.exists()  # where skopeo wrote: shoal reads it
    pull(reg, "creds/a", tmp_path)


def test_creds_user_reads_the_password_from_stdin(pushed: Path, basic_registry: Registry, env: Env,
                                                  tmp_path: Path) -> None:
    reg = basic_registry
    pull(reg, "creds/a", tmp_path, "--creds", reg.username, input=reg.password.encode() + b"\n")
    p = pull(reg, "creds/a", tmp_path, "--creds", reg.username, check=False, input=b"")
    helpers.assert_one_line_error(p, "no password")


@pytest.fixture()
def mount_env(run_dir: Path) -> Path:
    """mountkit's own run dir (daemons killed and mounts detached at teardown), for root with /dev/fuse."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mount tests need root and /dev/fuse")
    return run_dir


def test_mount_daemon_shows_no_secret(pushed: Path, basic_registry: Registry, env: Env, tmp_path: Path,
                                      mount_env: Path, proxy_factory: Callable[..., RegistryProxy]) -> None:
    from mountkit import pid_alive, state_of, wait_for

    reg = basic_registry
    secret = reg.password
    basic = "Basic " + _b64(reg.username, secret)
    proxy = proxy_factory(reg.url, redirect_blobs=True, blobstore_auth=basic)  # 307 to .../blob?X-Sig=abc
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = f"docker://{proxy.host}/creds/a:1"
    p = helpers.run_shoal(tmp_path / "cold", "-vv", "mount", "--json", "--prefetch", "none", ref, mnt,
                          "--creds", f"{reg.username}:{secret}")
    st = state_of(mount_env)
    pid = int(st["pid"])  # type: ignore[call-overload]
    try:
        assert (mnt / "hello.txt").read_bytes() == b"hello credentials\n"
        assert len((mnt / "sub" / "data.bin").read_bytes()) == 300_000
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"--creds" in cmdline and f"{reg.username}:***".encode() in cmdline
        log = Path(str(st["log"])).read_text()
        assert "redirected to http://127.0.0.2:" in log  # the lazy path logged the redirect (-vv) ...
        assert proxy.redirect_log and all("authorization" not in e for e in proxy.redirect_log)  # none sent there
        state_files = [f.read_bytes() for f in (mount_env / "mounts").glob("*.json")]
        for name, text in [("cmdline", cmdline), ("stdout", p.stdout), ("stderr", p.stderr),
                           ("log", log.encode()), *(("state", s) for s in state_files)]:
            assert secret.encode() not in text, name
            assert _b64(reg.username, secret).encode() not in text, name
            assert b"X-Sig" not in text, name  # ... without its query string
    finally:
        helpers.run_shoal(None, "umount", mnt)
        wait_for(lambda: not pid_alive(pid), 5, "daemon exit")
