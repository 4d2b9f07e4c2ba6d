"""Crashes the fuzz harnesses found, one test each (they run in ``make test``)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from shoal.convert.layers import LayerApplier
from shoal.convert.stream import ConvertLimits
from shoal.copier import descriptors_of
from shoal.errors import FormatError, HostileInput, UsageError
from shoal.format import cbor
from shoal.format import index as fidx
from shoal.format.manifest import json_object, parse_config, parse_manifest
from shoal.format.model import Entry, Kind
from shoal.store import normalize_ref
from shoal.transports.base import parse_reference

DEEP = b'{"schemaVersion":2,"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("parse", [json_object, parse_manifest, parse_config])
def test_deeply_nested_json_is_a_format_error(parse) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormatError, match="nested too deeply"):  # was RecursionError
        parse(DEEP)


@pytest.mark.parametrize("doc", [b'{"schemaVersion":2,"config":{},"layers":5}',  # was TypeError
                                 b'{"schemaVersion":2,"config":{"digest":"sha256:' + b"0" * 64 + b'","size":-1}}',
                                 b'{"schemaVersion":2,"config":{"digest":"sha256:' + b"0" * 64 + b'","size":true}}'])
def test_manifest_descriptors_are_checked(doc: bytes) -> None:
    with pytest.raises(FormatError):
        descriptors_of(doc)


@pytest.mark.parametrize("text", ["oci:x:@" + "1" * 5000, "oci-archive:x:@" + "1" * 5000,
                                  "docker-archive:x:@" + "1" * 5000])  # was ValueError from int()
def test_huge_index_position_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


@pytest.mark.parametrize("text", ["foo\n", "foo:latest\n"])  # "$" matched before the newline
def test_local_names_refuse_a_trailing_newline(text: str) -> None:
    with pytest.raises(UsageError):
        normalize_ref(text)
    with pytest.raises(UsageError):
        parse_reference(text)


@pytest.mark.parametrize("text", ["docker://a:é", "docker://a:٣"])  # a Unicode \w accepted them
def test_docker_tags_are_ascii(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_sparse_holes_count_against_the_limit(tmp_path: Path) -> None:
    """A 10 KiB tar declaring a 200 MiB sparse file used to spill 200 MiB of zeros past a 1 MiB limit."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        ti.pax_headers = {"GNU.sparse.size": str(200 << 20), "GNU.sparse.map": "0,1"}
        tf.addfile(ti, io.BytesIO(b"x"))
    blob = buf.getvalue()
    ap = LayerApplier(tmp_path, ConvertLimits(max_total_bytes=1 << 20))
    try:
        with pytest.raises(HostileInput, match="sparse file f inflates past the limit"):
            ap.apply(io.BytesIO(blob), digest="sha256:" + hashlib.sha256(blob).hexdigest(), size=len(blob))
        assert ap.spill.size < 1 << 20
    finally:
        ap.close()


def test_index_format_true_is_refused() -> None:
    """``doc["format"] != FORMAT`` let ``true`` through (True == 1): a second encoding of the same index."""
    idx = fidx.make_index([Entry(b"", Kind.DIR, 0o755, 0, 0, 0)], [], [], [], [], [], [])
    doc = cbor.decode(fidx.encode(idx))
    doc["format"] = True
    with pytest.raises(FormatError):
        fidx.decode(cbor.encode(doc))


@pytest.mark.parametrize("where", ["index.json", "manifest"])
def test_deeply_nested_json_in_a_layout_is_one_error_line(tmp_path: Path, where: str) -> None:
    """json.loads raises RecursionError (not ValueError) on ``[[[[...``: every JSON a source or the store
    reads goes through ``json_loads``/``json_value``, so it is a malformed-input error, not an internal one."""
    import hashlib
    import json as _json
    import subprocess
    import sys as _sys

    bomb = b"[" * 200_000 + b"]" * 200_000
    lay = tmp_path / "lay"
    (lay / "blobs" / "sha256").mkdir(parents=True)
    (lay / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if where == "index.json":
        (lay / "index.json").write_bytes(bomb)
    else:
        d = hashlib.sha256(bomb).hexdigest()
        (lay / "blobs" / "sha256" / d).write_bytes(bomb)
        (lay / "index.json").write_text(_json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + d, "size": len(bomb),
            "annotations": {"org.opencontainers.image.ref.name": "x"}}]}))
    p = subprocess.run([_sys.executable, "-c", "import sys; from shoal.cli import main; sys.exit(main())",
                        "--store", str(tmp_path / "s"), "inspect", f"oci:{lay}:x"], capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode not in (0, 70), err
    assert len(err.splitlines()) == 1 and err.startswith("shoal: error: ") and "internal" not in err, err
