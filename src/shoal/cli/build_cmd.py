"""shoal build ROOTFS_DIR NAME:TAG, shoal build -f RECIPE"""

from __future__ import annotations

import os
import shlex
from typing import Any

import click

from shoal.cli.common import (
    emit_json,
    human,
    keep_freed_memory,
    open_store,
    progress_sink,
    registry_options,
    registry_opts,
    reuse_choice,
    reuse_options,
)


@click.command()
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False))
@click.argument("ref", required=False)
@click.option("-f", "--file", "recipe", default=None, type=click.Path(dir_okay=False), metavar="RECIPE",
              help="Build the images of a recipe file (YAML: from, apply, copy, run, config; docs/spec/lineage.md "
                   "§7) instead of a directory; SOURCE and REF are not given; --source-date-epoch, --json and "
                   "the registry options apply.")
@click.option("--no-cache", is_flag=True, help="-f: run every step again (the results are still cached).")
@reuse_options
@click.option("--base", default=None, metavar="NAME:TAG",
              help="The store image SOURCE was made from: recorded as the image's lineage base (for rebase, apply).")
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH", default=None,
              help="Clamp mtimes to this time (reproducible-builds.org); default $SOURCE_DATE_EPOCH.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker threads (default: 2 x cores; never changes the output).")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Image platform, or 'host' for this machine's (default: linux and the architecture of the "
                   "tree's /bin/sh, else linux/amd64; never this machine's unless asked).")
@click.option("--os", "os_name", default=None, help="Image OS (overrides --platform's).")
@click.option("--arch", default=None, help="Image architecture (overrides --platform's).")
@click.option("--variant", default=None, help="Image architecture variant, e.g. v8 (overrides --platform's).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for containers of this image.")
@click.option("--entrypoint", default=None, help="Entrypoint, shell-quoted.")
@click.option("--cmd", default=None, help="Default command, shell-quoted.")
@click.option("--workdir", default=None)
@click.option("--user", default=None)
@click.option("--label", multiple=True, metavar="K=V")
@click.option("--sign-key", default=None, type=click.Path(exists=True, dir_okay=False), metavar="KEY",
              help="Sign the image with this cosign private key; the signatures are kept in the store and a push "
                   "carries them (docs/spec/trust.md §6).")
@click.option("--sign-passphrase-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="File whose first line is the key's passphrase (else $COSIGN_PASSWORD, else a prompt).")
@click.option("--sign-identity", default=None, metavar="HOST/REPO[:TAG]",
              help="The registry name the signature names (default: REF when it is a full HOST/REPO:TAG name).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@registry_options
@click.pass_context
def build(ctx: click.Context, /, source: str | None, ref: str | None, recipe: str | None, no_cache: bool,
          reuse: tuple[str, ...], no_reuse: bool, base: str | None,
          source_date_epoch: int | None,
          workers: int | None, platform: str | None, os_name: str | None, arch: str | None,
          variant: str | None, env: tuple[str, ...], entrypoint: str | None, cmd: str | None,
          workdir: str | None, user: str | None, label: tuple[str, ...], sign_key: str | None,
          sign_passphrase_file: str | None, sign_identity: str | None, as_json: bool, **kw: Any) -> None:
    """Chunk, dedup, pack and index SOURCE into the store as REF (--sign-key: and sign it); with -f RECIPE,
    build the images of a recipe file, reusing every step whose inputs are unchanged."""
    from shoal.errors import UsageError

    if recipe is not None:
        if source is not None or ref is not None:
            raise UsageError("build -f RECIPE takes no SOURCE or REF (the recipe names its images)")
        from shoal.cli.recipe_cmds import run_recipe

        run_recipe(ctx, recipe, (), source_date_epoch, registry_opts(ctx, **kw), as_json, no_cache)
        return
    if source is None or ref is None:
        raise UsageError("build needs SOURCE and REF (or -f RECIPE)")
    from shoal.build import BuildOptions
    from shoal.build import build as do_build
    from shoal.format.manifest import ImageConfig
    from shoal.scan import build_platform
    from shoal.store import new_image_name

    ref = new_image_name(ref)
    key = identity = None
    if sign_key is not None:  # before the build: a wrong passphrase or a missing identity fails first
        from shoal.cli.trust_cmds import load_signing_key
        from shoal.trust.image import build_identity

        identity = build_identity(ref, sign_identity)
        key = load_signing_key(sign_key, sign_passphrase_file)
    reusing = reuse_choice(reuse, no_reuse)
    plat = build_platform(source, platform, os_name, arch, variant)
    default_path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    conf: dict[str, object] = {"Env": list(env) or [default_path]}
    if entrypoint:
        conf["Entrypoint"] = shlex.split(entrypoint)
    conf["Cmd"] = shlex.split(cmd) if cmd else ["/bin/sh"]
    if workdir:
        conf["WorkingDir"] = workdir
    if user:
        conf["User"] = user
    if label:
        conf["Labels"] = dict(kv.split("=", 1) for kv in label if "=" in kv)
    store = open_store(ctx)
    extra: dict[str, object] = {}
    if base:
        from shoal.merge import LINEAGE, Input, lineage_record

        extra[LINEAGE] = {"base": lineage_record(Input(base, store.resolve(base, str(plat))))}
    opts = BuildOptions(
        workers=workers or 2 * (os.cpu_count() or 1), source_date_epoch=source_date_epoch, **reusing,
        config=ImageConfig(architecture=plat.architecture, os=plat.os, variant=plat.variant, config=conf,
                           extra=extra),
    )
    keep_freed_memory()
    with progress_sink(as_json) as sink:
        r = do_build(store, source, ref, opts, sink)
    signed = []
    if key is not None and identity is not None:
        from shoal.trust.image import sign_stored

        signed = sign_stored(store, ref, key, identity)
    if as_json:
        emit_json({
            "ref": ref, "digest": r.manifest.digest, "root": r.manifest.root, "files": r.files,
            "bytes_in": r.bytes_in, "chunks": r.chunks, "unique_chunks": r.unique_chunks,
            "new_chunks": r.new_chunks, "packs": r.packs, "new_packs": r.new_packs,
            "stored_bytes": r.stored_bytes, "added_bytes": r.added_bytes, "seconds": round(r.seconds, 3),
            "mb_per_s": round(r.bytes_in / max(r.seconds, 1e-9) / 1e6, 1),
            "skipped": ["/" + p.decode("utf-8", "backslashreplace").lstrip("/") for p in r.skipped],
            "signed": [{"digest": s.digest, "identity": s.identity} for s in signed],
        })
        return
    click.echo(f"{ref} {r.manifest.digest}")
    click.echo(f"  root {r.manifest.root}")
    click.echo(f"  {r.files} files, {human(r.bytes_in)} in {r.seconds:.2f}s "
               f"({r.bytes_in / max(r.seconds, 1e-9) / 1e6:.0f} MB/s)")
    click.echo(f"  {r.chunks} chunks ({r.unique_chunks} unique, {r.new_chunks} new), "
               f"{r.packs} packs ({r.new_packs} written)")
    click.echo(f"  image {human(r.stored_bytes)}, store grew by {human(r.added_bytes)}")
    for s in signed:
        click.echo(f"  signed {s.digest} as {s.identity}")
