"""OCI referrers: the referrers API, with the tag-schema fallback (``<alg>-<hex>``) that registries
without it (distribution 2.8) need.  Functions over a RegistryClient's public surface; the client exposes
them as methods."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import httpx

from shoal.errors import FormatError, NotFound, UsageError
from shoal.format.manifest import canonical_json, json_loads

from .blobs import check_digest, with_query

if TYPE_CHECKING:
    from shoal.transports.registry.client import RegistryClient

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
ANN_COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"


def referrers_tag(digest: str) -> str:
    """The OCI referrers tag-schema fallback tag for ``digest``."""
    algo, _, hexpart = check_digest(digest).partition(":")
    return f"{algo[:32]}-{hexpart[:64]}"


def signature_tag(digest: str) -> str:
    """``sha256-<hex>.sig``: where cosign and containers/image keep the signatures of ``digest``."""
    return referrers_tag(digest) + ".sig"


def merge_signature_manifests(have: bytes, new: bytes) -> tuple[bytes, bytes]:
    """The attachment manifest holding ``have``'s layers and then ``new``'s that it lacks (same payload and
    signature), with its config (an OCI image config whose ``rootfs.diff_ids`` list the payloads, as
    containers/image writes it): (manifest, config).  ``have``'s ``subject`` is kept, else ``new``'s."""
    docs = [_json(have, "signature manifest"), _json(new, "signature manifest")]
    if not all(isinstance(d, dict) and isinstance(d.get("layers"), list) for d in docs):
        raise FormatError("signature manifest has no layers list")
    layers: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for d in docs:
        for ly in d["layers"]:
            if not isinstance(ly, dict):
                raise FormatError("signature manifest has a malformed layer")
            key = (str(ly.get("digest")), str((ly.get("annotations") or {}).get(ANN_COSIGN_SIGNATURE, "")))
            if key not in seen:
                seen.add(key)
                layers.append(ly)
    config = canonical_json({"architecture": "", "os": "", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [ly["digest"] for ly in layers]}})
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                                      "size": len(config)},
                           "layers": layers}
    subject = docs[0].get("subject") or docs[1].get("subject")
    if isinstance(subject, dict):
        out["subject"] = subject
    return canonical_json(out), config


def _json(data: bytes, what: str) -> Any:
    try:
        return json_loads(data)
    except ValueError:
        raise FormatError(f"{what}: malformed JSON") from None


def probe(client: RegistryClient, repo: str, digest: str, artifact_type: str | None = None) -> httpx.Response | None:
    """The referrers API's answer for ``digest`` (an image index, read), or ``None`` when the registry
    has no referrers API (it answers 400, 404 or 405, or 200 with something else).  The one place
    the API is asked."""
    check_digest(digest)
    url = f"/v2/{repo}/referrers/{digest}"
    if artifact_type:
        url = with_query(url, "artifactType", artifact_type)
    resp = client.retrying(lambda: client.request("GET", url, scopes=client.scopes(repo),
                                                  headers={"Accept": OCI_INDEX}),
                           f"GET {client.host}{url.split('?')[0]}")
    if resp.status_code == 200 and resp.headers.get("content-type", "").startswith(OCI_INDEX):
        return resp
    if resp.status_code in (200, 404, 400, 405):
        return None
    raise client.error_for(resp, f"referrers of {repo}@{digest}")


def has_referrers_api(client: RegistryClient, repo: str, digest: str) -> bool:
    """See :meth:`RegistryClient.has_referrers_api`."""
    return probe(client, repo, digest) is not None


def referrers(client: RegistryClient, repo: str, digest: str, artifact_type: str | None = None,
              fallback: bool = True, api: bool = True) -> list[dict[str, Any]]:
    """Descriptors of manifests whose ``subject`` is ``digest``.

    Uses the referrers API and falls back to the ``<alg>-<hex>`` tag schema (unless ``fallback`` is
    false: a caller that reads the tag schema itself, at the same time); ``api`` false: the caller knows
    the registry has no referrers API, so the tag schema is read without asking it first.
    """
    what = f"referrers of {repo}@{digest}"
    resp = probe(client, repo, digest, artifact_type) if api else None
    if resp is not None:
        doc: Any = _json(resp.content, what)
        filtered = "artifactType" in resp.headers.get("oci-filters-applied", "")
    elif not fallback:
        return []
    else:
        try:
            data, _, _ = client.get_manifest(repo, referrers_tag(digest), [OCI_INDEX])
        except NotFound:
            return []
        doc, filtered = _json(data, what), False
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise FormatError(f"{what}: not an image index")
    out = [m for m in manifests if isinstance(m, dict)]
    if artifact_type and not filtered:
        out = [m for m in out if m.get("artifactType") == artifact_type]
    return out

def put_referrer_tag_index(client: RegistryClient, repo: str, subject_digest: str, descriptor: dict[str, Any]) -> str:
    """Append ``descriptor`` to the tag-schema referrers index of ``subject_digest``.

    Returns the digest of the (possibly unchanged) index.  Not atomic:
    concurrent writers can lose an entry (inherent to the tag schema).
    """
    if not (isinstance(descriptor.get("digest"), str) and isinstance(descriptor.get("size"), int)
            and isinstance(descriptor.get("mediaType"), str)):
        raise UsageError("referrer descriptor needs mediaType, digest and size")
    tag = referrers_tag(subject_digest)
    try:
        data, media_type, current = client.get_manifest(repo, tag, [OCI_INDEX])
        doc = _json(data, f"referrers index {repo}:{tag}")
        if media_type != OCI_INDEX or not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise FormatError(f"{repo}:{tag} exists and is not an OCI image index")
    except NotFound:
        doc, current = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, ""
    if any(isinstance(m, dict) and m.get("digest") == descriptor["digest"] for m in doc["manifests"]):
        return current
    doc["manifests"].append(descriptor)
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return client.put_manifest(repo, tag, body, OCI_INDEX)

