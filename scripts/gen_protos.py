#!/usr/bin/env python3
"""Vendor and compile the containerd snapshots API for ``shoal snapshotter`` (issue 11).

Two steps, both deterministic:

``--vendor API_DIR``  copies ``services/snapshots/v1/snapshots.proto`` and ``types/mount.proto`` from
    containerd's ``api/`` directory (Debian: golang-github-containerd-containerd-dev,
    /usr/share/gocode/src/github.com/containerd/containerd/api) into src/shoal/snapshotter/proto/,
    strips gogoproto (the weak import, ``option (gogoproto.…)`` lines, ``[(gogoproto.…)]`` field
    options) and flattens the mount.proto import.  Only package, service and field numbers go on the
    wire, so the stripped files are wire-identical.
``--vendor-cri API_PROTO``  copies from kubernetes' cri-api ``pkg/apis/runtime/v1/api.proto`` (its
    licence header kept) the three messages the CRI keychain decodes (``ImageSpec``, ``AuthConfig``,
    ``PullImageRequest`` without its ``sandbox_config``, which is skipped as an unknown field) into
    ``cri_api.proto``, under the package ``shoal.snapshotter.cri``: message package names are not on
    the wire, and a distinct one cannot clash with a full ``runtime.v1`` in the same process.
(default)             runs grpc_tools.protoc on the vendored files and writes ``*_pb2.py``,
    ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to them (``--out DIR`` writes under DIR instead; the
    unit test tests/unit/test_snapshotter_protos.py regenerates into a temp dir and compares).

The generated files are committed; regenerate after bumping grpcio-tools and pin ``grpcio>=`` and
``protobuf>=`` in pyproject.toml to the versions the header of the generated code asks for.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PROTO_PKG = "shoal/snapshotter/proto"
FILES = ("mount.proto", "snapshots.proto", "cri_api.proto")
VENDOR = {"types/mount.proto": "mount.proto", "services/snapshots/v1/snapshots.proto": "snapshots.proto"}

_GOGO_IMPORT = re.compile(r'^import weak "gogoproto/gogo.proto";\n', re.M)
_GOGO_OPTION = re.compile(r"^\s*option \(gogoproto\.[^;]*;\n", re.M)
_GOGO_FIELD = re.compile(r"\s*\[\(gogoproto\.[^\]]*\]")
_MOUNT_IMPORT = re.compile(r'import "github.com/containerd/containerd/api/types/mount.proto";')


def strip(text: str) -> str:
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_OPTION.sub("", text)
    text = _GOGO_FIELD.sub("", text)
    return _MOUNT_IMPORT.sub(f'import "{PROTO_PKG}/mount.proto";', text)


def vendor(api_dir: Path) -> None:
    for rel, name in VENDOR.items():
        text = (api_dir / rel).read_text()
        header = f"// Vendored from containerd {rel} (Apache-2.0) by scripts/gen_protos.py: gogoproto stripped.\n"
        (SRC / PROTO_PKG / name).write_text(header + strip(text))


CRI_MESSAGES = ("ImageSpec", "AuthConfig", "PullImageRequest")
_CRI_DROP = re.compile(r"^\s*// Config of the PodSandbox[^\n]*\n\s*PodSandboxConfig sandbox_config = 3;\n", re.M)


def cri_extract(text: str) -> str:
    """The licence header and :data:`CRI_MESSAGES` of the CRI ``api.proto``."""
    header = re.match(r"\s*(/\*.*?\*/)\n", text, re.S)
    if header is None:
        raise SystemExit("no licence header in the CRI proto")
    out = [header.group(1), "",
           "// Vendored from kubernetes/cri-api pkg/apis/runtime/v1/api.proto by scripts/gen_protos.py:",
           "// only the messages the CRI keychain decodes (PullImageRequest.sandbox_config left out).",
           'syntax = "proto3";', "", "package shoal.snapshotter.cri;", ""]
    for name in CRI_MESSAGES:
        m = re.search(rf"^message {name} {{\n.*?^}}\n", text, re.S | re.M)
        if m is None:
            raise SystemExit(f"no message {name} in the CRI proto")
        out.append(_CRI_DROP.sub("", m.group(0)))
    return "\n".join(out)


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    (out / PROTO_PKG).mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{SRC}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}"] + [str(SRC / PROTO_PKG / f) for f in FILES]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vendor", type=Path, metavar="API_DIR")
    ap.add_argument("--vendor-cri", type=Path, metavar="API_PROTO")
    ap.add_argument("--out", type=Path, default=SRC)
    ns = ap.parse_args(argv)
    if ns.vendor is not None:
        vendor(ns.vendor)
    if ns.vendor_cri is not None:
        (SRC / PROTO_PKG / "cri_api.proto").write_text(cri_extract(ns.vendor_cri.read_text()))
    generate(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
