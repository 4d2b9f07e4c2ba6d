"""Cosign's key-based signature format (docs/spec/trust.md §2): the simple-signing payload, the
signature layer, and the attachment manifest at the ``sha256-<hex>.sig`` tag.

Pure functions on bytes; reading and writing registries is ``shoal.trust.attach``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from shoal import digest as dg
from shoal import mediatypes as mt
from shoal.errors import FormatError
from shoal.format.manifest import canonical_json, json_object
from shoal.trust.keys import PrivateKey, PublicKey

__all__ = ["SIG_MEDIA_TYPE", "ANN_SIGNATURE", "ANN_BUNDLE", "ARTIFACT_TYPE", "PAYLOAD_TYPE", "Signature",
           "Payload", "make_payload", "parse_payload", "sign", "attachment_tag", "attachment_manifest",
           "attachment_layers", "MAX_PAYLOAD"]

SIG_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
ANN_BUNDLE = "dev.sigstore.cosign/bundle"  # a Rekor bundle (keyless/transparency log): not used by key-based
ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"  # cosign's OCI 1.1 referrer artifact type
PAYLOAD_TYPE = "cosign container image signature"
MAX_PAYLOAD = 4 << 20  # bytes of one payload (containers/image: 4 MiB for signatures)
CREATOR = "shoal"


@dataclass(frozen=True)
class Signature:
    """One signature as found: the layer's media type, the payload bytes, the base64 signature."""

    media_type: str
    payload: bytes
    signature_b64: str
    annotations: dict[str, str] = field(default_factory=dict)

    def layer_key(self) -> tuple[str, str]:
        return ("sha256:" + hashlib.sha256(self.payload).hexdigest(), self.signature_b64)


@dataclass(frozen=True)
class Payload:
    """The parsed critical part of a simple-signing payload."""

    digest: str  # critical.image.docker-manifest-digest
    reference: str  # critical.identity.docker-reference
    creator: str | None = None
    timestamp: int | None = None


def make_payload(manifest_digest: str, docker_reference: str, timestamp: int | None = None) -> bytes:
    """The payload containers/image writes: ``critical`` (type, image digest, identity) and ``optional``
    (creator, timestamp).  Its bytes are what is signed, so they are kept as written, never re-encoded."""
    dg.validate(manifest_digest)
    doc = {"critical": {"identity": {"docker-reference": docker_reference},
                        "image": {"docker-manifest-digest": manifest_digest}, "type": PAYLOAD_TYPE},
           "optional": {"creator": CREATOR, "timestamp": int(time.time()) if timestamp is None else timestamp}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _exact(obj: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"signature payload: {where} is not an object")
    if set(obj) != keys:
        raise FormatError(f"signature payload: {where} has fields {sorted(obj)}, want exactly {sorted(keys)}")
    return obj


def parse_payload(raw: bytes, payload_type: str = PAYLOAD_TYPE, optional_null: bool = True) -> Payload:
    """Parse a payload as strictly as containers/image (exact fields in ``critical``, whose ``type`` is
    ``payload_type``; ``optional`` an object whose ``timestamp`` is an integer, or null where
    ``optional_null``: cosign's, not simple signing's).  Call only after the signature over ``raw`` verified."""
    if len(raw) > MAX_PAYLOAD:
        raise FormatError("signature payload larger than 4 MiB")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"signature payload is not JSON ({exc})") from None
    except RecursionError:  # the C decoder's answer to "[[[[..."
        raise FormatError("signature payload is not JSON (nested too deeply)") from None
    top = _exact(doc, {"critical", "optional"}, "the payload")
    crit = _exact(top["critical"], {"type", "image", "identity"}, "critical")
    if crit["type"] != payload_type:
        raise FormatError(f"signature payload: unrecognized signature type {str(crit['type'])[:80]!r}")
    image = _exact(crit["image"], {"docker-manifest-digest"}, "critical.image")
    ident = _exact(crit["identity"], {"docker-reference"}, "critical.identity")
    digest, ref = image["docker-manifest-digest"], ident["docker-reference"]
    if not isinstance(digest, str) or not isinstance(ref, str):
        raise FormatError("signature payload: digest and reference must be strings")
    dg.validate(digest)
    creator: str | None = None
    ts: int | None = None
    opt = top["optional"]
    if opt is not None or not optional_null:
        if not isinstance(opt, dict):
            raise FormatError("signature payload: optional is neither null nor an object")
        if "creator" in opt:
            if not isinstance(opt["creator"], str):
                raise FormatError("signature payload: optional.creator is not a string")
            creator = opt["creator"]
        if "timestamp" in opt:
            t = opt["timestamp"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or int(t) != t:
                raise FormatError("signature payload: optional.timestamp is not an integer")
            ts = int(t)
    return Payload(digest, ref, creator, ts)


def sign(key: PrivateKey, manifest_digest: str, docker_reference: str) -> Signature:
    """A signature of ``manifest_digest`` for the identity ``docker_reference``."""
    payload = make_payload(manifest_digest, docker_reference)
    sig = base64.b64encode(key.sign(payload)).decode()
    return Signature(SIG_MEDIA_TYPE, payload, sig, {ANN_SIGNATURE: sig})


def verify(key: PublicKey, sig: Signature) -> bool:
    """True when ``sig``'s base64 signature is ``key``'s over the payload bytes."""
    try:
        raw = base64.b64decode(sig.signature_b64, validate=True)
    except ValueError:
        return False
    return key.verify(raw, sig.payload)


def attachment_tag(digest: str) -> str:
    """``sha256-<hex>.sig``: where cosign and containers/image keep the signatures of ``digest``."""
    return dg.validate(digest).replace(":", "-", 1) + ".sig"


def attachment_manifest(sigs: list[Signature], subject: dict[str, Any] | None) -> tuple[bytes, dict[str, bytes]]:
    """The attachment manifest holding ``sigs`` as layers (one payload blob each) and its blobs (config and
    payloads, by digest).  The config is an OCI image config whose ``rootfs.diff_ids`` are the payloads'
    digests, as containers/image writes it; ``subject`` (the signed manifest's descriptor) makes the
    manifest an OCI 1.1 referrer of it as well."""
    blobs: dict[str, bytes] = {}
    layers = []
    for s in sigs:
        d = "sha256:" + hashlib.sha256(s.payload).hexdigest()
        blobs[d] = s.payload
        layers.append({"mediaType": s.media_type, "digest": d, "size": len(s.payload),
                       "annotations": dict(s.annotations) | {ANN_SIGNATURE: s.signature_b64}})
    config = canonical_json({"architecture": "", "os": "", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [ly["digest"] for ly in layers]}})
    cd = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs[cd] = config
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                           "config": {"mediaType": mt.OCI_CONFIG, "digest": cd, "size": len(config)},
                           "layers": layers}
    if subject is not None:
        doc["subject"] = subject
    return canonical_json(doc), blobs


def attachment_layers(raw: bytes) -> list[dict[str, Any]]:
    """The layer descriptors of an attachment manifest (any media type: the caller looks at each)."""
    doc = json_object(raw, "signature manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError("signature manifest has no layers list")
    out = []
    for ly in layers:
        if not isinstance(ly, dict) or not isinstance(ly.get("digest"), str) or not isinstance(ly.get("size"), int):
            raise FormatError("signature manifest has a malformed layer")
        out.append(ly)
    return out
