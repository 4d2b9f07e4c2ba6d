"""Cross-repository mounts from the blob-info cache, against a real docker-registry (distribution 2.8) and
its access log: a push of a store image to a second repository of the same registry mounts every blob
(POST ?mount=&from= answered 201, no blob body sent); so does a push after a pull; a candidate the
registry refuses (202: it lacks the blob there) is dropped, forgotten, and the blob uploaded; a cache
that cannot be used costs one warning line, never the push."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import run_shoal  # noqa: E402
from regfix import Registry, registry_factory  # noqa: E402,F401

FILENAME = "blob-info-cache-v1.sqlite"
_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding ``app:1``: a Shoal image with two files of random bytes (several blobs)."""
    from shoal.build import BuildOptions, build
    from shoal.store import Store

    base = tmp_path_factory.mktemp("bic")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello\n")
    (tree / "a.bin").write_bytes(os.urandom(3 << 20))
    (tree / "b.bin").write_bytes(os.urandom(2 << 20))
    build(Store.open(base / "store"), tree, "app:1", BuildOptions(workers=1))
    return base / "store"


def _log(reg: Registry, start: int = 0) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request in the access log from line ``start``."""
    text = reg.log_path.read_text(errors="replace") if reg.log_path.exists() else ""
    return [(m[1], m[2], int(m[3])) for m in _LINE.finditer(text)][start:]


def _push(store: Path, ref: str, cache: str | Path | None = None) -> tuple[dict[str, object], str]:
    """``shoal push --json app:1 REF`` (with the blob-info cache in ``cache`` if given): its report and stderr."""
    with pytest.MonkeyPatch.context() as mp:
        if cache is not None:
            mp.setenv("SHOAL_BLOB_INFO_CACHE_DIR", str(cache))
        p = run_shoal(store, "push", "--json", "app:1", ref)
    return json.loads(p.stdout), p.stderr.decode()


def _blob_bodies(reqs: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [r for r in reqs if r[0] in ("PUT", "PATCH") and "/blobs/uploads/" in r[1]]


def test_second_push_mounts_every_blob(registry_factory: Callable[..., Registry], image: Path) -> None:
    reg = registry_factory(access_log=True)
    first, _ = _push(image, f"docker://{reg.host}/team/a:1")
    n = len(_log(reg))
    assert first["blobs_sent"] and _blob_bodies(_log(reg))
    second, _ = _push(image, f"docker://{reg.host}/team/b:1")
    reqs = _log(reg, n)
    mounts = [r for r in reqs if r[0] == "POST" and "mount=" in r[1]]
    assert mounts and all("from=team%2Fa" in r[1] and r[2] == 201 for r in mounts), mounts
    assert _blob_bodies(reqs) == [], reqs
    assert second["blobs_sent"] == 0
    assert second["blobs_skipped"] == first["blobs_sent"] + first["blobs_skipped"]
    manifests = [r for r in reqs if r[0] == "PUT" and "/manifests/" in r[1]]
    assert manifests
    # only manifests went up: a few KB where the first push sent the packs
    assert int(str(second["bytes_sent"])) < 64 << 10 < int(str(first["bytes_sent"])), (first, second)
    print(f"\nfirst push {first['bytes_sent']} bytes, {first['blobs_sent']} blobs; second push "
          f"{second['bytes_sent']} bytes, {len(mounts)} mounts, {second['blobs_sent']} blobs sent")


def test_push_after_pull_mounts_from_the_pulled_repository(registry_factory: Callable[..., Registry],
                                                           image: Path, tmp_path: Path) -> None:
    reg = registry_factory(access_log=True)
    # another cache for the first push: the pull alone must teach this one where the blobs are
    _push(image, f"docker://{reg.host}/team/a:1", tmp_path / "other-cache")
    run_shoal(tmp_path / "s", "pull", f"docker://{reg.host}/team/a:1", "app:1")
    n = len(_log(reg))
    out, _ = _push(tmp_path / "s", f"docker://{reg.host}/team/c:1")
    reqs = _log(reg, n)
    mounts = [r for r in reqs if r[0] == "POST" and "mount=" in r[1]]
    assert mounts and all(r[2] == 201 for r in mounts), mounts
    # every blob of the Shoal image is mounted; the pull never read the runtime view's two small blobs
    # (its config and stub, made by the push from the config), so those go up again: a few KiB
    assert len(_blob_bodies(reqs)) <= 2, reqs
    assert int(str(out["blobs_sent"])) <= 2
    assert int(str(out["bytes_sent"])) < 64 << 10, out


def test_refused_candidate_falls_back_to_upload_and_is_forgotten(registry_factory: Callable[..., Registry],
                                                                  image: Path, tmp_path: Path) -> None:
    reg = registry_factory(access_log=True)
    first, _ = _push(image, f"docker://{reg.host}/team/a:1")
    db = Path(os.environ["SHOAL_BLOB_INFO_CACHE_DIR"]) / FILENAME
    with sqlite3.connect(db) as c:  # every record now points at a repository that lacks the blob
        c.execute("UPDATE KnownLocations SET location = 'team/ghost'")
    n = len(_log(reg))
    out, _ = _push(image, f"docker://{reg.host}/team/d:1")
    reqs = _log(reg, n)
    refused = [r for r in reqs if r[0] == "POST" and "from=team%2Fghost" in r[1]]
    assert refused and all(r[2] == 202 for r in refused), refused
    # each upload session the registry opened instead of mounting is cancelled
    assert len([r for r in reqs if r[0] == "DELETE" and "/blobs/uploads/" in r[1]]) == len(refused)
    assert out["blobs_sent"] == first["blobs_sent"]
    assert len(_blob_bodies(reqs)) >= len(refused)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM KnownLocations WHERE location = 'team/ghost'").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM KnownLocations WHERE location = 'team/d'").fetchone()[0] > 0
    run_shoal(tmp_path / "s", "pull", f"docker://{reg.host}/team/d:1", "x:1")


def test_unusable_cache_does_not_fail_a_push(registry_factory: Callable[..., Registry], image: Path,
                                             tmp_path: Path) -> None:
    reg = registry_factory()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    for repo in ("a", "b"):
        out, err = _push(image, f"docker://{reg.host}/team/{repo}:1", blocker / "cache")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "blob-info cache" in lines[0] and "WARNING" in lines[0], err
        assert out["blobs_sent"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / FILENAME).write_bytes(b"garbage" * 1000)
    out, err = _push(image, f"docker://{reg.host}/team/c:1", corrupt)
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
