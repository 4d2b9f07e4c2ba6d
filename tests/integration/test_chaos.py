"""Pushes and pulls through a chaos proxy (dropped, reset, stalled, truncated and bit-flipped requests and
answers, both ways) in front of the real registry, and concurrent pulls racing ``shoal gc``.

Every transfer must complete through retries or a re-run; nothing corrupt may be stored (``shoal fsck``
clean), every image keeps its digest and unpacks to exactly its source tree.  A failed attempt must
end in one ``shoal: error:`` line, never an internal error.  Counts scale with ``SHOAL_STRESS``
(``make stress``); the seed is printed, and ``SHOAL_CHAOS_SEED`` replays it; ``SHOAL_CHAOS_RATE``
sets the share of requests that meet a fault.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from chaos import ChaosProxy, chaos_rate, chaos_seed, family_trees, isolated_auth, scaled  # noqa: E402,F401
from regfix import Registry, _need_registry  # noqa: E402
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.copier import CopyOptions, CopyResult, copy  # noqa: E402
from shoal.errors import ShoalError  # noqa: E402
from shoal.reader import Reader, StoreSource  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.store.maintenance import FsckReport, fsck  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402
from shoal.unpack import unpack  # noqa: E402

MAX_ATTEMPTS = 12


@dataclass(frozen=True)
class Family:
    reg: Registry
    store: Path  # the source store: base:1, v0:1 ... (built from ``trees``)
    refs: tuple[str, ...]
    trees: dict[str, Path]
    digests: dict[str, str]
    repo: str  # every image pushed there (tag = the ref's name), straight to the registry


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Family]:
    _need_registry()
    d = tmp_path_factory.mktemp("chaos")
    reg = Registry(d / "reg")
    reg.start()
    try:
        trees = family_trees(d / "trees", variants=7)
        store = d / "src"
        refs, digests, by_ref = [], {}, {}
        for t in trees:
            ref = f"{t.name}:1"
            m = build(Store.open(store), t, ref, BuildOptions(workers=2)).manifest
            refs.append(ref)
            digests[ref] = m.digest
            by_ref[ref] = t
        assert len(Store.open(store).resolve("base:1").packs) >= 2
        repo = f"chaos/src{uuid.uuid4().hex[:6]}"
        for ref in refs:
            transfer(ref, f"docker://{reg.host}/{repo}:{ref.split(':')[0]}", store)
        yield Family(reg, store, tuple(refs), by_ref, digests, repo)
    finally:
        reg.close()


def shoal(store: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return helpers.run_shoal(store, *args, check=check, timeout=180)


def transfer(src: str, dst: str, store: Path, **kw: Any) -> CopyResult:
    """What ``shoal push``/``pull`` do, in this process (no interpreter start-up per attempt)."""
    o: dict[str, object] = {"backoff": 0.02, "retries": 3, "store": str(store), **kw}
    return copy(parse_reference(src), parse_reference(dst), CopyOptions(concurrency=4, src_opts=o, dst_opts=o))


def until_ok(src: str, dst: str, store: Path, seed: int, attempts: int = MAX_ATTEMPTS, **kw: Any) -> int:
    """Copy until it succeeds; return how many attempts it took.  Every failure must be a ShoalError
    (the CLI prints it as one line with its documented exit code), not an internal error."""
    for n in range(1, attempts + 1):
        try:
            transfer(src, dst, store, **kw)
            return n
        except ShoalError as exc:
            last = exc
            assert exc.exit_code not in (0, 1, 70), f"seed {seed}: {src} -> {dst}: {exc!r}"
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"seed {seed}: {src} -> {dst}: internal error {exc!r}") from exc
    raise AssertionError(f"seed {seed}: {src} -> {dst} still failing after {attempts} attempts: {last}")


def fsck_clean(store: Path, seed: int) -> FsckReport:
    rep = fsck(Store.open(store))
    assert rep.ok, f"seed {seed}: fsck of {store}: {rep.errors}"
    return rep


def assert_exact(store: Path, ref: str, tree: Path, dest: Path) -> None:
    st = Store.open(store)
    idx = st.load_index(st.resolve(ref))
    unpack(idx, Reader(idx, StoreSource(st)), str(dest))
    helpers.assert_same_tree(helpers.tree_snapshot(tree), helpers.tree_snapshot(dest))


def digest_of(store: Path, ref: str) -> str:
    return Store.open(store).resolve(ref).digest


# ------------------------------------------------------------------------------------------ chaos


def test_pushes_through_chaos(family: Family, tmp_path: Path) -> None:
    """Odd pushes upload in 128 KiB PATCH chunks, even ones in one PUT."""
    seed = chaos_seed()
    print(f"chaos seed {seed} (replay: SHOAL_CHAOS_SEED={seed})")
    n = scaled(20, 50)
    proxy = ChaosProxy(family.reg.url, seed, rate=chaos_rate(0.15))
    pushed: list[tuple[str, str]] = []
    tries = 0
    try:
        for i in range(n):
            ref = family.refs[i % len(family.refs)]
            dst = f"chaos/push{i}-{uuid.uuid4().hex[:6]}:1"  # a new repository: every blob is sent
            kw: dict[str, Any] = {"chunk_size": 128 * 1024} if i % 2 else {}
            tries += until_ok(ref, f"docker://{proxy.host}/{dst}", family.store, seed, **kw)
            pushed.append((ref, dst))
    finally:
        proxy.close()
    print(f"{n} pushes in {tries} attempts; {proxy.requests} requests, faults: {proxy.counts()}")
    assert len(proxy.log) >= n, f"seed {seed}: too few faults to mean anything: {proxy.counts()}"
    # pull every pushed image back straight from the registry: same digest, clean store, exact trees
    check = tmp_path / "check"
    for ref, dst in pushed:
        name = dst.replace("/", "-").replace(":", "-") + ":1"
        transfer(f"docker://{family.reg.host}/{dst}", name, check)
        assert digest_of(check, name) == family.digests[ref], f"seed {seed}: {dst} is not {ref}"
    fsck_clean(check, seed)
    done: set[str] = set()
    for ref, dst in pushed:
        if ref not in done:
            done.add(ref)
            name = dst.replace("/", "-").replace(":", "-") + ":1"
            assert_exact(check, name, family.trees[ref], tmp_path / f"out-{ref.split(':')[0]}")


def test_pulls_through_chaos(family: Family, tmp_path: Path) -> None:
    """Odd pulls go into one shared store (range reads of the frames it lacks), even ones into fresh
    stores (whole packs)."""
    seed = chaos_seed()
    print(f"chaos seed {seed} (replay: SHOAL_CHAOS_SEED={seed})")
    n = scaled(20, 50)
    proxy = ChaosProxy(family.reg.url, seed, rate=chaos_rate(0.25))
    shared = tmp_path / "shared"
    pulled: list[tuple[str, Path]] = []
    tries = 0
    try:
        for i in range(n):
            ref = family.refs[(i // 2) % len(family.refs)] if i % 2 else family.refs[i % len(family.refs)]
            store = shared if i % 2 else tmp_path / f"s{i}"
            src = f"docker://{proxy.host}/{family.repo}:{ref.split(':')[0]}"
            tries += until_ok(src, ref, store, seed)
            assert digest_of(store, ref) == family.digests[ref], f"seed {seed}: pull {i} of {ref}"
            pulled.append((ref, store))
    finally:
        proxy.close()
    print(f"{n} pulls in {tries} attempts; {proxy.requests} requests, faults: {proxy.counts()}")
    assert len(proxy.log) >= n, f"seed {seed}: too few faults to mean anything: {proxy.counts()}"
    for i, (ref, store) in enumerate(pulled):
        if store != shared:
            fsck_clean(store, seed)
            assert_exact(store, ref, family.trees[ref], tmp_path / f"out{i}")
    rep = fsck_clean(shared, seed)
    in_shared = sorted({ref for ref, s in pulled if s == shared})
    assert rep.images == len(in_shared)
    for ref in in_shared:
        assert_exact(shared, ref, family.trees[ref], tmp_path / f"shared-{ref.split(':')[0]}")


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_pulls_while_gc_loops(family: Family, tmp_path: Path) -> None:
    """8 pulls of overlapping images into one store at once, while ``shoal gc`` runs in a loop.

    Even rounds: an empty store and 8 different images (whole packs, shared by several pulls).
    Odd rounds: a store holding base:1 and each of 4 variants pulled twice at once (range reads:
    two pulls fill, and promote, the same partial packs)."""
    rounds = scaled(2, 10)
    for r in range(rounds):
        store = tmp_path / f"s{r}"
        if r % 2:
            transfer(f"docker://{family.reg.host}/{family.repo}:base", "base:1", store)
            variants = [ref for ref in family.refs if ref != "base:1"]
            refs = [variants[(i // 2 + 4 * (r // 2)) % len(variants)] for i in range(8)]
        else:
            Store.open(store)
            refs = [family.refs[(i + r) % len(family.refs)] for i in range(8)]
        stop = threading.Event()
        gcs: list[subprocess.CompletedProcess[bytes]] = []

        def gc_loop(store: Path, stop: threading.Event, gcs: list[subprocess.CompletedProcess[bytes]]) -> None:
            while not stop.is_set():
                gcs.append(shoal(store, "gc", "--json", check=False))
                time.sleep(0.01)

        t = threading.Thread(target=gc_loop, args=(store, stop, gcs), daemon=True)
        t.start()
        procs = [subprocess.Popen(helpers.shoal_cmd(store, "pull", "-j", "2",
                                                    f"docker://{family.reg.host}/{family.repo}:{ref.split(':')[0]}",
                                                    ref),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for ref in refs]
        outs = [p.communicate(timeout=180) for p in procs]
        stop.set()
        t.join(60)
        for ref, p, (_, err) in zip(refs, procs, outs):
            assert p.returncode == 0, f"round {r}: pull of {ref}: {err.decode()[-2000:]}"
        bad_gc = [g for g in gcs if g.returncode != 0]
        assert len(gcs) >= 2 and not bad_gc, [g.stderr.decode() for g in bad_gc]
        want = set(refs) | ({"base:1"} if r % 2 else set())
        rep = fsck_clean(store, 0)
        assert rep.images == len(want)
        for ref in sorted(want):
            assert digest_of(store, ref) == family.digests[ref]
            assert_exact(store, ref, family.trees[ref], tmp_path / f"out{r}-{ref.split(':')[0]}")
        # and a last gc, with nothing running, keeps every image whole
        shoal(store, "gc")
        fsck_clean(store, 0)
