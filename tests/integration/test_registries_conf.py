"""containers-registries.conf(5) end to end, with real registries: distribution B is a pull-through cache
(proxy mode) of distribution A and A's mirror in a registries.conf.  Pulls and lazy mounts go through B
(B's access log shows it), fall back to A when B is down; ``blocked`` is refused in one line; a
``location`` rewrite and a short-name alias reach A."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mount"))

from mountkit import run_dir_fixture  # noqa: E402,F401

from helpers import assert_one_line_error, run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401

BIG = os.urandom(3 << 20)  # several frames: a lazy read of it is several range requests


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding ``app:1``, a small Shoal image with one 3 MB random file."""
    from shoal.build import BuildOptions, build
    from shoal.store import Store

    base = tmp_path_factory.mktemp("regconf")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello from A\n")
    (tree / "big").write_bytes(BIG)
    build(Store.open(base / "store"), tree, "app:1", BuildOptions(workers=1))
    return base / "store"


@pytest.fixture()
def pair(registry_factory: Callable[..., Registry], image: Path) -> Iterator[tuple[Registry, Registry]]:
    """(A with ``team/app:1``, B a pull-through cache of A with an access log)."""
    a = registry_factory()
    run_shoal(image, "push", "app:1", f"docker://{a.host}/team/app:1")
    b = registry_factory(proxy_remote=a.url, access_log=True)
    yield a, b


def _conf(tmp_path: Path, text: str) -> str:
    p = tmp_path / "registries.conf"
    p.write_text(text)
    return str(p)


def _mirror_conf(tmp_path: Path, a: Registry, b: Registry) -> str:
    return _conf(tmp_path, f'[[registry]]\nlocation = "{a.host}"\n[[registry.mirror]]\nlocation = "{b.host}"\n')


def _blob_gets(b: Registry) -> list[str]:
    return [r for r in b.requests() if r.startswith("GET ") and "/blobs/sha256:" in r]


def test_pull_goes_through_the_mirror_and_falls_back_when_it_is_down(
        pair: tuple[Registry, Registry], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    conf = _mirror_conf(tmp_path, a, b)
    run_shoal(tmp_path / "s1", "pull", "--registries-conf", conf, f"docker://{a.host}/team/app:1", "got:1")
    reqs = b.requests()
    assert "GET /v2/team/app/manifests/1" in reqs, reqs
    assert _blob_gets(b), reqs
    out = run_shoal(tmp_path / "s1", "cat", "got:1", "/etc/hello").stdout
    assert out == b"hello from A\n"
    # the environment variable names the file too; with B down the pull falls back to A
    b.kill()
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", conf)
    t0 = time.monotonic()
    run_shoal(tmp_path / "s2", "pull", f"docker://{a.host}/team/app:1", "got:1")
    assert time.monotonic() - t0 < 20
    assert run_shoal(tmp_path / "s2", "cat", "got:1", "/big").stdout == BIG
    # a missing --registries-conf file is one clear error
    p = run_shoal(tmp_path / "s3", "pull", "--registries-conf", str(tmp_path / "nope.conf"),
                  f"docker://{a.host}/team/app:1", "got:1", check=False)
    assert p.returncode == 2
    assert_one_line_error(p, "nope.conf", "does not exist")


def test_blocked_is_refused_for_pull_and_push(pair: tuple[Registry, Registry], image: Path, tmp_path: Path) -> None:
    a, _ = pair
    conf = _conf(tmp_path, f'[[registry]]\nprefix = "{a.host}/team"\nblocked = true\n')
    ref = f"docker://{a.host}/team/app:1"
    for args in (("pull", "--registries-conf", conf, ref, "x:1"), ("push", "--registries-conf", conf, "app:1", ref)):
        p = run_shoal(image if args[0] == "push" else tmp_path / "s", *args, check=False)
        assert p.returncode == 2, p
        assert "blocked" in assert_one_line_error(p, conf)
    run_shoal(tmp_path / "s", "pull", "--registries-conf", conf, f"docker://{a.host}/other/app:1", "x:1",
              check=False)  # another prefix is not blocked (it fails for lack of the image, not the block)
    bad = _conf(tmp_path, "[[registry]\n")
    p = run_shoal(tmp_path / "s", "pull", "--registries-conf", bad, ref, "x:1", check=False)
    assert p.returncode == 2
    assert_one_line_error(p, "registries.conf", "TOML")


def test_location_rewrite_and_short_name_alias(pair: tuple[Registry, Registry], tmp_path: Path) -> None:
    a, _ = pair
    conf = _conf(tmp_path, f'[[registry]]\nprefix = "example.test/ns"\nlocation = "{a.host}/team"\n'
                           f'[aliases]\n"myapp" = "{a.host}/team/app"\n'
                           f'"ghost" = "{a.host}/team/ghost"\n')
    run_shoal(tmp_path / "s", "pull", "--registries-conf", conf, "docker://example.test/ns/app:1", "rw:1")
    assert run_shoal(tmp_path / "s", "cat", "rw:1", "/etc/hello").stdout == b"hello from A\n"
    run_shoal(tmp_path / "s", "pull", "--registries-conf", conf, "myapp:1")
    assert run_shoal(tmp_path / "s", "cat", "myapp:1", "/etc/hello").stdout == b"hello from A\n"
    p = run_shoal(tmp_path / "s", "pull", "--registries-conf", conf, "ghost:1", check=False)
    assert p.returncode == 3
    assert_one_line_error(p)
    amb = _conf(tmp_path, f'unqualified-search-registries = ["{a.host}", "quay.io"]\n')
    p = run_shoal(tmp_path / "s", "pull", "--registries-conf", amb, "app:1", check=False)
    assert p.returncode == 2
    msg = assert_one_line_error(p, "ambiguous")
    assert f"{a.host}/app" in msg and "quay.io/app" in msg


def _can_mount() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


@pytest.mark.skipif(not _can_mount(), reason="lazy mounts need root, /dev/fuse and pyfuse3")
def test_lazy_mount_reads_ranges_through_the_mirror(pair: tuple[Registry, Registry], run_dir: Path,
                                                    tmp_path: Path) -> None:
    a, b = pair
    conf = _mirror_conf(tmp_path, a, b)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_shoal(tmp_path / "cold", "mount", "--registries-conf", conf, "--prefetch", "none",
              f"docker://{a.host}/team/app:1", mnt)
    try:
        before = len(_blob_gets(b))
        assert hashlib.sha256((mnt / "big").read_bytes()).digest() == hashlib.sha256(BIG).digest()
        assert (mnt / "etc" / "hello").read_bytes() == b"hello from A\n"
        assert len(_blob_gets(b)) > before, b.requests()[-10:]
    finally:
        run_shoal(None, "umount", mnt, check=False)
