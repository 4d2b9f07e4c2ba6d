"""The error tree: one-line, bounded messages and the one errno -> error mapping (real failures)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from shoal.errors import (
    MAX_MESSAGE,
    FormatError,
    NoSpace,
    NotFound,
    PermissionDenied,
    ShoalError,
    StoreError,
    from_oserror,
)
from shoal.store.catalog import Catalog

_ROW = (b"\x01" * 32, "p", 0, 10, 20, 0, 20)


def _oserror(fn: object, *args: object) -> OSError:
    with pytest.raises(OSError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value


def test_messages_are_one_bounded_line() -> None:
    msg = str(ShoalError("server said:\r\nline two\x1b[31m\x00" + "x" * 5000))
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg and "\x00" not in msg
    assert msg.startswith("server said: line two\\x1b[31m\\x00")
    assert len(msg) == MAX_MESSAGE and "..." in msg


def test_errno_mapping(tmp_path: Path) -> None:
    long = _oserror(os.stat, str(tmp_path / ("n" * 300)))
    e = from_oserror(long, "cannot read")
    assert isinstance(e, FormatError) and e.exit_code == 4 and "too long" in str(e)
    assert len(str(e)) < 300  # the path is cut
    assert isinstance(from_oserror(_oserror(os.stat, str(tmp_path / "no"))), NotFound)
    assert isinstance(from_oserror(_oserror(os.stat, str(tmp_path / "no")), store=True), StoreError)
    for code, cls, exit_code in [(errno.EACCES, PermissionDenied, 8), (errno.EPERM, PermissionDenied, 8),
                                 (errno.ENOSPC, NoSpace, 9), (errno.EDQUOT, NoSpace, 9)]:
        e = from_oserror(OSError(code, os.strerror(code), "/p"), "cannot write")
        assert type(e) is cls and e.exit_code == exit_code and str(e).endswith(": /p"), str(e)
    rofs = OSError(errno.EROFS, os.strerror(errno.EROFS), "/s/tmp/x")
    assert type(from_oserror(rofs, store=True)) is StoreError
    assert type(from_oserror(rofs)) is PermissionDenied
    assert "read-only" in str(from_oserror(rofs))


def test_catalogue_full_is_no_space(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.db")
    cat._conn().execute("PRAGMA max_page_count = 8")  # the database cannot grow: SQLITE_FULL, for real
    rows = [(os.urandom(32), "p" * 100, i, 1, 1, 0, 1) for i in range(2000)]
    with pytest.raises(NoSpace) as ei:
        cat.add(rows)
    assert "no space left" in str(ei.value) and "c.db" in str(ei.value)
    assert cat.count() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr needs root")
def test_catalogue_read_only_is_a_store_error(tmp_path: Path) -> None:
    Catalog(tmp_path / "c.db").add([_ROW])
    subprocess.run(["chattr", "+i", str(tmp_path / "c.db")], check=True)
    try:
        cat = Catalog(tmp_path / "c.db")
        assert cat.count() == 1  # reads work
        with pytest.raises(StoreError) as ei:
            cat.add([(b"\x02" * 32, "p", 0, 10, 20, 0, 20)])
        assert "read-only" in str(ei.value) and "readonly database" in str(ei.value)
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "c.db")], check=False)
