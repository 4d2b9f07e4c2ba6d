"""shoal copy / push / pull / delete / login / logout (docs/transports.md)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import click

from shoal.cli.common import CREDS_HELP, emit_json, human, parse_creds, platform_option, progress_sink
from shoal.cli.common import registry_options as _registry_options
from shoal.cli.common import registry_opts as _common

if TYPE_CHECKING:
    from shoal.transports.context import SystemContext


@dataclass(frozen=True)
class Carry:
    """What follows the image (docs/spec/trust.md §6) and whether to sign the copy (skopeo's options)."""

    signatures: bool = True  # --remove-signatures: False
    referrers: bool = True  # --no-referrers: False
    sign_key: str | None = None  # --sign-by-sigstore-private-key
    sign_passphrase_file: str | None = None
    sign_identity: str | None = None
    sign_by: str | None = None  # --sign-by: a GPG key fingerprint (simple signing)


def _run_copy(ctx: click.Context, src: str, dst: str, common: "SystemContext", src_creds: Any,
              dst_creds: Any, tags: tuple[str, ...], platform: str | None, concurrency: int,
              as_json: bool, verb: str, carry: Carry = Carry(), unpack: str | None = None) -> None:
    from shoal.copier import CopyOptions, copy
    from shoal.transports.base import parse_reference
    from shoal.unpack import UnpackRequest, UnpackResult, check_target

    src_ref, dst_ref = parse_reference(src), parse_reference(dst)
    src_opts = common.replace(credentials=src_creds) if src_creds is not None else common
    dst_opts = common.replace(credentials=dst_creds) if dst_creds is not None else common
    if tags:
        dst_opts = dst_opts.replace(tags=tuple(tags))
    key = identity = None
    if carry.sign_key is not None and carry.sign_by is not None:
        from shoal.errors import UsageError

        raise UsageError("give one of --sign-by and --sign-by-sigstore-private-key")
    if carry.sign_by is not None:  # before anything moves: no such key, a lookaside Shoal cannot write
        from shoal.trust.image import gpg_signing_check

        identity = gpg_signing_check(dst_ref, dst_opts, carry.sign_by, carry.sign_identity)
    if carry.sign_key is not None:  # before anything moves: a wrong passphrase or identity fails first
        from shoal.cli.trust_cmds import load_signing_key
        from shoal.trust.image import signing_identity

        identity = signing_identity(dst_ref, carry.sign_identity)
        key = load_signing_key(carry.sign_key, carry.sign_passphrase_file)
    if unpack is not None:
        check_target(unpack)  # before anything moves
    opts = CopyOptions(concurrency=concurrency, platform=platform, src_opts=src_opts, dst_opts=dst_opts,
                       signatures=carry.signatures, referrers=carry.referrers,
                       unpack=None if unpack is None else UnpackRequest(unpack))
    with progress_sink(as_json) as sink:
        r = copy(src_ref, dst_ref, opts, sink)
        unpacked: UnpackResult | None = r.unpacked
        if unpack is not None and unpacked is None:  # not the chunk-level path (a classic image): after it
            from shoal.cli.image_cmds import load_image
            from shoal.reader import Reader
            from shoal.unpack import unpack as do_unpack

            with load_image(ctx, dst, dst_opts) as img:
                unpacked = do_unpack(img.index, Reader(img.index, img.source), unpack, sink=sink)
    simple = 0
    if carry.signatures:  # GPG simple signatures: lookaside to lookaside (docker:// to docker://), as skopeo
        from shoal.trust.image import carry_simple_signatures

        simple = carry_simple_signatures(src_ref, src_opts, dst_ref, dst_opts, r.digest)
    signed = []
    if key is not None:
        from shoal.trust.image import sign_reference

        signed = sign_reference(dst_ref.pinned(r.digest), dst_opts, key, identity)
    if carry.sign_by is not None:
        from shoal.trust.image import sign_reference_gpg

        signed = sign_reference_gpg(dst_ref.pinned(r.digest), dst_opts, carry.sign_by, identity,
                                    carry.sign_passphrase_file)
    if as_json:
        emit_json({
            "src": str(src_ref), "dst": str(dst_ref), "digest": r.digest, "media_type": r.media_type,
            "bytes_fetched": r.bytes_fetched, "bytes_sent": r.bytes_sent, "requests": r.requests, "retries": r.retries,
            "seconds": round(r.seconds, 3), "blobs_sent": r.blobs_sent, "blobs_skipped": r.blobs_skipped,
            "chunks_fetched": r.chunks_fetched, "tags": list(tags), "signatures_carried": r.signatures,
            "referrers_carried": r.referrers, "simple_signatures_carried": simple,
            "signed": [{"digest": s.digest, "attachment": s.attachment, "identity": s.identity} for s in signed],
            **({} if unpacked is None else {"unpacked": {
                "dir": unpack, "entries": unpacked.entries, "files": unpacked.files, "bytes": unpacked.bytes,
                "seconds": round(unpacked.seconds, 3)}}),
        })
        return
    click.echo(f"{verb} {src_ref} -> {dst_ref} {r.digest}")
    click.echo(f"  fetched {human(r.bytes_fetched)}, sent {human(r.bytes_sent)}, {r.requests} requests, "
               f"{r.blobs_sent} blobs sent, {r.blobs_skipped} skipped, {r.seconds:.2f}s")
    if r.signatures or r.referrers or simple:
        click.echo(f"  carried {r.signatures} signature manifests, {simple} GPG signatures, "
                   f"{r.referrers} other referrers")
    for s in signed:
        click.echo(f"  signed {s.digest} as {s.identity} -> {s.attachment}")
    if unpacked is not None:
        click.echo(f"  unpacked {unpacked.entries} entries ({unpacked.files} files, {human(unpacked.bytes)}) in "
                   f"{unpack}, {unpacked.seconds:.2f}s")


_CARRY_OPTS = [
    click.option("--remove-signatures", is_flag=True,
                 help="Do not copy the source's signatures (cosign .sig attachments), as skopeo."),
    click.option("--no-referrers", is_flag=True,
                 help="Do not copy the source's other referrers (attached SBOMs, start-up profiles)."),
]
_SIGN_OPTS = [
    click.option("--sign-by", default=None, metavar="FINGERPRINT",
                 help="Sign the copied image with this GPG key of the keyring ($GNUPGHOME): simple signing, "
                      "written to the lookaside storage registries.d names (as skopeo)."),
    click.option("--sign-by-sigstore-private-key", "sign_key", default=None, metavar="KEY",
                 type=click.Path(exists=True, dir_okay=False),
                 help="Sign the copied image with this cosign private key (as skopeo; see shoal sign)."),
    click.option("--sign-passphrase-file", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="File whose first line is the key's passphrase (else $COSIGN_PASSWORD, else a prompt; "
                      "--sign-by: else gpg-agent asks)."),
    click.option("--sign-identity", default=None, metavar="HOST/REPO:TAG",
                 help="The identity the signature names (default: the destination reference)."),
]


def _carry_options(sign: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(_CARRY_OPTS + (_SIGN_OPTS if sign else [])):
            fn = o(fn)
        return fn
    return deco


def _carry(kw: dict[str, Any]) -> Carry:
    """The carry and sign options, taken out of ``kw``."""
    return Carry(not kw.pop("remove_signatures", False), not kw.pop("no_referrers", False), kw.pop("sign_key", None),
                 kw.pop("sign_passphrase_file", None), kw.pop("sign_identity", None), kw.pop("sign_by", None))


_COPY_OPTS = [
    click.option("-j", "--concurrency", type=click.IntRange(1, 64), default=8, show_default=True,
                 help="Blobs and ranges in flight at once."),
    platform_option("Only this platform's image of an image index (pull: default this machine's; copy, push: "
                    "default every platform)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object."),
]


def _copy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for o in reversed(_COPY_OPTS):
        fn = o(fn)
    return _registry_options(fn)


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--src-creds", default=None, metavar="USER[:PASS]", help="Credentials for the source registry.")
@click.option("--dest-creds", default=None, metavar="USER[:PASS]", help="Credentials for the destination registry.")
@click.option("--additional-tag", "tags", multiple=True, metavar="TAG", help="Also tag the copy with TAG (registries).")
@_carry_options(sign=True)
@_copy_options
@click.pass_context
def copy(ctx: click.Context, /, src: str, dst: str, src_creds: str | None, dest_creds: str | None,
         tags: tuple[str, ...], concurrency: int, platform: str | None, as_json: bool, **kw: Any) -> None:
    """Copy an image from SRC to DST (docker://, oci:, oci-archive:, docker-archive:, dir:, NAME:TAG); its
    signatures, attached SBOMs and profiles follow it (docker://, oci:, the store)."""
    carry = _carry(kw)
    common = _common(ctx, concurrency=concurrency, **kw)
    _run_copy(ctx, src, dst, common, parse_creds(src_creds), parse_creds(dest_creds), tags, platform, concurrency,
              as_json, "copied", carry)


@click.command()
@click.argument("name")
@click.argument("dst")
@click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP)
@click.option("--additional-tag", "tags", multiple=True, metavar="TAG", help="Also tag the pushed image with TAG.")
@_carry_options(sign=True)
@_copy_options
@click.pass_context
def push(ctx: click.Context, /, name: str, dst: str, creds: str | None, tags: tuple[str, ...], concurrency: int,
         platform: str | None, as_json: bool, **kw: Any) -> None:
    """Push the store's image NAME[:TAG] to DST (e.g. docker://HOST/REPO:TAG); only missing blobs are sent.
    Signatures made at build (--sign-key), attached SBOMs and profiles go with it."""
    carry = _carry(kw)
    from shoal.errors import UsageError
    from shoal.transports.base import parse_reference
    from shoal.transports.local import LocalReference

    if not isinstance(parse_reference(name), LocalReference):
        raise UsageError(f"push takes a store image NAME[:TAG], not {name!r} (use shoal copy)")
    common = _common(ctx, concurrency=concurrency, **kw)
    _run_copy(ctx, name, dst, common, None, parse_creds(creds), tags, platform, concurrency, as_json, "pushed",
              carry)


@click.command()
@click.argument("src")
@click.argument("name", required=False)
@click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP)
@click.option("--unpack", "unpack", default=None, metavar="DIR", type=click.Path(),
              help="Also write the image's tree in DIR (new or empty) while it is pulled, as `shoal unpack`.")
@_carry_options(sign=False)
@_copy_options
@click.pass_context
def pull(ctx: click.Context, /, src: str, name: str | None, creds: str | None, unpack: str | None, concurrency: int,
         platform: str | None, as_json: bool, **kw: Any) -> None:
    """Pull SRC into the store as NAME[:TAG] (default: SRC's repository and tag); only missing chunks are fetched.
    With --unpack DIR the tree is written too, frames going to DIR as they are verified."""
    carry = _carry(kw)
    from shoal.errors import UsageError
    from shoal.store import refuse_reserved
    from shoal.transports.base import parse_reference
    from shoal.transports.docker import DockerReference
    from shoal.transports.local import LocalReference

    ref = parse_reference(src)
    if isinstance(ref, LocalReference):  # a short name: podman's resolution (aliases, search registries)
        _pull_short(ctx, src, name, creds, concurrency, platform, as_json, kw, carry, unpack)
        return
    if name is None:
        if not isinstance(ref, DockerReference):
            raise UsageError("give a NAME[:TAG] for the store when pulling from a non-registry source")
        repo = ref.repo[len("library/"):] if ref.repo.startswith("library/") else ref.repo
        name = f"{repo}:{ref.tag or 'latest'}"
    refuse_reserved(name)  # a name that is a transport prefix fails here, with the reason
    if not isinstance(parse_reference(name), LocalReference):
        raise UsageError(f"pull stores into the local store: want NAME[:TAG], not {name!r}")
    from shoal.format.platform import Platform

    common = _common(ctx, concurrency=concurrency, **kw)
    platform = platform or str(Platform.host())  # like podman pull: an image index gives this machine's image
    _run_copy(ctx, src, name, common, parse_creds(creds), None, (), platform, concurrency, as_json, "pulled", carry,
              unpack)


def _pull_short(ctx: click.Context, src: str, name: str | None, creds: str | None, concurrency: int,
                platform: str | None, as_json: bool, kw: dict[str, Any], carry: Carry,
                unpack: str | None = None) -> None:
    """``shoal pull SHORTNAME [NAME]``: each candidate of the short name in order (the next one when a
    registry is down or lacks the image); stored as NAME, default the short name itself."""
    from shoal.errors import UsageError
    from shoal.format.platform import Platform
    from shoal.store import refuse_reserved
    from shoal.transports.docker import first_candidate, short_name_candidates, short_name_store_name

    cands = short_name_candidates(src, kw.get("registries_conf"))
    if cands is None:
        raise UsageError(f"pull takes a remote or layout reference, not the store image {src!r}")
    store_name = name or short_name_store_name(src, cands[0])
    refuse_reserved(store_name)
    common = _common(ctx, concurrency=concurrency, **kw)
    platform = platform or str(Platform.host())
    first_candidate(src, cands, lambda ref: _run_copy(ctx, str(ref), store_name, common, parse_creds(creds), None, (),
                                                      platform, concurrency, as_json, "pulled", carry, unpack))


@click.command()
@click.argument("ref")
@click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP)
@_registry_options
@click.pass_context
def delete(ctx: click.Context, /, ref: str, creds: str | None, **kw: Any) -> None:
    """Delete REF's manifest from its registry (every tag that points at it goes too, as with skopeo)."""
    from shoal.transports.base import parse_reference

    r = parse_reference(ref)
    opts = _common(ctx, **kw)
    if creds is not None:
        opts = opts.replace(credentials=parse_creds(creds))
    r.delete(opts)
    click.echo(f"deleted {r}")


def _host(text: str) -> str:
    from shoal.errors import UsageError

    h = text.strip()
    for prefix in ("docker://", "https://", "http://"):
        if h.startswith(prefix):
            h = h[len(prefix):]
    h = h.split("/", 1)[0]
    if not h:
        raise UsageError(f"invalid registry {text!r}")
    return h


@click.command()
@click.argument("registry")
@click.option("-u", "--username", default=None)
@click.option("-p", "--password", default=None, help="Password (prefer --password-stdin: argv is visible to others).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_registry_options
@click.pass_context
def login(ctx: click.Context, /, registry: str, username: str | None, password: str | None, password_stdin: bool,
          **kw: Any) -> None:
    """Check credentials against REGISTRY and save them in the auth file (docker/podman format)."""
    from shoal.errors import UsageError
    from shoal.transports.docker import make_client
    from shoal.transports.registry import Credentials, default_auth_file, store_credentials

    if password is not None:
        from shoal.mount.proctitle import scrub_argv

        scrub_argv(passwords=("--password", "-p"))
    host = _host(registry)
    opts = _common(ctx, **kw)
    if username is None:
        if not sys.stdin.isatty():
            raise UsageError("give --username (no terminal to ask on)")
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        if not sys.stdin.isatty():
            raise UsageError("give --password-stdin (no terminal to ask on)")
        password = click.prompt("Password", hide_input=True, err=True)
    with make_client(host, opts.replace(credentials=Credentials(username, password))) as client:
        client.ping()
    path = store_credentials(host, username, password, default_auth_file(opts.auth_file))
    click.echo(f"Login succeeded: credentials for {host} saved in {path}")


@click.command()
@click.argument("registry")
@click.option("--authfile", type=click.Path(dir_okay=False), default=None, envvar="REGISTRY_AUTH_FILE",
              help="Credentials file (default: where login writes).")
@click.pass_context
def logout(ctx: click.Context, registry: str, authfile: str | None) -> None:
    """Remove saved credentials for REGISTRY."""
    from shoal.errors import NotFound
    from shoal.transports.registry import erase_credentials

    host = _host(registry)
    if not erase_credentials(host, authfile):
        raise NotFound(f"not logged in to {host}")
    click.echo(f"Removed login credentials for {host}")
