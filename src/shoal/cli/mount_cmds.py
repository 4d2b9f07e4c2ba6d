"""shoal mount / umount / status / run / profile (docs/spec/mount.md)"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

import click

from shoal.cli.common import CREDS_HELP, emit_json, human, parse_creds, platform_option, registry_options, registry_opts

if TYPE_CHECKING:
    from shoal.mount.image import OpenOptions


def _store(ctx: click.Context) -> str | None:
    return ctx.obj.get("store") if ctx.obj else None


_PREFETCH_HELP = ("Fetch ahead (docker:// images): the recorded profile (auto), the profile then every other "
                  "frame in the background (all), or nothing.")


def _remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options for reaching docker:// images: registry TLS/auth options, --creds, --fetch-timeout, --platform."""
    opts = [
        click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP),
        click.option("--fetch-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                     metavar="SECONDS", help="A read waiting longer than this for the registry fails with EIO."),
        platform_option("Image of an image index to use (default: this machine's platform)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return registry_options(fn)


# what a mount daemon imports to serve (mount/serve.py): loaded while the registry is awaited
_SERVE_MODULES = ("shoal.mount.kernel", "shoal.mount.fs", "shoal.mount.serve")


def _open_options(ctx: click.Context, kw: dict[str, Any], prefetch: str = "auto") -> "OpenOptions":
    """Pop the remote options out of ``kw`` and make OpenOptions of them."""
    from shoal.mount.image import OpenOptions

    creds = kw.pop("creds")
    fetch_timeout = kw.pop("fetch_timeout")
    platform = kw.pop("platform")
    sc = registry_opts(ctx, platform=platform, **{k: kw.pop(k) for k in (
        "tls_verify", "ca_bundle", "cert_dir", "plain_http", "authfile", "retries", "timeout", "registries_conf",
        "signature_policy", "registries_d")})
    if creds is not None:
        sc = sc.replace(credentials=parse_creds(creds))
    return OpenOptions(context=sc, fetch_timeout=fetch_timeout, prefetch=prefetch, warm=_SERVE_MODULES, policy=True)


def _index_hint(value: str) -> tuple[str, int]:
    """``--index-hint``'s (digest, size)."""
    from shoal.format.runtime_view import index_hint

    hint = index_hint(value)
    if hint is None:
        raise click.BadParameter(f"{value[:100]!r} is not sha256:<64 hex digits>:<size>", param_hint="--index-hint")
    return hint


def _freeze() -> None:
    """Before a command that forks a mount daemon: what exists now (modules, click's objects) is out of
    the cyclic collector's sight, so the collections of the open and of the daemon need not look at it
    again (when the parent still collected before the fork, ``shoal run`` of bookworm+python3+git took
    42-50 ms there instead of 91-117 ms on a loaded machine)."""
    import gc

    gc.freeze()


@click.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--writable", is_flag=True, help="Put a writable overlay (kernel overlayfs) over the image.")
@click.option("--foreground", is_flag=True, help="Serve in this process until unmounted or interrupted.")
@click.option("--prefetch", type=click.Choice(["auto", "none", "all"]), default="auto", show_default=True,
              help=_PREFETCH_HELP)
@click.option("--allow-other", is_flag=True,
              help="Let other users enter the mount (default: only you). Read-only mounts; a --writable "
                   "overlay is reachable by file permissions.")
@click.option("--suid", is_flag=True,
              help="WARNING: honour the image's setuid/setgid bits (default nosuid): with --allow-other or "
                   "--writable, any local user may run the image's setuid-root programs as root.")
@click.option("--dev", is_flag=True,
              help="WARNING: honour the image's device nodes (default nodev): a device node in an image "
                   "gives whoever can reach it access to that host device.")
@click.option("--trusted-image", is_flag=True, help="All three above: only for an image you would run as root.")
@click.option("--json", "as_json", is_flag=True, help="Print the mount's state as JSON.")
@click.option("--busy-poll", type=click.IntRange(0, 100_000), default=None, metavar="MICROSECONDS",
              help="How long the FUSE reader asks for the next request before it sleeps: a burst of "
                   "requests (a walk, a start-up) then needs no wake-up each (default 50 on two CPUs or "
                   "more, else 0; 0 turns it off).")
@click.option("--index-hint", metavar="sha256:HEX:SIZE",
              help="The index blob the image's manifest is expected to name: requested beside the manifest, "
                   "used only if the manifest names it (what the containerd snapshotter passes from the "
                   "runtime view's label).")
@_remote_options
@click.pass_context
def mount(ctx: click.Context, /, ref: str, mountpoint: str, writable: bool, foreground: bool, prefetch: str,
          allow_other: bool, suid: bool, dev: bool, trusted_image: bool, as_json: bool, busy_poll: int | None,
          index_hint: str | None, **kw: Any) -> None:
    """Mount image REF (NAME:TAG or docker://...) read-only (or --writable) at MOUNTPOINT, reading lazily.

    The mount is nosuid and nodev, and only you may enter it, unless --allow-other, --suid, --dev (or
    --trusted-image) say otherwise."""
    from shoal.mount.daemon import MountOptions
    from shoal.mount.daemon import mount as do_mount
    from shoal.mount.state import Exposure

    open_opts = _open_options(ctx, kw, prefetch)
    if index_hint is not None:
        open_opts = dataclasses.replace(open_opts, index_hint=_index_hint(index_hint))
    expose = Exposure(allow_other or trusted_image, suid or trusted_image, dev or trusted_image)
    opts = MountOptions(writable=writable, foreground=foreground, prefetch=prefetch, expose=expose)
    if busy_poll is not None:
        opts = dataclasses.replace(opts, busy_poll_us=busy_poll)

    def live(exc: BaseException | None) -> None:
        if exc is None:
            click.echo(f"serving {ref} at {mountpoint}; unmount it (or Ctrl-C) to stop", err=True)

    if not foreground:
        _freeze()
        open_opts = dataclasses.replace(open_opts, freeze=True)  # the index as well, as it is decoded
    from shoal.cli import leave_for_exit

    st = do_mount(ref, mountpoint, opts, _store(ctx), notify=live, open_opts=open_opts, keep=leave_for_exit)
    if st is None:
        return
    if as_json:
        emit_json(st.to_json())
    else:
        click.echo(f"mounted {st.name} at {st.mountpoint} (pid {st.pid}{', writable' if st.writable else ''})")
    from shoal.cli import end_without_teardown

    end_without_teardown()  # the daemon serves on; freeing this process's copy of the index is wasted time


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-l", "--lazy", is_flag=True, help="Detach now even if busy; the daemon exits when the last user leaves.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def umount(mountpoint: str, lazy: bool, timeout: float) -> None:
    """Unmount a shoal mount (overlay and FUSE), stop its daemon and remove its state."""
    from shoal.mount.control import umount as do_umount

    do_umount(mountpoint, lazy=lazy, timeout=timeout)


def _row(d: dict[str, Any]) -> str:
    s = d.get("stats") or {}
    src = s.get("source") or {}
    alive = "alive" if d["alive"] else "DEAD"
    parts = [f"served {human(s.get('bytes_served', 0))} in {s.get('reads', 0)} reads",
             f"fetched {human(s.get('bytes_fetched', 0))} in {s.get('fetches', 0)} frame reads"]
    if "bytes_fetched" in src:  # a lazy source: what crossed the network
        parts.append(f"network {human(src['bytes_fetched'])} in {src.get('requests', 0)} requests")
    if "bytes_total" in src:
        total = src["bytes_total"] or 1
        parts.append(f"cached {human(src.get('bytes_cached', 0))} of {human(src['bytes_total'])} "
                     f"({100 * src.get('bytes_cached', 0) / total:.1f}%), frames {src.get('frames_cached', 0)}"
                     f"/{src.get('frames_total', 0)}")
    if s.get("prefetch_state", "none") != "none":
        parts.append(f"prefetch {s['prefetch_state']} {s.get('prefetched_frames', 0)}/{s.get('prefetch_planned', 0)}"
                     f" frames (profile {s.get('profile_frames', 0)})")
    cached = s.get("chunks_cached", "(counting)")  # absent until the daemon's first count (mount.md §5.3)
    parts += [f"chunks cached {cached}/{s.get('chunks_total', 0)}",
              f"errors {s.get('errors', 0)}", f"up {max(0.0, time.time() - d['started_at']):.0f}s"]
    return (f"{d['mountpoint']}  {d['name']}  pid {d['pid']} {alive}{'  writable' if d['writable'] else ''}\n"
            f"    {', '.join(parts)}")


@click.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, the mounts under \"mounts\".")
def status(mountpoint: str | None, as_json: bool) -> None:
    """Show shoal mounts: image, daemon, and bytes served and fetched."""
    from shoal.mount.control import status as do_status

    rows = [s.to_json() for s in do_status(mountpoint)]
    if as_json:
        emit_json({"mounts": rows})
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
@click.option("--security-opt", "security_opt", multiple=True, metavar="seccomp=unconfined|FILE",
              help="Seccomp profile (default: containers-common's, as podman).")
@click.option("--cap-add", multiple=True, metavar="CAP", help="Add a capability to podman's default set.")
@click.option("--cap-drop", multiple=True, metavar="CAP", help="Drop a capability ('all': every one).")
@click.option("--pids-limit", type=click.IntRange(min=0), default=2048, show_default=True,
              help="Most processes the container may run (0: no limit).")
@click.option("--network", "--net", "network", type=click.Choice(["auto", "slirp4netns", "pasta", "none", "host"]),
              default="auto", show_default=True,
              help="The container's network: its own namespace with outbound access through slirp4netns or "
                   "pasta (auto: whichever is installed; the host's loopback stays out of reach), 'none' "
                   "(loopback only), or 'host' (the host's network: every host socket in reach).")
@click.option("--read-only", is_flag=True,
              help="Mount the container's root read-only (tmpfs on /tmp, /var/tmp and /run, as podman).")
@click.option("--unsafe-chroot", is_flag=True,
              help="UNSAFE: if the runtime is missing, run in a bare chroot with no isolation at all (every "
                   "capability, the host's PID namespace and devices). Without it a missing runtime is an error.")
@click.option("--prefetch", type=click.Choice(["auto", "none", "all"]), default="auto", show_default=True,
              help=_PREFETCH_HELP)
@_remote_options
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, /, rm: bool, name: str | None, env: tuple[str, ...], volumes: tuple[str, ...],
        workdir: str | None, user: str | None, entrypoint: str | None, tty: bool | None, runtime: str,
        security_opt: tuple[str, ...], cap_add: tuple[str, ...], cap_drop: tuple[str, ...], pids_limit: int,
        network: str, read_only: bool, unsafe_chroot: bool, prefetch: str, ref: str, command: tuple[str, ...],
        **kw: Any) -> None:
    """Run a container of REF (NAME:TAG or docker://...; CMD replaces the image's Cmd); exits with its code."""
    from shoal.mount.run import RunOptions
    from shoal.mount.run import run as do_run

    if command and command[0] == "--":
        command = command[1:]
    open_opts = _open_options(ctx, kw, prefetch)
    opts = RunOptions(command=command, env=env, volumes=volumes, name=name, rm=rm, entrypoint=entrypoint,
                      workdir=workdir, user=user, runtime=runtime, unsafe_chroot=unsafe_chroot, tty=tty,
                      prefetch=prefetch, security_opt=security_opt, cap_add=cap_add, cap_drop=cap_drop,
                      pids_limit=pids_limit, network=network, read_only=read_only)
    _freeze()
    ctx.exit(do_run(ref, opts, _store(ctx), dataclasses.replace(open_opts, freeze=True)))


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--seconds", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Stop the workload after this long (the profile keeps what it read so far).")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Set an environment variable.")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.option("-u", "--user", default=None, help="USER[:GROUP] (names from the image's /etc/passwd).")
@click.option("--entrypoint", default=None, help="Override the image's entrypoint ('' removes it).")
@click.option("--runtime", default="runc", envvar="SHOAL_RUNTIME", show_default=True, help="OCI runtime binary.")
@click.option("--no-push", is_flag=True, help="Keep the profile local (docker:// images are pushed a referrer).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout after the workload's output.")
@_remote_options
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def profile(ctx: click.Context, /, seconds: float, env: tuple[str, ...], workdir: str | None, user: str | None,
            entrypoint: str | None, runtime: str, no_push: bool, as_json: bool, ref: str, command: tuple[str, ...],
            **kw: Any) -> None:
    """Run CMD (or the image's command) on a lazy mount of REF, record which frames it reads first, and
    store that start-up profile beside the image (locally, and as a referrer artifact for docker://)."""
    from shoal.mount.record import record
    from shoal.mount.run import RunOptions

    if command and command[0] == "--":
        command = command[1:]
    open_opts = _open_options(ctx, kw, "none")
    opts = RunOptions(command=command, env=env, workdir=workdir, user=user, entrypoint=entrypoint, runtime=runtime,
                      tty=False)
    r = record(ref, seconds, opts, open_opts, _store(ctx), push=not no_push)
    p = r.profile
    if as_json:
        emit_json({"image": p.image, "frames": len(p.frames), "bytes": p.nbytes, "image_bytes": r.frame_bytes_total,
                   "seconds": round(p.seconds, 3), "exit_code": r.exit_code, "local": r.local, "pushed": r.pushed,
                   "bundle_bytes": r.bundle_bytes, "bundle_chunks": r.bundle_chunks,
                   "bundle_data_bytes": r.bundle_data_bytes})
    else:
        share = 100 * p.nbytes / max(1, r.frame_bytes_total)
        where = f"; pushed as {r.pushed}" if r.pushed else ""
        click.echo(f"profile of {p.image}: {len(p.frames)} frames, {human(p.nbytes)} of {human(r.frame_bytes_total)} "
                   f"({share:.1f}%), bundle {human(r.bundle_bytes)} ({r.bundle_chunks} chunks), "
                   f"workload exit {r.exit_code} after {p.seconds:.1f}s; saved {r.local}{where}", err=True)
