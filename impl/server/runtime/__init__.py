"""Runtimes: what runs the execs of the reference server, behind one contract.

:class:`Runtime` and :class:`RunningExec` are the contract (``_base``); the runner and the
service use nothing else.  :class:`ProcessRuntime` (the default) runs host processes,
:class:`FakeRuntime` runs nothing, for tests.
"""

from typing import TYPE_CHECKING

from ._base import (
    ExecSpec,
    OutputSink,
    ResourceSample,
    RunningExec,
    Runtime,
    check_terminal_size,
)
from ._fake import FakeExec, FakeRuntime
from .process import ProcessExec, ProcessRuntime

__all__ = [
    "ExecSpec",
    "FakeExec",
    "FakeRuntime",
    "OutputSink",
    "ProcessExec",
    "ProcessRuntime",
    "ResourceSample",
    "RunningExec",
    "Runtime",
    "check_terminal_size",
]

if TYPE_CHECKING:

    def _fake_keeps_the_contract(fake: FakeRuntime) -> Runtime:
        return fake  # mypy checks FakeRuntime against the protocol here
