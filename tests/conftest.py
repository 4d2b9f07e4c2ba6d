"""Fixtures shared by the core test suite.

Expensive trees are built once and cached on disk under $SHOAL_TEST_CACHE (default
/var/tmp/shoal-test-cache), guarded by a file lock so pytest-xdist workers share them:

- ``debian_rootfs``: ``debootstrap --variant=minbase bookworm`` (root only, ~200 MB, ~30 s once).
- ``generated_tree``: ``helpers.generate_tree`` (seeded; re-made when the generator's code changes).

Tests must treat both as read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def _cache_root() -> Path:
    p = Path(os.environ.get("SHOAL_TEST_CACHE", "/var/tmp/shoal-test-cache"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


@pytest.fixture(scope="session", autouse=True)
def _session_blob_info_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The blob-info cache (where registry blobs were seen, for cross-repository mounts) of this worker, never
    the machine's /var/lib/shoal/cache: module- and session-scoped fixtures that push use this one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHOAL_BLOB_INFO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "blob-info-cache" / "session"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_signature_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A signature policy of the suite's own (insecureAcceptAnything), never the machine's
    /etc/containers/policy.json: pulls, mounts and runs apply one (docs/spec/trust.md §4); tests of the
    policy give theirs with --signature-policy."""
    path = tmp_path_factory.getbasetemp() / "policy-accept-anything.json"
    path.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHOAL_SIGNATURE_POLICY", str(path))
        yield


@pytest.fixture(autouse=True)
def _own_blob_info_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own blob-info cache (made only if a registry is used), so that no test mounts from a
    repository another test pushed to; CLI runs inherit it through the environment."""
    import uuid

    monkeypatch.setenv("SHOAL_BLOB_INFO_CACHE_DIR",
                       str(tmp_path_factory.getbasetemp() / "blob-info-cache" / uuid.uuid4().hex))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return _cache_root()


@pytest.fixture(scope="session")
def debian_rootfs(cache_dir: Path) -> Path:
    """A real Debian bookworm minbase root filesystem, made once with debootstrap and reused."""
    deb = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
    if deb is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    target = cache_dir / "bookworm-minbase"
    marker = cache_dir / "bookworm-minbase.complete"
    with helpers.locked(cache_dir / "bookworm-minbase.lock"):
        if marker.exists() and target.is_dir():
            return target
        partial = cache_dir / "bookworm-minbase.partial"
        for p in (partial, target):
            if p.exists():
                for m in reversed(_mounts_under(p)):
                    subprocess.run(["umount", "-l", m], check=False)
                shutil.rmtree(p)
        log = cache_dir / "bookworm-minbase.log"
        with open(log, "wb") as out:
            r = subprocess.run([deb, "--variant=minbase", "bookworm", str(partial)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=1800)
        left = _mounts_under(partial)
        for m in reversed(left):
            subprocess.run(["umount", "-l", m], check=False)
        if r.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"debootstrap failed (exit {r.returncode}); log {log}:\n{tail}")
        os.rename(partial, target)
        marker.write_text("debootstrap --variant=minbase bookworm\n")
    return target


@pytest.fixture(scope="session")
def generated_tree(cache_dir: Path) -> Path:
    """The deterministic generated tree (see ``helpers.generate_tree``): >= 5,000 files, every kind of
    entry and metadata Shoal stores."""
    key = f"generated-{helpers.generator_fingerprint()}"
    target = cache_dir / key
    marker = cache_dir / f"{key}.complete"
    with helpers.locked(cache_dir / "generated.lock"):
        if marker.exists() and target.is_dir():
            return target
        if target.exists():
            shutil.rmtree(target)
        counts = helpers.generate_tree(target)
        assert counts["files"] >= 5000
        marker.write_text(repr(counts) + "\n")
        # drop trees made by older versions of the generator
        for old in cache_dir.glob("generated-*"):
            if old.name.startswith(key):
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def generated_snapshot(generated_tree: Path) -> dict[bytes, dict[str, object]]:
    return helpers.tree_snapshot(generated_tree)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path):  # type: ignore[no-untyped-def]
    from shoal.store import Store

    return Store.open(store_dir)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory that no unpack may touch; check it with ``helpers.tree_snapshot`` afterwards."""
    d = tmp_path / "sentinel"
    d.mkdir()
    (d / "keep").write_bytes(b"do not touch\n")
    return d


@pytest.fixture(scope="session")
def generated_image(generated_tree: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(store directory, ref, BuildResult) of the generated tree built once per session (read-only)."""
    from shoal.build import BuildOptions, build
    from shoal.store import Store

    d = tmp_path_factory.mktemp("generated-store")
    r = build(Store.open(d), generated_tree, "gen:1", BuildOptions(workers=2))
    return d, "gen:1", r
