"""Every spec citation in the code (``format.md §4.3``, ``docs/spec/mount.md §5, §6``) names a document
that exists and a section heading it has (``## 4.`` or ``### 4.3``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_CITE = re.compile(r"((?:docs/)?(?:spec/)?[A-Za-z][\w-]*\.md)((?:\s*(?:,|and)?\s*§\s?\d+(?:\.\d+)*)+)")
_SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")


def _doc(name: str) -> Path | None:
    base = name.split("/")[-1]
    for d in (ROOT / "docs" / "spec", ROOT / "docs"):
        if (d / base).is_file():
            return d / base
    return None


def _sections(doc: Path) -> set[str]:
    out: set[str] = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            out.add(m.group(1))
    return out


def citations() -> list[tuple[str, str, str]]:
    """(source file, document, section) for every citation under src/."""
    found = []
    for py in sorted((ROOT / "src").rglob("*.py")):
        text = py.read_text()
        for m in _CITE.finditer(text):
            for sec in _SECTION.findall(m.group(2)):
                found.append((str(py.relative_to(ROOT)), m.group(1), sec))
    return found


def test_citations_are_found() -> None:
    assert len(citations()) > 40  # the scanner sees the code's citations


def test_every_citation_resolves() -> None:
    bad = []
    for src, doc_name, sec in citations():
        doc = _doc(doc_name)
        if doc is None:
            bad.append(f"{src}: {doc_name} does not exist")
        elif sec not in _sections(doc):
            bad.append(f"{src}: {doc_name} has no section {sec}")
    assert not bad, "\n".join(bad)
