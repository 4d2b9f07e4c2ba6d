"""The command line: the only place that prints, draws progress and exits.

Commands are registered by name and imported only when run, so ``shoal
--help`` never imports FUSE, HTTP or zstd.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from typing import Any

from shoal.cli import preload

__all__ = ["main", "COMMANDS", "end_without_teardown"]

_END_NOW = False  # set by a command whose process may end without the interpreter's teardown

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("shoal.cli.build_cmd", "build", "Chunk, dedup, pack and index a directory into the store."),
    "images": ("shoal.cli.image_cmds", "images", "List images in the store with sizes."),
    "inspect": ("shoal.cli.image_cmds", "inspect", "Show an image's digest, Merkle root, sizes and counts."),
    "ls": ("shoal.cli.image_cmds", "ls", "List files from the index (no data is read)."),
    "cat": ("shoal.cli.image_cmds", "cat", "Stream one file's bytes to stdout."),
    "diff": ("shoal.cli.image_cmds", "diff", "Compare two images through their Merkle trees."),
    "sbom": ("shoal.cli.sbom_cmd", "sbom", "Write an SBOM (SPDX, CycloneDX) from an image's package databases."),
    "rebase": ("shoal.cli.lineage_cmds", "rebase", "Put an image's own changes on a new base (three-way merge)."),
    "apply": ("shoal.cli.lineage_cmds", "apply_cmd", "Put other images' own changes on a base (three-way merge)."),
    "update": ("shoal.cli.recipe_cmds", "update", "Rebuild an image from its recipe, redoing only what changed."),
    "rm": ("shoal.cli.image_cmds", "rm", "Remove image names from the store (see gc)."),
    "unpack": ("shoal.cli.unpack_cmd", "unpack", "Materialize an image's tree in a directory."),
    "fsck": ("shoal.cli.store_cmds", "fsck", "Verify every object in the store."),
    "gc": ("shoal.cli.store_cmds", "gc", "Delete blobs that no image references."),
    "mount": ("shoal.cli.mount_cmds", "mount", "Mount an image lazily with FUSE (read-only or --writable)."),
    "umount": ("shoal.cli.mount_cmds", "umount", "Unmount a shoal mount and stop its daemon."),
    "status": ("shoal.cli.mount_cmds", "status", "Show shoal mounts, their daemons and I/O counters."),
    "run": ("shoal.cli.mount_cmds", "run", "Run a container from an image (lazy mount + runc)."),
    "profile": ("shoal.cli.mount_cmds", "profile", "Record which frames a workload reads first (for --prefetch auto)."),
    "copy": ("shoal.cli.transfer_cmds", "copy", "Copy an image between any two transports (docker://, oci:, ...)."),
    "push": ("shoal.cli.transfer_cmds", "push", "Push a store image to a registry, sending only missing blobs."),
    "pull": ("shoal.cli.transfer_cmds", "pull", "Pull an image into the store, fetching only missing chunks."),
    "convert": ("shoal.cli.convert_cmds", "convert", "Convert a classic OCI/Docker image to Shoal."),
    "export": ("shoal.cli.convert_cmds", "export", "Export a Shoal image as a classic one-layer OCI image."),
    "delete": ("shoal.cli.transfer_cmds", "delete", "Delete an image from a registry."),
    "login": ("shoal.cli.transfer_cmds", "login", "Check and save credentials for a registry."),
    "snapshotter": ("shoal.cli.snapshotter_cmd", "snapshotter", "Serve containerd's snapshots API."),
    "logout": ("shoal.cli.transfer_cmds", "logout", "Remove saved credentials for a registry."),
    "key": ("shoal.cli.trust_cmds", "key", "Generate a sigstore/cosign key pair (key generate)."),
    "sign": ("shoal.cli.trust_cmds", "sign", "Sign an image in a registry (cosign format, sha256-<hex>.sig tag)."),
    "verify": ("shoal.cli.trust_cmds", "verify", "Check an image's cosign signature; --deep every chunk."),
    "service": ("shoal.cli.service", "service", "Keep a warm process that starts `shoal run` fast."),
    "store": ("shoal.cli.als_cmd", "store", "Serve the store to other engines (store serve: podman's layer store)."),
}

preload.start(COMMANDS)  # before click and the command's modules are imported (cli/preload.py)

import click  # noqa: E402


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        cmd = getattr(importlib.import_module(spec[0]), spec[1])
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store", type=click.Path(file_okay=False), default=None, envvar="SHOAL_STORE",
              help="Store directory (default $SHOAL_STORE, else ~/.local/share/shoal, or /var/lib/shoal as root).")
@click.option("-v", "--verbose", count=True, help="Log more to stderr (-vv for debug).")
@click.version_option(package_name="shoal", prog_name="shoal")
@click.pass_context
def cli(ctx: click.Context, store: str | None, verbose: int) -> None:
    """Shoal: chunked, deduplicated, lazily mountable container images."""
    level = logging.WARNING - 10 * min(verbose, 2)
    # debug lines carry the wall-clock time (to the millisecond): their "timeline:" marks line up with
    # other processes' logs (the snapshotter's, its mounts', containerd's)
    fmt = "shoal: %(asctime)s.%(msecs)03d %(levelname)s: %(message)s" if verbose >= 2 else \
        "shoal: %(levelname)s: %(message)s"
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt, datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("httpx", "httpcore"):  # they log whole URLs and headers: presigned queries carry signatures
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"store": store}


_LEFT: list[object] = []  # what the process ends without freeing (one slot: a long-lived caller frees the last)


def leave_for_exit(obj: object) -> None:
    """Keep ``obj`` until the process ends instead of freeing it when the command returns (a lazy
    mount's opened image: freeing its decoded index took ~15 ms on the path of the snapshotter, whose
    fork-server child ends with ``os._exit`` once it answered).  Only the latest is kept."""
    _LEFT[:] = [obj]


def end_without_teardown() -> None:
    """Once the command returns successfully, end the process at once: no interpreter teardown, which
    frees every object one by one (~0.15 s after a lazy mount, whose parent holds the decoded index).
    Only for the process's own entry point (``main()`` without ``argv``), with no other thread left
    and nothing registered to run at exit but logging (flushed first)."""
    global _END_NOW
    _END_NOW = True


def _end_now() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            return  # let the ordinary exit report it
    os._exit(0)


def main(argv: list[str] | None = None) -> Any:
    from shoal.errors import MAX_MESSAGE, ShoalError, from_oserror, short

    try:
        try:
            rv = cli.main(args=argv, prog_name="shoal", standalone_mode=False)
            preload.record()
            if _END_NOW and argv is None and rv is None and threading.active_count() == 1:
                _end_now()
            return rv
        except BrokenPipeError:
            raise
        except OSError as exc:  # a system call no layer below explained: classify it by errno
            logging.getLogger("shoal").debug("system call failed", exc_info=True)
            raise from_oserror(exc) from None
    except ShoalError as exc:
        click.echo(f"shoal: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("shoal: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"shoal: error: {short(exc.format_message(), MAX_MESSAGE)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("shoal: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # e.g. `shoal cat ... | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:  # a bug: still one line, with the traceback in the debug log
        logging.getLogger("shoal").debug("internal error", exc_info=True)
        click.echo(f"shoal: internal error: {type(exc).__name__}: {short(str(exc), MAX_MESSAGE)} "
                   "(run with -vv for the traceback)", err=True)
        sys.exit(70)
