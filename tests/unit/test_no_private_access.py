"""No module of ``src/shoal`` uses another module's private members (issue 10).

Every module is parsed with :mod:`ast` (nothing is imported) and two things are refused:

(a) ``from X import _name``: a leading-underscore name imported from another module.  Dunder names
    (``__version__``) are not private.  Importing a public name *from* a private module, or binding
    a public name to a private alias (``import x as _x``), is fine.

(b) ``obj._member``: an attribute with a leading underscore (not a dunder), read or written, on
    anything but ``self`` or ``cls`` -- *unless the module itself defines that name*: as
    ``self._member = ...`` / ``cls._member = ...``, in a class body (a method, a field, a class
    attribute), as a function or class anywhere in the module, or as a module-level name.  So a
    module may reach into instances of its own classes (``other._active`` in ``DockerSource.follow``,
    a dataclass helper in the same file) but not into another module's objects.  The rule is by name:
    a module that defines ``_x`` for its own class may also touch some foreign ``._x``; the test
    errs on the side of no false alarms, and review catches the rest.

Two explicit allow-lists, each entry with its reason:

* ``STDLIB_PUBLIC``: stdlib API that is public despite its underscore (``os._exit``, the namedtuple
  methods ``_replace``/``_asdict``/``_fields``/``_make``).
* ``THIRD_PARTY_INTERNALS``: a third-party private member we rely on, per module, with why and what
  pins it.  Each entry is a known risk on upgrades, not a loophole: keep it short.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "shoal"

STDLIB_PUBLIC: dict[str, str] = {
    "_exit": "os._exit: documented public API (exit without cleanup, after fork)",
    "_getframe": "sys._getframe: documented CPython API",
    "_xoptions": "sys._xoptions: documented CPython API (the -X options)",
    "_replace": "namedtuple._replace: public namedtuple API",
    "_asdict": "namedtuple._asdict: public namedtuple API",
    "_fields": "namedtuple._fields: public namedtuple API",
    "_make": "namedtuple._make: public namedtuple API",
}

# generated code (protoc reaches into protobuf's internals by design): scripts/gen_protos.py
GENERATED = {SRC / "snapshotter" / "proto"}

# (module relative to src/shoal, attribute) -> reason
THIRD_PARTY_INTERNALS: dict[tuple[str, str], str] = {
    ("transports/registry/transport.py", "_pool"): (
        "httpx.HTTPTransport._pool: httpx 0.28 takes no network backend, so bounded_transport replaces "
        "the transport's httpcore pool by an equal one with DeadlineBackend (the per-request deadline); "
        "pinned by pyproject's httpx range and covered by the deadline tests (test_registry_hostile)"
    ),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself: see (b) in the module docstring."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    for target in _assigned(stmt):
                        names.add(target)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    for stmt in tree.body:
        names.update(_assigned(stmt))
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in stmt.names)
    return names


def _assigned(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.Assign):
        return [n.id for t in stmt.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def violations(path: Path, root: Path = SRC) -> list[str]:
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    own = _defined_names(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{rel}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                                 f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own or node.attr in STDLIB_PUBLIC or (rel, node.attr) in THIRD_PARTY_INTERNALS:
                continue
            found.append(f"{rel}:{node.lineno}: {ast.unparse(base)[:60]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_members() -> None:
    modules = sorted(p for p in SRC.rglob("*.py") if p.parent not in GENERATED)
    assert len(modules) > 50  # the scan sees the package
    found = sorted(v for m in modules for v in violations(m))
    assert not found, "private members used across modules:\n" + "\n".join(found)


def test_allow_list_entries_are_still_needed() -> None:
    """A third-party allow-list entry that no longer matches anything must go."""
    for (rel, attr), _reason in THIRD_PARTY_INTERNALS.items():
        text = (SRC / rel).read_text(encoding="utf-8")
        assert f".{attr}" in text, f"{rel}: allow-list entry {attr} is stale"


@pytest.mark.parametrize("code, bad", [
    ("from shoal.lazy import _INHERITED\n", True),
    ("from __future__ import annotations\n", False),
    ("from shoal import __version__\n", False),
    ("def f(c):\n    return c._request()\n", True),
    ("class A:\n    def __init__(self):\n        self._x = 1\n\ndef f(a):\n    return a._x\n", False),
    ("import os\nos._exit(0)\n", False),
    ("def f(t):\n    t._pool = None\n", True),
    ("def f(c):\n    return c.request()\n", False),
])
def test_the_rule(tmp_path: Path, code: str, bad: bool) -> None:
    """The scanner itself: each case must (not) be a violation, so the main test can fail."""
    module = tmp_path / "m.py"
    module.write_text(code)
    assert bool(violations(module, tmp_path)) is bad, code
