"""containerd's filter syntax, as far as snapshot List uses it (containerd ``filters`` package).

A filter is selectors joined by ``,`` (all must match); several filters in one request match if any
does.  A selector is ``fieldpath``, ``fieldpath==value``, ``fieldpath!=value`` or ``fieldpath~=regexp``;
a field path is ``name``, ``parent``, ``kind`` or ``labels.<key>``, each part bare or quoted
(``labels."containerd.io/snapshot.ref"``); a value is bare or quoted with ``"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shoal.errors import UsageError

__all__ = ["Selector", "parse", "match_any"]


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str  # "" (present), "==", "!=", "~="
    value: str


def _quoted(s: str, i: int) -> tuple[str, int]:
    q = s[i]
    out: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == q:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise UsageError(f"invalid filter {s!r}: unterminated quote")


def _bare(s: str, i: int, stops: str) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] not in stops:
        j += 1
    return s[i:j].strip(), j


def parse(text: str) -> list[Selector]:
    sels: list[Selector] = []
    i = 0
    s = text.strip()
    while i < len(s):
        path: list[str] = []
        while True:  # field path
            while i < len(s) and s[i] == " ":
                i += 1
            if i < len(s) and s[i] in "\"/":
                part, i = _quoted(s, i)
            else:
                part, i = _bare(s, i, ".,=!~")
            if not part:
                raise UsageError(f"invalid filter {text!r}: empty field")
            path.append(part)
            if i < len(s) and s[i] == ".":
                i += 1
                continue
            break
        op, value = "", ""
        if s[i:i + 2] in ("==", "!=", "~="):
            op = s[i:i + 2]
            i += 2
            while i < len(s) and s[i] == " ":
                i += 1
            if i < len(s) and s[i] == '"':
                value, i = _quoted(s, i)
            else:
                value, i = _bare(s, i, ",")
        while i < len(s) and s[i] == " ":
            i += 1
        if i < len(s):
            if s[i] != ",":
                raise UsageError(f"invalid filter {text!r} at {i}")
            i += 1
        sels.append(Selector(tuple(path), op, value))
    return sels


def _matches(sel: Selector, field: Callable[[tuple[str, ...]], str | None]) -> bool:
    v = field(sel.path)
    if sel.op == "":
        return v is not None
    if sel.op == "==":
        return v == sel.value
    if sel.op == "!=":
        return v != sel.value
    return v is not None and re.search(sel.value, v) is not None


def match_any(filters: list[list[Selector]], fields: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a snapshot with these top-level ``fields`` and ``labels`` passes (no filter: yes)."""
    if not filters:
        return True

    def field(path: tuple[str, ...]) -> str | None:
        if path[0] == "labels":
            return labels.get(".".join(path[1:])) if len(path) > 1 else None
        return fields.get(path[0]) if len(path) == 1 else None

    return any(all(_matches(sel, field) for sel in f) for f in filters)
