"""rebase and apply on real Debian trees (issue 15): bookworm minbase + python3 rebased from one debootstrap
run onto another, compared entry by entry with a fresh install on the new base, and pushed to a real
registry that holds the image and the new base; apply of curl and python3 (each installed on the same base)
compared with installing both.  Trees are cached under $SHOAL_TEST_CACHE (tests/debtrees.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import debtrees  # noqa: E402
from regfix import Registry, registry  # noqa: E402,F401
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.cli import main  # noqa: E402
from shoal.copier import CopyOptions, copy  # noqa: E402
from shoal.format.manifest import ImageConfig  # noqa: E402
from shoal.format.model import Index, Kind  # noqa: E402
from shoal.merge import Input, lineage_record  # noqa: E402
from shoal.reader import Reader, StoreSource  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402

__all__ = ["registry"]

#: What two runs of the same steps do not reproduce (timestamps inside the files): the only paths a rebased
#: or applied tree may differ in from a fresh install, mtimes aside (docs/spec/lineage.md §6).
NONDETERMINISTIC = {b"var/cache/apt/pkgcache.bin", b"var/cache/apt/srcpkgcache.bin", b"var/cache/ldconfig/aux-cache",
                    b"var/log/dpkg.log", b"var/log/apt/history.log", b"var/log/apt/term.log",
                    b"var/log/apt/eipp.log.xz", b"var/log/alternatives.log"}


@pytest.fixture(scope="module")
def trees(debian_rootfs: Path, cache_dir: Path) -> dict[str, Path]:
    try:
        b2 = debtrees.debootstrap(cache_dir, "lineage-bookworm-2")
        return {
            "base1": debian_rootfs, "base2": b2,
            "app1": debtrees.with_packages(cache_dir, "lineage-b1-python3", debian_rootfs, ("python3",)),
            "app2": debtrees.with_packages(cache_dir, "lineage-b2-python3", b2, ("python3",)),
            "curl1": debtrees.with_packages(cache_dir, "lineage-b1-curl", debian_rootfs, ("curl",)),
            "both1": debtrees.with_packages(cache_dir, "lineage-b1-curl-python3", debian_rootfs,
                                            ("curl", "python3")),
        }
    except RuntimeError as exc:  # no network for apt-get
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def store(trees: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    st = Store.open(tmp_path_factory.mktemp("lineage") / "store")

    def b(name: str, tree: str, base: str | None = None) -> None:
        extra: dict[str, Any] = {}
        if base:
            extra["lineage"] = {"base": lineage_record(Input(base, st.resolve(base)))}
        build(st, trees[tree], name, BuildOptions(config=ImageConfig(extra=extra)))

    b("base:1", "base1")
    b("app:1", "app1", "base:1")
    b("curl:1", "curl1", "base:1")
    b("base:2", "base2")
    b("app-fresh:2", "app2", "base:2")
    b("both-fresh:1", "both1", "base:1")
    yield st


def _table(idx: Index) -> dict[bytes, tuple[Any, ...]]:
    """Every entry but its mtime (install times are not reproducible)."""
    return {e.path: (e.kind, e.mode, e.uid, e.gid, e.xattrs, e.size,
                     tuple(idx.chunk_ids[c] for c in e.chunks), e.target, e.rdev) for e in idx.entries}


def _differing(st: Store, a: str, b: str) -> set[bytes]:
    ta, tb = _table(st.load_index(st.resolve(a))), _table(st.load_index(st.resolve(b)))
    return {p for p in ta.keys() | tb.keys() if ta.get(p) != tb.get(p)}


def _read(st: Store, ref: str, path: bytes) -> bytes:
    idx = st.load_index(st.resolve(ref))
    e = idx.lookup(path)
    assert e is not None and e.kind == Kind.FILE
    return b"".join(Reader(idx, StoreSource(st)).iter_file(e))


def _push(st: Store, ref: str, dst: str) -> Any:
    o = {"store": str(st.root), "backoff": 0.05}
    return copy(parse_reference(ref), parse_reference(dst), CopyOptions(src_opts=o, dst_opts=o))


def test_rebase_on_an_independent_debootstrap(store: Store, registry: Registry,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    st = store
    repo = f"{registry.host}/lineage/app"
    _push(st, "base:1", f"docker://{repo}:base1")
    _push(st, "app:1", f"docker://{repo}:app1")
    m1, m2 = st.resolve("base:1"), st.resolve("base:2")
    new_base_packs = [p for p in m2.packs if p.digest not in {q.digest for q in st.resolve("app:1").packs}]
    base2_push = _push(st, "base:2", f"docker://{repo}:base2")
    new_of_base2 = sum(p.size for p in new_base_packs) + m2.index.size  # the new base's new chunks + its index

    # --onto through docker:// (a Shoal image of a registry: pulled, only missing chunks); --from recorded
    main(["--store", str(st.root), "rebase", "app:1", "--onto", f"docker://{repo}:base2", "-t", "app:2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["new_chunks"] == 0 and doc["new_packs"] == 0, doc
    app2 = st.resolve("app:2")
    inputs = {p.digest for m in (m1, m2, st.resolve("app:1")) for p in m.packs}
    assert {p.digest for p in app2.packs} <= inputs  # every pack is an input's: nothing copied

    diff = _differing(st, "app:2", "app-fresh:2")
    print(f"rebased vs fresh: {len(diff)} paths differ (mtimes aside): {sorted(diff)}")
    assert diff <= NONDETERMINISTIC, sorted(diff - NONDETERMINISTIC)
    assert _read(st, "app:2", b"var/lib/dpkg/status") == _read(st, "app-fresh:2", b"var/lib/dpkg/status")

    capsys.readouterr()
    main(["--store", str(st.root), "inspect", "app:2", "--json"])
    lin = json.loads(capsys.readouterr().out)["lineage"]
    assert lin["base"]["digest"] == m2.digest and lin["base"]["root"] == m2.root

    r = _push(st, "app:2", f"docker://{repo}:app2")
    budget = 1.1 * (new_of_base2 + app2.index.size)
    print(f"push of base:2 sent {base2_push.bytes_sent} B (its new packs + index: {new_of_base2} B); "
          f"push of the rebased app:2 sent {r.bytes_sent} B in {r.blobs_sent} blobs "
          f"(index {app2.index.size} B, config {app2.config.size} B, manifest {len(app2.raw)} B); "
          f"budget 1.1 x (new chunks of the new base + index) = {budget:.0f} B")
    assert r.bytes_sent <= budget + 3 * len(app2.raw) + 4096
    assert r.bytes_sent <= app2.index.size + app2.config.size + 3 * len(app2.raw) + 8192  # no pack at all


def test_apply_curl_and_python3_onto_the_base(store: Store) -> None:
    st = store
    main(["--store", str(st.root), "apply", "base:1", "curl:1", "app:1", "-t", "stack:1", "--json"])
    diff = _differing(st, "stack:1", "both-fresh:1")
    print(f"applied vs a joint install: {len(diff)} paths differ (mtimes aside): {sorted(diff)}")
    ruled = {b"etc/ld.so.cache", b"var/lib/apt/extended_states", b"var/lib/dpkg/status-old"}
    assert diff <= NONDETERMINISTIC | ruled, sorted(diff - NONDETERMINISTIC - ruled)
    assert _read(st, "stack:1", b"var/lib/dpkg/status") == _read(st, "both-fresh:1", b"var/lib/dpkg/status")

    def paras(ref: str) -> set[bytes]:
        return {p.strip() for p in _read(st, ref, b"var/lib/apt/extended_states").split(b"\n\n") if p.strip()}

    assert paras("stack:1") == paras("both-fresh:1")  # apt writes them in its hash order
    for path in (b"usr/bin/curl", b"usr/bin/python3.11"):
        assert st.load_index(st.resolve("stack:1")).lookup(path) is not None
