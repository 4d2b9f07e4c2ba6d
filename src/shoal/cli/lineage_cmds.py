"""shoal rebase / shoal apply: three-way merges of image trees (docs/spec/lineage.md)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from shoal.cli.common import emit_json, human, open_store, platform_option, registry_options, registry_opts

if TYPE_CHECKING:
    from collections.abc import Callable

    from shoal.merge import Input, Outcome
    from shoal.store import Store

_PREFER = click.option("--prefer", type=click.Choice(["ours", "theirs"]), default=None,
                       help="Resolve each conflict with that side's version of the path (ours: the image's "
                            "change; theirs: the new base's). Default: refuse, listing the conflicts.")


def _report(what: str, ref: str, o: "Outcome", as_json: bool, extra: dict[str, Any]) -> None:
    r = o.result
    if as_json:
        emit_json({"ref": ref, "digest": r.manifest.digest, "root": r.manifest.root, "files": r.files,
                   "changed_paths": o.changed_by_ours, "new_chunks": r.new_chunks, "new_packs": r.new_packs,
                   "packs": r.packs, "stored_bytes": r.stored_bytes, "added_bytes": r.added_bytes,
                   "resolved": [{"path": "/" + x.path.decode("utf-8", "backslashreplace"), "rule": x.rule}
                                for x in o.resolved],
                   "seconds": round(r.seconds, 3), **extra})
        return
    click.echo(f"{ref} {r.manifest.digest}")
    click.echo(f"  root {r.manifest.root}")
    click.echo(f"  {what}: {o.changed_by_ours} paths differ from the new base; {r.new_chunks} new chunks, "
               f"{r.new_packs} new packs of {r.packs}; store grew by {human(r.added_bytes)}")
    for x in o.resolved:
        click.echo(f"  merged /{x.path.decode('utf-8', 'backslashreplace')}: {x.rule}")


def _conflicts(exc: Any) -> NoReturn:
    click.echo(f"shoal: error: {exc}", err=True)
    for line in exc.lines:
        click.echo(f"  {line}", err=True)
    sys.exit(exc.exit_code)


def _merged(ctx: click.Context, tag: str, platform: str | None, kw: dict[str, Any],
            run: "Callable[[Store, Callable[[str], Input], str], Outcome]") -> "tuple[Outcome, str]":
    """Run a merge into the store as ``tag``: its inputs (any transport) are taken into the store while
    the store's writer lock is held, so no gc takes the untagged ones before the result is tagged
    (store.md §3); a conflict ends the command with its list (exit 11)."""
    from shoal.errors import ConflictError
    from shoal.recipe.builder import store_input
    from shoal.store import new_image_name

    tag = new_image_name(tag)
    sc = registry_opts(ctx, platform=platform, **kw)
    store = open_store(ctx)
    with store.layout.writing():
        try:
            return run(store, lambda ref: store_input(store, ref, sc), tag), tag
        except ConflictError as exc:
            _conflicts(exc)


@click.command()
@click.argument("image")
@click.option("--onto", required=True, metavar="REF", help="The new base (any transport).")
@click.option("--from", "from_", default=None, metavar="REF",
              help="The base IMAGE was built on (default: the one IMAGE records in its lineage).")
@click.option("-t", "--tag", "tag", required=True, metavar="NAME:TAG", help="Name of the result in the store.")
@_PREFER
@click.option("--json", "as_json", is_flag=True)
@platform_option("Image of an image index to use (default: this machine's platform).")
@registry_options
@click.pass_context
def rebase(ctx: click.Context, /, image: str, onto: str, from_: str | None, tag: str, prefer: str | None,
           as_json: bool, platform: str | None, **kw: Any) -> None:
    """IMAGE's own changes (relative to its base) on top of --onto, as NAME:TAG; no file data is copied."""
    from shoal import merge

    def run(store: "Store", inputs: "Callable[[str], Input]", name: str) -> "Outcome":
        old = inputs(from_) if from_ else None
        return merge.rebase(store, inputs(image), inputs(onto), name, old_base=old, prefer=prefer)

    o, tag = _merged(ctx, tag, platform, kw, run)
    _report("rebased", tag, o, as_json, {"image": image, "onto": onto})


@click.command("apply")
@click.argument("base")
@click.argument("images", nargs=-1, required=True)
@click.option("-t", "--tag", "tag", required=True, metavar="NAME:TAG", help="Name of the result in the store.")
@_PREFER
@click.option("--json", "as_json", is_flag=True)
@platform_option("Image of an image index to use (default: this machine's platform).")
@registry_options
@click.pass_context
def apply_cmd(ctx: click.Context, /, base: str, images: tuple[str, ...], tag: str, prefer: str | None,
              as_json: bool, platform: str | None, **kw: Any) -> None:
    """BASE plus each IMAGE's own changes (relative to the base it records), in order, as NAME:TAG."""
    from shoal import merge

    def run(store: "Store", inputs: "Callable[[str], Input]", name: str) -> "Outcome":
        return merge.apply(store, inputs(base), [inputs(i) for i in images], name, prefer=prefer)

    o, tag = _merged(ctx, tag, platform, kw, run)
    _report("applied", tag, o, as_json, {"base": base, "images": list(images)})
