#!/usr/bin/env python3
"""Where a cold ``shoal run docker://…`` spends its time before the container's first output (issue 12).

Usage: python bench/lazy_timeline.py [--reps 5] [--tree DIR] [--prefetch auto|none] [--warm-cache]
                                     [--compare SRC] [--mbit M --latency-ms L] [--show-runs] [--requests]

The tree is debootstrap minbase bookworm + python3 + git (cached in $SHOAL_BENCH_CACHE, as bench/lazy.py).
The bench starts a loopback docker-registry, builds and pushes the Shoal image, records a ``shoal profile``
of ``python3 -c 'print(1)'`` (pushed as a referrer), and puts bench/throttle.py in front of the registry
("loopback": no rate limit and no added latency unless ``--mbit``/``--latency-ms``; it logs every request).
Each timed run is cold: a fresh store and run directory, ``sync`` + ``drop_caches`` (unless
``--warm-cache``), then ``shoal -vv run --rm --network host docker://PROXY/shoal/py:1 -- python3 -c
'print(1)'``, to the first byte of its stdout.

The timeline of a run is made of
- the proxy's request log (start and end of every request: manifest, config, index, referrers, profile,
  pack ranges),
- Shoal's own ``-vv`` debug lines ``timeline: ...`` that mark a phase (``T`` below): the command's stamped
  as they arrive on its stderr, the mount daemon's from its log (stamped by its logging, to the ms),
- 2 ms polls of ``/proc/self/mountinfo`` (the mount appears) and of the processes (runc starts).
Each event's median over the runs is printed, in order, with the median time to the first output, and
the CPU time (user + system) of the ``shoal run`` process and the children it waited for (runc), to its
exit: on a loaded machine wall times vary by 2x from run to run, CPU time much less (the mount daemon,
forked off, is not in it).

``--compare SRC`` alternates every run with one of the Shoal sources in ``SRC`` (a directory holding the
``shoal`` package, e.g. ``git archive BASE src | tar -x -C DIR`` then ``DIR/src``): both timelines are
printed and the ratios of their medians, measured side by side in one session.  ``--requests`` prints
every run's requests and events.  ``--show-runs`` prints each run as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs, sh  # noqa: E402
from containerd import run_marks, umount_all  # noqa: E402  (shared with bench/estargz.py)
from pull import Registry  # noqa: E402
from throttle import Link, Throttle  # noqa: E402

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CMD = ["python3", "-c", "print(1)"]
HERE_SRC = Path(__file__).resolve().parent.parent / "src"

# Shoal's -vv debug lines "timeline: WHAT ..." mark a phase; the event is WHAT without paths and digests
_VARIABLE = re.compile(r"(docker://\S*|/\S*|sha256:\S*|\(.*\)|: .*)")
_ASCTIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def mark(line: str) -> str | None:
    """The event a log line marks, or None."""
    _, sep, what = line.partition("timeline: ")
    return "T " + " ".join(_VARIABLE.sub("", what).split()) if sep else None


@dataclass
class Run:
    seconds: float
    requests: int
    bytes: int
    cpu: float = 0.0  # user + system seconds of `shoal run` and the children it waited for (not the daemon)
    events: dict[str, float] = field(default_factory=dict)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _watch(run_dir: Path, name: str, t0: float, stop: threading.Event, marks: dict[str, float],
           daemon_log: list[str]) -> None:
    """Every 2 ms: when a mount under ``run_dir`` appears, and when runc runs the container ``name``;
    the mount daemon's log, as it grows (it is removed when the daemon ends)."""
    bundle = str(run_dir / "containers" / name)
    seen = 0
    while not stop.wait(0.002):
        for lf in (run_dir / "mounts").glob("*.log") if (run_dir / "mounts").is_dir() else ():
            try:
                text = lf.read_text(errors="replace")
            except OSError:
                continue
            if len(text) > seen:
                daemon_log.extend(text[seen:].splitlines())
                seen = len(text)
        run_marks(run_dir, bundle, t0, marks)


def kinds_of(reg: Registry) -> dict[str, str]:
    """Blob digest -> what it is (config, index, pack), from the pushed manifest."""
    import httpx

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}
    man = httpx.get(f"http://{reg.host}/v2/shoal/py/manifests/1", headers=accept).json()
    if "manifests" in man:
        sub = next((d for d in man["manifests"] if d.get("artifactType") == "application/vnd.shoal.image.v1"),
                   man["manifests"][0])
        man = httpx.get(f"http://{reg.host}/v2/shoal/py/manifests/{sub['digest']}", headers=accept).json()
    kinds = {man["config"]["digest"]: "config"}
    for ly in man.get("layers", []):
        kinds[ly["digest"]] = "index" if "index" in ly["mediaType"] else "pack" if "pack" in ly["mediaType"] \
            else ly["mediaType"]
    return kinds


def one_run(work: Path, src: Path, host: str, link: Link, n: int, prefetch: str, warm: bool,
            kinds: dict[str, str], verbose: bool = False) -> Run:
    d = work / f"run{n}"
    env = {**os.environ, "SHOAL_RUN_DIR": str(d / "run"), "PYTHONPATH": str(src)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    name = f"tl{n}"
    argv = [sys.executable, "-c", "import sys; from shoal.cli import main; sys.argv[0] = 'shoal'; sys.exit(main())",
            "-vv", "--store", str(d / "store"), "run", "--rm", "--name", name, "--network", "host",
            "--prefetch", prefetch, f"docker://{host}/shoal/py:1", "--", *CMD]
    if not warm:
        drop_caches()
    marks: dict[str, float] = {}
    daemon_log: list[str] = []
    stop = threading.Event()
    link.log = []
    b0, r0 = link.bytes, link.requests
    t0, wall0 = time.perf_counter(), time.time()
    w = threading.Thread(target=_watch, args=(d / "run", name, t0, stop, marks, daemon_log), daemon=True)
    w.start()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    lines: list[tuple[float, str]] = []
    try:
        assert p.stdout is not None and p.stderr is not None
        err = p.stderr

        def read_err() -> None:
            for ln in err:
                lines.append((time.perf_counter() - t0, ln.decode(errors="replace").rstrip()))

        reader = threading.Thread(target=read_err, daemon=True)
        reader.start()
        got = os.read(p.stdout.fileno(), 1)
        t1 = time.perf_counter() - t0
        b1, r1 = link.bytes, link.requests
        rest = p.stdout.read()
        p.wait(120)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        reader.join(10)
        if p.returncode != 0 or (got + rest).strip() != b"1":
            tail = "\n".join(ln for _, ln in lines[-20:])
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {(got + rest)[:200]!r}\n{tail}")
    finally:
        stop.set()
        w.join()
        log, link.log = link.log, None
        if p.poll() is None:
            p.kill()
            p.wait()
        umount_all(d)
        shutil.rmtree(d, ignore_errors=True)
    run = Run(t1, r1 - r0, b1 - b0, ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
    ev = run.events
    ev["first output"] = t1
    if "mount" in marks:
        ev["mount appears (mountinfo)"] = marks["mount"]
    if "runtime" in marks:
        ev["runc process seen"] = marks["runtime"]
    for at, ln in lines:
        m = mark(ln)
        if m is not None:
            ev.setdefault(m, at)
    for ln in daemon_log:  # stamped by the daemon's logging, to the millisecond
        m, stamp = mark(ln), _ASCTIME.match(ln)
        if m is not None and stamp is not None:
            at = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000 - wall0
            ev.setdefault(m.replace("T ", "T daemon: ", 1), at)
    packs = 0
    assert log is not None
    for a, b, method, path, _rng, _size in sorted(log):
        if a - t0 > t1:
            continue
        last = path.rsplit("/", 1)[-1].split("?")[0]
        if "/manifests/" in path:
            what = "referrers (tag schema)" if last.startswith("sha256-") else "manifest"
        elif "/referrers/" in path:
            what = "referrers (API)"
        elif "/blobs/" in path:
            what = kinds.get(last, "profile blob")
        else:
            what = path
        if what == "pack":
            packs += 1
            if packs == 1:
                ev["first pack range: start"] = a - t0
            ev["last pack range before output: end"] = b - t0
            continue
        key = f"{method} {what}"
        k, i = key, 2
        while f"{k}: start" in ev:
            k, i = f"{key} #{i}", i + 1
        ev[f"{k}: start"] = a - t0
        ev[f"{k}: end"] = b - t0
    ev["pack ranges before output (count)"] = float(packs)
    if verbose:
        for a, b, method, path, rng, size in sorted(log):
            print(f"      {a - t0:7.3f} {b - t0:7.3f} {method} {path.rsplit('/', 1)[-1][:30]} {rng} {size}")
        for at, k in sorted((v, k) for k, v in ev.items() if not k.endswith("(count)")):
            print(f"      {at:7.3f} {k}")
    return run


def report(title: str, runs: list[Run]) -> float:
    med = statistics.median(r.seconds for r in runs)
    print(f"\n{title}: {len(runs)} runs, to first output median {med:.3f} s "
          f"(min {min(r.seconds for r in runs):.3f}, max {max(r.seconds for r in runs):.3f}); "
          f"requests by then {statistics.median(r.requests for r in runs):.0f}, "
          f"{statistics.median(r.bytes for r in runs) / 1e6:.2f} MB; CPU of shoal run (user+sys, to its exit, "
          f"without the mount daemon) median {statistics.median(r.cpu for r in runs):.3f} s "
          f"(min {min(r.cpu for r in runs):.3f})")
    keys = {k for r in runs for k in r.events}
    rows = []
    for k in keys:
        xs = [r.events[k] for r in runs if k in r.events]
        rows.append((statistics.median(xs), k, len(xs)))
    for at, k, cnt in sorted(rows):
        if k.endswith("(count)"):
            print(f"    {'':>8}    {k}: {at:.0f}")
            continue
        seen = "" if cnt == len(runs) else f"  (in {cnt} of {len(runs)} runs)"
        print(f"    {at:8.3f} s  {k}{seen}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefetch", default="auto", choices=("auto", "none"))
    ap.add_argument("--warm-cache", action="store_true", help="no drop_caches before each run")
    ap.add_argument("--compare", type=Path, default=None, help="another Shoal src directory, alternated")
    ap.add_argument("--mbit", type=float, default=1e6)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--show-runs", action="store_true")
    ap.add_argument("--requests", action="store_true", help="print every run's requests and events")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("runc"):
        sys.exit("bench/lazy_timeline.py needs root and runc")
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    srcs = [("this", HERE_SRC)] + ([("compare", args.compare.resolve())] if args.compare else [])
    for _, s in srcs:  # byte code, as an installed wheel has it
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(s / "shoal")], check=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-tl-", dir="/var/tmp"))
    env = {**os.environ, "SHOAL_RUN_DIR": str(work / "run0"), "PYTHONPATH": str(HERE_SRC)}
    shoal = [sys.executable, "-c", "import sys; from shoal.cli import main; sys.argv[0] = 'shoal'; sys.exit(main())"]
    reg = Registry(work)
    try:
        s0 = work / "s0"
        subprocess.run([*shoal, "--store", str(s0), "build", str(tree), "py:1", "--env", PATH_ENV, "--cmd", "python3"],
                       check=True, capture_output=True, env=env)
        direct = f"docker://{reg.host}/shoal/py:1"
        subprocess.run([*shoal, "--store", str(s0), "push", "py:1", direct], check=True, capture_output=True, env=env)
        if args.prefetch == "auto":
            out = subprocess.run([*shoal, "--store", str(work / "prof"), "profile", "--json", direct, "--", *CMD],
                                 check=True, capture_output=True, env=env, stdin=subprocess.DEVNULL).stdout
            prof = json.loads(out.splitlines()[-1])
            print(f"profile of {' '.join(CMD)}: {prof['frames']} frames, {prof['bytes'] / 1e6:.2f} MB")
            umount_all(work)
        kinds = kinds_of(reg)
        print(f"tree {tree}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; link: "
              f"{'loopback' if args.mbit >= 1e6 else f'{args.mbit:g} Mbit/s'} + {args.latency_ms:g} ms")
        runs: dict[str, list[Run]] = {label: [] for label, _ in srcs}
        with Throttle(f"http://{reg.host}", args.mbit, args.latency_ms) as t:
            n = 0
            for _ in range(args.reps):
                for label, src in srcs:
                    n += 1
                    r = one_run(work, src, t.host, t.link, n, args.prefetch, args.warm_cache, kinds, args.requests)
                    runs[label].append(r)
                    if args.show_runs:
                        print(f"  {label} run {n}: {r.seconds:.3f} s, {r.requests} requests, CPU {r.cpu:.3f} s",
                              flush=True)
        cache = "page cache kept" if args.warm_cache else "sync + drop_caches before each"
        meds = {label: report(f"{label} ({src}; {cache})", runs[label]) for label, src in srcs}
        if args.compare:
            cpu = {label: statistics.median(r.cpu for r in runs[label]) for label, _ in srcs}
            print(f"\nthis / compare: {meds['this'] / meds['compare']:.2f}x to first output, "
                  f"{cpu['this'] / cpu['compare']:.2f}x CPU of shoal run")
    finally:
        umount_all(work)
        reg.close()
        sh(f"rm -rf {work}")


if __name__ == "__main__":
    main()
