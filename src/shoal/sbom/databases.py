"""Package databases, one parser per ecosystem; each takes the database's bytes (never a path on this
machine) and returns ``Package`` values (docs/sbom.md §2).

Every parser treats its input as hostile: inputs and fields are bounded (``FormatError`` past a limit,
``HostileInput`` for what tries to exhaust or escape), nothing is evaluated, and file paths a database
names are normalized inside the image's root (``..`` never climbs above ``/``; such a path is dropped).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import posixpath
import re
import sqlite3
import struct
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, Iterator

from shoal.errors import FormatError, HostileInput

__all__ = [
    "Distro", "FileRef", "Package", "Limits", "LIMITS", "purl",
    "parse_os_release", "parse_dpkg_status", "parse_dpkg_list", "parse_apk_installed",
    "parse_rpmdb_sqlite", "parse_rpm_header", "parse_python_metadata", "parse_python_record",
    "parse_package_json",
]


@dataclass(frozen=True)
class Limits:
    """Bounds on what a database may make us read or hold."""

    database: int = 256 * 1024 * 1024  # bytes of one database file (an rpmdb.sqlite of a big distro: ~100 MB)
    small: int = 4 * 1024 * 1024  # bytes of a per-package file (METADATA, package.json, os-release)
    file_list: int = 64 * 1024 * 1024  # bytes of one file list (*.list, RECORD)
    field: int = 1024 * 1024  # bytes of one field (a Description, a header string)
    packages: int = 200_000  # packages of one database
    files: int = 2_000_000  # files one package may own
    total: int = 1024 * 1024 * 1024  # bytes read for one image, every database file together


LIMITS = Limits()


@dataclass(frozen=True, order=True)
class FileRef:
    """A file a package owns: its absolute path in the image, and the digest the database records
    (``alg`` one of ``MD5``, ``SHA-1``, ``SHA-256``, ``SHA-512`` as CycloneDX spells them; "" when none)."""

    path: str
    alg: str = ""
    digest: str = ""  # lowercase hex


@dataclass(frozen=True)
class Distro:
    """From /etc/os-release (or /usr/lib/os-release): ``id`` (debian, alpine, fedora, ...), ``version_id``."""

    id: str = ""
    version_id: str = ""
    pretty_name: str = ""

    @property
    def qualifier(self) -> str:
        """The purl ``distro`` qualifier: ``debian-12``, ``alpine-3.19.1``, ``fedora-39``."""
        if not self.id:
            return ""
        return f"{self.id}-{self.version_id}" if self.version_id else self.id


@dataclass(frozen=True)
class Package:
    """One installed package.  ``ecosystem``: deb, rpm, apk, pypi, npm.  ``location``: the database file
    (absolute path in the image) that records it.  ``files``: what it owns, sorted (empty where the
    database does not record it)."""

    ecosystem: str
    name: str
    version: str
    arch: str = ""
    purl: str = ""
    source: str = ""  # source package (deb Source, rpm SOURCERPM, apk origin)
    license: str = ""  # as the database declares it (not checked against SPDX)
    summary: str = ""
    homepage: str = ""
    supplier: str = ""  # deb Maintainer, rpm Vendor/Packager, apk maintainer, npm/pypi author
    location: str = ""
    files: tuple[FileRef, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies a package across two images: (ecosystem, name, arch)."""
        return (self.ecosystem, self.name, self.arch)


# ---------------------------------------------------------------------------------------------- purl

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_~")


def _pct(text: str, safe: bytes = b"") -> str:
    return "".join(chr(b) if b in _UNRESERVED or b in safe else f"%{b:02X}" for b in text.encode("utf-8"))


def purl(type_: str, namespace: str, name: str, version: str, qualifiers: dict[str, str] | None = None) -> str:
    """A package URL (github.com/package-url/purl-spec): ``pkg:TYPE/NAMESPACE/NAME@VERSION?k=v&...``,
    qualifiers sorted, empty ones left out, everything percent-encoded as packageurl-python does."""
    out = f"pkg:{type_}/"
    if namespace:
        out += "/".join(_pct(seg) for seg in namespace.split("/")) + "/"
    out += _pct(name)
    if version:
        out += "@" + _pct(version, b":")
    q = sorted((k, v) for k, v in (qualifiers or {}).items() if v)
    if q:
        out += "?" + "&".join(f"{k}={_pct(v, b':/')}" for k, v in q)
    return out


def _pypi_name(name: str) -> str:
    """PEP 503 normalization, as purl's pypi type asks."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------- helpers


def _text(data: bytes, what: str) -> str:
    return data.decode("utf-8", "replace")


def _check_size(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise HostileInput(f"{what}: {len(data)} bytes, more than the {limit} a package database may have")


def _field(value: str, what: str, lim: Limits) -> str:
    if len(value) > lim.field:
        raise HostileInput(f"{what}: a field of {len(value)} characters (at most {lim.field})")
    return value


def image_path(path: str, base: str = "/") -> str | None:
    """``path`` (absolute, or relative to ``base``) normalized inside the image's root, or None when it
    is empty, has a NUL, or climbs above the root."""
    if not path or "\x00" in path:
        return None
    full = path if path.startswith("/") else posixpath.join(base, path)
    parts: list[str] = []
    for seg in full.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(seg)
    return "/" + "/".join(parts) if parts else None


# ---------------------------------------------------------------------------------------------- os-release


def parse_os_release(data: bytes, lim: Limits = LIMITS) -> Distro:
    """/etc/os-release: shell-style KEY=VALUE lines; only ID, VERSION_ID and PRETTY_NAME are kept."""
    _check_size(data, lim.small, "os-release")
    vals: dict[str, str] = {}
    for line in _text(data, "os-release").splitlines():
        key, eq, value = line.strip().partition("=")
        if not eq or key not in ("ID", "VERSION_ID", "PRETTY_NAME"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        vals[key] = value.replace("\\\"", "\"")[:256]
    ident = re.sub(r"[^a-z0-9._-]", "", vals.get("ID", "").lower())
    ver = re.sub(r"[^A-Za-z0-9._~-]", "", vals.get("VERSION_ID", ""))
    return Distro(ident, ver, vals.get("PRETTY_NAME", ""))


# ---------------------------------------------------------------------------------------------- dpkg


def _stanzas(data: bytes, what: str, lim: Limits) -> Iterator[dict[str, str]]:
    """deb822 paragraphs (dpkg's status file): ``Field: value`` with continuation lines; blank lines
    separate paragraphs.  Field names are case-insensitive (kept as written in their first form)."""
    cur: dict[str, str] = {}
    last = ""
    count = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        if not line.strip():
            if cur:
                count += 1
                if count > lim.packages:
                    raise HostileInput(f"{what}: more than {lim.packages} paragraphs")
                yield cur
            cur, last = {}, ""
            continue
        if line[:1] in (b" ", b"\t"):
            if not last:
                raise FormatError(f"{what}:{lineno}: a continuation line outside any field")
            if len(cur[last]) < lim.field:  # the rest of a long Description is not needed
                cur[last] += "\n" + _text(line.strip(), what)
            continue
        if line.startswith(b"#"):
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or len(name) > 128 or not re.fullmatch(rb"[!-9;-~]+", name):
            raise FormatError(f"{what}:{lineno}: not a 'Field: value' line")
        last = _text(name, what).lower()
        cur[last] = _field(_text(value.strip(), what), f"{what}:{lineno}", lim)
    if cur:
        yield cur


_DEB_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")
_DEB_VERSION = re.compile(r"[A-Za-z0-9.+~:_-]+")


def parse_dpkg_status(data: bytes, distro: Distro, location: str = "/var/lib/dpkg/status",
                      lim: Limits = LIMITS) -> list[Package]:
    """Installed packages of a dpkg status file (or one file of status.d): paragraphs whose Status'
    last word is ``installed`` (or that have no Status, as in distroless status.d files)."""
    _check_size(data, lim.database, location)
    out: list[Package] = []
    ns = distro.id if distro.id else "debian"
    for st in _stanzas(data, location, lim):
        status = st.get("status")
        if status is not None and status.split()[-1:] != ["installed"]:
            continue
        name, version, arch = st.get("package", ""), st.get("version", ""), st.get("architecture", "")
        if not _DEB_NAME.fullmatch(name) or not _DEB_VERSION.fullmatch(version) or len(name) > 256:
            raise FormatError(f"{location}: a package paragraph with a bad Package or Version ({name[:64]!r})")
        if arch and not re.fullmatch(r"[a-z0-9-]{1,32}", arch):
            raise FormatError(f"{location}: package {name}: bad Architecture {arch[:32]!r}")
        src = st.get("source", "").split(" ")[0]
        out.append(Package(
            ecosystem="deb", name=name, version=version, arch=arch,
            purl=purl("deb", ns, name, version, {"arch": arch, "distro": distro.qualifier}),
            source=src, summary=st.get("description", "").split("\n")[0][:512],
            homepage=st.get("homepage", "")[:1024], supplier=st.get("maintainer", "")[:512], location=location))
    return out


def parse_dpkg_list(data: bytes, what: str, lim: Limits = LIMITS) -> list[str]:
    """A /var/lib/dpkg/info/NAME[:ARCH].list: one absolute path a line (directories included)."""
    _check_size(data, lim.file_list, what)
    out: list[str] = []
    for line in data.split(b"\n"):
        if not line:
            continue
        p = image_path(line.decode("utf-8", "surrogateescape"))
        if p is not None:
            out.append(p)
        if len(out) > lim.files:
            raise HostileInput(f"{what}: more than {lim.files} paths")
    return out


# ---------------------------------------------------------------------------------------------- apk


def parse_apk_installed(data: bytes, distro: Distro, location: str = "/lib/apk/db/installed",
                        lim: Limits = LIMITS) -> list[Package]:
    """apk's installed database: blank-line separated records of ``X:value`` lines (P name, V version,
    A arch, L license, T description, U url, o origin, m maintainer, F directory, R file in the last F,
    Z the file's checksum: ``Q1`` + base64 sha1)."""
    _check_size(data, lim.database, location)
    out: list[Package] = []
    rec: dict[str, str] = {}
    files: list[FileRef] = []
    cur_dir = ""
    ns = distro.id if distro.id and distro.id != "alpine" else "alpine"

    def flush() -> None:
        nonlocal rec, files, cur_dir
        if rec:
            name, version = rec.get("P", ""), rec.get("V", "")
            if not name or not version or len(name) > 256 or len(version) > 256:
                raise FormatError(f"{location}: a record without P: and V:")
            if len(out) >= lim.packages:
                raise HostileInput(f"{location}: more than {lim.packages} packages")
            arch = rec.get("A", "")
            out.append(Package(
                ecosystem="apk", name=name, version=version, arch=arch,
                purl=purl("apk", ns, name.lower(), version, {"arch": arch, "distro": distro.qualifier}),
                source=rec.get("o", ""), license=rec.get("L", ""), summary=rec.get("T", "")[:512],
                homepage=rec.get("U", "")[:1024], supplier=rec.get("m", "")[:512], location=location,
                files=tuple(sorted(set(files)))))
        rec, files, cur_dir = {}, [], ""

    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        if not line:
            flush()
            continue
        if len(line) < 2 or line[1:2] != b":":
            raise FormatError(f"{location}:{lineno}: not an 'X:value' line")
        key, value = chr(line[0]), line[2:].decode("utf-8", "surrogateescape")
        _field(value, f"{location}:{lineno}", lim)
        if key == "F":
            cur_dir = value
        elif key == "R":
            p = image_path(value, "/" + cur_dir)
            if p is not None:
                if len(files) >= lim.files:
                    raise HostileInput(f"{location}: a package with more than {lim.files} files")
                files.append(FileRef(p))
        elif key == "Z" and files:
            ref = files[-1]
            if value.startswith("Q1"):
                try:
                    d = base64.b64decode(value[2:], validate=True)
                except ValueError:
                    d = b""
                if len(d) == 20:
                    files[-1] = FileRef(ref.path, "SHA-1", d.hex())
        elif key in "PVALTUom" and key not in rec:
            rec[key] = value
    flush()
    return out


# ---------------------------------------------------------------------------------------------- rpm

# header tags (rpm's lib/rpmtag.h) and types (rpm's header format, "Package file format" in rpm's docs)
_TAG_NAME, _TAG_VERSION, _TAG_RELEASE, _TAG_EPOCH, _TAG_SUMMARY = 1000, 1001, 1002, 1003, 1004
_TAG_VENDOR, _TAG_LICENSE, _TAG_PACKAGER, _TAG_URL, _TAG_ARCH = 1011, 1014, 1015, 1020, 1022
_TAG_FILEDIGESTS, _TAG_SOURCERPM, _TAG_DIRINDEXES, _TAG_BASENAMES, _TAG_DIRNAMES = 1035, 1044, 1116, 1117, 1118
_TAG_FILEDIGESTALGO = 5011
_T_INT8, _T_INT16, _T_INT32, _T_INT64, _T_STRING, _T_BIN, _T_STRING_ARRAY, _T_I18N = 2, 3, 4, 5, 6, 7, 8, 9
_DIGEST_ALGO = {1: ("MD5", 16), 2: ("SHA-1", 20), 8: ("SHA-256", 32), 9: ("SHA-384", 48), 10: ("SHA-512", 64)}
_HEADER_MAX_INDEX = 0x0000FFFF  # rpm's own bounds (hdrblobVerifyInfo)
_HEADER_MAX_DATA = 0x0FFFFFFF


def _rpm_header(blob: bytes, what: str, lim: Limits) -> dict[int, Any]:
    """Decode an rpm header blob as rpmdb stores it (no lead, no magic: ``il``, ``dl``, ``il`` index
    entries of (tag, type, offset, count), then ``dl`` bytes of data); only the tags we use."""
    if len(blob) < 8:
        raise FormatError(f"{what}: header shorter than 8 bytes")
    il, dl = struct.unpack_from(">II", blob, 0)
    if il > _HEADER_MAX_INDEX or dl > _HEADER_MAX_DATA or 8 + 16 * il + dl != len(blob):
        raise FormatError(f"{what}: header sizes ({il} entries, {dl} data bytes) do not match its "
                          f"{len(blob)} bytes")
    data_start = 8 + 16 * il
    store = memoryview(blob)[data_start:]
    wanted = {_TAG_NAME, _TAG_VERSION, _TAG_RELEASE, _TAG_EPOCH, _TAG_SUMMARY, _TAG_VENDOR, _TAG_LICENSE,
              _TAG_PACKAGER, _TAG_URL, _TAG_ARCH, _TAG_FILEDIGESTS, _TAG_SOURCERPM, _TAG_DIRINDEXES,
              _TAG_BASENAMES, _TAG_DIRNAMES, _TAG_FILEDIGESTALGO}
    out: dict[int, Any] = {}
    for i in range(il):
        tag, typ, off, count = struct.unpack_from(">IIiI", blob, 8 + 16 * i)
        if tag not in wanted or tag in out:
            continue
        if off < 0 or off > dl or count > dl + 1 or count == 0:
            raise FormatError(f"{what}: tag {tag} points outside the header's data")
        if typ in (_T_STRING, _T_STRING_ARRAY, _T_I18N):
            n = 1 if typ == _T_STRING else count
            vals: list[str] = []
            pos = off
            for _ in range(n):
                end = blob.find(b"\x00", data_start + pos, data_start + dl)
                if end < 0:
                    raise FormatError(f"{what}: tag {tag}: an unterminated string")
                s = bytes(store[pos:end - data_start])
                if len(s) > lim.field:
                    raise HostileInput(f"{what}: tag {tag}: a string of {len(s)} bytes")
                vals.append(s.decode("utf-8", "surrogateescape"))
                pos = end - data_start + 1
            out[tag] = vals[0] if typ == _T_STRING else vals
        elif typ in (_T_INT8, _T_INT16, _T_INT32, _T_INT64):
            width = {_T_INT8: 1, _T_INT16: 2, _T_INT32: 4, _T_INT64: 8}[typ]
            if off % width or off + width * count > dl:
                raise FormatError(f"{what}: tag {tag}: integers outside the header's data")
            fmt = ">" + {1: "B", 2: "H", 4: "I", 8: "Q"}[width] * count
            out[tag] = list(struct.unpack_from(fmt, store, off))
        elif typ == _T_BIN:
            if off + count > dl:
                raise FormatError(f"{what}: tag {tag}: bytes outside the header's data")
            out[tag] = bytes(store[off:off + count])
    return out


def parse_rpm_header(blob: bytes, distro: Distro, location: str, lim: Limits = LIMITS) -> Package | None:
    """One installed package from its header blob; None for rpm's gpg-pubkey pseudo-packages."""
    h = _rpm_header(blob, location, lim)

    def s(tag: int) -> str:
        v = h.get(tag, "")
        return v if isinstance(v, str) else (v[0] if isinstance(v, list) and v and isinstance(v[0], str) else "")

    name, version, release = s(_TAG_NAME), s(_TAG_VERSION), s(_TAG_RELEASE)
    if not name or not version:
        raise FormatError(f"{location}: a header without NAME or VERSION")
    if name == "gpg-pubkey":
        return None
    epoch_v = h.get(_TAG_EPOCH)
    epoch = str(epoch_v[0]) if isinstance(epoch_v, list) and epoch_v else ""
    arch = s(_TAG_ARCH)
    full = f"{version}-{release}" if release else version
    files: list[FileRef] = []
    base, dirs, idxs = h.get(_TAG_BASENAMES), h.get(_TAG_DIRNAMES), h.get(_TAG_DIRINDEXES)
    if isinstance(base, list) and isinstance(dirs, list) and isinstance(idxs, list):
        if len(base) != len(idxs) or len(base) > lim.files:
            raise FormatError(f"{location}: package {name}: BASENAMES and DIRINDEXES differ in length")
        algo_v = h.get(_TAG_FILEDIGESTALGO)
        alg, width = _DIGEST_ALGO.get(algo_v[0] if isinstance(algo_v, list) and algo_v else 1, ("", 0))
        digests = h.get(_TAG_FILEDIGESTS)
        digs = digests if isinstance(digests, list) and len(digests) == len(base) else [""] * len(base)
        for b, di, dg in zip(base, idxs, digs):
            if not isinstance(di, int) or di >= len(dirs):
                raise FormatError(f"{location}: package {name}: a DIRINDEXES entry past DIRNAMES")
            p = image_path(dirs[di] + b)
            if p is None:
                continue
            ok = alg and isinstance(dg, str) and len(dg) == 2 * width and re.fullmatch(r"[0-9a-f]+", dg)
            files.append(FileRef(p, alg, dg) if ok else FileRef(p))
    ns = distro.id or "rpm"
    return Package(
        ecosystem="rpm", name=name, version=full, arch=arch,
        purl=purl("rpm", ns, name, full, {"arch": arch, "epoch": epoch, "distro": distro.qualifier}),
        source=s(_TAG_SOURCERPM), license=s(_TAG_LICENSE), summary=s(_TAG_SUMMARY)[:512],
        homepage=s(_TAG_URL)[:1024], supplier=(s(_TAG_VENDOR) or s(_TAG_PACKAGER))[:512], location=location,
        files=tuple(sorted(set(files))))


def parse_rpmdb_sqlite(data: bytes, distro: Distro, location: str = "/var/lib/rpm/rpmdb.sqlite",
                       lim: Limits = LIMITS) -> list[Package]:
    """rpm's sqlite database (rpm >= 4.16): table ``Packages(hnum, blob)``, one header blob a row.
    The bytes are opened in memory, read-only in effect, with an untrusted schema and a step budget."""
    _check_size(data, lim.database, location)
    if not data.startswith(b"SQLite format 3\x00"):
        raise FormatError(f"{location}: not an SQLite database")
    if data[18:20] == b"\x02\x02":  # WAL mode: read the main file as a rollback-journal database (rpm
        data = data[:18] + b"\x01\x01" + data[20:]  # checkpoints when it closes; a -wal file is not read)
    conn = sqlite3.connect(":memory:")
    try:
        try:
            conn.deserialize(data)
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA query_only=ON")
            steps = [0]

            def budget() -> int:
                steps[0] += 1
                return 1 if steps[0] > 5_000_000 else 0  # in units of 1000 VM instructions

            conn.set_progress_handler(budget, 1000)
            kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'Packages'").fetchone()
            if kind is None or kind[0] != "table":
                raise FormatError(f"{location}: no Packages table")
            rows = conn.execute("SELECT hnum, blob FROM Packages ORDER BY hnum")
            out: list[Package] = []
            for hnum, blob in rows:
                if not isinstance(blob, bytes):
                    raise FormatError(f"{location}: row {hnum} of Packages is not a blob")
                p = parse_rpm_header(blob, distro, location, lim)
                if p is not None:
                    out.append(p)
                if len(out) > lim.packages:
                    raise HostileInput(f"{location}: more than {lim.packages} packages")
            return out
        except sqlite3.Error as exc:
            raise FormatError(f"{location}: unreadable rpm database: {exc}") from None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- python


def parse_python_metadata(data: bytes, location: str, lim: Limits = LIMITS) -> Package:
    """A ``*.dist-info/METADATA`` (core metadata, RFC 822 headers): Name, Version, License (or
    License-Expression), Summary, Home-page / Project-URL, Author."""
    _check_size(data, lim.small, location)
    head = data.split(b"\n\n", 1)[0]
    msg = BytesHeaderParser(policy=compat32).parsebytes(head)
    name = str(msg.get("Name", "") or "").strip()
    version = str(msg.get("Version", "") or "").strip()
    if not name or not version or len(name) > 256 or len(version) > 256 or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise FormatError(f"{location}: no valid Name and Version")
    lic = str(msg.get("License-Expression", "") or "").strip() or str(msg.get("License", "") or "").strip()
    home = str(msg.get("Home-page", "") or "").strip()
    if not home:
        for u in msg.get_all("Project-URL") or []:
            label, _, url = str(u).partition(",")
            if label.strip().lower() in ("homepage", "home", "source"):
                home = url.strip()
                break
    return Package(
        ecosystem="pypi", name=name, version=version, purl=purl("pypi", "", _pypi_name(name), version),
        license=lic.split("\n")[0][:512], summary=str(msg.get("Summary", "") or "").strip()[:512],
        homepage=home[:1024], supplier=str(msg.get("Author", "") or msg.get("Author-email", "") or "").strip()[:512],
        location=location)


def parse_python_record(data: bytes, site: str, what: str, lim: Limits = LIMITS) -> list[FileRef]:
    """A ``RECORD`` (CSV: path, ``sha256=<urlsafe b64>``, size); paths relative to ``site`` (the
    directory holding the dist-info), kept only when they stay inside the image."""
    _check_size(data, lim.file_list, what)
    out: list[FileRef] = []
    try:
        for row in csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"))):
            if not row or not row[0]:
                continue
            p = image_path(row[0], site)
            if p is None:
                continue
            alg, dig = "", ""
            if len(row) > 1 and "=" in row[1]:
                a, _, v = row[1].partition("=")
                width = {"sha256": 32, "sha512": 64, "sha1": 20, "md5": 16}.get(a.lower())
                if width:
                    try:
                        raw = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))
                    except ValueError:
                        raw = b""
                    if len(raw) == width:
                        alg = {"sha256": "SHA-256", "sha512": "SHA-512", "sha1": "SHA-1", "md5": "MD5"}[a.lower()]
                        dig = raw.hex()
            out.append(FileRef(p, alg, dig))
            if len(out) > lim.files:
                raise HostileInput(f"{what}: more than {lim.files} rows")
    except csv.Error as exc:
        raise FormatError(f"{what}: not a RECORD file: {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------- npm


def parse_package_json(data: bytes, location: str, lim: Limits = LIMITS) -> Package | None:
    """A ``node_modules/[@scope/]NAME/package.json``: name, version, license, description, homepage,
    author.  None for a package.json without a name and version (a private project's)."""
    _check_size(data, lim.small, location)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise FormatError(f"{location}: not JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{location}: not a JSON object")
    name, version = doc.get("name"), doc.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        return None
    if len(name) > 214 or len(version) > 256:
        raise FormatError(f"{location}: name or version too long")
    scope, _, bare = name.rpartition("/") if name.startswith("@") else ("", "", name)
    lic = doc.get("license")
    if isinstance(lic, dict):
        lic = lic.get("type")
    if not isinstance(lic, str):
        licenses = doc.get("licenses")
        types = [x.get("type") for x in licenses if isinstance(x, dict)] if isinstance(licenses, list) else []
        lic = " OR ".join(t for t in types if isinstance(t, str))
    author = doc.get("author")
    if isinstance(author, dict):
        author = author.get("name")
    home = doc.get("homepage")
    desc = doc.get("description")
    return Package(
        ecosystem="npm", name=name, version=version, purl=purl("npm", scope, bare, version),
        license=str(lic)[:512], summary=desc[:512] if isinstance(desc, str) else "",
        homepage=home[:1024] if isinstance(home, str) else "", supplier=author[:512] if isinstance(author, str) else "",
        location=location)
