"""SPDX 2.3 and CycloneDX 1.5 JSON documents of an ``Inventory`` (docs/sbom.md §3).

Both are deterministic: the same image gives the same bytes.  Packages and files are sorted, ids are
derived from names (a counter, in sorted order, separates two packages of one name), the creation time
is the image config's ``created``, else ``SOURCE_DATE_EPOCH``, else the newest modification time of
the database files read (never the clock), and the document's namespace / serial number are derived
from the image's manifest digest.  Keys are sorted, separators fixed, UTF-8 without escapes.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from shoal.errors import UsageError
from shoal.sbom.databases import Package, purl
from shoal.sbom.inventory import Inventory

__all__ = ["Subject", "FORMATS", "MEDIA_TYPES", "spdx_json", "cyclonedx_json", "render", "created_time"]

SPDX = "spdx-json"
CYCLONEDX = "cyclonedx-json"
FORMATS = (SPDX, CYCLONEDX)
# the artifactType (and layer media type) of an attached SBOM of each format
MEDIA_TYPES = {SPDX: "application/spdx+json", CYCLONEDX: "application/vnd.cyclonedx+json"}

# SPDX license ids written as they are (alone or joined by AND/OR); any other declared license text
# becomes a LicenseRef- with the text as its extracted text, which keeps the document valid
_KNOWN_LICENSES = frozenset("""0BSD AFL-2.1 AGPL-3.0-only AGPL-3.0-or-later Apache-1.1 Apache-2.0 Artistic-1.0
Artistic-2.0 BSD-1-Clause BSD-2-Clause BSD-3-Clause BSD-4-Clause BSL-1.0 CC-BY-4.0 CC0-1.0 curl EPL-1.0
EPL-2.0 GPL-1.0-only GPL-1.0-or-later GPL-2.0-only GPL-2.0-or-later GPL-3.0-only GPL-3.0-or-later ISC
LGPL-2.0-only LGPL-2.0-or-later LGPL-2.1-only LGPL-2.1-or-later LGPL-3.0-only LGPL-3.0-or-later MIT MIT-0
MPL-1.1 MPL-2.0 OpenSSL PSF-2.0 Python-2.0 Ruby Unlicense Vim W3C X11 Zlib ZPL-2.1""".split())


@dataclass(frozen=True)
class Subject:
    """The image an SBOM describes: ``name`` as shown (``debian:12``, ``docker://host/repo:tag``),
    ``digest`` its manifest digest, ``created`` the config's ``created`` ("" if none)."""

    name: str
    digest: str
    created: str = ""


def created_time(subject: Subject, inv: Inventory, source_date_epoch: str | None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``: the config's ``created``, else ``SOURCE_DATE_EPOCH``, else the newest
    database file's mtime (the image's own time: never the clock)."""
    if subject.created:
        try:
            t = _dt.datetime.fromisoformat(subject.created.replace("Z", "+00:00"))
            if t.tzinfo is None:
                t = t.replace(tzinfo=_dt.UTC)
            return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            pass
    if source_date_epoch is not None and source_date_epoch.strip().isdigit():
        secs = int(source_date_epoch.strip())
    else:
        secs = inv.newest_mtime_ns // 1_000_000_000
    secs = min(max(secs, 0), 253402300799)  # year 9999
    return _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.cache
def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:
        return "unknown"


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"


def _image_purl(subject: Subject) -> str:
    name = subject.name.removeprefix("docker://").rsplit("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    bare = last.split(":", 1)[0] if ":" in last else last
    return purl("oci", "", bare.lower() or "image", subject.digest)


def _ids(pkgs: list[Package], prefix: str) -> list[str]:
    """One id a package, from its ecosystem and name ([A-Za-z0-9.-]); a counter after the second of a name."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for p in pkgs:
        base = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{p.ecosystem}-{p.name}" + (f"-{p.arch}" if p.arch else ""))
        base = f"{prefix}{base}"[:200]
        n = seen.get(base, 0) + 1
        seen[base] = n
        out.append(base if n == 1 else f"{base}-{n}")
    return out


def _tokens(lic: str) -> list[str] | None:
    """``lic`` as SPDX tokens when it is ids of the known list joined by AND/OR, else None."""
    toks = lic.replace("(", " ( ").replace(")", " ) ").split()
    if not toks:
        return None
    for t in toks:
        if t not in _KNOWN_LICENSES and t not in ("AND", "OR", "(", ")"):
            return None
    return toks


def _http(url: str) -> str:
    return url if re.fullmatch(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+", url) and len(url) < 1024 else ""


def _supplier(text: str) -> str:
    text = " ".join(text.split())[:256]
    return text.replace("(", "[").replace(")", "]")


# ---------------------------------------------------------------------------------------------- SPDX 2.3


def spdx_json(subject: Subject, inv: Inventory, created: str) -> bytes:
    """An SPDX 2.3 JSON document: the image as the described package, CONTAINS each installed
    package (purl as a PACKAGE-MANAGER external reference)."""
    pkgs = inv.packages
    ids = _ids(pkgs, "SPDXRef-Package-")
    hexd = subject.digest.split(":", 1)[-1]
    extracted: dict[str, str] = {}

    def declared(lic: str) -> str:
        if not lic:
            return "NOASSERTION"
        toks = _tokens(lic)
        if toks is not None:
            return " ".join(toks).replace("( ", "(").replace(" )", ")")
        ref = "LicenseRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", lic)[:64].strip("-") + "-" + \
              hashlib.sha256(lic.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        extracted[ref] = lic
        return ref

    image = {"SPDXID": "SPDXRef-Image", "name": subject.name, "versionInfo": subject.digest,
             "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
             "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
             "checksums": [{"algorithm": "SHA256", "checksumValue": hexd}],
             "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                               "referenceLocator": _image_purl(subject)}]}
    packages: list[dict[str, Any]] = [image]
    rels: list[dict[str, str]] = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                                   "relatedSpdxElement": "SPDXRef-Image"}]
    for sid, p in zip(ids, pkgs):
        d: dict[str, Any] = {
            "SPDXID": sid, "name": p.name, "versionInfo": p.version, "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False, "licenseConcluded": "NOASSERTION", "licenseDeclared": declared(p.license),
            "copyrightText": "NOASSERTION", "primaryPackagePurpose": "LIBRARY" if p.ecosystem in ("pypi", "npm")
            else "INSTALL",
            "supplier": f"Person: {_supplier(p.supplier)}" if p.supplier.strip() else "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": p.purl}],
            "sourceInfo": f"recorded in {p.location}" + (f"; {len(p.files)} files" if p.files else ""),
        }
        if p.summary:
            d["summary"] = p.summary
        home = _http(p.homepage)
        if home:
            d["homepage"] = home
        packages.append(d)
        rels.append({"spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS", "relatedSpdxElement": sid})
    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": subject.name,
        "documentNamespace": f"https://spdx.org/spdxdocs/shoal-{hexd}",
        "creationInfo": {"created": created, "creators": [f"Tool: shoal-{_tool_version()}"]},
        "packages": packages, "relationships": rels,
    }
    if extracted:
        doc["hasExtractedLicensingInfos"] = [{"licenseId": k, "extractedText": v, "name": v[:128]}
                                             for k, v in sorted(extracted.items())]
    return _dump(doc)


# ---------------------------------------------------------------------------------------------- CycloneDX 1.5


def cyclonedx_json(subject: Subject, inv: Inventory, created: str) -> bytes:
    """A CycloneDX 1.5 JSON BOM: the image as metadata.component (type container), one component a
    package (purl, licenses, properties), its owned files as nested components of type file with the
    digests the database records."""
    ids = _ids(inv.packages, "pkg:")
    hexd = subject.digest.split(":", 1)[-1]
    comps: list[dict[str, Any]] = []
    for ref, p in zip(ids, inv.packages):
        c: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": p.name, "version": p.version, "purl": p.purl}
        if p.license:
            toks = _tokens(p.license)
            if toks is not None and len(toks) == 1:
                c["licenses"] = [{"license": {"id": toks[0]}}]
            elif toks is not None:
                c["licenses"] = [{"expression": " ".join(toks).replace("( ", "(").replace(" )", ")")}]
            else:
                c["licenses"] = [{"license": {"name": p.license}}]
        if p.summary:
            c["description"] = p.summary
        if p.supplier.strip():
            c["supplier"] = {"name": " ".join(p.supplier.split())[:256]}
        home = _http(p.homepage)
        if home:
            c["externalReferences"] = [{"type": "website", "url": home}]
        props = [{"name": "shoal:package:location", "value": p.location},
                 {"name": "shoal:package:type", "value": p.ecosystem}]
        if p.arch:
            props.append({"name": "shoal:package:arch", "value": p.arch})
        if p.source:
            props.append({"name": "shoal:package:source", "value": p.source})
        c["properties"] = props
        if p.files:
            files = []
            for f in p.files:
                fc: dict[str, Any] = {"type": "file", "bom-ref": f"{ref}:file:{f.path}", "name": f.path}
                if f.alg:
                    fc["hashes"] = [{"alg": f.alg, "content": f.digest}]
                files.append(fc)
            c["components"] = files
        comps.append(c)
    doc: dict[str, Any] = {
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "serialNumber": uuid.uuid5(uuid.NAMESPACE_URL, f"shoal:sbom:{subject.digest}").urn,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{"type": "application", "name": "shoal", "version": _tool_version()}]},
            "component": {"type": "container", "bom-ref": "image", "name": subject.name, "version": subject.digest,
                          "purl": _image_purl(subject), "hashes": [{"alg": "SHA-256", "content": hexd}]},
        },
        "components": comps,
        "dependencies": [{"ref": "image", "dependsOn": ids}],
    }
    if inv.distro.id:
        doc["metadata"]["properties"] = [{"name": "shoal:distro", "value": inv.distro.qualifier}]
    return _dump(doc)


def render(fmt: str, subject: Subject, inv: Inventory, source_date_epoch: str | None = None) -> bytes:
    """The document of format ``fmt`` (``spdx-json`` or ``cyclonedx-json``)."""
    created = created_time(subject, inv, source_date_epoch)
    if fmt == SPDX:
        return spdx_json(subject, inv, created)
    if fmt == CYCLONEDX:
        return cyclonedx_json(subject, inv, created)
    raise UsageError(f"unknown SBOM format {fmt!r} (spdx-json or cyclonedx-json)")
