"""The suite as pytest tests: ``pytest --pyargs execstream.conformance --execstream-target ADDR``.

One test per case, parametrized by case ID, each run in its own event loop against the
target the ``--execstream-*`` options describe (see ``pytest_plugin``).  Without
``--execstream-target`` every test skips, saying so.  A preflight runs once per session: an
unreachable target makes every test an error (in setup), not a failure of the server.
"""

from __future__ import annotations

import asyncio

import pytest

from execstream.conformance._case import REGISTRY, HarnessError
from execstream.conformance._clauses import Level
from execstream.conformance._report import failure_lines
from execstream.conformance._runner import Verdict, preflight, run_case
from execstream.conformance._suite import CASES, select
from execstream.conformance._target import Target
from execstream.conformance.pytest_plugin import target_from_config

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


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_case(case_id: str, execstream_target: Target, request: pytest.FixtureRequest) -> None:
    config = request.config
    case = REGISTRY[case_id]
    level = Level.MUST if config.getoption("--execstream-level") == "must" else None
    chosen = select(
        [case],
        include=config.getoption("--execstream-case"),
        exclude=config.getoption("--execstream-exclude-case"),
        level=level,
    )
    if not chosen:
        pytest.skip("not selected by --execstream-case / --execstream-exclude-case / level")
    result = asyncio.run(run_case(case, execstream_target))
    text = "\n".join([f"{result.verdict.value} {case.id}", *failure_lines(result)])
    if result.verdict is Verdict.SKIP:
        pytest.skip(result.message)
    if result.verdict is Verdict.ERROR:
        raise HarnessError(text)
    if result.verdict is Verdict.FAIL:
        if case.level is Level.SHOULD:
            pytest.xfail(text)
        pytest.fail(text, pytrace=False)
