"""shoal build -f RECIPE / shoal update REF: images built from a recipe file (docs/spec/lineage.md §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from shoal.cli.common import emit_json, open_store, registry_options, registry_opts

if TYPE_CHECKING:
    from shoal.recipe import ImageOutcome
    from shoal.transports.context import SystemContext


def run_recipe(ctx: click.Context, path: str, only: tuple[str, ...], source_date_epoch: int | None,
               sc: "SystemContext", as_json: bool, no_cache: bool = False) -> None:
    """Build the images of the recipe at ``path`` (``only`` and what they need) and report them."""
    from shoal.recipe import RecipeOptions, build_recipe, load

    recipe = load(path)
    store = open_store(ctx)
    # with --json, stdout is the report's: the run steps' output goes to stderr
    opts = RecipeOptions(only=only, source_date_epoch=source_date_epoch, system_context=sc,
                         output=sys.stderr.fileno() if as_json else sys.stdout.fileno(), no_cache=no_cache)
    sys.stdout.flush()
    outs = build_recipe(store, recipe, opts)
    _report(path, outs, as_json)


def _report(path: str, outs: "list[ImageOutcome]", as_json: bool) -> None:
    if as_json:
        emit_json({"recipe": path, "images": [
            {"ref": o.name, "digest": o.manifest.digest, "root": o.manifest.root, "recipe_digest": o.recipe_digest,
             "step": o.step_key, "cached": o.cached, "runs": o.runs, "new_chunks": o.new_chunks,
             "seconds": round(o.seconds, 3)} for o in outs]})
        return
    for o in outs:
        how = "no tree step" if o.step_key is None else "step cached" if o.cached else \
            f"built ({o.runs} run{'s' if o.runs != 1 else ''}, {o.new_chunks} new chunks)"
        click.echo(f"{o.name} {o.manifest.digest}")
        click.echo(f"  root {o.manifest.root}; {how}; {o.seconds:.2f}s")


@click.command()
@click.argument("ref")
@click.option("-f", "--file", "path", default=None, type=click.Path(dir_okay=False),
              help="The recipe file (default: the one REF records in its lineage).")
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH", default=None,
              help="Clamp mtimes of what steps write to this time (default: each image's own, else its parent's "
                   "newest mtime).")
@click.option("--no-cache", is_flag=True, help="Run every step again (the results are still cached).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@registry_options
@click.pass_context
def update(ctx: click.Context, /, ref: str, path: str | None, source_date_epoch: int | None, no_cache: bool,
           as_json: bool, **kw: Any) -> None:
    """Re-resolve the inputs of REF's recipe (its file, base images, copied files) and rebuild REF and the
    images of the file it needs; only steps whose inputs changed run again."""
    from shoal.errors import UsageError
    from shoal.recipe import recipe_of

    sc = registry_opts(ctx, **kw)
    image, recorded = recipe_of(open_store(ctx), ref)
    path = path or recorded
    if path is None:
        raise UsageError(f"{ref} was built from a recipe elsewhere: give its file with -f RECIPE")
    run_recipe(ctx, path, (image,), source_date_epoch, sc, as_json, no_cache)
