#!/usr/bin/env python3
"""The physical floor of a lazy start (issue 12): the compressed bytes of the file ranges a workload
reads, plus the metadata needed to mount, over three round trips of a link.

Usage: python bench/floor.py [--tree DIR] [--mbit 100] [--latency-ms 20] -- CMD...

How the ranges are found: the page cache is dropped, then ``strace -f -y -s 0 -e
trace=openat,read,pread64,lseek,exit_group`` runs CMD in a ``chroot`` of the tree (environment: PATH and
HOME only).
- Files read with read/pread64 count the exact byte ranges returned (offsets followed through lseek).
- Mapped files (the executable, its ELF interpreter, shared libraries, locale archives) count the
  pages present in the process's page tables (/proc/PID/maps + pagemap, sampled every 20 ms and
  while each exit_group is held back 1 s by strace's inject): the pages its faults touched, with
  the kernel's fault-around (64 KiB), as a lazy mount would see them.
Each merged range is compressed alone with zstd level 3 (python zstandard).  The metadata is the
tree's tar headers (every entry, files with size 0: names, modes, owners, times, link targets),
compressed with zstd -3 as one stream: what a mount needs to answer lookups and stats.
Floor time = 3 x latency + bytes / bandwidth (three round trips: manifest, metadata, data).
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from common import rootfs  # noqa: E402

PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PAGE = mmap.PAGESIZE
_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+|0x[0-9a-f]+)")
_FD = re.compile(r"(-?\d+)<([^>]*)>")


@dataclass(frozen=True)
class Floor:
    data_bytes: int  # compressed ranges
    meta_bytes: int  # compressed tar headers of the tree
    raw_bytes: int  # the ranges uncompressed
    ranges: int
    files: int
    output: str  # the workload's first line of output

    @property
    def bytes(self) -> int:
        return self.data_bytes + self.meta_bytes

    def seconds(self, mbit: float, latency_ms: float) -> float:
        return 3 * latency_ms / 1000 + self.bytes * 8 / (mbit * 1e6)


def _merge(rs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(rs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def _mapped_pages(pid: int, root: str, into: dict[str, set[int]]) -> None:
    """The file pages present in ``pid``'s page tables (its maps and pagemap), by path inside ``root``."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for ln in maps:
                parts = ln.split(None, 5)
                if len(parts) < 6 or not parts[5].startswith(root + "/"):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                off = int(parts[2], 16)
                pm.seek(lo // PAGE * 8)
                raw = pm.read((hi - lo) // PAGE * 8)
                got = into.setdefault(parts[5][len(root):], set())
                for i in range(len(raw) // 8):
                    if raw[8 * i + 7] & 0x80:  # bit 63: present
                        got.add(off // PAGE + i)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass


def _watch(root: str, stop: threading.Event, into: dict[str, set[int]]) -> None:
    """Until ``stop``: every 20 ms, the mapped pages of every process chrooted at ``root``."""
    while not stop.wait(0.02):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.readlink(f"/proc/{pid}/root") != root:
                        continue
                except OSError:
                    continue
                _mapped_pages(int(pid), root, into)


def trace(tree: Path, cmd: list[str]) -> tuple[dict[str, list[tuple[int, int]]], str]:
    """The ranges ``cmd`` reads in a chroot of ``tree`` (paths inside the tree), and its output."""
    root = str(tree.resolve())
    pages: dict[str, set[int]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(root, stop, pages), daemon=True)
    watcher.start()
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        try:  # each exit_group waits 1 s, so the watcher sees every process's final mappings
            p = subprocess.run(["strace", "-f", "-y", "-qq", "-s", "0", "-o", log.name, "-e",
                                "trace=openat,read,pread64,lseek,mmap,exit_group", "-e",
                                "inject=exit_group:delay_enter=1000000", "chroot", root, *cmd],
                               capture_output=True, env={"PATH": PATH_ENV, "HOME": "/root"}, stdin=subprocess.DEVNULL)
        finally:
            stop.set()
            watcher.join()
        if p.returncode != 0:
            raise SystemExit(f"chroot {root} {' '.join(cmd)} failed ({p.returncode}): {p.stderr[-500:]!r}")
        lines = log.read().splitlines()
    reads: dict[str, list[tuple[int, int]]] = {}
    offs: dict[tuple[str, str], int] = {}
    for ln in lines:
        m = _LINE.match(ln)
        if not m or "unfinished" in ln or "resumed" in ln:
            continue
        pid, call, args, ret = m.groups()
        if call == "openat":  # ``= 3</path>``: a new file description starts at offset 0
            offs[(pid, ret)] = 0
            continue
        fds = [(fd, p[len(root):]) for fd, p in _FD.findall(args) if p.startswith(root + "/")]
        if not fds:
            continue
        fd, path = fds[0]
        n = int(ret, 0)
        if call == "read" and n > 0:
            off = offs.get((pid, fd), 0)
            reads.setdefault(path, []).append((off, off + n))
            offs[(pid, fd)] = off + n
        elif call == "pread64" and n > 0:
            off = int(args.rsplit(",", 1)[1].strip(), 0)
            reads.setdefault(path, []).append((off, off + n))
        elif call == "lseek" and n >= 0:
            offs[(pid, fd)] = n
    out = p.stdout.decode(errors="replace").splitlines()
    ranges = {path: _merge(rs) for path, rs in reads.items() if path not in pages}
    for path, pgs in pages.items():  # mapped (and read, for the ELF headers) files
        size = (tree / path.lstrip("/")).stat().st_size
        ranges[path] = _merge(reads.get(path, []) + [(i * PAGE, min(size, (i + 1) * PAGE)) for i in pgs])
    return ranges, out[0] if out else ""


def metadata(tree: Path) -> bytes:
    """The tar headers of every entry of ``tree`` (regular files with size 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirs, names in os.walk(tree):
            dirs.sort()
            for name in sorted(dirs + names):
                full = Path(dirpath) / name
                ti = tf.gettarinfo(str(full), arcname=str(full.relative_to(tree)))
                if ti.isreg():
                    ti.size = 0
                tf.addfile(ti)
    return buf.getvalue()


def floor(tree: Path, cmd: list[str]) -> Floor:
    ranges, output = trace(tree, cmd)
    z = zstandard.ZstdCompressor(level=3)
    data = raw = n = 0
    for path, rs in ranges.items():
        with open(tree / path.lstrip("/"), "rb") as f:
            for a, b in rs:
                f.seek(a)
                chunk = f.read(b - a)
                raw += len(chunk)
                data += len(z.compress(chunk))
                n += 1
    meta = len(z.compress(metadata(tree)))
    return Floor(data, meta, raw, n, len(ranges), output)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=None)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("cmd", nargs="+")
    a = ap.parse_args()
    tree = a.tree or rootfs("bookworm-py", ("python3", "git"))
    f = floor(tree, a.cmd)
    print(f"{' '.join(a.cmd)}: {f.files} files, {f.ranges} ranges, {f.raw_bytes / 1e6:.2f} MB read -> "
          f"{f.data_bytes / 1e6:.2f} MB zstd -3 + metadata {f.meta_bytes / 1e6:.2f} MB = {f.bytes / 1e6:.2f} MB; "
          f"{f.seconds(a.mbit, a.latency_ms):.3f} s at {a.mbit:g} Mbit/s + 3 x {a.latency_ms:g} ms")


if __name__ == "__main__":
    main()
