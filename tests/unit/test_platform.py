"""The one platform rule (shoal.format.platform): normalization as containerd's, ranking, choose."""

from __future__ import annotations

from typing import Any

import pytest

import shoal.format.platform as fp
from shoal.errors import NotFound, UsageError
from shoal.format.platform import Platform, choose, select


@pytest.mark.parametrize(("text", "norm"), [
    ("linux/x86_64", "linux/amd64"), ("linux/x86-64", "linux/amd64"), ("Linux/AMD64/v1", "linux/amd64"),
    ("linux/aarch64", "linux/arm64"), ("linux/arm64/v8", "linux/arm64"), ("linux/arm64/8", "linux/arm64"),
    ("linux/arm64/v9.0", "linux/arm64/v9"), ("linux/arm", "linux/arm/v7"), ("linux/arm/7", "linux/arm/v7"),
    ("linux/arm/6", "linux/arm/v6"), ("linux/armhf", "linux/arm/v7"), ("linux/armel", "linux/arm/v6"),
    ("linux/i386", "linux/386"), ("linux/amd64/v3", "linux/amd64/v3"), ("linux/s390x", "linux/s390x"),
])
def test_normalized_like_containerd(text: str, norm: str) -> None:
    assert str(Platform.parse(text)) == norm
    assert Platform.parse(text) == Platform.parse(norm)


@pytest.mark.parametrize("bad", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_bad_syntax(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid platform"):
        Platform.parse(bad)


@pytest.mark.parametrize(("machine", "host"), [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7"), ("armv6l", "linux/arm/v6"),
    ("i686", "linux/386"), ("s390x", "linux/s390x"), ("ppc64le", "linux/ppc64le"),
])
def test_host(monkeypatch: pytest.MonkeyPatch, machine: str, host: str) -> None:
    monkeypatch.setattr(fp._host, "machine", lambda: machine)
    assert str(Platform.host()) == host


def _index(*plats: str, shoal: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for i, p in enumerate(plats):
        parts = p.split("/")
        doc = {"os": parts[0], "architecture": parts[1], **({"variant": parts[2]} if len(parts) > 2 else {})}
        e: dict[str, Any] = {"digest": f"sha256:{i:064x}", "platform": doc}
        if i in shoal:
            e["artifactType"] = "shoal"
        out.append(e)
    return out


def test_choose_prefers_exact_then_older_variants_never_foreign() -> None:
    idx = _index("linux/arm/v5", "linux/arm/v6", "linux/arm64/v8", "linux/amd64")
    assert choose(idx, "linux/arm/v7", "x")["digest"] == idx[1]["digest"]  # v6 beats v5, none is v7
    assert choose(idx, "linux/arm/v6", "x") is idx[1]
    assert choose(idx, "linux/aarch64", "x") is idx[2]  # arm64 is arm64/v8
    assert choose(idx, None, "x") is choose(idx, Platform.host(), "x")
    assert [e["digest"] for e in select(idx, "linux/arm/v7")] == [idx[1]["digest"], idx[0]["digest"]]
    assert select(idx, None) == idx
    v3 = _index("linux/amd64/v3", "linux/amd64/v2")
    assert choose(v3, "linux/amd64/v3", "x") is v3[0]
    assert choose(v3, "linux/amd64/v4", "x") is v3[0]
    with pytest.raises(NotFound):
        choose(v3, "linux/amd64", "x")  # a plain amd64 (v1) machine cannot run v2 or v3 code
    with pytest.raises(NotFound):
        choose(_index("linux/386"), "linux/amd64", "x")  # no cross-architecture fallback


def test_choose_error_lists_the_index() -> None:
    idx = _index("linux/arm64/v8", "linux/s390x", "unknown/unknown", "linux/s390x") + [{"digest": "sha256:" + "f" * 64}]
    with pytest.raises(NotFound) as e:
        choose(idx, "linux/amd64", "docker://r/app:1")
    assert str(e.value) == ("docker://r/app:1 has no image for linux/amd64 (it has linux/arm64, linux/s390x); "
                            "choose one with --platform")
    assert e.value.exit_code == 3


def test_choose_prefer_breaks_ties_only() -> None:
    idx = _index("linux/amd64", "linux/amd64", "linux/arm64", shoal=(1, 2))
    shoal = lambda e: e.get("artifactType") == "shoal"  # noqa: E731
    assert choose(idx, "linux/amd64", "x", prefer=shoal) is idx[1]
    assert choose(idx, "linux/amd64", "x") is idx[0]
    older = _index("linux/arm/v6", "linux/arm/v7", shoal=(0,))
    assert choose(older, "linux/arm/v7", "x", prefer=shoal) is older[1]  # the better platform wins first
