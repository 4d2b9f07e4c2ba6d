"""The mount against a non-local FrameSource (the local image's, wrapped in the daemon's open): a stalled fetch
does not block other requests; the source's own stats and bulk prefetch are used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mountkit import pid_alive, state_of, wait_for

import helpers

# A shoal CLI with a "slow://" scheme: the local image, served through a source whose fetches wait
# while the gate file exists, that keeps its own stats and has a bulk prefetch (a ForwardingSource: every
# other hook goes to the local source it wraps).
WRAPPER = r'''
import dataclasses, os, sys, threading, time
from shoal.mount import image as mi
from shoal.cli import main
from shoal.reader import ForwardingSource

GATE = os.environ["SLOW_GATE"]
COUNT_GATE = os.environ.get("SLOW_COUNT_GATE", "")

@dataclasses.dataclass
class SlowStats:
    bytes_fetched: int = 0
    requests: int = 0
    prefetch_calls: int = 0

class Slow(ForwardingSource):
    def __init__(self, inner):
        super().__init__(inner)
        self.counts = SlowStats()
        self.lock = threading.Lock()

    @property
    def stats(self):
        return self.counts

    def fetch(self, pack, offset, length):
        deadline = time.monotonic() + 60
        while os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.01)
        data = self.inner.fetch(pack, offset, length)
        with self.lock:
            self.counts.bytes_fetched += len(data)
            self.counts.requests += 1
        return data

    def cached_chunks(self):
        deadline = time.monotonic() + 30
        while COUNT_GATE and os.path.exists(COUNT_GATE) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.inner.cached_chunks()

    def prefetch(self, frames):
        self.counts.prefetch_calls += 1
        return 0


from shoal.mount import daemon
_open = mi.open_image

def opener(ref, store=None, options=None):
    if not ref.startswith("slow://"):
        return _open(ref, store, options)
    rest = ref[len("slow://"):]
    img = _open(rest, store, options)
    return dataclasses.replace(img, source=Slow(img.source), local=False, name=ref)

daemon.open_image = opener  # the mount's open, wrapped: every other reference goes through as usual
sys.exit(main(sys.argv[1:]))
'''


def _cli(tmp_path: Path) -> list[str]:
    w = tmp_path / "slowshoal.py"
    w.write_text(WRAPPER)
    return [sys.executable, str(w)]


def test_stalled_fetch_does_not_block_other_requests(sample: dict[str, object], mnt: Path, run_dir: Path,
                                                     tmp_path: Path) -> None:
    store, tree = Path(str(sample["store"])), Path(str(sample["tree"]))
    gate = tmp_path / "gate"
    env = {**os.environ, "SLOW_GATE": str(gate)}
    cmd = _cli(tmp_path)
    subprocess.run(cmd + ["--store", str(store), "mount", "--prefetch", "none", "slow://sample:1", str(mnt)],
                   check=True, env=env, capture_output=True, timeout=60)
    gate.write_bytes(b"")
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append((mnt / "sub" / "rand10").read_bytes()))
    t.start()
    try:
        time.sleep(0.3)
        assert t.is_alive()  # its fetch is stalled
        t0 = time.monotonic()
        assert len(os.listdir(mnt / "many")) == 1500
        assert os.readlink(mnt / "ln-rel") == "sub/rand05"
        assert os.stat(mnt / "text11").st_size == (tree / "text11").stat().st_size
        assert os.getxattr(mnt / "text05", "user.comment") == b"hello"
        assert time.monotonic() - t0 < 2.0 and t.is_alive()
    finally:
        gate.unlink()
        t.join(30)
    assert got == [(tree / "sub" / "rand10").read_bytes()]
    time.sleep(1.2)
    st = state_of(run_dir)
    s = st["stats"]
    assert isinstance(s, dict)
    assert st["name"] == "slow://sample:1"
    assert s["source"]["bytes_fetched"] > 0 and s["source"]["requests"] == s["fetches"]
    assert 0 < s["chunks_cached"] < s["chunks_total"]  # counted from the frames fetched
    human = subprocess.run(cmd + ["status"], env=env, capture_output=True, check=True).stdout.decode()
    assert "network" in human
    pid = int(st["pid"])  # type: ignore[call-overload]
    helpers.run_shoal(None, "umount", mnt)
    wait_for(lambda: not pid_alive(pid), 5, "daemon exit")


def test_bulk_prefetch_is_used(sample: dict[str, object], mnt: Path, run_dir: Path, tmp_path: Path) -> None:
    store = Path(str(sample["store"]))
    env = {**os.environ, "SLOW_GATE": str(tmp_path / "no-gate")}
    cmd = _cli(tmp_path)
    subprocess.run(cmd + ["--store", str(store), "mount", "--prefetch", "all", "slow://sample:1", str(mnt)],
                   check=True, env=env, capture_output=True, timeout=60)
    from shoal.store import Store

    st = Store.open(store)
    frames = len(st.load_index(st.resolve("sample:1")).frames)
    wait_for(lambda: json.dumps(state_of(run_dir)["stats"]).count('"prefetch_calls": 1') == 1, 5, "prefetch")
    s = state_of(run_dir)["stats"]
    assert isinstance(s, dict) and s["prefetched_frames"] == frames and s["fetches"] == 0
    helpers.run_shoal(None, "umount", mnt)


def test_the_mount_goes_live_before_its_source_counts_what_is_cached(sample: dict[str, object], mnt: Path,
                                                                     run_dir: Path, tmp_path: Path) -> None:
    """The state written as the mount goes live leaves out what the source counts from the store (a lazy
    source's catalogue look, 4-19 ms on the path to the mount, mount.md §5.3): a count that does not end
    holds nothing up; the counters come with the daemon's first publication after it."""
    store = Path(str(sample["store"]))
    gate = tmp_path / "count-gate"
    gate.write_bytes(b"")
    env = {**os.environ, "SLOW_GATE": str(tmp_path / "no-gate"), "SLOW_COUNT_GATE": str(gate)}
    cmd = _cli(tmp_path)
    t0 = time.monotonic()
    subprocess.run(cmd + ["--store", str(store), "mount", "--prefetch", "none", "slow://sample:1", str(mnt)],
                   check=True, env=env, capture_output=True, timeout=60)
    assert time.monotonic() - t0 < 25  # the count waits up to 30 s
    st = state_of(run_dir)
    s = st["stats"]
    assert st["ready"] and isinstance(s, dict) and s["chunks_total"] > 0
    assert "chunks_cached" not in s and "source" not in s
    human = subprocess.run(cmd + ["status"], env=env, capture_output=True, check=True, timeout=30).stdout.decode()
    assert "chunks cached (counting)/" in human
    gate.unlink()
    wait_for(lambda: "chunks_cached" in json.dumps(state_of(run_dir)["stats"]), 10, "the first full counters")
    s = state_of(run_dir)["stats"]
    assert isinstance(s, dict) and s["source"]["requests"] == 0
    helpers.run_shoal(None, "umount", mnt)
