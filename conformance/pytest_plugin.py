"""The pytest plugin (entry point ``execstream_conformance``): the suite in a user's own CI.

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

Inert unless used: this module only adds command-line options; it imports nothing of the
suite and changes neither collection nor behaviour of any test session — the tests exist only
when pytest is pointed at the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._target import Target

__all__ = ["pytest_addoption", "target_from_config"]


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
        "--execstream-history-bytes", type=int, default=4 * 1024 * 1024, metavar="BYTES"
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
        retention=config.getoption("--execstream-retention"),
        cleanup_interval=config.getoption("--execstream-cleanup-interval"),
        history_bytes=int(config.getoption("--execstream-history-bytes")),
        stdin_bytes=int(config.getoption("--execstream-stdin-bytes")),
        max_clients_per_exec=int(config.getoption("--execstream-max-clients-per-exec")) or None,
        driver=driver,
    )
