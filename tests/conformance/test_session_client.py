"""The suite's Session client on its own: a status grpc hid is recognised as lost, whichever
request met the server's end of the call (grpc/grpc#36066)."""

from __future__ import annotations

from typing import Any, cast

import grpc
import grpc.aio
import pytest

from execstream import wire
from execstream.conformance._session_client import SessionClient

HIDDEN = "Internal error from Core"


class Context:
    def log(self, line: str) -> None:
        pass

    def note_status(self, rpc: str, code: grpc.StatusCode, details: str) -> None:
        pass


class RefusedCall:
    """A call the server has ended: grpc.aio fails its sends and hides the status."""

    def _hidden(self, operation: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=HIDDEN,
            debug_error_string=f'Failed "execute_batch": ({operation},)',
        )

    async def write(self, request: Any) -> None:
        raise self._hidden("SendMessageOperation")

    async def done_writing(self) -> None:
        raise self._hidden("SendCloseFromClientOperation")


def client() -> SessionClient:
    return SessionClient(cast(Any, Context()), cast(Any, RefusedCall()), "session", None)


@pytest.mark.parametrize("step", ["write", "half-close"])
async def test_a_status_hidden_by_a_send_is_lost_not_wrong(step: str) -> None:
    session = client()
    if step == "write":
        assert not await session.send(wire.SessionRequest(stdin=b"x"))
    else:
        await session.half_close()
    session._end(grpc.StatusCode.INTERNAL, HIDDEN)  # what the reader then sees
    assert session.status_lost


async def test_an_internal_status_with_every_send_through_is_the_servers() -> None:
    session = client()
    session._end(grpc.StatusCode.INTERNAL, HIDDEN)
    assert not session.status_lost
