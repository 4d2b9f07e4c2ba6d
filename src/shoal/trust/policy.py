"""containers-policy.json(5): parse, find the requirements for an image, evaluate them
(docs/spec/trust.md §4).

- Scopes: ``transports`` -> transport name -> scope -> requirements; for ``docker`` the scope is the
  most specific of ``HOST/REPO:TAG`` (or ``@DIGEST``), ``HOST/REPO``, each parent namespace, ``HOST``,
  ``*.DOMAIN`` wildcards (subdomains stripped from the left), then the transport's ``""``, then the
  top-level ``default`` (required).  Every requirement of the list must accept the image.
- Requirements: ``insecureAcceptAnything``, ``reject``, ``sigstoreSigned`` (``keyPath``, ``keyPaths`` or
  ``keyData``; ``signedIdentity``), ``signedBy`` (GPG simple signing, ``keyType: GPGKeys`` with
  ``keyPath``, ``keyPaths`` or ``keyData``; ``signedIdentity``; the signatures are the lookaside's of
  registries.d, verified by gpg in a temporary GNUPGHOME holding only the policy's keys: trust/gpg.py).
  Fulcio/Rekor fields are refused when the policy is loaded.
- ``signedIdentity``: ``matchExact``, ``matchRepoDigestOrExact`` (the default), ``matchRepository``,
  ``exactReference``, ``exactRepository``, ``remapIdentity``, as containers/image matches them.

Unknown fields and types are errors, as in containers/image: a policy Shoal cannot read never
silently accepts.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from shoal.errors import FormatError, PolicyRefused
from shoal.trust.cosign import ANN_SIGNATURE, SIG_MEDIA_TYPE, Payload, Signature, parse_payload, verify
from shoal.trust.keys import PublicKey, load_public_key

if TYPE_CHECKING:
    from shoal.trust.lookaside import LookasideSignature

__all__ = ["Policy", "Requirement", "Identity", "DockerName", "load_policy", "default_policy_path",
           "parse_policy", "evaluate", "ENV_POLICY"]

ENV_POLICY = "SHOAL_SIGNATURE_POLICY"
SYSTEM_POLICY = "/etc/containers/policy.json"
GPG_KEY_TYPES = ("GPGKeys", "signedByGPGKeys", "X509Certificates", "signedByX509CAs")  # only GPGKeys is implemented
_IDENTITY_TYPES = ("matchExact", "matchRepoDigestOrExact", "matchRepository", "exactReference",
                   "exactRepository", "remapIdentity")


@dataclass(frozen=True)
class DockerName:
    """A normalized docker reference: ``name`` is ``HOST/REPO``; at most one of tag and digest."""

    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else "")

    @classmethod
    def parse(cls, text: str) -> "DockerName":
        """Normalize as containers/image's ParseNormalizedNamed (``busybox`` is ``docker.io/library/busybox``)."""
        from shoal.transports.docker import parse_docker

        r = parse_docker("//" + text)
        tagged = "@" not in text and ":" in text.rsplit("/", 1)[-1]
        return cls(f"{r.host}/{r.repo}", r.tag if tagged else None, r.digest)  # no tag given: none implied


@dataclass(frozen=True)
class Identity:
    """``signedIdentity``: how the signature's docker-reference must relate to the image's."""

    type: str = "matchRepoDigestOrExact"
    reference: str = ""  # exactReference: dockerReference; exactRepository: dockerRepository
    prefix: str = ""  # remapIdentity
    signed_prefix: str = ""

    def matches(self, image: DockerName | None, signed: str) -> bool:
        try:
            s = DockerName.parse(signed)
        except Exception:  # noqa: BLE001 - an unparsable identity in a signature matches nothing
            return False
        if self.type == "exactReference":
            return str(s) == str(DockerName.parse(self.reference))
        if self.type == "exactRepository":
            return s.name == DockerName.parse(self.reference).name
        if image is None:  # not a docker image: only the exact* types can match
            return False
        if self.type == "matchRepository":
            return s.name == image.name
        if self.type == "matchExact":
            return image.digest is None and image.tag is not None and str(s) == str(image)
        if self.type == "remapIdentity":
            image = _remap(image, self.prefix, self.signed_prefix)
        if image.digest is not None:  # matchRepoDigestOrExact
            return s.name == image.name
        return str(s) == str(image)


def _remap(image: DockerName, prefix: str, signed_prefix: str) -> DockerName:
    text = str(image)
    if text == prefix or text.startswith(prefix + "/") or text.startswith(prefix) and prefix.endswith("/") \
            or (text.startswith(prefix) and text[len(prefix):len(prefix) + 1] in (":", "@")):
        return DockerName.parse(signed_prefix + text[len(prefix):])
    return image


@dataclass(frozen=True)
class Requirement:
    type: str
    keys: tuple[PublicKey, ...] = ()
    identity: Identity = field(default_factory=Identity)
    gpg_keys: tuple[bytes, ...] = ()  # signedBy: the OpenPGP public key data (keyPath(s) read, keyData decoded)
    key_type: str = ""  # signedBy: keyType

    def describe(self) -> str:
        return self.type


@dataclass(frozen=True)
class Policy:
    default: tuple[Requirement, ...]
    transports: dict[str, dict[str, tuple[Requirement, ...]]]
    origin: str = ""

    def requirements(self, transport: str, identity: str, namespaces: list[str]) -> tuple[str, tuple[Requirement, ...]]:
        """(the scope that applies, its requirements) for an image of ``transport`` named ``identity``."""
        scopes = self.transports.get(transport, {})
        for scope in [identity, *namespaces]:
            if scope in scopes:
                return f'transports.{transport}."{scope}"', scopes[scope]
        if "" in scopes:
            return f'transports.{transport}.""', scopes[""]
        return "default", self.default


def default_policy_path(explicit: str | None = None) -> str:
    """``explicit`` (--signature-policy), else ``$SHOAL_SIGNATURE_POLICY``, else
    ``~/.config/containers/policy.json`` when it exists, else ``/etc/containers/policy.json``."""
    if explicit:
        return explicit
    env = os.environ.get(ENV_POLICY)
    if env:
        return env
    user = os.path.join(os.path.expanduser("~"), ".config", "containers", "policy.json")
    return user if os.path.exists(user) else SYSTEM_POLICY


def load_policy(path: str | None = None) -> Policy:
    """The policy at ``default_policy_path(path)``; a missing file refuses (as podman and skopeo do)."""
    p = default_policy_path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(4 << 20)
    except FileNotFoundError:
        raise PolicyRefused(f"no signature policy: {p} does not exist (give --signature-policy FILE; "
                            "containers-policy.json(5))") from None
    except OSError as exc:
        raise PolicyRefused(f"cannot read the signature policy {p}: {exc.strerror or exc}") from None
    return parse_policy(data, p)


def parse_policy(data: bytes, origin: str = "policy.json") -> Policy:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"{origin}: not JSON ({exc})") from None
    _fields(doc, {"default", "transports"}, origin)
    if "default" not in doc:
        raise FormatError(f'{origin}: the "default" requirements are missing')
    base = os.path.dirname(os.path.abspath(origin))
    default = _reqs(doc["default"], f"{origin}: default", base)
    transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
    tr = doc.get("transports") or {}
    if not isinstance(tr, dict):
        raise FormatError(f"{origin}: transports is not an object")
    for name, scopes in tr.items():
        if not isinstance(scopes, dict):
            raise FormatError(f"{origin}: transports.{name} is not an object")
        transports[name] = {s: _reqs(r, f"{origin}: transports.{name}.{s!r}", base) for s, r in scopes.items()}
    return Policy(default, transports, origin)


def _fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: not a JSON object")
    extra = sorted(set(obj) - allowed)
    if extra:
        raise FormatError(f"{where}: unknown field {extra[0]!r}")
    return obj


def _reqs(v: Any, where: str, base: str) -> tuple[Requirement, ...]:
    if not isinstance(v, list) or not v:
        raise FormatError(f"{where}: want a non-empty list of requirements")
    return tuple(_req(r, where, base) for r in v)


def _req(r: Any, where: str, base: str) -> Requirement:
    if not isinstance(r, dict) or not isinstance(r.get("type"), str):
        raise FormatError(f"{where}: a requirement without a type")
    t = r["type"]
    if t in ("insecureAcceptAnything", "reject"):
        _fields(r, {"type"}, f"{where} {t}")
        return Requirement(t)
    if t == "signedBy":
        _fields(r, {"type", "keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"}, f"{where} signedBy")
        if r.get("keyType") not in GPG_KEY_TYPES:
            raise FormatError(f"{where}: signedBy needs a keyType of {', '.join(GPG_KEY_TYPES)}")
        gpg_keys = tuple(d for d, _ in _key_data(r, where, base, t))
        return Requirement(t, (), _identity(r.get("signedIdentity"), where), gpg_keys, str(r["keyType"]))
    if t == "sigstoreSigned":
        _fields(r, {"type", "keyPath", "keyPaths", "keyData", "fulcio", "rekorPublicKeyPath",
                    "rekorPublicKeyData", "signedIdentity"}, f"{where} sigstoreSigned")
        for unsupported in ("fulcio", "rekorPublicKeyPath", "rekorPublicKeyData"):
            if unsupported in r:
                raise FormatError(f"{where}: sigstoreSigned {unsupported} is not supported (key-based only)")
        keys = [load_public_key(data, origin) for data, origin in _key_data(r, where, base, t)]
        return Requirement(t, tuple(keys), _identity(r.get("signedIdentity"), where))
    raise FormatError(f"{where}: unknown requirement type {t!r}")


def _key_data(r: dict[str, Any], where: str, base: str, t: str) -> list[tuple[bytes, str]]:
    """(the key bytes, where they came from) of exactly one of ``keyPath``, ``keyPaths``, ``keyData``
    (relative paths: from the policy file's directory)."""
    given = [k for k in ("keyPath", "keyPaths", "keyData") if k in r]
    if len(given) != 1:
        raise FormatError(f"{where}: {t} needs exactly one of keyPath, keyPaths, keyData")
    out: list[tuple[bytes, str]] = []
    if "keyData" in r:
        try:
            out.append((base64.b64decode(str(r["keyData"]), validate=True), f"{where} keyData"))
        except ValueError:
            raise FormatError(f"{where}: keyData is not base64") from None
    else:
        paths = [r["keyPath"]] if "keyPath" in r else r["keyPaths"]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise FormatError(f"{where}: keyPath(s) must be file names")
        for p in paths:
            full = os.path.join(base, p)
            try:
                with open(full, "rb") as f:
                    out.append((f.read(1 << 20), full))
            except OSError as exc:
                raise FormatError(f"{where}: cannot read key {full}: {exc.strerror or exc}") from None
    return out


def _identity(v: Any, where: str) -> Identity:
    if v is None:
        return Identity()
    if not isinstance(v, dict) or v.get("type") not in _IDENTITY_TYPES:
        raise FormatError(f"{where}: signedIdentity needs a type of {', '.join(_IDENTITY_TYPES)}")
    t = v["type"]
    if t == "exactReference":
        _fields(v, {"type", "dockerReference"}, f"{where} signedIdentity")
        return Identity(t, reference=str(v.get("dockerReference", "")))
    if t == "exactRepository":
        _fields(v, {"type", "dockerRepository"}, f"{where} signedIdentity")
        return Identity(t, reference=str(v.get("dockerRepository", "")))
    if t == "remapIdentity":
        _fields(v, {"type", "prefix", "signedPrefix"}, f"{where} signedIdentity")
        return Identity(t, prefix=str(v.get("prefix", "")), signed_prefix=str(v.get("signedPrefix", "")))
    _fields(v, {"type"}, f"{where} signedIdentity")
    return Identity(t)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str = ""  # why not, one line
    signer: str = ""  # the fingerprint of the key that accepted (sigstoreSigned)
    payload_reference: str = ""


def _payload_mismatch(req: Requirement, image: DockerName | None, digest: str, p: Payload) -> str:
    """Why the verified payload ``p`` does not accept the manifest ``digest`` of ``image`` under ``req``'s
    ``signedIdentity`` ("" when it does): the same rule for cosign and simple signatures."""
    if p.digest != digest:
        return f"the signature is for manifest {p.digest}, not {digest}"
    if not req.identity.matches(image, p.reference):
        return f"signature identity {p.reference[:200]!r} does not match {image} ({req.identity.type})"
    return ""


def check_signatures(req: Requirement, image: DockerName | None, digest: str,
                     signatures: list[Signature]) -> Verdict:
    """Does one of ``signatures`` satisfy the sigstoreSigned ``req`` for the manifest ``digest`` of ``image``?"""
    reasons: list[str] = []
    for s in signatures:
        if s.media_type != SIG_MEDIA_TYPE:
            reasons.append(f"unexpected signature media type {s.media_type[:80]!r}")
            continue
        if not s.signature_b64 and ANN_SIGNATURE not in s.annotations:
            reasons.append("a signature layer without its signature annotation")
            continue
        key = next((k for k in req.keys if verify(k, s)), None)
        if key is None:
            reasons.append("cryptographic signature verification failed (signed by another key, or altered)")
            continue
        try:
            p = parse_payload(s.payload)
        except FormatError as exc:
            reasons.append(str(exc))
            continue
        why = _payload_mismatch(req, image, digest, p)
        if why:
            reasons.append(why)
            continue
        return Verdict(True, signer=key.fingerprint(), payload_reference=p.reference)
    if not reasons:
        return Verdict(False, "a signature was required, but no signature exists")
    return Verdict(False, reasons[0] if len(set(reasons)) == 1 else "; ".join(dict.fromkeys(reasons)))


def check_simple(req: Requirement, image: DockerName | None, digest: str,
                 signatures: "list[LookasideSignature]") -> Verdict:
    """Does one of the lookaside ``signatures`` satisfy the signedBy ``req`` for the manifest ``digest`` of
    ``image``?  As containers/image's prSignedBy: gpg verifies each with only ``req``'s keys, then the
    payload's digest and identity are checked."""
    from shoal.trust.gpg import Keyring, parse_simple_payload

    if req.key_type != "GPGKeys":
        return Verdict(False, f'unimplemented "keyType" value {req.key_type!r}')
    if not signatures:
        return Verdict(False, "a signature was required, but no signature exists")
    reasons: list[str] = []
    with Keyring(req.gpg_keys) as ring:
        if not ring.fingerprints:
            return Verdict(False, "no public keys imported (the policy's key data is not an OpenPGP public key)")
        for s in signatures:
            if s.problem:
                reasons.append(s.problem)
                continue
            try:
                contents, fpr = ring.verify(s.data)
                p = parse_simple_payload(contents)
            except FormatError as exc:
                reasons.append(str(exc))
                continue
            why = _payload_mismatch(req, image, digest, p)
            if why:
                reasons.append(why)
                continue
            return Verdict(True, signer=fpr, payload_reference=p.reference)
    return Verdict(False, reasons[0] if len(set(reasons)) == 1 else "none of the signatures were accepted: "
                   + "; ".join(dict.fromkeys(reasons)))


def evaluate(reqs: tuple[Requirement, ...], image: DockerName | None, digest: str,
             signatures: Callable[[], list[Signature]],
             simple: "Callable[[], list[LookasideSignature]] | None" = None) -> Verdict:
    """Every requirement of ``reqs`` for the manifest ``digest``; ``signatures`` (the cosign attachment's)
    and ``simple`` (the lookaside's simple signatures; None: there are none) are each called once, when a
    requirement needs them.  The first refusal is returned."""
    got: list[Signature] | None = None
    got_simple: list[LookasideSignature] | None = None
    last = Verdict(True)
    for r in reqs:
        if r.type == "insecureAcceptAnything":
            continue
        if r.type == "reject":
            return Verdict(False, "reject: the policy refuses every image in this scope")
        if r.type == "signedBy":
            if got_simple is None:
                got_simple = simple() if simple is not None else []
            last = check_simple(r, image, digest, got_simple)
            if not last.accepted:
                return Verdict(False, f"signedBy: {last.reason}")
            continue
        if got is None:
            got = signatures()
        last = check_signatures(r, image, digest, got)
        if not last.accepted:
            return Verdict(False, f"sigstoreSigned: {last.reason}")
    return last
