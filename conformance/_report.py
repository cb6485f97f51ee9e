"""Reports: one line per case and a summary for people, JUnit XML and JSON for machines.

The summary line is exactly ``N passed, N failed`` with ``, N skipped`` and ``, N errors``
appended when nonzero, alone on its line, so scripts can match it.  The exit status is 0 only
when no MUST case failed or errored; SHOULD failures are reported but do not fail the run.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ._clauses import CLAUSES, Level
from ._runner import CaseResult, Verdict
from ._target import Target

__all__ = [
    "area_lines",
    "case_line",
    "exit_status",
    "failure_lines",
    "json_report",
    "junit_xml",
    "skip_lines",
    "summary",
]


def case_line(result: CaseResult, width: int = 56) -> str:
    level = "" if result.case.level is Level.MUST else f" [{result.case.level.value}]"
    return f"{result.verdict.value:<5}  {result.case.id + level:<{width}}  {result.seconds:6.2f}s"


def failure_lines(result: CaseResult) -> list[str]:
    """What a person needs under a FAIL or ERROR line: clause, requirement, expected, seen."""
    if result.verdict not in (Verdict.FAIL, Verdict.ERROR):
        return []
    lines = [
        f"       clause:      PROTOCOL {CLAUSES[result.case.clause]}",
        f"       requirement: {result.case.requirement}",
    ]
    if result.case.row:
        lines.append(f"       error row:   14.1 {result.case.row} -> {result.case.status}")
    if result.verdict is Verdict.FAIL and result.expected:
        lines.append(f"       expected:    {result.expected}")
        lines.append(f"       seen:        {result.seen}")
    else:
        lines.append(
            f"       {'error' if result.verdict is Verdict.ERROR else 'failure'}:"
            f"{' ' * 7}{result.message}"
        )
    return lines


def skip_lines(result: CaseResult) -> list[str]:
    """Under a SKIP line: why the case could not run against this target."""
    if result.verdict is not Verdict.SKIP:
        return []
    return [f"       reason:      {result.message}"]


def summary(results: Sequence[CaseResult]) -> str:
    counts = Counter(r.verdict for r in results)
    text = f"{counts[Verdict.PASS]} passed, {counts[Verdict.FAIL]} failed"
    if counts[Verdict.SKIP]:
        text += f", {counts[Verdict.SKIP]} skipped"
    if counts[Verdict.ERROR]:
        text += f", {counts[Verdict.ERROR]} errors"
    return text


def area_lines(results: Sequence[CaseResult]) -> list[str]:
    """Per area (session, lifecycle, status, control, ...): its counts, and the RPCs the
    target does not implement, so that a partial server's report says what it lacks."""
    areas: dict[str, list[CaseResult]] = {}
    for result in results:
        areas.setdefault(result.case.id.split("/", 1)[0], []).append(result)
    lines = []
    for area, group in areas.items():
        missing = sorted(
            {
                r.message.removesuffix(" is not implemented")
                for r in group
                if r.verdict is Verdict.FAIL and r.message.endswith(" is not implemented")
            }
        )
        note = f" ({', '.join(missing)} not implemented)" if missing else ""
        lines.append(f"  {area + ':':<11} {summary(group)}{note}")
    return lines


def exit_status(results: Sequence[CaseResult]) -> int:
    return 1 if any(r.counts for r in results) else 0


def json_report(results: Sequence[CaseResult], target: Target, seconds: float) -> str:
    counts = Counter(r.verdict.value for r in results)
    document: dict[str, Any] = {
        "suite": "execstream conformance",
        "target": target.address,
        "target_description": target.describe(),
        "seconds": round(seconds, 3),
        "summary": {
            "passed": counts["PASS"],
            "failed": counts["FAIL"],
            "skipped": counts["SKIP"],
            "errors": counts["ERROR"],
            "line": summary(results),
            "exit_status": exit_status(results),
        },
        "cases": [r.to_json() for r in results],
    }
    return json.dumps(document, indent=2) + "\n"


def junit_xml(results: Sequence[CaseResult], target: Target, seconds: float) -> str:
    counts = Counter(r.verdict for r in results)
    suite = ET.Element(
        "testsuite",
        name="execstream-conformance",
        tests=str(len(results)),
        failures=str(counts[Verdict.FAIL]),
        errors=str(counts[Verdict.ERROR]),
        skipped=str(counts[Verdict.SKIP]),
        time=f"{seconds:.3f}",
    )
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="target", value=target.address)
    for result in results:
        area = result.case.id.split("/", 1)[0]
        element = ET.SubElement(
            suite,
            "testcase",
            classname=f"execstream.conformance.{area}",
            name=result.case.id,
            time=f"{result.seconds:.3f}",
        )
        details = "\n".join(
            [f"PROTOCOL {CLAUSES[result.case.clause]} [{result.case.level.value} case]"]
            + [line.strip() for line in failure_lines(result)]
            + ["", "log:"]
            + result.log
        )
        if result.verdict is Verdict.FAIL:
            failure = ET.SubElement(
                element,
                "failure",
                message=f"[{result.case.level.value}] {result.message}"[:2000],
                type="conformance",
            )
            failure.text = details
        elif result.verdict is Verdict.ERROR:
            error = ET.SubElement(element, "error", message=result.message[:2000], type="harness")
            error.text = details
        elif result.verdict is Verdict.SKIP:
            ET.SubElement(element, "skipped", message=result.message)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
