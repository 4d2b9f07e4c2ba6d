"""Helpers shared by Shoal's tests (importable as ``helpers``: pytest puts ``tests/`` on sys.path).

- ``tree_snapshot(path)``: everything unpack must reproduce, as a comparable dict.
- ``assert_same_tree(a, b)``: compare two snapshots with a readable message.
- ``generate_tree(dest, seed)``: the deterministic "hostile-ish" tree of the ``generated_tree`` fixture.
- ``clone_tree(src, dst, seed)``: copy a tree creating entries in a shuffled order, then restore
  every piece of metadata (so only inode numbers and creation order differ).
- ``run_shoal(store, *args)``: run the real ``shoal`` CLI in a subprocess.
- ``validate_oci(doc, schema_name)``: validate a JSON document against the OCI image-spec schemas.
- ``put_image(store, ref, index_blob, ...)``: put a hand-made index into a store as a real image.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
IS_ROOT = os.geteuid() == 0

# ---------------------------------------------------------------------------------------------- CLI


def shoal_exe() -> list[str]:
    """The ``shoal`` console script of the interpreter running the tests."""
    exe = Path(sys.executable).parent / "shoal"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("shoal")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from shoal.cli import main; sys.exit(main())"]


def shoal_cmd(store: str | os.PathLike[str] | None, *args: str | os.PathLike[str]) -> list[str]:
    pre = ["--store", os.fspath(store)] if store is not None else []
    return shoal_exe() + pre + [os.fspath(a) for a in args]


def run_shoal(store: str | os.PathLike[str] | None, *args: str | os.PathLike[str], check: bool = True,
              timeout: float = 300, user: int | None = None, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run ``shoal [--store STORE] ARGS`` and return the completed process (stdout bytes, stderr bytes).

    ``user``: run as this uid/gid (via setpriv) with no supplementary groups.
    """
    cmd = shoal_cmd(store, *args)
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + cmd
    env = dict(os.environ)
    env.pop("SHOAL_STORE", None)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {p.returncode}\nstdout: {p.stdout[-2000:]!r}\nstderr: {p.stderr[-4000:]!r}")
    return p


def assert_one_line_error(p: subprocess.CompletedProcess[bytes], *words: str) -> str:
    """``p`` failed with exactly one ``shoal: error: ...`` line on stderr, mentioning one of ``words``.

    Returns the message.  No traceback, nothing else on stderr.
    """
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, f"expected failure, got exit 0; stderr={err!r} stdout={p.stdout[:500]!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err[-3000:]}"
    assert lines[0].startswith("shoal: error: "), f"bad error line: {lines[0]!r}"
    assert "Traceback" not in err
    if words:
        low = lines[0].lower()
        assert any(w.lower() in low for w in words), f"error {lines[0]!r} mentions none of {words}"
    return lines[0]


# ---------------------------------------------------------------------------------------------- snapshots

_TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _sha256_file(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(1 << 20)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def tree_snapshot(root: str | bytes | os.PathLike[str], *, content: bool = True,
                  root_meta: bool = True) -> dict[bytes, dict[str, Any]]:
    """Every entry under ``root`` -> its type, mode (incl. setuid/setgid/sticky), uid, gid, mtime_ns,
    xattrs, and per type: size + sha256 (files), hardlink group (files: sorted tuple of all paths in the
    tree sharing the inode), link target (symlinks), (major, minor) (devices).  Keys are relative paths
    as bytes; the root is ``b""`` (left out when ``root_meta`` is False).  Inode numbers, atimes, ctimes,
    directory sizes and link counts are left out: they are not part of an image.
    """
    base = os.fsencode(root)
    out: dict[bytes, dict[str, Any]] = {}
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(base, rel) if rel else base
        st = os.lstat(full)
        m = st.st_mode
        rec: dict[str, Any] = {
            "type": _TYPES.get(stat.S_IFMT(m), oct(stat.S_IFMT(m))),
            "mode": oct(stat.S_IMODE(m)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": _xattrs(full),
        }
        if stat.S_ISREG(m):
            rec["size"] = st.st_size
            if content:
                rec["sha256"] = _sha256_file(full)
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif stat.S_ISLNK(m):
            rec["target"] = os.readlink(full)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif stat.S_ISDIR(m):
            for name in sorted(os.listdir(full)):
                stack.append(rel + b"/" + name if rel else name)
        out[rel] = rec
    for paths in by_inode.values():
        group = tuple(sorted(paths))
        for p in paths:
            out[p]["links"] = group
    if not root_meta:
        out.pop(b"", None)
    return out


def assert_same_tree(a: dict[bytes, dict[str, Any]], b: dict[bytes, dict[str, Any]], limit: int = 15) -> None:
    """Assert two snapshots are equal, listing the first differences readably."""
    if a == b:
        return
    problems = []
    for p in sorted(a.keys() - b.keys())[:limit]:
        problems.append(f"only in first:  {p!r} {a[p]['type']}")
    for p in sorted(b.keys() - a.keys())[:limit]:
        problems.append(f"only in second: {p!r} {b[p]['type']}")
    for p in sorted(a.keys() & b.keys()):
        if a[p] != b[p]:
            diffs = {k: (a[p].get(k), b[p].get(k)) for k in a[p].keys() | b[p].keys() if a[p].get(k) != b[p].get(k)}
            problems.append(f"differs: {p!r}: {diffs}")
            if len(problems) > 3 * limit:
                break
    n = sum(1 for p in a.keys() & b.keys() if a[p] != b[p])
    raise AssertionError(f"trees differ ({len(a.keys() ^ b.keys())} paths not in both, {n} entries differ):\n"
                         + "\n".join(problems))


# ---------------------------------------------------------------------------------------------- tree generation

# user.* xattrs are refused on symlinks, fifos and devices; security.capability needs CAP_SETFCAP.
# A v2 file capability: magic 0x02000000 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_BIND_SERVICE (bit 10).
VFS_CAP_NET_BIND = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)

_TEXT_TABLE = bytes((b"etaoinshrdlucmfwypvbgkqjxz  \n\n,.ETAOINSHRDLU0123456789 " * 8)[:256])

ODD_NAMES = [b"caf\xe9", b"\xff\xfe raw", b"new\nline", b"sp ace", b"caf\xc3\xa9", b"cafe\xcc\x81", b"-dash",
             b"...", b".hidden", b"back\\slash", b"tab\there", b"q'uo\"te", b"*?[glob]", b"n" * 255]


def _text(rng: random.Random, n: int) -> bytes:
    """Compressible text-like bytes (~4.5 bits/byte)."""
    return rng.randbytes(n).translate(_TEXT_TABLE)


def _size(rng: random.Random) -> int:
    r = rng.random()
    for p, lo, hi in ((0.03, 0, 0), (0.33, 1, 512), (0.63, 512, 4096), (0.905, 4096, 32768),
                      (0.995, 32768, 262144), (1.0, 262144, 1 << 20)):
        if r < p:
            if hi == 0:
                return 0
            return int(lo * (hi / lo) ** rng.random())
    raise AssertionError


def _mtime(rng: random.Random) -> int:
    return (1_500_000_000 + rng.randrange(200_000_000)) * 1_000_000_000 + rng.choice([0, rng.randrange(10**9)])


def _meta(path: bytes, *, uid: int, gid: int, mode: int | None, xattrs: dict[str, bytes], mtime_ns: int,
          is_link: bool = False) -> None:
    """Apply metadata in the order that keeps it: owner, then mode (chown clears setuid), then xattrs
    (chown clears security.capability), then times."""
    if IS_ROOT:
        os.chown(path, uid, gid, follow_symlinks=False)
    if mode is not None and not is_link:
        os.chmod(path, mode)
    for k, v in xattrs.items():
        os.setxattr(path, k, v, follow_symlinks=False)
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def generate_tree(dest: str | os.PathLike[str], seed: int = 20240601, n_files: int = 5200,
                  big_files: int = 4) -> dict[str, int]:
    """Write a deterministic tree into the new directory ``dest``; return counts by kind.

    Everything comes from ``random.Random(seed)``.  Contents: ``n_files`` regular files with sizes from
    0 bytes to 1 MiB (log-uniform in classes, ~60 MB in all) plus ``big_files`` of 1-4 MiB, half
    compressible text and half random bytes, a few exact duplicates; ~260 nested directories (some
    empty, sticky, setgid, 0o555); names that are not UTF-8 (b"caf\\xe9"), contain newlines, are 255
    bytes long; symlinks (relative, absolute, dangling, non-UTF-8 target, to directories); hardlink
    groups across directories; fifos; char and block devices (root only); user.* xattrs (binary and
    empty values) on files and directories, security.capability (root only) and a trusted.* xattr on a
    symlink (root only); setuid/setgid/sticky modes; odd uid/gid (root only); mtimes with nanoseconds,
    one before 1970.  Directory metadata is applied last, deepest first.
    """
    rng = random.Random(seed)
    root = os.fsencode(dest)
    os.mkdir(root)
    counts = {"files": 0, "dirs": 1, "symlinks": 0, "hardlinks": 0, "fifos": 0, "devices": 0, "bytes": 0}
    owners = [(0, 0)] * 6 + [(1000, 1000), (12345, 54321), (65534, 65534), (4294967294, 7)]

    # directories
    dirs: list[bytes] = [b""]
    depth = {b"": 0}
    for i in range(260):
        parent = rng.choice([d for d in dirs[-40:] if depth[d] < 6] or [b""])
        name = ODD_NAMES[i % len(ODD_NAMES)] if i % 37 == 5 else f"d{i:03d}".encode()
        p = parent + b"/" + name if parent else name
        if p in depth:
            continue
        os.mkdir(os.path.join(root, p))
        dirs.append(p)
        depth[p] = depth[parent] + 1
        counts["dirs"] += 1
    dir_meta = {}
    for d in dirs:
        uid, gid = rng.choice(owners)
        mode = rng.choice([0o755] * 8 + [0o700, 0o1777, 0o2775, 0o555, 0o750])
        xa = {"user.dir": rng.randbytes(rng.randrange(1, 40))} if rng.random() < 0.05 else {}
        dir_meta[d] = dict(uid=uid, gid=gid, mode=mode, xattrs=xa, mtime_ns=_mtime(rng))
    dir_meta[b""]["mtime_ns"] = -123_456_789_012  # before 1970, with nanoseconds

    files: list[bytes] = []
    file_meta: dict[bytes, dict[str, Any]] = {}
    pool: list[bytes] = []

    def add_file(p: bytes, data: bytes) -> None:
        full = os.path.join(root, p)
        with open(full, "wb") as f:
            f.write(data)
        uid, gid = rng.choice(owners)
        modes = [0o644] * 12 + [0o755, 0o600, 0o4755, 0o2755, 0o6755, 0o444, 0o640]
        if IS_ROOT:
            modes.append(0o000)
        xa: dict[str, bytes] = {}
        r = rng.random()
        if r < 0.04:
            xa["user.shoal.test"] = rng.randbytes(rng.randrange(0, 200))
        elif r < 0.05:
            xa["user.mime_type"] = b"text/plain"
            xa["user.empty"] = b""
        elif r < 0.052 and IS_ROOT:
            xa["security.capability"] = VFS_CAP_NET_BIND
        file_meta[p] = dict(uid=uid, gid=gid, mode=rng.choice(modes), xattrs=xa, mtime_ns=_mtime(rng))
        files.append(p)
        counts["files"] += 1
        counts["bytes"] += len(data)

    for i in range(n_files):
        d = rng.choice(dirs)
        if i % 97 == 3:
            name = ODD_NAMES[i % len(ODD_NAMES)][:250] + b".f"
        else:
            name = f"f{i:05d}.{rng.choice(['txt', 'bin', 'so', 'py'])}".encode()
        p = d + b"/" + name if d else name
        if p in file_meta:
            continue
        if pool and rng.random() < 0.02:
            data = rng.choice(pool)  # an exact duplicate of an earlier file
        else:
            n = _size(rng)
            data = _text(rng, n) if rng.random() < 0.5 else rng.randbytes(n)
            if 0 < n < 100_000 and len(pool) < 50:
                pool.append(data)
        add_file(p, data)
    for i in range(big_files):
        n = rng.randrange(1 << 20, 4 << 20)
        add_file(f"big{i}.dat".encode(), _text(rng, n) if i % 2 else rng.randbytes(n))

    # hardlink groups (the metadata of the inode is the primary's)
    for i in range(30):
        src = rng.choice(files)
        for j in range(rng.choice([1, 1, 2])):
            d = rng.choice(dirs)
            p = (d + b"/" if d else b"") + f"hl{i:02d}-{j}".encode()
            if os.path.lexists(os.path.join(root, p)):
                continue
            os.link(os.path.join(root, src), os.path.join(root, p))
            counts["hardlinks"] += 1

    specials: list[tuple[bytes, dict[str, Any]]] = []
    link_targets = [b"/etc/passwd", b"does/not/exist", b"caf\xe9", b"../" * 3 + b"x", b"t" * 1000, b".", b".."]
    for i in range(40):
        d = rng.choice(dirs)
        p = (d + b"/" if d else b"") + f"ln{i:02d}".encode()
        if i < len(link_targets):
            target = link_targets[i]
        else:
            t = rng.choice(files + dirs[1:])
            target = b"/" + t if i % 3 == 0 else os.path.relpath(os.path.join(b"/", t), os.path.join(b"/", d))
        os.symlink(target, os.path.join(root, p))
        uid, gid = rng.choice(owners)
        xa = {"trusted.shoal": b"on a symlink"} if IS_ROOT and i == 9 else {}
        specials.append((p, dict(uid=uid, gid=gid, mode=None, xattrs=xa, mtime_ns=_mtime(rng), is_link=True)))
        counts["symlinks"] += 1
    for i in range(5):
        d = rng.choice(dirs)
        p = (d + b"/" if d else b"") + f"fifo{i}".encode()
        os.mkfifo(os.path.join(root, p))
        specials.append((p, dict(uid=0, gid=0, mode=rng.choice([0o644, 0o600, 0o666]), xattrs={},
                                 mtime_ns=_mtime(rng))))
        counts["fifos"] += 1
    if IS_ROOT:
        devs = [("null", stat.S_IFCHR, 1, 3), ("zero", stat.S_IFCHR, 1, 5), ("tty", stat.S_IFCHR, 5, 0),
                ("wide", stat.S_IFCHR, 259, 65536), ("loop0", stat.S_IFBLK, 7, 0), ("sda1", stat.S_IFBLK, 8, 1)]
        os.mkdir(os.path.join(root, b"dev"))
        dirs.append(b"dev")
        dir_meta[b"dev"] = dict(uid=0, gid=0, mode=0o755, xattrs={}, mtime_ns=_mtime(rng))
        for name, kind, major, minor in devs:
            p = b"dev/" + name.encode()
            os.mknod(os.path.join(root, p), 0o600 | kind, os.makedev(major, minor))
            specials.append((p, dict(uid=0, gid=rng.choice([0, 5, 6]), mode=rng.choice([0o666, 0o620, 0o660]),
                                     xattrs={}, mtime_ns=_mtime(rng))))
            counts["devices"] += 1

    for p, m in list(file_meta.items()) + specials:
        _meta(os.path.join(root, p), **m)
    for d in sorted(dirs, key=lambda d: -d.count(b"/") - (1 if d else 0)):
        _meta(os.path.join(root, d) if d else root, **dir_meta[d])
    return counts


def generator_fingerprint() -> str:
    """Changes whenever the generator's code changes (used to key the on-disk cache)."""
    src = "".join(inspect.getsource(f) for f in (generate_tree, _size, _text, _mtime, _meta))
    src += repr((_TEXT_TABLE, ODD_NAMES, VFS_CAP_NET_BIND, IS_ROOT))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- clone


def clone_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int = 1,
               order: str = "shuffle") -> None:
    """Recreate ``src`` at ``dst`` creating entries in a different order (``shuffle`` or ``reverse``),
    then restore all metadata: owners, modes, xattrs and mtimes (directories last, deepest first).
    Hardlinks are recreated as hardlinks.  The result has the same ``tree_snapshot``."""
    s, d = os.fsencode(src), os.fsencode(dst)
    entries: list[tuple[bytes, os.stat_result]] = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(s, rel) if rel else s
        st = os.lstat(full)
        entries.append((rel, st))
        if stat.S_ISDIR(st.st_mode):
            stack.extend(rel + b"/" + n if rel else n for n in os.listdir(full))
    rng = random.Random(seed)
    if order == "reverse":
        entries.sort(key=lambda t: t[0], reverse=True)
    else:
        rng.shuffle(entries)
    os.mkdir(d)
    dirs = [(r, st) for r, st in entries if stat.S_ISDIR(st.st_mode)]
    others = [(r, st) for r, st in entries if not stat.S_ISDIR(st.st_mode)]
    for rel, _ in dirs:
        if rel:
            os.makedirs(os.path.join(d, rel), exist_ok=True)
    first: dict[tuple[int, int], bytes] = {}
    for rel, st in others:
        sp, dp = os.path.join(s, rel), os.path.join(d, rel)
        m = st.st_mode
        if stat.S_ISREG(m):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first:
                os.link(first[key], dp)
                continue
            first[key] = dp
            with open(sp, "rb") as fi, open(dp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
        elif stat.S_ISLNK(m):
            os.symlink(os.readlink(sp), dp)
        elif stat.S_ISFIFO(m):
            os.mkfifo(dp)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            os.mknod(dp, 0o600 | stat.S_IFMT(m), st.st_rdev)
        else:
            raise AssertionError(f"cannot clone {rel!r}")
    for rel, st in others:
        sp, dp = os.path.join(s, rel), os.path.join(d, rel)
        _meta(dp, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode), xattrs=_xattrs(sp),
              mtime_ns=st.st_mtime_ns, is_link=stat.S_ISLNK(st.st_mode))
    for rel, st in sorted(dirs, key=lambda t: -t[0].count(b"/") - (1 if t[0] else 0)):
        sp = os.path.join(s, rel) if rel else s
        dp = os.path.join(d, rel) if rel else d
        _meta(dp, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode), xattrs=_xattrs(sp),
              mtime_ns=st.st_mtime_ns)


def write_tree(root: str | os.PathLike[str], files: dict[str, bytes], mtime_ns: int = 1_600_000_000_000_000_000,
               mode: int = 0o644) -> Path:
    """A small tree of regular files (and their parent directories) with one fixed mtime everywhere."""
    r = Path(root)
    r.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = r / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
    fix_times(r, mtime_ns)
    return r


def fix_times(root: str | os.PathLike[str], mtime_ns: int) -> None:
    """Set every mtime (deepest first, directories after their contents) to ``mtime_ns``."""
    paths = sorted((Path(dp) / n for dp, dns, fns in os.walk(root) for n in dns + fns),
                   key=lambda p: -len(p.parts))
    for p in paths + [Path(root)]:
        os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


# ---------------------------------------------------------------------------------------------- store helpers


def blob_bytes(store_root: str | os.PathLike[str]) -> int:
    """Total size of all blobs in a store."""
    b = Path(store_root) / "blobs" / "sha256"
    return sum(p.stat().st_size for p in b.iterdir()) if b.exists() else 0


def manifest_doc(store: Any, ref: str) -> dict[str, Any]:
    m = store.resolve(ref)
    return json.loads(m.raw)


def layer_digests(store: Any, ref: str) -> list[str]:
    return [layer["digest"] for layer in manifest_doc(store, ref)["layers"]]


def put_image(store: Any, ref: str, index_blob: bytes, root: str | None = None,
              packs: Iterable[bytes] = ()) -> str:
    """Make ``index_blob`` (a compressed index, hostile or not) a tagged image in ``store``, through the
    Layout and Store APIs: index, config and pack blobs, the manifest, and the tag.  Returns the
    manifest digest.  ``root`` defaults to an all-zero digest."""
    from shoal import mediatypes as mt
    from shoal.format.manifest import Descriptor, ImageConfig, build_config, build_manifest, parse_manifest

    root = root or "sha256:" + "0" * 64
    lay = store.layout
    idx_desc = Descriptor(mt.INDEX, lay.put(index_blob), len(index_blob))
    cfg = build_config(ImageConfig(root=root))
    cfg_desc = Descriptor(mt.CONFIG, lay.put(cfg), len(cfg))
    pack_descs = [Descriptor(mt.PACK, lay.put(p), len(p)) for p in packs]
    raw, digest = build_manifest(cfg_desc, idx_desc, pack_descs, root)
    lay.put(raw)
    store.tag(ref, parse_manifest(raw, digest))
    return digest


# ---------------------------------------------------------------------------------------------- OCI schemas


def oci_schema_dir() -> Path:
    """$SHOAL_OCI_SCHEMA, else ../shared/oci-schema beside the repository, else the vendored tests/oci-schema."""
    env = os.environ.get("SHOAL_OCI_SCHEMA")
    candidates = [Path(env)] if env else []
    candidates += [REPO / ".." / "shared" / "oci-schema", TESTS / "oci-schema"]
    for c in candidates:
        if (c / "image-manifest-schema.json").is_file():
            return c
    raise FileNotFoundError(f"no OCI schemas in {candidates}")


@functools.lru_cache(maxsize=None)
def _oci_registry() -> tuple[Any, dict[str, Any]]:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    d = oci_schema_dir()
    docs = {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}

    def retrieve(uri: str) -> Resource:
        # the schemas name each other by file name; resolve any base URI to the file of that name
        name = uri.rstrip("/").rsplit("/", 1)[-1].split("#")[0]
        if name not in docs:
            raise LookupError(uri)
        return Resource.from_contents(docs[name], default_specification=DRAFT4)

    registry: Any = Registry(retrieve=retrieve)  # type: ignore[call-arg]
    for name, doc in docs.items():
        registry = registry.with_resource(name, Resource.from_contents(doc, default_specification=DRAFT4))
    return registry, docs


def validate_oci(doc: Any, schema_name: str) -> None:
    """Validate ``doc`` (a parsed JSON value, or bytes/str of JSON) against OCI schema ``schema_name``
    (e.g. ``image-manifest-schema.json``; the ``.json`` may be left out).  Raises
    jsonschema.ValidationError."""
    import jsonschema

    if isinstance(doc, (bytes, str)):
        doc = json.loads(doc)
    if not schema_name.endswith(".json"):
        schema_name += ".json"
    registry, docs = _oci_registry()
    validator = jsonschema.Draft4Validator(docs[schema_name], registry=registry,
                                           format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    validator.validate(doc)


# ---------------------------------------------------------------------------------------------- --json shapes

JSON_DOC = REPO / "docs" / "cli-json.md"
JSON_OPEN_KEYS = frozenset({"kinds", "config", "stats", "ecosystems"})  # open objects (docs/cli-json.md, Conventions)


@functools.lru_cache(maxsize=1)
def json_shapes() -> dict[str, list[Any]]:
    """docs/cli-json.md's examples: ``{command: [example documents]}``, from each ``### `shoal CMD ...```
    heading (``copy``, ``push`` and ``pull`` share one section) and the ```json blocks under it."""
    import re

    shapes: dict[str, list[Any]] = {}
    cmds: list[str] = []
    for part in re.split(r"^### ", JSON_DOC.read_text(), flags=re.M)[1:]:
        heading = part.split("\n", 1)[0]
        cmds = re.findall(r"`shoal ([a-z]+)", heading)
        for block in re.findall(r"```json\n(.*?)```", part, re.S):
            for c in cmds:
                shapes.setdefault(c, []).append(json.loads(block))
    return shapes


def _json_type(v: Any) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list", dict: "dict"}.get(
        type(v), "null")


def _shape_errors(got: Any, want: Any, where: str) -> list[str]:
    if _json_type(got) != _json_type(want):
        return [f"{where}: {_json_type(got)} {got!r:.60}, want {_json_type(want)}"]
    if isinstance(want, dict):
        if where.rsplit(".", 1)[-1] in JSON_OPEN_KEYS:
            return []
        if set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) - set(want))} not documented, "
                    f"{sorted(set(want) - set(got))} missing"]
        return [e for k in want for e in _shape_errors(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and want:
        errs: list[str] = []
        for i, item in enumerate(got):
            options = [_shape_errors(item, w, f"{where}[{i}]") for w in want]
            if all(options):
                errs += min(options, key=len)
        return errs
    return []


def check_json_shape(command: str, doc: Any) -> None:
    """``doc`` (a parsed ``shoal COMMAND --json`` document) has ``"schema": 1`` and the keys and JSON types of
    one of docs/cli-json.md's examples for COMMAND (a list's items each match one of the example's items)."""
    examples = json_shapes().get(command)
    assert examples, f"docs/cli-json.md documents no --json shape for shoal {command}"
    assert isinstance(doc, dict) and doc.get("schema") == 1, f"{command}: not a schema 1 object: {doc!r:.200}"
    tries = [_shape_errors(doc, ex, command) for ex in examples]
    best = min(tries, key=len)
    assert not best, f"shoal {command} --json differs from docs/cli-json.md:\n" + "\n".join(best[:20])


def published_shoal_digest(host: str, repo: str, reference: str) -> str:
    """The Shoal manifest that ``shoal push`` published at ``repo:reference`` (a tag or digest) of the
    plain-HTTP registry ``host``: the Shoal entry of the image index it writes (oci-mapping.md §4), or
    the manifest itself when the reference names one."""
    import httpx

    from shoal.mediatypes import ARTIFACT_TYPE, OCI_INDEX, OCI_MANIFEST

    r = httpx.get(f"http://{host}/v2/{repo}/manifests/{reference}", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    r.raise_for_status()
    doc = json.loads(r.content)
    if doc.get("mediaType") == OCI_INDEX:
        return str(next(e["digest"] for e in doc["manifests"] if e.get("artifactType") == ARTIFACT_TYPE))
    return r.headers["Docker-Content-Digest"]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created) for the block: pytest-xdist workers build a cached tree once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
