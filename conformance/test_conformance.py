"""The suite as pytest tests: ``pytest --pyargs execstream.conformance --execstream-target ADDR``.

One test per case, parametrized by case ID, against the target the ``--execstream-*`` options
describe (see ``pytest_plugin``, which deselects the cases the options leave out).  Without
``--execstream-target`` every test skips, saying so.  A preflight runs once per session: an
unreachable target makes every selected test an error (in setup), not a failure of the
server.  The selected cases run concurrently, once, as the CLI runs them; each test reports
its own case's result.
"""

from __future__ import annotations

import asyncio

import pytest

from execstream.conformance._case import REGISTRY, HarnessError
from execstream.conformance._clauses import Level
from execstream.conformance._report import failure_lines
from execstream.conformance._runner import CaseResult, Verdict, preflight, run_suite
from execstream.conformance._suite import CASES
from execstream.conformance._target import Target
from execstream.conformance.pytest_plugin import session_case_ids, target_from_config

_NO_TARGET = (
    "no --execstream-target given: pass --execstream-target HOST:PORT to check a server "
    "(or run `execstream conformance` to check the embedded reference server)"
)


@pytest.fixture(scope="session")
def execstream_target(request: pytest.FixtureRequest) -> Target:
    target = target_from_config(request.config)
    if target is None:
        pytest.skip(_NO_TARGET)
    problem = asyncio.run(preflight(target))
    if problem is not None:
        raise HarnessError(problem)
    return target


@pytest.fixture(scope="session")
def execstream_results(
    execstream_target: Target, request: pytest.FixtureRequest
) -> dict[str, CaseResult]:
    """Every case of the session, run at once with ``--execstream-jobs`` at a time."""
    cases = [REGISTRY[i] for i in session_case_ids(request.session)]
    jobs = int(request.config.getoption("--execstream-jobs"))
    results = asyncio.run(run_suite(execstream_target, cases, jobs=jobs))
    return {result.case.id: result for result in results}


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_case(case_id: str, execstream_results: dict[str, CaseResult]) -> None:
    case = REGISTRY[case_id]
    result = execstream_results[case_id]
    text = "\n".join([f"{result.verdict.value} {case.id}", *failure_lines(result)])
    if result.verdict is Verdict.SKIP:
        pytest.skip(result.message)
    if result.verdict is Verdict.ERROR:
        raise HarnessError(text)
    if result.verdict is Verdict.FAIL:
        if case.level is Level.SHOULD:
            pytest.xfail(text)
        pytest.fail(text, pytrace=False)
