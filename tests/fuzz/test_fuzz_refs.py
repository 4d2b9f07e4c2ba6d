"""Fuzz reference parsing: every transport's parser (docker://, oci:, oci-archive:, docker-archive:, dir:,
bare NAME[:TAG]) through ``parse_reference``, and ``store.normalize_ref``.

Oracle: only ShoalError subclasses escape; a reference that parses prints as text that parses back to
an equal reference (the contract in transports/base.py); ``normalize_ref`` is idempotent and its result
is a plain ``name:tag``.
"""

from __future__ import annotations

import re

from fuzzkit import budget, only_shoal_errors
from hypothesis import example, given
from hypothesis import strategies as st

from shoal.store import normalize_ref
from shoal.transports.base import parse_reference
from shoal.transports.docker import DockerReference
from shoal.transports.local import LocalReference

_PREFIXES = ["docker://", "docker:", "oci:", "oci-archive:", "docker-archive:", "dir:", "", "unknown:", ":"]
_ATOMS = ["a", "b0", "library", "localhost", "example.com", "Example.COM", "127.0.0.1:5000", "[::1]:5000",
          "docker.io", "index.docker.io", "registry-1.docker.io", "x-y", "x__y", "x.y", "A", "é", "٣",
          "sha256:" + "a" * 64, "sha512:" + "b" * 128, "latest", "v1.0", "_t", "-t", ".", "..", "@", "@0", "@12",
          "@-1", "/", ":", "//", "\n", " ", "\0", "%", "😀"]
_text = st.lists(st.sampled_from(_ATOMS + ["/", ":", "@", "/", ":"]), max_size=8).map("".join)
references = st.one_of(
    st.builds(lambda p, t: p + t, st.sampled_from(_PREFIXES), _text),
    st.builds(lambda p, t: p + t, st.sampled_from(_PREFIXES), st.text(max_size=30)),
    st.text(max_size=40),
)

# a plain name:tag as the local store spells it
_NAME_TAG = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r":[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@budget(120)
@given(references)
@example("oci:x:@" + "1" * 5000)
@example("oci-archive:x:@" + "9" * 5000)
@example("docker-archive:x:@" + "1" * 5000)
@example("docker://a:é")  # Unicode \w would accept it; tags are ASCII
@example("docker://a:٣")
@example("docker://[::1]:5000/a/b:c")
@example("a:latest\n")
def test_parse_reference_round_trips(text: str) -> None:
    ref = only_shoal_errors(parse_reference, text)
    if ref is None:
        return
    shown = str(ref)
    again = parse_reference(shown)
    assert again == ref, f"{text!r} -> {shown!r} -> {again!r}"
    assert str(again) == shown
    if isinstance(ref, (DockerReference, LocalReference)):  # names and tags: printable ASCII (paths may be anything)
        assert shown.isascii() and shown.isprintable(), shown


@budget(100)
@given(st.one_of(_text, st.text(max_size=30)))
@example("foo\n")
@example("foo:latest\n")
@example("foo:٣")
def test_normalize_ref(text: str) -> None:
    norm = only_shoal_errors(normalize_ref, text)
    if norm is None:
        return
    assert _NAME_TAG.fullmatch(norm), f"{text!r} -> {norm!r}"
    assert normalize_ref(norm) == norm
