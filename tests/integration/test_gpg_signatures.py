"""GPG simple signing against the real registry, the real gpg and the real skopeo 1.9.3 (issue 14,
docs/spec/trust.md §2.1, §4, §5): what Shoal signs with --sign-by, skopeo's signedBy policy accepts (and
refuses under another key); what skopeo copy --sign-by signs, shoal verify --gpg-key, pull and mount accept
under the same policy (and refuse under another key); hostile lookaside files are refused, one line, exit 10,
nothing tagged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, ThreadedServer, registry, reply  # noqa: E402,F401
from shoal.store import Store  # noqa: E402

__all__ = ["registry"]

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("skopeo") is None,
                                reason="needs gpg and skopeo")


def run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(cmd, capture_output=True, timeout=180, env=dict(os.environ, **env))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}: {p.stderr.decode()[-3000:]}")
    return p


def store_names(store: Path) -> set[str]:
    return {name for name, _ in Store.open(store).images()} if store.exists() else set()


@pytest.fixture(scope="module")
def env(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("gpgsig")
    tree = helpers.write_tree(d / "tree", {"etc/hello": b"hello\n" * 1000, "usr/bin/data": os.urandom(200_000)})
    store = d / "store"
    run(helpers.shoal_cmd(store, "build", str(tree), "app:1", "--no-reuse"), {})
    e: dict[str, Any] = {"dir": d, "store": store, "host": registry.host, "la": d / "lookaside"}
    for name in ("a", "b"):
        home = d / f"gnupg-{name}"
        home.mkdir(mode=0o700)
        run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.com>", "ed25519",
             "sign", "never"], {"GNUPGHOME": str(home)})
        out = run(["gpg", "--batch", "--with-colons", "--list-keys"], {"GNUPGHOME": str(home)}).stdout.decode()
        fpr = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")][0]
        (d / f"{name}.gpg").write_bytes(run(["gpg", "--batch", "--export", fpr], {"GNUPGHOME": str(home)}).stdout)
        e[name] = {"home": str(home), "fpr": fpr, "pub": d / f"{name}.gpg"}
    # registries.d: a lookaside (file://) for the test's namespace, as skopeo reads and writes it
    regd = d / "registries.d"
    regd.mkdir()
    (regd / "shoal-test.yaml").write_text(f"docker:\n  {registry.host}/gpg:\n    lookaside: file://{e['la']}\n")
    e["regd"] = regd
    for name, key in (("good", "a"), ("bad", "b")):
        doc = {"default": [{"type": "reject"}], "transports": {"docker": {f"{registry.host}/gpg": [
            {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(e[key]["pub"]),
             "signedIdentity": {"type": "matchRepoDigestOrExact"}}]}}}
        (d / f"policy-{name}.json").write_text(json.dumps(doc))
        e[name] = d / f"policy-{name}.json"
    # podman refuses a runroot longer than 50 characters (xdist's tmp paths are longer): a short one, the
    # same for every podman call on this root (podman records it)
    e["podman_run"] = Path(tempfile.mkdtemp(prefix="shoal-pr-", dir="/tmp"))
    yield e
    shutil.rmtree(e["podman_run"], ignore_errors=True)
    for name in ("a", "b"):
        subprocess.run(["gpgconf", "--kill", "all"], env=dict(os.environ, GNUPGHOME=e[name]["home"]),
                       capture_output=True)


def shoal(e: dict[str, Any], store: Path | None, *args: str, key: str = "a", check: bool = True
          ) -> subprocess.CompletedProcess[bytes]:
    return run(helpers.shoal_cmd(store, *args), {"GNUPGHOME": e[key]["home"]}, check)


def skopeo(e: dict[str, Any], *args: str, key: str = "a", check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(["skopeo", "--registries.d", str(e["regd"]), *args], {"GNUPGHOME": e[key]["home"]}, check)


def skopeo_pull(e: dict[str, Any], ref: str, policy: Path, all_: bool = True) -> subprocess.CompletedProcess[bytes]:
    out = e["dir"] / f"oci-{uuid.uuid4().hex[:8]}"
    return skopeo(e, "--policy", str(policy), "copy", *(["--all"] if all_ else []), "--remove-signatures",
                  "--src-tls-verify=false", ref, f"oci:{out}:x", check=False)


def podman_pull(e: dict[str, Any], ref: str, policy: Path) -> subprocess.CompletedProcess[bytes]:
    """podman pull with private storage; its registries.d is $HOME/.config/containers/registries.d (podman
    has no option for it), so HOME is a directory of the test's."""
    home = e["dir"] / "podman-home"
    if not home.exists():
        (home / ".config" / "containers").mkdir(parents=True)
        shutil.copytree(e["regd"], home / ".config" / "containers" / "registries.d")
    return run(["podman", "--root", str(e["dir"] / "podman-root"), "--runroot", str(e["podman_run"]),
                "--storage-driver", "vfs", "pull", "--signature-policy", str(policy), "--tls-verify=false", ref],
               {"HOME": str(home)}, check=False)


def sig_files(e: dict[str, Any], repo: str) -> list[Path]:
    return sorted((e["la"] / "gpg").glob(f"{repo}@sha256=*/signature-*"))


def test_shoal_signs_skopeo_accepts(env: Any) -> None:
    ref = f"docker://{env['host']}/gpg/s1:1"
    out = json.loads(shoal(env, env["store"], "push", "app:1", ref, "--sign-by", env["a"]["fpr"], "--registries.d",
                           str(env["regd"]), "--json").stdout)
    helpers.check_json_shape("push", out)
    # the index at the tag, the runtime view and the Shoal manifest, each in containers/image's layout
    assert len(out["signed"]) == 3
    for s in out["signed"]:
        hexd = s["digest"].split(":", 1)[1]
        assert s["attachment"] == f"file://{env['la']}/gpg/s1@sha256={hexd}/signature-1"
        assert s["identity"] == f"{env['host']}/gpg/s1:1"
    assert len(sig_files(env, "s1")) == 3
    # skopeo 1.9.3's signedBy (gpgme): accepted with the signer's key, --all (every instance) and not
    p = skopeo_pull(env, ref, env["good"])
    assert p.returncode == 0, p.stderr
    p = skopeo_pull(env, ref, env["good"], all_=False)
    assert p.returncode == 0, p.stderr
    # and refused under a policy naming another key
    p = skopeo_pull(env, ref, env["bad"])
    assert p.returncode != 0 and b"Source image rejected" in p.stderr, p.stderr
    # podman 4.3 (the same containers/image): pull accepted under A's key, refused under B's
    if shutil.which("podman") and os.geteuid() == 0:
        assert podman_pull(env, ref, env["good"]).returncode == 0
        p = podman_pull(env, ref, env["bad"])
        assert p.returncode != 0 and b"Source image rejected" in p.stderr, p.stderr
    # shoal sign --sign-by on an image pushed unsigned: the same
    ref2 = f"docker://{env['host']}/gpg/s1b:1"
    shoal(env, env["store"], "push", "app:1", ref2)
    assert skopeo_pull(env, ref2, env["good"]).returncode != 0  # unsigned: refused
    signed = json.loads(shoal(env, None, "sign", ref2, "--sign-by", env["a"]["fpr"], "--registries.d",
                              str(env["regd"]), "--json").stdout)
    helpers.check_json_shape("sign", signed)
    assert [s["attachment"].rsplit("/", 1)[1] for s in signed["signatures"]] == ["signature-1"] * 3
    p = skopeo_pull(env, ref2, env["good"])
    assert p.returncode == 0, p.stderr
    # signing again with another key appends signature-2; both policies now accept
    shoal(env, None, "sign", ref2, "--sign-by", env["b"]["fpr"], "--registries.d", str(env["regd"]), key="b")
    assert len(sig_files(env, "s1b")) == 6
    assert skopeo_pull(env, ref2, env["bad"]).returncode == 0


def test_skopeo_signs_shoal_accepts(env: Any, tmp_path: Path) -> None:
    src = f"docker://{env['host']}/gpg/s2src:1"
    dst = f"docker://{env['host']}/gpg/s2:1"
    shoal(env, env["store"], "push", "app:1", src)
    skopeo(env, "copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", "--sign-by",
           env["a"]["fpr"], src, dst)
    assert sig_files(env, "s2"), "skopeo wrote no signature to the lookaside"
    rd = ["--registries.d", str(env["regd"])]
    v = json.loads(shoal(env, None, "verify", dst, "--gpg-key", str(env["a"]["pub"]), "--deep", "--json",
                         *rd).stdout)
    helpers.check_json_shape("verify", v)
    assert v["signer"] == env["a"]["fpr"] and v["identity"] == f"{env['host']}/gpg/s2:1" and v["deep"], v
    p = shoal(env, None, "verify", dst, "--gpg-key", str(env["b"]["pub"]), *rd, check=False)
    assert p.returncode == 10, p.stderr
    helpers.assert_one_line_error(p, "another key")
    p = shoal(env, None, "verify", dst, "--gpg-key", str(env["regd"] / "shoal-test.yaml"), *rd, check=False)
    assert p.returncode == 4, p.stderr
    helpers.assert_one_line_error(p, "not an OpenPGP public key")
    st = tmp_path / "st"
    shoal(env, st, "pull", dst, "ok:1", "--signature-policy", str(env["good"]), *rd)
    assert "ok:1" in store_names(st)
    p = shoal(env, st, "pull", dst, "no:1", "--signature-policy", str(env["bad"]), *rd, check=False)
    assert p.returncode == 10, p.stderr
    helpers.assert_one_line_error(p, "signedBy")
    assert "no:1" not in store_names(st)
    # without the registries.d that names the lookaside, there is no signature (containers/image's default place)
    p = shoal(env, st, "pull", dst, "no:2", "--signature-policy", str(env["good"]), "--registries.d",
              str(tmp_path / "none"), check=False)
    assert p.returncode == 10 and b"no signature exists" in p.stderr, p.stderr
    # mount and run: refused under the other key before anything is mounted or run
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = shoal(env, st, "mount", dst, str(mnt), "--signature-policy", str(env["bad"]), *rd, check=False)
    assert p.returncode == 10 and not os.path.ismount(mnt), p.stderr
    helpers.assert_one_line_error(p, "signedBy")
    p = shoal(env, st, "run", "--rm", "--signature-policy", str(env["bad"]), *rd, dst, "--", "/bin/true",
              check=False)
    assert p.returncode == 10, p.stderr
    helpers.assert_one_line_error(p, "signedBy")
    if shutil.which("fusermount3") and os.geteuid() == 0:
        shoal(env, st, "mount", dst, str(mnt), "--signature-policy", str(env["good"]), *rd)
        try:
            assert (mnt / "etc" / "hello").read_bytes() == b"hello\n" * 1000
        finally:
            shoal(env, st, "umount", str(mnt))


def _signed(env: Any, repo: str, *extra: str, key: str = "a") -> tuple[str, list[Path]]:
    ref = f"docker://{env['host']}/gpg/{repo}:1"
    shoal(env, env["store"], "push", "app:1", ref)
    shoal(env, None, "sign", ref, "--sign-by", env[key]["fpr"], "--registries.d", str(env["regd"]), *extra, key=key)
    files = sig_files(env, repo)
    assert len(files) == 3
    return ref, files


@pytest.mark.parametrize("attack", ["huge", "malformed", "another-key", "another-digest", "another-identity",
                                    "truncated"])
def test_hostile_lookaside_refused(env: Any, tmp_path: Path, attack: str) -> None:
    repo = f"h-{attack}"
    if attack == "another-key":
        ref, files = _signed(env, repo, key="b")
    elif attack == "another-identity":
        ref, files = _signed(env, repo, "--sign-identity", f"{env['host']}/gpg/elsewhere:1")
    else:
        ref, files = _signed(env, repo)
        blobs = [f.read_bytes() for f in files]
        for i, f in enumerate(files):
            f.write_bytes({"huge": b"\x00" * (5 << 20), "malformed": b"-----BEGIN PGP MESSAGE-----\n\x00junk",
                           "another-digest": blobs[(i + 1) % len(blobs)],
                           "truncated": blobs[i][: len(blobs[i]) // 2]}[attack])
    st = tmp_path / "st"
    rd = ["--registries.d", str(env["regd"])]
    p = shoal(env, st, "pull", ref, "x:1", "--signature-policy", str(env["good"]), *rd, check=False)
    assert p.returncode == 10, p.stderr
    msg = helpers.assert_one_line_error(p, "signedBy")
    want = {"huge": "larger than 4 MiB", "malformed": "not a valid OpenPGP", "another-key": "another key",
            "another-digest": "the signature is for manifest", "another-identity": "does not match",
            "truncated": ""}[attack]
    assert want in msg, msg
    assert "x:1" not in store_names(st)
    p = shoal(env, None, "verify", ref, "--gpg-key", str(env["a"]["pub"]), *rd, check=False)
    assert p.returncode == 10, p.stderr
    # skopeo agrees
    assert skopeo_pull(env, ref, env["good"]).returncode != 0


def test_http_lookaside(env: Any, tmp_path: Path) -> None:
    """A lookaside served over HTTP is read (404 ends the list); signing into one is refused, as skopeo
    without a file:// staging location."""
    ref, _ = _signed(env, "web")
    la: Path = env["la"]

    def handle(req: Any, body: bytes) -> None:
        path = la / urllib.parse.unquote(urllib.parse.urlsplit(req.path).path).lstrip("/")
        if req.command == "GET" and path.is_file() and la in path.resolve().parents:
            reply(req, 200, path.read_bytes())
        else:
            reply(req, 404)

    srv = ThreadedServer(handle)
    try:
        regd = tmp_path / "registries.d"
        regd.mkdir()
        (regd / "web.yaml").write_text(f"docker:\n  {env['host']}/gpg/web:\n    lookaside: {srv.url}\n")
        st = tmp_path / "st"
        shoal(env, st, "pull", ref, "web:1", "--signature-policy", str(env["good"]), "--registries.d", str(regd))
        assert "web:1" in store_names(st)
        p = skopeo_pull(env, ref, env["good"])  # env's registries.d: the file:// one
        assert p.returncode == 0, p.stderr
        p = shoal(env, None, "sign", ref, "--sign-by", env["a"]["fpr"], "--registries.d", str(regd), check=False)
        assert p.returncode == 2, p.stderr
        helpers.assert_one_line_error(p, "only a file:// lookaside")
        p = shoal(env, env["store"], "push", "app:1", ref, "--sign-by", env["a"]["fpr"], "--registries.d",
                  str(regd), check=False)
        assert p.returncode == 2, p.stderr
        p = shoal(env, env["store"], "push", "app:1", ref, "--sign-by", "0" * 40, "--registries.d",
                  str(env["regd"]), check=False)
        assert p.returncode == 2, p.stderr
        helpers.assert_one_line_error(p, "no such secret key")
    finally:
        srv.close()


def test_copy_carries_lookaside_signatures(env: Any, tmp_path: Path) -> None:
    """shoal copy docker:// -> docker:// takes the source's simple signatures to the destination's lookaside
    (skopeo's copy does); --remove-signatures leaves them; the identity stays the original's."""
    src, _ = _signed(env, "c1src")
    dst = f"docker://{env['host']}/gpg/c1:1"
    rd = ["--registries.d", str(env["regd"])]
    out = json.loads(shoal(env, None, "copy", src, dst, "--json", *rd).stdout)
    helpers.check_json_shape("copy", out)
    assert out["simple_signatures_carried"] == 3, out
    assert len(sig_files(env, "c1")) == 3
    assert [f.read_bytes() for f in sig_files(env, "c1")] == [f.read_bytes() for f in sig_files(env, "c1src")]
    # the signatures name c1src: under exactRepository of the original they verify, and skopeo agrees
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {f"{env['host']}/gpg": [
        {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(env["a"]["pub"]),
         "signedIdentity": {"type": "exactRepository", "dockerRepository": f"{env['host']}/gpg/c1src"}}]}}}
    pol = tmp_path / "remap.json"
    pol.write_text(json.dumps(doc))
    assert skopeo_pull(env, dst, pol).returncode == 0
    shoal(env, tmp_path / "st", "pull", dst, "c1:1", "--signature-policy", str(pol), *rd)
    p = shoal(env, tmp_path / "st", "pull", dst, "c1:2", "--signature-policy", str(env["good"]), *rd, check=False)
    assert p.returncode == 10 and b"does not match" in p.stderr, p.stderr
    # --remove-signatures: none carried
    dst2 = f"docker://{env['host']}/gpg/c2:1"
    out = json.loads(shoal(env, None, "copy", src, dst2, "--remove-signatures", "--json", *rd).stdout)
    assert out["simple_signatures_carried"] == 0 and not sig_files(env, "c2")


def test_sign_with_passphrase(env: Any, tmp_path: Path) -> None:
    """A GPG key with a passphrase: refused without it (one line saying so, nothing written), signed with
    --passphrase-file (gpg's loopback pinentry), as skopeo's --sign-passphrase-file."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    g = {"GNUPGHOME": str(home)}
    try:
        run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "pw", "--quick-gen-key",
             "P <p@example.com>", "ed25519", "sign", "never"], g)
        cols = run(["gpg", "--batch", "--with-colons", "--list-keys"], g).stdout.decode()
        fpr = [ln.split(":")[9] for ln in cols.splitlines() if ln.startswith("fpr:")][0]
        ref = f"docker://{env['host']}/gpg/pw:1"
        shoal(env, env["store"], "push", "app:1", ref)
        rd = ["--registries.d", str(env["regd"])]
        p = run(helpers.shoal_cmd(None, "sign", ref, "--sign-by", fpr, *rd), g, check=False)
        assert p.returncode == 2, p.stderr
        helpers.assert_one_line_error(p, "passphrase")
        assert not sig_files(env, "pw")
        (tmp_path / "pw").write_text("pw\n")
        run(helpers.shoal_cmd(env["store"], "push", "app:1", ref, "--sign-by", fpr, "--sign-passphrase-file",
                              str(tmp_path / "pw"), *rd), g)
        assert len(sig_files(env, "pw")) == 3
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=dict(os.environ, **g), capture_output=True)
