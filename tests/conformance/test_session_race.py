"""The suite's Session client learns a refusal that grpc hid, even when the race that hides it
is lost every time the request is sent at once (as on a loaded machine): its retries give
the refusal time to come before ``start`` is sent."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
from conformance_harness import HIDDEN_BY_GRPC, target_for

from execstream import wire
from execstream.conformance import select
from execstream.conformance._context import CaseContext

REFUSED = grpc.aio.AioRpcError(
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.aio.Metadata(),
    grpc.aio.Metadata(),
    details="missing or invalid token",
)


class RefusingCall:
    """A Session that the server refuses a moment after it opened, before reading anything:
    a write made before the refusal has arrived loses the status to grpc's INTERNAL."""

    def __init__(self, refusal_after: float) -> None:
        self._refused = asyncio.Event()
        self._hidden = False
        self.writes = 0
        asyncio.get_running_loop().call_later(refusal_after, self._refused.set)

    def done(self) -> bool:
        return self._refused.is_set()

    async def write(self, request: wire.SessionRequest) -> None:
        self.writes += 1
        if self.done():
            raise asyncio.InvalidStateError("RPC already finished.")
        self._hidden = True
        raise HIDDEN_BY_GRPC

    async def done_writing(self) -> None:
        if not self.done():
            self._hidden = True
            raise HIDDEN_BY_GRPC

    async def read(self) -> wire.SessionResponse:
        await self._refused.wait()
        raise HIDDEN_BY_GRPC if self._hidden else REFUSED

    def cancel(self) -> bool:
        self._refused.set()
        return True


class RefusingStub:
    def __init__(self) -> None:
        self.calls: list[RefusingCall] = []

    def Session(self, *args: Any, **kwargs: Any) -> RefusingCall:
        self.calls.append(RefusingCall(refusal_after=0.05))
        return self.calls[-1]


async def test_a_refusal_hidden_every_time_start_is_sent_at_once_is_learnt() -> None:
    (case,) = select(include=["auth/12.1/missing-token"])
    ctx = CaseContext(target_for("127.0.0.1:1"), case)  # a closed port: never dialled
    stub = RefusingStub()
    ctx.stub = stub  # type: ignore[assignment]
    try:
        start = ctx.start_message(ctx.container_id(), ctx.exec_id(), ["true"])
        client = await ctx.one_shot(start, metadata=(), label="session")
    finally:
        await ctx.channel.close()
    assert client.code is grpc.StatusCode.UNAUTHENTICATED, "\n".join(ctx.lines)
    assert len(stub.calls) >= 2 and stub.calls[0].writes == 1  # the first one lost the race
    assert stub.calls[-1].writes == 0  # the last waited for the refusal, and sent nothing
