"""shoal key generate / sign / verify (docs/spec/trust.md)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from shoal.cli.common import CREDS_HELP, emit_json, parse_creds, platform_option, registry_options, registry_opts

_PASS_HELP = ("File whose first line is the key's passphrase (else $COSIGN_PASSWORD, else a prompt on a "
              "terminal).")


def passphrase(path: str | None, confirm: bool = False) -> bytes:
    """The private key's passphrase: ``--passphrase-file``, else ``$COSIGN_PASSWORD`` (as cosign), else a
    prompt on a terminal."""
    from shoal.errors import UsageError

    if path:
        with open(path, "rb") as f:
            return f.read(1 << 16).split(b"\n", 1)[0].rstrip(b"\r")
    env = os.environ.get("COSIGN_PASSWORD")
    if env is not None:
        return env.encode()
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: give --passphrase-file FILE or set COSIGN_PASSWORD")
    return str(click.prompt("Passphrase for the private key", hide_input=True, err=True,
                            confirmation_prompt=confirm, default="", show_default=False)).encode()


def load_signing_key(path: str, passphrase_file: str | None) -> Any:
    from shoal.trust.keys import load_private_key

    with open(path, "rb") as f:
        data = f.read(1 << 16)
    return load_private_key(data, passphrase(passphrase_file), path)


@click.group()
def key() -> None:
    """Sigstore/cosign key pairs."""


@key.command()
@click.option("--output", "-o", default="cosign.key", show_default=True, type=click.Path(dir_okay=False),
              help="Private key file; the public key goes next to it with .pub (cosign.key -> cosign.pub).")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False), default=None, help=_PASS_HELP)
@click.option("--force", is_flag=True, help="Replace existing key files.")
def generate(output: str, passphrase_file: str | None, force: bool) -> None:
    """Generate an ECDSA P-256 key pair in cosign's format (encrypted private key, PEM public key)."""
    from shoal.atomicfile import Durability, write_atomic
    from shoal.errors import UsageError
    from shoal.trust.keys import encrypt_private_key
    from shoal.trust.keys import generate as new_key

    pub = (output[:-4] if output.endswith(".key") else output) + ".pub"
    for p in (output, pub):
        if os.path.exists(p) and not force:
            raise UsageError(f"{p} exists (give --force to replace it)")
    k = new_key()
    pem = encrypt_private_key(k, passphrase(passphrase_file, confirm=True))
    write_atomic(output, pem, durability=Durability.FULL, mode=0o600)
    write_atomic(pub, k.public().pem(), durability=Durability.FULL, mode=0o644)
    click.echo(f"Private key written to {output}\nPublic key written to {pub}")


@click.command()
@click.argument("ref")
@click.option("--key", "key_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="cosign private key file (shoal key generate, cosign generate-key-pair).")
@click.option("--sign-by", default=None, metavar="FINGERPRINT",
              help="Sign with this GPG key of the keyring ($GNUPGHOME) instead: simple signing, written to the "
                   "lookaside storage registries.d names (as skopeo copy --sign-by).")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help=_PASS_HELP + " With --sign-by: the GPG key's passphrase (else gpg-agent asks).")
@click.option("--sign-identity", default=None, metavar="HOST/REPO:TAG",
              help="The identity the signature names (default: REF itself, as skopeo).")
@click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@registry_options
@click.pass_context
def sign(ctx: click.Context, /, ref: str, key_path: str | None, sign_by: str | None, passphrase_file: str | None,
         sign_identity: str | None, creds: str | None, as_json: bool, **kw: Any) -> None:
    """Sign the manifest REF (docker://) points at, and each manifest its index lists: with --key, cosign
    signatures to the sha256-<hex>.sig tags (with an OCI subject: referrers); with --sign-by, GPG simple
    signatures to the lookaside storage of registries.d (signature-N files)."""
    from shoal.errors import UsageError
    from shoal.transports.base import parse_reference
    from shoal.trust.image import sign_reference, sign_reference_gpg

    if (key_path is None) == (sign_by is None):
        raise UsageError("give one of --key KEY (cosign) and --sign-by FINGERPRINT (GPG)")
    r = parse_reference(ref)
    sc = registry_opts(ctx, **kw)
    if creds is not None:
        sc = sc.replace(credentials=parse_creds(creds))
    if sign_by is not None:
        done = sign_reference_gpg(r, sc, sign_by, sign_identity, passphrase_file)
    else:
        assert key_path is not None
        done = sign_reference(r, sc, load_signing_key(key_path, passphrase_file), sign_identity)
    if as_json:
        emit_json({"reference": str(r), "signatures": [
            {"digest": s.digest, "attachment": s.attachment, "identity": s.identity} for s in done]})
        return
    for s in done:
        click.echo(f"signed {s.digest} as {s.identity} -> {s.attachment}")


@click.command()
@click.argument("ref")
@click.option("--key", "key_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="PEM public key: a cosign signature (repeatable: any of them).")
@click.option("--gpg-key", "gpg_key_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="OpenPGP public key (gpg --export, binary or armored): a GPG simple signature in the lookaside "
                   "of registries.d (repeatable: any of them; with --key: a signature of either kind).")
@click.option("--deep", is_flag=True, help="Also check the index against the signed manifest and every chunk "
                                           "against the index (reads the whole image).")
@click.option("--signed-repository", default=None, metavar="HOST/REPO",
              help="Accept signatures naming this repository (policy exactRepository), e.g. those of an image "
                   "copied from there (default: REF's own repository).")
@click.option("--creds", default=None, metavar="USER[:PASS]", help=CREDS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@platform_option("Image of an image index to check (default: this machine's platform).")
@registry_options
@click.pass_context
def verify(ctx: click.Context, /, ref: str, key_paths: tuple[str, ...], gpg_key_paths: tuple[str, ...], deep: bool,
           signed_repository: str | None, creds: str | None, as_json: bool, platform: str | None, **kw: Any) -> None:
    """Check REF's cosign signature (--key) or GPG simple signature (--gpg-key); --deep proves every chunk
    against the signed root."""
    from shoal.transports.base import parse_reference
    from shoal.trust.image import verify_reference
    from shoal.trust.keys import load_public_key

    r = parse_reference(ref)
    sc = registry_opts(ctx, platform=platform, **kw)
    if creds is not None:
        sc = sc.replace(credentials=parse_creds(creds))
    from shoal.errors import UsageError

    if not key_paths and not gpg_key_paths:
        raise UsageError("give --key PUBLIC_KEY (cosign) or --gpg-key FILE (GPG simple signing)")
    keys = []
    for p in key_paths:
        with open(p, "rb") as f:
            keys.append(load_public_key(f.read(1 << 16), p))
    gpg_keys = []
    for p in gpg_key_paths:
        from shoal.errors import FormatError
        from shoal.trust.gpg import Keyring

        with open(p, "rb") as f:
            gpg_keys.append(f.read(1 << 20))
        with Keyring((gpg_keys[-1],)) as ring:
            if not ring.fingerprints:
                raise FormatError(f"{p}: not an OpenPGP public key (gpg imports none from it)")
    from shoal.trust.policy import Identity

    rule = Identity("exactRepository", signed_repository) if signed_repository else None
    v = verify_reference(r, sc, keys, deep, rule, tuple(gpg_keys))
    if as_json:
        emit_json({"reference": v.reference, "digest": v.digest, "identity": v.identity, "signer": v.signer,
                   "shoal_manifest": v.shoal_manifest, "root": v.root, "deep": v.deep, "files": v.files,
                   "chunks": v.chunks, "chunk_bytes": v.chunk_bytes, "frames": v.frames, "checks": v.checks})
        return
    click.echo(f"verified {v.reference}")
    for c in v.checks:
        click.echo(f"  {c}")
