"""The default seccomp profile of ``shoal run``: podman's, from containers-common (docs/spec/mount.md §4).

``/usr/share/containers/seccomp.json`` (Debian's golang-github-containers-common, which skopeo and
podman pull in) is containers/common's own format: rules carry ``includes``/``excludes`` by
architecture and capability.  ``oci_profile`` resolves them for this machine's architecture and the
container's capabilities into the OCI runtime-spec ``linux.seccomp`` object, as containers/common
does, so the container gets the filter a rootful ``podman run`` gets, with one difference: the default
profile's x32 sub-architecture is left out (``x32=False``).  Each architecture in the filter costs runc
~7 ms to compile at every container start (36 ms for x86_64 + x86 + x32, 28 ms without x32, 17 ms with
no filter: ``runc run`` of ``/bin/true``, medians of 16), and lengthens the filter every system call
runs through.  The x32 ABI is off by default in Debian's kernels (``syscall.x32=y`` turns it on), so
an x32 system call fails there anyway; without x32 in the filter, it kills the process (the filter's
bad-architecture action) instead of being filtered by the x86_64 rules: never more than podman allows.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Collection

from shoal.errors import FormatError, NotFound, from_oserror
from shoal.format.manifest import json_value

__all__ = ["DEFAULT_PROFILE", "load_profile", "oci_profile"]

DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")

# uname -m -> the Go architecture names containers-common's profile uses in ``includes.arches``
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_SCMP_ARCH = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "arm": "SCMP_ARCH_ARM",
              "386": "SCMP_ARCH_X86", "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X",
              "riscv64": "SCMP_ARCH_RISCV64"}
_RULE_KEYS = ("names", "action", "args", "errnoRet")


def load_profile(path: Path | str = DEFAULT_PROFILE) -> dict[str, Any]:
    """The profile document at ``path``; NotFound with what to install if it is missing."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {path} not found (apt-get install golang-github-containers-common, or "
                       "--security-opt seccomp=FILE; seccomp=unconfined runs without one)") from None
    except OSError as exc:
        raise from_oserror(exc, "cannot read the seccomp profile", path) from None
    doc = json_value(raw, f"seccomp profile {path}")
    if not isinstance(doc, dict) or not isinstance(doc.get("syscalls"), list) or "defaultAction" not in doc:
        raise FormatError(f"seccomp profile {path} has no defaultAction or syscalls list")
    return doc


def _listed(x: Any) -> list[str]:
    return [str(v) for v in x] if isinstance(x, list) else []


def oci_profile(doc: dict[str, Any], caps: Collection[str], machine: str | None = None, *,
                x32: bool = True) -> dict[str, Any]:
    """``doc`` resolved for this architecture and ``caps`` (``CAP_*`` names) into ``linux.seccomp``;
    without its x32 sub-architecture unless ``x32`` (see the module text)."""
    goarch = _GOARCH.get(machine or platform.machine() or os.uname().machine, "")
    native = _SCMP_ARCH.get(goarch, "")
    arches: list[str] = []
    for entry in doc.get("archMap") or []:
        if isinstance(entry, dict) and entry.get("architecture") == native:
            arches = [native, *(a for a in _listed(entry.get("subArchitectures")) if x32 or a != "SCMP_ARCH_X32")]
    have = set(caps)
    rules = []
    for rule in doc["syscalls"]:
        if not isinstance(rule, dict) or not _listed(rule.get("names")):
            continue
        inc_raw, exc_raw = rule.get("includes"), rule.get("excludes")
        inc: dict[str, Any] = inc_raw if isinstance(inc_raw, dict) else {}
        exc: dict[str, Any] = exc_raw if isinstance(exc_raw, dict) else {}
        if _listed(inc.get("arches")) and goarch not in _listed(inc.get("arches")):
            continue
        if not set(_listed(inc.get("caps"))) <= have:
            continue
        if goarch in _listed(exc.get("arches")) or set(_listed(exc.get("caps"))) & have:
            continue
        rules.append({k: rule[k] for k in _RULE_KEYS if k in rule})
    out: dict[str, Any] = {"defaultAction": doc["defaultAction"], "syscalls": rules}
    if "defaultErrnoRet" in doc:
        out["defaultErrnoRet"] = doc["defaultErrnoRet"]
    if arches:
        out["architectures"] = arches
    return out
