"""The CLI's contract: one ``shoal: error:`` line and a class-specific exit code on failure, JSON on
stdout with --json, and diff through the Merkle trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_shoal, write_tree


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    files = {f"usr/lib/f{i:03d}": os.urandom(1000 + 37 * i) for i in range(100)}
    files["etc/hostname"] = b"a\n"
    files["etc/gone"] = b"bye\n"
    write_tree(d / "a", files)
    files2 = dict(files)
    files2["etc/hostname"] = b"b\n"
    del files2["etc/gone"]
    files2["opt/new/tool"] = os.urandom(200_000)
    write_tree(d / "b", files2)
    os.chmod(d / "b" / "usr" / "lib" / "f007", 0o755)
    os.utime(d / "b" / "usr" / "lib" / "f007", ns=(1_600_000_000_000_000_000,) * 2)
    os.utime(d / "b" / "usr" / "lib", ns=(1_600_000_000_000_000_000,) * 2)
    s = d / "store"
    run_shoal(s, "build", d / "a", "t:a")
    run_shoal(s, "build", d / "b", "t:b")
    return s


def test_diff_json(two_images: Path) -> None:
    doc = json.loads(run_shoal(two_images, "diff", "--json", "t:a", "t:b").stdout)
    assert doc["same"] is False
    assert doc["added"] == ["opt", "opt/new", "opt/new/tool"] or doc["added"] == ["/opt", "/opt/new", "/opt/new/tool"]
    assert [p.lstrip("/") for p in doc["removed"]] == ["etc/gone"]
    # etc/ itself keeps its metadata (write_tree fixes every mtime), so only the two entries changed
    assert sorted(p.lstrip("/") for p in doc["changed"]) == ["etc/hostname", "usr/lib/f007"]
    assert doc["new_chunks"] >= 2 and doc["new_bytes"] == 200_000 + 2  # the new tool and the new hostname
    assert 0 < doc["fetch_bytes"] and doc["fetch_frames"] >= 1
    same = json.loads(run_shoal(two_images, "diff", "--json", "t:a", "t:a").stdout)
    assert same["same"] is True and same["new_chunks"] == 0 and same["fetch_bytes"] == 0


def test_diff_text(two_images: Path) -> None:
    p = run_shoal(two_images, "diff", "t:a", "t:b")
    lines = p.stdout.decode().splitlines()
    assert "+ /opt/new/tool" in lines and "- /etc/gone" in lines and "M /etc/hostname" in lines


@pytest.mark.parametrize("args,code,words", [
    (("inspect", "nosuch:1"), 3, ("no image",)),
    (("inspect", "Bad:Ref"), 2, ("invalid image name",)),
    (("ls", "t:a", "/no/such"), 3, ("no such path",)),
    (("cat", "t:a", "/etc"), 2, ("not a regular file",)),
    (("rm", "nosuch:1"), 3, ("no image",)),
    (("diff", "t:a", "nosuch:1"), 3, ("no image",)),
    (("unpack", "nosuch:1", "/tmp/shoal-never-created"), 3, ("no image",)),
], ids=["inspect-missing", "inspect-badref", "ls-missing-path", "cat-dir", "rm-missing", "diff-missing",
        "unpack-missing"])
def test_errors_are_one_line_with_exit_codes(two_images: Path, args: tuple[str, ...], code: int,
                                              words: tuple[str, ...]) -> None:
    p = run_shoal(two_images, *args, check=False)
    assert_one_line_error(p, *words)
    assert p.returncode == code
    assert not os.path.exists("/tmp/shoal-never-created")


def test_build_errors(tmp_path: Path) -> None:
    write_tree(tmp_path / "t", {"a": b"x"})
    p = run_shoal(tmp_path / "s", "build", tmp_path / "t", "UPPER:case", check=False)
    assert_one_line_error(p, "invalid image name")
    assert p.returncode == 2
    # a file that cannot be read: one line, and no tag (root reads everything: as root, through an
    # unprivileged user, in a directory under /tmp it can traverse)
    d = Path(tempfile.mkdtemp(prefix="shoal-cli-", dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        write_tree(d / "t", {"a": b"x", "b": b"y"})
        os.chmod(d / "t" / "a", 0)
        user = None
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "65534:65534", str(d)], check=True)
            user = 65534
        p = run_shoal(d / "s", "build", d / "t", "x:1", check=False, user=user)
        assert_one_line_error(p, "cannot read", "permission denied")
        assert p.returncode == 8
        assert b"x:1" not in run_shoal(d / "s", "images", user=user).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_store_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "index.json").write_bytes(b"{not json")
    assert_one_line_error(run_shoal(tmp_path / "s", "images", check=False), "index.json")


def test_build_json_and_images(two_images: Path) -> None:
    doc = json.loads(run_shoal(two_images, "images", "--json").stdout)
    refs = {i["ref"]: i for i in doc["images"]}
    assert set(refs) == {"t:a", "t:b"}
    insp = json.loads(run_shoal(two_images, "inspect", "--json", "t:b").stdout)
    assert insp["digest"] == refs["t:b"]["digest"] and insp["size"] == refs["t:b"]["size"]
    assert insp["files"] == 102 and insp["kinds"]["file"] == 102


def test_ls_long_format(two_images: Path) -> None:
    out = run_shoal(two_images, "ls", "-l", "t:b", "/usr/lib").stdout.decode().splitlines()
    assert len(out) == 100
    f007 = next(line for line in out if line.endswith("f007"))
    assert f007.startswith("-rwxr-xr-x") and "2020-09-13" in f007
