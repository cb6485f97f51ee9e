"""One exception hierarchy for every failure the client reports.

Every failure of an API call, and every failure met while iterating a stream, is an
:class:`ExecStreamError` carrying the gRPC ``code`` and the server's ``message``.  Each status
of PROTOCOL.md section 14 has its own class, so callers catch what they mean
(``except NotFound``) rather than compare codes.  The conversion from ``grpc.aio.AioRpcError``
happens in one place, :func:`error_from_rpc`, at the boundary where the network enters.

Whose fault it was, as in h11: :class:`ProtocolError` is the server breaking the spec (for
example a stream that ends without ``exit``); the status classes are the server saying no; a
``ValueError``/``TypeError`` raised before anything is sent is the caller misusing the API.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
import grpc.aio

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "ExecStreamError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "ProtocolError",
    "ResourceExhausted",
    "ServerError",
    "ServerShuttingDown",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
    "error_from_status",
]

#: PROTOCOL 13.2: the message a server gives when it ends streams because it shuts down.
SHUTTING_DOWN = "shutting down"


class ExecStreamError(Exception):
    """A call or a stream failed; ``code`` is the gRPC status, ``message`` the server's words."""

    #: The status a subclass stands for (the fallback class takes whatever it is given).
    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code

    @property
    def label(self) -> str:
        """The status in words: ``not found``, ``failed precondition``..."""
        return str(self.code.name).lower().replace("_", " ")

    def __str__(self) -> str:
        return f"{self.label}: {self.message}" if self.message else self.label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.code})"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.code))


class InvalidArgument(ExecStreamError):
    """A field is missing or malformed (PROTOCOL 2.1, 3.1, 3.2, 7.2, 7.3, 8.3, 10.3)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ExecStreamError):
    """No such container or exec, or it was removed after retention (3.2, 9.1, 10, 11.2)."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ExecStreamError):
    """The exec exists (running, or exited and still retained) (3.2)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ExecStreamError):
    """Not possible in the current state: paused, not a TTY, stdin closed, no process (3.2,
    7.1, 7.3, 10.1-10.3)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ExecStreamError):
    """A replay was asked from past the next sequence (6.1, 8.4)."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(ExecStreamError):
    """A server limit would be exceeded; the message names it (13.1)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ExecStreamError):
    """The server wants a token and got none, or another one (12.1)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(ExecStreamError):
    """The server cannot be reached, or the connection broke."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ServerShuttingDown(Unavailable):
    """The server ended the stream because it shuts down (13.2); never resumed."""


class DeadlineExceeded(ExecStreamError):
    """The call's timeout passed before it completed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ExecStreamError):
    """The call was cancelled (by this client closing it, or by the server)."""

    default_code = grpc.StatusCode.CANCELLED


class ServerError(ExecStreamError):
    """Any other status: ``UNKNOWN "Internal Server Error"`` (14.1) and codes the spec never
    uses (``INTERNAL``, ``UNIMPLEMENTED``, ``PERMISSION_DENIED``...)."""


class ProtocolError(ExecStreamError):
    """The server broke the protocol (for example a Session that ended without ``exit``)."""


_CLASS_OF: dict[grpc.StatusCode, type[ExecStreamError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_from_status(code: grpc.StatusCode, message: str) -> ExecStreamError:
    """The exception for a status; the one table of the client (PROTOCOL 14.1)."""
    if code is grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in message:
        return ServerShuttingDown(message, code)
    return _CLASS_OF.get(code, ServerError)(message, code)


def error_from_rpc(error: grpc.aio.AioRpcError) -> ExecStreamError:
    """Convert what grpc.aio raised into the client's exception."""
    return error_from_status(error.code(), error.details() or "")
