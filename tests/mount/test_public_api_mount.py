"""``shoal.mount`` / ``shoal.unmount`` of the public API (docs/api.md): a real FUSE mount served by a daemon.

The mount is made from a child process (as the CLI does: ``mount`` forks the daemon, which a
multi-threaded pytest worker should not), the unmount from this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import shoal


def test_api_mount_then_unmount(sample: dict[str, object], mnt: Path, run_dir: Path) -> None:
    store, tree = sample["store"], sample["tree"]
    assert isinstance(store, Path) and isinstance(tree, Path)
    code = ("import sys, shoal\n"
            "st = shoal.mount(sys.argv[1], sys.argv[2], store=sys.argv[3])\n"
            "assert st is not None and st.pid > 0 and not st.writable\n"
            "print(st.digest)\n")
    p = subprocess.run([sys.executable, "-c", code, str(sample["ref"]), str(mnt), str(store)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == shoal.open_image(str(sample["ref"]), store=store).digest
    assert (mnt / "text09").read_bytes() == (tree / "text09").read_bytes()
    st = shoal.unmount(mnt)
    assert st is not None and st.mountpoint == str(mnt)
    assert not os.path.exists(mnt / "text09")
    try:
        shoal.unmount(mnt)
    except shoal.NotFound as exc:
        assert "not a shoal mount" in str(exc)
    else:
        raise AssertionError("a second unmount raises NotFound")
