"""shoal sbom"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from shoal.cli.common import emit_json, human, platform_option, registry_options, registry_opts
from shoal.cli.image_cmds import load_image

_PLATFORM_HELP = "Image of an image index to use (default: this machine's platform)."


@click.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["spdx-json", "cyclonedx-json"]), default="spdx-json",
              show_default=True, help="SPDX 2.3 or CycloneDX 1.5, as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the document to this file (default: stdout) and print a summary.")
@click.option("--attach", is_flag=True,
              help="Also store it beside the image as an OCI referrer artifact (store images, docker://).")
@click.option("--json", "as_json", is_flag=True, help="With -o: print the summary as one JSON object.")
@platform_option(_PLATFORM_HELP)
@registry_options
@click.pass_context
def sbom(ctx: click.Context, /, ref: str, fmt: str, output: str | None, attach: bool, as_json: bool,
         platform: str | None, **kw: Any) -> None:
    """Write an SBOM of REF from its package databases (dpkg, rpm, apk, Python dist-info, node_modules),
    reading only those files (docker://: range reads of them, no pull).  docs/sbom.md."""
    from shoal.errors import UsageError
    from shoal.mount.image import CountingSource
    from shoal.reader import Reader
    from shoal.sbom.documents import MEDIA_TYPES, Subject, created_time, render
    from shoal.sbom.inventory import packages_of
    from shoal.transports.base import parse_reference

    if as_json and output is None:
        raise UsageError("--json prints the summary: give -o FILE for the document")
    transport = parse_reference(ref).transport.name
    if attach and transport not in ("", "docker"):
        raise UsageError("--attach stores the SBOM beside a store image or a docker:// image, "
                         f"not a {transport}: one")
    sc = registry_opts(ctx, platform=platform, **kw)
    with load_image(ctx, ref, sc) as img:
        counting = CountingSource(img.source)
        inv = packages_of(img.index, Reader(img.index, counting))
        subject_digest = img.classic or img.digest
        created_cfg = img.config.extra.get("created")
        subject = Subject(img.name, subject_digest, created_cfg if isinstance(created_cfg, str) else "")
        sde = os.environ.get("SOURCE_DATE_EPOCH")
        doc = render(fmt, subject, inv, sde)
        index_bytes = img.manifest.index.size if img.manifest is not None and not img.local else 0
        manifest = img.manifest
        local = img.local
    for w in inv.warnings:
        click.echo(f"shoal: warning: {w}", err=True)
    pushed = None
    if attach:
        from shoal.sbom.attach import artifact, attach_local, push_artifact

        created = created_time(subject, inv, sde)
        if transport == "docker":
            pushed = push_artifact(ref, sc, subject_digest, doc, fmt, MEDIA_TYPES[fmt], created)
        else:
            from shoal import mediatypes as mt
            from shoal.cli.common import open_store

            if manifest is None or img.classic:
                raise UsageError("--attach needs a Shoal image in the store")
            desc = {"mediaType": mt.OCI_MANIFEST, "digest": manifest.digest, "size": len(manifest.raw)}
            pushed = attach_local(open_store(ctx), artifact(doc, fmt, MEDIA_TYPES[fmt], desc, created))
    if output is None:
        sys.stdout.buffer.write(doc)
        sys.stdout.buffer.flush()
        if pushed:
            click.echo(f"attached {MEDIA_TYPES[fmt]} {pushed}", err=True)
        return
    with open(output, "wb") as f:
        f.write(doc)
    frames = 0 if local else counting.counts.bytes  # a store image's frames are read, not fetched
    fetched = frames + index_bytes
    summary = {"ref": ref, "digest": subject_digest, "format": fmt, "output": output,
               "packages": len(inv.packages), "files_read": len(inv.read), "bytes_read": inv.bytes_read,
               "frame_bytes_fetched": frames, "fetches": 0 if local else counting.counts.fetches,
               "bytes_fetched": fetched, "attached": pushed, "warnings": inv.warnings,
               "ecosystems": _count(inv.packages)}
    if as_json:
        emit_json(summary)
        return
    eco = ", ".join(f"{k} {v}" for k, v in sorted(_count(inv.packages).items()))
    click.echo(f"{len(inv.packages)} packages ({eco or 'none'}) from {len(inv.read)} files "
               f"({human(inv.bytes_read)}); fetched {human(fetched)}" + (f"; attached {pushed}" if pushed else ""))


def _count(pkgs: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pkgs:
        out[p.ecosystem] = out.get(p.ecosystem, 0) + 1
    return out
