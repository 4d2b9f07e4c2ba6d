"""``shoal service`` refuses to serve once its own code changed (cli/service.py ``_CodeWatch``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.cli import service


def _pkg(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    return pkg


def test_bytecode_caches_do_not_count_but_a_source_change_does(tmp_path: Path) -> None:
    pkg = _pkg(tmp_path)
    watch = service._CodeWatch(pkg)
    assert watch.fd >= 0
    assert not watch.changed()
    (pkg / "__pycache__").mkdir()  # what importing the package writes
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x")
    (pkg / "sub" / "notes.txt").write_text("x")
    assert not watch.changed()
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    assert watch.changed()
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    assert watch.changed()  # stale for good


@pytest.mark.parametrize("change", ["new module", "new package", "removed module", "moved module", "touched"])
def test_each_kind_of_change_is_seen(tmp_path: Path, change: str) -> None:
    pkg = _pkg(tmp_path)
    watch = service._CodeWatch(pkg)
    if change == "new module":
        (pkg / "sub" / "c.py").write_text("")
    elif change == "new package":
        (pkg / "newpkg").mkdir()
    elif change == "removed module":
        (pkg / "a.py").unlink()
    elif change == "moved module":
        (pkg / "a.py").rename(pkg / "sub" / "a2.txt")
    else:
        os.utime(pkg / "sub" / "b.py", ns=(1, 1))
    assert watch.changed()


def test_without_inotify_each_request_compares_the_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pkg: Path) -> int:
        raise OSError(28, "no watches left")

    monkeypatch.setattr(service, "_inotify", refuse)
    pkg = _pkg(tmp_path)
    watch = service._CodeWatch(pkg)
    assert watch.fd == -1
    assert not watch.changed()
    os.utime(pkg / "a.py", ns=(1, 1))
    assert watch.changed()
