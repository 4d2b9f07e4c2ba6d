"""The package-database parsers on hostile and malformed input: bounded, FormatError, no path tricks."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from shoal.errors import FormatError, HostileInput
from shoal.sbom import databases as db
from shoal.sbom.databases import Distro, Limits

DEB12 = Distro("debian", "12")


def test_dpkg_status_keeps_installed_packages_only() -> None:
    status = (b"Package: a\nStatus: install ok installed\nVersion: 1:2.0-1\nArchitecture: amd64\n"
              b"Description: first line\n more\n\n"
              b"Package: b\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n\n")
    (p,) = db.parse_dpkg_status(status, DEB12)
    assert (p.name, p.version, p.arch, p.summary) == ("a", "1:2.0-1", "amd64", "first line")
    assert p.purl == "pkg:deb/debian/a@1:2.0-1?arch=amd64&distro=debian-12"


@pytest.mark.parametrize("bad", [
    b" continuation first\n",
    b"no colon here\n",
    b"Package: UPPER\nVersion: 1\n",
    b"Package: a\nVersion: 1 2\n",
    b"Package: a\nVersion: 1\nArchitecture: ../../x\n",
])
def test_dpkg_status_malformed(bad: bytes) -> None:
    with pytest.raises(FormatError):
        db.parse_dpkg_status(bad, DEB12)


def test_limits_bound_sizes_fields_and_counts() -> None:
    lim = Limits(database=1000, field=64, packages=2, files=3)
    with pytest.raises(HostileInput):
        db.parse_dpkg_status(b"x" * 1001, DEB12, lim=lim)
    with pytest.raises(HostileInput):
        db.parse_dpkg_status(b"Package: a\nVersion: 1\nDescription: " + b"d" * 100 + b"\n", DEB12, lim=lim)
    many = b"".join(b"Package: p%d\nVersion: 1\n\n" % i for i in range(3))
    with pytest.raises(HostileInput):
        db.parse_dpkg_status(many, DEB12, lim=lim)
    with pytest.raises(HostileInput):
        db.parse_dpkg_list(b"/a\n/b\n/c\n/d\n/e\n", "x.list", lim)


def test_paths_never_climb_above_the_root() -> None:
    assert db.parse_dpkg_list(b"/usr/bin/x\n/../../etc/passwd\n/a/./b/../c\n", "x.list") == ["/usr/bin/x", "/a/c"]
    apk = b"P:a\nV:1\nF:lib\nR:../../../etc/passwd\nR:ok.so\n\n"
    (p,) = db.parse_apk_installed(apk, Distro("alpine", "3.19.1"))
    assert [f.path for f in p.files] == ["/lib/ok.so"]
    assert p.purl == "pkg:apk/alpine/a@1?distro=alpine-3.19.1"
    rec = b"../../../../../../etc/shadow,,\nfoo/__init__.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n"
    refs = db.parse_python_record(rec, "/usr/lib/python3/dist-packages", "RECORD")
    assert [(r.path, r.alg) for r in refs] == [("/usr/lib/python3/dist-packages/foo/__init__.py", "SHA-256")]
    assert db.image_path("a\x00b") is None


def _header(entries: list[tuple[int, int, bytes, int]]) -> bytes:
    index, data = b"", b""
    for tag, typ, payload, count in entries:
        index += struct.pack(">IIiI", tag, typ, len(data), count)
        data += payload
    return struct.pack(">II", len(entries), len(data)) + index + data


def test_rpm_header_blobs(tmp_path: Path) -> None:
    good = _header([(1000, 6, b"tiny\x00", 1), (1001, 6, b"1.0\x00", 1), (1002, 6, b"3\x00", 1),
                    (1022, 6, b"x86_64\x00", 1)])
    p = db.parse_rpm_header(good, Distro("fedora", "39"), "db")
    assert p is not None and p.purl == "pkg:rpm/fedora/tiny@1.0-3?arch=x86_64&distro=fedora-39"
    for bad in (b"", good[:-1], _header([(1000, 6, b"tiny", 1)]),  # unterminated string
                _header([(1000, 6, b"a\x00", 1), (1001, 6, b"1\x00", 1), (1116, 4, b"\x00\x00\x00\x09", 1),
                         (1117, 8, b"f\x00", 1), (1118, 8, b"/\x00", 1)]),  # DIRINDEXES past DIRNAMES
                struct.pack(">II", 0xFFFFFFF, 0) + b"\x00" * 16):
        with pytest.raises(FormatError):
            db.parse_rpm_header(bad, DEB12, "db")
    # a database whose Packages is a view, or that is no database, is refused
    path = tmp_path / "v.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE VIEW Packages AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
                 "SELECT x AS hnum, x AS blob FROM c")
    conn.commit()
    conn.close()
    with pytest.raises(FormatError, match="no Packages table"):
        db.parse_rpmdb_sqlite(path.read_bytes(), DEB12)
    with pytest.raises(FormatError):
        db.parse_rpmdb_sqlite(b"SQLite format 3\x00" + b"\xff" * 200, DEB12)
    with pytest.raises(FormatError):
        db.parse_rpmdb_sqlite(b"not sqlite", DEB12)


def test_language_packages() -> None:
    meta = b"Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.0\nLicense: MIT\nSummary: s\n\nbody"
    p = db.parse_python_metadata(meta, "/x/Foo_Bar-1.0.dist-info/METADATA")
    assert p.purl == "pkg:pypi/foo-bar@1.0" and p.license == "MIT"
    with pytest.raises(FormatError):
        db.parse_python_metadata(b"Name: ../../x\nVersion: 1\n", "m")
    q = db.parse_package_json(b'{"name": "@scope/pkg", "version": "2.0.0", "license": "ISC"}', "p")
    assert q is not None and q.purl == "pkg:npm/%40scope/pkg@2.0.0"
    assert db.parse_package_json(b'{"private": true}', "p") is None
    for bad in (b"[", b"[1]", b"[" * 100_000):
        with pytest.raises(FormatError):
            db.parse_package_json(bad, "p")
