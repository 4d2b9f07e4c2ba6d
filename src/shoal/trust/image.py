"""Signatures of images in registries, and the policy check of an image reference (docs/spec/trust.md).

- ``read_signatures``/``attach``: the cosign attachment at the ``sha256-<hex>.sig`` tag of the image's
  repository (containers/image's ``use-sigstore-attachments``), read and written through the ordinary
  transports; the manifest written carries ``subject``, so a registry with the OCI referrers API also
  lists it as a referrer of the signed manifest.
- ``admit``: the signature policy for the image a copy, pull, mount or run is about to use: refuses
  (``PolicyRefused``) before anything is tagged, mounted or run.  The signed digest may be the one the
  tag points at (what skopeo signs and checks: for a Shoal image, the image index [runtime view, Shoal
  manifest]) or the manifest chosen from it (the Shoal manifest): both are bound to the bytes used.
- ``sign_reference``/``verify_reference``: ``shoal sign`` and ``shoal verify``; ``sign_reference_gpg``:
  ``--sign-by`` (GPG simple signing into the registries.d lookaside, trust/lookaside.py), and
  ``carry_simple_signatures``: a copy's lookaside signatures, as skopeo copies them.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError, IntegrityError, NotFound, PolicyRefused, UsageError
from shoal.format.manifest import json_object
from shoal.transports.base import BlobInfo, ImageReference, ImageSource
from shoal.transports.context import SystemContext
from shoal.trust.cosign import (
    ANN_SIGNATURE,
    MAX_PAYLOAD,
    Signature,
    attachment_layers,
    attachment_manifest,
    attachment_tag,
    sign,
)
from shoal.trust.keys import PrivateKey, PublicKey
from shoal.trust.policy import DockerName, Identity, Verdict, evaluate, load_policy

__all__ = ["read_signatures", "attach", "admit", "Admission", "sign_reference", "verify_reference",
           "Verification", "signing_identity", "build_identity", "sign_stored", "sign_reference_gpg",
           "gpg_signing_check", "carry_simple_signatures"]

if TYPE_CHECKING:
    from shoal.store import Store
    from shoal.trust.lookaside import LookasideSignature
    from shoal.trust.policy import Requirement

log = logging.getLogger(__name__)

MAX_SIGNATURES = 64  # layers of one attachment manifest read


def _sha(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def read_signatures(ref: ImageReference, ctx: SystemContext, digest: str) -> list[Signature]:
    """Every layer of the attachment of ``digest`` in ``ref``'s repository (any media type: the
    policy looks at each); [] when there is none or the transport keeps no attachments."""
    sref = ref.sibling_tag(attachment_tag(digest))
    if sref is None:
        return []
    try:
        with sref.new_source(ctx) as src:
            raw, media = src.get_manifest()
            if media and media != mt.OCI_MANIFEST:
                raise FormatError(f"signature manifest {sref} has media type {media!r}, not an OCI manifest")
            out = []
            for ly in attachment_layers(raw)[:MAX_SIGNATURES]:
                size = int(ly["size"])
                if not 0 <= size <= MAX_PAYLOAD:
                    raise FormatError(f"signature payload {ly['digest']} of {sref} is too large")
                payload = _read(src, BlobInfo(str(ly["digest"]), size, str(ly.get("mediaType", ""))))
                ann = ly.get("annotations") if isinstance(ly.get("annotations"), dict) else {}
                ann = {str(k): str(v) for k, v in (ann or {}).items()}
                out.append(Signature(str(ly.get("mediaType", "")), payload, ann.get(ANN_SIGNATURE, ""), ann))
            return out
    except NotFound:
        return []


def _read(src: ImageSource, info: BlobInfo) -> bytes:
    stream, _ = src.get_blob(info)
    with stream:
        data = stream.read(info.size + 1)
    if len(data) != info.size or _sha(data) != info.digest:
        raise IntegrityError(f"signature payload {info.digest} does not match its descriptor")
    return data


def attach(ref: ImageReference, ctx: SystemContext, digest: str, size: int, media_type: str,
           sigs: list[Signature]) -> str:
    """Add ``sigs`` to the attachment of the manifest ``digest`` (kept: what is there already, other
    signers' included); returns the attachment's reference."""
    sref = ref.sibling_tag(attachment_tag(digest))
    if sref is None:
        raise UsageError(f"{ref}: signatures are attached to images in registries (docker://) only")
    have = read_signatures(ref, ctx, digest)
    keys = {s.layer_key() for s in have}
    merged = have + [s for s in sigs if s.layer_key() not in keys]
    raw, blobs = attachment_manifest(merged, {"mediaType": media_type, "digest": digest, "size": size})
    with sref.new_destination(ctx) as dst:
        for d, data in blobs.items():
            info = BlobInfo(d, len(data), "")
            if not dst.has_blob(info):
                dst.put_blob(io.BytesIO(data), info)
        dst.put_manifest(raw, mt.OCI_MANIFEST, None)
        dst.commit()
    return str(sref)


def _chosen(src: ImageSource, ref: ImageReference, top: bytes, top_media: str, platform: str | None) -> bytes | None:
    """The manifest a reader takes from the index ``top`` for ``platform``, verified; None when ``top``
    is a manifest itself."""
    from shoal.format.platform import choose
    from shoal.format.runtime_view import for_readers

    doc = json_object(top)
    if top_media not in mt.INDEX_TYPES and "manifests" not in doc:
        return None
    kid = choose(for_readers(doc.get("manifests")), platform, str(ref),
                 prefer=lambda m: m.get("artifactType") == mt.ARTIFACT_TYPE)
    raw, _ = src.get_manifest(str(kid["digest"]))
    if _sha(raw) != kid["digest"]:
        raise IntegrityError(f"manifest {kid['digest']} of {ref} does not match its digest")
    return raw


@dataclass(frozen=True)
class Admission:
    """Why the policy let an image in: the scope that applied, the digest it was decided on, the signer."""

    policy: str
    scope: str
    digest: str
    signer: str = ""
    requirements: tuple[str, ...] = ()


def admit(ref: ImageReference, ctx: SystemContext, top: bytes | None = None, chosen: bytes | None = None,
          src: ImageSource | None = None) -> Admission | None:
    """Apply the signature policy to the image ``ref`` names; None when ``ref`` is not subject to it (the
    store).  ``top``/``chosen``: the manifest bytes the caller already read and will use (the tag's
    manifest or index, the manifest chosen from it); without them they are read from ``src`` (or a new
    source) for ``ctx.platform``, and ``Admission.digest`` is the digest to open (the chosen manifest's,
    else the top's) so what is used is what was checked.  Refuses with PolicyRefused."""
    scope = ref.policy_scope()
    if scope is None:
        return None
    policy = load_policy(ctx.signature_policy)
    where, reqs = policy.requirements(scope.transport, scope.identity, list(scope.namespaces))
    names = tuple(r.type for r in reqs)
    if top is None and all(r.type == "insecureAcceptAnything" for r in reqs):
        return Admission(policy.origin, where, "", requirements=names)
    if top is None:
        own = src is None
        s = src if src is not None else ref.new_source(ctx)
        try:
            top, top_media = s.get_manifest()
            chosen = _chosen(s, ref, top, top_media, ctx.platform)
        finally:
            if own:
                s.close()
    image = DockerName.parse(scope.docker_name) if scope.docker_name else None
    digests = [_sha(top)]
    if chosen is not None and _sha(chosen) not in digests:
        digests.append(_sha(chosen))
    verdicts: list[tuple[str, Verdict]] = []
    for d in digests:
        v = evaluate(reqs, image, d, lambda d=d: read_signatures(ref, ctx, d),  # type: ignore[misc]
                     _simple_reader(ref, ctx, d))
        if v.accepted:
            log.info("%s admitted by %s (%s) on %s%s", ref, policy.origin, where, d,
                     f", signed by {v.signer}" if v.signer else "")
            return Admission(policy.origin, where, digests[-1], v.signer, names)
        verdicts.append((d, v))
    if len({v.reason for _, v in verdicts}) == 1:
        why = verdicts[0][1].reason
    else:
        why = "; ".join(f"{d[:19]}…: {v.reason}" for d, v in verdicts)
    raise PolicyRefused(f"{ref} refused by the signature policy {policy.origin} ({where}): {why}")


def _simple_reader(ref: ImageReference, ctx: SystemContext, digest: str
                   ) -> "Callable[[], list[LookasideSignature]] | None":
    """The reader of ``digest``'s simple signatures in the lookaside of registries.d (docker:// only)."""
    from shoal.trust.lookaside import keeps_lookaside, read_lookaside

    if not keeps_lookaside(ref):
        return None
    return lambda: read_lookaside(ref, ctx, digest)


def signing_identity(ref: ImageReference, identity: str | None) -> str:
    """The docker-reference a signature of ``ref`` names: ``identity`` if given (normalized), else
    ``ref``'s own ``HOST/REPO:TAG`` (skopeo's default: the destination reference)."""
    if identity:
        return str(DockerName.parse(identity))
    scope = ref.policy_scope()
    if scope is None or not scope.docker_name:
        raise UsageError(f"{ref}: give --sign-identity HOST/REPO:TAG (only docker:// references name one)")
    name = DockerName.parse(scope.docker_name)
    if name.digest is not None:
        raise UsageError(f"{ref}: give --sign-identity HOST/REPO:TAG to sign an image named by digest")
    return str(name)


@dataclass
class Signed:
    digest: str
    attachment: str
    identity: str


def sign_reference(ref: ImageReference, ctx: SystemContext, key: PrivateKey, identity: str | None = None,
                   children: bool = True) -> list[Signed]:
    """Sign the manifest ``ref`` points at (what skopeo and podman check) and, when that is an image index,
    every manifest it lists: ``skopeo copy --all`` checks the policy on each of them (for a Shoal image:
    the runtime view and the Shoal manifest), and ``shoal pull REPO@<Shoal digest>`` finds one too."""
    ident = signing_identity(ref, identity)
    out = []
    for d, size, m in _targets(ref, ctx, children):
        where = attach(ref, ctx, d, size, m, [sign(key, d, ident)])
        out.append(Signed(d, where, ident))
    return out


def _targets(ref: ImageReference, ctx: SystemContext, children: bool) -> list[tuple[str, int, str]]:
    """(digest, size, media type) of the manifest ``ref`` points at and, with ``children`` when it is an
    index, of each manifest it lists."""
    with ref.new_source(ctx) as src:
        top, media = src.get_manifest()
        media = media or str(json_object(top).get("mediaType") or mt.OCI_MANIFEST)
        targets = [(_sha(top), len(top), media)]
        if children and (media in mt.INDEX_TYPES or "manifests" in json_object(top)):
            for e in json_object(top).get("manifests") or []:
                if isinstance(e, dict) and isinstance(e.get("digest"), str):
                    targets.append((dg.validate(e["digest"]), int(e.get("size", 0)),
                                    str(e.get("mediaType", mt.OCI_MANIFEST))))
    return targets


def carry_simple_signatures(src: ImageReference, src_ctx: SystemContext, dst: ImageReference,
                            dst_ctx: SystemContext, digest: str) -> int:
    """After a copy of the manifest ``digest`` from ``src`` to ``dst`` (both docker://), the simple signatures
    of the source's lookaside (§2.1) to the destination's staging location, as skopeo copies them: of
    ``digest`` and, when it is an index, of each manifest it lists.  Returns the files written (0 when
    the source has none of ``digest``: nothing else is asked then).  A destination Shoal cannot write
    (http(s)) fails the copy, as skopeo's."""
    from shoal.trust.lookaside import keeps_lookaside, read_lookaside, write_lookaside

    if not (keeps_lookaside(src) and keeps_lookaside(dst)):
        return 0
    top = [s.data for s in read_lookaside(src, src_ctx, digest) if not s.problem]
    if not top:
        return 0
    n = 0
    for d, _, _ in _targets(dst.pinned(digest), dst_ctx, children=True):
        blobs = top if d == digest else [s.data for s in read_lookaside(src, src_ctx, d) if not s.problem]
        if blobs:
            n += len(write_lookaside(dst, dst_ctx, d, blobs))
    return n


def gpg_signing_check(ref: ImageReference, ctx: SystemContext, fingerprint: str, identity: str | None) -> str:
    """Before anything moves (``push``/``copy --sign-by``): the identity, a secret key ``fingerprint`` in the
    user's GPG keyring, and a writable lookaside for ``ref``; returns the identity."""
    from shoal.trust.gpg import check_secret_key
    from shoal.trust.lookaside import writable_base

    ident = signing_identity(ref, identity)
    writable_base(ref, ctx)
    check_secret_key(fingerprint)
    return ident


def sign_reference_gpg(ref: ImageReference, ctx: SystemContext, fingerprint: str, identity: str | None = None,
                       passphrase_file: str | None = None, children: bool = True) -> list[Signed]:
    """``sign_reference`` with GPG simple signing (skopeo's ``--sign-by``): the same manifests, each signed
    by the secret key ``fingerprint`` of the user's keyring (``$GNUPGHOME``) and written to the lookaside
    staging storage registries.d names for ``ref`` (docs/spec/trust.md §2.1)."""
    from shoal.trust.gpg import gpg_sign, make_simple_payload
    from shoal.trust.lookaside import write_lookaside

    ident = gpg_signing_check(ref, ctx, fingerprint, identity)
    out = []
    for d, _, _ in _targets(ref, ctx, children):
        blob = gpg_sign(make_simple_payload(d, ident), fingerprint, passphrase_file)
        urls = write_lookaside(ref, ctx, d, [blob])
        out.append(Signed(d, urls[0], ident))
    return out


def build_identity(name: str, identity: str | None) -> str:
    """The docker-reference a build-time signature of the store image ``name`` names: ``identity``, else
    ``name`` itself when it is a full registry name (``HOST/REPO:TAG``).  A policy's default
    ``matchRepoDigestOrExact`` compares it with the name the image is pulled by, so a bare ``app:1`` is
    refused: it would name ``docker.io/library/app:1``."""
    if identity:
        return str(DockerName.parse(identity))
    first, slash, _ = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return str(DockerName.parse(name))
    raise UsageError(f"{name}: give --sign-identity HOST/REPO:TAG, the registry name the image will be pulled "
                     "by (a policy matches the signed identity against it)")


def sign_stored(store: "Store", name: str, key: PrivateKey, identity: str) -> list[Signed]:
    """Sign the store image ``name`` (a Shoal manifest) as a push will present it: the image index [runtime
    view, Shoal manifest] a registry is given (oci-mapping.md §4.1, byte-reproducible from the manifest and
    its config), the view, and the Shoal manifest — what ``shoal sign`` signs after a push.  Each signature
    is an attachment manifest with ``subject`` listed untagged in the store's index.json (store.md §5); a
    push carries it to the ``sha256-<hex>.sig`` tag (trust.md §6)."""
    from shoal.format.runtime_view import registry_index
    from shoal.transports.base import Referrer

    desc = store.layout.refs().get(name)
    if desc is None:
        raise NotFound(f"no image {name} in the store")
    digest = str(desc["digest"])
    if not store.is_shoal(digest):
        raise UsageError(f"{name} is not a Shoal image (build-time signing signs what shoal build made)")
    m = store.manifest(digest)
    raw = store.layout.get(digest)
    index, view = registry_index(raw, store.layout.get(m.config.digest))
    targets = [(_sha(index), len(index), mt.OCI_INDEX), (view.digest, len(view.manifest), mt.OCI_MANIFEST),
               (digest, len(raw), mt.OCI_MANIFEST)]
    out = []
    with store.layout.writing():  # gc waits: the blobs must be listed before it looks
        for d, size, media in targets:
            man, blobs = attachment_manifest([sign(key, d, identity)], {"mediaType": media, "digest": d, "size": size})
            for bd, data in blobs.items():
                if not store.layout.has(bd):
                    store.layout.put(data, expected=bd)
            ref = Referrer(d, man, mt.OCI_MANIFEST, "signature")
            store.layout.put(man, expected=ref.digest)
            store.layout.add_referrer(ref.descriptor())
            out.append(Signed(d, f"{name} (store referrer {ref.digest})", identity))
    return out


def _any_of(reqs: "tuple[Requirement, ...]", image: DockerName | None, digest: str,
            signatures: "Callable[[], list[Signature]]",
            simple: "Callable[[], list[LookasideSignature]] | None") -> Verdict:
    """The first requirement of ``reqs`` that accepts ``digest`` (``shoal verify`` with keys of both kinds:
    any of them), else the refusals."""
    why = []
    for r in reqs:
        v = evaluate((r,), image, digest, signatures, simple)
        if v.accepted:
            return v
        why.append(v.reason)
    return Verdict(False, "; ".join(why))


@dataclass
class Verification:
    reference: str
    digest: str  # the digest whose signature verified
    identity: str  # the docker-reference in the signed payload
    signer: str
    shoal_manifest: str = ""
    root: str = ""
    deep: bool = False
    files: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    frames: int = 0
    checks: list[str] = field(default_factory=list)


def verify_reference(ref: ImageReference, ctx: SystemContext, keys: list[PublicKey], deep: bool = False,
                     identity: Identity | None = None, gpg_keys: tuple[bytes, ...] = ()) -> Verification:
    """``shoal verify``: a signature by one of ``keys`` (cosign, the ``.sig`` attachment) or of ``gpg_keys``
    (OpenPGP public keys: a simple signature in the lookaside) over the tag's manifest (or the manifest
    chosen from it), whose identity is in ``ref``'s repository (``identity``: another rule); with ``deep``,
    the Shoal index against the signed manifest and every chunk against the index (docs/spec/trust.md §3)."""
    from shoal.transports.resolve import SourceFrames, resolve_image

    scope = ref.policy_scope()
    image = DockerName.parse(scope.docker_name) if scope is not None and scope.docker_name else None
    rule = identity or Identity("matchRepository")
    from shoal.trust.policy import Requirement

    reqs = tuple(([Requirement("sigstoreSigned", tuple(keys), rule)] if keys else [])
                 + ([Requirement("signedBy", (), rule, gpg_keys, "GPGKeys")] if gpg_keys else []))
    if not reqs:
        raise UsageError("give a key to verify with (--key, --gpg-key)")
    with ref.new_source(ctx) as src:
        res = resolve_image(src, ref, ctx.platform, with_index=deep)
        digests = [res.top_digest] + ([res.digest] if res.digest != res.top_digest else [])
        why = []
        for d in digests:
            v = _any_of(reqs, image, d, lambda d=d: read_signatures(ref, ctx, d),  # type: ignore[misc]
                        _simple_reader(ref, ctx, d))
            if v.accepted:
                break
            why.append(v.reason)
        else:
            raise PolicyRefused(f"{ref}: no valid signature: {why[0] if len(set(why)) == 1 else '; '.join(why)}")
        out = Verification(str(ref), d, v.payload_reference, v.signer)
        out.checks.append(f"signature by {v.signer} over {d} (identity {v.payload_reference})")
        if d != res.digest:
            out.checks.append(f"the signed index {d} lists the manifest {res.digest}, read and checked by its digest")
        if res.manifest is None:
            if deep:
                raise UsageError(f"{ref} is a classic image: --deep checks Shoal images")
            return out
        out.shoal_manifest, out.root = res.manifest.digest, res.manifest.root
        if not deep:
            return out
        assert res.index is not None
        idx = res.index
        out.checks.append(f"index blob {res.manifest.index.digest} matches the signed manifest's descriptor; "
                          f"its Merkle tree recomputed to the root {res.manifest.root} the manifest names")
        from shoal.format.model import Kind
        from shoal.reader import Reader

        reader = Reader(idx, SourceFrames(src))
        seen: set[int] = set()
        for ci in range(len(idx.chunk_ids)):
            out.chunk_bytes += len(reader.chunk(ci))  # IntegrityError on the first chunk that differs
            seen.add(idx.chunk_frames[ci])
        out.chunks, out.frames, out.deep = len(idx.chunk_ids), len(seen), True
        out.files = sum(1 for e in idx.entries if e.kind == Kind.FILE)
        out.checks.append(f"{out.chunks} chunks ({out.chunk_bytes} bytes) in {out.frames} frames read and "
                          "each hashed to its id in the index")
        return out

