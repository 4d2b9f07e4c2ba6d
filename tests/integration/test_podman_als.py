"""podman 4.3 runs a Shoal image lazily through ``shoal store serve`` (docs/podman.md, issue 11).

Real parts only: distribution's registry behind the recording proxy of regfix, ``shoal push``,
``shoal store serve`` (FUSE), and podman with private storage/containers/registries config.
"""

from __future__ import annotations

import base64
import hashlib
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from containerd_fix import pids_with  # noqa: E402

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


def _podman_env(d: Path, host: str, als: bool = True) -> dict[str, str]:
    """The recipe's private config (containers.md §7): overlay storage (with the ALS unless the commands
    name it), host netns, default_ulimits (runc cannot raise rlimits without CAP_SYS_RESOURCE), runc,
    cgroupfs, file events."""
    opts = f'[storage.options]\nadditionallayerstores = ["{d}/als:ref"]\n' if als else ""
    (d / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n{opts}')
    (d / "containers.conf").write_text(
        '[containers]\nnetns = "host"\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        f'[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\ntmp_dir = "{d}/tmp"\n')
    (d / "registries.conf").write_text(
        f'unqualified-search-registries = []\n[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"),
            "CONTAINERS_CONF": str(d / "containers.conf"), "CONTAINERS_REGISTRIES_CONF": str(d / "registries.conf")}


def _quickstart() -> list[str]:
    """The shell lines of README.md's podman quickstart (the first ``sh`` block under its heading)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n## podman quickstart", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


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
def image(tmp_path: Path, registry_factory, proxy_factory, monkeypatch: pytest.MonkeyPatch) -> dict:  # type: ignore[no-untyped-def,type-arg]  # noqa: F811
    """A Shoal image pushed to a registry behind a recording proxy, and podman's private directories."""
    reg: Registry = registry_factory()
    proxy: RegistryProxy = proxy_factory(reg.url)
    tree, pod, run_dir = tmp_path / "tree", tmp_path / "podman", tmp_path / "shoalrun"
    pod.mkdir()
    (pod / "als").mkdir()
    run_dir.mkdir()
    monkeypatch.setenv("SHOAL_RUN_DIR", str(run_dir))
    _tree(tree)
    helpers.run_shoal(tmp_path / "store", "build", tree, "app:1")
    helpers.run_shoal(tmp_path / "store", "push", "app:1", f"docker://{reg.host}/app:1")
    doc, view = _published(reg, "app", "1")
    return {"tmp": tmp_path, "proxy": proxy, "doc": doc, "view": view, "pod": pod, "run_dir": run_dir,
            "ref": f"{proxy.host}/app:1", "log": tmp_path / "als.log"}


def _stop(serve: list[int], env: dict[str, str], tmp: Path) -> None:
    """Remove podman's images (c/storage releases their layers), stop the store (pids ``serve``) and
    check that nothing is left: no mount under ``tmp`` and no ``shoal mount`` daemon of an image mount."""
    subprocess.run([PODMAN, "system", "reset", "-f"], env=env, capture_output=True, timeout=60)  # type: ignore[list-item]
    for pid in serve:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
    left = _mounts_under(tmp)
    for mp in reversed(left):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    assert not left, f"mounts left behind: {left}"
    assert _released(tmp / "shoalrun" / "als", 10), f"daemons left behind: {pids_with(str(tmp))}"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _released(mounts_root: Path, timeout: float) -> bool:
    """True once no mount under ``mounts_root`` and no process naming it remain (within ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while _mounts_under(mounts_root) or pids_with(str(mounts_root)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def setup(image: dict) -> Iterator[dict]:  # type: ignore[type-arg]
    """``image`` with ``shoal store serve`` running at podman's ALS (named in storage.conf)."""
    tmp, pod = image["tmp"], image["pod"]
    env = _podman_env(pod, image["proxy"].host)
    env["SHOAL_RUN_DIR"] = str(image["run_dir"])
    log = open(image["log"], "wb")  # noqa: SIM115
    serve = subprocess.Popen([*helpers.shoal_cmd(tmp / "lazy-store", "-v", "store", "serve", pod / "als")],
                             env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while str((pod / "als").resolve()) not in _mounts_under(tmp):
            assert serve.poll() is None and time.monotonic() < deadline, image["log"].read_text()
            time.sleep(0.05)
        yield {**image, "env": env}
    finally:
        _stop([serve.pid], env, tmp)
        serve.wait()
        log.close()


def test_readme_podman_quickstart_runs_lazily_and_rmi_releases_the_mount(image: dict) -> None:  # type: ignore[type-arg]
    """README.md's podman quickstart, line for line (only IMAGE and ALS are this test's), then checks:
    the container ran, nothing but range reads of packs reached the registry, and ``podman rmi`` (its
    last line) released the image's lazy mount and daemon."""
    tmp, pod, proxy, doc, view = image["tmp"], image["pod"], image["proxy"], image["doc"], image["view"]
    lines = _quickstart()
    assert lines[0].startswith("IMAGE=") and lines[1].startswith("ALS="), lines
    script = [f"IMAGE={image['ref']}", f"ALS={pod / 'als'}", *lines[2:]]
    env = _podman_env(pod, proxy.host, als=False)  # the ALS comes from the quickstart's --storage-opt
    env.update(SHOAL_RUN_DIR=str(image["run_dir"]), SHOAL_STORE=str(tmp / "lazy-store"),
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    out = tmp / "quickstart.out"
    with open(out, "wb") as f:  # not a pipe: the store started in the background keeps its stdout
        sh = subprocess.Popen(["bash", "-euc", "\n".join(script)], env=env, stdin=subprocess.DEVNULL,
                              stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # (podman 4.3 sometimes waits 10-20 s for conmon on the first container of a fresh state: not Shoal)
        assert sh.wait(120) == 0, out.read_text()[-3000:]
        text = out.read_text()
        assert "hello from a lazy image\n" in text, text[-3000:]
        assert "GC doesn't seem to be supported" not in text  # the use/rmdir hints were answered ENOENT

        # the registry saw manifests, the config, the index and range reads of packs: never a whole pack
        (stub,) = [ly["digest"] for ly in view["layers"]]
        layers = [ly["digest"] for ly in doc["layers"]]
        gets = [path for method, path, status in proxy.log if method == "GET" and "/blobs/" in path]
        for pack in layers[1:]:
            whole = [g for g in gets if g.endswith(pack)]
            ranged = [r for path, r in proxy.ranges if path.endswith(pack)]
            assert len(whole) == len(ranged), (pack, whole, ranged)
        fetched = sum(int(hi) - int(lo) + 1 for lo, hi in
                      (rng.split("=", 1)[1].split("-") for _path, rng in proxy.ranges))
        assert 0 < fetched < sum(ly["size"] for ly in doc["layers"][1:]) / 3, fetched
        assert any(g.endswith(layers[0]) for g in gets)
        assert not any(g.endswith(stub) for g in gets)  # the stub is never downloaded

        # podman rmi: c/storage's last release of the stub layer unmounts the image, its daemon exits
        mounts = image["run_dir"] / "als"
        assert _released(mounts, 10), (_mounts_under(tmp), pids_with(str(mounts)))
        deadline = time.monotonic() + 10  # the mount point goes with it, just after the unmount
        while list(mounts.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(mounts.iterdir())
        assert pids_with(str(pod / "als")), "the quickstart's store is not running"
    finally:
        if sh.poll() is None:
            os.killpg(sh.pid, signal.SIGKILL)
            sh.wait()
        # only the store names it (the image mounts are under SHOAL_RUN_DIR)
        _stop(pids_with(str(pod / "als")), env, tmp)


def test_blob_files_hold_the_registry_blobs(setup: dict) -> None:  # type: ignore[type-arg]
    """``<layer>/blob`` of the stub and of the index layer: the blob's own bytes (sha256 = the digest) and
    size; ``podman push`` to ``dir:`` (c/storage reads the stub's ``blob``) writes the stub as the layer."""
    env, doc, view, pod = setup["env"], setup["doc"], setup["view"], setup["pod"]
    prefix = pod / "als" / base64.b64encode(setup["ref"].encode()).decode()
    for ly in (view["layers"][0], doc["layers"][0]):
        blob = prefix / ly["digest"] / "blob"
        assert blob.stat().st_size == ly["size"]
        data = blob.read_bytes()
        assert ("sha256:" + hashlib.sha256(data).hexdigest(), len(data)) == (ly["digest"], ly["size"])

    p = subprocess.run([PODMAN, "pull", setup["ref"]], env=env, capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert p.returncode == 0, p.stderr[-3000:]
    # podman push to dir: (uncompressed) copies what c/storage's Diff reads from the stub's ``blob``
    # (podman save and push to oci: refuse the stub's media type before writing: containers/image 5.23)
    out = setup["tmp"] / "pushed"
    p = subprocess.run([PODMAN, "push", setup["ref"], f"dir:{out}"], env=env, capture_output=True, text=True,  # type: ignore[list-item]
                       timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    stub = view["layers"][0]["digest"]
    saved = (out / stub.split(":", 1)[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(saved).hexdigest() == stub
    # c/storage still uses the pulled layer (use +1 at lookup and CreateAs, release -1 after the pull and
    # after the push's read): its image mount stays
    assert len(_mounts_under(setup["run_dir"] / "als")) == 1, setup["log"].read_text()[-3000:]
