"""shoal build -f on real trees (issue 15 part 2): bookworm minbase + python3 installed by a run step with the
network on, an app image copying a script on top; lineage (base + recipe) lets ``shoal rebase`` move the
python3 install onto another debootstrap run; ``update`` with nothing changed runs nothing.  Needs root,
runc, slirp4netns or pasta, and the Debian mirror."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import debtrees  # noqa: E402
import helpers  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = """
py:
  from: base:1
  network: true
  env: {DEBIAN_FRONTEND: noninteractive}
  run:
    - apt-get install -y -q --no-install-recommends python3
app:1:
  from: py
  copy: [{src: main.py, dst: /app/main.py}]
  cmd: [python3, /app/main.py]
"""


def test_bookworm_python3_recipe(debian_rootfs: Path, cache_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("run steps need root and runc")
    if shutil.which("slirp4netns") is None and shutil.which("pasta") is None:
        pytest.skip("network: true needs slirp4netns or pasta")
    try:
        socket.getaddrinfo("deb.debian.org", 80)
    except OSError:
        pytest.skip("the Debian mirror is not reachable")
    try:
        base2 = debtrees.debootstrap(cache_dir, "lineage-bookworm-2")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    store = tmp_path / "store"
    helpers.run_shoal(store, "build", debian_rootfs, "base:1")
    helpers.run_shoal(store, "build", base2, "base:2")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "main.py").write_text('import sys; print("hello from python", sys.version_info[0])\n')
    (ctx / "app.yaml").write_text(RECIPE)

    doc = json.loads(helpers.run_shoal(store, "build", "-f", ctx / "app.yaml", "--json", timeout=900).stdout)
    got = {i["ref"]: i for i in doc["images"]}
    assert [(i["runs"], i["cached"]) for i in got.values()] == [(1, False), (0, False)]
    assert got["app:1"]["new_chunks"] <= 2  # the copied script; the rest is py's chunks, reused
    p = helpers.run_shoal(store, "run", "--rm", "app:1", stdin=subprocess.DEVNULL)
    assert p.stdout == b"hello from python 3\n"
    cfg = json.loads(helpers.run_shoal(store, "inspect", "--config", "py:latest").stdout)
    lin = cfg["shoal"]["lineage"]
    base1 = json.loads(helpers.run_shoal(store, "inspect", "base:1", "--json").stdout)["digest"]
    assert lin["base"]["digest"] == base1 and lin["recipe"]["digest"] == got["py:latest"]["recipe_digest"]
    assert "DEBIAN_FRONTEND=noninteractive" in cfg["config"]["Env"]
    # no mount point runc made for the container is left in the image
    top = json.loads(helpers.run_shoal(store, "ls", "py:latest", "/etc/hosts", "--json", check=False).stdout or b"{}")
    assert not top.get("listing")

    # nothing changed: update runs nothing and gives the same images
    again = json.loads(helpers.run_shoal(store, "update", "app:1", "--json").stdout)
    assert [(i["runs"], i["cached"], i["digest"]) for i in again["images"]] == \
        [(0, True, got["py:latest"]["digest"]), (0, True, got["app:1"]["digest"])]

    # the lineage base is recorded: the python3 install moves onto another debootstrap run
    r = json.loads(helpers.run_shoal(store, "rebase", "py:latest", "--onto", "base:2", "-t", "py:2", "--json").stdout)
    assert r["new_packs"] <= 1
    p = helpers.run_shoal(store, "run", "--rm", "py:2", "--", "python3", "-c", "print('rebased')",
                          stdin=subprocess.DEVNULL)
    assert p.stdout == b"rebased\n"
