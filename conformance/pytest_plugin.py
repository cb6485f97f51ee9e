"""The pytest plugin (entry point ``execstream_conformance``): the suite in a user's own CI.

    pip install 'execstream[pytest]'
    pytest --pyargs execstream.conformance --execstream-target HOST:PORT [--execstream-token T]

(with ``--execstream-driver-command CMD`` or ``--execstream-driver MODULE:CALLABLE`` for an
engine whose execs are not created over the wire) runs every case as one pytest test
(``execstream/conformance/test_conformance.py``, parametrized by case ID).  Verdicts map onto
pytest's: PASS passes, FAIL fails with the clause, requirement, expected and seen (a SHOULD
case's failure is reported as ``xfail``, as the CLI does not fail the run for it), SKIP skips
with the reason, and ERROR — an unreachable target, a harness timeout — is raised as an
error.  Without ``--execstream-target`` the
tests skip with a reason saying so (the CLI, ``execstream conformance``, is the way to check
the embedded reference server).

Cases not chosen by ``--execstream-case``, ``--execstream-exclude-case`` or
``--execstream-level`` are deselected, not skipped.  The chosen ones run concurrently, as the
CLI runs them (``--execstream-jobs``, default 6): the first test runs them all and each test
then reports its own case's verdict, so a test's duration is not its case's.

Inert unless used: this module adds command-line options and deselects only tests of the
suite's own module; it imports nothing of the suite and changes neither collection nor
behaviour of any other test.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._target import Target

__all__ = [
    "SUITE_FILE",
    "chosen",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "session_case_ids",
    "target_from_config",
]

#: The module whose tests are the suite's cases.
SUITE_FILE = Path(__file__).resolve().with_name("test_conformance.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("execstream", "execstream conformance suite")
    group.addoption(
        "--execstream-target",
        metavar="HOST:PORT",
        help="check this Exec server (pytest --pyargs execstream.conformance)",
    )
    group.addoption("--execstream-token", metavar="TOKEN", help="the target's token")
    group.addoption("--execstream-tls", action="store_true", help="connect with TLS")
    group.addoption("--execstream-ca", metavar="FILE", help="CA certificates for TLS (PEM)")
    group.addoption("--execstream-cert", metavar="FILE", help="client certificate (mTLS, PEM)")
    group.addoption("--execstream-key", metavar="FILE", help="private key of the client cert")
    group.addoption(
        "--execstream-retention",
        type=float,
        metavar="SECONDS",
        help="the target's retention (unknown: 11.x cases skip)",
    )
    group.addoption(
        "--execstream-cleanup-interval",
        type=float,
        metavar="SECONDS",
        help="the target's sweep interval (unknown: 11.x cases skip)",
    )
    group.addoption(
        "--execstream-max-output-bytes",
        type=int,
        default=1024 * 1024 * 1024,
        metavar="BYTES",
        help="the target's output limit per exec (0: none)",
    )
    group.addoption("--execstream-stdin-bytes", type=int, default=1024 * 1024, metavar="BYTES")
    group.addoption(
        "--execstream-max-clients-per-exec",
        type=int,
        default=64,
        metavar="N",
        help="0 if unknown",
    )
    group.addoption(
        "--execstream-max-execs-per-container",
        type=int,
        default=128,
        metavar="N",
        help="0 if unknown",
    )
    group.addoption(
        "--execstream-connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on an unreachable target after this long (default 10)",
    )
    group.addoption(
        "--execstream-jobs",
        type=int,
        default=6,
        metavar="N",
        help="cases at once (default 6)",
    )
    group.addoption(
        "--execstream-driver-command",
        metavar="CMD",
        help="run CMD to have the target register each exec (see `execstream conformance`)",
    )
    group.addoption(
        "--execstream-driver",
        metavar="MODULE:CALLABLE",
        help="an async callable that has the target register each exec",
    )
    group.addoption(
        "--execstream-level",
        choices=["must", "should"],
        default="should",
        help="must: run only MUST cases",
    )
    group.addoption(
        "--execstream-case",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only cases whose ID or clause starts with PREFIX (repeatable)",
    )
    group.addoption(
        "--execstream-exclude-case",
        action="append",
        default=[],
        metavar="ID",
        help="leave out these cases (repeatable)",
    )


def target_from_config(config: pytest.Config) -> Target | None:
    """The target the options describe, or None without ``--execstream-target``."""
    address = config.getoption("--execstream-target")
    if not address:
        return None
    from ._driver import driver_from_options
    from ._target import Target

    ca = config.getoption("--execstream-ca")
    try:
        driver = driver_from_options(
            config.getoption("--execstream-driver-command"), config.getoption("--execstream-driver")
        )
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    return Target(
        address=str(address),
        token=config.getoption("--execstream-token") or None,
        tls=bool(config.getoption("--execstream-tls")),
        ca=Path(ca) if ca else None,
        cert=Path(cert) if (cert := config.getoption("--execstream-cert")) else None,
        key=Path(key) if (key := config.getoption("--execstream-key")) else None,
        retention=config.getoption("--execstream-retention"),
        cleanup_interval=config.getoption("--execstream-cleanup-interval"),
        max_output_bytes=int(config.getoption("--execstream-max-output-bytes")),
        stdin_bytes=int(config.getoption("--execstream-stdin-bytes")),
        max_clients_per_exec=int(config.getoption("--execstream-max-clients-per-exec")) or None,
        max_execs_per_container=int(config.getoption("--execstream-max-execs-per-container"))
        or None,
        connect_timeout=float(config.getoption("--execstream-connect-timeout")),
        driver=driver,
    )


def chosen(config: pytest.Config, case_ids: list[str]) -> set[str]:
    """The IDs among ``case_ids`` that the case, exclude and level options select."""
    from ._case import REGISTRY
    from ._clauses import Level
    from ._suite import select

    level = Level.MUST if config.getoption("--execstream-level") == "must" else None
    picked = select(
        [REGISTRY[i] for i in case_ids],
        include=config.getoption("--execstream-case"),
        exclude=config.getoption("--execstream-exclude-case"),
        level=level,
    )
    return {case.id for case in picked}


def _case_id(item: pytest.Item) -> str | None:
    module = getattr(item, "module", None)
    # By file, not by name: pytest may import it as conformance.test_conformance.
    if module is None or Path(getattr(module, "__file__", "") or "").resolve() != SUITE_FILE:
        return None
    callspec = getattr(item, "callspec", None)
    return str(callspec.params["case_id"]) if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the cases the options leave out (only the suite's own tests)."""
    ours = {id(item): case_id for item in items if (case_id := _case_id(item)) is not None}
    if not ours:
        return
    keep = chosen(config, list(ours.values()))
    dropped = [item for item in items if ours.get(id(item)) not in (None, *keep)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in gone]


def session_case_ids(session: pytest.Session) -> list[str]:
    """The cases this session runs, after every deselection (``-k`` included)."""
    return [case_id for item in session.items if (case_id := _case_id(item)) is not None]
