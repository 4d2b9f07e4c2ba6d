"""Helpers shared by CLI commands: opening the store, JSON output, progress bars, human sizes."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import click

from shoal.progress import NULL, Sink
from shoal.store import Store

if TYPE_CHECKING:
    from shoal.transports.context import SystemContext


def open_store(ctx: click.Context) -> Store:
    return Store.open(ctx.obj.get("store") if ctx.obj else None)


def keep_freed_memory() -> None:
    """For a short-lived bulk command (build, convert): let glibc keep freed memory instead of handing
    every large buffer back to the kernel and faulting it in again (about 5% of a build's time here:
    ~35,000 fewer page faults for the 467 MB tree). Never for the mount daemon, which lives on."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: trim the heap only past 1 GiB free
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers up to 32 MiB come from (reused) heap memory
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


JSON_SCHEMA = 1  # the version of every --json shape (docs/cli-json.md); bumped when one changes incompatibly


def emit_json(doc: dict[str, Any]) -> None:
    """Print a command's ``--json`` document: one object, with ``"schema": JSON_SCHEMA`` (docs/cli-json.md)."""
    click.echo(json.dumps({"schema": JSON_SCHEMA, **doc}, sort_keys=True))


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def show_path(p: bytes) -> str:
    """A path for humans: undecodable bytes come out as \\x escapes."""
    return p.decode("utf-8", errors="backslashreplace") if p else "/"


class RichSink:
    """Progress bars on stderr, one per task."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int | None, unit: str = "B") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task: str, amount: int) -> None:
        t = self.tasks.get(task)
        if t is not None:
            self.progress.advance(t, amount)

    def finish(self, task: str) -> None:
        t = self.tasks.pop(task, None)
        if t is not None:
            self.progress.remove_task(t)


class progress_sink:
    """Context manager: a RichSink when stderr is a TTY, else the silent sink."""

    def __init__(self, quiet: bool = False) -> None:
        self.rich: RichSink | None = None if quiet or not sys.stderr.isatty() else RichSink()

    def __enter__(self) -> Sink:
        if self.rich is None:
            return NULL
        self.rich.progress.start()
        return self.rich

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.progress.stop()


CREDS_HELP = "Registry credentials (else the auth files); USER alone: the password from a prompt or stdin."


def parse_creds(text: str | None) -> Any:
    """``--creds USER[:PASS]``: without ``:PASS`` the password comes from a prompt on a terminal, else
    from one line of standard input (as ``--password-stdin``), so it need not be on the command line.
    A password given there is masked in this process's ``/proc/PID/cmdline`` at once (and so in a
    mount daemon forked later): ``shoal.mount.proctitle``."""
    if text is None:
        return None
    from shoal.errors import UsageError
    from shoal.mount.proctitle import scrub_argv

    user, sep, pw = text.partition(":")
    if sep:
        scrub_argv()
    elif sys.stdin.isatty():
        pw = click.prompt(f"Password for {user}", hide_input=True, err=True)
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
        if not pw:
            raise UsageError(f"no password for {user} on standard input (give USER:PASS, or the password "
                             "as one line of standard input)")
    from shoal.transports.registry import Credentials

    return Credentials(user, pw)


def lines(items: Iterator[str]) -> None:
    for s in items:
        click.echo(s)


_BOOL = click.BOOL
_FC = TypeVar("_FC", bound=Callable[..., Any])


def _check_platform(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from shoal.format.platform import Platform

    return None if value is None else str(Platform.parse(value))  # UsageError (exit 2) when malformed


def platform_option(help: str) -> Callable[[_FC], _FC]:
    """``--platform OS/ARCH[/VARIANT]``, the one spelling of every command that picks an image of an
    image index (``shoal.format.platform.choose``); checked and normalized (``linux/x86_64`` is
    ``linux/amd64``) before the command runs."""
    return click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]", callback=_check_platform,
                        help=help)


def reuse_options(fn: _FC) -> _FC:
    """``--reuse NAME:TAG`` (repeatable) and ``--no-reuse``, shared by build and convert (format.md §5):
    by default a chunk the store already holds is taken from where it is."""
    fn = click.option("--no-reuse", is_flag=True,
                      help="Take no chunk from the store: every chunk goes into new packs, so the image depends "
                           "only on the tree and options.")(fn)
    return click.option("--reuse", multiple=True, metavar="NAME:TAG",
                        help="Take stored chunks only from this image's packs (repeatable; default: from any "
                             "pack the store holds whole).")(fn)


def reuse_choice(reuse: tuple[str, ...], no_reuse: bool) -> dict[str, Any]:
    """The BuildOptions fields of ``--reuse``/``--no-reuse``; naming images and refusing all is a usage error."""
    from shoal.errors import UsageError

    if reuse and no_reuse:
        raise UsageError("--reuse and --no-reuse cannot be used together")
    return {"reuse": reuse, "reuse_store": not no_reuse}


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """TLS, credentials and concurrency options shared by every command that talks to a registry."""
    opts = [
        click.option("--tls-verify", type=_BOOL, default=True, show_default=True, metavar="BOOL",
                     help="Verify registry TLS certificates; false also lets a registry answer in plain HTTP."),
        click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="PEM file of CA certificates, added to the system's trust store."),
        click.option("--cert-dir", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Directory of *.crt CA certificates, added to the system's trust store, and of a client "
                          "certificate NAME.cert with NAME.key (as skopeo; default /etc/containers/certs.d/HOST, "
                          "then /etc/docker/certs.d/HOST)."),
        click.option("--plain-http", type=_BOOL, default=None, is_flag=False, flag_value=True, metavar="[BOOL]",
                     help="Use plain HTTP (default: HTTPS; a loopback registry that does not speak TLS gets HTTP; "
                          "=false forces HTTPS)."),
        click.option("--authfile", type=click.Path(dir_okay=False), default=None, envvar="REGISTRY_AUTH_FILE",
                     help="Primary credentials file, as podman's (default: $REGISTRY_AUTH_FILE, else "
                          "$XDG_RUNTIME_DIR/containers/auth.json or /run/containers/$UID/auth.json); then "
                          "~/.config/containers/auth.json, ~/.docker/config.json, ~/.dockercfg are read."),
        click.option("--retries", type=click.IntRange(0, 100), default=None, help="Retries per request (default 5)."),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
                     help="Seconds a registry request may wait for a byte, and its grace before it must average "
                          "64 KiB/s (default 30)."),
        click.option("--signature-policy", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="containers-policy.json applied at pull, mount and run (default: "
                          "$SHOAL_SIGNATURE_POLICY, ~/.config/containers/policy.json, /etc/containers/policy.json; "
                          "none: refused)."),
        click.option("--registries.d", "registries_d", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="registries.d directory naming where GPG simple signatures are kept (lookaside), as "
                          "skopeo's (default: ~/.config/containers/registries.d, else /etc/containers/registries.d)."),
        click.option("--registries-conf", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="registries.conf to use instead of the system's (default: $CONTAINERS_REGISTRIES_CONF, "
                          "~/.config/containers/registries.conf, /etc/containers/registries.conf)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def registry_opts(ctx: click.Context, tls_verify: bool, ca_bundle: str | None, cert_dir: str | None,
                  plain_http: bool | None, authfile: str | None, retries: int | None,
                  timeout: float | None = None, concurrency: int | None = None,
                  registries_conf: str | None = None, platform: str | None = None,
                  signature_policy: str | None = None, registries_d: str | None = None) -> "SystemContext":
    """The ``SystemContext`` the ``registry_options`` flags describe, built once per command and given
    to every ``new_source``/``new_destination``/``open_image``.  Paths are made absolute: the mount
    daemon changes its directory to /."""
    from shoal.transports.context import SystemContext

    def absolute(p: str | None) -> str | None:
        return os.path.abspath(p) if p else None

    o: dict[str, Any] = {}
    if retries is not None:
        o["retries"] = retries
    if timeout is not None:
        o["timeout"] = timeout
    if concurrency:
        o["concurrency"] = concurrency
    store = ctx.obj.get("store") if ctx.obj else None
    return SystemContext(store=absolute(store), platform=platform, auth_file=absolute(authfile),
                         tls_verify=tls_verify, ca_bundle=absolute(ca_bundle), cert_dir=absolute(cert_dir),
                         plain_http=plain_http, registries_conf=absolute(registries_conf),
                         signature_policy=absolute(signature_policy), registries_d=absolute(registries_d), **o)
