"""Every ``--json`` document has ``"schema": 1`` and the shape docs/cli-json.md shows (helpers.check_json_shape):
each command run on a small store, its output checked key by key and type by type.  ``profile`` needs a
container runtime and a registry: tests/mount/test_lazy_run.py checks its shape."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import shoal
from helpers import check_json_shape, json_shapes, run_shoal, write_tree


def _json(store: Path, *args: str | os.PathLike[str]) -> Any:
    p = run_shoal(store, *args, "--json")
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, f"one line of JSON: {p.stdout[:300]!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("json")
    files = {"etc/motd": b"hello\n", "etc/gone": b"bye\n", "bin/tool": os.urandom(5000)}
    write_tree(d / "a", files)
    os.symlink("motd", d / "a" / "etc" / "greeting")
    os.link(d / "a" / "etc" / "motd", d / "a" / "etc" / "motd.bak")
    os.mkfifo(d / "a" / "etc" / "pipe")
    if os.geteuid() == 0:
        os.mkdir(d / "a" / "dev")
        os.mknod(d / "a" / "dev" / "null", 0o20666, os.makedev(1, 3))
    write_tree(d / "b", {"etc/motd": b"changed\n", "opt/new": b"new\n"})
    s = d / "store"
    run_shoal(s, "build", d / "a", "t:a")
    run_shoal(s, "build", d / "b", "t:b")
    return d


def test_every_json_option_is_documented() -> None:
    from shoal.cli import COMMANDS, cli

    ctx = cli.make_context("shoal", ["images"])  # any: only for get_command
    with_json = {n for n in COMMANDS
                 if any("--json" in p.opts for p in cli.get_command(ctx, n).params)}  # type: ignore[union-attr]
    assert with_json == set(json_shapes()), "docs/cli-json.md documents exactly the commands with --json"
    assert {"images", "inspect", "ls", "diff", "status", "fsck"} <= with_json, "every read command has --json"


def test_read_commands(small: Path) -> None:
    s = small / "store"
    images = _json(s, "images")
    check_json_shape("images", images)
    assert [i["ref"] for i in images["images"]] == ["t:a", "t:b"]
    insp = _json(s, "inspect", "t:a")
    check_json_shape("inspect", insp)
    assert insp["format"] == "shoal" and insp["format_version"] == shoal.FORMAT_VERSION
    assert insp["digest"] == images["images"][0]["digest"]
    listing = _json(s, "ls", "-R", "t:a")
    check_json_shape("ls", listing)
    by_path = {e["path"]: e for e in listing["listing"]}
    assert by_path["/etc/greeting"]["target"] == "motd" and by_path["/etc/motd.bak"]["target"] == "/etc/motd"
    assert by_path["/etc/motd.bak"]["size"] == 6 and by_path["/etc/pipe"]["kind"] == "fifo"
    assert by_path["/bin/tool"]["kind"] == "file" and by_path["/bin/tool"]["size"] == 5000
    if os.geteuid() == 0:
        assert by_path["/dev/null"]["rdev"] == [1, 3] and by_path["/dev/null"]["kind"] == "char"
    one = _json(s, "ls", "t:a", "/etc/motd")
    check_json_shape("ls", one)
    assert one["path"] == "/etc/motd" and [e["path"] for e in one["listing"]] == ["/etc/motd"]
    top = _json(s, "ls", "t:a")
    assert [e["path"] for e in top["listing"]] == sorted(e["path"] for e in top["listing"]) and "/bin/tool" not in {
        e["path"] for e in top["listing"]}
    diff = _json(s, "diff", "t:a", "t:b")
    check_json_shape("diff", diff)
    assert "/opt/new" in diff["added"] and "/etc/gone" in diff["removed"]
    sbom = _json(s, "sbom", "t:a", "-o", small / "t.spdx.json")
    check_json_shape("sbom", sbom)
    assert sbom["packages"] == 0 and sbom["bytes_fetched"] == 0 and json.loads((small / "t.spdx.json").read_text())
    fsck = _json(s, "fsck")
    check_json_shape("fsck", fsck)
    assert fsck["ok"] and fsck["images"] == 2


def test_commands_that_change_things(small: Path, tmp_path: Path) -> None:
    s = small / "store"
    built = _json(tmp_path / "s2", "build", small / "a", "x:1")
    check_json_shape("build", built)
    check_json_shape("unpack", _json(s, "unpack", "t:b", tmp_path / "out"))
    copied = _json(s, "copy", "--additional-tag", "v1", "t:a", f"oci:{tmp_path}/lay:a")
    check_json_shape("copy", copied)
    assert copied["tags"] == ["v1"] and copied["dst"] == f"oci:{tmp_path}/lay:a"
    check_json_shape("push", _json(s, "push", "t:b", f"oci:{tmp_path}/lay:b"))
    pulled = _json(tmp_path / "s3", "pull", f"oci:{tmp_path}/lay:b", "b:1")
    check_json_shape("pull", pulled)
    check_json_shape("export", _json(s, "export", "t:b", f"oci:{tmp_path}/classic:c"))
    check_json_shape("convert", _json(tmp_path / "s4", "convert", f"oci:{tmp_path}/classic:c", "conv:1"))
    run_shoal(s, "rm", "t:b")
    check_json_shape("gc", _json(s, "gc"))


def test_mount_and_status(small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounts need root and /dev/fuse")
    monkeypatch.setenv("SHOAL_RUN_DIR", str(tmp_path / "run"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    st = _json(small / "store", "mount", "t:a", mnt)
    try:
        check_json_shape("mount", st)
        assert (mnt / "etc" / "motd").read_bytes() == b"hello\n"
        status = _json(small / "store", "status")
        check_json_shape("status", status)
        assert [m["mountpoint"] for m in status["mounts"]] == [str(mnt)] and status["mounts"][0]["alive"]
    finally:
        run_shoal(None, "umount", mnt, check=False, timeout=60)
    assert _json(small / "store", "status")["mounts"] == []


def test_errors_are_not_json(small: Path) -> None:
    p = run_shoal(small / "store", "inspect", "--json", "nosuch:1", check=False)
    assert p.returncode == 3 and p.stdout == b"" and p.stderr.startswith(b"shoal: error: ")
