"""Cold-start read-ahead (cli/preload.py): a command remembers the files it loaded and reads them ahead
at its next start; the list is only ever read from, and a bad list costs nothing but its own entries."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from helpers import shoal_cmd


def _run(store: Path, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    e = {**os.environ, "XDG_CACHE_HOME": str(cache), **env}
    e.pop("SHOAL_STORE", None)
    return subprocess.run(shoal_cmd(store, *args), capture_output=True, env=e, timeout=120, check=True)


def test_a_command_records_what_it_loaded_and_reads_it_ahead_next_time(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(tmp_path / "store", cache, "images")
    lst = cache / "shoal" / "preload" / "images"
    files = lst.read_text().split()
    assert files and all(f.startswith("/") for f in files)
    assert any("click" in f for f in files) and any("/shoal/cli/" in f for f in files)
    assert (lst.parent.stat().st_mode & 0o777) == 0o700
    before = lst.stat().st_mtime_ns
    time.sleep(0.01)
    _run(tmp_path / "store", cache, "images")  # the same files: the list is not written again
    assert lst.stat().st_mtime_ns == before
    # a different command keeps a list of its own; options before the command are skipped
    _run(tmp_path / "store", cache, "-v", "images", "--json")
    assert not (cache / "shoal" / "preload" / "-v").exists()


def test_a_hostile_or_stale_list_is_harmless(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lst = cache / "shoal" / "preload" / "images"
    lst.parent.mkdir(parents=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block without O_NONBLOCK; it is never opened
    lst.write_text("\n".join([str(fifo), "/dev/zero", str(tmp_path / "gone.pyc"), str(tmp_path), "relative.pyc",
                              "/" + "x" * 5000]) + "\n")
    t = time.monotonic()
    p = _run(tmp_path / "store", cache, "images")
    assert time.monotonic() - t < 60 and p.returncode == 0
    assert str(fifo) not in lst.read_text()  # replaced by what the command really loaded


def test_off_and_unwritable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(tmp_path / "store", cache, "images", SHOAL_PRELOAD="0")
    assert not (cache / "shoal").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "shoal").write_text("a file where the directory would be")
    p = _run(tmp_path / "store", ro, "images")  # cannot record: the command still succeeds, silently
    assert p.returncode == 0 and b"preload" not in p.stderr
