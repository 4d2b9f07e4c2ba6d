"""containers-registries.conf(5) v2: parsing, drop-in merging, prefix matching, pull sources, short names."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.errors import UsageError
from shoal.transports.docker import RegistryOptions, parse_docker, pull_endpoints, short_name_candidates
from shoal.transports.registry import sysregistries as sr


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv(sr.ENV, raising=False)
    monkeypatch.setattr(sr, "SYSTEM_DIR", str(tmp_path / "none.d"))
    monkeypatch.setattr(sr, "_alias_cache", lambda home: str(tmp_path / "no-cache.conf"))
    sr._load.cache_clear()
    return h


def conf(tmp_path: Path, text: str, name: str = "registries.conf") -> sr.RegistriesConf:
    p = tmp_path / name
    p.write_text(text)
    return sr.load(str(p))


CONF = """
unqualified-search-registries = ["quay.io", "docker.io"]
[[registry]]
prefix = "example.com/foo"
location = "internal.example.net:5000/bar"
[[registry.mirror]]
location = "mirror-a.local/m"
[[registry.mirror]]
location = "mirror-b.local"
insecure = true
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "mirror-c.local"
pull-from-mirror = "tag-only"

[[registry]]
location = "example.com"
insecure = true

[[registry]]
prefix = "*.wild.org"
blocked = true

[[registry]]
location = "digest.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "dmirror.io"

[aliases]
"app" = "example.com/team/app"
"""


def test_longest_prefix_and_wildcard(home: Path, tmp_path: Path) -> None:
    c = conf(tmp_path, CONF)
    assert c.find("example.com/foo/x").prefix == "example.com/foo"  # type: ignore[union-attr]
    assert c.find("example.com/foobar/x").prefix == "example.com"  # type: ignore[union-attr]
    assert c.find("example.com/foo").prefix == "example.com/foo"  # type: ignore[union-attr]
    assert c.find("example.comx/a") is None
    assert c.find("a.b.wild.org/x").blocked  # type: ignore[union-attr]
    assert c.find("wild.org/x") is None
    assert c.find("x.com/a.wild.org/y") is None  # the wildcard is for the host only


def test_pull_sources_rewrite_and_mirror_filters(home: Path, tmp_path: Path) -> None:
    c = conf(tmp_path, CONF)
    _, tag = c.pull_sources("example.com/foo/img", digested=False)
    assert [(s.name, s.insecure, s.mirror) for s in tag] == [
        ("mirror-a.local/m/img", False, True), ("mirror-c.local/img", False, True),
        ("internal.example.net:5000/bar/img", False, False)]
    _, dig = c.pull_sources("example.com/foo/img", digested=True)
    assert [s.name for s in dig] == ["mirror-a.local/m/img", "mirror-b.local/img", "internal.example.net:5000/bar/img"]
    assert dig[1].insecure
    _, d = c.pull_sources("digest.io/r", digested=False)
    assert [s.name for s in d] == ["digest.io/r"]
    _, d = c.pull_sources("digest.io/r", digested=True)
    assert [s.name for s in d] == ["dmirror.io/r", "digest.io/r"]
    assert c.pull_sources("other.io/r", False) == (None, (sr.PullSource("other.io/r", False, False),))


def test_docker_endpoints(home: Path, tmp_path: Path) -> None:
    p = tmp_path / "r.conf"
    p.write_text(CONF)
    o = RegistryOptions(registries_conf=str(p))
    eps = pull_endpoints(parse_docker("//example.com/foo/img:1"), o)
    assert [(e.ref.host, e.ref.repo, e.ref.tag, e.mirror) for e in eps] == [
        ("mirror-a.local", "m/img", "1", True), ("mirror-c.local", "img", "1", True),
        ("internal.example.net:5000", "bar/img", "1", False)]
    insecure = pull_endpoints(parse_docker("//example.com/x:1"), o)
    assert [e.options.tls_verify for e in insecure] == [False]
    with pytest.raises(UsageError, match="blocked"):
        pull_endpoints(parse_docker("//x.wild.org/y"), o)
    with pytest.raises(UsageError, match="blocked"):
        parse_docker("//x.wild.org/y").new_destination(RegistryOptions(registries_conf=str(p)))


def test_dropins_override_in_name_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sys.d"
    d.mkdir()
    monkeypatch.setattr(sr, "SYSTEM_DIR", str(d))
    (d / "20-b.conf").write_text('short-name-mode = "permissive"\n[aliases]\n"app" = "b.io/app"\n'
                                 '[[registry]]\nlocation = "example.com"\ninsecure = true\n')
    (d / "10-a.conf").write_text('unqualified-search-registries = ["a.io"]\n[aliases]\n"app" = "a.io/app"\n'
                                 '"other" = "a.io/other"\n')
    (d / "ignored.txt").write_text("not toml [")
    c = conf(tmp_path, '[[registry]]\nlocation = "example.com"\n[aliases]\n"x" = "m.io/x"\n')
    assert c.files[1:] == (str(d / "10-a.conf"), str(d / "20-b.conf"))
    assert c.alias("app") == "b.io/app" and c.alias("other") == "a.io/other" and c.alias("x") == "m.io/x"
    assert c.unqualified_search == ("a.io",) and c.short_name_mode == "permissive"
    assert c.find("example.com/r").insecure  # type: ignore[union-attr]


def test_env_and_user_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = home / sr.USER_FILE
    user.parent.mkdir(parents=True)
    user.write_text('unqualified-search-registries = ["user.io"]\n')
    assert sr.load().unqualified_search == ("user.io",)
    env = tmp_path / "env.conf"
    env.write_text('unqualified-search-registries = ["env.io"]\n')
    monkeypatch.setenv(sr.ENV, str(env))
    assert sr.load().unqualified_search == ("env.io",)
    assert sr.load(str(env)).files[0] == str(env)


@pytest.mark.parametrize("text,words", [
    ("[[registry]\n", "not valid TOML"),
    ('[[registry]]\nlocation = "https://x.io"\n', "URI schemes"),
    ('[[registry]]\ninsecure = true\n', "neither location nor prefix"),
    ('[[registry]]\nlocation = "x.io"\npull-from-mirror = "all"\n', "non-mirror"),
    ('[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "some"\n',
     "unsupported pull-from-mirror"),
    ('[[registry]]\nlocation = "x.io"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m"\n'
     'pull-from-mirror = "all"\n', "cannot both be set"),
    ('[[registry]]\nlocation = "x.io"\ninsecure = "yes"\n', "true or false"),
    ('[[registry]]\nlocation = "x.io"\nmirrors = []\n', "unknown"),
    ('[[registry]]\nprefix = "x.io/a"\nlocation = "x.io"\n[[registry]]\nlocation = "x.io"\nblocked = true\n',
     "conflicting"),
    ('short-name-mode = "sometimes"\n', "short-name-mode"),
    ('unqualified-search-registries = ["not a host"]\n', "unqualified-search"),
    ('[aliases]\n"x.io/app" = "y.io/app"\n', "not a short name"),
    ('[aliases]\n"app" = "app2"\n', "fully-qualified"),
    ('[registries.search]\nregistries = ["a.io"]\n[[registry]]\nlocation = "b.io"\n', "mixing"),
])
def test_malformed_is_one_usage_error_naming_the_file(home: Path, tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(UsageError) as ei:
        conf(tmp_path, text, "bad.conf")
    msg = str(ei.value)
    assert "bad.conf" in msg and words in msg and "\n" not in msg


def test_missing_explicit_file(home: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        sr.load(str(tmp_path / "nope.conf"))


def test_v1_converted(home: Path, tmp_path: Path) -> None:
    c = conf(tmp_path, '[registries.search]\nregistries = ["a.io"]\n[registries.insecure]\nregistries = ["i.io"]\n'
                       '[registries.block]\nregistries = ["b.io"]\n')
    assert c.unqualified_search == ("a.io",)
    assert c.find("i.io/x").insecure and c.find("b.io/x").blocked  # type: ignore[union-attr]


def test_short_names(home: Path, tmp_path: Path) -> None:
    p = tmp_path / "r.conf"
    p.write_text(CONF)
    c = sr.load(str(p))
    assert sr.resolve_short_name("app", c) == (("example.com/team/app",), True)
    with pytest.raises(UsageError, match="ambiguous.*quay.io/busybox, docker.io/library/busybox"):
        sr.resolve_short_name("busybox", c)
    p2 = tmp_path / "p.conf"
    p2.write_text('short-name-mode = "permissive"\nunqualified-search-registries = ["quay.io", "docker.io"]\n')
    assert sr.resolve_short_name("busybox", sr.load(str(p2)))[0] == ("quay.io/busybox", "docker.io/library/busybox")
    p3 = tmp_path / "e.conf"
    p3.write_text("")
    with pytest.raises(UsageError, match="no alias and no unqualified-search"):
        sr.resolve_short_name("busybox", sr.load(str(p3)))
    refs = short_name_candidates("app:1.2", str(p))
    assert refs is not None and [(r.host, r.repo, r.tag) for r in refs] == [("example.com", "team/app", "1.2")]
    assert short_name_candidates("example.com/team/app", str(p)) is None
    assert sr.is_short_name("library/busybox") and not sr.is_short_name("localhost/x")


def test_alias_cache_wins(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache.conf"
    cache.write_text('[aliases]\n"app" = "cache.io/app"\n')
    monkeypatch.setattr(sr, "_alias_cache", lambda home: str(cache))
    assert conf(tmp_path, CONF).alias("app") == "cache.io/app"
