"""podman 4.3 runs a Shoal image lazily through ``shoal store serve`` (docs/podman.md, issue 11).

Real parts only: distribution's registry behind the recording proxy of regfix, ``shoal push``,
``shoal store serve`` (FUSE), and podman with private storage/containers/registries config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import Registry, RegistryProxy, proxy_factory, registry_factory  # noqa: E402,F401

PODMAN = shutil.which("podman")
pytestmark = pytest.mark.skipif(PODMAN is None or os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs podman (apt-get install podman), root and /dev/fuse")


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [m for m in mps if m.startswith(prefix)]


def _tree(root: Path) -> None:
    """A tiny runnable root: dash as /bin/sh with its libraries, a greeting, and 6 MiB never read."""
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "lib64", "lib/x86_64-linux-gnu"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/dash", root / "bin/sh")
    out = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True, check=True).stdout
    for word in out.split():
        if word.startswith("/") and os.path.exists(word):
            dst = root / word.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.realpath(word), dst)
    (root / "etc/greeting").write_text("hello from shoal\n")
    (root / "unread.bin").write_bytes(os.urandom(6 << 20))


def _podman_env(d: Path, host: str) -> dict[str, str]:
    """The recipe's private config (containers.md §7): overlay storage with the ALS, host netns,
    default_ulimits (runc cannot raise rlimits without CAP_SYS_RESOURCE), runc, cgroupfs, file events."""
    (d / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n'
        f'[storage.options]\nadditionallayerstores = ["{d}/als:ref"]\n')
    (d / "containers.conf").write_text(
        '[containers]\nnetns = "host"\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        f'[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\ntmp_dir = "{d}/tmp"\n')
    (d / "registries.conf").write_text(
        f'unqualified-search-registries = []\n[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"),
            "CONTAINERS_CONF": str(d / "containers.conf"), "CONTAINERS_REGISTRIES_CONF": str(d / "registries.conf")}


def _get(reg: Registry, repo: str, ref: str, accept: str) -> dict[str, object]:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _published(reg: Registry, repo: str, tag: str) -> tuple[dict[str, object], dict[str, object]]:
    """What ``shoal push`` wrote at the tag (oci-mapping.md §4): an index of the runtime view (listed
    first, podman takes it) and the Shoal manifest.  Returns (Shoal manifest, view manifest)."""
    index = _get(reg, repo, tag, "application/vnd.oci.image.index.v1+json")
    helpers.validate_oci(index, "image-index-schema")
    view_e, shoal_e = index["manifests"]  # type: ignore[misc]
    assert shoal_e["artifactType"] == "application/vnd.shoal.image.v1", index
    docs = [_get(reg, repo, e["digest"], "application/vnd.oci.image.manifest.v1+json") for e in (shoal_e, view_e)]
    for d in docs:
        helpers.validate_oci(d, "image-manifest-schema")
    return docs[0], docs[1]


@pytest.fixture
def setup(tmp_path: Path, registry_factory, proxy_factory, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:  # type: ignore[no-untyped-def]  # noqa: F811
    reg: Registry = registry_factory()
    proxy: RegistryProxy = proxy_factory(reg.url)
    store, tree, pod = tmp_path / "store", tmp_path / "tree", tmp_path / "podman"
    pod.mkdir()
    (pod / "als").mkdir()
    run_dir = tmp_path / "shoalrun"
    run_dir.mkdir()
    monkeypatch.setenv("SHOAL_RUN_DIR", str(run_dir))
    _tree(tree)
    helpers.run_shoal(store, "build", tree, "app:1")
    helpers.run_shoal(store, "push", "app:1", f"docker://{reg.host}/app:1")
    doc, view = _published(reg, "app", "1")
    env = _podman_env(pod, proxy.host)
    env["SHOAL_RUN_DIR"] = str(run_dir)
    log = open(tmp_path / "als.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen([*helpers.shoal_cmd(tmp_path / "lazy-store", "-v", "store", "serve", pod / "als")],
                             env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while str((pod / "als").resolve()) not in _mounts_under(tmp_path):
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "als.log").read_text()
            time.sleep(0.05)
        yield {"proxy": proxy, "env": env, "doc": doc, "view": view, "pod": pod, "log": tmp_path / "als.log"}
    finally:
        subprocess.run([PODMAN, "system", "reset", "-f"], env=env, capture_output=True, timeout=60)  # type: ignore[list-item]
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()
        left = _mounts_under(tmp_path)
        for mp in reversed(left):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        assert not left, f"mounts left behind: {left}"


def test_podman_pulls_and_runs_a_shoal_image_lazily(setup: dict) -> None:  # type: ignore[type-arg]
    env, proxy, doc, view = setup["env"], setup["proxy"], setup["doc"], setup["view"]
    host = proxy.host

    # the tag `shoal push` wrote: podman takes the runtime view, whose one (stub) layer the store serves
    p = subprocess.run([PODMAN, "--log-level=debug", "pull", f"{host}/app:1"], env=env, capture_output=True,  # type: ignore[list-item]
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    (stub,) = [ly["digest"] for ly in view["layers"]]  # type: ignore[index]
    assert f"Skipping blob {stub} (already present)" in p.stderr, p.stderr[-3000:]
    layers = [ly["digest"] for ly in doc["layers"]]  # type: ignore[index]
    assert "GC doesn't seem to be supported" not in p.stderr  # the use/rmdir hints were answered ENOENT

    # (podman 4.3 sometimes waits 10-20 s for conmon on the first container of a fresh state: not Shoal)
    p = subprocess.run([PODMAN, "run", "--rm", f"{host}/app:1", "/bin/sh", "-c", "read x < /etc/greeting; echo $x"],  # type: ignore[list-item]
                       env=env, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "hello from shoal\n"), p.stderr + setup["log"].read_text()

    # the registry saw manifests, the config, the index and range reads of packs: never a whole pack
    index, packs = layers[0], layers[1:]
    gets = [path for method, path, status in proxy.log if method == "GET" and "/blobs/" in path]
    for pack in packs:
        whole = [g for g in gets if g.endswith(pack)]
        ranged = [r for path, r in proxy.ranges if path.endswith(pack)]
        assert len(whole) == len(ranged), (pack, whole, ranged)
    assert proxy.ranges, proxy.log
    fetched = 0
    for _path, rng in proxy.ranges:
        lo, hi = rng.split("=", 1)[1].split("-")
        fetched += int(hi) - int(lo) + 1
    pack_bytes = sum(ly["size"] for ly in doc["layers"][1:])  # type: ignore[index]
    assert fetched < pack_bytes / 3, (fetched, pack_bytes)
    assert any(g.endswith(index) for g in gets)
    assert not any(g.endswith(stub) for g in gets)  # the stub is never downloaded
