"""Traceability from the spec to the code: every MUST clause of spec/PROTOCOL.md is cited as
``PROTOCOL N.M`` in ``impl/``, at the code that enforces it.

tests/conformance/test_conformance_spec.py checks the other direction (every MUST clause has
a conformance case).  A citation is ``PROTOCOL`` followed by one clause number or a list of
them (``PROTOCOL 6.4, 6.5``, ``PROTOCOL 11.1 and 11.2``).  A range such as ``3.3-6.4`` names
no clause: a maintainer looking for where 5.1 is enforced cannot find it by searching "5.1".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "spec" / "PROTOCOL.md"
IMPL = ROOT / "impl"

_HEADING = re.compile(r"^#### (\d+\.\d+) .+ \[(MUST|SHOULD|MAY)\]\s*$", re.M)
_NUMBER = r"\d+\.\d+"
_RANGE = re.compile(rf"{_NUMBER}\s*[-\u2013]\s*{_NUMBER}")  # hyphen or en dash
_CITATION = re.compile(rf"PROTOCOL ({_NUMBER}(?:(?:\s*,\s*|\s+and\s+|\s*/\s*){_NUMBER})*)")


def must_clauses() -> list[str]:
    found = [number for number, level in _HEADING.findall(PROTOCOL.read_text()) if level == "MUST"]
    assert len(found) > 30, "PROTOCOL.md parsed to suspiciously few MUST clauses"
    return found


def cited(text: str) -> set[str]:
    """The clause numbers ``text`` cites; ranges cite nothing."""
    text = _RANGE.sub("<range>", text)
    return {n for match in _CITATION.finditer(text) for n in re.findall(_NUMBER, match[1])}


def citations() -> dict[str, list[str]]:
    """Clause number -> the files of impl/ that cite it."""
    where: dict[str, list[str]] = {}
    for path in sorted(IMPL.rglob("*.py")):
        for number in cited(path.read_text()):
            where.setdefault(number, []).append(str(path.relative_to(ROOT)))
    return where


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("# PROTOCOL 5.1", {"5.1"}),
        ("(PROTOCOL 6.4, 6.5)", {"6.4", "6.5"}),
        ("PROTOCOL 11.1 and 11.2: retained", {"11.1", "11.2"}),
        ("PROTOCOL 3.3-6.4 for one client", set()),
        ("PROTOCOL 3.3\u20136.4", set()),
        ("PROTOCOL 9; see 9.1", set()),
        ("PROTOCOL 4.1: no empty chunk; 4.4: none over", {"4.1"}),
        ("version 1.3 of PROTOCOL.md", set()),
    ],
)
def test_what_counts_as_a_citation(text: str, numbers: set[str]) -> None:
    assert cited(text) == numbers


def test_every_must_clause_is_cited_in_impl() -> None:
    where = citations()
    missing = [number for number in must_clauses() if number not in where]
    assert not missing, (
        f"MUST clauses of spec/PROTOCOL.md cited nowhere in impl/ as 'PROTOCOL N.M': {missing}; "
        "cite each at the code that enforces it"
    )


def test_impl_cites_only_clauses_that_exist() -> None:
    exist = set(re.findall(r"^#### (\d+\.\d+) ", PROTOCOL.read_text(), re.M))
    stray = {number: files for number, files in citations().items() if number not in exist}
    assert not stray, f"impl/ cites clauses that PROTOCOL.md does not have: {stray}"
