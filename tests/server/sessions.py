"""Test helpers: drive Session streams over a real channel and record what came back."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import betterproto2
import grpc
import grpc.aio

from execstream import wire
from execstream.client._exec import _status_hidden_by_write

#: How many times a refused call is opened when grpc keeps hiding the refusal.
REFUSAL_TRIES = 3


def hidden_by_grpc(error: grpc.aio.AioRpcError) -> bool:
    """The status is grpc's, not the server's: a request being written met the server's end
    of the call, and grpc.aio put ``INTERNAL "Internal error from Core"`` in its place for
    good (grpc/grpc#36066; about 1 refusal in 500 on a loaded machine).  A test of a refusal
    opens the call again to learn it, as the client library does."""
    return _status_hidden_by_write(error) is not None


@dataclass
class SessionResult:
    readies: list[wire.Ready] = field(default_factory=list)
    chunks: list[wire.OutputChunk] = field(default_factory=list)
    exit_code: int | None = None
    order: list[str] = field(default_factory=list)  # "ready", "chunk", "exit" as received
    code: grpc.StatusCode | None = None
    details: str = ""

    def stream(self, name: str) -> bytes:
        return b"".join(getattr(c, name) or b"" for c in self.chunks)

    @property
    def stdout(self) -> bytes:
        return self.stream("stdout")

    @property
    def stderr(self) -> bytes:
        return self.stream("stderr")

    def assert_contiguous(self, first: int = 1) -> None:
        expected = first
        for chunk in self.chunks:
            assert chunk.gap_before == 0, f"unexpected gap before {chunk.sequence}"
            assert chunk.sequence == expected, f"got #{chunk.sequence}, expected #{expected}"
            expected += 1

    def digest(self, name: str) -> str:
        return hashlib.sha256(self.stream(name)).hexdigest()


async def requests(
    first: wire.SessionRequest | None,
    more: Iterable[wire.SessionRequest] = (),
    *,
    hold: asyncio.Event | None = None,
) -> AsyncIterator[wire.SessionRequest]:
    """Send ``first`` and ``more``; then half-close, or stay open until ``hold`` is set."""
    if first is not None:
        yield first
    for request in more:
        yield request
    if hold is not None:
        await hold.wait()


def start(container_id: str, exec_id: str, *command: str, **fields: object) -> wire.SessionRequest:
    return wire.SessionRequest(
        start=wire.Start(
            container_id=container_id,
            exec_id=exec_id,
            command=list(command),
            **fields,  # type: ignore[arg-type]
        )
    )


async def collect(
    stub: wire.ExecStub,
    request_stream: AsyncIterator[wire.SessionRequest],
    *,
    deadline: float = 60,
    on_ready: asyncio.Event | None = None,
) -> SessionResult:
    """Read a whole session; a non-OK status is recorded, not raised."""
    result = SessionResult()
    call = stub.Session(request_stream, timeout=deadline)
    try:
        async for response in call:
            kind, value = betterproto2.which_one_of(response, "msg")
            if isinstance(value, wire.Ready):
                result.readies.append(value)
                result.order.append("ready")
                if on_ready is not None:
                    on_ready.set()
            elif isinstance(value, wire.OutputChunk):
                result.chunks.append(value)
                result.order.append("chunk")
            elif kind == "exit" and isinstance(value, int):
                result.exit_code = value
                result.order.append("exit")
            else:
                result.order.append(kind or "empty")
        result.code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        result.code = error.code()
        result.details = error.details() or ""
    return result


async def run(
    stub: wire.ExecStub, container_id: str, exec_id: str, *command: str, **fields: object
) -> SessionResult:
    return await collect(stub, requests(start(container_id, exec_id, *command, **fields)))


async def attach(
    stub: wire.ExecStub, container_id: str, exec_id: str, replay_from_sequence: int = 0
) -> SessionResult:
    return await collect(
        stub,
        requests(start(container_id, exec_id, replay_from_sequence=replay_from_sequence)),
    )


class SteppedClock:
    """The system clock, plus the time a test skips with :meth:`advance`.

    Injected into a server's registry, it lets a retention test move past the retention
    period without sleeping through it (PROTOCOL 11.1, 11.2); wall and monotonic time move
    together, as they would had the time passed.
    """

    def __init__(self) -> None:
        self.skipped = 0.0

    def wall_ns(self) -> int:
        return time.time_ns() + round(self.skipped * 1e9)

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


async def until_removed(registry: Iterable[object], exec_id: str, timeout: float = 10) -> None:
    """Poll (with a deadline) until the registry no longer holds ``exec_id``."""
    deadline = time.monotonic() + timeout
    while any(getattr(record, "exec_id", None) == exec_id for record in registry):
        assert time.monotonic() < deadline, f"{exec_id} was not removed within {timeout} s"
        await asyncio.sleep(0.01)
