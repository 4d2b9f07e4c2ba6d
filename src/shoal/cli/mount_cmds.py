"""shoal mount / umount / status / run"""

from __future__ import annotations

import time
from typing import Any

import click

from shoal.cli.common import emit_json, human


def _store(ctx: click.Context) -> str | None:
    return ctx.obj.get("store") if ctx.obj else None


@click.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--writable", is_flag=True, help="Put a writable overlay (kernel overlayfs) over the image.")
@click.option("--foreground", is_flag=True, help="Serve in this process until unmounted or interrupted.")
@click.option("--prefetch", type=click.Choice(["auto", "none", "all"]), default="auto", show_default=True,
              help="Fetch ahead: the image's recorded profile (auto), every frame (all) or nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the mount's state as JSON.")
@click.pass_context
def mount(ctx: click.Context, ref: str, mountpoint: str, writable: bool, foreground: bool, prefetch: str,
          as_json: bool) -> None:
    """Mount image REF read-only (or --writable) at MOUNTPOINT, reading lazily through FUSE."""
    from shoal.mount.daemon import MountOptions
    from shoal.mount.daemon import mount as do_mount

    opts = MountOptions(writable=writable, foreground=foreground, prefetch=prefetch)

    def live(exc: BaseException | None) -> None:
        if exc is None:
            click.echo(f"serving {ref} at {mountpoint}; unmount it (or Ctrl-C) to stop", err=True)

    st = do_mount(ref, mountpoint, opts, _store(ctx), notify=live)
    if st is None:
        return
    if as_json:
        emit_json(st.to_json())
    else:
        click.echo(f"mounted {st.name} at {st.mountpoint} (pid {st.pid}{', writable' if st.writable else ''})")


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-l", "--lazy", is_flag=True, help="Detach now even if busy; the daemon exits when the last user leaves.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def umount(mountpoint: str, lazy: bool, timeout: float) -> None:
    """Unmount a shoal mount (overlay and FUSE), stop its daemon and remove its state."""
    from shoal.mount.daemon import umount as do_umount

    do_umount(mountpoint, lazy=lazy, timeout=timeout)


def _row(d: dict[str, Any]) -> str:
    s = d.get("stats") or {}
    src = s.get("source") or {}
    alive = "alive" if d["alive"] else "DEAD"
    parts = [f"served {human(s.get('bytes_served', 0))} in {s.get('reads', 0)} reads",
             f"fetched {human(s.get('bytes_fetched', 0))} in {s.get('fetches', 0)} frame reads"]
    if "bytes_fetched" in src:  # a lazy source: what crossed the network
        parts.append(f"network {human(src['bytes_fetched'])} in {src.get('requests', 0)} requests")
    parts += [f"chunks cached {s.get('chunks_cached', 0)}/{s.get('chunks_total', 0)}",
              f"errors {s.get('errors', 0)}", f"up {max(0.0, time.time() - d['started_at']):.0f}s"]
    return (f"{d['mountpoint']}  {d['name']}  pid {d['pid']} {alive}{'  writable' if d['writable'] else ''}\n"
            f"    {', '.join(parts)}")


@click.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def status(mountpoint: str | None, as_json: bool) -> None:
    """Show shoal mounts: image, daemon, and bytes served and fetched."""
    from shoal.mount.daemon import status as do_status

    rows = [s.to_json() for s in do_status(mountpoint)]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no shoal mounts", err=True)
    for d in rows:
        click.echo(_row(d))


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Remove the container's mount and files when it exits.")
@click.option("--name", default=None, help="Container name (default: shoal-<random>).")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V",
              help="Set an environment variable (K alone: copy the host's).")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]", help="Bind-mount a host path.")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.option("-u", "--user", default=None, help="USER[:GROUP] (names from the image's /etc/passwd).")
@click.option("--entrypoint", default=None, help="Override the image's entrypoint ('' removes it).")
@click.option("-t/-T", "--tty/--no-tty", "tty", default=None, help="Allocate a terminal (default: if stdin is one).")
@click.option("--runtime", default="runc", envvar="SHOAL_RUNTIME", show_default=True, help="OCI runtime binary.")
@click.option("--prefetch", type=click.Choice(["auto", "none", "all"]), default="auto", show_default=True)
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, rm: bool, name: str | None, env: tuple[str, ...], volumes: tuple[str, ...],
        workdir: str | None, user: str | None, entrypoint: str | None, tty: bool | None, runtime: str,
        prefetch: str, ref: str, command: tuple[str, ...]) -> None:
    """Run a container of REF (CMD replaces the image's Cmd); exits with the container's code."""
    from shoal.mount.run import RunOptions
    from shoal.mount.run import run as do_run

    if command and command[0] == "--":
        command = command[1:]
    opts = RunOptions(command=command, env=env, volumes=volumes, name=name, rm=rm, entrypoint=entrypoint,
                      workdir=workdir, user=user, runtime=runtime, tty=tty, prefetch=prefetch)
    ctx.exit(do_run(ref, opts, _store(ctx)))
