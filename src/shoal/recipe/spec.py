"""Recipe files (``shoal build -f app.yaml``): parsing and validation (docs/spec/lineage.md §7).  No I/O but
reading the file and checking the build context's paths.

A recipe is a YAML mapping of image names to image specs::

    deps:
      from: debian:12              # store NAME:TAG, docker://..., oci:..., or another image of this file
      apply: [curl:1]              # images whose own changes are applied first (shoal apply)
      copy: [{src: req.txt, dst: /app/req.txt}]   # from the build context (the recipe's directory)
      run: ["apt-get update", "apt-get install -y python3"]   # one container, /bin/sh -e -c
      network: true                # the run's container gets a network (default: loopback only)
      env: {PYTHONUNBUFFERED: "1"}
      entrypoint: [python3]        # a list, or a string split as a shell would
      cmd: ["-c", "print(1)"]
      workdir: /app
      user: nobody
      labels: {org.example: x}
      source_date_epoch: 1700000000
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

from shoal.errors import UsageError
from shoal.store import new_image_name, normalize_ref

__all__ = ["CopySpec", "ImageSpec", "Recipe", "KEYS", "load", "parse", "canonical"]

KEYS = ("from", "apply", "copy", "run", "network", "env", "entrypoint", "cmd", "workdir", "user", "labels",
        "source_date_epoch")
MAX_RECIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class CopySpec:
    src: str  # relative to the build context, normalized, never escaping it
    dst: str  # absolute path in the image, normalized


@dataclass(frozen=True)
class ImageSpec:
    name: str  # the store name the image gets (NAME:TAG)
    key: str  # its key in the file
    from_: str  # an image of the same file (its NAME:TAG) or a reference of any transport
    from_local: bool  # from_ names an image of this file
    apply: tuple[str, ...] = ()
    apply_local: tuple[bool, ...] = ()
    copy: tuple[CopySpec, ...] = ()
    run: tuple[str, ...] = ()
    network: bool = False
    env: tuple[str, ...] = ()  # K=V, in the file's order
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str | None = None
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    source_date_epoch: int | None = None

    def deps(self) -> list[str]:
        """The images of the same file this one needs first (store names)."""
        out = [self.from_] if self.from_local else []
        return out + [a for a, loc in zip(self.apply, self.apply_local) if loc]


@dataclass(frozen=True)
class Recipe:
    path: str  # the recipe file (absolute)
    context: str  # the build context: the recipe's directory (absolute, real path)
    images: dict[str, ImageSpec]  # by store name, in build order (every image after those it needs)

    def closure(self, names: list[str]) -> list[ImageSpec]:
        """``names`` and every image of the file they need, in build order."""
        want: set[str] = set()
        todo = list(names)
        while todo:
            n = todo.pop()
            if n not in want:
                want.add(n)
                todo += self.images[n].deps()
        return [s for n, s in self.images.items() if n in want]

    def lookup(self, name: str) -> str:
        """The store name of the image ``name`` of this file (its key or its store name)."""
        for s in self.images.values():
            if name in (s.key, s.name):
                return s.name
        try:
            n = normalize_ref(name)
        except UsageError:
            n = ""
        if n in self.images:
            return n
        raise UsageError(f"recipe {self.path}: no image {name!r} (it defines {', '.join(self.images)})")


def canonical(spec: ImageSpec) -> dict[str, Any]:
    """The image's spec as plain data, for keys and the recipe digest (json with sorted keys)."""
    return {
        "name": spec.name, "from": spec.from_, "apply": list(spec.apply),
        "copy": [{"src": c.src, "dst": c.dst} for c in spec.copy], "run": list(spec.run),
        "network": spec.network, "env": list(spec.env),
        "entrypoint": None if spec.entrypoint is None else list(spec.entrypoint),
        "cmd": None if spec.cmd is None else list(spec.cmd), "workdir": spec.workdir, "user": spec.user,
        "labels": dict(spec.labels), "source_date_epoch": spec.source_date_epoch,
    }


def load(path: str) -> Recipe:
    """Read and check the recipe file at ``path`` (its directory is the build context)."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"no recipe file {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise UsageError(f"recipe {path}: larger than 1 MiB")
    return parse(raw, path, os.path.dirname(path))


def parse(raw: bytes | str, path: str, context: str) -> Recipe:
    """Parse recipe text; ``path`` names it in errors, ``context`` is the directory copies read from."""
    import yaml  # type: ignore[import-untyped]

    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"recipe {path}: not valid YAML: {problem}{where}") from None
    if not isinstance(doc, dict) or not doc:
        raise UsageError(f"recipe {path}: want a mapping of image names to image specs")
    ctx = os.path.realpath(context)
    names: dict[str, str] = {}  # key -> store name
    for key in doc:
        if not isinstance(key, str):
            raise UsageError(f"recipe {path}: image name {key!r} is not a string")
        try:
            names[key] = new_image_name(key)
        except UsageError as exc:
            raise UsageError(f"recipe {path}: {exc}") from None
    if len(set(names.values())) != len(names):
        raise UsageError(f"recipe {path}: two images have the same name")
    local = {**{k: v for k, v in names.items()}, **{v: v for v in names.values()}}
    specs = {names[k]: _image(path, ctx, k, names[k], v, local) for k, v in doc.items()}
    return Recipe(path, ctx, {n: specs[n] for n in _order(path, specs)})


def _order(path: str, specs: dict[str, ImageSpec]) -> list[str]:
    """Build order (depth first, in file order); a cycle is refused, naming it."""
    done: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = chain[chain.index(n):] + [n]
            raise UsageError(f"recipe {path}: images depend on each other in a cycle: {' -> '.join(cyc)}")
        state[n] = 1
        for d in specs[n].deps():
            visit(d, chain + [n])
        state[n] = 2
        done.append(n)

    for n in specs:
        visit(n, [])
    return done


def _image(path: str, ctx: str, key: str, name: str, v: Any, local: dict[str, str]) -> ImageSpec:
    where = f"recipe {path}: image {key}"
    if not isinstance(v, dict):
        raise UsageError(f"{where}: want a mapping (from, run, copy, ...)")
    unknown = [k for k in v if k not in KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")

    def ref(r: Any, what: str) -> tuple[str, bool]:
        if not isinstance(r, str) or not r.strip():
            raise UsageError(f"{where}: {what} must be an image reference")
        r = r.strip()
        if r in local:
            if local[r] == name:
                raise UsageError(f"{where}: images depend on each other in a cycle: {name} -> {name}")
            return local[r], True
        return r, False

    if "from" not in v:
        raise UsageError(f"{where}: 'from' is required (an image reference, or another image of this file)")
    from_, from_local = ref(v["from"], "'from'")
    applied = [ref(a, "each 'apply' entry") for a in _list(v.get("apply"), where, "apply")]
    runs = _list(v.get("run"), where, "run")
    if not all(isinstance(r, str) for r in runs):
        raise UsageError(f"{where}: 'run' must be a list of shell command strings")
    net = v.get("network", False)
    if not isinstance(net, bool):
        raise UsageError(f"{where}: 'network' must be true or false")
    sde = v.get("source_date_epoch")
    if sde is not None and (not isinstance(sde, int) or isinstance(sde, bool) or sde < 0):
        raise UsageError(f"{where}: 'source_date_epoch' must be a non-negative integer")
    workdir = _opt_str(v, "workdir", where)
    if workdir is not None and not workdir.startswith("/"):
        raise UsageError(f"{where}: 'workdir' must be an absolute path")
    return ImageSpec(
        name=name, key=key, from_=from_, from_local=from_local,
        apply=tuple(a for a, _ in applied), apply_local=tuple(loc for _, loc in applied),
        copy=tuple(_copy(c, ctx, where) for c in _list(v.get("copy"), where, "copy")),
        run=tuple(runs), network=net, env=_env(v.get("env"), where),
        entrypoint=_argv(v, "entrypoint", where), cmd=_argv(v, "cmd", where),
        workdir=posixpath.normpath(workdir) if workdir else None, user=_opt_str(v, "user", where),
        labels=tuple(sorted(_mapping(v.get("labels"), where, "labels").items())), source_date_epoch=sde,
    )


def _list(v: Any, where: str, what: str) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, str) and what == "run":
        return [v]
    if not isinstance(v, list):
        raise UsageError(f"{where}: '{what}' must be a list")
    return v


def _scalar(x: Any) -> str | None:
    if isinstance(x, bool) or x is None or isinstance(x, (dict, list)):
        return None
    return str(x)


def _mapping(v: Any, where: str, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UsageError(f"{where}: '{what}' must be a mapping of names to strings")
    out = {}
    for k, x in v.items():
        s = _scalar(x)
        if not isinstance(k, str) or not k or "=" in k or s is None:
            raise UsageError(f"{where}: '{what}' must be a mapping of names to strings (bad entry {k!r})")
        out[k] = s
    return out


def _env(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, list):
        if not all(isinstance(x, str) and "=" in x and not x.startswith("=") for x in v):
            raise UsageError(f"{where}: 'env' must be a mapping, or a list of K=V strings")
        return tuple(v)
    return tuple(f"{k}={x}" for k, x in _mapping(v, where, "env").items())


def _argv(v: dict[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    x = v.get(key)
    if x is None:
        return None
    if isinstance(x, str):
        try:
            return tuple(shlex.split(x))
        except ValueError as exc:
            raise UsageError(f"{where}: '{key}': {exc}") from None
    if isinstance(x, list) and all(isinstance(a, str) for a in x):
        return tuple(x)
    raise UsageError(f"{where}: '{key}' must be a list of strings, or a string split as a shell would")


def _opt_str(v: dict[str, Any], key: str, where: str) -> str | None:
    x = v.get(key)
    if x is None:
        return None
    if not isinstance(x, str) or not x:
        raise UsageError(f"{where}: '{key}' must be a non-empty string")
    return x


def _copy(c: Any, ctx: str, where: str) -> CopySpec:
    if not isinstance(c, dict) or set(c) != {"src", "dst"} or not all(isinstance(c[k], str) and c[k]
                                                                       for k in ("src", "dst")):
        raise UsageError(f"{where}: each 'copy' entry must be a mapping with exactly 'src' and 'dst' strings")
    src, dst = c["src"], c["dst"]
    if not dst.startswith("/"):
        raise UsageError(f"{where}: copy destination {dst!r} must be an absolute path in the image")
    if "\0" in src or "\0" in dst:
        raise UsageError(f"{where}: copy paths must not hold NUL")
    rel = posixpath.normpath(src)
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../"):
        raise UsageError(f"{where}: copy source {src!r} escapes the build context {ctx}")
    real = os.path.realpath(os.path.join(ctx, rel))
    if real != ctx and not real.startswith(ctx.rstrip("/") + "/"):
        raise UsageError(f"{where}: copy source {src!r} escapes the build context {ctx} (through a symlink)")
    if not os.path.lexists(os.path.join(ctx, rel)):
        raise UsageError(f"{where}: copy source {src!r} does not exist in the build context {ctx}")
    return CopySpec(rel, posixpath.normpath(dst))


def spec_json(spec: ImageSpec) -> str:
    return json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))
