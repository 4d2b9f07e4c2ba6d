"""A recipe's ``run`` step: a shell script in a container rooted at an unpacked tree, with ``shoal run``'s
isolation (podman's capabilities, seccomp profile, noNewPrivileges, pids limit, its own namespaces) and
no network unless asked (docs/spec/lineage.md §7).

Mount points runc creates in the tree for the container (``/proc``, ``/sys``, ``/dev``, the resolver file)
are removed afterwards when the tree did not have them, so they do not become part of the image.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import NotFound, ShoalError
from shoal.mount import netns
from shoal.mount.run import RunOptions, capabilities, seccomp_for
from shoal.mount.runtime_spec import Bind, ProcessSpec, UserIds, build_spec, container_env

__all__ = ["RunSpec", "run_in_tree", "inside"]

log = logging.getLogger(__name__)

_MOUNT_POINTS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class RunSpec:
    script: str  # run by /bin/sh -e -c
    env: tuple[str, ...]  # K=V: the image's Env, the recipe's env, SOURCE_DATE_EPOCH
    cwd: str = "/"
    network: bool = False
    runtime: str = "runc"
    output: int = 2  # the container's stdout and stderr go to this descriptor


def inside(root: str, path: str) -> str:
    """The host path of ``path`` in the tree at ``root``, resolving symlinks as a process chrooted there
    would (a link never leads out of ``root``): ``shoal run``'s rule (mount/run.py)."""
    from shoal.mount.run import inside as run_inside

    try:
        return run_inside(root, path)
    except OSError as exc:
        raise ShoalError(f"{exc.strerror} of the image") from None


def _first_missing(root: str, path: str) -> str | None:
    """The first component of ``path`` (in the tree) that does not exist, as a host path; None if it does."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        cur = cur.rstrip("/") + "/" + part
        host = inside(root, cur)
        if not os.path.lexists(host):
            return host
    return None


def run_in_tree(root: str, spec: RunSpec) -> int:
    """Run ``spec.script`` in a container whose root file system is the directory ``root`` (changed in
    place); return its exit code."""
    root = os.path.realpath(root)
    runtime = shutil.which(spec.runtime)
    if runtime is None:
        raise NotFound(f"OCI runtime {spec.runtime!r} not found in PATH (a recipe's run step needs runc)")
    ropts = RunOptions(network="auto" if spec.network else "none")
    caps = capabilities(ropts)
    sec = seccomp_for(ropts, caps)
    mode = netns.check_network(ropts.network)
    name = f"shoal-recipe-{secrets.token_hex(6)}"
    bundle = Path(tempfile.mkdtemp(prefix="shoal-recipe-bundle-"))
    os.chmod(bundle, 0o700)
    binds: list[Bind] = []
    net: netns.ContainerNetwork | None = None
    try:
        net = netns.open_network(mode, bundle)
        if spec.network:
            if net.resolv is not None:
                (bundle / "resolv.conf").write_text(net.resolv)
                binds.append(Bind(str(bundle / "resolv.conf"), "/etc/resolv.conf", True))
            elif os.path.isfile("/etc/resolv.conf"):
                binds.append(Bind("/etc/resolv.conf", "/etc/resolv.conf", True))
        missing = {m for m in (_first_missing(root, p) for p in _MOUNT_POINTS + tuple(b.destination for b in binds))
                   if m is not None}
        user = UserIds(0, 0, (), "/root")
        env = container_env(spec.env, (), {}, name, user, False)
        proc = ProcessSpec(("/bin/sh", "-e", "-c", spec.script), env, spec.cwd, user, False)
        doc = build_spec(proc, name, binds, root, caps=caps, seccomp=sec, netns=net.path)
        (bundle / "config.json").write_text(json.dumps(doc, indent=1))
        log.info("running a recipe step in %s (network: %s)", root, mode)
        with open(os.devnull, "rb") as null:
            p = subprocess.run([runtime, "run", "--bundle", str(bundle), name], stdin=null, stdout=spec.output,
                               stderr=spec.output, check=False)
        rc = p.returncode if p.returncode >= 0 else 128 - p.returncode
        r = subprocess.run([runtime, "state", name], capture_output=True, check=False)
        if r.returncode == 0:
            subprocess.run([runtime, "delete", "--force", name], capture_output=True, check=False)
        for m in sorted(missing, reverse=True):  # what runc made for its mounts, not the step
            if os.path.isdir(m) and not os.path.islink(m):
                shutil.rmtree(m, ignore_errors=True)
            elif os.path.lexists(m):
                os.unlink(m)
        return rc
    finally:
        if net is not None:
            net.close()
        shutil.rmtree(bundle, ignore_errors=True)
