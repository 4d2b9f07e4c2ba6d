"""The README's containerd quickstart, run line for line (issue 11: "tried from a fresh machine by a test").

The shell block under "## containerd quickstart" is run by bash as written, with three kinds of change
only: its system paths (the snapshotter's socket and root, containerd's config) become temporary ones;
``systemctl restart containerd`` is a shell function that starts a private containerd 1.6 with that
config (its root, state and socket are written into the config first); and ``python3 -c 'print(1)'``
becomes ``sh -c 'echo 1'`` (the test image is dash and its libraries).  ``ctr`` and ``ctr-remote``
find the private containerd through ``$CONTAINERD_ADDRESS``.
"""
# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from containerd_fix import NS, SHOAL, Containerd, gets, pack_digests, published, tiny_tree  # noqa: E402

from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.skipif(
    shutil.which("containerd") is None or shutil.which("ctr-remote") is None or os.geteuid() != 0,
    reason="needs root, containerd and ctr-remote (apt-get install containerd stargz-snapshotter)")


def quickstart_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in the README."""
    text = README.read_text()
    at = text.index(heading)
    m = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert m, f"no ```sh block under {heading!r} in README.md"
    return m.group(1)


def test_readme_block_is_the_one_documented() -> None:
    block = quickstart_block("## containerd quickstart")
    for line in ("shoal snapshotter --address /run/shoal/snapshotter.sock", "cat >> /etc/containerd/config.toml",
                 "systemctl restart containerd", "ctr-remote image rpull", "ctr run --snapshotter shoal"):
        assert line in block


def test_containerd_quickstart(tmp_path: Path, registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory(access_log=True)
    tree = tmp_path / "tree"
    tiny_tree(tree)
    run_shoal(tmp_path / "build-store", "build", tree, "app:1")
    run_shoal(tmp_path / "build-store", "push", "app:1", f"docker://{reg.host}/app:1")
    shoal_digest, _stub = published(reg, "app", "1")

    cd = Containerd(tmp_path / "q")  # for its paths and its clean-up; the README starts the processes
    cd.config.write_text(f'version = 2\nroot = "{cd.work}/cd/lib"\nstate = "{cd.work}/cd/state"\n'
                         'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                         f'[grpc]\n  address = "{cd.sock}"\n[ttrpc]\n  address = "{cd.sock}.ttrpc"\n')
    block = (quickstart_block("## containerd quickstart")
             .replace("/run/shoal/snapshotter.sock", str(cd.snap_sock))
             .replace("/var/lib/shoal-snapshotter", str(cd.snap_root))
             .replace("/etc/containerd/config.toml", str(cd.config))
             .replace("python3 -c 'print(1)'", "sh -c 'echo 1'"))
    prelude = f"""set -e
systemctl() {{
  containerd --config {cd.config} </dev/null >>{cd.work}/containerd.log 2>&1 &
  for _ in $(seq 300); do ctr version >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "containerd did not start" >&2; return 1
}}
"""
    env = dict(os.environ, REGISTRY=reg.host, CONTAINERD_ADDRESS=str(cd.sock), CONTAINERD_NAMESPACE=NS,
               SHOAL_STORE=str(tmp_path / "node-store"), PATH=f"{Path(SHOAL).parent}:{os.environ['PATH']}")
    # files, not pipes: the snapshotter and containerd the block starts in the background keep them open
    out_f, err_f = tmp_path / "quickstart.out", tmp_path / "quickstart.err"
    try:
        with open(out_f, "wb") as o, open(err_f, "wb") as e:
            p = subprocess.Popen(["bash", "-c", prelude + block], env=env, stdout=o, stderr=e,
                                 start_new_session=True)
        try:
            p.wait(timeout=240)
        finally:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the snapshotter and containerd the block left running
            except ProcessLookupError:
                pass
        out, err = out_f.read_text(), err_f.read_text()
        assert p.returncode == 0, f"quickstart exited {p.returncode}: {err[-2000:]}\n{cd.log_tail()}"
        assert out.splitlines()[-1:] == ["1"], out
        fetched = {path for path, status in gets(reg) if status in (200, 206)}
        packs = pack_digests(reg, "app", shoal_digest)
        whole_packs = {path for path, status in gets(reg) if status == 200 and path.rsplit("/", 1)[-1] in packs}
        assert not whole_packs, f"a pack was downloaded whole: {whole_packs}"
        assert any(path.endswith(f"/manifests/{shoal_digest}") for path in fetched), fetched
    finally:
        cd.stop()
