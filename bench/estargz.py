#!/usr/bin/env python3
"""Lazy start side by side with the real stargz snapshotter (issue 12): per workload and link, one table
of eStargz lazy, eStargz optimized for that workload, containerd classic, Shoal lazy, Shoal with a
profile of that workload, and Shoal through containerd, with the physical floor and a timeline of one
Shoal run.

Usage: python bench/estargz.py [--reps 5] [--links loopback,throttled] [--workloads print,imports,git]
                               [--modes esgz-lazy,esgz-opt,classic,shoal-lazy,shoal-lazy-service,shoal-profile,
                                        shoal-all,shoal-service,shoal-cri]
                               [--mbit 100] [--latency-ms 20] [--quiet 3] [--quiet-estargz 8] [--cap 60]

It reuses bench/containerd.py's machinery: the cached registry and its classic and pause images, a
private containerd 1.6 with its CRI plugin per run (fresh roots, ``sync`` + drop_caches just before
the clock starts), the stargz daemon built offline from bench/peers/stargz-grpc/main.go, the Shoal
image with its containerd view, and bench/throttle.py in front of the registry, which counts every
request and response body of every tool alike ("loopback": no limit, no added latency; "throttled":
``--mbit`` shared by all connections + ``--latency-ms`` before each request).

Modes (each run cold; the modes alternate within each repetition):
- esgz-lazy:     eStargz not optimized (``ctr-remote image optimize --no-optimize --oci``), the stargz
                 snapshotter through CRI (PullImage .. StartContainer, to the first byte of the CRI log);
- esgz-opt:      eStargz optimized for the workload (``ctr-remote image optimize --oci --period 10
                 --entrypoint '[CMD...]'``; one image per workload, made once into the cached registry);
- classic:       the classic gzip image, overlayfs, through CRI;
- shoal-lazy:    ``shoal run --rm --prefetch none --network host docker://PROXY/shoal/py:1 -- CMD``, fresh
                 store and run directory (host network, as the CRI pods have);
- shoal-profile: the same with ``--prefetch auto`` (the default) after a ``shoal profile`` of the workload
                 was pushed as a referrer (recorded once per workload before its timed runs, against the
                 registry directly; the lookup of the profile is part of each timed run);
- shoal-lazy-service: shoal-lazy's ``shoal run``, handed to the ``shoal service`` below;
- shoal-all:     shoal-profile with ``--prefetch all``: after the profile, every other frame is fetched in
                 the background (item 4 of issue 12: does background fetch slow the workload's own reads?);
- shoal-service: shoal-profile's ``shoal run``, handed to a ``shoal service`` that the bench starts once
                 (``--socket WORK/service.sock``, passed as ``$SHOAL_SERVICE_SOCKET``): a warm process, as the
                 stargz snapshotter and containerd are;
- shoal-cri:     the shoal snapshotter through CRI (its mounts use that profile, ``--prefetch auto``).
Time to first output: from just before the first command (PullImage, or ``shoal run``'s start) to the
first byte of the container's output.  Bytes and requests: through the proxy by then, and after the
background fetch settles: once the proxy has carried nothing for ``--quiet`` s (``--quiet-estargz`` for
the stargz snapshotter, whose background fetch starts after 5 s without reads), at most ``--cap`` s after
the output.  The physical floor: bench/floor.py.  The timeline: one more shoal-profile run per workload
and link (not in the table), with ``-vv``, every stderr line stamped as it arrives, the proxy's request
log, and 5 ms polls for the mount and the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import containerd  # noqa: E402
from common import CACHE, compile_bytecode, rootfs, tree_bytes  # noqa: E402
from containerd import (  # noqa: E402
    SHOAL,
    Node,
    Registry,
    classic_image,
    cold_run_cri,
    drop_caches,
    estargz_image,
    pause_image,
    pids_with,
    record_profile,
    remove_run_dirs,
    run,
    run_marks,
    shoal_image,
    stargz_daemon,
    umount_all,
)
from containerd import Sample as ContainerdSample  # noqa: E402
from floor import Floor, floor  # noqa: E402
from throttle import Link, Throttle  # noqa: E402

WORKLOADS = {
    "print": ["python3", "-c", "print(1)"],
    "imports": ["python3", "-c", "import json, email, http.client, asyncio, unittest; print(1)"],
    "git": ["git", "--version"],
}
MODES = ("esgz-lazy", "esgz-opt", "classic", "shoal-lazy", "shoal-lazy-service", "shoal-profile", "shoal-all",
         "shoal-service", "shoal-cri")
PREFETCH = {"shoal-lazy": "none", "shoal-lazy-service": "none", "shoal-all": "all"}  # the other shoal runs: auto
SERVED = ("shoal-lazy-service", "shoal-service")  # shoal run modes handed to the bench's shoal service
LABELS = {"esgz-lazy": "eStargz lazy (stargz, CRI)", "esgz-opt": "eStargz optimized (stargz, CRI)",
          "classic": "classic (overlayfs, CRI)", "shoal-lazy": "Shoal lazy (shoal run, no profile)",
          "shoal-profile": "Shoal with profile (shoal run)",
          "shoal-all": "Shoal, profile + all in background",
          "shoal-lazy-service": "Shoal lazy (run via service)",
          "shoal-service": "Shoal with profile (run via service)", "shoal-cri": "Shoal via containerd (CRI, profile)"}
PHASES = ("PullImage", "RunPodSandbox", "CreateContainer", "StartContainer", "start to output")
SNAPSHOTTER = {"esgz-lazy": "stargz", "esgz-opt": "stargz", "classic": "overlayfs", "shoal-cri": "shoal"}


@dataclass(frozen=True)
class Sample:
    seconds: float  # to the first byte of output
    bytes: int  # through the proxy by then
    requests: int
    settled_bytes: int  # once the link was quiet
    settled_requests: int
    settled: bool  # quiet before the cap
    phases: tuple[float, ...] = ()  # CRI modes: PullImage, RunPodSandbox, CreateContainer, StartContainer, to output
    snap: tuple[tuple[float, str], ...] = ()  # shoal-cri with --snapshotter-timeline: (s since the start, line)


def settle(link: Link, quiet: float, cap: float, since: float) -> bool:
    """Wait until ``link`` carried nothing for ``quiet`` s, at most until ``since + cap``."""
    while link.quiet_for() < quiet:
        if time.perf_counter() > since + cap:
            return False
        time.sleep(0.1)
    return True


def shoal_run(work: Path, host: str, cmd: list[str], expect: str, link: Link, n: int, prefetch: str,
              verbose: bool = False, service: Path | None = None) -> tuple[float, int, int, list[tuple[float, str]]]:
    """A cold ``shoal run`` to its first output: (seconds, bytes, requests, stamped stderr lines); with
    ``service``, handed to the ``shoal service`` listening there."""
    d = work / f"srun{n}"
    env = {**os.environ, "SHOAL_RUN_DIR": str(d / "run")}
    env.pop("SHOAL_SERVICE_SOCKET", None)
    if service is not None:
        env["SHOAL_SERVICE_SOCKET"] = str(service)
    argv = [SHOAL, *(["-vv"] if verbose else []), "--store", str(d / "store"), "run", "--rm", "--name", f"sb{n}",
            "--network", "host", "--prefetch", prefetch, f"docker://{host}/shoal/py:1", "--", *cmd]
    drop_caches()
    b0, r0 = link.bytes, link.requests
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        assert p.stdout is not None and p.stderr is not None
        lines: list[tuple[float, str]] = []
        err = p.stderr

        def read_err() -> None:
            for ln in err:
                lines.append((time.perf_counter() - t0, ln.decode(errors="replace").rstrip()))

        reader = threading.Thread(target=read_err, daemon=True)
        reader.start()
        got = os.read(p.stdout.fileno(), 1)
        t1 = time.perf_counter()
        b1, r1 = link.bytes, link.requests
        rest = p.stdout.read()
        p.wait(120)
        reader.join(10)
        out = (got + rest).decode(errors="replace").strip()
        if p.returncode != 0 or out != expect:
            tail = "\n".join(ln for _, ln in lines[-20:])
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {out[:200]!r}\n{tail}")
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        umount_all(d)
        shutil.rmtree(d, ignore_errors=True)
    return t1 - t0, b1 - b0, r1 - r0, lines


def start_service(work: Path) -> subprocess.Popen[bytes]:
    """``shoal service --socket WORK/service.sock``, started once (from this process: the same cgroup and
    namespaces as the runs it serves), its log in WORK/service.log; returns once it listens."""
    sock = work / "service.sock"
    p = subprocess.Popen([SHOAL, "service", "--socket", str(sock)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=open(work / "service.log", "ab"))
    end = time.monotonic() + 60
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > end:
            sys.exit(f"shoal service did not start: {(work / 'service.log').read_text()[-2000:]}")
        time.sleep(0.02)
    return p


def cold(mode: str, node: Node, work: Path, host: str, refs: dict[str, str], link: Link, n: int, cmd: list[str],
         expect: str, args: argparse.Namespace) -> Sample:
    b0, r0 = link.bytes, link.requests
    snap: tuple[tuple[float, str], ...] = ()
    if mode in SNAPSHOTTER:
        s = cold_run_cri(node, mode, host, refs, link, n, work / "stubs", cmd=cmd, expect=expect,
                         snapshotter=SNAPSHOTTER[mode])
        sec, nb, nr = s.seconds, s.bytes, s.requests
        phases: tuple[float, ...] = (s.pull, s.pod - s.pull, s.create - s.pod, s.started - s.create,
                                     s.seconds - s.started)
        if mode == "shoal-cri" and args.snapshotter_timeline:
            snap = snapshotter_timeline(node, s)
    else:
        service = work / "service.sock" if mode in SERVED else None
        sec, nb, nr, _ = shoal_run(work, host, cmd, expect, link, n, PREFETCH.get(mode, "auto"), service=service)
        phases = ()
    quiet = args.quiet_estargz if SNAPSHOTTER.get(mode) == "stargz" else args.quiet
    ok = settle(link, quiet, args.cap, time.perf_counter())
    return Sample(sec, nb, nr, link.bytes - b0, link.requests - r0, ok, phases, snap)


_STAMP = re.compile(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)[.,](\d{3})")
_SNAP_EVENTS = ("timeline:", "Prepare ", "Mounts ", "Stat ", "Commit ", "View ", "mounting ", "prefetched ",
                "serving ")


def snapshotter_timeline(node: Node, s: ContainerdSample) -> tuple[tuple[float, str], ...]:
    """The snapshotter's -vv log of the run that just ended (its own lines, its mounts' relayed lines and
    the mount daemons' logs under the run directory), each placed in seconds since the run's start, with
    the CRI calls' returns; read before the node stops (a daemon's log goes with it)."""
    texts = [(node.logs / "shoal.log").read_text(errors="replace")]
    texts += [p.read_text(errors="replace") for p in (node.root / "run").rglob("*.log")]
    events: list[tuple[float, str]] = []
    for text in texts:
        for ln in text.splitlines():
            stamps = list(_STAMP.finditer(ln))  # a mount's relayed line: its own time is the last one
            if not stamps or not any(k in ln for k in _SNAP_EVENTS):
                continue
            m = stamps[-1]
            at = datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S").timestamp() + int(m[3]) / 1000
            what = ln[m.end():].strip()
            what = re.sub(r"sha256:[0-9a-f]{64}|[0-9a-f]{64}", lambda d: d[0][:19], what)
            if at >= s.wall0 - 1:
                events.append((at - s.wall0, what[:150]))
    events += [(s.pull, "CRI: PullImage returned"), (s.pod, "CRI: RunPodSandbox returned"),
               (s.create, "CRI: CreateContainer returned"), (s.started, "CRI: StartContainer returned"),
               (s.seconds, "CRI: first output in the log")]
    return tuple(sorted(events))


# ------------------------------------------------------------------------------------ timeline


def _watch(run_dir: Path, name: str, t0: float, stop: threading.Event, marks: dict[str, float]) -> None:
    """Every 5 ms: when a mount under ``run_dir`` appears, and when runc runs the container ``name``."""
    bundle = str(run_dir / "containers" / name)
    while not stop.wait(0.005):
        run_marks(run_dir, bundle, t0, marks)


def timeline(work: Path, reg: Registry, host: str, cmd: list[str], expect: str, link: Link, n: int) -> None:
    """One more shoal-profile run, with -vv, the proxy's request log and the mount/runtime polls; printed."""
    import httpx

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}
    man = httpx.get(f"http://{reg.host}/v2/shoal/py/manifests/1", headers=accept).json()
    if "manifests" in man:  # an index of the Shoal manifest and its containerd view
        sub = next((d for d in man["manifests"] if d.get("artifactType") == "application/vnd.shoal.image.v1"),
                   man["manifests"][0])
        man = httpx.get(f"http://{reg.host}/v2/shoal/py/manifests/{sub['digest']}", headers=accept).json()
    kinds = {man["config"]["digest"]: "config"}
    for ly in man.get("layers", []):
        kinds[ly["digest"]] = "index" if "index" in ly["mediaType"] else "pack" if "pack" in ly["mediaType"] \
            else ly["mediaType"]
    marks: dict[str, float] = {}
    stop = threading.Event()
    link.log = []
    t0 = time.perf_counter()
    w = threading.Thread(target=_watch, args=(work / f"srun{n}" / "run", f"sb{n}", t0, stop, marks), daemon=True)
    w.start()
    try:
        sec, nb, nr, lines = shoal_run(work, host, cmd, expect, link, n, "auto", verbose=True)
    finally:
        stop.set()
        w.join()
        log, link.log = link.log, None
    print(f"  timeline of one Shoal run with profile (-vv; not in the table): {sec:.2f} s, {nb / 1e6:.2f} MB, "
          f"{nr} requests by the output")
    events: list[tuple[float, str]] = [(0.0, "process start (shoal run)")]
    packs: list[tuple[float, float, int]] = []
    for a, b, method, path, rng, size in sorted(log):
        last = path.rsplit("/", 1)[-1]
        if "/manifests/" in path:
            what = "referrers index" if last.startswith("sha256-") else "manifest"
        elif "/blobs/" in path:
            what = kinds.get(last, "profile (or other) blob")
        else:
            what = path
        if what == "pack":
            packs.append((a - t0, b - t0, size))
            if len(packs) > 1:
                continue  # the first pack request is listed; the rest are summed below
            what = "first pack range (profile prefetch or first read)"
        events.append((a - t0, f"{method} {what} {rng} {size:,} B, done at {b - t0:.3f} s"))
    before = [r for r in packs if r[0] <= sec]
    if before:
        events.append((max(r[1] for r in before), f"last pack byte before the output: {len(before)} pack requests, "
                                                  f"{sum(r[2] for r in before):,} B started by the output"))
    for key, label in (("mount", "mount appears (mountinfo)"), ("runtime", "runtime starts (runc process)")):
        if key in marks:
            events.append((marks[key], label))
    for at, ln in lines:
        if any(k in ln for k in ("found profile", "serving", "running", "prefetch")):
            events.append((at, f"stderr: {ln[:140]}"))
    events.append((sec, "first output"))
    for at, what in sorted(events):
        print(f"    {at:7.3f} s  {what}")


# ------------------------------------------------------------------------------------ report


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def report(wl: str, cmd: list[str], link_name: str, mbit: float, lat: float, samples: dict[str, list[Sample]],
           fl: Floor | None) -> None:
    print(f"\nworkload {wl}: {' '.join(cmd)} | link: {link_name}")
    print(f"  {'mode':<38} {'to first output, median (min-max)':>32}  {'by output MB, req':>18}  "
          f"{'settled MB, req':>16}  Shoal/eStargz-opt (lazy: /eStargz lazy) time, bytes")
    opt = samples.get("esgz-opt")
    plain = samples.get("esgz-lazy")
    for mode, ss in samples.items():
        t = statistics.median(s.seconds for s in ss)
        b = statistics.median(s.bytes for s in ss)
        r = statistics.median(s.requests for s in ss)
        sb = statistics.median(s.settled_bytes for s in ss)
        sr = statistics.median(s.settled_requests for s in ss)
        capped = "" if all(s.settled for s in ss) else " (cap)"
        ratio = ""
        ref = plain if mode.startswith("shoal-lazy") else opt  # plain lazy against plain eStargz (issue 12)
        if mode.startswith("shoal") and ref:
            ot = statistics.median(s.seconds for s in ref)
            ob = statistics.median(s.bytes for s in ref)
            goal = "< 1, 1" if ref is plain else "<= 0.8, 0.8"
            ratio = f"{t / ot:.2f}x, {b / ob:.2f}x (goal {goal})"
        print(f"  {LABELS[mode]:<38} {_fmt([s.seconds for s in ss]):>32}  {b / 1e6:>8.2f} MB {r:>5.0f}  "
              f"{sb / 1e6:>8.2f} MB {sr:>4.0f}{capped}  {ratio}")
    for mode, ss in samples.items():
        if all(s.phases for s in ss):
            med = [statistics.median(s.phases[i] for s in ss) for i in range(len(PHASES))]
            print(f"    {LABELS[mode]}: " + ", ".join(f"{name} {t:.3f}" for name, t in zip(PHASES, med))
                  + " s (medians)")
    if fl is not None:
        print(f"  {'physical floor':<38} {fl.seconds(mbit, lat):>27.3f} s  {fl.bytes / 1e6:>8.2f} MB {3:>5}  "
              f"({fl.files} files, {fl.ranges} ranges, {fl.raw_bytes / 1e6:.2f} MB read -> "
              f"{fl.data_bytes / 1e6:.2f} MB zstd -3 each, + {fl.meta_bytes / 1e6:.2f} MB metadata)")


def _term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every ``finally`` below runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5, help="cold runs per mode, workload and link")
    ap.add_argument("--links", default="loopback,throttled", help="a subset, comma-separated")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="a subset of print,imports,git")
    ap.add_argument("--modes", default=",".join(MODES), help="a subset, comma-separated")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--quiet", type=float, default=3.0, help="s without requests that end the background fetch")
    ap.add_argument("--quiet-estargz", type=float, default=8.0,
                    help="the same for the stargz snapshotter (its background fetch starts after 5 s idle)")
    ap.add_argument("--cap", type=float, default=60.0, help="longest wait for the link to go quiet, s")
    ap.add_argument("--no-floor", action="store_true", help="skip the physical floor (strace)")
    ap.add_argument("--no-timeline", action="store_true")
    ap.add_argument("--snapshotter-timeline", action="store_true",
                    help="run the shoal snapshotter with -vv and print the timeline of its last CRI run per link")
    args = ap.parse_args()
    if args.snapshotter_timeline:
        containerd.SNAPSHOTTER_VERBOSE = "-vv"
    modes = [m for m in MODES if m in args.modes.split(",")]
    wls = [w for w in WORKLOADS if w in args.workloads.split(",")]
    links = [lk for key, lk in (("loopback", ("loopback", 1e6, 0.0)),
                                ("throttled", (f"{args.mbit:g} Mbit/s + {args.latency_ms:g} ms/request",
                                               args.mbit, args.latency_ms)))
             if key in args.links.split(",")]
    if not modes or not wls or not links:
        sys.exit(f"nothing to run: --modes from {','.join(MODES)}, --workloads from {','.join(WORKLOADS)}, "
                 "--links from loopback,throttled")
    for tool in ("containerd", "ctr", "ctr-remote", "runc", "umoci", "skopeo", "docker-registry", "strace"):
        if not shutil.which(tool):
            sys.exit(f"bench/estargz.py needs {tool} (apt-get install containerd runc stargz-snapshotter "
                     "umoci skopeo docker-registry strace)")
    if os.geteuid() != 0:
        sys.exit("bench/estargz.py needs root")
    compile_bytecode()
    signal.signal(signal.SIGTERM, _term)
    tree = args.tree or rootfs("bookworm-py", ("python3", "git"))
    stargz = stargz_daemon()
    (CACHE / "containerd").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-estargz-", dir="/var/tmp"))
    run_dirs_before = Path("/run/containerd").exists()
    reg = Registry(CACHE / "containerd")  # the registry of bench/containerd.py: its images are made once
    node = Node(work / "node", stargz)
    service: subprocess.Popen[bytes] | None = None
    try:
        refs: dict[str, dict[str, str]] = {}
        classic = classic_image(tree, reg, work)
        lazy = estargz_image(reg, node, "lazy", None) if "esgz-lazy" in modes else ""
        for wl in wls:
            opt = estargz_image(reg, node, f"opt-{wl}", WORKLOADS[wl]) if "esgz-opt" in modes else ""
            refs[wl] = {"esgz-lazy": lazy, "esgz-opt": opt, "classic": classic}
        node = Node(work / "node", stargz, cri=True, pause=pause_image(reg, work))
        view = shoal_image(tree, reg, work, cmd=None)
        for wl in wls:
            refs[wl]["shoal-cri"] = view
        sizes = {}
        for name, ref in (("classic", classic), ("eStargz lazy", lazy)):
            if ref:
                out = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/{ref}"]).stdout
                sizes[name] = sum(x["size"] for x in json.loads(out)["layers"])
        print(f"tree {tree}: {tree_bytes(tree) / 1e6:.1f} MB, {os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.1f}; " + ", ".join(f"{k} layer {v / 1e6:.1f} MB" for k, v in sizes.items()))
        print(f"cold runs (fresh roots and store, sync + drop_caches), modes alternated, {args.reps} per mode; "
              f"CRI modes: PullImage .. StartContainer to the first byte of the CRI log (sandbox image pre-pulled, "
              f"not counted); settled = the proxy carried nothing for {args.quiet:g} s ({args.quiet_estargz:g} s "
              f"for eStargz), at most {args.cap:g} s after the output; bytes = all request and response bodies "
              f"through the proxy (manifests, configs, blobs, ranges, referrers)")
        if set(SERVED) & set(modes):
            service = start_service(work)
        n = 0
        for wl in wls:
            cmd = WORKLOADS[wl]
            fl = None if args.no_floor else floor(tree, cmd)
            expect = fl.output if fl else ("1" if cmd[0] == "python3" else "")
            if not expect:
                chroot = shutil.which("chroot") or "/usr/sbin/chroot"
                expect = subprocess.run([chroot, str(tree), *cmd], capture_output=True, text=True,
                                        env={"PATH": "/usr/bin:/bin"}).stdout.strip()
            if {"shoal-profile", "shoal-all", "shoal-service", "shoal-cri"} & set(modes):
                prof = record_profile(reg, work, cmd)
                print(f"[{wl}] profile recorded: {prof.get('frames')} frames, {prof.get('bytes', 0) / 1e6:.2f} MB",
                      file=sys.stderr)
            for link_name, mbit, lat in links:
                samples: dict[str, list[Sample]] = {m: [] for m in modes}
                with Throttle(f"http://{reg.host}", mbit, lat) as t:
                    for _ in range(args.reps):
                        for mode in modes:
                            n += 1
                            samples[mode].append(cold(mode, node, work, t.host, refs[wl], t.link, n, cmd, expect,
                                                      args))
                            node.stop()
                    report(wl, cmd, link_name, mbit, lat, samples, fl)
                    last = samples.get("shoal-cri", [])[-1:]
                    if last and last[0].snap:
                        print("  timeline of the last shoal-cri run (snapshotter -vv, s since PullImage's call):")
                        for at, what in last[0].snap:
                            print(f"    {at:7.3f} s  {what}")
                    if not args.no_timeline:
                        n += 1
                        timeline(work, reg, t.host, cmd, expect, t.link, n)
        if service is not None:  # every shoal-service run must have been served (a refusal runs in-process)
            log = (work / "service.log").read_text(errors="replace")
            served, refused = log.count(": exit "), log.count("refused: ")
            print(f"shoal service: {served} runs served, {refused} refused"
                  + (f": {log.split('refused: ', 1)[1].splitlines()[0]}" if refused else ""))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        if service is not None:
            service.terminate()
            service.wait(30)
        node.stop()
        umount_all(work)
        for pid in pids_with(str(work)):  # shoal run and its mount daemons, if interrupted
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        umount_all(work)
        for st in Path("/run/runc").glob("sb*/state.json"):  # runc containers of an interrupted shoal run
            try:
                ours = str(work).encode() in st.read_bytes()
            except OSError:
                continue
            if ours:
                subprocess.run(["runc", "delete", "--force", st.parent.name], capture_output=True)
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
        if not run_dirs_before:
            remove_run_dirs()


if __name__ == "__main__":
    main()
