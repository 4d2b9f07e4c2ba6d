"""Signatures and policy.json against the real registry and the real skopeo (issue 14 part A,
docs/spec/trust.md): cosign-format signatures made by Shoal are accepted by skopeo 1.9's sigstoreSigned
policy and the other way round; a refused image is never tagged, mounted or run; tampering is refused."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401
from shoal.store import Store  # noqa: E402
from shoal.transports.registry import RegistryClient  # noqa: E402

__all__ = ["registry"]

PASS = "correct horse"


def shoal(store: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None) -> Any:
    e = dict(os.environ, COSIGN_PASSWORD=PASS, **(env or {}))
    cmd = helpers.shoal_cmd(store, *args)
    p = subprocess.run(cmd, capture_output=True, timeout=180, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}: {p.stderr.decode()[-3000:]}")
    return p


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(["skopeo", *args], capture_output=True, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"skopeo {args} exited {p.returncode}: {p.stderr.decode()[-3000:]}")
    return p


@pytest.fixture(scope="module")
def env(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    d = tmp_path_factory.mktemp("sig")
    tree = helpers.write_tree(d / "tree", {"etc/hello": b"hello\n" * 1000, "usr/bin/data": os.urandom(300_000),
                                           "usr/share/doc/x.txt": b"doc " * 20_000})
    store = d / "store"
    shoal(store, "build", str(tree), "app:1", "--no-reuse")
    for name in ("a", "other"):
        shoal(None, "key", "generate", "--output", str(d / f"{name}.key"))
    (d / "pass").write_text(PASS + "\n")
    regd = d / "registries.d"
    regd.mkdir()
    (regd / "default.yaml").write_text(f"docker:\n  {registry.host}:\n    use-sigstore-attachments: true\n")

    def policy(name: str, key: str | None) -> Path:
        doc: dict[str, Any] = {"default": [{"type": "reject"}], "transports": {"docker": {}}}
        if key is not None:
            doc["transports"]["docker"][f"{registry.host}/sig"] = [
                {"type": "sigstoreSigned", "keyPath": str(d / f"{key}.pub"),
                 "signedIdentity": {"type": "matchRepoDigestOrExact"}}]
        p = d / f"policy-{name}.json"
        p.write_text(json.dumps(doc))
        return p

    return {"dir": d, "store": store, "host": registry.host, "regd": regd, "registry": registry,
            "good": policy("good", "a"), "bad": policy("bad", "other"), "reject": policy("reject", None)}


def push(env: dict[str, Any], repo: str) -> str:
    ref = f"docker://{env['host']}/sig/{repo}:1"
    shoal(env["store"], "push", "app:1", ref)
    return ref


def skopeo_copy_to_oci(env: dict[str, Any], ref: str, policy: Path, check: bool = True) -> Any:
    out = env["dir"] / f"oci-{uuid.uuid4().hex[:8]}"
    return skopeo("--policy", str(policy), "--registries.d", str(env["regd"]), "copy", "--all",
                  "--remove-signatures", "--src-tls-verify=false", ref, f"oci:{out}:x", check=check)


def tags(env: dict[str, Any], repo: str) -> list[str]:
    with RegistryClient(env["host"], lookup_credentials=False) as c:
        return c.list_tags(f"sig/{repo}")


def store_names(store: Path) -> set[str]:
    return {name for name, _ in Store.open(store).images()} if store.exists() else set()


def test_shoal_signature_accepted_by_skopeo_and_shoal(env: dict[str, Any], tmp_path: Path) -> None:
    ref = push(env, "s1")
    out = json.loads(shoal(None, "sign", ref, "--key", str(env["dir"] / "a.key"), "--json").stdout)
    assert len(out["signatures"]) == 3  # the index the tag points at, the runtime view and the Shoal manifest
    assert any(t.endswith(".sig") for t in tags(env, "s1"))
    # skopeo 1.9.3 (Debian) finds and reads Shoal's attachment where it looks for cosign signatures; its
    # sigstore verification is compiled out ("Debian-local change: sigstore disabled"), which it says only
    # once it holds a sigstore signature: an unsigned image gets "no signature exists" instead.
    p = skopeo_copy_to_oci(env, ref, env["good"], check=False)
    err = p.stderr.decode()
    if p.returncode != 0:
        assert "Debian-local change: sigstore disabled" in err, err
        unsigned = skopeo_copy_to_oci(env, push(env, "s1unsigned"), env["good"], check=False)
        assert b"no signature exists" in unsigned.stderr, unsigned.stderr
    # the signature is plain ECDSA P-256 over the payload bytes: openssl verifies it on its own
    sig_tag = out["signatures"][0]["attachment"].rsplit(":", 1)[1]
    with RegistryClient(env["host"], lookup_credentials=False) as c:
        sraw, _, _ = c.get_manifest("sig/s1", sig_tag)
        layer = json.loads(sraw)["layers"][0]
        assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
        payload = c.get_blob("sig/s1", layer["digest"])
    (tmp_path / "payload").write_bytes(payload)
    (tmp_path / "sig.der").write_bytes(base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"]))
    subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(env["dir"] / "a.pub"), "-signature",
                    str(tmp_path / "sig.der"), str(tmp_path / "payload")], check=True, capture_output=True)
    crit = json.loads(payload)["critical"]
    assert crit["image"]["docker-manifest-digest"] == out["signatures"][0]["digest"]
    assert crit["type"] == "cosign container image signature"
    # shoal verify --deep says what it checked
    v = json.loads(shoal(None, "verify", ref, "--key", str(env["dir"] / "a.pub"), "--deep", "--json").stdout)
    assert v["deep"] and v["chunks"] > 0 and v["identity"] == f"{env['host']}/sig/s1:1", v
    # shoal pull under the same policy: tagged; under another key: refused, exit 10, nothing tagged
    st = tmp_path / "st"
    shoal(st, "pull", ref, "ok:1", "--signature-policy", str(env["good"]))
    assert "ok:1" in store_names(st)
    p = shoal(st, "pull", ref, "no:1", "--signature-policy", str(env["bad"]), check=False)
    assert p.returncode == 10, p.stderr
    helpers.assert_one_line_error(p, "sigstoreSigned")
    assert "no:1" not in store_names(st)
    p = shoal(st, "pull", ref, "no:2", "--signature-policy", str(env["reject"]), check=False)
    assert p.returncode == 10 and b"reject" in p.stderr, p.stderr
    p = shoal(None, "verify", ref, "--key", str(env["dir"] / "other.pub"), check=False)
    assert p.returncode == 10, p.stderr


def test_skopeo_signing_and_shoal_policy_at_mount_and_run(env: dict[str, Any], tmp_path: Path) -> None:
    """skopeo 1.9.3 (Debian) cannot make sigstore signatures (compiled out); a copy by skopeo --all
    (which writes the index again) signed by shoal is then checked at pull, mount and run."""
    src = push(env, "s2src")
    dst = f"docker://{env['host']}/sig/s2:1"
    p = skopeo("--registries.d", str(env["regd"]), "copy", "--all", "--src-tls-verify=false",
               "--dest-tls-verify=false", "--sign-by-sigstore-private-key", str(env["dir"] / "a.key"),
               "--sign-passphrase-file", str(env["dir"] / "pass"), src, dst, check=False)
    if p.returncode != 0:
        assert b"sigstore disabled" in p.stderr, p.stderr
        skopeo("copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", src, dst)
        shoal(None, "sign", dst, "--key", str(env["dir"] / "a.key"), "--passphrase-file", str(env["dir"] / "pass"))
    shoal(None, "verify", dst, "--key", str(env["dir"] / "a.pub"), "--deep")
    st = tmp_path / "st"
    shoal(st, "pull", dst, "ok:1", "--signature-policy", str(env["good"]))
    assert "ok:1" in store_names(st)
    p = shoal(st, "pull", dst, "no:1", "--signature-policy", str(env["bad"]), check=False)
    assert p.returncode == 10 and "no:1" not in store_names(st), p.stderr
    # mount under the policy: refused leaves nothing mounted; accepted mounts
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = shoal(st, "mount", dst, str(mnt), "--signature-policy", str(env["bad"]), check=False)
    assert p.returncode == 10 and not os.path.ismount(mnt), p.stderr
    helpers.assert_one_line_error(p, "sigstoreSigned")
    if shutil.which("fusermount3") and os.geteuid() == 0:
        shoal(st, "mount", dst, str(mnt), "--signature-policy", str(env["good"]))
        try:
            assert (mnt / "etc" / "hello").read_bytes() == b"hello\n" * 1000
        finally:
            shoal(st, "umount", str(mnt))
    # run: refused before anything runs
    p = shoal(st, "run", "--rm", "--signature-policy", str(env["bad"]), dst, "--", "/bin/true", check=False)
    assert p.returncode == 10, p.stderr


def _tamper_blob(reg: Registry, digest: str) -> None:
    hexd = digest.split(":", 1)[1]
    path = reg.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x55 for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def _shoal_manifest(env: dict[str, Any], repo: str) -> dict[str, Any]:
    with RegistryClient(env["host"], lookup_credentials=False) as c:
        raw, _, _ = c.get_manifest(f"sig/{repo}", "1")
        kid = [m for m in json.loads(raw)["manifests"] if m.get("artifactType")][0]
        mraw, _, _ = c.get_manifest(f"sig/{repo}", kid["digest"])
    return dict(json.loads(mraw))


def test_tampering_refused(env: dict[str, Any], tmp_path: Path) -> None:
    key, pub = str(env["dir"] / "a.key"), str(env["dir"] / "a.pub")
    good = str(env["good"])
    st = tmp_path / "st"
    # 1. a changed Shoal manifest under the signed tag, the old manifest's signature copied to the new
    # digest's .sig tag: it names the digest it was made for.  (An index whose runtime view still names
    # the signed Shoal manifest gives that signed manifest, so the tag points at the changed one alone.)
    ref = push(env, "t1")
    shoal(None, "sign", ref, "--key", key)
    with RegistryClient(env["host"], lookup_credentials=False) as c:
        raw, _, _ = c.get_manifest("sig/t1", "1")
        entry = [m for m in json.loads(raw)["manifests"] if m.get("artifactType")][0]
        mraw, mmedia, _ = c.get_manifest("sig/t1", entry["digest"])
        m = json.loads(mraw)
        m["annotations"]["evil"] = "1"
        new_m = json.dumps(m).encode()
        new_md = c.put_manifest("sig/t1", "1", new_m, mmedia)
        sraw, smedia, _ = c.get_manifest("sig/t1", entry["digest"].replace(":", "-") + ".sig")
        c.put_manifest("sig/t1", new_md.replace(":", "-") + ".sig", sraw, smedia)
    p = shoal(st, "pull", ref, "t1:1", "--signature-policy", good, check=False)
    assert p.returncode == 10 and b"the signature is for manifest" in p.stderr, p.stderr
    assert "t1:1" not in store_names(st)
    p = shoal(None, "verify", ref, "--key", pub, check=False)
    assert p.returncode == 10, p.stderr
    # 2. a changed index blob (the registry serves other bytes): integrity error, nothing tagged
    ref2 = push(env, "t2")
    shoal(None, "sign", ref2, "--key", key)
    m = _shoal_manifest(env, "t2")
    _tamper_blob(env["registry"], m["layers"][0]["digest"])
    p = shoal(st, "pull", ref2, "t2:1", "--signature-policy", good, check=False)
    assert p.returncode in (4, 5), p.stderr
    assert "t2:1" not in store_names(st)
    p = shoal(None, "verify", ref2, "--key", pub, "--deep", check=False)
    assert p.returncode in (4, 5), p.stderr
    # 3. a changed chunk in a pack: verify --deep and pull refuse it, nothing tagged
    ref3 = push(env, "t3")
    shoal(None, "sign", ref3, "--key", key)
    m = _shoal_manifest(env, "t3")
    pack = max(m["layers"][1:], key=lambda d: d["size"])
    _tamper_blob(env["registry"], pack["digest"])
    shoal(None, "verify", ref3, "--key", pub)  # the signature itself still holds
    p = shoal(None, "verify", ref3, "--key", pub, "--deep", check=False)
    assert p.returncode in (4, 5), p.stderr
    helpers.assert_one_line_error(p, "chunk", "frame", "digest", "pack")
    p = shoal(tmp_path / "st3", "pull", ref3, "t3:1", "--signature-policy", good, check=False)
    assert p.returncode in (4, 5), p.stderr
    assert "t3:1" not in store_names(tmp_path / "st3")
    # 4. a signature from another key
    ref4 = push(env, "t4")
    shoal(None, "sign", ref4, "--key", str(env["dir"] / "other.key"))
    p = shoal(st, "pull", ref4, "t4:1", "--signature-policy", good, check=False)
    assert p.returncode == 10 and b"another key" in p.stderr, p.stderr
    assert "t4:1" not in store_names(st)
