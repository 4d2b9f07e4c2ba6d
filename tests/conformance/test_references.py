"""One reference grammar: every reference form of every transport parses once through
``parse_reference`` and round-trips (``str(parse(s))`` is ``s`` or its canonical form, which parses
back to an equal reference); the bad forms are refused with UsageError (exit 2), the same tag grammar
(Go's ASCII ``[\\w][\\w.-]{0,127}``) in every transport that has docker-style tags."""

from __future__ import annotations

import pytest

from shoal.errors import UsageError
from shoal.transports.base import TRANSPORTS, parse_reference

D = "sha256:" + "ab" * 32
LONG_TAG = "t" * 128

# (text, canonical str()) -- one row per reference form
GOOD = [
    # the store
    ("debian", "debian:latest"),
    ("debian:12", "debian:12"),
    ("team/app:v1.2-rc_3", "team/app:v1.2-rc_3"),
    (f"x:{LONG_TAG}", f"x:{LONG_TAG}"),
    ("oci-x:1", "oci-x:1"),  # starts with a transport name, is not one
    # docker://
    ("docker://busybox", "docker://busybox:latest"),
    ("docker://library/busybox:1", "docker://busybox:1"),
    ("docker://docker.io/team/app:2", "docker://team/app:2"),
    ("docker://index.docker.io/library/x:y", "docker://x:y"),
    ("docker://localhost:5000/a/b:c", "docker://localhost:5000/a/b:c"),
    ("docker://127.0.0.1:5000/a/b@" + D, "docker://127.0.0.1:5000/a/b@" + D),
    ("docker://[::1]:5000/a:t", "docker://[::1]:5000/a:t"),
    (f"docker://h.io/a:{LONG_TAG}", f"docker://h.io/a:{LONG_TAG}"),
    # oci: and oci-archive:
    ("oci:/l", "oci:/l"),
    ("oci:/l:v1", "oci:/l:v1"),
    ("oci:/l:@0", "oci:/l:@0"),
    ("oci:rel/dir:a/b.c-d+e", "oci:rel/dir:a/b.c-d+e"),
    ("oci-archive:/a.tar", "oci-archive:/a.tar"),
    ("oci-archive:/a.tar:name:with:colons", "oci-archive:/a.tar:name:with:colons"),
    ("oci-archive:/a.tar:@3", "oci-archive:/a.tar:@3"),
    # docker-archive:
    ("docker-archive:/d.tar", "docker-archive:/d.tar"),
    ("docker-archive:/d.tar:app:1", "docker-archive:/d.tar:app:1"),
    ("docker-archive:/d.tar:h.io/a/b:t", "docker-archive:/d.tar:h.io/a/b:t"),
    ("docker-archive:/d.tar:@1", "docker-archive:/d.tar:@1"),
    # dir:
    ("dir:/some/dir", "dir:/some/dir"),
    ("dir:relative:with:colons", "dir:relative:with:colons"),
]

BAD = [
    # the same tag grammar everywhere: non-ASCII, too long, bad first character
    "docker://x:t\u00e9g", "docker-archive:/d.tar:x:t\u00e9g", "x:t\u00e9g", "oci:/l:t\u00e9g",
    "oci-archive:/a.tar:t\u00e9g",
    f"docker://x:{LONG_TAG}t", f"docker-archive:/d.tar:x:{LONG_TAG}t", f"x:{LONG_TAG}t",
    "docker://x:-t", "docker-archive:/d.tar:x:.t", "x:-t",
    # transport-specific refusals
    "docker:busybox", "docker://", "docker://UPPER", "docker://x:1@" + D, "docker://x@sha256:12",
    "docker-archive:", "docker-archive:/d.tar:x@" + D, "docker-archive:/d.tar:@-1",
    "oci:", "oci:/l:@x", "oci-archive:", "dir:",
    "Bad:Ref", "", "x:", "nosuch://x/y:z",
]


def test_every_transport_has_a_row() -> None:
    names = {parse_reference(text).transport.name for text, _ in GOOD}
    assert names == set(TRANSPORTS), set(TRANSPORTS) - names


@pytest.mark.parametrize("text,canonical", GOOD, ids=[t for t, _ in GOOD])
def test_parse_and_round_trip(text: str, canonical: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    again = parse_reference(str(ref))
    assert again == ref and str(again) == canonical


@pytest.mark.parametrize("text", BAD)
def test_bad_forms_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_reference(text)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)
