"""Recipe files (shoal build -f): parsing and validation, each refusal one UsageError line
(docs/spec/lineage.md §7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.errors import UsageError
from shoal.recipe import load, parse
from shoal.recipe.spec import spec_json


def _parse(text: str, ctx: Path) -> object:
    return parse(text, str(ctx / "app.yaml"), str(ctx))


def _refused(text: str, ctx: Path, *words: str) -> str:
    with pytest.raises(UsageError) as ei:
        _parse(text, ctx)
    msg = str(ei.value)
    assert "\n" not in msg and "app.yaml" in msg, msg
    assert all(w in msg for w in words), msg
    return msg


def test_two_images_in_build_order(tmp_path: Path) -> None:
    (tmp_path / "req.txt").write_text("x\n")
    (tmp_path / "dir").mkdir()
    r = _parse("""
app:2:
  from: deps
  copy: [{src: ./dir/../req.txt, dst: /app//req.txt}]
  entrypoint: python3 -u
  cmd: ["-c", "print(1)"]
  env: {A: 1, B: "two words"}
  labels: {org.example.x: y}
  workdir: /app
  user: nobody
deps:
  from: docker://registry.example/debian:12
  apply: [curl:1]
  run: apt-get install -y python3
  network: true
  source_date_epoch: 1700000000
""", tmp_path)
    assert list(r.images) == ["deps:latest", "app:2"]  # type: ignore[attr-defined]
    deps, app = r.images["deps:latest"], r.images["app:2"]  # type: ignore[attr-defined]
    assert (deps.from_, deps.from_local, deps.apply, deps.apply_local) == (
        "docker://registry.example/debian:12", False, ("curl:1",), (False,))
    assert deps.run == ("apt-get install -y python3",) and deps.network and deps.source_date_epoch == 1700000000
    assert (app.from_, app.from_local) == ("deps:latest", True)
    assert [(c.src, c.dst) for c in app.copy] == [("req.txt", "/app/req.txt")]
    assert app.entrypoint == ("python3", "-u") and app.cmd == ("-c", "print(1)")
    assert app.env == ("A=1", "B=two words") and app.labels == (("org.example.x", "y"),)
    assert (app.workdir, app.user, app.network) == ("/app", "nobody", False)
    assert r.closure(["deps:latest"]) == [deps]  # type: ignore[attr-defined]
    assert r.closure([r.lookup("app:2")]) == [deps, app]  # type: ignore[attr-defined]
    assert spec_json(app) == spec_json(_parse(  # canonical: the same spec written otherwise
        "app:2: {from: deps:latest, copy: [{dst: /app/req.txt, src: req.txt}], entrypoint: [python3, -u], "
        "cmd: [-c, print(1)], env: [A=1, B=two words], labels: {org.example.x: y}, workdir: /app/, user: nobody}\n"
        "deps: {from: docker://registry.example/debian:12, apply: [curl:1], run: [apt-get install -y python3], "
        "network: true, source_date_epoch: 1700000000}", tmp_path).images["app:2"])  # type: ignore[attr-defined]


def test_load_reads_the_file_and_takes_its_directory_as_context(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "app.yaml").write_text("app: {from: base:1, copy: [{src: a.txt, dst: /a}]}\n")
    r = load(str(tmp_path / "app.yaml"))
    assert r.context == os.path.realpath(tmp_path) and list(r.images) == ["app:latest"]
    with pytest.raises(UsageError, match="no recipe file"):
        load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text,words", [
    ("app: {from: base:1\n", ("not valid YAML", "line")),
    ("- just\n- a list\n", ("mapping of image names",)),
    ("", ("mapping of image names",)),
    ("app: {from: base:1, rum: [true]}\n", ("unknown key 'rum'",)),
    ("app: {run: [true]}\n", ("'from' is required",)),
    ("app: {from: app}\n", ("cycle", "app:latest -> app:latest")),
    ("a: {from: b}\nb: {from: c}\nc: {from: a}\n", ("cycle", "a:latest -> b:latest -> c:latest -> a:latest")),
    ("a: {from: base:1, apply: [b]}\nb: {from: a}\n", ("cycle",)),
    ("App: {from: base:1}\n", ("invalid image name",)),
    ("oci: {from: base:1}\n", ("transport prefix",)),
    ("app: {from: base:1, run: [1, 2]}\n", ("shell command strings",)),
    ("app: {from: base:1, network: yes please}\n", ("'network' must be true or false",)),
    ("app: {from: base:1, env: {A: [1]}}\n", ("'env'",)),
    ("app: {from: base:1, workdir: app}\n", ("'workdir' must be an absolute path",)),
    ("app: {from: base:1, source_date_epoch: -1}\n", ("source_date_epoch",)),
    ("app: {from: base:1, copy: [{src: a}]}\n", ("exactly 'src' and 'dst'",)),
    ("app: {from: base:1, copy: [{src: ../etc/passwd, dst: /x}]}\n", ("escapes the build context",)),
    ("app: {from: base:1, copy: [{src: /etc/passwd, dst: /x}]}\n", ("escapes the build context",)),
    ("app: {from: base:1, copy: [{src: out, dst: /x}]}\n", ("escapes the build context", "symlink")),
    ("app: {from: base:1, copy: [{src: nothere, dst: /x}]}\n", ("does not exist",)),
    ("app: {from: base:1, copy: [{src: in.txt, dst: x}]}\n", ("must be an absolute path",)),
    ("app: {from: base:1, entrypoint: 'a \"b'}\n", ("'entrypoint'",)),
    ("app: {from: base:1}\napp:latest: {from: base:1}\n", ("same name",)),
])
def test_refusals_are_one_line(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    (tmp_path / "in.txt").write_text("x")
    os.symlink("/etc", tmp_path / "out")
    _refused(text, tmp_path, *words)
