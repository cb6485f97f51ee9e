"""The one expected error of the reference server.

Every rule the server enforces raises :class:`ExecError` with an :class:`ErrorCode`; the grpc
glue turns the code into a status code in one table (``_service.STATUS_OF``).  Anything else
that escapes a handler is a bug and becomes ``UNKNOWN "Internal Server Error"``, logged.
Plain Python: no grpc import, so the core can raise it.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "ExecError", "SettingError"]


class ErrorCode(enum.Enum):
    """The error rows of PROTOCOL.md section 12, by the status each maps to."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    OUT_OF_RANGE = "out_of_range"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAUTHENTICATED = "unauthenticated"
    UNAVAILABLE = "unavailable"
    #: Not a rule of the spec: a bug of the server, reported as UNKNOWN (PROTOCOL 14.1).
    INTERNAL = "internal"


class ExecError(Exception):
    """A request broke a rule of the spec, or a limit; ``message`` says which and why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ExecError({self.code.name}, {self.message!r})"


class SettingError(ValueError):
    """A server setting that cannot work; ``setting`` names it (``listen``, ``tls_cert``,
    ``limits.stdin_bytes``), and the message says why.  Raised before anything is bound."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem
