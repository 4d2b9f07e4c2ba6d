"""A small CRI v1 client for tests (kubernetes/cri-api v0.26.3 ``runtime/v1/api.proto``).

The stubs are generated at test time into a temporary directory with grpc_tools (pinned in the
``test`` extras), from the copy of the proto under ``$SHOAL_CRI_PROTO`` (default
``/work/shared/proto/cri-api/runtime/v1/api.proto``), with gogoproto stripped by the three regexes
of the containerd recipe (§2).  Nothing here is imported by ``src/``.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PROTO", "compile_cri", "CriClient"]

PROTO = Path(os.environ.get("SHOAL_CRI_PROTO", "/work/shared/proto/cri-api/runtime/v1/api.proto"))


def _strip_gogo(text: str) -> str:
    text = re.sub(r'^import\s+(weak\s+)?"[^"]*gogo\.proto";\n', "", text, flags=re.M)
    text = re.sub(r"^option\s+\(gogoproto\.[^;]*;\n", "", text, flags=re.M)
    return re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)


def compile_cri(out: Path) -> tuple[ModuleType, ModuleType]:
    """Compile the CRI proto into ``out/cri_v1/`` and import it: ``(api_pb2, api_pb2_grpc)``."""
    from grpc_tools import protoc

    pkg = out / "cri_v1"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.proto").write_text(_strip_gogo(PROTO.read_text()))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{out}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(pkg / "api.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} ({rc})")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("cri_v1.api_pb2"), importlib.import_module("cri_v1.api_pb2_grpc")


class CriClient:
    """``RuntimeService`` and ``ImageService`` stubs on one channel; ``pb`` is the message module."""

    def __init__(self, socket: Path, stubs_dir: Path) -> None:
        import grpc

        self.pb, grpc_mod = compile_cri(stubs_dir)
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime: Any = grpc_mod.RuntimeServiceStub(self.channel)
        self.images: Any = grpc_mod.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
