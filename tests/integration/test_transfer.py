"""push / pull / copy / inspect / delete / login against the real distribution registry (issue 3)."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers  # noqa: E402
from regfix import (  # noqa: E402,F401
    Registry,
    RegistryProxy,
    _token_registry_session,
    basic_registry,
    proxy_factory,
    registry,
    registry_factory,
    token_registry,
)
from shoal.build import BuildOptions, build  # noqa: E402
from shoal.copier import CopyOptions, CopyResult, copy  # noqa: E402
from shoal.errors import NotFound, UsageError  # noqa: E402
from shoal.reader import Reader, StoreSource  # noqa: E402
from shoal.store import Store  # noqa: E402
from shoal.store.maintenance import fsck  # noqa: E402
from shoal.transports.base import parse_reference  # noqa: E402
from shoal.transports.docker import DockerReference  # noqa: E402
from shoal.transports.registry import RegistryClient  # noqa: E402
from shoal.transports.resolve import resolve_image  # noqa: E402

__all__ = ["basic_registry", "proxy_factory", "registry", "registry_factory", "token_registry",
           "_token_registry_session"]

# ------------------------------------------------------------------------------------------ helpers


def make_tree(root: Path, seed: int = 7) -> Path:
    """~3.5 MB: 150 small text files, three incompressible files, one compressible file."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    words = [b"alpha", b"beta", b"gamma", b"delta", b"shoal", b"chunk", b"pack", b"frame", b"\n"]
    for i in range(150):
        files[f"etc/conf{i // 30}/f{i:03d}.txt"] = b" ".join(rng.choice(words) for _ in range(rng.randint(200, 1500)))
    for i in range(3):
        files[f"usr/lib/blob{i}.bin"] = rng.randbytes(400_000)
    files["usr/share/doc/big.txt"] = b"".join(b"line %d of the big compressible file\n" % i for i in range(40_000))
    return helpers.write_tree(root, files)


def make_tree_b(a: Path, b: Path, seed: int = 8) -> Path:
    """A's tree plus changes: a new 600 KB random file, five edited files, one removed."""
    shutil.copytree(a, b, symlinks=True)
    rng = random.Random(seed)
    (b / "opt").mkdir()
    (b / "opt" / "new.bin").write_bytes(rng.randbytes(600_000))
    for i in (3, 40, 77, 100, 149):
        p = b / f"etc/conf{i // 30}/f{i:03d}.txt"
        p.write_bytes(p.read_bytes() + b"\nedited %d\n" % i)
    (b / "etc/conf0/f001.txt").unlink()
    helpers.fix_times(b, 1_600_000_000_000_000_000)
    return b


def build_image(store_dir: Path, tree: Path, ref: str, reuse: tuple[str, ...] = (), reuse_store: bool = True) -> Any:
    return build(Store.open(store_dir), tree, ref,
                 BuildOptions(workers=2, reuse=reuse, reuse_store=reuse_store)).manifest


def opts(store: Path | None = None, **kw: Any) -> CopyOptions:
    o: dict[str, object] = {"backoff": 0.05}
    if store is not None:
        o["store"] = str(store)
    o.update(kw)
    return CopyOptions(src_opts=dict(o), dst_opts=dict(o))


def do_copy(src: str, dst: str, store: Path | None = None, **kw: Any) -> CopyResult:
    return copy(parse_reference(src), parse_reference(dst), opts(store, **kw))


def shoal(store: Path | None, *args: str, check: bool = True, **kw: Any) -> Any:
    return helpers.run_shoal(store, *args, check=check, timeout=120, **kw)


def shoal_json(store: Path | None, *args: str) -> dict[str, Any]:
    return json.loads(shoal(store, *args, "--json").stdout)


def changed_chunks_zstd(store_dir: Path, old: str, new: str) -> int:
    """The limit for an update: chunks of ``new`` not in ``old``, each compressed alone at zstd -3."""
    st = Store.open(store_dir)
    a, b = st.resolve(old), st.resolve(new)
    ia, ib = st.load_index(a), st.load_index(b)
    have = set(ia.chunk_ids)
    reader = Reader(ib, StoreSource(st))
    cctx = zstandard.ZstdCompressor(level=3)
    seen: set[bytes] = set()
    total = 0
    for ci, cid in enumerate(ib.chunk_ids):
        if cid in have or cid in seen:
            continue
        seen.add(cid)
        total += len(cctx.compress(bytes(reader.chunk(ci))))
    return total


def unpack_snapshot(store_dir: Path, ref: str, dest: Path) -> dict[bytes, dict[str, object]]:
    shoal(store_dir, "unpack", ref, str(dest))
    return helpers.tree_snapshot(dest)


def manifest_digest(host: str, repo: str, tag: str) -> str:
    with RegistryClient(host, lookup_credentials=False) as c:
        info = c.head_manifest(repo, tag)
        assert info is not None
        return info.digest


#: blobs a registry tag of a Shoal image has beside the image's own: its runtime view's config and stub
VIEW_BLOBS = 2


def shoal_digest(host: str, repo: str, tag: str) -> str:
    """The Shoal manifest a registry tag names: the Shoal entry of the image index ``shoal push`` writes
    (its runtime view first; oci-mapping.md §4)."""
    with RegistryClient(host, lookup_credentials=False) as c:
        raw, _, _ = c.get_manifest(repo, tag)
    index = json.loads(raw)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json", index
    view, shoal = index["manifests"]
    assert view["annotations"]["dev.shoal.image"] == shoal["digest"]
    return str(shoal["digest"])


def repo_name(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def _isolated_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials from this machine's files: HOME and XDG_RUNTIME_DIR in tmp (else root's primary
    file is /run/containers/0/auth.json), no XDG config or docker config dirs; returns where login writes.

    (Not $REGISTRY_AUTH_FILE: docker-registry reads REGISTRY_* variables as its own configuration.)
    """
    (tmp_path / "xdg-run").mkdir()
    auth = tmp_path / "xdg-run" / "containers" / "auth.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    return auth


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("trees")
    a = make_tree(d / "a")
    return a, make_tree_b(a, d / "b")


@pytest.fixture(scope="module")
def built(trees: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a:1, b:1 (B's tree built with --reuse a:1, as an update is) and c:1 (B's tree built
    alone: its packs that an edit touched are new, but most of their frames hold chunks A has, so a pull
    after A takes range reads)."""
    d = tmp_path_factory.mktemp("built") / "store"
    build_image(d, trees[0], "a:1")
    build_image(d, trees[1], "b:1", reuse=("a:1",))
    build_image(d, trees[1], "c:1", reuse_store=False)
    return d


def fresh_store(tmp_path: Path, name: str = "s") -> Path:
    return tmp_path / f"store-{name}-{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------------------ references

ROUND_TRIP = [
    ("docker://busybox", "docker.io", "library/busybox", "latest", None, "docker://busybox:latest"),
    ("docker://docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", None, "docker://busybox:1.36"),
    ("docker://index.docker.io/org/app", "docker.io", "org/app", "latest", None, "docker://org/app:latest"),
    ("docker://localhost/x", "localhost", "x", "latest", None, "docker://localhost/x:latest"),
    ("docker://127.0.0.1:5000/a/b/c:v1.2-rc_3", "127.0.0.1:5000", "a/b/c", "v1.2-rc_3", None,
     "docker://127.0.0.1:5000/a/b/c:v1.2-rc_3"),
    ("docker://quay.io/org/app@sha256:" + "ab" * 32, "quay.io", "org/app", None, "sha256:" + "ab" * 32,
     "docker://quay.io/org/app@sha256:" + "ab" * 32),
]


@pytest.mark.parametrize("text,host,repo,tag,digest,canon", ROUND_TRIP)
def test_reference_parsing_round_trips(text: str, host: str, repo: str, tag: str | None, digest: str | None,
                                       canon: str) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, DockerReference)
    assert (ref.host, ref.repo, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert str(ref) == canon
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("bad", [
    "docker:busybox", "docker://", "docker://h:5000/Upper", "docker://h/a:b@sha256:" + "a" * 64,
    "docker://h/a@sha256:12", "docker://h/a:", "docker://h/a:t/x", "docker://bad_host:x/a",
])
def test_bad_references_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(bad)


# ------------------------------------------------------------------------------------------ push / pull


def test_push_pull_inspect_delete(registry: Registry, proxy_factory: Callable[..., RegistryProxy], built: Path,
                                  trees: tuple[Path, Path], tmp_path: Path) -> None:
    proxy = proxy_factory(registry.url)  # records the order of requests
    repo = repo_name("push")
    dst = f"docker://{proxy.host}/{repo}:1"
    out = shoal_json(built, "push", "a:1", dst, "--additional-tag", "stable", "--additional-tag", "v1")
    m = Store.open(built).resolve("a:1")
    assert out["digest"] == manifest_digest(registry.host, repo, "1")  # the tag's index
    for key in ("bytes_fetched", "bytes_sent", "requests", "seconds"):
        assert key in out
    assert out["blobs_sent"] == 2 + len(m.packs) + VIEW_BLOBS and out["requests"] >= out["blobs_sent"] * 2
    blob_bytes = m.config.size + m.index.size + sum(p.size for p in m.packs)
    view_bytes = m.config.size + 2048 + 4096  # its config (the image's, rootfs set), stub, manifest, the index
    assert blob_bytes <= out["bytes_sent"] <= blob_bytes + view_bytes + 3 * len(m.raw) + 4096
    # manifests last: every blob upload finished before the first manifest PUT
    puts = [(i, p) for i, (meth, p, _) in enumerate(proxy.log) if meth == "PUT"]
    first_manifest = min(i for i, p in puts if "/manifests/" in p)
    assert all(i < first_manifest for i, p in puts if "/blobs/" in p)
    tagged = {p.rsplit("/", 1)[1] for _, p in puts if "/manifests/" in p}
    assert {t for t in tagged if not t.startswith("sha256:")} == {"1", "stable", "v1"}
    assert m.digest in tagged  # the Shoal manifest and its view go up by digest, children of the index
    for tag in ("1", "stable", "v1"):
        assert shoal_digest(registry.host, repo, tag) == m.digest

    # a second push sends no blob
    again = shoal_json(built, "push", "a:1", dst)
    assert again["blobs_sent"] == 0 and again["bytes_sent"] < 8192  # three small manifests per tag

    # inspect without pulling packs
    ref = parse_reference(f"docker://{registry.host}/{repo}:stable")
    with ref.new_source() as src:
        res = resolve_image(src, ref)
    assert res.raw == m.raw and res.config and res.index is not None
    assert "sha256:" + res.index.root.hex() == m.root

    # pull into a fresh store (default name), unpack, same tree; fsck clean
    s2 = fresh_store(tmp_path)
    got = shoal_json(s2, "pull", f"docker://{registry.host}/{repo}:v1")
    assert got["digest"] == m.digest and got["bytes_fetched"] >= blob_bytes
    assert Store.open(s2).resolve(f"{repo}:v1").root == m.root
    helpers.assert_same_tree(helpers.tree_snapshot(trees[0]), unpack_snapshot(s2, f"{repo}:v1", tmp_path / "u"))
    assert shoal(s2, "fsck").returncode == 0

    # delete: the manifest (and so every tag of it) goes
    shoal(None, "delete", f"docker://{registry.host}/{repo}:stable")
    p = shoal(fresh_store(tmp_path), "pull", f"docker://{registry.host}/{repo}:1", "x:1", check=False)
    helpers.assert_one_line_error(p, "404", "unknown", "not found")
    with pytest.raises(NotFound):
        parse_reference(f"docker://{registry.host}/{repo}:1").delete()


def test_dedup_push_and_pull_of_an_update(registry: Registry, built: Path, tmp_path: Path) -> None:
    repo = repo_name("dedup")
    st = Store.open(built)
    ma, mb = st.resolve("a:1"), st.resolve("b:1")
    ra = do_copy("a:1", f"docker://{registry.host}/{repo}:a", built)
    rb = do_copy("b:1", f"docker://{registry.host}/{repo}:b", built)
    new_packs = [p for p in mb.packs if p.digest not in {q.digest for q in ma.packs}]
    # the new packs, the index and the config, and the new image's runtime view (config and stub)
    assert new_packs and rb.blobs_sent == len(new_packs) + 2 + VIEW_BLOBS
    new_bytes = sum(p.size for p in new_packs) + mb.index.size + mb.config.size
    assert new_bytes <= rb.bytes_sent <= new_bytes + 2 * len(mb.raw) + 4096
    assert rb.bytes_sent < ra.bytes_sent / 2

    # B after A: only the frames holding B's new chunks, by range reads
    s2 = fresh_store(tmp_path)
    do_copy(f"docker://{registry.host}/{repo}:a", "a:1", s2)
    r = do_copy(f"docker://{registry.host}/{repo}:b", "b:1", s2)
    limit = changed_chunks_zstd(built, "a:1", "b:1")
    assert 0 < r.bytes_fetched <= 1.3 * limit, (r.bytes_fetched, limit)
    assert Store.open(s2).resolve("b:1").root == mb.root
    assert fsck(Store.open(s2)).ok
    helpers.assert_same_tree(unpack_snapshot(built, "b:1", tmp_path / "want"),
                             unpack_snapshot(s2, "b:1", tmp_path / "got"))


def test_pull_with_unpack_writes_the_tree_while_pulling(registry: Registry, proxy_factory: Callable[..., RegistryProxy],
                                                       built: Path, trees: tuple[Path, Path], tmp_path: Path) -> None:
    """``shoal pull --unpack DIR`` (issue 13): the image lands in the store as a plain pull leaves it and the
    tree in DIR, exact; after A, B's pull takes range reads and reads A's chunks from the store; a target
    that is not new or empty is refused before anything is fetched; a pull that fails leaves no tree."""
    repo = repo_name("unpack")
    for tag in ("a", "b", "c"):
        do_copy(f"{tag}:1", f"docker://{registry.host}/{repo}:{tag}", built)
    st = Store.open(built)
    s2 = fresh_store(tmp_path)
    out = shoal_json(s2, "pull", f"docker://{registry.host}/{repo}:a", "a:1", "--unpack", str(tmp_path / "ua"))
    helpers.check_json_shape("pull", out)  # the shape docs/cli-json.md shows
    assert out["digest"] == st.resolve("a:1").digest
    assert out["unpacked"]["dir"] == str(tmp_path / "ua") and out["unpacked"]["files"] == 154
    assert out["unpacked"]["bytes"] == sum(p.stat().st_size for p in trees[0].rglob("*") if p.is_file())
    helpers.assert_same_tree(helpers.tree_snapshot(trees[0]), helpers.tree_snapshot(tmp_path / "ua"))
    assert Store.open(s2).resolve("a:1").root == st.resolve("a:1").root
    assert shoal(s2, "fsck").returncode == 0
    # again, the image in the store already: no pack fetched, every frame read from the store
    again = shoal_json(s2, "pull", f"docker://{registry.host}/{repo}:a", "a:1", "--unpack", str(tmp_path / "ua2"))
    assert again["chunks_fetched"] == 0 and again["unpacked"]["files"] == 154
    helpers.assert_same_tree(helpers.tree_snapshot(trees[0]), helpers.tree_snapshot(tmp_path / "ua2"))
    # B (an update: whole new packs) and C (B's tree built alone: range reads) after A: both exact
    s3 = fresh_store(tmp_path)
    shutil.copytree(s2, s3)
    for tag, store in (("b", s2), ("c", s3)):
        shoal(store, "pull", f"docker://{registry.host}/{repo}:{tag}", f"{tag}:1", "--unpack", str(tmp_path / tag))
        helpers.assert_same_tree(unpack_snapshot(built, f"{tag}:1", tmp_path / f"want-{tag}"),
                                 helpers.tree_snapshot(tmp_path / tag))
        assert shoal(store, "fsck").returncode == 0

    # a target with something in it: refused before any request, nothing pulled, nothing touched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    proxy = proxy_factory(registry.url)
    s4 = fresh_store(tmp_path)
    p = shoal(s4, "pull", f"docker://{proxy.host}/{repo}:a", "a:1", "--unpack", str(busy), check=False)
    helpers.assert_one_line_error(p, "not empty")
    assert proxy.log == [] and (busy / "keep").read_text() == "mine" and os.listdir(busy) == ["keep"]

    # a pack that cannot be fetched: the pull fails, and the tree it started is gone
    m = st.resolve("a:1")
    proxy = proxy_factory(registry.url, faults=[("GET", m.packs[-1].digest, 404)] * 20)
    p = shoal(fresh_store(tmp_path), "pull", f"docker://{proxy.host}/{repo}:a", "a:1", "--unpack",
              str(tmp_path / "gone"), check=False)
    helpers.assert_one_line_error(p, "404", "not found", "unknown")
    assert not (tmp_path / "gone").exists()


def test_pull_with_unpack_of_a_classic_image(registry: Registry, built: Path, trees: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    """``shoal pull --unpack DIR`` of a classic (tar layer) image: it stays classic in the store, as a plain
    pull leaves it, and DIR holds its tree, exact (this failed after the pull with "not a Shoal image");
    ``shoal unpack`` and ``cat`` of the stored classic image work too (each converts it, untagged)."""
    repo = repo_name("classic")
    shoal(built, "export", "a:1", f"docker://{registry.host}/{repo}:c")
    s2 = fresh_store(tmp_path)
    out = shoal_json(s2, "pull", f"docker://{registry.host}/{repo}:c", "c:1", "--unpack", str(tmp_path / "u"))
    assert out["unpacked"]["dir"] == str(tmp_path / "u") and out["unpacked"]["files"] == 154
    want = helpers.tree_snapshot(trees[0])
    helpers.assert_same_tree(want, helpers.tree_snapshot(tmp_path / "u"))
    assert shoal_json(s2, "inspect", "c:1")["format"] == "classic"
    shoal(s2, "unpack", "c:1", str(tmp_path / "u2"))
    helpers.assert_same_tree(want, helpers.tree_snapshot(tmp_path / "u2"))
    some = next(p for p in sorted(trees[0].rglob("*")) if p.is_file() and not p.is_symlink())
    rel = "/" + str(some.relative_to(trees[0]))
    assert shoal(s2, "cat", "c:1", rel).stdout == some.read_bytes()


def test_pull_through_an_image_index_takes_the_chunk_level_path(registry: Registry, built: Path,
                                                                trees: tuple[Path, Path], tmp_path: Path) -> None:
    """Pulling an image index fetches what pulling each of its Shoal images by digest fetches: only the
    frames holding chunks the store lacks, by range reads (issue 13: 13.8 MB against 0.89 MB)."""
    from shoal.convert.platforms import index_bytes, write_index

    src_store = tmp_path / "src"
    shutil.copytree(built, src_store)
    st = Store.open(src_store)
    ma, mc = st.resolve("a:1"), st.resolve("c:1")  # c: B's tree built alone, most frames hold A's chunks
    write_index(st, "multi:1", index_bytes([({"architecture": "amd64", "os": "linux"}, ma),
                                            ({"architecture": "arm64", "os": "linux"}, mc)]))
    repo = repo_name("index")
    do_copy("multi:1", f"docker://{registry.host}/{repo}:m", src_store)
    base = fresh_store(tmp_path, "base")
    do_copy(f"docker://{registry.host}/{repo}@{ma.digest}", "a:1", base)
    by_index, by_digest = tmp_path / "by-index", tmp_path / "by-digest"
    shutil.copytree(base, by_index)
    shutil.copytree(base, by_digest)
    r_child = do_copy(f"docker://{registry.host}/{repo}@{mc.digest}", "c:1", by_digest)
    r_index = do_copy(f"docker://{registry.host}/{repo}:m", "m:1", by_index)
    # the same frames; on top only the index (with its views) and A's manifest, which the store has
    extra = r_index.bytes_fetched - r_child.bytes_fetched
    assert 0 <= extra <= len(ma.raw) + 8192, (r_index.bytes_fetched, r_child.bytes_fetched)
    assert r_index.chunks_fetched == r_child.chunks_fetched > 0
    s = Store.open(by_index)
    assert {m.digest for _, m in s.resolve_all("m:1")[1]} == {ma.digest, mc.digest}
    assert s.resolve("m:1", "linux/arm64").root == mc.root
    assert fsck(s).ok
    shoal(by_index, "unpack", "--platform", "linux/arm64", "m:1", str(tmp_path / "u"))
    helpers.assert_same_tree(helpers.tree_snapshot(trees[1]), helpers.tree_snapshot(tmp_path / "u"))


def test_copy_registry_to_registry(registry: Registry, registry_factory: Callable[..., Registry], built: Path,
                                   tmp_path: Path) -> None:
    repo, other = repo_name("copy"), repo_name("copy")
    m = Store.open(built).resolve("a:1")
    do_copy("a:1", f"docker://{registry.host}/{repo}:1", built)
    # same registry: every blob is mounted from the source repository, none is sent
    r = do_copy(f"docker://{registry.host}/{repo}:1", f"docker://{registry.host}/{other}:1")
    assert r.blobs_sent == 0 and r.blobs_skipped == 2 + len(m.packs) + VIEW_BLOBS
    assert r.bytes_sent < 8192 and r.bytes_fetched < 8192
    assert shoal_digest(registry.host, other, "1") == m.digest
    # another registry: everything moves, byte-identical
    reg2 = registry_factory()
    r2 = shoal_json(None, "copy", f"docker://{registry.host}/{other}:1", f"docker://{reg2.host}/{repo}:2")
    assert r2["digest"] == r.digest and r2["blobs_sent"] == 2 + len(m.packs) + VIEW_BLOBS  # the index as it is
    assert shoal_digest(reg2.host, repo, "2") == m.digest
    s2 = fresh_store(tmp_path)
    shoal(s2, "copy", f"docker://{reg2.host}/{repo}:2", "c:1")
    assert Store.open(s2).resolve("c:1").root == m.root


def test_pull_through_a_registry_without_range_support(registry: Registry,
                                                        proxy_factory: Callable[..., RegistryProxy],
                                                        built: Path, tmp_path: Path) -> None:
    repo = repo_name("norange")
    do_copy("a:1", f"docker://{registry.host}/{repo}:a", built)
    do_copy("c:1", f"docker://{registry.host}/{repo}:c", built)
    s2, s3 = fresh_store(tmp_path), fresh_store(tmp_path)
    for s in (s2, s3):
        do_copy(f"docker://{registry.host}/{repo}:a", "a:1", s)
    ranged = do_copy(f"docker://{registry.host}/{repo}:c", "c:1", s3)
    proxy = proxy_factory(registry.url, ignore_range=True)
    r = do_copy(f"docker://{proxy.host}/{repo}:c", "c:1", s2)  # 200 to a Range: the whole pack, sliced
    assert 0 < r.chunks_fetched == ranged.chunks_fetched and r.bytes_fetched > ranged.bytes_fetched
    assert Store.open(s2).resolve("c:1").root == Store.open(built).resolve("c:1").root
    assert fsck(Store.open(s2)).ok
    helpers.assert_same_tree(unpack_snapshot(built, "c:1", tmp_path / "want"),
                             unpack_snapshot(s2, "c:1", tmp_path / "got"))


# ------------------------------------------------------------------------------------------ auth


def test_basic_auth_login_push_pull_logout(basic_registry: Registry, built: Path, tmp_path: Path,
                                           _isolated_auth: Path) -> None:
    reg = basic_registry
    repo = repo_name("basic")
    # no credentials: one clear error
    p = shoal(built, "push", "a:1", f"docker://{reg.host}/{repo}:1", check=False)
    helpers.assert_one_line_error(p, "authentication", "credentials")
    # wrong password: one clear error, nothing saved, the password never shown
    p = shoal(None, "login", reg.host, "-u", reg.username, "--password-stdin", check=False,
              input=b"wrong-Pa55word\n")
    msg = helpers.assert_one_line_error(p, "refused", "denied", "authentication")
    assert "wrong-Pa55word" not in msg and not _isolated_auth.exists()
    p = shoal(built, "push", "a:1", f"docker://{reg.host}/{repo}:1", "--creds", f"{reg.username}:wrong-Pa55word",
              check=False)
    assert "wrong-Pa55word" not in helpers.assert_one_line_error(p, "refused", "denied", "authentication")
    # login writes the docker/podman auth file; push and pull then use it
    shoal(None, "login", reg.host, "-u", reg.username, "--password-stdin", input=reg.password.encode() + b"\n")
    doc = json.loads(_isolated_auth.read_text())
    assert base64.b64decode(doc["auths"][reg.host]["auth"]).decode() == f"{reg.username}:{reg.password}"
    assert (_isolated_auth.stat().st_mode & 0o777) == 0o600
    p = shoal(built, "-vv", "push", "a:1", f"docker://{reg.host}/{repo}:1")
    assert reg.password not in (p.stdout + p.stderr).decode()
    s2 = fresh_store(tmp_path)
    p = shoal(s2, "-vv", "pull", f"docker://{reg.host}/{repo}:1", "a:1")
    assert reg.password not in (p.stdout + p.stderr).decode()
    assert Store.open(s2).resolve("a:1").root == Store.open(built).resolve("a:1").root
    shoal(None, "logout", reg.host)
    assert reg.host not in json.loads(_isolated_auth.read_text())["auths"]
    p = shoal(None, "logout", reg.host, check=False)
    helpers.assert_one_line_error(p, "not logged in")
    p = shoal(fresh_store(tmp_path), "pull", f"docker://{reg.host}/{repo}:1", "a:1", check=False)
    helpers.assert_one_line_error(p, "authentication", "credentials")


def test_token_auth_push_pull_mount_and_delete(token_registry: Registry, built: Path, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    repo, other = repo_name("tok"), repo_name("tok")
    creds = f"{reg.username}:{reg.password}"
    m = Store.open(built).resolve("a:1")
    do_copy("a:1", f"docker://{reg.host}/{repo}:1", built, credentials=creds)
    r = do_copy(f"docker://{reg.host}/{repo}:1", f"docker://{reg.host}/{other}:1", credentials=creds)
    # mounted: pull on the source, same token
    assert r.blobs_sent == 0 and r.blobs_skipped == 2 + len(m.packs) + VIEW_BLOBS
    s2 = fresh_store(tmp_path)
    p = shoal(s2, "pull", f"docker://{reg.host}/{other}:1", "a:1", "--creds", creds)
    assert reg.password not in (p.stdout + p.stderr).decode()
    assert Store.open(s2).resolve("a:1").root == m.root
    scopes = {s for e in reg.token_server.log if e.get("ok") for s in e.get("scopes", [])}
    assert f"repository:{repo}:pull" in scopes and any(s.startswith(f"repository:{other}:") for s in scopes)
    p = shoal(None, "delete", f"docker://{reg.host}/{other}:1", "--creds", f"{reg.username}:bad-Secret9", check=False)
    assert "bad-Secret9" not in helpers.assert_one_line_error(p, "denied", "refused", "authentication", "401")
    shoal(None, "delete", f"docker://{reg.host}/{other}:1", "--creds", creds)
    p = shoal(None, "login", reg.host, "-u", reg.username, "--password-stdin", check=False, input=b"bad-Secret9\n")
    assert "bad-Secret9" not in helpers.assert_one_line_error(p, "denied", "refused", "authentication", "401")
    shoal(None, "login", reg.host, "-u", reg.username, "--password-stdin", input=reg.password.encode())
    shoal(fresh_store(tmp_path), "pull", f"docker://{reg.host}/{repo}:1", "a:1")  # with the saved credentials
    with pytest.raises(NotFound):
        do_copy(f"docker://{reg.host}/{other}:1", "z:1", fresh_store(tmp_path), credentials=creds)


def test_redirected_blob_reads_carry_no_credentials(basic_registry: Registry,
                                                    proxy_factory: Callable[..., RegistryProxy],
                                                    built: Path, tmp_path: Path) -> None:
    reg = basic_registry
    creds = f"{reg.username}:{reg.password}"
    basic = "Basic " + base64.b64encode(creds.encode()).decode()
    repo = repo_name("redir")
    do_copy("a:1", f"docker://{reg.host}/{repo}:a", built, credentials=creds)
    do_copy("c:1", f"docker://{reg.host}/{repo}:c", built, credentials=creds)
    proxy = proxy_factory(reg.url, redirect_blobs=True, blobstore_auth=basic)
    s2 = fresh_store(tmp_path)
    do_copy(f"docker://{proxy.host}/{repo}:a", "a:1", s2, credentials=creds)  # whole packs, redirected
    do_copy(f"docker://{proxy.host}/{repo}:c", "c:1", s2, credentials=creds)  # range reads, redirected
    assert proxy.redirect_log, "no blob read was redirected"
    assert any("range" in h for h in proxy.redirect_log)
    assert all("authorization" not in h for h in proxy.redirect_log)
    assert Store.open(s2).resolve("c:1").root == Store.open(built).resolve("c:1").root
    assert fsck(Store.open(s2)).ok


# ------------------------------------------------------------------------------------------ TLS


@pytest.fixture()
def tls_registry(registry_factory: Callable[..., Registry]) -> Iterator[Registry]:
    yield registry_factory(tls=True)


def test_tls_verified_by_default(tls_registry: Registry, built: Path, tmp_path: Path) -> None:
    reg = tls_registry
    dst = f"docker://{reg.host}/{repo_name('tls')}:1"
    p = shoal(built, "push", "a:1", dst, "--plain-http=false", "--retries", "0", check=False)
    helpers.assert_one_line_error(p, "tls", "certificate")
    shoal(built, "push", "a:1", dst, "--plain-http=false", "--ca-bundle", str(reg.ca_bundle))
    certs = tmp_path / "certs"
    certs.mkdir()
    assert reg.ca_bundle is not None
    shutil.copy(reg.ca_bundle, certs / "ca.crt")
    s2 = fresh_store(tmp_path)
    shoal(s2, "pull", dst, "a:1", "--plain-http=false", "--cert-dir", str(certs))
    shoal(fresh_store(tmp_path), "pull", dst, "a:1", "--plain-http=false", "--tls-verify=false")
    assert Store.open(s2).resolve("a:1").root == Store.open(built).resolve("a:1").root


# ------------------------------------------------------------------------------------------ uploads, referrers


def test_small_blobs_go_monolithic_and_large_ones_in_patches(registry: Registry,
                                                             proxy_factory: Callable[..., RegistryProxy],
                                                             built: Path) -> None:
    proxy = proxy_factory(registry.url)
    m = Store.open(built).resolve("a:1")
    chunk = 256 * 1024
    do_copy("a:1", f"docker://{proxy.host}/{repo_name('patch')}:1", built, chunk_size=chunk)
    big = [d for d in [m.config, m.index, *m.packs] if d.size > chunk]
    patches = [p for meth, p, _ in proxy.log if meth == "PATCH"]
    assert big and len(patches) == sum(-(-d.size // chunk) for d in big)
    puts = [p for meth, p, _ in proxy.log if meth == "PUT" and "/blobs/uploads/" in p]
    assert len(puts) == 2 + len(m.packs) + VIEW_BLOBS  # one closing PUT per blob, with or without PATCHes


def test_referrers_follow_the_tag_schema_where_there_is_no_api(registry: Registry,
                                                               registry_factory: Callable[..., Registry],
                                                               built: Path) -> None:
    import hashlib

    m = Store.open(built).resolve("a:1")
    repo = repo_name("refs")
    do_copy("a:1", f"docker://{registry.host}/{repo}:1", built)
    empty, layer = b"{}", b'{"prefetch":["/usr/bin/python3"]}'
    sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()  # noqa: E731
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "artifactType": "application/vnd.shoal.profile.v1+json",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
           "layers": [{"mediaType": "application/vnd.shoal.profile.v1+json", "digest": sha(layer),
                       "size": len(layer)}],
           "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.digest,
                       "size": len(m.raw)}}
    raw = json.dumps(doc).encode()
    with RegistryClient(registry.host, lookup_credentials=False) as c:
        c.put_blob(repo, sha(empty), empty, 2)
        c.put_blob(repo, sha(layer), layer, len(layer))
        c.put_manifest(repo, "profile", raw, "application/vnd.oci.image.manifest.v1+json")
    reg2 = registry_factory()
    do_copy(f"docker://{registry.host}/{repo}:1", f"docker://{reg2.host}/{repo}:1")
    do_copy(f"docker://{registry.host}/{repo}:profile", f"docker://{reg2.host}/{repo}:profile")
    with RegistryClient(reg2.host, lookup_credentials=False) as c:
        refs = c.referrers(repo, m.digest)
        assert [(r["digest"], r.get("artifactType")) for r in refs] == [
            (sha(raw), "application/vnd.shoal.profile.v1+json")]
        assert c.head_manifest(repo, "sha256-" + m.digest.split(":")[1]) is not None
