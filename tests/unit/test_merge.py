"""rebase / apply on small synthetic trees: clean merges, conflicts, --prefer, the dpkg status rule, lineage,
and the CLI's exit code and conflict list (docs/spec/lineage.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.cli import main  # noqa: E402
from shoal.errors import ConflictError, NotFound  # noqa: E402
from shoal.format.manifest import ImageConfig  # noqa: E402
from shoal.format.model import Kind  # noqa: E402
from shoal.merge import Input, apply, config_of, lineage_of, lineage_record, rebase  # noqa: E402
from shoal.reader import Reader, StoreSource  # noqa: E402
from shoal.store import Store  # noqa: E402

BASE = {"etc/a.conf": b"a = 1\n" * 100, "etc/b.conf": b"b = 1\n" * 100, "usr/lib/x.so": os.urandom(300_000),
        "usr/lib/f": b"plain file\n"}


def _build(store: Store, tmp: Path, name: str, files: dict[str, bytes], base: str | None = None,
           edit: object = None) -> Input:
    d = tmp / name.replace(":", "_")
    helpers.write_tree(d, files)
    if callable(edit):
        edit(d)
        helpers.fix_times(d, 1_600_000_000_000_000_000)
    extra = {}
    if base is not None:
        extra["lineage"] = {"base": lineage_record(Input(base, store.resolve(base)))}
    r = build(store, d, name, BuildOptions(config=ImageConfig(extra=extra)))
    return Input(name, r.manifest)


def _files(store: Store, i: Input) -> dict[bytes, bytes | str]:
    idx = store.load_index(i.manifest)
    r = Reader(idx, StoreSource(store))
    return {e.path: b"".join(r.iter_file(e)) if e.kind == Kind.FILE else e.kind.name for e in idx.entries}


@pytest.fixture
def images(store: Store, tmp_path: Path) -> dict[str, Input]:
    b1 = _build(store, tmp_path, "base:1", BASE)
    app = _build(store, tmp_path, "app:1", {**BASE, "etc/b.conf": b"b = 2\n" * 100, "opt/app/main": b"app\n"},
                 base="base:1")
    b2 = _build(store, tmp_path, "base:2", {**BASE, "etc/a.conf": b"a = 2\n" * 100, "usr/lib/y.so": os.urandom(5000)})
    return {"b1": b1, "app": app, "b2": b2}


def test_rebase_clean_takes_both_sides_copies_nothing(store: Store, images: dict[str, Input]) -> None:
    o = rebase(store, images["app"], images["b2"], "app:2")
    got = _files(store, Input("app:2", o.result.manifest))
    assert got[b"etc/a.conf"] == b"a = 2\n" * 100  # theirs
    assert got[b"etc/b.conf"] == b"b = 2\n" * 100  # ours
    assert got[b"opt/app/main"] == b"app\n" and b"usr/lib/y.so" in got
    assert o.result.new_chunks == 0 and o.result.new_packs == 0 and o.result.added_bytes < 20_000
    lin = lineage_of(config_of(store, o.result.manifest))
    assert lin["base"]["digest"] == images["b2"].manifest.digest and lin["base"]["root"] == images["b2"].manifest.root


def test_rebase_equals_fresh_build(store: Store, images: dict[str, Input], tmp_path: Path) -> None:
    o = rebase(store, images["app"], images["b2"], "app:2")
    fresh = _files(store, images["b2"]) | {b"etc/b.conf": b"b = 2\n" * 100, b"opt": "DIR", b"opt/app": "DIR",
                                             b"opt/app/main": b"app\n"}
    assert _files(store, Input("app:2", o.result.manifest)) == fresh


def _conflict(store: Store, tmp: Path, app_edit: object, b2_edit: object) -> tuple[Input, Input]:
    app = _build(store, tmp, "c-app:1", BASE, base="base:1", edit=app_edit)
    b2 = _build(store, tmp, "c-base:2", BASE, edit=b2_edit)
    return app, b2


def _write(rel: str, data: bytes):  # type: ignore[no-untyped-def]
    def edit(d: Path) -> None:
        (d / rel).write_bytes(data)
    return edit


def test_both_change_a_file_is_refused_then_prefer(store: Store, images: dict[str, Input], tmp_path: Path) -> None:
    app, b2 = _conflict(store, tmp_path, _write("etc/a.conf", b"ours\n"), _write("etc/a.conf", b"theirs\n"))
    with pytest.raises(ConflictError) as ei:
        rebase(store, app, b2, "x:1")
    assert ei.value.exit_code == 11 and ei.value.lines == ["/etc/a.conf: changed on both sides"]
    assert "1 conflicting path" in str(ei.value)
    with pytest.raises(NotFound):
        store.resolve("x:1")
    ours = rebase(store, app, b2, "x:1", prefer="ours")
    assert _files(store, Input("x", ours.result.manifest))[b"etc/a.conf"] == b"ours\n"
    theirs = rebase(store, app, b2, "x:2", prefer="theirs")
    assert _files(store, Input("x", theirs.result.manifest))[b"etc/a.conf"] == b"theirs\n"


def test_file_replaced_by_directory_is_refused(store: Store, images: dict[str, Input], tmp_path: Path) -> None:
    def to_dir(d: Path) -> None:
        (d / "usr/lib/f").unlink()
        (d / "usr/lib/f").mkdir()
        (d / "usr/lib/f/inner").write_bytes(b"x")

    app, b2 = _conflict(store, tmp_path, to_dir, _write("usr/lib/f", b"changed by the base\n"))
    with pytest.raises(ConflictError) as ei:
        rebase(store, app, b2, "x:1")
    assert ei.value.lines == ["/usr/lib/f: file replaced by a directory by ours, changed by the other"]
    got = _files(store, Input("x", rebase(store, app, b2, "x:1", prefer="ours").result.manifest))
    assert got[b"usr/lib/f"] == "DIR" and got[b"usr/lib/f/inner"] == b"x"


def test_deletion_of_a_path_the_new_base_changed_is_refused(store: Store, images: dict[str, Input],
                                                            tmp_path: Path) -> None:
    def rm(d: Path) -> None:
        (d / "etc/b.conf").unlink()

    app, b2 = _conflict(store, tmp_path, rm, _write("etc/b.conf", b"new b\n"))
    with pytest.raises(ConflictError) as ei:
        rebase(store, app, b2, "x:1")
    assert ei.value.lines == ["/etc/b.conf: deleted by ours, changed by theirs"]
    assert b"etc/b.conf" not in _files(store, Input("x", rebase(store, app, b2, "x:1", prefer="ours").result.manifest))


STATUS = b"Package: base-files\nStatus: install ok installed\nVersion: 12\n\nPackage: zlib1g\nVersion: 1\n\n"


def test_apply_merges_dpkg_status_and_refuses_the_same_package_changed(store: Store, tmp_path: Path) -> None:
    base = {**BASE, "var/lib/dpkg/status": STATUS}
    b1 = _build(store, tmp_path, "deb:1", base)

    def pkg(name: bytes, version: bytes) -> bytes:
        return b"Package: " + name + b"\nVersion: " + version + b"\n\n"

    curl_status = STATUS.replace(b"Package: zlib1g", pkg(b"curl", b"7") + b"Package: zlib1g")
    py_status = STATUS + pkg(b"python3", b"3.11")
    curl = _build(store, tmp_path, "curl:1", {**base, "var/lib/dpkg/status": curl_status,
                                              "usr/bin/curl": b"curl\n"}, base="deb:1")
    py = _build(store, tmp_path, "py:1", {**base, "var/lib/dpkg/status": py_status, "usr/bin/python3": b"py\n"},
                base="deb:1")
    o = apply(store, b1, [curl, py], "stack:1")
    got = _files(store, Input("stack:1", o.result.manifest))
    assert got[b"usr/bin/curl"] == b"curl\n" and got[b"usr/bin/python3"] == b"py\n"
    want = pkg(b"curl", b"7") + pkg(b"python3", b"3.11") + b"Package: zlib1g"  # sorted by Package, as dpkg writes
    assert got[b"var/lib/dpkg/status"] == STATUS.replace(b"Package: zlib1g", want)
    assert [r.rule for r in o.resolved] == ["dpkg-paragraphs"] and o.result.new_chunks == 1
    lin = lineage_of(config_of(store, o.result.manifest))
    assert [a["name"] for a in lin["applied"]] == ["curl:1", "py:1"] and lin["base"]["name"] == "deb:1"
    # the same package changed differently on both sides: a conflict naming it
    py2 = _build(store, tmp_path, "py:2", {**base, "var/lib/dpkg/status": STATUS.replace(b"Version: 1\n",
                                                                                          b"Version: 2\n")},
                 base="deb:1")
    curl2 = _build(store, tmp_path, "curl:2", {**base, "var/lib/dpkg/status": STATUS.replace(b"Version: 1\n",
                                                                                              b"Version: 3\n")},
                   base="deb:1")
    with pytest.raises(ConflictError) as ei:
        apply(store, b1, [curl2, py2], "stack:2")
    assert ei.value.lines == ["/var/lib/dpkg/status: changed on both sides (rule dpkg-paragraphs: paragraphs "
                              "changed on both sides: zlib1g)"]


def test_cli_rebase_apply_inspect(store: Store, images: dict[str, Input], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = str(store.root)
    main(["--store", root, "rebase", "app:1", "--onto", "base:2", "-t", "app:2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["new_chunks"] == 0 and doc["new_packs"] == 0
    main(["--store", root, "inspect", "app:2"])
    out = capsys.readouterr().out
    assert f"Base:         base:2 {images['b2'].manifest.digest}" in out
    app, b2 = _conflict(store, tmp_path, _write("etc/a.conf", b"ours\n"), _write("etc/a.conf", b"theirs\n"))
    with pytest.raises(SystemExit) as ei:
        main(["--store", root, "rebase", "c-app:1", "--from", "base:1", "--onto", "c-base:2", "-t", "x:1"])
    assert ei.value.code == 11
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("shoal: error: rebase of c-app:1 from base:1 onto c-base:2: 1 conflicting path")
    assert err[1:] == ["  /etc/a.conf: changed on both sides"]
    main(["--store", root, "rebase", "c-app:1", "--onto", "c-base:2", "-t", "x:1", "--prefer", "theirs"])
    d = tmp_path / "b"
    helpers.write_tree(d, {"f": b"1"})
    main(["--store", root, "build", str(d), "child:1", "--base", "base:1", "--json"])
    capsys.readouterr()
    main(["--store", root, "inspect", "child:1", "--json"])
    assert json.loads(capsys.readouterr().out)["lineage"]["base"]["digest"] == images["b1"].manifest.digest
