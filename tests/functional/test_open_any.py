"""Every read command takes every transport through the one open-image layer (issue 10 D).

A Shoal image in the store is copied to ``oci:``, ``oci-archive:`` and ``dir:``; ``inspect``, ``ls``,
``cat``, ``diff`` and ``unpack`` give the same answers on all four.  A classic image (``shoal export``)
is inspected as classic and read after an in-store conversion.  ``inspect --raw`` and ``--config
--raw`` are byte-equal to skopeo's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_shoal, tree_snapshot, write_tree

FILES = {"etc/hostname": b"any\n", "usr/bin/tool": os.urandom(50_000), "usr/share/doc/readme": b"read me\n" * 300}


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("openany")
    write_tree(d / "tree", FILES)
    s = d / "store"
    run_shoal(s, "build", d / "tree", "img:1")
    out = {"store": "img:1", "oci": f"oci:{d}/layout:one", "oci-archive": f"oci-archive:{d}/img.tar:one",
           "dir": f"dir:{d}/dir"}
    for name, ref in out.items():
        if name != "store":
            run_shoal(s, "copy", "img:1", ref)
    run_shoal(s, "export", "--compression", "gzip", "img:1", f"oci:{d}/classic:c")
    out["classic"] = f"oci:{d}/classic:c"
    return s, out


KINDS = ["store", "oci", "oci-archive", "dir"]


def test_inspect_ls_cat_same_on_every_transport(refs: tuple[Path, dict[str, str]]) -> None:
    s, r = refs
    docs = {k: json.loads(run_shoal(s, "inspect", "--json", r[k]).stdout) for k in KINDS}
    listing = run_shoal(s, "ls", "-R", "img:1").stdout
    for k in KINDS:
        doc = docs[k]
        assert doc["format"] == "shoal" and doc["ref"] == r[k]
        assert {x: doc[x] for x in ("digest", "root", "files", "chunks")} == \
            {x: docs["store"][x] for x in ("digest", "root", "files", "chunks")}
        assert run_shoal(s, "ls", "-R", r[k]).stdout == listing
        assert run_shoal(s, "cat", r[k], "/usr/bin/tool").stdout == FILES["usr/bin/tool"]
        same = json.loads(run_shoal(s, "diff", "--json", "img:1", r[k]).stdout)
        assert same["same"] is True


def test_unpack_from_a_layout(refs: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    s, r = refs
    run_shoal(s, "unpack", r["oci-archive"], tmp_path / "u")
    assert (tmp_path / "u" / "usr" / "bin" / "tool").read_bytes() == FILES["usr/bin/tool"]
    run_shoal(s, "unpack", r["store"], tmp_path / "v")
    assert tree_snapshot(tmp_path / "u") == tree_snapshot(tmp_path / "v")


def test_classic_image_is_inspected_as_classic_and_read_after_conversion(refs: tuple[Path, dict[str, str]]) -> None:
    s, r = refs
    doc = json.loads(run_shoal(s, "inspect", "--json", r["classic"]).stdout)
    assert doc["format"] == "classic" and doc["layers"] == 1 and doc["digest"].startswith("sha256:")
    text = run_shoal(s, "inspect", r["classic"]).stdout.decode()
    assert "Format:       classic" in text
    # ls/cat convert it into the store (untagged) and read it there
    assert run_shoal(s, "cat", r["classic"], "/etc/hostname").stdout == b"any\n"
    assert b"/usr/bin/tool" in run_shoal(s, "ls", "-R", r["classic"]).stdout
    assert [i["ref"] for i in json.loads(run_shoal(s, "images", "--json").stdout)["images"]] == ["img:1"]


def test_bad_references_end_in_one_line(refs: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    s, _ = refs
    for args in (("inspect", "docker://x/y:t\u00e9g"), ("ls", f"oci:{tmp_path}/nolayout:x"),
                 ("cat", "docker-archive:"), ("unpack", "oci:/x:b\u00e9d", str(tmp_path / "z"))):
        p = run_shoal(s, *args, check=False)
        assert p.returncode in (2, 3), (args, p.stderr)
        assert_one_line_error(p)


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
@pytest.mark.parametrize("which", ["classic", "oci", "dir"])
def test_raw_and_config_equal_skopeo(refs: tuple[Path, dict[str, str]], which: str) -> None:
    s, r = refs
    ref = r[which]

    def skopeo(*args: str) -> bytes:
        return subprocess.run(["skopeo", "inspect", *args, ref], check=True, capture_output=True).stdout

    assert run_shoal(s, "inspect", "--raw", ref).stdout == skopeo("--raw")
    if which == "classic":  # skopeo reads the config of image manifests only
        assert run_shoal(s, "inspect", "--config", "--raw", ref).stdout == skopeo("--config", "--raw")
        ours = json.loads(run_shoal(s, "inspect", "--config", ref).stdout)
        theirs = json.loads(skopeo("--config"))
        assert ours["rootfs"] == theirs["rootfs"] and ours["architecture"] == theirs["architecture"]
