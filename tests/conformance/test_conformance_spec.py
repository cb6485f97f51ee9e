"""The suite against the document it checks: every MUST clause of spec/PROTOCOL.md has a case,
every case names a clause that exists, every row of the error table (14.1) has a case expecting
its status code, and case IDs follow the ``AREA/CLAUSE/SLUG`` scheme.  No network.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from execstream.conformance import CASES, CLAUSES, NOT_CHECKED, Level
from execstream.conformance._clauses import area_of
from execstream.conformance._suite import matches, select

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "spec" / "PROTOCOL.md"
PACKAGE = ROOT / "conformance"

HEADING = re.compile(r"^#### (\d+\.\d+) (.+) \[(MUST|SHOULD|MAY)\]\s*$")


def spec_clauses() -> dict[str, tuple[str, str]]:
    """Clause number -> (title, level), from the ``#### N.M Title [LEVEL]`` headings."""
    found: dict[str, tuple[str, str]] = {}
    for line in PROTOCOL.read_text().splitlines():
        if line.startswith("#### "):
            match = HEADING.match(line)
            assert match, f"a clause heading not in the form '#### N.M Title [LEVEL]': {line!r}"
            number, title, level = match.groups()
            assert number not in found, f"clause {number} twice in PROTOCOL.md"
            found[number] = (title, level)
    assert len(found) > 40, "PROTOCOL.md parsed to suspiciously few clauses"
    return found


def error_rows() -> list[tuple[str, str, str, list[str]]]:
    """The rows of the 14.1 table: (RPC, condition, status, clauses)."""
    text = PROTOCOL.read_text()
    table = text[text.index("#### 14.1") :]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("RPC", "---") or set(cells[0]) <= {"-"}:
            continue
        rpc, condition, status, clauses = cells
        rows.append((rpc, condition, status.strip("`"), [c.strip() for c in clauses.split(",")]))
    assert len(rows) >= 20, "the 14.1 table parsed to suspiciously few rows"
    return rows


def test_clause_table_mirrors_protocol() -> None:
    """The suite's copy of the headings (used in reports) is the document's."""
    spec = spec_clauses()
    mine = {n: (c.title, c.level.value) for n, c in CLAUSES.items()}
    assert mine == spec


def test_every_must_clause_has_a_case() -> None:
    covered = {clause for case in CASES for clause in case.clauses}
    missing = [
        n for n, (_, level) in spec_clauses().items() if level == "MUST" and n not in covered
    ]
    assert not missing, f"MUST clauses without a case: {missing}"


def test_every_clause_is_covered_or_excused() -> None:
    covered = {clause for case in CASES for clause in case.clauses}
    spec = spec_clauses()
    unexplained = [n for n in spec if n not in covered and n not in NOT_CHECKED]
    assert not unexplained, (
        f"clauses with neither a case nor a reason in NOT_CHECKED: {unexplained}"
    )
    for number in NOT_CHECKED:
        assert number in spec, f"NOT_CHECKED names clause {number}, which does not exist"
        assert spec[number][1] != "MUST", f"MUST clause {number} cannot be left unchecked"
        assert number not in covered, f"clause {number} has cases but is listed as NOT_CHECKED"


def test_every_case_names_an_existing_clause() -> None:
    spec = spec_clauses()
    for case in CASES:
        for clause in case.clauses:
            assert clause in spec, f"{case.id} names clause {clause}, not in PROTOCOL.md"


def test_case_ids_follow_the_scheme() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert re.fullmatch(r"[a-z]+/\d+\.\d+/[a-z0-9]+(-[a-z0-9]+)*", case.id), case.id
        area, clause, _ = case.id.split("/")
        assert clause == case.clause and area == area_of(clause), case.id
        assert case.requirement and "\n" not in case.requirement, case.id
        assert case.level in (Level.MUST, Level.SHOULD), case.id
        if CLAUSES[case.clause].level is Level.SHOULD:
            assert case.level is Level.SHOULD, f"{case.id}: a MUST case of a SHOULD clause"


def test_every_error_row_has_a_case_with_its_status() -> None:
    rows = error_rows()
    by_row: dict[str, list[str]] = {}
    for case in CASES:
        if case.row is not None:
            by_row.setdefault(case.row, []).append(case.id)
    keys = set()
    for rpc, condition, status, clauses in rows:
        key = f"{rpc}: {condition}"
        keys.add(key)
        if clauses == ["13.2"]:
            assert "13.2" in NOT_CHECKED  # shutdown: the suite does not stop the target
            continue
        assert key in by_row, f"no case checks the 14.1 row {key!r} -> {status}"
        for case_id in by_row[key]:
            case = next(c for c in CASES if c.id == case_id)
            assert case.status == status, f"{case_id} expects {case.status}, the row {status}"
            assert any(case.clause == c or case.clause.startswith(c + ".") for c in clauses), (
                f"{case_id} is a case of {case.clause}, the row names {clauses}"
            )
    stray = set(by_row) - keys
    assert not stray, f"cases name rows that are not in the 14.1 table: {stray}"


def test_every_status_code_of_the_table_is_expected_somewhere() -> None:
    statuses = {status for _, _, status, clauses in error_rows() if clauses != ["13.2"]}
    assert statuses <= {case.status for case in CASES}


def test_selection_by_prefix_respects_boundaries() -> None:
    ids = {case.id for case in select(include=["session/3"])}
    assert ids and all(i.startswith("session/3.") for i in ids)
    assert {c.id for c in select(include=["3.1"])} == {c.id for c in CASES if c.clause == "3.1"}
    assert not [c for c in select(include=["1"]) if c.clause.startswith("1") and c.clause[1] != "."]
    assert {c.id for c in select(include=["errors"])} == {c.id for c in CASES if c.row}
    one = "session/3.1/second-start"
    assert one not in {c.id for c in select(include=["session/3.1"], exclude=[one])}
    assert all(c.level is Level.MUST for c in select(level=Level.MUST))
    case = next(c for c in CASES if c.id == one)
    assert matches(case, "session/3.1/second") and not matches(case, "session/3.10")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_the_suite_talks_to_servers_only_over_the_network(path: Path) -> None:
    """DESIGN: only the CLI imports the server, to start the embedded target."""
    imported = _imports(path)
    server = {name for name in imported if name.startswith("execstream.server")}
    if path.name != "_cli.py":
        assert not server, f"{path.name} imports {server}"
    assert not {n for n in imported if n.startswith("execstream.client")}


def test_importing_the_plugin_loads_nothing_of_the_suite() -> None:
    """The entry point is loaded by every pytest session: it must stay inert and cheap."""
    code = (
        "import sys, execstream.conformance.pytest_plugin\n"
        "loaded = [m for m in ('grpc', 'execstream.conformance._suite', 'execstream.server')"
        " if m in sys.modules]\n"
        "print(loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def _relative_imports(path: Path) -> set[str]:
    """The suite's own modules ``path`` imports (``from ._x import``, ``from . import _x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module)
            else:
                names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("_cases_*.py")), ids=lambda p: p.name)
def test_a_case_module_imports_helpers_never_another_case_module(path: Path) -> None:
    """Each section's cases stand alone: shared checks live in ``_checks``, not in a case
    module another one reaches into."""
    cases = {name for name in _relative_imports(path) if name.startswith("_cases_")}
    assert not cases, f"{path.name} imports the case modules {sorted(cases)}"
