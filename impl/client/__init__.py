"""execstream.client: the typed Python client of an execstream server, async and sync.

Async::

    async with AsyncExecClient("127.0.0.1:50051", token="...") as client:
        exec_ = await client.run("default", "build-1", ["make", "-j4"])
        async for event in exec_:
            match event:
                case Output(stream="stdout", data=data): sys.stdout.buffer.write(data)
                case Output(stream="stderr", data=data): sys.stderr.buffer.write(data)
                case Gap(missed=n): print(f"{n} chunks lost", file=sys.stderr)
                case Exit(code=code): print("exit", code)

Sync: :class:`ExecClient` has the same methods, blocking, and really streams (a portal
thread runs the async client; see ``_sync``).

Layers, each with one job: ``_connection`` (target, TLS, token metadata, keepalive,
:class:`RetryPolicy`), ``_errors`` (status code → exception, one table), ``_events`` (wire
message → frozen dataclass), ``_exec`` (one Session: reader task, bounded buffer, resume
after a broken connection without duplicate or hidden hole), ``_client`` (the RPCs),
``_sync`` (the blocking twin).
"""

from ._client import AsyncExecClient, EventStream
from ._connection import DEFAULT_TARGET, RetryPolicy
from ._errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    ExecStreamError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ProtocolError,
    ResourceExhausted,
    ServerError,
    ServerShuttingDown,
    Unauthenticated,
    Unavailable,
)
from ._events import (
    ExecEvent,
    Exit,
    Gap,
    LifecycleEvent,
    Output,
    ResourceUsage,
    Status,
    StreamName,
)
from ._exec import Exec
from ._sync import ExecClient, SyncEventStream, SyncExec

__all__ = [
    "DEFAULT_TARGET",
    "AlreadyExists",
    "AsyncExecClient",
    "Cancelled",
    "DeadlineExceeded",
    "EventStream",
    "Exec",
    "ExecClient",
    "ExecEvent",
    "ExecStreamError",
    "Exit",
    "FailedPrecondition",
    "Gap",
    "InvalidArgument",
    "LifecycleEvent",
    "NotFound",
    "OutOfRange",
    "Output",
    "ProtocolError",
    "ResourceExhausted",
    "ResourceUsage",
    "RetryPolicy",
    "ServerError",
    "ServerShuttingDown",
    "Status",
    "StreamName",
    "SyncEventStream",
    "SyncExec",
    "Unauthenticated",
    "Unavailable",
]
