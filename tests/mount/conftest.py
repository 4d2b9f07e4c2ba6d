"""Fixtures for the FUSE mount and ``shoal run`` tests (real FUSE, real overlayfs, real runc).

Every test gets its own ``SHOAL_RUN_DIR`` under ``tmp_path``.  Teardown kills any daemon still
recorded there and lazily unmounts everything under ``tmp_path``, even when the test failed, so no
dead mount is ever left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mountkit import run_dir_fixture  # noqa: F401  (the run_dir fixture every mount test uses)


def _fuse_ok() -> str | None:
    if os.geteuid() != 0:
        return "mount tests need root (FUSE allow_other, overlayfs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


_why = _fuse_ok()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _why:
        return
    for item in items:
        if "tests/mount/" in str(item.fspath) and {"run_dir", "mnt", "sample"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.skip(reason=_why))


@pytest.fixture
def mnt(tmp_path: Path, run_dir: Path) -> Path:
    d = tmp_path / "mnt"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The sample tree built into a fresh store as ``sample:1``, and unpacked beside it (read-only).

    Keys: tree, store, unpacked, ref, randoms ({path: bytes} of its random-content files)."""
    from mountkit import make_sample_tree

    from shoal.build import BuildOptions, build
    from shoal.reader import LayoutSource, Reader
    from shoal.store import Store
    from shoal.unpack import unpack

    base = tmp_path_factory.mktemp("sample")
    tree = base / "tree"
    randoms = make_sample_tree(tree)
    store = Store.open(base / "store")
    build(store, tree, "sample:1", BuildOptions(workers=2))
    idx = store.load_index(store.resolve("sample:1"))
    unpack(idx, Reader(idx, LayoutSource(store.layout)), str(base / "unpacked"))
    return {"tree": tree, "store": base / "store", "unpacked": base / "unpacked", "ref": "sample:1",
            "randoms": randoms}
