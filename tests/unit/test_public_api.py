"""The public Python API (docs/api.md), used as a user would: this file imports only ``shoal``.

- docs/api.md's example runs end to end as written (build, copy to oci:, pull, open and read, unpack);
- ``import shoal`` loads no HTTP, FUSE, CLI or compression code, and a local-only use no HTTP or FUSE;
- every name in ``shoal.__all__`` resolves, the functions take keyword-only options, py.typed ships;
- ``shoal.build`` (and pull, unpack, mount) stay the API functions after their submodules are imported;
- errors are the documented ``shoal`` classes.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shoal

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
FUNCTIONS = ("build", "copy", "pull", "push", "open_image", "mount", "unmount", "unpack")
HEAVY = ("httpx", "pyfuse3", "trio", "click", "rich", "zstandard", "shoal.api", "shoal.cli")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(cwd))
    env.pop("SHOAL_STORE", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _loaded(code: str, cwd: Path, names: tuple[str, ...]) -> list[str]:
    p = _python(code + f"\nimport json, sys; print(json.dumps([m for m in {list(names)!r} if m in sys.modules]))",
                cwd)
    assert p.returncode == 0, p.stderr
    out: list[str] = json.loads(p.stdout.splitlines()[-1])
    return out


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_bytes(b"hi\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(3000))
    return root


def test_docs_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/api.md has one runnable example"
    code = blocks[0]
    assert re.findall(r"^(?:from|import) shoal\S*", code, re.M) == ["import shoal"]
    p = _python(code, tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("built demo:1 sha256:") and "1 files" in out[0]
    assert out[1].startswith("pulled sha256:") and "1 chunks fetched" in out[1]
    assert out[2] == "as expected: no image missing:1 in the store"
    assert list(tmp_path.iterdir()) == [], "the example cleans up after itself"


def test_import_shoal_loads_nothing_heavy(tmp_path: Path) -> None:
    assert _loaded("import shoal", tmp_path, HEAVY + ("shoal.errors",)) == []


def test_local_use_loads_no_http_or_fuse(tmp_path: Path) -> None:
    _tree(tmp_path / "tree")
    code = ("import shoal\n"
            "shoal.build('tree', 'a:1', store='st')\n"
            "assert shoal.open_image('a:1', store='st').read_bytes('etc/motd') == b'hi\\n'\n"
            "shoal.unpack('a:1', 'out', store='st')\n")
    assert _loaded(code, tmp_path, ("httpx", "pyfuse3", "trio", "click", "rich")) == []


def test_names_resolve_and_functions_are_typed() -> None:
    for name in shoal.__all__:
        assert getattr(shoal, name) is not None, name
    assert set(FUNCTIONS) <= set(shoal.__all__) and set(FUNCTIONS) <= set(dir(shoal))
    for name in FUNCTIONS:
        fn = getattr(shoal, name)
        assert inspect.isfunction(fn), name
        assert fn.__doc__ and "Raises" in fn.__doc__, f"{name}: the docstring says what it raises"
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"
            if p.default is not inspect.Parameter.empty and p.name != "name":  # pull's NAME is positional
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({p.name}) is keyword-only"
    for cls in ("BuildOptions", "CopyOptions", "UnpackOptions", "OpenOptions", "MountOptions", "Image"):
        params = getattr(shoal, cls).__dataclass_params__
        assert params.frozen, cls
    assert issubclass(shoal.NotFound, shoal.ShoalError) and shoal.NotFound.exit_code == 3
    assert (Path(shoal.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        shoal.no_such_name  # noqa: B018


def test_api_names_survive_submodule_imports(tmp_path: Path) -> None:
    code = ("import shoal, inspect\n"
            "from shoal.build import BuildOptions\n"
            "from shoal.unpack import UnpackOptions\n"
            "__import__('shoal.pull'); __import__('shoal.mount.daemon')\n"
            f"bad = [n for n in {list(FUNCTIONS)!r} if not inspect.isfunction(getattr(shoal, n))]\n"
            "assert not bad, bad\n"
            "assert shoal.BuildOptions is BuildOptions and shoal.UnpackOptions is UnpackOptions\n")
    p = _python(code, tmp_path)
    assert p.returncode == 0, p.stderr


def test_errors_are_the_documented_classes(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    store = tmp_path / "store"
    with pytest.raises(shoal.UsageError, match="invalid image name"):
        shoal.build(tree, "Not A Name", store=store)
    with pytest.raises(shoal.UsageError, match="transport prefix"):
        shoal.build(tree, "oci:1", store=store)
    r = shoal.build(tree, "t:1", store=store, options=shoal.BuildOptions(workers=2))
    assert r.files == 2 and r.manifest.digest.startswith("sha256:")
    with pytest.raises(shoal.NotFound):
        shoal.open_image("nope:1", store=store)
    with pytest.raises(shoal.UsageError, match="store image"):
        shoal.push(f"oci:{tmp_path}/l:x", f"oci:{tmp_path}/m:x", store=store)
    with pytest.raises(shoal.UsageError, match="NAME"):
        shoal.pull(f"oci:{tmp_path}/l:x", store=store)  # no name for a non-registry source
    img = shoal.open_image("t:1", store=store)
    assert img.listdir() == ["bin", "etc"] and img.entry("etc/motd") is not None and img.entry("x") is None
    assert img.read_bytes(b"/bin/tool") == (tree / "bin" / "tool").read_bytes()
    with pytest.raises(shoal.UsageError, match="not a regular file"):
        img.read_bytes("/etc")
    with pytest.raises(shoal.UsageError, match="not a directory"):
        img.listdir("/etc/motd")
    pushed = shoal.push("t:1", f"oci:{tmp_path}/l:x", store=store)
    assert pushed.digest == r.manifest.digest and pushed.blobs_sent > 0
    again = shoal.copy("t:1", f"oci:{tmp_path}/l:x", store=store)
    assert again.blobs_sent == 0, "only missing blobs travel"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    with pytest.raises(shoal.ShoalError):
        shoal.unpack("t:1", tmp_path / "full", store=store)
