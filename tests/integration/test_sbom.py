"""shoal sbom and shoal diff --packages on real trees (issue 14 part B, docs/sbom.md): SBOMs checked by
the official validators (spdx-tools, cyclonedx-python-lib) and against the package tools themselves
(dpkg-query, rpm -qa), and a docker:// SBOM that reads only the database files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, proxy_factory, registry  # noqa: E402,F401
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.store import Store  # noqa: E402

__all__ = ["proxy_factory", "registry"]

PIP_PACKAGE = ("six", "1.16.0")


def shoal(store: Path | None, *args: str, check: bool = True) -> Any:
    return helpers.run_shoal(store, *args, check=check, timeout=300)


def dpkg_query(tree: Path) -> set[tuple[str, str, str]]:
    out = subprocess.run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W",
                          "-f", "${db:Status-Abbrev}|${Package}|${Version}|${Architecture}\n"],
                         check=True, capture_output=True, text=True).stdout
    rows = set()
    for line in out.splitlines():
        st, name, ver, arch = line.split("|")
        if st.startswith("ii"):
            rows.add((name, ver, arch))
    return rows


@pytest.fixture(scope="session")
def bookworm_python(cache_dir: Path, debian_rootfs: Path) -> Path:
    """bookworm minbase + ``apt-get install python3`` (chroot, the Debian mirror) + one PyPI package
    installed by pip (the host's pip, ``--target`` the tree's /usr/local dist-packages)."""
    target = cache_dir / "sbom-bookworm-python3"
    marker = cache_dir / "sbom-bookworm-python3.complete"
    with helpers.locked(cache_dir / "sbom-bookworm-python3.lock"):
        if marker.exists() and target.is_dir():
            return target
        if target.exists():
            shutil.rmtree(target)
        partial = cache_dir / "sbom-bookworm-python3.partial"
        if partial.exists():
            shutil.rmtree(partial)
        subprocess.run(["cp", "-a", str(debian_rootfs), str(partial)], check=True)
        shutil.copy("/etc/resolv.conf", partial / "etc" / "resolv.conf")
        env = ["/usr/bin/env", "DEBIAN_FRONTEND=noninteractive"]
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "python3"]):
            r = subprocess.run(["chroot", str(partial), *env, *cmd], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                pytest.skip(f"apt-get in the chroot failed (no mirror?): {r.stdout[-500:]} {r.stderr[-500:]}")
        site = partial / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                            str(site), f"{PIP_PACKAGE[0]}=={PIP_PACKAGE[1]}"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"pip could not install {PIP_PACKAGE} (no PyPI?): {r.stderr[-500:]}")
        os.rename(partial, target)
        marker.write_text("bookworm minbase + python3 + pip six\n")
    return target


def build_store(tmp: Path, tree: Path, ref: str, store: Path | None = None) -> Path:
    store = store or tmp / "store"
    build(Store.open(store), tree, ref, BuildOptions(workers=2, source_date_epoch=1700000000))
    return store


def validate_spdx(path: Path) -> None:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    msgs = validate_full_spdx_document(parse_file(str(path)))
    assert msgs == [], [m.validation_message for m in msgs[:5]]


def validate_cyclonedx(path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    err = JsonStrictValidator(SchemaVersion.V1_5).validate_str(path.read_text())
    assert err is None, str(err)[:2000]


def deb_rows_spdx(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    out = set()
    for p in doc["packages"]:
        loc = p["externalRefs"][0]["referenceLocator"]
        if loc.startswith("pkg:deb/"):
            arch = loc.split("arch=")[1].split("&")[0]
            out.add((p["name"], p["versionInfo"], arch))
    return out


def test_sbom_of_bookworm_matches_dpkg_query_and_validates(debian_rootfs: Path, tmp_path: Path) -> None:
    store = build_store(tmp_path, debian_rootfs, "deb:1")
    spdx, cdx = tmp_path / "s.spdx.json", tmp_path / "s.cdx.json"
    info = json.loads(shoal(store, "sbom", "deb:1", "-o", str(spdx), "--json").stdout)
    shoal(store, "sbom", "deb:1", "--format", "cyclonedx-json", "-o", str(cdx))
    validate_spdx(spdx)
    validate_cyclonedx(cdx)
    want = dpkg_query(debian_rootfs)
    doc = json.loads(spdx.read_text())
    assert deb_rows_spdx(doc) == want and len(want) > 80
    purls = {p["externalRefs"][0]["referenceLocator"] for p in doc["packages"]}
    assert "pkg:deb/debian/coreutils@9.1-1?arch=amd64&distro=debian-12" in purls
    # only the databases were read: os-release, status, one .list a package
    assert info["packages"] == len(want) and info["files_read"] == len(want) + 2
    assert info["bytes_read"] < 2_000_000
    # per-file ownership (CycloneDX: nested file components); merged /usr paths as the image has them
    bom = json.loads(cdx.read_text())
    core = next(c for c in bom["components"] if c["name"] == "coreutils")
    assert {"type": "file", "bom-ref": f"{core['bom-ref']}:file:/usr/bin/ls", "name": "/usr/bin/ls"} \
        in core["components"]
    # deterministic: the same image gives the same bytes (stdout and -o alike)
    assert shoal(store, "sbom", "deb:1").stdout == spdx.read_bytes()
    assert shoal(store, "sbom", "deb:1", "--format", "cyclonedx-json").stdout == cdx.read_bytes()


def test_sbom_of_python_tree_lists_the_pip_package(bookworm_python: Path, tmp_path: Path) -> None:
    store = build_store(tmp_path, bookworm_python, "py:1")
    spdx, cdx = tmp_path / "p.spdx.json", tmp_path / "p.cdx.json"
    shoal(store, "sbom", "py:1", "-o", str(spdx))
    shoal(store, "sbom", "py:1", "--format", "cyclonedx-json", "-o", str(cdx))
    validate_spdx(spdx)
    validate_cyclonedx(cdx)
    assert deb_rows_spdx(json.loads(spdx.read_text())) == dpkg_query(bookworm_python)
    bom = json.loads(cdx.read_text())
    six = [c for c in bom["components"] if c["purl"].startswith("pkg:pypi/")]
    assert [c["purl"] for c in six] == [f"pkg:pypi/{PIP_PACKAGE[0]}@{PIP_PACKAGE[1]}"]
    files = {f["name"]: f for f in six[0]["components"]}
    mod = "/usr/local/lib/python3.11/dist-packages/six.py"
    assert files[mod]["hashes"][0]["alg"] == "SHA-256"
    import hashlib

    assert files[mod]["hashes"][0]["content"] == hashlib.sha256((bookworm_python / mod[1:]).read_bytes()).hexdigest()


def test_diff_packages_lists_exactly_what_apt_installed(debian_rootfs: Path, bookworm_python: Path,
                                                        tmp_path: Path) -> None:
    store = build_store(tmp_path, debian_rootfs, "deb:1")
    build_store(tmp_path, bookworm_python, "py:1", store)
    out = json.loads(shoal(store, "diff", "deb:1", "py:1", "--packages", "--json").stdout)
    a, b = dpkg_query(debian_rootfs), dpkg_query(bookworm_python)
    added = {(p["name"], p["version"], p["arch"]) for p in out["added"] if p["type"] == "deb"}
    assert added == b - a and len(added) >= 5
    assert not out["removed"]
    assert [(u["name"], u["old"], u["new"]) for u in out["upgraded"]] == []
    assert {p["name"] for p in out["added"] if p["type"] == "pypi"} == {PIP_PACKAGE[0]}
    # which changed path belongs to which package
    py = next(p["purl"] for p in out["added"] if p["name"] == "python3.11-minimal")
    assert py in out["files"]["/usr/bin/python3.11"]
    assert out["files"]["/var/lib/dpkg/status"] == []  # the database itself: no package owns it
    text = shoal(store, "diff", "deb:1", "py:1", "--packages").stdout.decode()
    assert "+ deb:python3.11-minimal:amd64 " in text and "/usr/bin/python3.11" in text


def test_rpm_and_apk_databases(tmp_path: Path) -> None:
    if shutil.which("rpmbuild") is None or shutil.which("rpm") is None:
        pytest.skip("rpm and rpmbuild are not installed (apt-get install rpm)")
    spec = tmp_path / "tiny.spec"
    spec.write_text("""Name: shoal-tiny
Version: 1.2.3
Release: 4
Epoch: 2
Summary: A tiny package
License: MIT
URL: https://example.org/tiny
BuildArch: noarch
%description
tiny
%install
mkdir -p %{buildroot}/usr/share/shoal-tiny
echo hello > %{buildroot}/usr/share/shoal-tiny/hello.txt
%files
/usr/share/shoal-tiny/hello.txt
""")
    top = tmp_path / "top"
    subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "-bb", str(spec)], check=True, capture_output=True)
    rpmfile = next(top.glob("RPMS/noarch/*.rpm"))
    root = tmp_path / "root"
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm"]
    subprocess.run([*rpm, "--initdb"], check=True, capture_output=True)
    subprocess.run([*rpm, "-i", "--nodeps", str(rpmfile)], check=True, capture_output=True)
    qa = subprocess.run([*rpm, "-qa", "--qf", "%{NAME} %{VERSION}-%{RELEASE} %{ARCH} %{EPOCH}\n"],
                        check=True, capture_output=True, text=True).stdout.split()
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('ID=fedora\nVERSION_ID=39\nPRETTY_NAME="Fedora Linux 39"\n')
    for f in (root / "var" / "lib" / "rpm").glob("rpmdb.sqlite-*"):
        f.unlink()
    (root / "var" / "lib" / "rpm" / ".rpm.lock").unlink(missing_ok=True)
    apk = root / "lib" / "apk" / "db"
    apk.mkdir(parents=True)
    (apk / "installed").write_text(
        "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nL:MIT\nT:the musl c library\nU:https://musl.libc.org/\no:musl\n"
        "m:Timo <timo@alpinelinux.org>\nF:lib\nR:ld-musl-x86_64.so.1\nZ:Q1UfzFWkSvz4MoYx0ffUHS2DLMxVI=\n"
        "R:../../etc/shadow-escape\n\n"
        "P:busybox\nV:1.36.1-r5\nA:x86_64\nL:GPL-2.0-only\nF:bin\nR:busybox\n\n")
    (root / "lib" / "ld-musl-x86_64.so.1").write_bytes(b"\x7fELF")
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_bytes(b"\x7fELF")
    store = build_store(tmp_path, root, "mixed:1")
    spdx, cdx = tmp_path / "m.spdx.json", tmp_path / "m.cdx.json"
    shoal(store, "sbom", "mixed:1", "-o", str(spdx))
    shoal(store, "sbom", "mixed:1", "--format", "cyclonedx-json", "-o", str(cdx))
    validate_spdx(spdx)
    validate_cyclonedx(cdx)
    bom = json.loads(cdx.read_text())
    by = {c["purl"]: c for c in bom["components"]}
    name, ver, arch, epoch = qa
    rp = f"pkg:rpm/fedora/{name}@{ver}?arch={arch}&distro=fedora-39&epoch={epoch}"
    assert rp in by and by[rp]["licenses"] == [{"license": {"id": "MIT"}}]
    hello = by[rp]["components"][0]
    assert hello["name"] == "/usr/share/shoal-tiny/hello.txt"
    assert hello["hashes"] == [{"alg": "SHA-256",
                                "content": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"}]
    musl = by["pkg:apk/fedora/musl@1.2.4-r2?arch=x86_64&distro=fedora-39"]
    # a path that climbs out of the root is dropped; the file's Q1 checksum is its sha1
    assert musl["components"] == [{"type": "file", "bom-ref": musl["bom-ref"] + ":file:/lib/ld-musl-x86_64.so.1",
                                   "name": "/lib/ld-musl-x86_64.so.1",
                                   "hashes": [{"alg": "SHA-1", "content": "51fcc55a44afcf8328631d1f7d41d2d832ccc552"}]}]
    assert "pkg:apk/fedora/busybox@1.36.1-r5?arch=x86_64&distro=fedora-39" in by


def test_docker_sbom_reads_ranges_and_attaches_a_referrer(bookworm_python: Path, tmp_path: Path, registry: Registry,
                                                          proxy_factory: Callable[..., RegistryProxy]) -> None:
    store = build_store(tmp_path, bookworm_python, "py:1")
    m = Store.open(store).resolve("py:1")
    repo = f"sbom-{os.getpid()}"
    shoal(store, "push", "py:1", f"docker://{registry.host}/{repo}:1")
    proxy = proxy_factory(registry.url)
    empty = tmp_path / "empty-store"
    ref = f"docker://{proxy.host}/{repo}:1"
    out = tmp_path / "r.spdx.json"
    info = json.loads(shoal(empty, "sbom", ref, "-o", str(out), "--json").stdout)
    validate_spdx(out)
    local, remote = json.loads(shoal(store, "sbom", "py:1").stdout), json.loads(out.read_text())
    for k in ("packages", "relationships"):  # the same packages; only the image's name differs
        assert remote[k][1:] == local[k][1:]
    assert remote["documentNamespace"] == local["documentNamespace"]
    # the registry's bytes: whole blobs (manifest, config, index) and the ranges of the frames read
    ranged = 0
    for _, rng in proxy.ranges:
        for part in rng.split("=", 1)[1].split(","):
            lo, hi = part.split("-")
            ranged += int(hi) - int(lo) + 1
    whole = len(m.raw) + m.config.size + m.index.size
    fetched = whole + ranged
    ranged_paths = {path for path, _ in proxy.ranges}
    pack_gets = [path for meth, path, _ in proxy.log if meth == "GET" and any(p.digest in path for p in m.packs)]
    assert pack_gets and all(path in ranged_paths for path in pack_gets)  # never a whole pack
    assert fetched < 0.05 * m.size, (fetched, m.size)
    assert info["frame_bytes_fetched"] == ranged
    print(f"\nsbom of {ref}: {fetched} bytes fetched ({ranged} in ranges) of a {m.size}-byte image "
          f"({100 * fetched / m.size:.2f}%); {info['files_read']} files, {info['bytes_read']} bytes read")
    # --attach: a referrer artifact in the registry, listed by the tag-schema index (no referrers API)
    p = shoal(empty, "sbom", f"docker://{registry.host}/{repo}:1", "--format", "cyclonedx-json", "--attach")
    digest = p.stderr.decode().split()[-1]
    from shoal.transports.registry import RegistryClient

    with RegistryClient(registry.host, lookup_credentials=False) as client:
        refs = client.referrers(repo, m.digest, "application/vnd.cyclonedx+json")
        assert [r["digest"] for r in refs] == [digest]
        assert client.get_manifest(repo, "sha256-" + m.digest.split(":")[1])[2]  # the tag-schema index
        raw, _, _ = client.get_manifest(repo, digest)
        art = json.loads(raw)
        assert art["subject"]["digest"] == m.digest and art["artifactType"] == "application/vnd.cyclonedx+json"
        assert client.get_blob(repo, art["layers"][0]["digest"]) == p.stdout


def test_attach_in_the_store_survives_gc_while_its_image_does(debian_rootfs: Path, tmp_path: Path) -> None:
    store = build_store(tmp_path, debian_rootfs, "deb:1")
    p = shoal(store, "sbom", "deb:1", "--attach")
    digest = p.stderr.decode().split()[-1]
    st = Store.open(store)
    m = st.resolve("deb:1")
    assert [d["digest"] for d in st.referrers(m.digest, "application/spdx+json")] == [digest]
    shoal(store, "sbom", "deb:1", "--attach")  # the same bytes: one artifact
    assert len(st.layout.untagged()) == 1
    shoal(store, "gc")
    assert st.layout.has(digest) and st.referrers(m.digest)
    shoal(store, "rm", "deb:1")
    shoal(store, "gc")
    assert not st.layout.has(digest) and st.layout.untagged() == []
