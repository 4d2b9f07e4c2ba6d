"""SIGKILL ``shoal build``, ``shoal convert`` and ``shoal pull`` at random points; after each kill the store
is ``fsck`` clean and a re-run gives the manifest digest of an uninterrupted run.

Kill points: most kills land a random 0-400 ms after the command's first write into the store
(a new file in tmp/, partial/ or blobs/), the rest a random 0-1 s after start (start-up, store set-up);
a run that ends before its kill narrows that window to 90% of its own time, so a faster command is
still killed inside its work, and once a run ends before any write shows (a pull into a store that
already holds most of it writes only as it ends), the runs into such stores are killed after start.
Half of the runs go into a store that already holds a related image (so they reuse packs, or pull
only some frames into partial packs).  ``SHOAL_STRESS=N`` multiplies the kills; the seed is printed
and ``SHOAL_CHAOS_SEED`` replays the kill points.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))

from convtools import Tar, write_layout  # noqa: E402

import helpers  # noqa: E402
from chaos import Forked, Forker, chaos_seed, family_trees, isolated_auth, scaled  # noqa: E402,F401
from regfix import Registry, _need_registry  # noqa: E402
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.convert import convert  # noqa: E402
from shoal.copier import CopyOptions, copy  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.store.maintenance import fsck  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402

KILLS_PER_COMMAND = scaled(10, 40)


@dataclass(frozen=True)
class Sources:
    base: Path  # a tree
    variant: Path  # the base tree with a few files changed
    seeded: Path  # a store holding base:1 only
    registry: str  # host:port holding chaos/k:base and chaos/k:variant
    layout: Path  # an OCI layout: tag "base" (2 gzip layers: the base tree, then the variant's changes)


def _tar(root: Path, only: set[str] | None = None) -> bytes:
    t = Tar()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            t.dir(rel)
        elif only is None or rel in only:
            t.file(rel, p.read_bytes())
    return t.bytes()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    _need_registry()
    d = tmp_path_factory.mktemp("kill")
    base, variant = family_trees(d / "trees", variants=1)
    seeded = d / "seeded"
    build(Store.open(seeded), base, "base:1", BuildOptions(workers=2))
    build(Store.open(seeded), variant, "variant:1", BuildOptions(workers=2))
    reg = Registry(d / "reg")
    reg.start()
    try:
        for ref in ("base:1", "variant:1"):
            o: dict[str, object] = {"store": str(seeded)}
            copy(parse_reference(ref), parse_reference(f"docker://{reg.host}/chaos/k:{ref[:-2]}"),
                 CopyOptions(src_opts=o, dst_opts=o))
        Store.open(seeded).untag("variant:1")
        changed = {p.relative_to(variant).as_posix() for p in variant.rglob("*")
                   if p.is_file() and (not (base / p.relative_to(variant)).exists()
                                       or (base / p.relative_to(variant)).read_bytes() != p.read_bytes())}
        write_layout(d / "layout", "base", [_tar(base), _tar(variant, changed)])
        yield Sources(base, variant, seeded, reg.host, d / "layout")
    finally:
        reg.close()


# ------------------------------------------------------------------------------------------ the commands


@dataclass(frozen=True)
class Command:
    name: str
    args: Callable[[Sources], list[str]]  # CLI arguments after --store
    rerun: Callable[[Sources, Path], str]  # the same, in this process; returns the manifest digest


def _pull_rerun(src: Sources, store: Path) -> str:
    o: dict[str, object] = {"store": str(store), "backoff": 0.05}
    return copy(parse_reference(f"docker://{src.registry}/chaos/k:variant"), parse_reference("variant:1"),
                CopyOptions(src_opts=o, dst_opts=o)).digest


def _convert_rerun(src: Sources, store: Path) -> str:
    with parse_reference(f"oci:{src.layout}:base").new_source() as source:
        return convert(source, Store.open(store), "conv:1").digest


COMMANDS = [
    Command("build", lambda s: ["build", "--workers", "2", str(s.variant), "variant:1"],
            lambda s, st: build(Store.open(st), s.variant, "variant:1", BuildOptions(workers=2)).manifest.digest),
    Command("convert", lambda s: ["convert", f"oci:{s.layout}:base", "conv:1"], _convert_rerun),
    Command("pull", lambda s: ["pull", "-j", "2", f"docker://{s.registry}/chaos/k:variant", "variant:1"], _pull_rerun),
]


def _store_files(store: Path) -> set[str]:
    out: set[str] = set()
    for sub in ("tmp", "partial", "blobs/sha256"):
        try:
            out.update(f"{sub}/{n}" for n in os.listdir(store / sub))
        except FileNotFoundError:
            pass
    return out


class _Exec:
    """A ``shoal`` process of its own (interpreter start-up included)."""

    def __init__(self, cmd: list[str]) -> None:
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def poll(self) -> int | None:
        return self.p.poll()

    def kill(self) -> None:
        self.p.kill()

    def wait(self) -> tuple[int, bytes]:
        _, err = self.p.communicate(timeout=120)
        return self.p.returncode, err


def _kill_once(run: _Exec | Forked, store: Path, rng: random.Random, early: bool, window: float
               ) -> tuple[bool, str, float, bool]:
    """SIGKILL ``run`` at a random point: up to ``window`` seconds after its start (early), or after its
    first write.  Returns (killed, where, seconds it worked since that start or first write, whether it
    had written before it ended or was killed)."""
    before = _store_files(store)
    t0 = time.monotonic()
    try:
        if early:
            t1, wrote = t0, True
            delay = rng.uniform(0.0, window)
            while run.poll() is None and time.monotonic() - t0 < delay:
                time.sleep(0.002)
            where = f"{delay:.3f}s after start"
        else:
            while run.poll() is None and _store_files(store) == before and time.monotonic() - t0 < 60:
                time.sleep(0.001)
            wrote = _store_files(store) != before
            delay = rng.uniform(0.0, window)
            t1 = time.monotonic()
            while run.poll() is None and time.monotonic() - t1 < delay:
                time.sleep(0.002)
            where = f"{delay:.3f}s after its first write"
        alive = run.poll() is None
        if alive:
            run.kill()
        worked = time.monotonic() - t1
    finally:
        if run.poll() is None:
            run.kill()
        code, err = run.wait()
    if not alive:
        assert code == 0, f"the run failed on its own (exit {code}): {err.decode()[-2000:]}"
    return alive and code == -signal.SIGKILL, where, worked, wrote


@pytest.fixture
def forker(tmp_path: Path) -> Iterator[Forker]:
    f = Forker(tmp_path)
    yield f
    f.close()


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_sigkill_then_fsck_and_rerun(sources: Sources, tmp_path: Path, command: Command, forker: Forker) -> None:
    """Early kills run ``shoal`` as its own process; the others fork it from a pre-imported one."""
    seed = chaos_seed()
    print(f"kill seed {seed} (replay: SHOAL_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    # an uninterrupted run into each kind of store: a build or convert takes the chunks a store already
    # holds from where they are (format.md §5), so a seeded store gives its own (reproducible) digest
    shutil.copytree(sources.seeded, tmp_path / "reference-seeded")
    want = {False: command.rerun(sources, tmp_path / "reference"),
            True: command.rerun(sources, tmp_path / "reference-seeded")}
    kills = runs = 0
    times = [0.0] * 4
    # kill up to this long after the first write (by seeded store or not), or after the start (early)
    window = {(False, False): 0.4, (True, False): 0.4, (False, True): 1.0, (True, True): 1.0}
    late = {False: False, True: False}  # runs into such a store write only as they end: kill them early
    while kills < KILLS_PER_COMMAND:
        runs += 1
        assert runs <= 4 * KILLS_PER_COMMAND, f"seed {seed}: only {kills} kills in {runs} runs: the runs are too fast"
        store = tmp_path / f"s{runs}"
        seeded = rng.random() < 0.5
        if seeded:
            shutil.copytree(sources.seeded, store)
        early = late[seeded] or rng.random() < 0.25
        if not early:
            Store.open(store)  # set up, so the first write the test waits for is the command's work
        t0 = time.monotonic()
        args = ["--store", str(store), *command.args(sources)]
        run = _Exec(helpers.shoal_cmd(None, *args)) if early else forker.start(args)
        killed, where, worked, wrote = _kill_once(run, store, rng, early, window[seeded, early])
        if not wrote:
            late[seeded] = True
        elif not killed:  # it finished first: aim inside its real work time
            window[seeded, early] = max(0.01, 0.9 * worked)
        what = f"seed {seed}, run {runs}: {command.name} killed {where} ({'seeded' if seeded else 'fresh'} store)"
        t1 = time.monotonic()
        rep = fsck(Store.open(store))
        assert rep.ok, f"{what}: fsck after the kill: {rep.errors}"
        t2 = time.monotonic()
        got = command.rerun(sources, store)
        t3 = time.monotonic()
        assert got == want[seeded], f"{what}: the re-run gives {got}, an uninterrupted run {want[seeded]}"
        rep = fsck(Store.open(store))
        assert rep.ok, f"{what}: fsck after the re-run: {rep.errors}"
        kills += killed
        shutil.rmtree(store)
        times = [a + b for a, b in zip(times, (t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3))]
    print(f"{command.name}: {kills} kills in {runs} runs; seconds killing, fsck, re-run, fsck: "
          f"{', '.join(f'{t:.1f}' for t in times)}")
