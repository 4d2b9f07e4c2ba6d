"""Build the images of a recipe, reusing cached steps (``shoal build -f``, ``shoal update``;
docs/spec/lineage.md §7).

Each image is made in up to three steps:

1. its parent: the ``from`` image (another image of the file, or any transport), with ``apply``'s images'
   own changes merged on top (``merge.apply``: no file data copied);
2. the *tree step*, when it has ``copy`` or ``run``: the parent unpacked to a temporary directory, the
   copies made, the run script executed in a container there, and the directory built with every chunk
   the store holds reused.  It is cached under a key of the parent's manifest digest, the step's canonical
   text, the digests of the copied inputs, the environment and SOURCE_DATE_EPOCH
   (``STORE/recipes/steps/<key>.json``), so an unchanged step is not run again.  A step of copies only is
   made on the parent's index instead (``placed.copy_step``): the same image, nothing unpacked;
3. the *config step*: the parent's runtime config with the recipe's fields, and the lineage (base: the
   ``from`` image, applied, recipe: the digest of the image's canonical spec and resolved inputs), written
   over the tree step's index and packs (only a config and a manifest are new).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from shoal import mediatypes as mt
from shoal.build import BuildOptions, build
from shoal.errors import ShoalError, UsageError
from shoal.format.manifest import (
    Descriptor,
    ImageConfig,
    ShoalManifest,
    build_config,
    build_manifest,
    canonical_json,
    parse_manifest,
)
from shoal.merge import LINEAGE, Input, apply, config_of, lineage_of, lineage_record
from shoal.reader import Reader, StoreSource
from shoal.recipe.container import RunSpec, inside, run_in_tree
from shoal.recipe.placed import copy_step
from shoal.recipe.spec import ImageSpec, Recipe, canonical
from shoal.store import Store
from shoal.transports.context import SystemContext
from shoal.unpack import unpack

__all__ = ["RecipeOptions", "ImageOutcome", "build_recipe", "store_input", "recipe_of", "STEP_VERSION"]

log = logging.getLogger(__name__)

STEP_VERSION = 2  # in every step key: a change of what a step makes invalidates the cache
INDEX_COPY = True  # a copy-only step on the parent's index (placed.py); False: always unpack (tests)


@dataclass(frozen=True)
class RecipeOptions:
    only: tuple[str, ...] = ()  # these images (and those they need); empty: every image of the file
    source_date_epoch: int | None = None  # for every image; else the image's, else its parent's newest mtime
    runtime: str = "runc"
    output: int = 2  # the run steps' stdout and stderr
    system_context: SystemContext = field(default_factory=SystemContext)
    workers: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    no_cache: bool = False  # run every tree step again (the cache is still written)


@dataclass(frozen=True)
class ImageOutcome:
    name: str
    manifest: ShoalManifest
    recipe_digest: str
    step_key: str | None  # the tree step's key; None when the image has no copy or run
    cached: bool  # the tree step came from the cache
    runs: int  # containers run for this image (0 when cached or no run step)
    new_chunks: int
    seconds: float


def store_input(store: Store, ref: str, sc: SystemContext) -> Input:
    """REF as an image of the store: a store name as it is; a Shoal image of another transport pulled
    (only the chunks the store lacks), a classic one converted; both kept untagged."""
    from shoal.convert import convert
    from shoal.copier import CopyOptions, copy
    from shoal.format.platform import Platform
    from shoal.transports.base import parse_reference
    from shoal.transports.resolve import resolve_image

    r = parse_reference(ref)
    plat = sc.platform or str(Platform.host())
    if r.transport.name == "":
        return Input(ref, store.resolve(ref, plat))
    src = r.new_source(sc)
    try:
        res = resolve_image(src, r, plat, with_index=False)
        if res.manifest is None:
            conv = convert(src, store, None, platform=plat)
            return Input(ref, store.manifest(conv.digest))
    finally:
        src.close()
    tmp = f"shoal-lineage-input-{os.getpid()}:{res.manifest.digest[7:19]}"
    ctx = sc.replace(store=str(store.root))
    copy(r, parse_reference(tmp), CopyOptions(platform=plat, src_opts=sc, dst_opts=ctx))
    m = store.resolve(tmp, plat)
    store.untag(tmp)
    return Input(ref, m)


def _record_path(store: Store, recipe_digest: str) -> str:
    return os.path.join(store.root, "recipes", "images", recipe_digest[7:] + ".json")


def recipe_of(store: Store, ref: str) -> tuple[str, str | None]:
    """The image name in its recipe file and the file (None when this store did not build it: the file's
    path is kept in the store, ``recipes/images/<recipe digest>.json``, not in the image, so that the
    image does not depend on where the file was)."""
    rec = lineage_of(config_of(store, store.resolve(ref))).get("recipe")
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("digest"), str):
        raise UsageError(f"{ref} records no recipe (it was not built with shoal build -f)")
    try:
        with open(_record_path(store, rec["digest"]), "rb") as f:
            path = json.loads(f.read()).get("file")
    except (OSError, ValueError, AttributeError):
        path = None
    return rec["image"], path if isinstance(path, str) else None


def _write_record(store: Store, recipe_digest: str, path: str, image: str) -> None:
    _atomic_json(_record_path(store, recipe_digest), {"file": path, "image": image})


def _atomic_json(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha(doc: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


# ------------------------------------------------------------------------------------------- copy inputs

def _input_digest(ctx: str, rel: str) -> str:
    """What a copy reads from the context: every entry's path, kind, permission bits and bytes or target,
    sorted (owners and times are not copied, so not part of it)."""
    h = hashlib.sha256()
    top = os.path.join(ctx, rel)
    entries: list[str] = [""]
    if os.path.isdir(top) and not os.path.islink(top):
        for d, dirs, files in os.walk(top):
            dirs.sort()
            for n in sorted(dirs + files):
                entries.append(os.path.relpath(os.path.join(d, n), top))
        entries.sort()
    for e in entries:
        p = os.path.join(top, e) if e else top
        st = os.lstat(p)
        h.update(json.dumps([e, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)]).encode() + b"\0")
        if stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(p)) + b"\0")
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")
        elif not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"copy source {p} holds a special file (only files, directories, symlinks)")
    return "sha256:" + h.hexdigest()


def _copy_into(root: str, ctx: str, src: str, dst: str, mtime_ns: int) -> None:
    """Copy ``src`` of the context to ``dst`` of the tree: owned by root, permission bits kept, mtimes
    ``mtime_ns``; symlinks copied as links (never followed); missing parents made 0755."""
    host_src = os.path.join(ctx, src)
    parent = inside(root, os.path.dirname(dst) or "/")
    if not os.path.isdir(parent):
        missing = []
        p = os.path.dirname(dst)
        while not os.path.isdir(inside(root, p)):
            missing.append(p)
            p = os.path.dirname(p)
        for p in reversed(missing):
            h = inside(root, p)
            if os.path.lexists(h):
                raise UsageError(f"copy to {dst}: {p} exists in the image and is not a directory")
            os.mkdir(h, 0o755)
            os.chmod(h, 0o755)
            os.utime(h, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        parent = inside(root, os.path.dirname(dst))
    target = os.path.join(parent, os.path.basename(dst))
    if os.path.isdir(target) and not os.path.islink(target) and not os.path.isdir(host_src):
        target = os.path.join(target, os.path.basename(src))  # a file copied into an existing directory
    if os.path.lexists(target) and not (os.path.isdir(target) and os.path.isdir(host_src)):
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)

    def own(t: str) -> None:  # before a chmod: a chown after it would drop set-user-ID and set-group-ID
        if os.geteuid() == 0:
            os.lchown(t, 0, 0)

    def one(s: str, t: str) -> None:
        st = os.lstat(s)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), t)
            own(t)
        elif stat.S_ISDIR(st.st_mode):
            if not os.path.isdir(t):
                os.mkdir(t, 0o700)
            for n in sorted(os.listdir(s)):
                one(os.path.join(s, n), os.path.join(t, n))
            own(t)
            os.chmod(t, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(s, t, follow_symlinks=False)
            own(t)
            os.chmod(t, stat.S_IMODE(st.st_mode))
        else:
            raise UsageError(f"copy source {s} is a special file (only files, directories, symlinks)")
        os.utime(t, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    one(host_src, target)


# ------------------------------------------------------------------------------------------- step cache

def _cache_path(store: Store, key: str) -> str:
    return os.path.join(store.root, "recipes", "steps", key[7:] + ".json")


def _cached(store: Store, key: str) -> ShoalManifest | None:
    """The tree step of ``key``, if its record and the blobs it needs are in the store."""
    try:
        with open(_cache_path(store, key), "rb") as f:
            rec = json.loads(f.read())
        raw, cfg = rec["manifest"].encode(), rec["config"].encode()
        m = parse_manifest(raw)
    except (OSError, ValueError, KeyError, AttributeError, ShoalError):
        return None
    lay = store.layout
    if not lay.has(m.index.digest) or not all(lay.has(p.digest) for p in m.packs):
        return None  # reclaimed by gc
    with lay.writing():
        lay.put(cfg, expected=m.config.digest)
        lay.put(raw, expected=m.digest)
    return m


def _remember(store: Store, key: str, m: ShoalManifest) -> None:
    cfg = store.layout.get(m.config.digest)
    _atomic_json(_cache_path(store, key), {"key": key, "manifest": m.raw.decode(), "config": bytes(cfg).decode()})


# ------------------------------------------------------------------------------------------- images

def _newest_mtime(store: Store, m: ShoalManifest) -> int:
    """The parent's newest mtime, rounded up to a second: the default SOURCE_DATE_EPOCH (files the step
    writes are no newer than the parent's, so the result does not depend on when it was built)."""
    idx = store.load_index(m)
    ns = max((e.mtime_ns for e in idx.entries), default=0)
    return -(-ns // 1_000_000_000)


def _with_config(store: Store, m: ShoalManifest, cfg: ImageConfig, ref: str) -> ShoalManifest:
    """``m``'s tree (index and packs) with another config, tagged ``ref``."""
    raw_cfg = build_config(replace(cfg, root=m.root))
    lay = store.layout
    with lay.writing():
        d = lay.put(raw_cfg)
        raw, digest = build_manifest(Descriptor(mt.CONFIG, d, len(raw_cfg)), m.index, list(m.packs), m.root)
        lay.put(raw)
        out = parse_manifest(raw, digest)
        store.tag(ref, out)
    return out


def _env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for kv in env:
        k, sep, v = str(kv).partition("=")
        if k and sep:
            out[k] = v
    return out


def _runtime_config(parent: dict[str, Any], spec: ImageSpec) -> dict[str, Any]:
    conf = dict(parent)
    if spec.env:
        env = _env_dict([str(x) for x in (conf.get("Env") or [])])
        env.update(_env_dict(list(spec.env)))
        conf["Env"] = [f"{k}={v}" for k, v in env.items()]
    if spec.entrypoint is not None:
        conf["Entrypoint"] = list(spec.entrypoint)
        if spec.cmd is None:
            conf.pop("Cmd", None)  # Docker: a new ENTRYPOINT resets the inherited CMD
    if spec.cmd is not None:
        conf["Cmd"] = list(spec.cmd)
    if spec.workdir is not None:
        conf["WorkingDir"] = spec.workdir
    if spec.user is not None:
        conf["User"] = spec.user
    if spec.labels:
        conf["Labels"] = {**(conf.get("Labels") or {}), **dict(spec.labels)}
    return conf


def _tree_step(store: Store, recipe: Recipe, spec: ImageSpec, parent: Input, conf: dict[str, Any],
               sde: int, key: str, opts: RecipeOptions) -> tuple[ShoalManifest, int, int]:
    """Unpack the parent, copy, run, build: (manifest, runs, new chunks).  A step of copies only is made
    on the parent's index instead (``placed.copy_step``: the same image, nothing unpacked) when it can."""
    pcfg = config_of(store, parent.manifest)
    cfg = replace(pcfg, root="", extra={**pcfg.extra, LINEAGE: {"base": lineage_record(parent),
                                                                "recipe": {"step": key}}})
    if INDEX_COPY and spec.copy and not spec.run:
        got = copy_step(store, parent.manifest, recipe.context, spec.copy, sde, cfg, opts.workers)
        if got is not None:
            return got.manifest, 0, got.new_chunks
    work = tempfile.mkdtemp(prefix="shoal-recipe-", dir=os.path.join(store.root, "tmp"))
    runs = 0
    try:
        root = os.path.join(work, "rootfs")
        idx = store.load_index(parent.manifest)
        unpack(idx, Reader(idx, StoreSource(store)), root)
        for c in spec.copy:
            _copy_into(root, recipe.context, c.src, c.dst, sde * 1_000_000_000)
        if spec.run:
            env = [str(x) for x in (conf.get("Env") or [])] + [f"SOURCE_DATE_EPOCH={sde}"]
            rs = RunSpec("\n".join(spec.run), tuple(env), spec.workdir or "/", spec.network, opts.runtime,
                         opts.output)
            if spec.workdir:
                os.makedirs(inside(root, spec.workdir), exist_ok=True)
            t0 = time.monotonic()
            rc = run_in_tree(root, rs)
            runs += 1
            log.info("%s: run step exited %d after %.1fs", spec.name, rc, time.monotonic() - t0)
            if rc != 0:
                raise ShoalError(f"recipe {recipe.path}: image {spec.key}: the run step failed with exit code {rc}")
        r = build(store, root, None, BuildOptions(workers=opts.workers, source_date_epoch=sde, config=cfg))
        return r.manifest, runs, r.new_chunks
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_recipe(store: Store, recipe: Recipe, opts: RecipeOptions = RecipeOptions()) -> list[ImageOutcome]:
    """Build the images of ``recipe`` (``opts.only`` and what they need) into ``store``, tagging each by
    its name; a tree step whose key is cached is not run again."""
    names = [recipe.lookup(n) for n in opts.only] or list(recipe.images)
    # the whole build holds the store's writer lock: gc must not reclaim a step's untagged image (or an
    # input pulled untagged) before the final image is tagged
    with store.layout.writing():
        return _build_all(store, recipe, recipe.closure(names), opts)


def _build_all(store: Store, recipe: Recipe, specs: list[ImageSpec], opts: RecipeOptions) -> list[ImageOutcome]:
    built: dict[str, Input] = {}
    out: list[ImageOutcome] = []
    sc = opts.system_context
    for spec in specs:
        t0 = time.monotonic()

        def resolve(ref: str, local: bool) -> Input:
            return Input(ref, built[ref].manifest) if local else store_input(store, ref, sc)

        frm = resolve(spec.from_, spec.from_local)
        applied = [resolve(a, loc) for a, loc in zip(spec.apply, spec.apply_local)]
        parent = frm
        if applied:
            parent = Input(spec.name, apply(store, frm, applied, None).result.manifest)
        pcfg = config_of(store, parent.manifest)
        conf = _runtime_config(pcfg.config, spec)
        inputs = [{"src": c.src, "dst": c.dst, "digest": _input_digest(recipe.context, c.src)} for c in spec.copy]
        key = None
        cached = False
        runs = new_chunks = 0
        tree = parent.manifest
        if spec.copy or spec.run:
            sde = opts.source_date_epoch if opts.source_date_epoch is not None else spec.source_date_epoch
            if sde is None:
                sde = _newest_mtime(store, parent.manifest)
            # the parent's tree (Merkle root) and platform, not its manifest: a repacked parent (the same
            # tree built into a store that held other packs) reuses the step
            plat = [pcfg.os, pcfg.architecture, pcfg.variant]
            key = _sha({"v": STEP_VERSION, "parent": parent.manifest.root, "platform": plat, "copy": inputs,
                        "run": list(spec.run),
                        "env": conf.get("Env") or [], "network": spec.network, "workdir": spec.workdir,
                        "source_date_epoch": sde})
            hit = None if opts.no_cache else _cached(store, key)
            if hit is not None:
                tree, cached = hit, True
                log.info("%s: step %s cached", spec.name, key)
            else:
                tree, runs, new_chunks = _tree_step(store, recipe, spec, parent, conf, sde, key, opts)
                _remember(store, key, tree)
        recipe_digest = _sha({"v": STEP_VERSION, "spec": canonical(spec), "from": frm.manifest.digest,
                              "apply": [a.manifest.digest for a in applied], "copy": inputs})
        lineage: dict[str, Any] = {"base": lineage_record(frm),
                                   "recipe": {"digest": recipe_digest, "image": spec.key}}
        if applied:
            lineage["applied"] = [lineage_record(a) for a in applied]
        extra = {k: v for k, v in pcfg.extra.items() if k != LINEAGE}
        final = _with_config(store, tree, replace(pcfg, config=conf, extra={**extra, LINEAGE: lineage}), spec.name)
        _write_record(store, recipe_digest, recipe.path, spec.key)
        built[spec.name] = Input(spec.name, final)
        out.append(ImageOutcome(spec.name, final, recipe_digest, key, cached, runs, new_chunks,
                                time.monotonic() - t0))
    return out

