"""Keys, payloads, signatures and policy.json (docs/spec/trust.md), with the real cosign's vectors."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from shoal.errors import FormatError, PolicyRefused, UsageError
from shoal.trust import cosign, keys, policy
from shoal.trust.cosign import Signature

DATA = Path(__file__).parent / "data" / "cosign"
D1 = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32


def test_key_roundtrip_and_wrong_passphrase() -> None:
    k = keys.generate()
    pem = keys.encrypt_private_key(k, b"pw")
    assert pem.startswith(b"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----")
    doc = json.loads(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    assert doc["kdf"]["name"] == "scrypt" and doc["cipher"]["name"] == "nacl/secretbox"
    assert doc["kdf"]["params"] == {"N": 32768, "r": 8, "p": 1}
    k2 = keys.load_private_key(pem, b"pw")
    assert k2.public().pem() == k.public().pem()
    with pytest.raises(UsageError, match="wrong passphrase"):
        keys.load_private_key(pem, b"nope")
    # newer cosign's PEM type reads too
    keys.load_private_key(pem.replace(b"COSIGN", b"SIGSTORE"), b"pw")
    hostile = json.dumps({**doc, "kdf": {**doc["kdf"], "params": {"N": 1 << 30, "r": 8, "p": 1}}}).encode()
    with pytest.raises(FormatError, match="scrypt"):
        keys.load_private_key(keys._pem(keys.PEM_PRIVATE, hostile), b"pw")


def test_sign_verify_payload() -> None:
    k = keys.generate()
    s = cosign.sign(k, D1, "reg.example/app:1")
    assert cosign.verify(k.public(), s)
    assert not cosign.verify(keys.generate().public(), s)
    p = cosign.parse_payload(s.payload)
    assert (p.digest, p.reference, p.creator) == (D1, "reg.example/app:1", "shoal")
    bad = Signature(s.media_type, s.payload.replace(b"app:1", b"app:2"), s.signature_b64)
    assert not cosign.verify(k.public(), bad)
    with pytest.raises(FormatError):
        cosign.parse_payload(b'{"critical": {"type": "x"}, "optional": null}')
    extra = json.loads(s.payload)
    extra["critical"]["extra"] = 1
    with pytest.raises(FormatError, match="exactly"):
        cosign.parse_payload(json.dumps(extra).encode())
    assert cosign.attachment_tag(D1) == "sha256-" + "ab" * 32 + ".sig"


def test_real_cosign_signature_verifies() -> None:
    """A signature the real cosign made (containers/image's fixture): crypto, payload and digest."""
    sig = json.loads((DATA / "signature-1.json").read_text())
    pub = keys.load_public_key((DATA / "cosign.pub").read_bytes())
    s = Signature(sig["mimeType"], base64.b64decode(sig["payload"]), sig["annotations"][cosign.ANN_SIGNATURE],
                  sig["annotations"])
    digest = "sha256:" + hashlib.sha256((DATA / "manifest.json").read_bytes()).hexdigest()
    req = policy.Requirement("sigstoreSigned", (pub,), policy.Identity("matchRepository"))
    image = policy.DockerName.parse("192.168.64.2:5000/cosign-signed-single-sample:latest")
    v = policy.check_signatures(req, image, digest, [s])
    assert v.accepted, v.reason
    # cosign names the repository only: matchRepoDigestOrExact of a tag refuses it, as containers/image does
    strict = policy.Requirement("sigstoreSigned", (pub,))
    assert not policy.check_signatures(strict, image, digest, [s]).accepted
    assert not policy.check_signatures(req, image, D1, [s]).accepted  # another manifest


def _policy(tmp_path: Path, doc: object) -> policy.Policy:
    p = tmp_path / "policy.json"
    p.write_text(json.dumps(doc))
    return policy.load_policy(str(p))


def test_policy_scopes(tmp_path: Path) -> None:
    k = keys.generate()
    (tmp_path / "k.pub").write_bytes(k.public().pem())
    pol = _policy(tmp_path, {
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            "reg.example.com:5000/team/app": [{"type": "sigstoreSigned", "keyPath": "k.pub"}],
            "reg.example.com:5000": [{"type": "insecureAcceptAnything"}],
            "*.example.org": [{"type": "insecureAcceptAnything"}],
            "": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": base64.b64encode(b"junk").decode()}]}}})
    from shoal.transports.docker import parse_docker

    def reqs(text: str) -> tuple[str, tuple[str, ...]]:
        sc = parse_docker(text).policy_scope()
        where, rs = pol.requirements(sc.transport, sc.identity, list(sc.namespaces))
        return where, tuple(r.type for r in rs)

    assert reqs("//reg.example.com:5000/team/app:1")[1] == ("sigstoreSigned",)
    assert reqs("//reg.example.com:5000/team/other:1")[1] == ("insecureAcceptAnything",)
    assert reqs("//a.b.example.org/x:1")[1] == ("insecureAcceptAnything",)
    assert reqs("//quay.io/x:1")[1] == ("signedBy",)
    assert pol.requirements("oci", "/some/dir", [])[0] == "default"
    image = policy.DockerName.parse("quay.io/x:1")
    v = policy.evaluate(pol.transports["docker"][""], image, D1, lambda: [])
    assert not v.accepted and v.reason == "signedBy: a signature was required, but no signature exists"
    s = cosign.sign(k, D1, "reg.example.com:5000/team/app:1")
    rs = pol.transports["docker"]["reg.example.com:5000/team/app"]
    app = policy.DockerName.parse("reg.example.com:5000/team/app:1")
    assert policy.evaluate(rs, app, D1, lambda: [s]).accepted
    assert "no signature exists" in policy.evaluate(rs, app, D1, lambda: []).reason
    assert "not " + D2 in policy.evaluate(rs, app, D2, lambda: [s]).reason
    other = policy.DockerName.parse("reg.example.com:5000/team/app:2")
    assert "does not match" in policy.evaluate(rs, other, D1, lambda: [s]).reason
    by_digest = policy.DockerName.parse(f"reg.example.com:5000/team/app@{D1}")
    assert policy.evaluate(rs, by_digest, D1, lambda: [s]).accepted


def test_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyRefused, match="does not exist"):
        policy.load_policy(str(tmp_path / "missing.json"))
    with pytest.raises(FormatError, match="default"):
        _policy(tmp_path, {"transports": {}})
    with pytest.raises(FormatError, match="unknown requirement"):
        _policy(tmp_path, {"default": [{"type": "acceptSome"}]})
    with pytest.raises(FormatError, match="unknown field"):
        _policy(tmp_path, {"default": [{"type": "reject", "x": 1}]})
    with pytest.raises(FormatError, match="fulcio"):
        _policy(tmp_path, {"default": [{"type": "sigstoreSigned", "fulcio": {}}]})


def test_identity_rules() -> None:
    Ident, N = policy.Identity, policy.DockerName.parse
    img = N("reg.io/a/b:1")
    assert Ident("matchExact").matches(img, "reg.io/a/b:1") and not Ident("matchExact").matches(img, "reg.io/a/b:2")
    assert Ident("matchRepository").matches(img, "reg.io/a/b:9")
    assert Ident("exactReference", reference="reg.io/a/b:7").matches(img, "reg.io/a/b:7")
    assert Ident("exactRepository", reference="reg.io/a/b").matches(img, "reg.io/a/b:7")
    assert Ident("remapIdentity", prefix="reg.io/a", signed_prefix="upstream.io/z").matches(img, "upstream.io/z/b:1")
    assert Ident().matches(N("busybox:latest"), "docker.io/library/busybox:latest")
