"""execstream.conformance: check any ``dagger.exec.Exec`` server against spec/PROTOCOL.md.

Layers, each in its own module:

* ``_clauses`` — the clauses of PROTOCOL.md (number, title, level) and the case-ID scheme
  ``AREA/CLAUSE/SLUG``;
* ``_case`` — what a case is (ID, level, one-line requirement, the 14.1 row it checks) and how
  it fails (:class:`Failure`: expected versus seen), skips, or hits a harness problem;
* ``_target`` — the server under test and what the suite assumes of its settings;
* ``_driver`` — how the suite obtains its execs: ``Start{command}`` over the wire, or a
  driver command or callable that has an engine register them;
* ``_context`` — what a case works with: its own channel, fresh IDs, its execs, cleanup;
* ``_recording``, ``_session_client``, ``_subscription`` — the recorded streams and calls a
  case waits on; ``_checks`` — the checks cases share (case modules import these, never one
  another);
* ``_workloads`` and ``_protowire`` — the POSIX ``sh`` workloads with their expected bytes, and a
  published-fields-only protobuf codec for wire compatibility (1.3);
* ``_cases_*`` — the cases, by section of the spec; ``_suite`` — all of them, and selection;
* ``_runner`` — verdicts (PASS, FAIL, SKIP, ERROR), concurrency, the preflight;
* ``_report`` — the lines for people, JUnit XML and JSON; ``_cli`` — ``execstream conformance``;
* ``pytest_plugin`` and ``test_conformance`` — the cases as pytest tests in a user's CI.

The suite talks to servers only over the network; only the CLI imports the reference server,
to start the embedded target when no ``--target`` is given.  Importing this package is cheap:
the names below load their modules on first use, so the pytest plugin (an entry point loaded
by every pytest session where execstream is installed) costs nothing until its options are
used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._case import Case, Failure, HarnessError, Skip
    from ._clauses import CLAUSES, NOT_CHECKED, Clause, Level
    from ._runner import CaseResult, Verdict, run_case, run_suite
    from ._suite import CASES, select
    from ._target import Target

__all__ = [
    "CASES",
    "CLAUSES",
    "NOT_CHECKED",
    "Case",
    "CaseResult",
    "Clause",
    "Failure",
    "HarnessError",
    "Level",
    "Skip",
    "Target",
    "Verdict",
    "run_case",
    "run_suite",
    "select",
]

_WHERE = {
    "Case": "_case",
    "Failure": "_case",
    "HarnessError": "_case",
    "Skip": "_case",
    "CLAUSES": "_clauses",
    "NOT_CHECKED": "_clauses",
    "Clause": "_clauses",
    "Level": "_clauses",
    "CaseResult": "_runner",
    "Verdict": "_runner",
    "run_case": "_runner",
    "run_suite": "_runner",
    "CASES": "_suite",
    "select": "_suite",
    "Target": "_target",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
