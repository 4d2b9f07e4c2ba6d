"""Signatures, attached SBOMs and start-up profiles (and bundles) follow an image (issue 14, trust.md §6):
``shoal copy`` registry A -> registry B, and registry -> ``oci:`` layout -> registry, carries each of them;
they still verify at the destination and a pull under a sigstoreSigned policy accepts the copy;
``--remove-signatures`` leaves the signatures behind; ``shoal build --sign-key`` signs in the store and
``shoal push`` carries the signatures, which verify under the default policy identity.  Real registries
(distribution 2.8: no referrers API, so the tag-schema index is what lists referrers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, _running_registry  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.transports.registry import RegistryClient  # noqa: E402

PASS = "correct horse"
SIG = "application/vnd.dev.cosign.simplesigning.v1+json"
PROFILE = "application/vnd.shoal.profile.v1+json"


def shoal(store: Path | None, *args: str, check: bool = True) -> Any:
    cmd = helpers.shoal_cmd(store, *args)
    p = subprocess.run(cmd, capture_output=True, timeout=300, env=dict(os.environ, COSIGN_PASSWORD=PASS))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}: {p.stderr.decode()[-3000:]}")
    return p


@pytest.fixture(scope="module")
def reg_a() -> Iterator[Registry]:
    yield from _running_registry("shoal-reg-a-")


@pytest.fixture(scope="module")
def reg_b() -> Iterator[Registry]:
    yield from _running_registry("shoal-reg-b-")


@pytest.fixture(scope="module")
def env(reg_a: Registry, reg_b: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("refs")
    tree = helpers.write_tree(d / "tree", {"etc/hello": b"hello\n" * 1000, "usr/bin/data": os.urandom(300_000),
                                           "usr/share/doc/x.txt": b"doc " * 20_000})
    store = d / "store"
    shoal(store, "build", str(tree), "app:1", "--no-reuse")
    shoal(None, "key", "generate", "--output", str(d / "a.key"))
    (d / "pass").write_text(PASS + "\n")
    return {"dir": d, "store": store, "tree": tree, "a": reg_a.host, "b": reg_b.host}


def policy(env: dict[str, Any], name: str, scope: str, identity: dict[str, Any]) -> Path:
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {scope: [
        {"type": "sigstoreSigned", "keyPath": str(env["dir"] / "a.pub"), "signedIdentity": identity}]}}}
    p = env["dir"] / f"policy-{name}.json"
    p.write_text(json.dumps(doc))
    return p


def digests(host: str, repo: str, tag: str = "1") -> tuple[str, str, str]:
    """(index, runtime view, Shoal manifest) of the tag."""
    with RegistryClient(host, lookup_credentials=False) as c:
        raw, _, top = c.get_manifest(repo, tag)
    kids = json.loads(raw)["manifests"]
    view = [k["digest"] for k in kids if not k.get("artifactType")][0]
    man = [k["digest"] for k in kids if k.get("artifactType") == "application/vnd.shoal.image.v1"][0]
    return top, view, man


def sig_tags(host: str, repo: str) -> set[str]:
    with RegistryClient(host, lookup_credentials=False) as c:
        return {t for t in c.list_tags(repo) if t.endswith(".sig")}


def signed_digests(host: str, repo: str) -> set[str]:
    """The digests named by the signature payloads at the repository's .sig tags."""
    out = set()
    with RegistryClient(host, lookup_credentials=False) as c:
        for t in c.list_tags(repo):
            if not t.endswith(".sig"):
                continue
            raw, _, _ = c.get_manifest(repo, t)
            for ly in json.loads(raw)["layers"]:
                assert ly["mediaType"] == SIG
                payload = json.loads(c.get_blob(repo, ly["digest"]))
                d = payload["critical"]["image"]["docker-manifest-digest"]
                assert t == d.replace(":", "-") + ".sig"
                out.add(d)
    return out


def artifacts(host: str, repo: str, digest: str) -> dict[str, str]:
    """artifactType -> digest of the referrers of ``digest`` (the tag-schema index on distribution 2.8)."""
    with RegistryClient(host, lookup_credentials=False) as c:
        return {str(r.get("artifactType")): str(r["digest"]) for r in c.referrers(repo, digest)}


def sbom_and_profile(env: dict[str, Any], host: str, repo: str, man: str) -> tuple[bytes, Any, bytes | None]:
    """The SBOM document attached to ``man``, its profile and the profile's bundle, as found in the registry."""
    from shoal.mount.profile import fetch_remote_pair

    arts = artifacts(host, repo, man)
    assert "application/spdx+json" in arts and PROFILE in arts, arts
    with RegistryClient(host, lookup_credentials=False) as c:
        art = json.loads(c.get_manifest(repo, arts["application/spdx+json"])[0])
        assert art["subject"]["digest"] == man
        doc = c.get_blob(repo, art["layers"][0]["digest"])
        prof, bundle = fetch_remote_pair(c, repo, man)
    assert prof is not None and prof.image == man
    return doc, prof, bundle


@pytest.fixture(scope="module")
def source(env: dict[str, Any]) -> dict[str, Any]:
    """app:1 in registry A, signed (index, view, Shoal manifest), with an SBOM and a profile (and its
    bundle) attached."""
    from shoal.mount.bundle import build as build_bundle
    from shoal.mount.profile import Profile, Recording, push_remote
    from shoal.reader import StoreSource

    repo = "r/app"
    ref = f"docker://{env['a']}/{repo}:1"
    shoal(env["store"], "push", "app:1", ref)
    shoal(None, "sign", ref, "--key", str(env["dir"] / "a.key"))
    p = shoal(None, "sbom", ref, "--attach")
    top, view, man = digests(env["a"], repo)
    st = Store.open(env["store"])
    m = st.resolve("app:1")
    assert m.digest == man
    idx = st.load_index(m)
    prof = Profile.of_frames(man, idx, [0], seconds=0.5, command=("/bin/true",))
    f = next(i for i, e in enumerate(idx.entries) if e.chunks)  # a workload that read one file (bundle.md)
    bundle = build_bundle(idx, Recording([0], list(idx.entries[f].chunks), [f], []), StoreSource(st))
    push_remote(ref, None, prof, bundle)
    assert signed_digests(env["a"], repo) == {top, view, man}
    doc, got, got_bundle = sbom_and_profile(env, env["a"], repo, man)
    assert got.frames == prof.frames and doc == p.stdout and got_bundle == bundle
    return {"ref": ref, "repo": repo, "top": top, "view": view, "man": man, "sbom": doc, "profile": prof,
            "bundle": bundle}


def check_arrived(env: dict[str, Any], source: dict[str, Any], host: str, repo: str, tmp_path: Path) -> None:
    """Signatures, SBOM and profile at ``host/repo:1``; verify and a pull under the policy pass."""
    top, view, man = digests(host, repo)
    assert (top, view, man) == (source["top"], source["view"], source["man"])  # the same image, byte for byte
    assert signed_digests(host, repo) == {top, view, man}
    doc, prof, bundle = sbom_and_profile(env, host, repo, man)
    assert doc == source["sbom"] and prof.frames == source["profile"].frames and bundle == source["bundle"]
    ref = f"docker://{host}/{repo}:1"
    a_repo = f"{env['a']}/{source['repo']}"
    # the signatures still name the image they were made for (A): accepted for that repository ...
    v = json.loads(shoal(None, "verify", ref, "--key", str(env["dir"] / "a.pub"), "--deep", "--json",
                         "--signed-repository", a_repo).stdout)
    assert v["deep"] and v["identity"] == f"{a_repo}:1", v
    # ... and not for B's own name (what matchRepoDigestOrExact compares them with)
    p = shoal(None, "verify", ref, "--key", str(env["dir"] / "a.pub"), check=False)
    assert p.returncode == 10, p.stderr
    # a pull under sigstoreSigned with remapIdentity (B's repository signed as A's), as containers/image's
    remap = policy(env, f"remap-{host.replace(':', '_')}-{repo.replace('/', '_')}", f"{host}/{repo}",
                   {"type": "remapIdentity", "prefix": f"{host}/{repo}", "signedPrefix": a_repo})
    st = tmp_path / "pulled"
    shoal(st, "pull", ref, "ok:1", "--signature-policy", str(remap))
    assert "ok:1" in {n for n, _ in Store.open(st).images()}
    strict = policy(env, "strict", f"{host}/{repo}", {"type": "matchRepoDigestOrExact"})
    p = shoal(st, "pull", ref, "no:1", "--signature-policy", str(strict), check=False)
    assert p.returncode == 10, p.stderr


def test_copy_between_registries_carries_signatures_sbom_and_profile(env: dict[str, Any], source: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    out = json.loads(shoal(None, "copy", source["ref"], f"docker://{env['b']}/r/app:1", "--json").stdout)
    assert out["signatures_carried"] == 3 and out["referrers_carried"] == 2, out
    check_arrived(env, source, env["b"], "r/app", tmp_path)
    # copying again changes nothing: the .sig tags are merged, not duplicated
    shoal(None, "copy", source["ref"], f"docker://{env['b']}/r/app:1")
    with RegistryClient(env["b"], lookup_credentials=False) as c:
        for t in sig_tags(env["b"], "r/app"):
            assert len(json.loads(c.get_manifest("r/app", t)[0])["layers"]) == 1


def test_copy_through_an_oci_layout_carries_them(env: dict[str, Any], source: dict[str, Any],
                                                 tmp_path: Path) -> None:
    lay = tmp_path / "layout"
    shoal(None, "copy", source["ref"], f"oci:{lay}:app")
    entries = json.loads((lay / "index.json").read_text())["manifests"]
    named = [e for e in entries if (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == "app"]
    assert len(named) == 1 and named[0]["digest"] == source["man"]  # the Shoal manifest itself, no views
    assert len(entries) == 1 + 3 + 2  # + a signature of the index, the view and the manifest, the SBOM, profile
    skopeo_ok = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{lay}:app"], capture_output=True)
    assert skopeo_ok.returncode != 0 or json.loads(skopeo_ok.stdout)["config"]  # OCI tools still read the layout
    shoal(None, "copy", f"oci:{lay}:app", f"docker://{env['b']}/r/via-oci:1")
    check_arrived(env, source, env["b"], "r/via-oci", tmp_path)


def test_remove_signatures_and_no_referrers(env: dict[str, Any], source: dict[str, Any]) -> None:
    shoal(None, "copy", "--remove-signatures", source["ref"], f"docker://{env['b']}/r/nosig:1")
    assert sig_tags(env["b"], "r/nosig") == set()
    assert PROFILE in artifacts(env["b"], "r/nosig", source["man"])  # the other referrers still come
    shoal(None, "copy", "--remove-signatures", "--no-referrers", source["ref"], f"docker://{env['b']}/r/bare:1")
    assert sig_tags(env["b"], "r/bare") == set() and artifacts(env["b"], "r/bare", source["man"]) == {}
    p = shoal(None, "verify", f"docker://{env['b']}/r/nosig:1", "--key", str(env["dir"] / "a.pub"), check=False)
    assert p.returncode == 10, p.stderr


def test_pull_keeps_them_in_the_store_and_push_carries_them_on(env: dict[str, Any], source: dict[str, Any],
                                                               tmp_path: Path) -> None:
    st = tmp_path / "st"
    shoal(st, "pull", source["ref"], "got:1")
    s = Store.open(st)
    kinds = {d["digest"]: d.get("artifactType") for d in s.layout.untagged()}
    assert len(kinds) == 4, kinds  # 3 signatures (index, view, manifest) and the SBOM; the profile is a file
    assert (st / "profiles" / (source["man"].split(":")[1] + ".json")).is_file()
    assert (st / "profiles" / (source["man"].split(":")[1] + ".bundle")).read_bytes() == source["bundle"]
    shoal(st, "gc")  # the index's and the view's signatures stay: their subjects are made again at push
    assert len(s.layout.untagged()) == 4
    # and the profile of the Shoal manifest, a child of the tagged image index (store.md §4)
    assert (st / "profiles" / (source["man"].split(":")[1] + ".bundle")).read_bytes() == source["bundle"]
    shoal(st, "push", "got:1", f"docker://{env['b']}/r/via-store:1")
    check_arrived(env, source, env["b"], "r/via-store", tmp_path)


def test_build_sign_key_then_push_verifies_under_the_policy(env: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    name = f"{env['b']}/r/built:1"
    p = shoal(store, "build", str(env["tree"]), "built:1", "--sign-key", str(env["dir"] / "a.key"), check=False)
    assert p.returncode != 0 and b"--sign-identity" in p.stderr  # a bare name would name docker.io/library/built
    out = json.loads(shoal(store, "build", str(env["tree"]), "built:1", "--sign-key", str(env["dir"] / "a.key"),
                           "--sign-identity", name, "--json").stdout)
    assert len(out["signed"]) == 3 and {s["identity"] for s in out["signed"]} == {name}
    shoal(store, "push", "built:1", f"docker://{name}")
    top, view, man = digests(env["b"], "r/built")
    assert {s["digest"] for s in out["signed"]} == {top, view, man}  # signed before the push, without it
    assert signed_digests(env["b"], "r/built") == {top, view, man}
    shoal(None, "verify", f"docker://{name}", "--key", str(env["dir"] / "a.pub"), "--deep")
    pol = policy(env, "built", f"{env['b']}/r/built", {"type": "matchRepoDigestOrExact"})
    st = tmp_path / "pulled"
    shoal(st, "pull", f"docker://{name}", "ok:1", "--signature-policy", str(pol))
    assert "ok:1" in {n for n, _ in Store.open(st).images()}


def test_push_signs_with_sigstore_private_key(env: dict[str, Any], tmp_path: Path) -> None:
    ref = f"docker://{env['b']}/r/pushsigned:1"
    out = json.loads(shoal(env["store"], "push", "app:1", ref, "--sign-by-sigstore-private-key",
                           str(env["dir"] / "a.key"), "--sign-passphrase-file", str(env["dir"] / "pass"),
                           "--json").stdout)
    top, view, man = digests(env["b"], "r/pushsigned")
    assert {s["digest"] for s in out["signed"]} == {top, view, man}
    pol = policy(env, "pushsigned", f"{env['b']}/r/pushsigned", {"type": "matchRepoDigestOrExact"})
    shoal(tmp_path / "st", "pull", ref, "ok:1", "--signature-policy", str(pol))
