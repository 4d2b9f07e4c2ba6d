"""Profile bundles in a lazy mount (docs/spec/bundle.md): a real registry, real FUSE.  With a bundle the
workload's files are served with no range request at all; a hostile bundle (a wrong chunk, a wrong
record, truncated) is refused with one clear log line, never served, and the mount falls back to the
profile's frames."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mountkit import mount_stats, mounts_under, pid_alive, shoal, wait_for  # noqa: E402

from regfix import Registry, registry  # noqa: E402,F401

WORKLOAD = ["sub/rand05", "sub/rand01", "text03", "sub/deeper/hl-c"]  # a hardlink reads its primary


def _recorded(sample: dict[str, object]) -> tuple[Any, Any, Any, bytes]:
    """What ``shoal profile`` records for a workload that reads WORKLOAD whole: manifest, index,
    profile, bundle."""
    from shoal.mount import bundle
    from shoal.mount.profile import Profile, Recording
    from shoal.reader import StoreSource
    from shoal.store import Store

    st = Store.open(Path(str(sample["store"])))
    m = st.resolve("sample:1")
    idx = st.load_index(m)
    files = [idx.primary(idx.position(p.encode()) or 0) for p in WORKLOAD]
    chunks = [ci for f in files for ci in idx.entries[f].chunks]
    dirs = sorted({idx.position(b"sub") or 0, idx.position(b"sub/deeper") or 0})
    rec = Recording(list(dict.fromkeys(idx.chunk_frames[ci] for ci in chunks)), chunks, files, dirs)
    prof = Profile.of_frames(m.digest, idx, rec.frames, 0.1, ("cat",))
    return m, idx, prof, bundle.build(idx, rec, StoreSource(st))


def _push(sample: dict[str, object], host: str, repo: str, prof: Any, blob: bytes) -> str:
    from shoal.mount.profile import push_remote

    ref = f"docker://{host}/{repo}:1"
    shoal(Path(str(sample["store"])), "push", "sample:1", ref)
    push_remote(ref, {}, prof, blob)
    return ref


def _read_workload(mnt: Path, sample: dict[str, object]) -> None:
    tree = Path(str(sample["tree"]))
    for p in WORKLOAD:
        assert (mnt / p).read_bytes() == (tree / p).read_bytes(), p


def _daemon_log(run_dir: Path) -> str:
    logs = list((run_dir / "mounts").glob("*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text(errors="replace")


def _umount(run_dir: Path, mnt: Path, pid: int) -> None:
    shoal(None, "umount", mnt)
    assert not mounts_under(run_dir, mnt.parent)
    wait_for(lambda: not pid_alive(pid), 5, "daemon exit")


def test_the_workload_is_served_from_the_bundle(sample: dict[str, object], registry: Registry, mnt: Path,
                                                run_dir: Path, tmp_path: Path) -> None:
    m, idx, prof, blob = _recorded(sample)
    ref = _push(sample, registry.host, "bundle/ok", prof, blob)
    cold = tmp_path / "cold"
    p = shoal(cold, "-v", "mount", "--json", ref, mnt)
    st = json.loads(p.stdout)
    # the daemon checks the bundle once the mount is live (bundle.md §6.1)
    wait_for(lambda: mount_stats(mnt)["bundle_state"] == "checked", 30, "bundle check")
    assert f"profile bundle of {m.digest}: " in _daemon_log(run_dir) and "checked" in _daemon_log(run_dir)
    s = mount_stats(mnt)
    # every profiled frame holds a chunk of the bundle: the prefetch left them all out, nothing was fetched
    assert s["profile_frames"] == s["prefetched_frames"] == len(prof.frames)
    assert (s["source"]["frames_cached"], s["source"]["requests"]) == (0, 0)
    _read_workload(mnt, sample)
    s = mount_stats(mnt)
    assert s["errors"] == 0 and s["reads"] > 0
    assert (s["source"]["requests"], s["source"]["bytes_fetched"]) == (0, 0)  # all of it from the bundle
    print(f"\nworkload {sum(idx.entries[idx.primary(idx.position(w.encode()) or 0)].size for w in WORKLOAD)} bytes; "
          f"bundle {len(blob)} bytes; profile frames {prof.nbytes} bytes; range requests 0")
    # anything else comes from the frames, as without a bundle
    assert (mnt / "sub/rand02").read_bytes() == (Path(str(sample["tree"])) / "sub/rand02").read_bytes()
    s = mount_stats(mnt)
    assert s["source"]["requests"] > 0 and s["source"]["bytes_fetched"] > 0 and s["errors"] == 0
    assert (cold / "profiles" / f"{m.digest[7:]}.bundle").read_bytes() == blob  # kept for next time
    _umount(run_dir, mnt, st["pid"])


def _tamper_chunk(blob: bytes) -> bytes:
    from shoal.format import bundle as fb

    _, start = fb.read_header(blob)
    frames = _frames(blob)
    count, clen = frames[0]
    data = bytearray(zstandard.ZstdDecompressor().decompress(blob[start : start + clen]))
    data[100] ^= 0xFF
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(data))
    return _with_header(blob, lambda d: d.update(frames=struct.pack(">II", count, len(z)) + d["frames"][8:]),
                        z + blob[start + clen :])


def _frames(blob: bytes) -> list[tuple[int, int]]:
    from shoal.format import bundle as fb

    doc, _ = fb.read_header(blob)
    t = doc["frames"]
    return [struct.unpack_from(">II", t, i) for i in range(0, len(t), 8)]


def _with_header(blob: bytes, mutate: Callable[[dict[str, Any]], None], data: bytes | None = None) -> bytes:
    from shoal.format import bundle as fb
    from shoal.format import cbor

    doc, start = fb.read_header(blob)
    mutate(doc)
    hz = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(cbor.encode(doc))
    return fb.MAGIC + struct.pack(">I", len(hz)) + hz + (blob[start:] if data is None else data)


def _tamper_record(blob: bytes) -> bytes:
    def mutate(doc: dict[str, Any]) -> None:
        sub = next(d for d in doc["dirs"] if d[0] == b"sub")
        rec = next(r for r in sub[3] if r[1] == 1)
        rec[2] |= 0o4000  # a file made setuid, no digest updated

    return _with_header(blob, mutate)


HOSTILE = {
    "wrong chunk": (_tamper_chunk, "failed verification (digest mismatch)"),
    "wrong record": (_tamper_record, "Merkle digest mismatch at b'sub'"),
    "truncated": (lambda b: b[: len(b) - 1000], "truncated"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_bundle_is_refused_and_never_served(kind: str, sample: dict[str, object], registry: Registry,
                                                       mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    m, idx, prof, blob = _recorded(sample)
    tamper, words = HOSTILE[kind]
    bad = tamper(blob)
    ref = _push(sample, registry.host, f"bundle/{kind.replace(' ', '-')}", prof, bad)
    cold = tmp_path / "cold"
    p = shoal(cold, "mount", "--json", ref, mnt)
    st = json.loads(p.stdout)
    wait_for(lambda: mount_stats(mnt)["bundle_state"] == "refused", 30, "bundle refusal")
    err = _daemon_log(run_dir)
    assert f"ignoring the profile bundle of {m.digest}: bundle: " in err and words in err, err
    assert not (cold / "profiles" / f"{m.digest[7:]}.bundle").exists()  # only a checked bundle is kept
    # as without a bundle: the profile's frames are prefetched, the reads are right, nothing is corrupt
    wait_for(lambda: mount_stats(mnt)["prefetch_state"] == "done", 30, "prefetch")
    _read_workload(mnt, sample)
    s = mount_stats(mnt)
    assert s["profile_frames"] == s["prefetched_frames"] == len(prof.frames)
    assert s["errors"] == s["integrity_errors"] == 0 and s["source"]["failures"] == 0
    _umount(run_dir, mnt, st["pid"])
