"""GPG simple signing (docs/spec/trust.md §2.1, §4): registries.d, the lookaside layout, the real gpg's
verification in a temporary GNUPGHOME, and hostile signatures refused with a reason."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import FormatError, TransportError, UsageError
from shoal.transports.context import SystemContext
from shoal.transports.docker import parse_docker
from shoal.trust import gpg, lookaside, policy
from shoal.trust.lookaside import LookasideSignature

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")

D1 = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32
REF = "reg.example:5000/team/app:1"


def _gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    p = subprocess.run(["gpg", "--batch", "--no-tty", "--homedir", str(home), *args], input=data,
                       capture_output=True, timeout=120, check=True)
    return p.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("gpg")
    out: dict[str, Any] = {"dir": d}
    for name in ("a", "b"):
        home = d / name
        home.mkdir(mode=0o700)
        _gpg(home, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.com>", "ed25519", "sign", "never")
        fpr = [ln.split(":")[9] for ln in _gpg(home, "--with-colons", "--list-keys").decode().splitlines()
               if ln.startswith("fpr:")][0]
        out[name] = {"home": home, "fpr": fpr, "pub": _gpg(home, "--export", fpr),
                     "asc": _gpg(home, "--export", "--armor", fpr)}
    yield out
    for name in ("a", "b"):
        subprocess.run(["gpgconf", "--homedir", str(out[name]["home"]), "--kill", "all"], capture_output=True)


def _sign(k: dict[str, Any], payload: bytes, *extra: str) -> bytes:
    return _gpg(k["home"], "--local-user", k["fpr"], *extra, "--output", "-", "--sign", data=payload)


def test_payload_is_containers_image_s() -> None:
    raw = gpg.make_simple_payload(D1, REF, timestamp=1700000000)
    assert raw == (b'{"critical":{"identity":{"docker-reference":"reg.example:5000/team/app:1"},"image":'
                   b'{"docker-manifest-digest":"' + D1.encode() + b'"},"type":"atomic container signature"},'
                   b'"optional":{"creator":"shoal","timestamp":1700000000}}')
    p = gpg.parse_simple_payload(raw)
    assert (p.digest, p.reference) == (D1, REF)
    doc = json.loads(raw)
    for bad in ({**doc, "optional": None},  # cosign allows null; simple signing does not
                {**doc, "critical": {**doc["critical"], "type": "cosign container image signature"}},
                {**doc, "critical": {**doc["critical"], "extra": 1}}, {"critical": doc["critical"]}):
        with pytest.raises(FormatError):
            gpg.parse_simple_payload(json.dumps(bad).encode())


def test_registries_d_lookup(tmp_path: Path) -> None:
    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "a.yaml").write_text("default-docker:\n  lookaside: https://sigs.example/all\n"
                              "docker:\n  reg.example:5000/team:\n    lookaside: file:///srv/team\n"
                              "    lookaside-staging: file:///stage/team\n")
    (d / "b.yaml").write_text("docker:\n  reg.example:5000/team/app:1:\n    use-sigstore-attachments: true\n"
                              "  other.example:\n    sigstore: file:///old\n    sigstore-staging: file:///old-stage\n")
    (d / "ignored.yml").write_text("{not yaml")
    ctx = SystemContext(registries_d=str(d))
    ref = parse_docker("//" + REF)
    # the tag's own entry names no location: the namespace's does
    assert lookaside.lookaside_base(ref, ctx, write=False)[0] == "file:///srv/team/team/app"
    assert lookaside.lookaside_base(ref, ctx, write=True)[0] == "file:///stage/team/team/app"
    assert lookaside.lookaside_base(parse_docker("//other.example/x/y:2"), ctx, False)[0] == "file:///old/x/y"
    assert lookaside.lookaside_base(parse_docker("//other.example/x/y:2"), ctx, True)[0] == "file:///old-stage/x/y"
    assert lookaside.lookaside_base(parse_docker("//quay.io/z:1"), ctx, False)[0] == "https://sigs.example/all/z"
    # docker.io: the repository path is library/NAME
    assert lookaside.lookaside_base(parse_docker("//busybox"), ctx, True)[0] == "https://sigs.example/all/library/busybox"
    with pytest.raises(UsageError, match="only a file:// lookaside"):
        lookaside.writable_base(parse_docker("//quay.io/z:1"), ctx)
    # none configured: containers/image's built-in default
    empty = SystemContext(registries_d=str(tmp_path / "none"))
    base = lookaside.lookaside_base(ref, empty, False)[0]
    want = "file:///var/lib/containers/sigstore" if os.geteuid() == 0 else "file://" + os.path.expanduser(
        "~/.local/share/containers/sigstore")
    assert base == want + "/team/app"
    (d / "c.yaml").write_text("docker:\n  reg.example:5000/team:\n    lookaside: file:///dup\n")
    with pytest.raises(FormatError, match="defined both"):
        lookaside.load_registries_d(str(d))


def test_lookaside_write_and_read(tmp_path: Path) -> None:
    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "x.yaml").write_text(f"docker:\n  reg.example:5000:\n    lookaside: file://{tmp_path}/la\n")
    ctx = SystemContext(registries_d=str(d))
    ref = parse_docker("//" + REF)
    urls = lookaside.write_lookaside(ref, ctx, D1, [b"one", b"two"])
    assert urls == [f"file://{tmp_path}/la/team/app@sha256={'ab' * 32}/signature-{n}" for n in (1, 2)]
    assert lookaside.write_lookaside(ref, ctx, D1, [b"one", b"three"])[1].endswith("/signature-3")
    got = lookaside.read_lookaside(ref, ctx, D1)
    assert [s.data for s in got] == [b"one", b"two", b"three"]
    assert lookaside.read_lookaside(ref, ctx, D2) == []
    big = tmp_path / f"la/team/app@sha256={'ab' * 32}/signature-4"
    with open(big, "wb") as f:
        f.truncate(lookaside.MAX_SIGNATURE + 1)
    last = lookaside.read_lookaside(ref, ctx, D1)[-1]
    assert last.data == b"" and "larger than 4 MiB" in last.problem
    # a FIFO (or a directory) planted as signature-N is a refusal reason, never a hang
    os.mkfifo(big.parent / "signature-5")
    (big.parent / "signature-6").mkdir()
    got = lookaside.read_lookaside(ref, ctx, D1)
    assert [s.problem.endswith("not a regular file") for s in got[4:]] == [True, True]
    # a writer takes the next free number; what is there is never replaced
    assert lookaside.write_lookaside(ref, ctx, D1, [b"four"])[0].endswith("/signature-7")
    assert (big.parent / "signature-1").read_bytes() == b"one"


def _req(*pubs: bytes, identity: policy.Identity | None = None) -> policy.Requirement:
    return policy.Requirement("signedBy", (), identity or policy.Identity(), pubs, "GPGKeys")


def _check(req: policy.Requirement, blob: bytes, digest: str = D1, ref: str = REF) -> policy.Verdict:
    return policy.check_simple(req, policy.DockerName.parse(ref), digest, [LookasideSignature("file:///s", blob)])


def _two_signers(keys: Any) -> bytes:
    """One message signed by both keys (a's home gets b's secret key too)."""
    a, b = keys["a"], keys["b"]
    secret = _gpg(b["home"], "--pinentry-mode", "loopback", "--passphrase", "", "--export-secret-keys", b["fpr"])
    _gpg(a["home"], "--pinentry-mode", "loopback", "--passphrase", "", "--import", data=secret)
    return _sign(a, gpg.make_simple_payload(D1, REF), "--local-user", b["fpr"])


def test_verify_good_and_refusals(keys: Any) -> None:
    a, b = keys["a"], keys["b"]
    good = _sign(a, gpg.make_simple_payload(D1, REF))
    v = _check(_req(a["pub"]), good)
    assert v.accepted and v.signer == a["fpr"] and v.payload_reference == REF
    assert _check(_req(a["asc"]), good).accepted  # an armored key file works too
    assert _check(_req(b["pub"], a["pub"]), good).accepted  # keyPaths: any of them
    refusals = {
        "another key": _check(_req(b["pub"]), good),
        "another digest": _check(_req(a["pub"]), good, D2),
        "another identity": _check(_req(a["pub"]), good, ref="reg.example:5000/team/app:2"),
        "malformed": _check(_req(a["pub"]), b"\x89PNG not an openpgp message" * 10),
        "empty": _check(_req(a["pub"]), b""),
        "altered": _check(_req(a["pub"]), good[:-20] + bytes(20)),
        "wrong type": _check(_req(a["pub"]), _sign(a, json.dumps({"critical": {
            "identity": {"docker-reference": REF}, "image": {"docker-manifest-digest": D1},
            "type": "cosign container image signature"}, "optional": {}}).encode())),
        "not json": _check(_req(a["pub"]), _sign(a, b"hello")),
        "two signers": _check(_req(a["pub"], b["pub"]), _two_signers(keys)),
        "huge": _check(_req(a["pub"]), b"\x00" * ((4 << 20) + 1)),
        "no key": policy.check_simple(_req(b"not a key"), policy.DockerName.parse(REF), D1,
                                      [LookasideSignature("file:///s", good)]),
    }
    for what, v in refusals.items():
        assert not v.accepted and v.reason, what
    assert "another key" in refusals["another key"].reason
    assert "not " + D2 in refusals["another digest"].reason
    assert "does not match" in refusals["another identity"].reason
    assert "signature count" in refusals["two signers"].reason
    assert "4 MiB" in refusals["huge"].reason
    assert "no public keys" in refusals["no key"].reason
    # one accepted signature among refused ones is enough (containers/image)
    many = [LookasideSignature("file:///1", b"junk"), LookasideSignature("file:///2", problem="too large"),
            LookasideSignature("file:///3", good)]
    assert policy.check_simple(_req(a["pub"]), policy.DockerName.parse(REF), D1, many).accepted
    v = policy.check_simple(_req(a["pub"]), policy.DockerName.parse(REF), D1, many[:2])
    assert not v.accepted and v.reason.startswith("none of the signatures were accepted")


def test_compression_bomb_is_cut(keys: Any) -> None:
    """A small signed message whose literal data inflates past 4 MiB: gpg stops at --max-output."""
    a = keys["a"]
    bomb = _sign(a, gpg.make_simple_payload(D1, REF) + b" " * (64 << 20), "--compress-level", "9")
    assert len(bomb) < 1 << 20
    v = _check(_req(a["pub"]), bomb)
    assert not v.accepted and v.reason, v


def test_encrypted_message_refused(keys: Any) -> None:
    a = keys["a"]
    enc = _gpg(a["home"], "--symmetric", "--passphrase", "x", "--pinentry-mode", "loopback", "--output", "-",
               data=gpg.make_simple_payload(D1, REF))
    v = _check(_req(a["pub"]), enc)
    assert not v.accepted and v.reason


def test_policy_signed_by_parse(tmp_path: Path, keys: Any) -> None:
    (tmp_path / "a.gpg").write_bytes(keys["a"]["pub"])

    def parse(req: dict[str, Any]) -> policy.Policy:
        return policy.parse_policy(json.dumps({"default": [req]}).encode(), str(tmp_path / "p.json"))

    r = parse({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "a.gpg"}).default[0]
    assert r.gpg_keys == (keys["a"]["pub"],) and r.identity.type == "matchRepoDigestOrExact"
    r = parse({"type": "signedBy", "keyType": "GPGKeys", "keyData": base64.b64encode(keys["a"]["pub"]).decode(),
               "signedIdentity": {"type": "matchRepository"}}).default[0]
    assert r.gpg_keys == (keys["a"]["pub"],) and r.identity.type == "matchRepository"
    for bad in ({"type": "signedBy", "keyPath": "a.gpg"}, {"type": "signedBy", "keyType": "PGP", "keyPath": "a.gpg"},
                {"type": "signedBy", "keyType": "GPGKeys"},
                {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "a.gpg", "keyData": "eA=="},
                {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "missing.gpg"}):
        with pytest.raises(FormatError):
            parse(bad)
    x509 = parse({"type": "signedBy", "keyType": "X509Certificates", "keyPath": "a.gpg"}).default
    v = policy.evaluate(x509, policy.DockerName.parse(REF), D1, lambda: [],
                        lambda: [LookasideSignature("file:///s", b"x")])
    assert not v.accepted and "unimplemented" in v.reason


def test_a_stuck_gpg_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gpg that never answers (a stuck agent) fails with a UsageError, not a TimeoutExpired traceback."""
    fake = tmp_path / "bin" / "gpg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(gpg, "_TIMEOUT", 0.5)
    with pytest.raises(UsageError, match="did not list the secret key"):
        gpg.check_secret_key("ABCDEF")
    with pytest.raises(UsageError, match="did not sign"):
        gpg.gpg_sign(b"x", "ABCDEF")
    with pytest.raises(FormatError, match="did not finish"), gpg.Keyring((b"key",)):
        pass


def test_deeply_nested_config_and_payload_are_one_line(tmp_path: Path) -> None:
    """"[[[[..." in a registries.d file or a signed payload: FormatError, not a RecursionError traceback."""
    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "deep.yaml").write_text("[" * 200_000)
    with pytest.raises(FormatError, match="nested too deeply"):
        lookaside.load_registries_d(str(d))
    with pytest.raises(FormatError, match="nested too deeply"):
        gpg.parse_simple_payload(b"[" * 200_000)


def test_a_trickling_lookaside_server_is_cut(tmp_path: Path) -> None:
    """An http lookaside that sends a byte every 0.2 s never trips the socket timeout: the whole body has
    a deadline (timeout + 4 MiB at min_rate), so the reader gives up instead of hanging."""
    import http.server
    import threading
    import time

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        d = tmp_path / "registries.d"
        d.mkdir()
        (d / "x.yaml").write_text(f"docker:\n  reg.example:5000:\n    lookaside: http://127.0.0.1:{srv.server_port}/s\n")
        # 1 s of grace, then 4 MiB at 4 GiB/s: about 1 s for the whole body
        ctx = SystemContext(registries_d=str(d), timeout=1.0, min_rate=float(4 << 30))
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="too slow"):
            lookaside.read_lookaside(parse_docker("//" + REF), ctx, D1)
        assert time.monotonic() - t0 < 10
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_relative_file_lookaside_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lookaside: file:sigs`` named ./sigs of whatever directory the command ran in; now refused."""
    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "x.yaml").write_text("docker:\n  reg.example:5000:\n    lookaside: file:sigs\n")
    monkeypatch.chdir(tmp_path)
    ctx = SystemContext(registries_d=str(d))
    with pytest.raises(UsageError, match="absolute local path"):
        lookaside.write_lookaside(parse_docker("//" + REF), ctx, D1, [b"sig"])
    with pytest.raises(UsageError, match="absolute local path"):
        lookaside.read_lookaside(parse_docker("//" + REF), ctx, D1)
    assert not (tmp_path / "sigs").exists()


def test_concurrent_signers_take_different_numbers(tmp_path: Path) -> None:
    """trust.md §2.1: signers at once never replace each other's signature-N: every blob ends up in a file
    of its own, numbered 1..N without a gap."""
    import threading

    d = tmp_path / "registries.d"
    d.mkdir()
    (d / "x.yaml").write_text(f"docker:\n  reg.example:5000:\n    lookaside: file://{tmp_path}/la\n")
    ctx = SystemContext(registries_d=str(d))
    ref = parse_docker("//" + REF)
    blobs = [[b"signer %d blob %d" % (t, k) for k in range(4)] for t in range(8)]
    start = threading.Barrier(8)

    def sign(mine: list[bytes]) -> None:
        start.wait()
        for b in mine:
            lookaside.write_lookaside(ref, ctx, D1, [b])

    threads = [threading.Thread(target=sign, args=(mine,)) for mine in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = [s.data for s in lookaside.read_lookaside(ref, ctx, D1)]
    assert sorted(got) == sorted(b for mine in blobs for b in mine)
    assert not list((tmp_path / "la").rglob(".signature.*"))  # no temp file left behind
