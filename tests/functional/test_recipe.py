"""shoal build -f / shoal update on a small runnable tree (dash and its libraries) with real runc:
run and copy steps, the step cache (which steps run again after a base or a copied file changes), the
container's network (none unless asked), reproducibility, lineage and rebase (docs/spec/lineage.md §7)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import helpers

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                                reason="run steps need root and runc")

SDE = "1600000000"

RECIPE = """
deps:
  from: base:1
  run:
    - echo "deps of $(while read l; do echo "$l"; done < /etc/motd)" >> /etc/deps
    - echo "sde=$SOURCE_DATE_EPOCH" >> /etc/deps
app:2:
  from: deps
  copy:
    - {src: hello.txt, dst: /app/hello.txt}
    - {src: conf, dst: /etc/app}
  env: {GREETING: hello}
  cmd: [/bin/sh, -c, "echo $GREETING"]
  workdir: /app
  labels: {org.example.recipe: "yes"}
"""


def _tree(root: Path, motd: str) -> None:
    """``/bin/sh`` (dash) with the libraries it loads, and ``/etc/motd``."""
    dash = shutil.which("dash") or "/bin/dash"
    libs = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", dash], capture_output=True, text=True).stdout)
    for src, rel in [(dash, "bin/sh")] + [(lib, lib.lstrip("/")) for lib in libs]:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "motd").write_text(motd + "\n")
    helpers.fix_times(root, int(SDE) * 10**9)


def _base(store: Path, tmp: Path, motd: str) -> None:
    d = tmp / f"base-{motd}"
    if not d.exists():
        _tree(d, motd)
    helpers.run_shoal(store, "build", "--source-date-epoch", SDE, d, "base:1")


def _ctx(tmp: Path, recipe: str = RECIPE) -> Path:
    ctx = tmp / "ctx"
    (ctx / "conf").mkdir(parents=True, exist_ok=True)
    (ctx / "conf" / "app.conf").write_text("level=1\n")
    os.symlink("app.conf", ctx / "conf" / "link")
    (ctx / "hello.txt").write_text("hello 1\n")
    (ctx / "app.yaml").write_text(recipe)
    return ctx


def _build(store: Path, *args: str) -> dict[str, dict[str, Any]]:
    p = helpers.run_shoal(store, *args, "--json")
    doc = json.loads(p.stdout)
    helpers.check_json_shape("build" if args[0] == "build" else "update", doc)
    return {i["ref"]: i for i in doc["images"]}


def _cat(store: Path, ref: str, path: str) -> bytes:
    return helpers.run_shoal(store, "cat", ref, path).stdout


def _config(store: Path, ref: str) -> dict[str, Any]:
    return json.loads(helpers.run_shoal(store, "inspect", "--config", ref).stdout)  # type: ignore[no-any-return]


def test_run_copy_and_update_redo_only_what_changed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _base(store, tmp_path, "one")
    ctx = _ctx(tmp_path)
    first = _build(store, "build", "-f", str(ctx / "app.yaml"))
    assert list(first) == ["deps:latest", "app:2"]
    assert [(i["runs"], i["cached"]) for i in first.values()] == [(1, False), (0, False)]
    assert _cat(store, "deps:latest", "/etc/deps") == f"deps of one\nsde={SDE}\n".encode()
    assert _cat(store, "app:2", "/app/hello.txt") == b"hello 1\n"
    assert _cat(store, "app:2", "/etc/app/app.conf") == b"level=1\n"
    ls = json.loads(helpers.run_shoal(store, "ls", "-R", "app:2", "--json").stdout)
    listing = {e["path"]: e for e in ls["listing"]}
    assert listing["/etc/app/link"]["target"] == "app.conf"  # a symlink copied as a link
    assert "/proc" not in listing and "/dev" not in listing and "/sys" not in listing  # runc's mount points
    assert all(e["uid"] == 0 for p, e in listing.items() if p.startswith("/app"))
    cfg = _config(store, "app:2")
    assert "GREETING=hello" in cfg["config"]["Env"] and cfg["config"]["Cmd"] == ["/bin/sh", "-c", "echo $GREETING"]
    assert cfg["config"]["WorkingDir"] == "/app" and cfg["config"]["Labels"] == {"org.example.recipe": "yes"}
    lin = cfg["shoal"]["lineage"]
    assert lin["base"]["digest"] == first["deps:latest"]["digest"] and lin["base"]["name"] == "deps:latest"
    assert lin["recipe"] == {"digest": first["app:2"]["recipe_digest"], "image": "app:2"}
    p = helpers.run_shoal(store, "run", "--rm", "app:2", stdin=subprocess.DEVNULL)
    assert p.stdout == b"hello\n"

    # nothing changed: every step cached, the same images
    again = _build(store, "update", "app:2")
    assert [(i["runs"], i["cached"], i["digest"]) for i in again.values()] == \
        [(0, True, first["deps:latest"]["digest"]), (0, True, first["app:2"]["digest"])]

    # only the copied file changed: app redoes its step, deps' run is not repeated
    (ctx / "hello.txt").write_text("hello 2\n")
    copied = _build(store, "update", "app:2")
    assert [(i["runs"], i["cached"]) for i in copied.values()] == [(0, True), (0, False)]
    assert copied["deps:latest"]["digest"] == first["deps:latest"]["digest"]
    assert copied["app:2"]["digest"] != first["app:2"]["digest"]
    assert _cat(store, "app:2", "/app/hello.txt") == b"hello 2\n"

    # the base changed: both redo (deps runs again), and the new base shows through
    _base(store, tmp_path, "two")
    based = _build(store, "update", "app:2")
    assert [(i["runs"], i["cached"]) for i in based.values()] == [(1, False), (0, False)]
    assert _cat(store, "app:2", "/etc/deps") == f"deps of two\nsde={SDE}\n".encode()
    assert _cat(store, "app:2", "/app/hello.txt") == b"hello 2\n"

    # the recipe's lineage base is set: rebase moves app's own changes (the copies) onto base:1
    p = helpers.run_shoal(store, "rebase", "app:2", "--onto", "base:1", "-t", "app-on-base:1", "--json")
    assert json.loads(p.stdout)["new_chunks"] == 0
    assert _cat(store, "app-on-base:1", "/app/hello.txt") == b"hello 2\n"
    assert b"/etc/deps" not in helpers.run_shoal(store, "ls", "-R", "app-on-base:1").stdout


def test_reproducible_in_a_fresh_store(tmp_path: Path) -> None:
    digests = []
    for n in (1, 2):
        store, tmp = tmp_path / f"store{n}", tmp_path / f"t{n}"
        tmp.mkdir()
        _base(store, tmp, "one")
        got = _build(store, "build", "-f", str(_ctx(tmp) / "app.yaml"))
        digests.append({k: (v["digest"], v["root"]) for k, v in got.items()})
    assert digests[0] == digests[1]  # another directory, another store: the same images


def test_network_only_when_asked(tmp_path: Path) -> None:
    if shutil.which("slirp4netns") is None and shutil.which("pasta") is None:
        pytest.skip("neither slirp4netns nor pasta is installed")
    store = tmp_path / "store"
    _base(store, tmp_path, "one")
    ifaces = "while read a b; do case $a in *:) echo ${a%:} >> /etc/ifaces;; esac; done < /proc/net/dev"
    ctx = _ctx(tmp_path, f"""
closed: {{from: base:1, run: ["{ifaces}"]}}
open: {{from: base:1, run: ["{ifaces}"], network: true}}
""")
    _build(store, "build", "-f", str(ctx / "app.yaml"))
    assert _cat(store, "closed:latest", "/etc/ifaces").split() == [b"lo"]
    got = _cat(store, "open:latest", "/etc/ifaces").split()
    assert b"lo" in got and len(got) == 2, got  # slirp4netns's tap0 (pasta: the host's interface name)


def test_failures_are_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _base(store, tmp_path, "one")
    ctx = _ctx(tmp_path, "bad: {from: base:1, run: ['echo partial > /etc/x', 'exit 7']}\n")
    p = helpers.run_shoal(store, "build", "-f", str(ctx / "app.yaml"), check=False)
    helpers.assert_one_line_error(p, "exit code 7")
    assert helpers.run_shoal(store, "inspect", "bad:latest", check=False).returncode == 3
    (ctx / "app.yaml").write_text("bad: {from: base:1, copy: [{src: ../x, dst: /x}]}\n")
    p = helpers.run_shoal(store, "build", "-f", str(ctx / "app.yaml"), check=False)
    assert p.returncode == 2
    helpers.assert_one_line_error(p, "escapes the build context")
    p = helpers.run_shoal(store, "build", "-f", str(ctx / "app.yaml"), str(ctx), "x:1", check=False)
    helpers.assert_one_line_error(p, "takes no SOURCE")
    p = helpers.run_shoal(store, "update", "base:1", check=False)
    helpers.assert_one_line_error(p, "records no recipe")


COPY_ONLY = """
app:
  from: base:1
  copy:
    - {src: hello.txt, dst: /app/hello.txt}
    - {src: motd, dst: /etc/motd}
    - {src: conf, dst: /etc/app}
    - {src: conf2, dst: /etc/app}
    - {src: link2, dst: /opt/deep/er/l}
    - {src: hello.txt, dst: /etc}
    - {src: big, dst: /usr/share/big}
    - {src: conf, dst: /etc/motd}
early:
  from: base:1
  source_date_epoch: 1500000000
  copy:
    - {src: hello.txt, dst: /etc/hello.txt}
via-link:
  from: base:1
  copy:
    - {src: hello.txt, dst: /conf/hello.txt}
hard:
  from: base:1
  copy:
    - {src: hello.txt, dst: /etc/h2}
"""


def test_copy_only_step_on_the_index_is_the_unpacked_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy-only step made on the parent's index (no unpack) is byte for byte the unpacked step: new,
    replaced and overwritten files, a new directory merged into, a symlink copied as a link, missing
    parents, a file into an existing directory, a directory replacing a file, a multi-window file, mtimes
    clamped to an older SOURCE_DATE_EPOCH; a destination through a symlink of the parent, or replacing a
    hardlinked file, unpacks."""
    from shoal.recipe import build_recipe, builder, load
    from shoal.store import Store

    ctx = _ctx(tmp_path, COPY_ONLY)
    (ctx / "motd").write_text("replaced\n")
    (ctx / "conf2").mkdir()
    (ctx / "conf2" / "app.conf").write_text("level=2\n")  # overwrites conf's, in place
    (ctx / "conf2" / "more.conf").write_text("more\n")
    os.chmod(ctx / "conf2" / "more.conf", 0o6750)
    (ctx / "conf2" / "lock").write_text("")
    os.chmod(ctx / "conf2" / "lock", 0o2640)
    os.symlink("hello.txt", ctx / "link2")
    (ctx / "big").write_bytes(os.urandom(5 * 1024 * 1024 + 12345))
    base = tmp_path / "base-tree"
    _tree(base, "one")
    os.symlink("etc", base / "conf")
    (base / "etc" / "h1").write_text("linked\n")
    os.link(base / "etc" / "h1", base / "etc" / "h2")
    helpers.fix_times(base, int(SDE) * 10**9)

    used: list[bool] = []
    real = builder.copy_step

    def spy(*a: Any, **k: Any) -> Any:
        got = real(*a, **k)
        used.append(got is not None)
        return got

    monkeypatch.setattr(builder, "copy_step", spy)
    got = {}
    for fast in (True, False):
        store = tmp_path / f"store-{fast}"
        helpers.run_shoal(store, "build", "--source-date-epoch", SDE, base, "base:1")
        monkeypatch.setattr(builder, "INDEX_COPY", fast)
        out = build_recipe(Store.open(store), load(str(ctx / "app.yaml")))
        got[fast] = {o.name: (o.manifest.root, o.manifest.digest, o.manifest.index.digest) for o in out}
    # via-link's destination crosses /conf, a symlink; hard's replaces a hardlinked file: both unpacked
    assert used == [True, True, False, False]
    assert got[True] == got[False]
    store = tmp_path / "store-True"
    assert _cat(store, "app:latest", "/etc/app/app.conf") == b"level=2\n"
    assert _cat(store, "app:latest", "/etc/motd/link") == b"level=1\n"
    ls = json.loads(helpers.run_shoal(store, "ls", "-R", "app:latest", "--json").stdout)
    listing = {e["path"]: e for e in ls["listing"]}
    assert listing["/opt/deep/er/l"]["target"] == "hello.txt" and listing["/opt/deep"]["mode"] & 0o7777 == 0o755
    # permission bits are kept, set-user-ID and set-group-ID included (the copy chowns before it chmods)
    modes = {p.rsplit("/", 1)[1]: e["mode"] & 0o7777 for p, e in listing.items() if p.endswith(("more.conf", "/lock"))}
    assert modes == {"more.conf": 0o6750, "lock": 0o2640}, modes
    assert _cat(store, "via-link:latest", "/etc/hello.txt") == b"hello 1\n"
    assert _cat(store, "hard:latest", "/etc/h1") == b"linked\n"
