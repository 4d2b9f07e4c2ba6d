"""Opening a ``docker://`` image for a mount (mount/remote.py, docs/spec/mount.md §5.1): the start-up
profile's lookup goes out as soon as the Shoal manifest's digest is known, while the manifest itself is
still on its way, and no request is made twice.  A real registry behind a proxy that holds the
manifest's answer back and notes when each request arrived and was answered."""

# ruff: noqa: F811  (pytest fixtures imported from regfix are redefined as parameters)
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mountkit import shoal  # noqa: E402

from regfix import Registry, proxy_factory, registry, registry_factory  # noqa: E402,F401

HOLD = 0.8  # seconds the manifest's answer is held back


@pytest.fixture(scope="module")
def pushed(sample: dict[str, object], registry: Registry) -> tuple[Any, Any]:
    """sample:1 in the registry as lazy/open:1 (an image index over the Shoal manifest), with a profile
    of three frames pushed as its referrer."""
    from shoal.mount.profile import Profile, push_remote
    from shoal.store import Store

    st = Store.open(Path(str(sample["store"])))
    m = st.resolve("sample:1")
    idx = st.load_index(m)
    ref = f"docker://{registry.host}/lazy/open:1"
    shoal(Path(str(sample["store"])), "push", "sample:1", ref)
    push_remote(ref, {}, Profile.of_frames(m.digest, idx, [len(idx.frames) - 1, 0], 0.1, ("true",)))
    return m, idx


@pytest.mark.parametrize("by", ["digest", "tag"])
def test_the_profile_lookup_overlaps_the_manifest(pushed: tuple[Any, Any], registry: Registry,
                                                  proxy_factory: Any, tmp_path: Path, by: str) -> None:
    from shoal.mount.image import OpenOptions, open_image

    m, idx = pushed
    proxy = proxy_factory(registry.url, delay=(f"/manifests/{m.digest}", HOLD))
    # by digest as the containerd snapshotter names it (the Shoal manifest's), or by tag: the image
    # index first, then its Shoal child, whose digest starts the lookup
    ref = f"docker://{proxy.host}/lazy/open" + (f"@{m.digest}" if by == "digest" else ":1")
    img = open_image(ref, tmp_path / "cold", OpenOptions(prefetch="auto"))
    try:
        assert img.digest == m.digest and len(img.prefetch) == 2  # the registry's profile is used
        img.source.prefetch(list(img.prefetch))  # the frames fetched early, verified
    finally:
        img.source.close()
    timing = list(proxy.timing)
    manifest = [t for t in timing if t[1].endswith(f"/manifests/{m.digest}")]
    tag = f"/manifests/sha256-{m.digest[7:]}"
    lookups = [t for t in timing if f"/referrers/{m.digest}" in t[1] or t[1].endswith(tag)]
    assert len(manifest) == 1 and len(lookups) == 2, timing
    # both lookups (referrers API and tag schema) arrived while the manifest's answer was held back
    assert all(t[2] < manifest[0][3] - HOLD / 2 for t in lookups), timing
    # every request once: metadata by path, pack ranges by path and range
    ranged = {p for p, _ in proxy.ranges}
    once = Counter(p for _, p, _, _ in timing if p not in ranged)
    assert max(once.values()) == 1 and max(Counter(proxy.ranges).values()) == 1, timing
    assert len(proxy.ranges) == 2  # the profile's two frames, nothing else


def test_a_local_profile_needs_no_lookup(pushed: tuple[Any, Any], registry: Registry, proxy_factory: Any,
                                         tmp_path: Path) -> None:
    """The profile saved beside the image by the first open is used by the next: no referrer request."""
    from shoal.mount.image import OpenOptions, open_image

    m, _ = pushed
    proxy = proxy_factory(registry.url)
    ref = f"docker://{proxy.host}/lazy/open@{m.digest}"
    for _ in range(2):
        img = open_image(ref, tmp_path / "store", OpenOptions(prefetch="auto"))
        img.source.prefetch(list(img.prefetch))
        img.source.close()
    lookups = [p for _, p, _, _ in proxy.timing if "/referrers/" in p or "/manifests/sha256-" in p]
    assert len(lookups) == 2  # the first open's two, none by the second


@pytest.mark.parametrize("hint", ["index", "other", "missing", "wrong size"])
def test_the_index_hint_is_requested_beside_the_manifest(pushed: tuple[Any, Any], registry: Registry,
                                                         proxy_factory: Any, tmp_path: Path, hint: str) -> None:
    """``index_hint`` (the snapshotter's label): the index blob is requested while the manifest's answer is
    still held back; a hint that is not the manifest's index (another blob, one the registry lacks, the
    right digest with another size) changes nothing but one wasted request: the manifest's index is
    the one decoded, and the open succeeds."""
    from shoal.mount.image import OpenOptions, open_image

    m, idx = pushed
    proxy = proxy_factory(registry.url, delay=(f"/manifests/{m.digest}", HOLD))
    given = {"index": (m.index.digest, m.index.size), "other": (m.config.digest, m.config.size),
             "missing": ("sha256:" + "0" * 64, 1000), "wrong size": (m.index.digest, m.index.size + 1)}[hint]
    img = open_image(f"docker://{proxy.host}/lazy/open@{m.digest}", tmp_path / "s",
                     OpenOptions(prefetch="none", profile=False, index_hint=given))
    try:
        assert img.digest == m.digest and img.index.root == idx.root and len(img.index.frames) == len(idx.frames)
    finally:
        img.source.close()
    timing = list(proxy.timing)
    (manifest,) = [t for t in timing if t[1].endswith(f"/manifests/{m.digest}")]
    index = [t for t in timing if t[1].endswith(f"/blobs/{m.index.digest}")]
    if hint == "index":
        assert len(index) == 1 and index[0][2] < manifest[3] - HOLD / 2, timing  # asked before the answer
    else:
        assert index and index[-1][2] >= manifest[3] - 0.05, timing  # the manifest's own request, after it
    hinted = [t for t in timing if t[1].endswith(f"/blobs/{given[0]}") and t[2] < manifest[3] - HOLD / 2]
    assert len(hinted) == 1, timing  # the hint was requested at once in every case


def test_a_tag_names_the_index_beside_its_shoal_manifest(pushed: tuple[Any, Any], registry: Registry,
                                                          proxy_factory: Any, tmp_path: Path) -> None:
    """By tag: the image index's entry for the Shoal manifest names its index blob (oci-mapping.md §4.1),
    so the index is requested while the Shoal manifest's answer is still held back, once."""
    from shoal.mount.image import OpenOptions, open_image

    m, idx = pushed
    proxy = proxy_factory(registry.url, delay=(f"/manifests/{m.digest}", HOLD))
    img = open_image(f"docker://{proxy.host}/lazy/open:1", tmp_path / "s", OpenOptions(prefetch="none", profile=False))
    try:
        assert img.digest == m.digest and img.index.root == idx.root
    finally:
        img.source.close()
    timing = list(proxy.timing)
    (manifest,) = [t for t in timing if t[1].endswith(f"/manifests/{m.digest}")]
    (index,) = [t for t in timing if t[1].endswith(f"/blobs/{m.index.digest}")]
    assert index[2] < manifest[3] - HOLD / 2, timing
